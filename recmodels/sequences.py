"""Sequences and item features for the deep models (numpy only; the torch side is
:mod:`recmodels.deep_fit`).

Item index 0 is padding / unknown; catalog position ``r`` is index ``r + 1``. A user's sequence is
their training items (1-based), oldest first. Item features: category ids (bag) and hashed
title/text tokens (bag), so items without events (new items) still get a vector from their content;
items without metadata get empty bags and rely on their id.

Early stopping validates on the last training item of ``val_users`` users, removed from their
fitting sequences (:meth:`SequenceData.train_sequences`); the final user vectors read the whole
sequences.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass

import numpy as np
import pandas as pd

TOKEN_BUCKETS = 1 << 14
MAX_TOKENS = 24
MAX_CATS = 4


@dataclass
class SequenceData:
    """What the deep training loop reads."""

    name: str
    sequences: list[np.ndarray]  # per user row: training item indices (1-based), oldest first
    val_users: np.ndarray  # user rows whose last training item validates (may be empty)
    val_items: np.ndarray  # that item (1-based)
    cat_ids: np.ndarray  # (n_items + 1, MAX_CATS) category ids, 0 = none
    tok_ids: np.ndarray  # (n_items + 1, MAX_TOKENS) hashed token ids, 0 = none
    n_cats: int
    item_counts: np.ndarray  # (n_items + 1,) training events per item (for logQ), [0] = 0

    @property
    def n_items(self) -> int:
        return self.cat_ids.shape[0] - 1

    @property
    def n_users(self) -> int:
        return len(self.sequences)

    def train_sequences(self) -> list[np.ndarray]:
        """Sequences with the validation item removed (what models fit on)."""
        seqs = list(self.sequences)
        for u in self.val_users:
            seqs[u] = seqs[u][:-1]
        return seqs

    def pairs(self, max_len: int) -> tuple[np.ndarray, np.ndarray]:
        """(user row, position) of every next-item example in the fitting sequences: the target is
        ``seq[pos]`` and the history is ``seq[max(0, pos - max_len):pos]``."""
        seqs = self.train_sequences()
        lens = np.array([len(s) for s in seqs])
        users = np.repeat(np.arange(len(seqs)), np.maximum(lens - 1, 0))
        pos = np.concatenate([np.arange(1, n) for n in lens if n > 1]) if (lens > 1).any() \
            else np.zeros(0, np.int64)
        return users, pos


def _tokens(text: str) -> list[int]:
    words = re.findall(r"\w+", text.lower())[:MAX_TOKENS]
    return [1 + zlib.crc32(w.encode()) % (TOKEN_BUCKETS - 1) for w in words]


def item_features(item_ids: np.ndarray, items: pd.DataFrame | None) -> tuple[np.ndarray, np.ndarray, int]:
    """(categories, tokens, n_cats) of the catalog ``item_ids`` from ``items`` (item_id,
    categories, title, text; any may be missing)."""
    n = len(item_ids)
    cats = np.zeros((n + 1, MAX_CATS), np.int64)
    toks = np.zeros((n + 1, MAX_TOKENS), np.int64)
    if items is None or items.empty or "item_id" not in items:
        return cats, toks, 1
    meta = items.drop_duplicates("item_id").set_index("item_id").reindex(item_ids)
    vocab: dict[str, int] = {}
    for r, row in enumerate(meta.itertuples(index=False), start=1):
        c = getattr(row, "categories", None)
        if c is not None and not isinstance(c, (float, str)):
            ids = [vocab.setdefault(str(x), len(vocab) + 1) for x in list(c)[:MAX_CATS]]
            cats[r, :len(ids)] = ids
        elif isinstance(c, str) and c:
            cats[r, 0] = vocab.setdefault(c, len(vocab) + 1)
        words = " ".join(v for v in (getattr(row, "title", None), getattr(row, "text", None))
                         if isinstance(v, str))
        t = _tokens(words)
        toks[r, :len(t)] = t
    return cats, toks, len(vocab) + 1


def sequence_data(name: str, users: np.ndarray, items: np.ndarray, n_users: int,
                  item_ids: np.ndarray, item_meta: pd.DataFrame | None, val_users: int = 0,
                  seed: int = 13) -> SequenceData:
    """:class:`SequenceData` from events already in time order: ``users`` (rows, 0..n_users-1)
    and ``items`` (catalog positions, 0-based) of each event, sorted by user then time. Up to
    ``val_users`` users with 3+ events validate on their last item."""
    users = np.asarray(users, np.int64)
    idx = np.asarray(items, np.int64) + 1
    bounds = np.searchsorted(users, np.arange(n_users + 1))
    sequences = [idx[bounds[k]:bounds[k + 1]] for k in range(n_users)]
    eligible = np.flatnonzero(np.diff(bounds) >= 3)
    if val_users > 0 and len(eligible):
        rng = np.random.default_rng(seed)
        vu = np.sort(rng.choice(eligible, min(val_users, len(eligible)), replace=False))
    else:
        vu = np.zeros(0, np.int64)
    vi = np.array([sequences[k][-1] for k in vu], np.int64)
    cats, toks, n_cats = item_features(np.asarray(item_ids), item_meta)
    counts = np.bincount(idx, minlength=len(item_ids) + 1).astype(np.float64)
    counts[0] = 0
    return SequenceData(name, sequences, vu, vi, cats, toks, n_cats, counts)


def pad_histories(seqs: list[np.ndarray], users: np.ndarray, ends: np.ndarray | None,
                  max_len: int) -> np.ndarray:
    """Right-aligned histories: row j holds the ``max_len`` items before ``ends[j]`` of user
    ``users[j]`` (the whole sequence when ``ends`` is None), left-padded with 0. Vectorized over a
    flat copy of the sequences (cached per list)."""
    flat, offsets = _flat(seqs)
    users = np.asarray(users, np.int64)
    lens = offsets[users + 1] - offsets[users]
    e = lens if ends is None else np.minimum(np.asarray(ends, np.int64), lens)
    n = np.minimum(e, max_len)
    cols = np.arange(max_len)[None, :]
    src = offsets[users][:, None] + e[:, None] - max_len + cols
    valid = cols >= (max_len - n)[:, None]
    out = np.zeros((len(users), max_len), np.int64)
    out[valid] = flat[src[valid]]
    return out


_FLAT: dict[int, tuple[list, np.ndarray, np.ndarray]] = {}


def _flat(seqs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    hit = _FLAT.get(id(seqs))
    if hit is not None and hit[0] is seqs:
        return hit[1], hit[2]
    offsets = np.concatenate([[0], np.cumsum([len(s) for s in seqs])]).astype(np.int64)
    flat = np.concatenate(seqs).astype(np.int64) if len(seqs) else np.zeros(0, np.int64)
    if len(_FLAT) > 8:
        _FLAT.clear()
    _FLAT[id(seqs)] = (seqs, flat, offsets)
    return flat, offsets
