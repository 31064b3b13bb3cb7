"""Offline evaluation: per-user temporal split, full-ranking metrics, one harness for every model.

Protocol: each user's events ordered by time; the last ``test_fraction`` of them (at least one) are
the test period, the rest is training. Users with a single event have no training history and are
left out of the test. A user's relevant items are the test items they had not met in training
(those are excluded from the ranking, as every model here recommends unseen items only). Metrics at K
over a full ranking of the training catalog: Recall@K = hits / |relevant|; NDCG@K with binary
relevance and the ideal DCG over min(|relevant|, K); HR@K (any hit); coverage@K = distinct
recommended items / catalog size.

Model selection never looks at the test period: :func:`validation_split` holds out each user's
newest events *before* the test period (a temporal split of the test split's training part), and
the promotion gate compares models there with a paired test over users
(:func:`paired_bootstrap` on :func:`per_user_metric`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp

Scorer = Callable[[np.ndarray], np.ndarray]  # user rows -> dense (len(rows), n_items) scores


@dataclass
class Split:
    user_ids: np.ndarray  # index -> user id (every user with training events)
    item_ids: np.ndarray  # index -> item id (the training catalog)
    train: sp.csr_matrix  # users x items, summed event weights
    train_events: pd.DataFrame | None  # None in a Protocol built with keep_split_events=False
    test_users: np.ndarray  # row indices of evaluated users
    test_items: list[np.ndarray]  # relevant item indices per evaluated user
    n_test_events: int


def temporal_split(events: pd.DataFrame, test_fraction: float, max_users: int = 0,
                   seed: int = 0) -> Split:
    """``events`` needs user_id, item_id, ts, weight (raw_id breaks ties in time)."""
    if events.empty:
        raise ValueError("no events to evaluate on: the silver 'events' table is empty for this "
                         "interval; run ingest and clean first")
    sort_cols = ["user_id", "ts"] + (["raw_id"] if "raw_id" in events else [])
    ev = events.sort_values(sort_cols, kind="stable").reset_index(drop=True)
    is_test = newest_share(ev["user_id"], test_fraction, min_events=2)
    train_ev, test_ev = ev[~is_test], ev[is_test]

    user_ids, u = id_index(train_ev["user_id"])
    item_ids, i = id_index(train_ev["item_id"])
    train = sp.csr_matrix((train_ev["weight"].to_numpy(np.float32), (u, i)),
                          shape=(len(user_ids), len(item_ids)))
    train.sum_duplicates()

    tu = id_positions(user_ids, train_ev["user_id"], test_ev["user_id"])
    ti_pos = id_positions(item_ids, train_ev["item_id"], test_ev["item_id"])
    known = ti_pos >= 0
    # Items first met in the test period are outside the catalog: they count as relevant (and can
    # never be hit), which is the honest choice; -1 marks them.
    ti = np.where(known, ti_pos, -1)
    pairs = pd.DataFrame({"u": tu, "i": ti}).drop_duplicates()
    picked = train[pairs["u"].to_numpy(), np.maximum(pairs["i"].to_numpy(), 0)]
    # a matrix row for pairs, but a sparse matrix when there are none (no test events)
    seen = (picked.toarray() if sp.issparse(picked) else np.asarray(picked)).ravel() > 0
    pairs = pairs[~(seen & (pairs["i"].to_numpy() >= 0))]
    groups = pairs.groupby("u")["i"].apply(np.asarray)
    test_users = groups.index.to_numpy()
    test_items = list(groups.to_numpy())
    if max_users and len(test_users) > max_users:
        pick = np.sort(np.random.default_rng(seed).choice(len(test_users), max_users, replace=False))
        test_users, test_items = test_users[pick], [test_items[p] for p in pick]
    return Split(user_ids, item_ids, train, train_ev, test_users, test_items, len(test_ev))


def _is_categorical(col: pd.Series) -> bool:
    return isinstance(col.dtype, pd.CategoricalDtype)


def id_index(col: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """The distinct ids of ``col``, sorted, and each row's position among them. A categorical
    column (ids as integer codes over sorted categories, what the evaluate worker reads) is
    indexed on its codes: no per-row id objects are sorted or searched."""
    if _is_categorical(col):
        codes = col.cat.codes.to_numpy()
        present = np.unique(codes)
        return col.cat.categories.to_numpy()[present], np.searchsorted(present, codes)
    ids = np.sort(col.unique())
    return ids, np.searchsorted(ids, col.to_numpy())


def id_positions(ids: np.ndarray, indexed: pd.Series, col: pd.Series) -> np.ndarray:
    """Each row of ``col``'s position in ``ids`` (``id_index(indexed)[0]``), -1 where absent.
    Where both are categorical with the same categories (slices of one frame) the codes are
    compared."""
    if _is_categorical(col) and col.dtype == indexed.dtype:
        ids = np.unique(indexed.cat.codes.to_numpy())  # codes in the order of the ids
        values = col.cat.codes.to_numpy()
    else:
        values = np.asarray(col.to_numpy(), dtype=ids.dtype) if _is_categorical(col) \
            else col.to_numpy()
    pos = np.searchsorted(ids, values)
    inside = pos < len(ids)
    hit = np.zeros(len(values), dtype=bool)
    hit[inside] = ids[pos[inside]] == values[inside]
    return np.where(hit, pos, -1)


def newest_share(users: pd.Series, fraction: float, min_events: int) -> np.ndarray:
    """Rows holding each user's newest ``fraction`` of events (at least one), for users with at
    least ``min_events``. ``users`` must be ordered by user, then time."""
    if _is_categorical(users):
        users = pd.Series(users.cat.codes.to_numpy())
    g = users.groupby(users, sort=False)
    n = g.transform("size").to_numpy()
    rank = g.cumcount().to_numpy()
    return (n >= min_events) & (rank >= n - np.maximum(1, np.floor(n * fraction)).astype(np.int64))


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    k = min(k, scores.shape[1])
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.take_along_axis(scores, part, axis=1).argsort(axis=1)[:, ::-1]
    return np.take_along_axis(part, order, axis=1)


def validation_split(split: Split, validation_fraction: float, max_users: int = 0,
                     seed: int = 0) -> Split:
    """The validation split of ``split``: the same temporal protocol applied to ``split``'s
    training events only, so each user's validation events are their newest *training* events and
    no test-period event is in it (training or relevant items)."""
    return temporal_split(split.train_events, validation_fraction, max_users, seed)


def ranking_metrics(recs: np.ndarray, relevant: list[np.ndarray], ks: list[int],
                    n_items: int) -> dict[str, float]:
    """Recall/NDCG/HR/coverage at each K from ranked item indices (rows) and relevant sets."""
    out: dict[str, float] = {}
    discounts = 1.0 / np.log2(np.arange(2, recs.shape[1] + 2))
    hits = np.zeros(recs.shape, dtype=bool)
    n_rel = np.array([len(r) for r in relevant], dtype=np.float64)
    for row, rel in enumerate(relevant):
        hits[row] = np.isin(recs[row], rel[rel >= 0])
    for k in ks:
        h = hits[:, :k]
        dcg = (h * discounts[:k]).sum(axis=1)
        ideal = np.array([discounts[:min(int(n), k)].sum() for n in n_rel])
        out[f"recall_at_{k}"] = float(np.mean(h.sum(axis=1) / n_rel))
        out[f"ndcg_at_{k}"] = float(np.mean(dcg / ideal))
        out[f"hr_at_{k}"] = float(np.mean(h.any(axis=1)))
        out[f"coverage_at_{k}"] = float(len(np.unique(recs[:, :k])) / n_items)
    return out


def per_user_metric(recs: np.ndarray, relevant: list[np.ndarray], metric: str) -> np.ndarray:
    """One user's value of ``metric`` (``ndcg_at_K``, ``recall_at_K`` or ``hr_at_K``) per row, the
    values whose mean :func:`ranking_metrics` reports: the input of a paired test."""
    name, _, k = metric.rpartition("_at_")
    if name not in ("ndcg", "recall", "hr") or not k.isdigit():
        raise ValueError(f"metric {metric!r}: a per-user metric is ndcg_at_K, recall_at_K or hr_at_K")
    k = int(k)
    h = np.zeros((recs.shape[0], min(k, recs.shape[1])), dtype=bool)
    for row, rel in enumerate(relevant):
        h[row] = np.isin(recs[row, :k], rel[rel >= 0])
    n_rel = np.array([len(r) for r in relevant], dtype=np.float64)
    if name == "recall":
        return h.sum(axis=1) / n_rel
    if name == "hr":
        return h.any(axis=1).astype(np.float64)
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    ideal = np.array([discounts[:min(int(n), k)].sum() for n in n_rel])
    return (h * discounts[:h.shape[1]]).sum(axis=1) / ideal


@dataclass(frozen=True)
class PairedTest:
    """A over B on the same users: mean per-user difference, its bootstrap 95% interval, and the
    one-sided p-value of "A is no better than B"."""

    mean_diff: float
    ci_low: float
    ci_high: float
    p_value: float
    n_users: int
    resamples: int


def paired_bootstrap(a: np.ndarray, b: np.ndarray, resamples: int = 2000,
                     seed: int = 0) -> PairedTest:
    """Paired per-user bootstrap: resample users with replacement ``resamples`` times and count
    how often A's mean is not above B's. p = (count + 1) / (resamples + 1), so it is never 0 and
    identical models get p = 1. ``a`` and ``b`` hold one value per user, in the same user order."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"a paired test needs one value per user for both models in the same "
                         f"order; got shapes {a.shape} and {b.shape}")
    if len(a) == 0:
        raise ValueError("a paired test needs at least one user")
    d = a - b
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    chunk = max(1, 4_000_000 // len(d))
    for lo in range(0, resamples, chunk):
        n = min(chunk, resamples - lo)
        means[lo:lo + n] = d[rng.integers(0, len(d), (n, len(d)))].mean(axis=1)
    not_better = int(np.count_nonzero(means <= 0.0))
    lo_q, hi_q = np.quantile(means, [0.025, 0.975])
    return PairedTest(float(d.mean()), float(lo_q), float(hi_q),
                      (not_better + 1) / (resamples + 1), len(d), resamples)


RANK_BATCH = 512  # users ranked at once: their users x catalog scores are held together


def rank_split(split: Split, scorer: Scorer, k: int, batch_size: int | None = None) -> np.ndarray:
    """Top-``k`` item indices for every evaluated user of ``split`` (training items excluded),
    ``batch_size`` users (default ``RANK_BATCH``) at a time."""
    batch_size = batch_size or RANK_BATCH
    recs = np.empty((len(split.test_users), min(k, split.train.shape[1])), dtype=np.int64)
    for start in range(0, len(split.test_users), batch_size):
        rows = split.test_users[start:start + batch_size]
        scores = np.asarray(scorer(rows), dtype=np.float32)
        seen = split.train[rows]
        scores[np.repeat(np.arange(len(rows)), np.diff(seen.indptr)), seen.indices] = -np.inf
        recs[start:start + len(rows)] = top_k(scores, k)
    return recs


def evaluate_scorer(split: Split, scorer: Scorer, ks: list[int],
                    batch_size: int | None = None) -> dict[str, float]:
    """Full ranking for every evaluated user, training items excluded, then the metrics."""
    recs = rank_split(split, scorer, max(ks), batch_size)
    return ranking_metrics(recs, split.test_items, ks, split.train.shape[1])

