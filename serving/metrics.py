"""The server's Prometheus metrics: one registry per server with the standard gRPC server series,
freshrec's own (cache, index, refresh lag, events, A/B arms and drift monitoring) and the default
process/platform/GC collectors, plus the functions that set the gauges from the served arms. Held
in memory; exposed over HTTP by :mod:`serving.server` (``serving.metrics_port``)."""

from __future__ import annotations

from prometheus_client import (GCCollector, CollectorRegistry, Counter, Gauge, Histogram,
                               PlatformCollector, ProcessCollector)

from serving.experiment import STATS, ArmState
from serving.methods import KNOWN_METHODS, METHOD_TYPES
from serving.state import ServingState

GRPC_BUCKETS = (.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10)


def code_of(context, default: str = "OK") -> str:
    """The status code a handler ended with (set by abort or set_code), else ``default``."""
    code = context.code()
    return code.name if code is not None else default


class CallMetrics:
    """The metric series of one method, looked up once: the standard
    ``grpc_server_started_total``, ``grpc_server_handled_total{grpc_type,grpc_service,
    grpc_method,grpc_code}`` and ``grpc_server_handling_seconds``. Unknown methods share the
    labels service and method "other". (The ``freshrec_requests`` / ``freshrec_request_seconds``
    copies of the same figures are gone: two counters and two histograms per call were a
    measurable share of a Recommend's CPU.)"""

    def __init__(self, metrics: "Metrics", path: str) -> None:
        known = path in KNOWN_METHODS
        self.name = path.rsplit("/", 1)[-1] if known else "other"
        service = path.split("/")[1] if known else "other"
        self.labels = (METHOD_TYPES.get(path, "unary"), service, self.name)
        self.metrics = metrics
        self._started = metrics.grpc_started.labels(*self.labels)
        self._seconds = metrics.grpc_seconds.labels(*self.labels)
        self._codes: dict[str, object] = {}

    def start(self) -> None:
        self._started.inc()

    def done(self, code: str, seconds: float | None = None) -> None:
        """Count one call ended with ``code`` (a StatusCode name); ``seconds``: time it."""
        handled = self._codes.get(code)
        if handled is None:
            handled = self._codes[code] = self.metrics.grpc_handled.labels(*self.labels, code)
        handled.inc()
        if seconds is not None:
            self._seconds.observe(seconds)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        # the default collectors of prometheus_client: process_* (CPU, memory, open files),
        # python_info, python_gc_*
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        grpc_labels = ["grpc_type", "grpc_service", "grpc_method"]
        self.grpc_started = Counter("grpc_server_started", "RPCs started on the server.",
                                    grpc_labels, registry=r)
        self.grpc_handled = Counter("grpc_server_handled", "RPCs completed on the server, "
                                    "regardless of success or failure.",
                                    [*grpc_labels, "grpc_code"], registry=r)
        self.grpc_seconds = Histogram("grpc_server_handling_seconds", "Response latency "
                                      "(seconds) of gRPC calls handled by the server.",
                                      grpc_labels, buckets=GRPC_BUCKETS, registry=r)
        self._calls: dict[str, CallMetrics] = {}
        self.cache_hits = Counter("freshrec_cache_hits", "per-user cache hits", registry=r)
        self.cache_misses = Counter("freshrec_cache_misses", "per-user cache misses", registry=r)
        self.index_size = Gauge("freshrec_index_size", "items served", registry=r)
        self.users = Gauge("freshrec_user_vectors", "users with a vector", registry=r)
        self.model = Gauge("freshrec_model_info", "served model version (value 1)",
                           ["model_version"], registry=r)
        self.refresh_lag = Gauge("freshrec_refresh_lag_seconds",
                                 "now minus the newest event the served vectors know", registry=r)
        self.events = Counter("freshrec_events_recorded", "events accepted by RecordEvents",
                              registry=r)
        # A/B arms and online monitoring (serving/experiment.py); arm "none" without an experiment
        arm = ["arm", "model_version"]
        self.served = Counter("freshrec_recommendations", "Recommend replies per A/B arm and "
                              "served model version", arm, registry=r)
        self.arm_info = Gauge("freshrec_arm_info", "A/B arms: share of users per arm and model "
                              "version", arm, registry=r)
        self.score = Gauge("freshrec_served_score", "served scores of sampled slates (rolling)",
                           [*arm, "stat"], registry=r)
        self.score_ref = Gauge("freshrec_reference_score", "scores of the model's slates for a "
                               "sample of snapshot users at load", [*arm, "stat"], registry=r)
        self.score_drift = Gauge("freshrec_score_drift", "(served mean score - reference mean) / "
                                 "reference std", arm, registry=r)
        self.popular = Gauge("freshrec_popular_share", "share of served items among the top-N "
                             "popular at load (rolling)", arm, registry=r)
        self.popular_ref = Gauge("freshrec_popular_share_reference", "the same share in the "
                                 "reference slates at load", arm, registry=r)
        self.popularity_drift = Gauge("freshrec_popularity_drift", "popular share now - at load",
                                      arm, registry=r)
        self.monitor_samples = Gauge("freshrec_monitor_samples", "sampled slates in the drift "
                                     "window", arm, registry=r)
        self.recent_users = Gauge("freshrec_recent_users", "users whose recent events are held "
                                  "in memory (at most serving.max_recent_users)", registry=r)
        self.recent_evictions = Counter("freshrec_recent_evictions", "users dropped from the "
                                        "recent-event memory to keep it under its cap", registry=r)
        self.snapshots_skipped = Gauge("freshrec_snapshots_skipped", "newer snapshots start-up "
                                       "found unusable and skipped for an older one", registry=r)

    def calls(self, path: str) -> CallMetrics:
        """The series of method ``path`` (one shared entry for every unknown path)."""
        got = self._calls.get(path if path in KNOWN_METHODS else "other")
        if got is None:
            got = self._calls.setdefault(path if path in KNOWN_METHODS else "other",
                                         CallMetrics(self, path))
        return got


def set_gauges(m: Metrics, state: ServingState, arms: tuple[ArmState, ...],
               refresh_lag: float) -> None:
    """The index, user, model and arm gauges: ``state`` the control's, ``arms`` every arm."""
    m.index_size.set(state.items.size)
    m.users.set(len(state.user_vectors))
    m.model.clear()
    m.arm_info.clear()
    for a in arms:
        m.model.labels(a.state.model_version).set(1)
        m.arm_info.labels(a.label, a.state.model_version).set(a.share)
    m.refresh_lag.set(refresh_lag)


def set_monitor(m: Metrics, arms: tuple[ArmState, ...]) -> dict[str, dict | None]:
    """The drift gauges from each arm's sampled window; returns them per arm."""
    out = {}
    for g in (m.score, m.score_ref, m.score_drift, m.popular, m.popular_ref,
              m.popularity_drift, m.monitor_samples):
        g.clear()
    for a in arms:
        lv = (a.label, a.state.model_version)
        ref, now = a.monitor.reference, a.monitor.summary()
        out[a.label] = now
        if ref is not None:
            for stat in STATS:
                m.score_ref.labels(*lv, stat).set(ref.quantiles[stat])
            m.popular_ref.labels(*lv).set(ref.popular_share)
        m.monitor_samples.labels(*lv).set(now["samples"] if now else 0)
        if now is None:
            continue
        for stat in STATS:
            m.score.labels(*lv, stat).set(now["score"][stat])
        m.popular.labels(*lv).set(now["popular_share"])
        if ref is not None:
            m.score_drift.labels(*lv).set(now["score_drift"])
            m.popularity_drift.labels(*lv).set(now["popularity_drift"])
    return out
