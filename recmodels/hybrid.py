"""Hybrid: two-stage retrieval and ranking, the shape of the served champion.

**First stage: candidates from indexes.** Each source model proposes its best ``candidates``
unseen items for the user from its own index (:meth:`recmodels.servable.Servable.view`): FAISS
over item vectors (PureSVD, ALS), top-N neighbour lists scored over the history (EASE, item-kNN),
sparse co-occurrence (user-kNN), the TF-IDF overlap of item metadata (content: items with few or
no events), a ranked list (trending). The union is the user's candidate set; no source scores the
whole catalog.

**Second stage: a ranker over features.** Every candidate is described by
:func:`recmodels.ranking.candidate_features` (each source's score and rank, popularity windows,
item age, category popularity and the user's category affinity, history length) and ordered by a
LightGBM lambdarank ranker (saved as a text model: no pickle).

``fit`` holds out each user's newest ``validation_fraction`` of training interactions (by time),
fits every source on the rest and exports and loads each one as it will be served, so the
candidates and features of the validation users come from the serving code itself. The ranker is
trained on them, labelled by the held-out items (every held-out candidate of a user and
``train_negatives`` of the others, drawn at random); with ``blender: auto`` it is kept only when it
beats the linear blend of the sources' standardized scores in two-fold cross-validation over the
validation users (NDCG@``k``). Each source's candidate recall at the cut (the share of held-out
items it proposes) and the union's are recorded in ``params()["validation"]``. The sources are
then refitted on all the data.

EASE fits the ``ease_top_items`` most popular items only (an n³ inverse in that number), so it fits
in the daily run on any catalog. A source that cannot fit on this data (``content`` without item
metadata, anything a source refuses) is left out and recorded with the reason in
``params()["skipped_sources"]``; the hybrid fails only when no source can fit.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from recmodels import servable
from recmodels.base import Interactions, Recommender, weight_matrix
from recmodels.evaluation import newest_share
from recmodels.ranking import Ranker, feature_names, item_feature_arrays, train_ranker

log = logging.getLogger(__name__)

DEFAULT_SOURCES = ("ease", "item_knn", "user_knn", "pure_svd", "content", "trending")
FEATURE_BATCH = 500  # validation users retrieved at once


def item_categories(data: Interactions) -> sp.csr_matrix | None:
    """(n_items, n_categories) binary from the item metadata's ``categories``, or None."""
    if data.items is None or "categories" not in data.items:
        return None
    names: dict[str, int] = {}
    rows, cols = [], []
    for r, cats in enumerate(data.items["categories"].tolist()):
        if cats is None or isinstance(cats, float):
            continue
        for c in cats:
            rows.append(r)
            cols.append(names.setdefault(str(c), len(names)))
    if not names:
        return None
    return sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)),
                         shape=(data.n_items, len(names)))


def _seconds(ts) -> np.ndarray:
    ts = ts.dt.tz_localize(None) if getattr(ts.dt, "tz", None) is not None else ts
    return ts.to_numpy().astype("datetime64[s]").astype(np.int64)


def user_inputs(data: Interactions, rows: np.ndarray) -> list[servable.UserInput]:
    """The users of ``rows`` as serving sees them (their histories in ``data``)."""
    m = data.matrix
    return [servable.UserInput(str(data.user_ids[r]),
                               m.indices[m.indptr[r]:m.indptr[r + 1]].astype(np.int64),
                               m.data[m.indptr[r]:m.indptr[r + 1]].astype(np.float32))
            for r in np.asarray(rows)]


def ndcg_at(order: list[np.ndarray], relevant: list[np.ndarray], k: int) -> float:
    """Mean NDCG@k of ranked position lists against each user's relevant positions."""
    disc = 1.0 / np.log2(np.arange(2, k + 2))
    vals = []
    for o, rel in zip(order, relevant):
        hit = np.isin(np.asarray(o)[:k], rel)
        ideal = disc[:min(len(rel), k)].sum()
        vals.append((hit * disc[:len(hit)]).sum() / ideal if ideal else 0.0)
    return float(np.mean(vals)) if vals else 0.0


