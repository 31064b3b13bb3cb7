"""A/B arms on one server, and the online monitoring gauges.

``ArmState``: one arm of ``serving.experiment`` (or the one unnamed arm without an experiment) with
the :class:`ServingState` it serves, its served-slates counter and its drift monitor. Arms naming
the same registered version share one state object (one copy of the index in memory).

``ArmMonitor``: every ``serving.monitor.sample_every``-th personalized slate of an arm is kept in a
rolling window (its scores and how many of its items were among the ``popular_top_n`` most popular
items at load). Against it stands a reference taken when the model is loaded: the model's slates
for a seeded sample of ``reference_users`` snapshot users. A background pass every
``interval_seconds`` turns both into gauges (mean and quantiles of served scores, the standardized
shift of the mean, the popular share and its change), so a Recommend pays one counter increment
and, when sampled, one append.

``OnlineCollector``: the per-arm CTR of the latest online report (``freshrec report --online``
writes ``<data>/reports/online-latest.json``), exported as gauges at scrape time for the CTR-drop
alert.
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from freshrec.settings import MonitorSettings
from serving.state import ServingState

log = logging.getLogger(__name__)
NO_ARM = "none"  # the arm label of metrics when no experiment runs
STATS = ("mean", "p10", "p50", "p90")


@dataclass
class Reference:
    """The served-score distribution and popular share of a model at load."""

    mean: float
    std: float
    quantiles: dict[str, float]
    popular_share: float
    slates: int


def _stats(scores: np.ndarray) -> dict[str, float]:
    q = np.quantile(scores, [0.1, 0.5, 0.9])
    return {"mean": float(scores.mean()), "p10": float(q[0]), "p50": float(q[1]), "p90": float(q[2])}


def take_reference(state: ServingState, cfg: MonitorSettings, overfetch: float,
                   top: frozenset[str]) -> Reference | None:
    """Score a seeded sample of the snapshot's users as Recommend would (no request context, no
    recent events); None when there are no users or ``reference_users`` is 0."""
    from serving.logic import Filters, recommend

    users = sorted(state.user_rows)
    if not users or cfg.reference_users == 0:
        return None
    rng = np.random.default_rng(0)
    pick = rng.choice(len(users), size=min(cfg.reference_users, len(users)), replace=False)
    scores: list[float] = []
    hits = n = slates = 0
    for r in sorted(pick):
        res = recommend(state, users[r], cfg.k, Filters(), {}, [], overfetch)
        if res.cold_start or not res.items:
            continue
        slates += 1
        scores += [s.score for s in res.items]
        hits += sum(s.item_id in top for s in res.items)
        n += len(res.items)
    if not scores:
        return None
    a = np.asarray(scores, np.float64)
    st = _stats(a)
    return Reference(st["mean"], float(a.std()), st, hits / n, slates)


class ArmMonitor:
    def __init__(self, state: ServingState, cfg: MonitorSettings, overfetch: float) -> None:
        self.top = frozenset(state.popular[:cfg.popular_top_n])
        self.window: deque[tuple[tuple[float, ...], int, int]] = deque(maxlen=cfg.window)
        t0 = time.perf_counter()
        self.reference = take_reference(state, cfg, overfetch, self.top)
        log.info("monitor reference of %s: %s (%.2fs)", state.model_version, self.reference,
                 time.perf_counter() - t0)

    def add(self, item_ids, scores) -> None:
        """One sampled slate (thread-safe: a deque append)."""
        top = self.top
        self.window.append((tuple(scores), sum(i in top for i in item_ids), len(item_ids)))

    def summary(self) -> dict | None:
        """Now vs reference, or None with no sample yet."""
        window = list(self.window)
        if not window:
            return None
        scores = np.fromiter((s for w in window for s in w[0]), np.float64)
        if not scores.size:
            return None
        hits, n = sum(w[1] for w in window), sum(w[2] for w in window)
        out = {"samples": len(window), "score": _stats(scores), "popular_share": hits / n}
        ref = self.reference
        if ref is not None:
            out["score_drift"] = (out["score"]["mean"] - ref.mean) / (ref.std or 1.0)
            out["popularity_drift"] = out["popular_share"] - ref.popular_share
        return out


@dataclass
class ArmState:
    name: str  # "" without an experiment
    model: str  # the spec (alias or version) or a snapshot path
    share: float
    version: int | None  # the registered version it serves (None: a snapshot loaded by path)
    state: ServingState
    monitor: ArmMonitor
    served: object = None  # the Prometheus counter child of (arm, model_version)
    created: float = field(default_factory=time.time)

    @property
    def label(self) -> str:
        return self.name or NO_ARM


def version_of(label: str) -> int | None:
    """The version number in a model label such as ``freshrec-retrieval/3 two_tower``."""
    try:
        return int(label.split("/", 1)[1].split()[0])
    except (IndexError, ValueError):
        return None


def distinct_states(arms) -> list[ServingState]:
    seen: dict[int, ServingState] = {}
    for a in arms:
        seen.setdefault(id(a.state), a.state)
    return list(seen.values())


def online_report_path(data_dir: Path) -> Path:
    return data_dir / "reports" / "online-latest.json"


class OnlineCollector:
    """Prometheus collector: the latest online report's per-arm CTR (read when scraped, re-read
    only when the file changed)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: float | None = None
        self._report: dict | None = None

    def _read(self) -> dict | None:
        try:
            stamp = self.path.stat().st_mtime
        except FileNotFoundError:
            return None
        if stamp != self._stamp:
            try:
                self._report = json.loads(self.path.read_text())
                self._stamp = stamp
            except (OSError, ValueError):
                log.warning("online report %s unreadable; keeping the previous one", self.path)
        return self._report

    def describe(self):
        return []  # collected lazily: the metric set depends on the report

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        rep = self._read()
        labels = ["arm", "model_version"]
        fams = {
            "ctr": GaugeMetricFamily("freshrec_online_ctr", "clicked / shown items per arm, from "
                                     "the feedback table (latest online report)", labels=labels),
            "ctr_low": GaugeMetricFamily("freshrec_online_ctr_lower", "lower end of the CTR "
                                         "confidence interval", labels=labels),
            "ctr_high": GaugeMetricFamily("freshrec_online_ctr_upper", "upper end of the CTR "
                                          "confidence interval", labels=labels),
            "impressions": GaugeMetricFamily("freshrec_online_impressions", "shown items counted "
                                             "by the latest online report", labels=labels),
        }
        age = GaugeMetricFamily("freshrec_online_report_age_seconds",
                                "seconds since the latest online report was computed")
        if rep is not None:
            for row in rep.get("arms", []):
                lv = [row["arm"] or NO_ARM, row["model_version"] or ""]
                fams["ctr"].add_metric(lv, row["ctr"])
                fams["ctr_low"].add_metric(lv, row["ctr_ci"][0])
                fams["ctr_high"].add_metric(lv, row["ctr_ci"][1])
                fams["impressions"].add_metric(lv, row["impressions"])
            age.add_metric([], max(0.0, time.time() - rep.get("computed_at", time.time())))
        yield from fams.values()
        yield age
