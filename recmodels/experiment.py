"""The fixed evaluation protocol, in memory: what ``freshrec evaluate`` (the batch lane) and
``freshrec experiment`` (a file, no Airflow, Spark or Delta) both run.

1. :func:`recmodels.evaluation.temporal_split`: each user's newest ``test_fraction`` of events is
   the **test** period; it only reports, nothing is chosen on it.
2. :func:`recmodels.evaluation.validation_split`: of the rest, each user's newest
   ``validation_fraction`` is the **validation** period.
3. Every model is fitted **once**, on the events before both periods, and ranks the full catalog
   for the validation users and for the test users (their earlier events excluded from the
   ranking; items the fit never saw cannot be recommended).
4. Metrics at each K on both splits; the per-user values of the gate's metric on the validation
   split, and one-sided paired bootstrap p-values (:func:`recmodels.evaluation.paired_bootstrap`)
   of "model A beats model B" for every pair.

``run_experiment`` returns the tables; the batch lane's evaluate adds MLflow runs, the refit and
the gate on top of :class:`Protocol`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from recmodels.evaluation import (Split, paired_bootstrap, per_user_metric, rank_split,
                                 ranking_metrics, temporal_split, validation_split)
from recmodels import DEEP_MODELS, SPARK_MODELS, available_models, make_model, model_params
from recmodels.base import Interactions, Recommender


def interactions_of(events: pd.DataFrame, items: pd.DataFrame | None) -> Interactions:
    """Events (the columns the models use) and the item metadata as the contract's Interactions
    (``from_events`` reads only those columns: no copy of the frame is made to select them)."""
    return Interactions.from_events(events, items if items is not None and len(items) else None)


def expand_models(requested: Iterable[str], in_memory: bool = False) -> list[str]:
    """Model names, each once, in the order given; ``all`` is every available model (with
    ``in_memory``: every one that needs neither Spark nor torch)."""
    known = available_models()
    names: list[str] = []
    for name in requested:
        name = name.strip()
        if name == "all":
            pick = [m for m in known if not in_memory or m not in SPARK_MODELS | DEEP_MODELS]
        elif name:
            pick = [name]
        else:
            continue
        names += [m for m in pick if m not in names]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown model(s) {unknown}; known: {sorted(known)} or all")
    if not names:
        raise ValueError("no model named: give one or more model names, or all")
    return names


@dataclass
class Fitted:
    """A model fitted under the protocol, and its scores in a split's indices."""

    name: str
    model: Recommender
    fit_seconds: float

    def scorer(self, split: Split):
        data = self.model.data
        rows = _positions(data.user_ids, split.user_ids)
        cols = _positions(data.item_ids, split.item_ids)
        known_rows, known_cols = rows >= 0, cols >= 0

        def score(user_rows: np.ndarray) -> np.ndarray:
            r = rows[user_rows]
            out = np.full((len(user_rows), len(cols)), -np.inf, dtype=np.float32)
            ok = known_rows[user_rows]
            if ok.any():
                s = np.asarray(self.model.score(r[ok]), dtype=np.float32)
                out[np.ix_(np.flatnonzero(ok), np.flatnonzero(known_cols))] = s[:, cols[known_cols]]
            return out

        return score


