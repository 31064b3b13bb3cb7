"""Hybrid: candidates from several methods, merged and ranked by a blender learned on validation.

``fit`` holds out each user's newest ``validation_fraction`` of training interactions (by time) and
fits every source on the rest. For a sample of validation users it then takes the union of each
source's top ``candidates`` unseen items and describes every candidate by each source's standardized
score and its rank among the candidates, the item's log popularity and the user's history length.
Two blenders are compared by two-fold cross-validation over the validation users (NDCG@``k``):

* ``linear``: weights per source (standardized scores), fitted by coordinate ascent over a grid;
* ``ranker``: a gradient-boosted classifier (scikit-learn's HistGradientBoosting) over the
  candidate features, labelled by whether the user met the candidate in the held-out period.

The winner (or the one named by ``blender``) is refitted on all validation users, and the sources
are refitted on all the data. At scoring time the ranker orders the merged candidates and the linear
blend orders everything below them, so ``recommend`` (filters and seen items removed before the
cut) returns ``k`` items whenever ``k`` qualify. EASE is left out of the sources (and recorded in
``params``) when the catalog is above its limit; ``content`` when items have no metadata.
"""

from __future__ import annotations

import logging

import numpy as np

from freshrec.evaluation import newest_share, ranking_metrics, top_k
from freshrec.models.base import Interactions, Recommender, standardize_rows, weight_matrix

log = logging.getLogger(__name__)
GRID = (0.0, 0.25, 0.5, 1.0, 2.0)
DEFAULT_SOURCES = ("ease", "item_knn", "user_knn", "pure_svd", "content", "trending")


def _mask(scores: np.ndarray, seen, rows_in_seen: np.ndarray) -> np.ndarray:
    out = scores.copy()
    sub = seen[rows_in_seen]
    out[np.repeat(np.arange(len(rows_in_seen)), np.diff(sub.indptr)), sub.indices] = -np.inf
    return out


