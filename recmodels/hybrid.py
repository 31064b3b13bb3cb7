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
cut) returns ``k`` items whenever ``k`` qualify.

Both blenders are compared (and the linear weights searched) on the merged candidates, where the
ranker works too: one NDCG evaluation is then a few hundred items per user, not the whole catalog.
EASE fits the ``ease_top_items`` most popular items only (an n³ inverse in that number; the rest of
the catalog scores 0 in it and reaches the candidates through the other sources), so it fits in the
daily run on any catalog. A source that cannot fit on this data (``content`` without item metadata,
EASE above ``ease_max_items``, anything a source refuses) is left out and recorded with the reason
in ``params()["skipped_sources"]``; the hybrid fails only when no source can fit.
"""

from __future__ import annotations

import functools
import logging
import pickle
from pathlib import Path

import numpy as np

from recmodels.evaluation import newest_share, top_k
from recmodels.base import Interactions, Recommender, standardize_rows, weight_matrix

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=1)
def _threadpools():
    """The process's thread pools (threadpoolctl scans the loaded libraries once)."""
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


GRID = (0.0, 0.25, 0.5, 1.0, 2.0)
FEATURE_BATCH = 500  # validation users whose full-catalog source scores are held at once
DEFAULT_SOURCES = ("ease", "item_knn", "user_knn", "pure_svd", "content", "trending")


