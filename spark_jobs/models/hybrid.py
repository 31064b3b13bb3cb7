"""Hybrid: several methods' scores blended with weights fitted on a validation split.

``fit`` holds out each user's newest ``validation_fraction`` of training interactions (by time),
fits every source on the rest, and searches blend weights (coordinate ascent over a grid) that
maximize NDCG@``k`` of the held-out items. The sources are then refitted on all the data. Scores of
each source are standardized per user before blending, so no source dominates by scale. Filters and
seen-item exclusion come from the contract's ``recommend``, before the cut.
"""

from __future__ import annotations

import numpy as np

from freshrec.evaluation import ranking_metrics, top_k
from freshrec.models.base import Interactions, Recommender, weight_matrix

GRID = (0.0, 0.25, 0.5, 1.0, 2.0)


def _standardize(s: np.ndarray) -> np.ndarray:
    s = np.asarray(s, dtype=np.float32)
    mu = s.mean(axis=1, keepdims=True)
    sd = s.std(axis=1, keepdims=True)
    return (s - mu) / np.where(sd > 0, sd, 1.0)


class HybridModel(Recommender):
    name = "hybrid"

    def __init__(self, sources: tuple[str, ...] = ("item_knn", "user_knn", "pure_svd", "trending"),
                 validation_fraction: float = 0.2, max_validation_users: int = 2000, k: int = 10,
                 source_params: dict | None = None, seed: int = 0) -> None:
        super().__init__()
        self.sources, self.validation_fraction = tuple(sources), validation_fraction
        self.max_validation_users, self.k, self.seed = max_validation_users, k, seed
        self.source_params = source_params or {}
        self.weights: dict[str, float] = {}

    def _make(self, name: str) -> Recommender:
        from spark_jobs.models import make_model

        return make_model(name, **self.source_params.get(name, {}))

    def fit(self, data: Interactions) -> "HybridModel":
        if data.events is None:
            raise ValueError("the hybrid needs event timestamps (Interactions.events) for its "
                             "validation split")
        ev = data.events.sort_values(["user_row", "ts"], kind="stable")
        n = ev.groupby("user_row")["user_row"].transform("size").to_numpy()
        r = ev.groupby("user_row").cumcount().to_numpy()
        held = (n >= 3) & (r >= n - np.maximum(1, np.floor(n * self.validation_fraction)))
        fit_ev, val_ev = ev[~held], ev[held]
        inner = Interactions(
            data.user_ids, data.item_ids,
            weight_matrix(fit_ev["user_row"], fit_ev["item_row"], fit_ev["weight"],
                          data.matrix.shape), fit_ev.reset_index(drop=True), data.items,
            data.as_of)
        relevant = val_ev.groupby("user_row")["item_row"].apply(lambda s: np.unique(s.to_numpy()))
        seen = inner.matrix
        users = relevant.index.to_numpy()
        keep = [i for i, u in enumerate(users)
                if len(np.setdiff1d(relevant.iloc[i], seen[u].indices))]
        users = users[keep]
        rel = [np.setdiff1d(relevant.iloc[i], seen[u].indices) for i, u in zip(keep, users)]
        if len(users) > self.max_validation_users:
            pick = np.sort(np.random.default_rng(self.seed).choice(
                len(users), self.max_validation_users, replace=False))
            users, rel = users[pick], [rel[p] for p in pick]
        if len(users) == 0:
            self.weights = {s: 1.0 for s in self.sources}
        else:
            scores = {}
            for name in self.sources:
                m = self._make(name).fit(inner)
                s = _standardize(m.score(users))
                s[np.repeat(np.arange(len(users)), np.diff(seen[users].indptr)),
                  seen[users].indices] = -np.inf
                scores[name] = s
            self.weights = self._search(scores, rel, data.n_items)
        self.models = {s: self._make(s).fit(data) for s in self.sources if self.weights[s] > 0}
        self.data = data
        return self

    def _ndcg(self, scores: dict[str, np.ndarray], w: dict[str, float], rel, n_items) -> float:
        total = sum(w[s] * scores[s] for s in scores if w[s] > 0)
        if isinstance(total, int):
            return 0.0
        return ranking_metrics(top_k(total, self.k), rel, [self.k], n_items)[f"ndcg_at_{self.k}"]

    def _search(self, scores, rel, n_items) -> dict[str, float]:
        best_single = max(scores, key=lambda s: self._ndcg(
            scores, {t: float(t == s) for t in scores}, rel, n_items))
        w = {s: float(s == best_single) for s in scores}
        best = self._ndcg(scores, w, rel, n_items)
        for _ in range(2):  # two passes of coordinate ascent
            for s in scores:
                for v in GRID:
                    trial = {**w, s: v}
                    if not any(trial.values()):
                        continue
                    got = self._ndcg(scores, trial, rel, n_items)
                    if got > best + 1e-9:
                        best, w = got, trial
        self.validation_ndcg = best
        return w

    def score(self, user_rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(user_rows)
        return sum(self.weights[s] * _standardize(m.score(rows)) for s, m in self.models.items())

    def params(self) -> dict:
        return {"sources": list(self.sources), "weights": self.weights,
                "validation_fraction": self.validation_fraction}

