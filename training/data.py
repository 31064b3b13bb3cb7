"""Training data: a dataset (silver Delta tables at a pinned version, or MovieLens) -> the temporal
split of :mod:`freshrec.evaluation` -> sequences and item features for PyTorch.

Leakage: everything a model trains or validates on comes from ``split.train_events``, the part of
each user's history before their test period. The test period is only used by :meth:`TrainData.
evaluate`, with the same harness (full ranking, training items excluded) as the batch lane, so the
numbers compare with ALS and the hybrid. Early stopping uses an inner validation: the last training
item of ``val_users`` users, removed from their training sequences.

Item index 0 is padding / unknown; item row ``r`` of the split is index ``r + 1``. Item features:
category ids (bag) and hashed title/text tokens (bag), so items without events (new items) still get
a vector from their content; items without metadata get empty bags and rely on their id.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass

import numpy as np
import pandas as pd

from freshrec.datasets import Dataset
from freshrec.evaluation import Split, evaluate_scorer, temporal_split

TOKEN_BUCKETS = 1 << 14
MAX_TOKENS = 24
MAX_CATS = 4


class DatasetTooSmall(ValueError):
    """Too little data to train (say what is there and what is needed)."""


@dataclass
class TrainData:
    name: str
    split: Split
    versions: dict
    sequences: list[np.ndarray]  # per split user row: training item indices (1-based), oldest first
    val_users: np.ndarray  # user rows whose last training item validates
    val_items: np.ndarray  # that item (1-based)
    cat_ids: np.ndarray  # (n_items + 1, MAX_CATS) category ids, 0 = none
    tok_ids: np.ndarray  # (n_items + 1, MAX_TOKENS) hashed token ids, 0 = none
    n_cats: int
    item_counts: np.ndarray  # (n_items + 1,) training events per item (for logQ), [0] = 0

    @property
    def n_items(self) -> int:
        return len(self.split.item_ids)

    @property
    def n_users(self) -> int:
        return len(self.split.user_ids)

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

    def evaluate(self, scorer, ks=(10, 20), max_users: int = 0) -> dict[str, float]:
        """Test-period metrics with the batch lane's harness; ``scorer(user_rows)`` gives dense
        scores over the split's items (0-based columns)."""
        split = self.split
        if max_users and len(split.test_users) > max_users:
            keep = np.sort(np.random.default_rng(0).choice(len(split.test_users), max_users, False))
            split = Split(split.user_ids, split.item_ids, split.train, split.train_events,
                          split.test_users[keep], [split.test_items[k] for k in keep],
                          split.n_test_events)
        return evaluate_scorer(split, scorer, list(ks))


def _tokens(text: str) -> list[int]:
    words = re.findall(r"\w+", text.lower())[:MAX_TOKENS]
    return [1 + zlib.crc32(w.encode()) % (TOKEN_BUCKETS - 1) for w in words]


def item_features(item_ids: np.ndarray, items: pd.DataFrame | None) -> tuple[np.ndarray, np.ndarray, int]:
    n = len(item_ids)
    cats = np.zeros((n + 1, MAX_CATS), np.int64)
    toks = np.zeros((n + 1, MAX_TOKENS), np.int64)
    if items is None or items.empty:
        return cats, toks, 1
    meta = items.drop_duplicates("item_id").set_index("item_id").reindex(item_ids)
    vocab: dict[str, int] = {}
    for r, row in enumerate(meta.itertuples(index=False), start=1):
        c = getattr(row, "categories", None)
        if c is not None and not isinstance(c, float):
            ids = [vocab.setdefault(str(x), len(vocab) + 1) for x in list(c)[:MAX_CATS]]
            cats[r, :len(ids)] = ids
        words = " ".join(v for v in (getattr(row, "title", None), getattr(row, "text", None))
                         if isinstance(v, str))
        t = _tokens(words)
        toks[r, :len(t)] = t
    return cats, toks, len(vocab) + 1


def build(ds: Dataset, test_fraction: float = 0.2, max_test_users: int = 0, seed: int = 13,
          val_users: int = 3000, min_events: int = 50) -> TrainData:
    """The temporal split of ``ds`` and everything the training lane needs from it."""
    if len(ds.events) < min_events:
        raise DatasetTooSmall(f"{ds.name}: {len(ds.events)} events; training needs at least "
                              f"{min_events} (import more events or run `make run` first)")
    split = temporal_split(ds.events, test_fraction, max_test_users, seed)
    ev = split.train_events
    u = np.searchsorted(split.user_ids, ev["user_id"].to_numpy())
    i = np.searchsorted(split.item_ids, ev["item_id"].to_numpy()) + 1
    order = np.lexsort((ev["raw_id"].to_numpy() if "raw_id" in ev else np.arange(len(ev)),
                        ev["ts"].to_numpy(), u))
    u, i = u[order], i[order]
    bounds = np.searchsorted(u, np.arange(len(split.user_ids) + 1))
    sequences = [i[bounds[k]:bounds[k + 1]] for k in range(len(split.user_ids))]
    eligible = np.array([k for k, s in enumerate(sequences) if len(s) >= 3])
    if len(eligible) < 2:
        raise DatasetTooSmall(f"{ds.name}: only {len(eligible)} users have 3+ training events; "
                              "need at least 2 for validation")
    rng = np.random.default_rng(seed)
    vu = np.sort(rng.choice(eligible, min(val_users, len(eligible)), replace=False))
    vi = np.array([sequences[k][-1] for k in vu])
    cats, toks, n_cats = item_features(split.item_ids, ds.items if len(ds.items) else None)
    counts = np.bincount(i, minlength=len(split.item_ids) + 1).astype(np.float64)
    counts[0] = 0
    return TrainData(ds.name, split, ds.versions, sequences, vu, vi, cats, toks, n_cats, counts)


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