class HybridModel(Recommender):
    name = "hybrid"

    def __init__(self, sources: tuple[str, ...] = DEFAULT_SOURCES, blender: str = "auto",
                 candidates: int = 50, validation_fraction: float = 0.2,
                 max_validation_users: int = 5000, k: int = 10, source_params: dict | None = None,
                 ease_max_items: int = 30_000, ease_top_items: int = 5_000, seed: int = 0) -> None:
        super().__init__()
        if blender not in ("auto", "linear", "ranker"):
            raise ValueError(f"blender must be auto, linear or ranker, got {blender!r}")
        if not sources:
            raise ValueError("the hybrid needs at least one source model")
        self.sources, self.blender, self.candidates = tuple(sources), blender, candidates
        self.validation_fraction, self.max_validation_users = validation_fraction, max_validation_users
        self.k, self.seed, self.ease_max_items = k, seed, ease_max_items
        self.ease_top_items = ease_top_items
        # trending as a source is a recency signal: a fixed short half-life, not the auto one
        self.source_params = {"trending": {"half_life_days": 7.0}, **(source_params or {})}
        self.weights: dict[str, float] = {}
        self.skipped: dict[str, str] = {}
        self.ranker = None
        self.validation: dict[str, float] = {}

    def _make(self, name: str) -> Recommender:
        from recmodels import make_model

        params = dict(self.source_params.get(name, {}))
        if name == "ease":
            params.setdefault("max_items", self.ease_max_items)
            params.setdefault("top_items", self.ease_top_items)
        return make_model(name, **params)

    def _usable_sources(self, data: Interactions) -> list[str]:
        """The sources worth fitting (cheap checks first; a source that fails to fit is left out
        by :meth:`_fit_sources`)."""
        usable = []
        for s in self.sources:
            if s == "hybrid":
                raise ValueError("the hybrid cannot be its own source")
            if s == "content" and data.items is None:
                self._skip(s, "no item metadata (interactions only)")
            else:
                usable.append(s)
        return self._check_usable(usable)

    def _skip(self, source: str, why: str) -> None:
        self.skipped[source] = why
        log.warning("hybrid: source %s left out: %s", source, why)

    def _check_usable(self, usable) -> list[str]:
        if not usable:
            raise ValueError(f"no usable hybrid source among {list(self.sources)}: {self.skipped}")
        return list(usable)

    def _fit_sources(self, names, data: Interactions) -> dict[str, Recommender]:
        """Each source fitted on ``data``; one that cannot fit is left out with its reason."""
        models = {}
        for s in names:
            try:
                models[s] = self._make(s).fit(data)
            except Exception as e:  # noqa: BLE001 - one source's failure must not sink the hybrid
                log.debug("hybrid: source %s failed to fit", s, exc_info=True)
                self._skip(s, f"cannot fit: {e}" if isinstance(e, ValueError)
                           else f"cannot fit: {type(e).__name__}: {e}")
        return models

    # -- features ---------------------------------------------------------------------------------
    def _features(self, z: dict[str, np.ndarray], tops: np.ndarray, seen,
                  history: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
        """Candidates per user (the union of each source's top ``candidates`` unseen items: ``tops``
        from :meth:`_source_scores`, ``seen`` the users' rows) and their features."""
        n_users = history.shape[0]
        cands, feats = [], []
        for u in range(n_users):
            ids = np.unique(tops[u])
            # fewer unseen items than candidates: the tops hold seen items, which are left out
            ids = ids[~np.isin(ids, seen.indices[seen.indptr[u]:seen.indptr[u + 1]])]
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
        """Each source's standardized scores, each source's top ``candidates`` items with the
        users' seen items masked (side by side), and the users' rows of ``seen``. The mask is put
        on and taken off in place: no second copy of the users x catalog scores."""
        sub = seen[rows]
        at = (np.repeat(np.arange(len(rows)), np.diff(sub.indptr)), sub.indices)
        z, tops = {}, []
        for s in self.names:
            v = standardize_rows(models[s].score(rows))
            kept = v[at]
            v[at] = -np.inf
            tops.append(top_k(v, min(self.candidates, v.shape[1])))
            v[at] = kept
            z[s] = v
        return z, np.concatenate(tops, axis=1), sub

    # -- fit --------------------------------------------------------------------------------------
    def fit(self, data: Interactions) -> "HybridModel":
        if data.events is None:
            raise ValueError("the hybrid needs event timestamps (Interactions.events) for its "
                             "validation split")
        self.skipped, self.validation, self.ranker = {}, {}, None
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
            inner_models = self._fit_sources(self.names, inner)
            self.names = self._check_usable(inner_models)
            candidates = self._candidate_features(inner_models, users, seen)
            del inner_models
            self._choose_blender(candidates, rel, rng)
            del candidates
        return self._fit_final(data)

    def _candidate_features(self, models: dict[str, Recommender], users: np.ndarray, seen,
                            batch: int | None = None) -> tuple[list[np.ndarray], np.ndarray]:
        """:meth:`_features` of ``users``' candidates, ``batch`` users (default
        ``FEATURE_BATCH``) at a time: only one batch's users x catalog scores per source are held
        at once (every step is per user, so the candidates and features are those of one pass
        over all users)."""
        cands, feats = [], []
        batch = batch or FEATURE_BATCH
        for lo in range(0, len(users), batch):
            z, tops, seen_users = self._source_scores(models, users[lo:lo + batch], seen)
            history = np.log1p(np.diff(seen_users.indptr)).astype(np.float32)
            c, f = self._features(z, tops, seen_users, history)
            del z, tops
            cands += c
            feats.append(f)
        return cands, (np.concatenate(feats) if feats else
                       np.zeros((0, 2 * len(self.names) + 3)))

    def refit(self, data: Interactions) -> "HybridModel":
        """The sources fitted again on ``data`` with the blender (weights, ranker) chosen by the
        earlier ``fit``: half the cost of a fit, which fits every source twice."""
        if not hasattr(self, "blender_used"):
            return self.fit(data)
        if data.events is None:
            raise ValueError("the hybrid needs event timestamps (Interactions.events)")
        return self._fit_final(data)

    def _fit_final(self, data: Interactions) -> "HybridModel":
        """The sources the blender uses, fitted on all of ``data``; the item features from it."""
        self.log_pop = np.log1p(np.asarray(data.matrix.sum(axis=0)).ravel()).astype(np.float32)
        self.item_age = self._item_age(data.events, data.n_items)
        used = self.names if self.blender_used == "ranker" else \
            [s for s in self.names if self.weights.get(s, 0) > 0]
        self.models = self._fit_sources(used, data)
        if len(self.models) < len(used):
            # a source that fitted the inner split but not all of the data: the ranker's features
            # name every source, so the sources that did fit are blended linearly
            if not self.models:  # the unweighted sources, as a last resort
                self.models = self._fit_sources([s for s in self.names if s not in used], data)
            self.names = self._check_usable(list(self.models))
            self.weights = {s: self.weights.get(s, 0.0) for s in self.models}
            self.blender_used, self.ranker = "linear", None
            if not any(w > 0 for w in self.weights.values()):
                self.weights = {s: 1.0 for s in self.models}
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

    def _choose_blender(self, candidates, rel, rng) -> None:
        n = len(rel)
        perm = rng.permutation(n)
        a, b = np.sort(perm[: n // 2]), np.sort(perm[n // 2:])
        sub = lambda d, idx: {s: v[idx] for s, v in d.items()}  # noqa: E731
        cands, feats = candidates
        lens = np.array([len(c) for c in cands])
        starts = np.concatenate([[0], np.cumsum(lens)])
        labels = np.concatenate([np.isin(c, r) for c, r in zip(cands, rel)]) if n else np.zeros(0)
        # the candidates as a padded (users, candidates) grid: the sources' standardized scores,
        # the labels, and the ideal DCG of each user's held-out items
        width = max(int(lens.max()) if n else 0, 1)
        at_row = np.repeat(np.arange(n), lens)
        at_col = np.arange(len(labels)) - np.repeat(starts[:-1], lens)
        grid = {"z": np.zeros((n, width, len(self.names)), np.float32),
                "label": np.zeros((n, width), bool), "valid": np.zeros((n, width), bool)}
        grid["z"][at_row, at_col] = feats[:, 0:2 * len(self.names):2]
        grid["label"][at_row, at_col] = labels
        grid["valid"][at_row, at_col] = True
        disc = 1.0 / np.log2(np.arange(2, self.k + 2))
        grid["ideal"] = np.array([disc[:min(len(r), self.k)].sum() for r in rel])

        def rows_of(idx):
            return np.concatenate([np.arange(starts[i], starts[i + 1]) for i in idx])

        def ranker_ndcg(model, idx, x):
            p = np.full((len(idx), width), -np.inf)
            r = rows_of(idx)
            p[np.repeat(np.arange(len(idx)), lens[idx]), at_col[r]] = model.predict_proba(x[r])[:, 1]
            return self._grid_ndcg(sub(grid, idx), p)

        choice = self.blender
        folds = [(a, b), (b, a)]  # two-fold: each blender is fitted on one half, scored on the other
        fold_w = [self._search(sub(grid, tr)) for tr, _ in folds]
        if choice in ("auto", "linear"):
            self.validation["linear_ndcg"] = float(np.mean([
                self._ndcg(sub(grid, te), w) for (_, te), w in zip(folds, fold_w)]))
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
        self.weights = self._search(grid)  # the linear blend orders non-candidates
        if choice == "ranker":
            self.ranker = self._train_ranker(self._with_blend(feats, self.weights), labels)
        log.info("hybrid: sources %s, blender %s (validation NDCG@%d: %s), weights %s", self.names,
                 choice, self.k, self.validation, self.weights)

    def _train_ranker(self, x: np.ndarray, y: np.ndarray):
        from sklearn.ensemble import HistGradientBoostingClassifier

        # one OpenMP thread: boosting runs thousands of short parallel regions, which stall on
        # each other when the cores are shared (10-30x slower on a busy 2-core machine); one
        # thread costs under 2x on an idle one
        with _threadpools().limit(limits=1, user_api="openmp"):
            return HistGradientBoostingClassifier(
                max_iter=300, learning_rate=0.05, max_leaf_nodes=31, min_samples_leaf=40,
                l2_regularization=1.0, random_state=self.seed).fit(x, y.astype(np.int8))

    def _grid_ndcg(self, grid: dict[str, np.ndarray], scores: np.ndarray) -> float:
        """NDCG@k of ordering each user's candidates by ``scores`` (users x candidates; the padding
        is never ranked), against all of the user's held-out items."""
        if not len(scores):
            return 0.0
        s = np.where(grid["valid"], scores, -np.inf)
        top = top_k(s, self.k)
        hit = np.take_along_axis(grid["label"] & grid["valid"], top, axis=1)
        disc = 1.0 / np.log2(np.arange(2, top.shape[1] + 2))
        return float(np.mean((hit * disc).sum(axis=1) / grid["ideal"]))

    def _ndcg(self, grid: dict[str, np.ndarray], w: dict[str, float]) -> float:
        wv = np.array([w.get(s, 0.0) for s in self.names], dtype=np.float32)
        if not wv.any():
            return 0.0
        return self._grid_ndcg(grid, grid["z"] @ wv)

    def _search(self, grid: dict[str, np.ndarray]) -> dict[str, float]:
        """Linear weights per source by coordinate ascent over ``GRID``, on the candidates."""
        names = self.names
        best_single = max(names, key=lambda s: self._ndcg(grid, {t: float(t == s) for t in names}))
        w = {s: float(s == best_single) for s in names}
        best = self._ndcg(grid, w)
        for _ in range(2):  # two passes of coordinate ascent
            for s in names:
                for v in GRID:
                    trial = {**w, s: v}
                    if not any(trial.values()):
                        continue
                    got = self._ndcg(grid, trial)
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
        z, tops, seen_users = self._source_scores(self.models, rows, seen)
        blend = sum(w * z[s] for s, w in self.weights.items() if w > 0)
        if isinstance(blend, int):
            blend = np.zeros_like(next(iter(z.values())))
        # everything the ranker does not order goes below its candidates, in blend order
        out = blend - blend.max(axis=1, keepdims=True) - 2.0
        history = np.log1p(np.diff(seen[rows].indptr)).astype(np.float32)
        cands, feats = self._features(z, tops, seen_users, history)
        if len(feats):
            p = self.ranker.predict_proba(self._with_blend(feats, self.weights))[:, 1]
            start = 0
            for u, c in enumerate(cands):
                out[u, c] = p[start:start + len(c)]
                start += len(c)
        return out

    def export(self, directory: Path) -> Path:
        """The sources' artifacts under ``sources/``, the ranker (``ranker.pkl``) and the features'
        item arrays: candidates are merged and ranked at request time."""
        from recmodels import servable

        data = self._fitted()
        directory = Path(directory)
        names = self.names if self.blender_used == "ranker" else list(self.models)
        for s in names:
            self.models[s].export(directory / "sources" / s)
        if self.ranker is not None and self.blender_used == "ranker":
            with open(directory / "ranker.pkl", "wb") as f:
                pickle.dump(self.ranker, f)
        scorer = {"type": "hybrid", "sources": names, "weights": self.weights,
                  "blender_used": self.blender_used, "candidates": self.candidates}
        return servable.write(directory, self.name, "hybrid", self.params(), scorer,
                              {"item_ids": data.item_ids.astype(str), "log_pop": self.log_pop,
                               "item_age": self.item_age})

    def params(self) -> dict:
        return {"sources": list(self.names if hasattr(self, "names") else self.sources),
                "skipped_sources": self.skipped, "blender": self.blender,
                "blender_used": getattr(self, "blender_used", None), "weights": self.weights,
                "candidates": self.candidates, "validation": self.validation,
                "validation_fraction": self.validation_fraction,
                "ease_max_items": self.ease_max_items, "ease_top_items": self.ease_top_items}