class HybridModel(Recommender):
    name = "hybrid"

    def __init__(self, sources: tuple[str, ...] = DEFAULT_SOURCES, blender: str = "auto",
                 candidates: int = 50, validation_fraction: float = 0.2,
                 max_validation_users: int = 5000, k: int = 10, source_params: dict | None = None,
                 ease_max_items: int = 30_000, seed: int = 0) -> None:
        super().__init__()
        if blender not in ("auto", "linear", "ranker"):
            raise ValueError(f"blender must be auto, linear or ranker, got {blender!r}")
        if not sources:
            raise ValueError("the hybrid needs at least one source model")
        self.sources, self.blender, self.candidates = tuple(sources), blender, candidates
        self.validation_fraction, self.max_validation_users = validation_fraction, max_validation_users
        self.k, self.seed, self.ease_max_items = k, seed, ease_max_items
        # trending as a source is a recency signal: a fixed short half-life, not the auto one
        self.source_params = {"trending": {"half_life_days": 7.0}, **(source_params or {})}
        self.weights: dict[str, float] = {}
        self.skipped: dict[str, str] = {}
        self.ranker = None
        self.validation: dict[str, float] = {}

    def _make(self, name: str) -> Recommender:
        from spark_jobs.models import make_model

        params = dict(self.source_params.get(name, {}))
        if name == "ease":
            params.setdefault("max_items", self.ease_max_items)
        return make_model(name, **params)

    def _usable_sources(self, data: Interactions) -> list[str]:
        usable = []
        for s in self.sources:
            if s == "hybrid":
                raise ValueError("the hybrid cannot be its own source")
            if s == "ease" and data.n_items > self.ease_max_items:
                self.skipped[s] = f"{data.n_items:,} items is above ease_max_items={self.ease_max_items:,}"
            elif s == "content" and data.items is None:
                self.skipped[s] = "no item metadata"
            else:
                usable.append(s)
        for s, why in self.skipped.items():
            log.warning("hybrid: source %s left out: %s", s, why)
        if not usable:
            raise ValueError(f"no usable hybrid source among {list(self.sources)}: {self.skipped}")
        return usable

    # -- features ---------------------------------------------------------------------------------
    def _features(self, z: dict[str, np.ndarray], masked: dict[str, np.ndarray],
                  history: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
        """Candidates per user (union of each source's top ``candidates``) and their features."""
        n_users = history.shape[0]
        c = min(self.candidates, next(iter(z.values())).shape[1])
        tops = np.concatenate([top_k(masked[s], c) for s in self.names], axis=1)
        cands, feats = [], []
        for u in range(n_users):
            ids = np.unique(tops[u])
            ids = ids[np.isfinite(masked[self.names[0]][u, ids])] if len(ids) else ids
            cands.append(ids)
            cols = []
            for s in self.names:
                sc = z[s][u, ids]
                cols.append(sc)
                cols.append(np.log1p(np.argsort(np.argsort(-sc))))
            cols.append(self.log_pop[ids])
            cols.append(self.item_age[ids])
            cols.append(np.full(len(ids), history[u], dtype=np.float32))
            feats.append(np.stack(cols, axis=1))
        return cands, np.concatenate(feats) if feats else np.zeros((0, 2 * len(self.names) + 3))

    def _with_blend(self, feats: np.ndarray, w: dict[str, float]) -> np.ndarray:
        """Append the linear blend's score (stacking): the ranker starts from what the linear
        blender knows. The sources' standardized scores are the even columns."""
        wv = np.array([w.get(s, 0.0) for s in self.names], dtype=np.float32)
        return np.column_stack([feats, feats[:, 0:2 * len(self.names):2] @ wv])

    def _source_scores(self, models: dict[str, Recommender], rows: np.ndarray, seen):
        z = {s: standardize_rows(models[s].score(rows)) for s in self.names}
        masked = {s: _mask(v, seen, rows) for s, v in z.items()}
        return z, masked

    # -- fit --------------------------------------------------------------------------------------
    def fit(self, data: Interactions) -> "HybridModel":
        if data.events is None:
            raise ValueError("the hybrid needs event timestamps (Interactions.events) for its "
                             "validation split")
        self.skipped = {}
        self.names = self._usable_sources(data)
        ev = data.events.sort_values(["user_row", "ts"], kind="stable")
        held = newest_share(ev["user_row"], self.validation_fraction, min_events=3)
        fit_ev, val_ev = ev[~held], ev[held]
        inner = Interactions(
            data.user_ids, data.item_ids,
            weight_matrix(fit_ev["user_row"], fit_ev["item_row"], fit_ev["weight"],
                          data.matrix.shape), fit_ev.reset_index(drop=True), data.items,
            data.as_of)
        seen = inner.matrix
        relevant = val_ev.groupby("user_row")["item_row"].apply(lambda s: np.unique(s.to_numpy()))
        users = relevant.index.to_numpy()
        rel = [np.setdiff1d(relevant.iloc[i], seen[u].indices) for i, u in enumerate(users)]
        keep = np.array([len(x) > 0 for x in rel], dtype=bool)
        users, rel = users[keep], [x for x, k in zip(rel, keep) if k]
        rng = np.random.default_rng(self.seed)
        if len(users) > self.max_validation_users:
            pick = np.sort(rng.choice(len(users), self.max_validation_users, replace=False))
            users, rel = users[pick], [rel[p] for p in pick]
        self.log_pop = np.log1p(np.asarray(inner.matrix.sum(axis=0)).ravel()).astype(np.float32)
        self.item_age = self._item_age(fit_ev, data.n_items)
        if len(users) < 2:
            self.weights, self.blender_used = {s: 1.0 for s in self.names}, "linear"
        else:
            inner_models = {s: self._make(s).fit(inner) for s in self.names}
            z, masked = self._source_scores(inner_models, users, seen)
            history = np.log1p(np.diff(seen[users].indptr)).astype(np.float32)
            self._choose_blender(z, masked, history, rel, data.n_items, rng)
        self.log_pop = np.log1p(np.asarray(data.matrix.sum(axis=0)).ravel()).astype(np.float32)
        self.item_age = self._item_age(data.events, data.n_items)
        used = self.names if self.blender_used == "ranker" else \
            [s for s in self.names if self.weights.get(s, 0) > 0]
        self.models = {s: self._make(s).fit(data) for s in used}
        self.data = data
        return self

    @staticmethod
    def _item_age(events, n_items: int) -> np.ndarray:
        """log days from an item's first event to the newest event (unseen items: age 0)."""
        ts = events["ts"]
        ts = ts.dt.tz_localize(None) if getattr(ts.dt, "tz", None) is not None else ts
        secs = ts.to_numpy().astype("datetime64[s]").astype(np.int64)
        first = np.full(n_items, secs.max(), dtype=np.int64)
        np.minimum.at(first, events["item_row"].to_numpy(), secs)
        return np.log1p((secs.max() - first) / 86400.0).astype(np.float32)

    def _choose_blender(self, z, masked, history, rel, n_items, rng) -> None:
        n = len(rel)
        perm = rng.permutation(n)
        a, b = np.sort(perm[: n // 2]), np.sort(perm[n // 2:])
        sub = lambda d, idx: {s: v[idx] for s, v in d.items()}  # noqa: E731
        cands, feats = self._features(z, masked, history)
        lens = np.array([len(c) for c in cands])
        starts = np.concatenate([[0], np.cumsum(lens)])
        labels = np.concatenate([np.isin(c, r) for c, r in zip(cands, rel)]) if n else np.zeros(0)

        def rows_of(idx):
            return np.concatenate([np.arange(starts[i], starts[i + 1]) for i in idx])

        def ranker_ndcg(model, idx, x):
            recs = np.full((len(idx), self.k), -1)
            for j, i in enumerate(idx):
                if lens[i] == 0:
                    continue
                p = model.predict_proba(x[starts[i]:starts[i + 1]])[:, 1]
                order = cands[i][np.argsort(-p)][: self.k]
                recs[j, : len(order)] = order
            return ranking_metrics(recs, [rel[i] for i in idx], [self.k], n_items)[f"ndcg_at_{self.k}"]

        choice = self.blender
        folds = [(a, b), (b, a)]  # two-fold: each blender is fitted on one half, scored on the other
        fold_w = [self._search(sub(masked, tr), [rel[i] for i in tr], n_items) for tr, _ in folds]
        if choice in ("auto", "linear"):
            self.validation["linear_ndcg"] = float(np.mean([
                self._ndcg(sub(masked, te), w, [rel[i] for i in te], n_items)
                for (_, te), w in zip(folds, fold_w)]))
        if choice in ("auto", "ranker") and labels[rows_of(a)].any() and labels[rows_of(b)].any():
            scores = []
            for (tr, te), w in zip(folds, fold_w):
                x = self._with_blend(feats, w)
                scores.append(ranker_ndcg(self._train_ranker(x[rows_of(tr)], labels[rows_of(tr)]),
                                          te, x))
            self.validation["ranker_ndcg"] = float(np.mean(scores))
        if choice == "auto":
            choice = "ranker" if self.validation.get("ranker_ndcg", -1) > self.validation["linear_ndcg"] \
                else "linear"
        self.blender_used = choice
        self.weights = self._search(masked, rel, n_items)  # the linear blend orders non-candidates
        if choice == "ranker":
            self.ranker = self._train_ranker(self._with_blend(feats, self.weights), labels)
        log.info("hybrid: sources %s, blender %s (validation NDCG@%d: %s), weights %s", self.names,
                 choice, self.k, self.validation, self.weights)

    def _train_ranker(self, x: np.ndarray, y: np.ndarray):
        from sklearn.ensemble import HistGradientBoostingClassifier

        return HistGradientBoostingClassifier(max_iter=300, learning_rate=0.05, max_leaf_nodes=31,
                                              min_samples_leaf=40, l2_regularization=1.0,
                                              random_state=self.seed).fit(x, y.astype(np.int8))

    def _ndcg(self, scores: dict[str, np.ndarray], w: dict[str, float], rel, n_items) -> float:
        total = sum(w[s] * scores[s] for s in scores if w.get(s, 0) > 0)
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
        return w

    # -- score ------------------------------------------------------------------------------------
    def score(self, user_rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(user_rows)
        seen = self._fitted().matrix
        if self.blender_used != "ranker":
            return sum(self.weights[s] * standardize_rows(self.models[s].score(rows))
                       for s in self.models if self.weights.get(s, 0) > 0)
        z, masked = self._source_scores(self.models, rows, seen)
        blend = sum(w * z[s] for s, w in self.weights.items() if w > 0)
        if isinstance(blend, int):
            blend = np.zeros_like(next(iter(z.values())))
        # everything the ranker does not order goes below its candidates, in blend order
        out = blend - blend.max(axis=1, keepdims=True) - 2.0
        history = np.log1p(np.diff(seen[rows].indptr)).astype(np.float32)
        cands, feats = self._features(z, masked, history)
        if len(feats):
            p = self.ranker.predict_proba(self._with_blend(feats, self.weights))[:, 1]
            start = 0
            for u, c in enumerate(cands):
                out[u, c] = p[start:start + len(c)]
                start += len(c)
        return out

    def params(self) -> dict:
        return {"sources": list(self.names if hasattr(self, "names") else self.sources),
                "skipped_sources": self.skipped, "blender": self.blender,
                "blender_used": getattr(self, "blender_used", None), "weights": self.weights,
                "candidates": self.candidates, "validation": self.validation,
                "validation_fraction": self.validation_fraction}
