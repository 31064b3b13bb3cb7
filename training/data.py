"""Training data: a dataset (silver Delta tables at a pinned version, or MovieLens) -> the temporal
split of :mod:`recmodels.evaluation` -> sequences and item features for PyTorch.

Leakage: everything a model trains or validates on comes from ``split.train_events``, the part of
each user's history before their test period. The test period is only used by :meth:`TrainData.
evaluate`, with the same harness (full ranking, training items excluded) as the batch lane, so the
numbers compare with ALS and the hybrid. Early stopping uses an inner validation: the last training
item of ``val_users`` users, removed from their training sequences.

Item index 0 is padding / unknown; item row ``r`` of the split is index ``r + 1``. Sequences and
item features are the model library's (:mod:`recmodels.sequences`), shared with the recommenders'
``fit``; :class:`TrainData` adds the split, the data versions and the test harness.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from freshrec.data.datasets import Dataset
from recmodels.evaluation import Split, evaluate_scorer, temporal_split
from recmodels.sequences import (MAX_CATS, MAX_TOKENS, TOKEN_BUCKETS, SequenceData,  # noqa: F401
                                 _flat, item_features, pad_histories, sequence_data)


class DatasetTooSmall(ValueError):
    """Too little data to train (say what is there and what is needed)."""


@dataclass
class TrainData(SequenceData):
    split: Split | None = None
    versions: dict = field(default_factory=dict)

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
    return TrainData(**vars(seq), split=split, versions=ds.versions)