class HybridModel(Recommender):
    name = "hybrid"

    def __init__(self, sources: tuple[str, ...] = DEFAULT_SOURCES, blender: str = "auto",
                 candidates: int = 100, validation_fraction: float = 0.2,
                 max_validation_users: int = 5000, k: int = 10, source_params: dict | None = None,
                 ease_max_items: int = 30_000, ease_top_items: int = 5_000, seed: int = 0,
                 ranker_rounds: int = 200, train_negatives: int = 50) -> None:
        super().__init__()
        if blender not in ("auto", "linear", "ranker"):
            raise ValueError(f"blender must be auto, linear or ranker, got {blender!r}")
        if not sources:
            raise ValueError("the hybrid needs at least one source model")
        if candidates < 1:
            raise ValueError(f"candidates must be at least 1, got {candidates}")
        self.sources, self.blender, self.candidates = tuple(sources), blender, candidates
        self.validation_fraction, self.max_validation_users = validation_fraction, max_validation_users
        self.k, self.seed, self.ease_max_items = k, seed, ease_max_items
        self.ease_top_items, self.ranker_rounds = ease_top_items, ranker_rounds
        self.train_negatives = train_negatives
        # trending as a source is a recency signal: a fixed short half-life, not the auto one
        self.source_params = {"trending": {"half_life_days": 7.0}, **(source_params or {})}
        self.skipped: dict[str, str] = {}
        self.validation: dict[str, float] = {}
        self.blender_used: str | None = None

    def _make(self, name: str) -> Recommender:
        from recmodels import make_model

        params = dict(self.source_params.get(name, {}))
        if name == "ease":
            params.setdefault("max_items", self.ease_max_items)
            params.setdefault("top_items", self.ease_top_items)
        return make_model(name, **params)

    def _usable_sources(self, data: Interactions, names=None) -> list[str]:
        usable = []
        for s in self.sources if names is None else names:
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

    def _served(self, models: dict[str, Recommender], data: Interactions, ranker: Ranker,
                events=None) -> servable.HybridServable:
        """The sources exported and loaded as serving loads them, under the hybrid's servable."""
        ev = data.events if events is None else events
        cats = item_categories(data)
        feats = item_feature_arrays(ev["item_row"].to_numpy(), _seconds(ev["ts"]), data.n_items,
                                    cats)
        loaded = {}
        with tempfile.TemporaryDirectory(prefix="freshrec-hybrid-") as tmp:
            for s, m in models.items():
                loaded[s] = servable.load(m.export(Path(tmp) / s))
        return servable.HybridServable(self.name, data.item_ids.astype(str), self.params(), loaded,
                                       ranker, feats, cats, self.candidates)

    # -- fit --------------------------------------------------------------------------------------
    def fit(self, data: Interactions) -> "HybridModel":
        return self._fit(data, self._usable_sources, choose=True)

    def _fit(self, data: Interactions, sources, choose: bool) -> "HybridModel":
        """``sources(data)``: the sources to fit; ``choose``: compare the ranker with the linear
        blend by cross-validation (a refit keeps the earlier choice and only trains the ranker)."""
        if data.events is None:
            raise ValueError("the hybrid needs event timestamps (Interactions.events) for its "
                             "validation split")
        self.skipped, self.validation = {}, {}
        self.names = sources(data)
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
        self.ranker, self.blender_used = Ranker.linear(self.names), "linear"
        if len(users) >= 2:
            inner_models = self._fit_sources(self.names, inner)
            self.names = self._check_usable(inner_models)
            served = self._served(inner_models, inner, Ranker.linear(self.names), fit_ev)
            del inner_models
            cands, xs, props = [], [], []
            for lo in range(0, len(users), FEATURE_BATCH):
                for c, x, p in served.retrieve(user_inputs(inner, users[lo:lo + FEATURE_BATCH])):
                    cands.append(c)
                    xs.append(x)
                    props.append(p)
            self._recall(cands, props, rel)
            self._choose_ranker(cands, xs, rel, rng, choose)
        log.info("hybrid: sources %s, ranker %s, validation %s", self.names, self.blender_used,
                 self.validation)
        return self._fit_final(data)

    def _recall(self, cands, props, rel) -> None:
        """Candidate recall at the cut, per source and for the union: the share of the held-out
        items that the first stage proposes (the ranker can only order what it is given)."""
        total = sum(len(r) for r in rel) or 1
        for j, s in enumerate(self.names):
            got = sum(int(np.isin(c[p[j]], r).sum()) for c, p, r in zip(cands, props, rel))
            self.validation[f"recall_{s}"] = got / total
        self.validation["recall_union"] = sum(int(np.isin(c, r).sum())
                                              for c, r in zip(cands, rel)) / total

    def _choose_ranker(self, cands, xs, rel, rng, choose: bool) -> None:
        names = feature_names(self.names)
        labels = [np.isin(c, r).astype(np.float32) for c, r in zip(cands, rel)]
        sampler = np.random.default_rng(self.seed + 1)
        linear = Ranker.linear(self.names)

        def ndcg(ranker, idx):
            idx = list(idx)
            p = ranker.predict(np.concatenate([xs[i] for i in idx]), self.names)
            ends = np.cumsum([len(cands[i]) for i in idx])
            order = [cands[i][np.lexsort((cands[i], -s))]
                     for i, s in zip(idx, np.split(p, ends[:-1]))]
            return ndcg_at(order, [rel[i] for i in idx], self.k)

        def sample(i):
            """A user's candidates for training: every held-out one, and at most
            ``train_negatives`` of the others, drawn at random (seeded)."""
            pos = np.flatnonzero(labels[i])
            neg = np.flatnonzero(labels[i] == 0)
            if len(neg) > self.train_negatives:
                neg = np.sort(sampler.choice(neg, self.train_negatives, replace=False))
            return np.concatenate([pos, neg])

        def train(idx):
            idx = [i for i in idx if len(cands[i])]
            if sum(labels[i].sum() for i in idx) < 5:
                return None
            rows = [sample(i) for i in idx]
            return train_ranker(np.concatenate([xs[i][r] for i, r in zip(idx, rows)]),
                                np.concatenate([labels[i][r] for i, r in zip(idx, rows)]),
                                [len(r) for r in rows], names, self.seed, self.ranker_rounds)

        n = len(cands)
        choice = self.blender if choose else "ranker"  # a refit: chosen on the earlier fit
        perm = rng.permutation(n)
        folds = [(perm[: n // 2], perm[n // 2:]), (perm[n // 2:], perm[: n // 2])]
        if choose:
            self.validation["linear_ndcg"] = float(np.mean([ndcg(linear, te) for _, te in folds]))
        if choose and choice in ("auto", "ranker"):
            scores = []
            for tr, te in folds:
                r = train(tr)
                if r is None:
                    scores = []
                    break
                scores.append(ndcg(r, te))
            if scores:
                self.validation["ranker_ndcg"] = float(np.mean(scores))
        if choice == "auto":
            choice = "ranker" if self.validation.get("ranker_ndcg", -1.0) > \
                self.validation["linear_ndcg"] else "linear"
        final = train(range(n)) if choice == "ranker" else None
        self.ranker = final if final is not None else linear
        self.blender_used = "ranker" if final is not None else "linear"

    def refit(self, data: Interactions) -> "HybridModel":
        """The hybrid fitted again on ``data`` with the choice the earlier ``fit`` made on its
        validation data (ranker or linear blend, the sources that fitted): a ranker is trained
        again on ``data``'s own newest events, so the served ranker has learned from the same
        data as the sources it ranks (no cross-validation this time)."""
        if self.blender_used is None:
            return self.fit(data)
        if data.events is None:
            raise ValueError("the hybrid needs event timestamps (Interactions.events)")
        if self.blender_used == "linear":
            return self._fit_final(data)
        fitted = list(self.names)
        return self._fit(data, lambda d: self._usable_sources(d, fitted), choose=False)

    def _fit_final(self, data: Interactions) -> "HybridModel":
        """The sources fitted on all of ``data``, loaded as served under the chosen ranker."""
        models = self._fit_sources(self.names, data)
        if len(models) < len(self.names):
            # a source that fitted the inner split but not all of the data: the ranker's features
            # name every source, so the sources that did fit are blended linearly
            self.names = self._check_usable(list(models))
            self.ranker, self.blender_used = Ranker.linear(self.names), "linear"
        self.models = models
        self.data = data
        self._servable = self._served(models, data, self.ranker)
        return self

    # -- score ------------------------------------------------------------------------------------
    def score(self, user_rows: np.ndarray) -> np.ndarray:
        """Offline evaluation through the serving path: the ranked candidates first, every other
        item below them (see :class:`recmodels.servable.HybridServable`)."""
        self._fitted()
        return self._servable.scores(user_inputs(self.data, np.asarray(user_rows)))

    def export(self, directory: Path) -> Path:
        """The sources' artifacts under ``sources/``, the ranker (LightGBM text or the linear
        weights as JSON: no pickle) and the item features."""
        data = self._fitted()
        directory = Path(directory)
        for s in self.names:
            self.models[s].export(directory / "sources" / s)
        ranker_file = self.ranker.save(directory)
        hs = self._servable
        cats = hs.item_categories
        arrays = {"item_ids": data.item_ids.astype(str), **hs.item_feats}
        if cats is not None:
            arrays.update(servable.csr_arrays(cats, "item_categories"))
        scorer = {"type": "hybrid", "sources": self.names, "ranker_file": ranker_file,
                  "ranker": self.ranker.kind, "features": feature_names(self.names),
                  "candidates": self.candidates,
                  "n_categories": 0 if cats is None else int(cats.shape[1])}
        return servable.write(directory, self.name, "hybrid", self.params(), scorer, arrays)

    def params(self) -> dict:
        return {"sources": list(self.names if hasattr(self, "names") else self.sources),
                "skipped_sources": self.skipped, "blender": self.blender,
                "blender_used": self.blender_used,
                "ranker": getattr(getattr(self, "ranker", None), "kind", None),
                "candidates": self.candidates, "validation": self.validation,
                "validation_fraction": self.validation_fraction,
                "ease_max_items": self.ease_max_items, "ease_top_items": self.ease_top_items}
