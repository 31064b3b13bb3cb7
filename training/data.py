"""Training data: a dataset (silver Delta tables at a pinned version, or MovieLens) -> the temporal
split of :mod:`recmodels.evaluation` -> sequences and item features for PyTorch.

Leakage: everything a model trains or validates on comes from ``split.train_events``, the part of
each user's history before their test period. The test period is only used by :meth:`TrainData.
evaluate`, with the same harness (full ranking, training items excluded) as the batch lane, so the
numbers compare with ALS and the hybrid. Early stopping uses an inner validation: the last training
item of ``val_users`` users, removed from their training sequences. The same validation users
gate the trained model against the registry's champion (:meth:`TrainData.validation_per_user`
scores any servable model, the champion's artifact included, on them).

Item index 0 is padding / unknown; item row ``r`` of the split is index ``r + 1``. Sequences and
item features are the model library's (:mod:`recmodels.sequences`), shared with the recommenders'
``fit``; :class:`TrainData` adds the split, the data versions and the test harness.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from freshrec.data.datasets import Dataset
from recmodels.evaluation import Split, evaluate_scorer, per_user_metric, temporal_split, top_k
from recmodels.servable import Servable, UserInput
from recmodels.sequences import (MAX_CATS, MAX_TOKENS, TOKEN_BUCKETS, SequenceData,  # noqa: F401
                                 _flat, item_features, pad_histories, sequence_data)


class DatasetTooSmall(ValueError):
    """Too little data to train (say what is there and what is needed)."""


@dataclass
class TrainData(SequenceData):
    split: Split | None = None
    versions: dict = field(default_factory=dict)
    weights: list[np.ndarray] | None = None  # per user row: the event weights along ``sequences``

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

    def validation_inputs(self, item_ids: np.ndarray) -> tuple[list[UserInput], np.ndarray]:
        """The validation users as a servable model with catalog ``item_ids`` sees them: their
        training history without the held-out item (positions in that catalog; items it lacks are
        left out), with summed event weights and in time order, marked ``fresh`` so that every
        model scores the history given rather than a state it stored; and each user's held-out
        item's position there (-1 where the catalog lacks it: never hit)."""
        pos = pd.Index(np.asarray(item_ids).astype(str)).get_indexer(
            np.asarray(self.split.item_ids).astype(str))
        seqs = self.train_sequences()
        users = []
        for u in self.val_users:
            hist = pos[seqs[u] - 1]
            w = self.weights[u][:len(seqs[u])] if self.weights is not None \
                else np.ones(len(hist), np.float32)
            keep = hist >= 0
            hist, w = hist[keep], w[keep]
            items, inv = np.unique(hist, return_inverse=True)
            users.append(UserInput(str(self.split.user_ids[u]), items,
                                   np.bincount(inv, weights=w, minlength=len(items)).astype(np.float32),
                                   hist, fresh=True))
        return users, pos[self.val_items - 1] if len(self.val_items) else np.zeros(0, np.int64)

    def validation_per_user(self, model: Servable, k: int = 10, batch: int = 512) -> np.ndarray:
        """Per validation user, NDCG@``k`` of ``model`` (any servable: the trained model's export
        or the champion's artifact) on their held-out item: the whole catalog ranked, the user's
        other training items excluded, as the training loop validates
        (:func:`recmodels.deep_fit.validation_ndcg`). The input of the gate's paired test."""
        users, targets = self.validation_inputs(model.item_ids)
        out = np.zeros(len(users))
        for s in range(0, len(users), batch):
            chunk, tgt = users[s:s + batch], targets[s:s + batch]
            scores = np.array(model.scores(chunk), dtype=np.float64)
            for n, u in enumerate(chunk):
                scores[n, u.items[u.items != tgt[n]]] = -np.inf
            recs = top_k(scores, min(k, scores.shape[1]))
            out[s:s + len(chunk)] = per_user_metric(recs, [np.array([t]) for t in tgt],
                                                    f"ndcg_at_{k}")
        return out


def build(ds: Dataset, test_fraction: float = 0.2, max_test_users: int = 0, seed: int = 13,
          val_users: int = 3000, min_events: int = 50) -> TrainData:
    """The temporal split of ``ds`` and everything the training lane needs from it."""
    if len(ds.events) < min_events:
        raise DatasetTooSmall(f"{ds.name}: {len(ds.events)} events; training needs at least "
                              f"{min_events} (import more events or run `make run` first)")
    split = temporal_split(ds.events, test_fraction, max_test_users, seed)
    ev = split.train_events
    u = np.searchsorted(split.user_ids, ev["user_id"].to_numpy())
    i = np.searchsorted(split.item_ids, ev["item_id"].to_numpy())
    order = np.lexsort((ev["raw_id"].to_numpy() if "raw_id" in ev else np.arange(len(ev)),
                        ev["ts"].to_numpy(), u))
    lens = np.bincount(u, minlength=len(split.user_ids))
    if (lens >= 3).sum() < 2:
        raise DatasetTooSmall(f"{ds.name}: only {(lens >= 3).sum()} users have 3+ training events; "
                              "need at least 2 for validation")
    seq = sequence_data(ds.name, u[order], i[order], len(split.user_ids), split.item_ids,
                        ds.items if len(ds.items) else None, val_users, seed)
    w = (ev["weight"].to_numpy(np.float32) if "weight" in ev else np.ones(len(ev), np.float32))[order]
    bounds = np.searchsorted(u[order], np.arange(len(split.user_ids) + 1))
    weights = [w[bounds[k]:bounds[k + 1]] for k in range(len(split.user_ids))]
    return TrainData(**vars(seq), split=split, versions=ds.versions, weights=weights)