def _positions(ids: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """Index of each ``wanted`` id in the sorted ``ids``; -1 where absent."""
    ids = np.asarray(ids, dtype=object)
    pos = np.searchsorted(ids, wanted)
    inside = pos < len(ids)
    hit = np.zeros(len(wanted), dtype=bool)
    hit[inside] = ids[pos[inside]] == np.asarray(wanted, dtype=object)[inside]
    return np.where(hit, pos, -1)


@dataclass
class Scores:
    validation: dict[str, float]
    test: dict[str, float]
    per_user: np.ndarray  # the gate metric per validation user (validation split order)


class Protocol:
    """One data set under the fixed protocol: the test split, the validation split inside its
    training part, and the fit data (the events before both)."""

    def __init__(self, events: pd.DataFrame, items: pd.DataFrame | None, ks: Sequence[int],
                 test_fraction: float, validation_fraction: float, max_users: int = 0,
                 seed: int = 0, keep_split_events: bool = True) -> None:
        """``keep_split_events=False`` drops the splits' event frames (``train_events``) once the
        fit data is built: scoring needs only their matrices and held-out items (evaluate's
        worker, to hold fewer copies of the events)."""
        self.ks = list(ks)
        self.metric = f"ndcg_at_{self.ks[0]}"
        self.test = temporal_split(events, test_fraction, max_users, seed)
        self.validation = validation_split(self.test, validation_fraction, max_users, seed)
        if not len(self.validation.test_users):
            raise ValueError("no user has enough events for a validation split (each needs at "
                             "least two events before the test period); give more events per user")
        self.items = items if items is not None and len(items) else None
        self.data = interactions_of(self.validation.train_events, self.items)
        self.fit_events = int(len(self.validation.train_events))
        if not keep_split_events:
            self.test.train_events = self.validation.train_events = None

    def fit(self, name: str, params: dict | None = None) -> Fitted:
        t0 = time.perf_counter()
        model = make_model(name, **(params or {})).fit(self.data)
        return Fitted(name, model, getattr(model, "fit_seconds", time.perf_counter() - t0))

    def score(self, fitted: Fitted) -> Scores:
        kmax = max(self.ks)
        out = {}
        per_user = None
        for label, split in (("validation", self.validation), ("test", self.test)):
            recs = rank_split(split, fitted.scorer(split), kmax)
            out[label] = ranking_metrics(recs, split.test_items, self.ks, split.train.shape[1])
            if label == "validation":
                per_user = per_user_metric(recs, split.test_items, self.metric)
        return Scores(out["validation"], out["test"], per_user)

    def describe(self) -> dict[str, int]:
        return {"fit_users": int(self.data.n_users), "fit_items": int(self.data.n_items),
                "fit_events": self.fit_events,
                "validation_users": int(len(self.validation.test_users)),
                "test_users": int(len(self.test.test_users))}


def p_value_matrix(per_user: dict[str, np.ndarray], resamples: int = 2000,
                   seed: int = 0) -> dict[str, dict[str, float]]:
    """p[a][b]: one-sided paired bootstrap p-value of "a beats b" on the same validation users."""
    names = list(per_user)
    return {a: {b: paired_bootstrap(per_user[a], per_user[b], resamples, seed).p_value
                for b in names if b != a} for a in names}


@dataclass
class ExperimentResult:
    validation: pd.DataFrame  # one row per model: metrics at each K, fit_seconds
    test: pd.DataFrame
    p_values: dict[str, dict[str, float]]  # p[a][b]: "a beats b" on validation
    metric: str
    best: str  # the model with the best validation metric
    skipped: dict[str, str] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)
    per_user: dict[str, np.ndarray] = field(default_factory=dict)

    def summary(self) -> pd.DataFrame:
        """Per model: the validation metric, its p-value against the best model (and of the best
        against the runner-up), and the test metrics, best first."""
        m = self.metric
        best = self.best
        rows = []
        for name in self.validation.index:
            if name == best:
                others = [o for o in self.validation.index if o != best]
                runner = max(others, key=lambda o: self.validation.loc[o, m]) if others else None
                p = self.p_values[best][runner] if runner else float("nan")
                vs = f"beats {runner}" if runner else ""
            else:
                p, vs = self.p_values[best][name], f"{best} beats it"
            rows.append({"model": name, f"val_{m}": self.validation.loc[name, m], "p_value": p,
                         "hypothesis": vs, **{f"test_{k}": v for k, v in self.test.loc[name].items()
                                        if k.startswith(("ndcg", "recall"))},
                         "fit_seconds": self.validation.loc[name, "fit_seconds"]})
        out = pd.DataFrame(rows).set_index("model")
        return out.sort_values(f"val_{m}", ascending=False)

    def plot(self, path: str | Path | None = None, k: int | None = None):
        """Bars of NDCG and Recall at ``k`` per model on the validation and test splits; saved as
        a PNG when ``path`` is given. Returns the matplotlib figure."""
        from freshrec.plots import quality_bars

        k = k or int(self.metric.rsplit("_", 1)[1])
        fig = quality_bars({"validation": self.validation, "test": self.test}, k,
                           title=f"{self.sizes.get('test_users', '?')} test users, temporal split")
        if path is not None:
            fig.savefig(path, dpi=90, bbox_inches="tight")
        return fig


def run_experiment(events: pd.DataFrame | str | Path, models: Sequence[str] | str = ("most_popular",
                   "item_knn"), items: pd.DataFrame | None = None, settings: Any = None,
                   params: dict[str, dict] | None = None, ks: Sequence[int] | None = None,
                   test_fraction: float | None = None, validation_fraction: float | None = None,
                   max_users: int | None = None, seed: int | None = None,
                   progress=None) -> ExperimentResult:
    """Evaluate ``models`` on ``events`` (a DataFrame with user_id, item_id, ts/timestamp
    [, value, weight], or the path of such a CSV/Parquet file) under the fixed protocol, in
    memory. Defaults come from ``settings`` (``evaluation.*``, ``models.<name>``; default:
    :func:`freshrec.settings.load_settings`); ``params`` overrides per model parameters.
    ``progress(name, i, n)`` is called before each fit."""
    from freshrec.data import datasets

    if settings is None:
        from freshrec.settings import load_settings

        settings = load_settings()
    cfg = settings.evaluation
    if isinstance(events, (str, Path)):
        events = datasets.from_file(events).events
    else:
        events = _normalise(events)
    names = expand_models([models] if isinstance(models, str) else models, in_memory=True)
    proto = Protocol(events, items, ks or cfg.ks, test_fraction or cfg.test_fraction,
                     validation_fraction or cfg.validation_fraction,
                     cfg.max_users if max_users is None else max_users,
                     cfg.seed if seed is None else seed)
    val, test, per_user, skipped = {}, {}, {}, {}
    for n, name in enumerate(names, 1):
        if progress is not None:
            progress(name, n, len(names))
        p = {**model_params(name, settings), **((params or {}).get(name, {}))}
        try:
            fitted = proto.fit(name, p)
        except ValueError as e:  # e.g. EASE above its catalog size: say so, go on
            skipped[name] = str(e)
            continue
        s = proto.score(fitted)
        val[name] = {**s.validation, "fit_seconds": fitted.fit_seconds}
        test[name] = s.test
        per_user[name] = s.per_user
        del fitted
    if not val:
        raise ValueError(f"every model was skipped: {skipped}")
    vdf, tdf = pd.DataFrame(val).T, pd.DataFrame(test).T
    best = str(vdf[proto.metric].idxmax())
    return ExperimentResult(vdf, tdf, p_value_matrix(per_user, cfg.bootstrap_resamples, cfg.seed),
                            proto.metric, best, skipped, proto.describe(), per_user)


def _normalise(events: pd.DataFrame) -> pd.DataFrame:
    ev = events.rename(columns={"timestamp": "ts"}) if "ts" not in events else events
    missing = [c for c in ("user_id", "item_id", "ts") if c not in ev]
    if missing:
        raise ValueError(f"events frame: missing column(s) {missing}; it has {list(events.columns)} "
                         "(needs user_id, item_id, ts or timestamp)")
    ev = ev.copy()
    if not pd.api.types.is_datetime64_any_dtype(ev["ts"]):
        ev["ts"] = pd.to_datetime(ev["ts"], unit="s" if pd.api.types.is_numeric_dtype(ev["ts"])
                                  else None, utc=True)
    if "weight" not in ev:
        ev["weight"] = 1.0
    return ev
