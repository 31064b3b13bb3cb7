"""The gRPC server: Recommender and Admin services over the serving state, plus health, reflection,
bearer-token auth with roles, TLS, per-client rate limits, a per-user cache, Prometheus metrics, an
audit log of admin calls and graceful shutdown.

The servicers are thin adapters: they validate the request, pseudonymize user ids (the same HMAC
as ingest) and call the pure logic in :mod:`serving.logic`. Accepted events are appended to the
write-ahead log (fsynced) before ``RecordEvents`` replies, then moved to the landing zone.
"""

from __future__ import annotations

import functools
import gc
import hashlib
import hmac
import itertools
import json
import logging
import re
import threading
import time
from collections import OrderedDict, deque
from concurrent import futures
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import (GCCollector, CollectorRegistry, Counter, Gauge, Histogram,
                               PlatformCollector, ProcessCollector, start_http_server)

from freshrec.device import DeviceUnavailable, resolve_device
from freshrec.contracts.experiments import Assigner, ExperimentError
from freshrec.privacy.pseudonyms import pseudonymizer
from freshrec.settings import Settings, SettingsError
from serving.audit import AuditLog
from serving.experiment import (STATS, ArmMonitor, ArmState, OnlineCollector, distinct_states,
                                online_report_path, version_of)
from serving.logic import Filters, NotFound, Result, recommend, similar_items
from freshrec.api.proto import stubs
from serving.state import ServingState, load_state
from serving.impressions import ImpressionLog
from serving.wal import EventLog

log = logging.getLogger(__name__)
pb = stubs()
rec_pb2, rec_grpc = pb["recommender_pb2"], pb["recommender_pb2_grpc"]
admin_pb2, admin_grpc = pb["admin_pb2"], pb["admin_pb2_grpc"]

RECOMMENDER = "freshrec.v1.Recommender"
PSEUDONYM_CACHE = 100_000  # raw user ids whose pseudonym a server keeps (LRU)
ADMIN = "freshrec.v1.Admin"


# ---- auth and rate limits ---------------------------------------------------------------------
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
HEALTH_WATCH = "/grpc.health.v1.Health/Watch"
# reflection needs a token (any role); health stays open (load balancers probe it without one)
REFLECTION = ("grpc.reflection.v1alpha.ServerReflection", "grpc.reflection.v1.ServerReflection")
KNOWN_METHODS = {f"/{d.services_by_name[n].full_name}/{m.name}"
                 for d, n in ((rec_pb2.DESCRIPTOR, "Recommender"), (admin_pb2.DESCRIPTOR, "Admin"),
                              (health_pb2.DESCRIPTOR, "Health"))
                 for m in d.services_by_name[n].methods} | {
                 f"/{s}/ServerReflectionInfo" for s in REFLECTION}
MODEL_SPEC = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
ROLE_SERVICES = {"client": {RECOMMENDER, *REFLECTION}, "admin": {RECOMMENDER, ADMIN, *REFLECTION}}


@dataclass(frozen=True)
class Caller:
    name: str
    role: str


def caller_from_metadata(settings: Settings, metadata) -> Caller | None:
    if not settings.serving.auth_enabled:
        return Caller("anonymous", "admin")
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str) and value.lower().startswith("bearer "):
            digest = hashlib.sha256(value[7:].strip().encode()).hexdigest()
            for t in settings.serving.tokens:
                if hmac.compare_digest(t.sha256, digest):
                    return Caller(t.name, t.role)
    return None


class TokenBucket:
    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, burst
        self.tokens, self.stamp = float(burst), time.monotonic()
        self.lock = threading.Lock()

    def take(self) -> bool:
        with self.lock:
            now = time.monotonic()
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
            if self.tokens >= 1:
                self.tokens -= 1
                return True
            return False


class RateLimits:
    """Token buckets by key (a token name, a client address), at most ``max_keys`` of them: the
    least recently used bucket is dropped first (it comes back full, which only forgives a client
    idle long enough to fall out)."""

    def __init__(self, rate: float, burst: int, max_keys: int) -> None:
        self.rate, self.burst, self.max_keys = rate, burst, max_keys
        self.buckets: OrderedDict[str, list[float]] = OrderedDict()
        self.lock = threading.Lock()

    def take(self, key: str) -> bool:
        now = time.monotonic()
        with self.lock:
            b = self.buckets.get(key)
            if b is None:
                b = self.buckets[key] = [float(self.burst), now]
                while len(self.buckets) > self.max_keys:
                    self.buckets.popitem(last=False)
            else:
                self.buckets.move_to_end(key)
                b[0] = min(self.burst, b[0] + (now - b[1]) * self.rate)
                b[1] = now
            if b[0] >= 1:
                b[0] -= 1
                return True
            return False


def decode(deserializer, raw: bytes, context, name: str):
    """The request message from its bytes; bytes that are not one are INVALID_ARGUMENT (gRPC's
    own deserialization would answer INTERNAL)."""
    if deserializer is None:
        return raw
    try:
        return deserializer(raw)
    except Exception:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                      f"the request is not a valid {name} message (wrong type or corrupt bytes)")


def peer_host(context) -> str:
    """The client's address without its port ("ipv4:1.2.3.4:5" -> "ipv4:1.2.3.4")."""
    peer = context.peer() or "?"
    return peer.rsplit(":", 1)[0] if peer.startswith(("ipv4:", "ipv6:")) else peer


class GuardInterceptor(grpc.ServerInterceptor):
    """Authenticates, authorizes by role, rate-limits per token and per client address, bounds
    the calls that may wait on a client, and counts every call.

    A worker thread of the sync server waits for a unary call's request before the handler runs,
    so a refusal is answered by a request-streaming handler that never reads the request: the
    call ends at once, whether or not its body ever comes. The open health calls and the
    (authenticated) reflection streams may wait on the client: they run only while one of a few
    ``slow slots`` (a quarter of the workers, at least 2) is free, else RESOURCE_EXHAUSTED, and a
    health Watch ends after ``serving.stream_idle_seconds``. So idle streams never hold more than
    the slow slots, whoever opens them."""

    def __init__(self, server: "FreshrecServer") -> None:
        cfg = server.settings.serving
        self.server = server
        self.tokens = RateLimits(cfg.rate_limit_per_second, cfg.rate_limit_burst,
                                 cfg.max_rate_limit_keys)
        self.peers = RateLimits(cfg.peer_rate_limit_per_second, cfg.peer_rate_limit_burst,
                                cfg.max_rate_limit_keys)
        self.slow_slots = threading.BoundedSemaphore(max(2, cfg.workers // 4))
        self.handlers: dict[str, grpc.RpcMethodHandler] = {}
        self.methods: dict[str, tuple[str, CallMetrics]] = {}  # known path -> (service, series)
        # authorization header -> Caller, for headers that named a configured token (at most one
        # entry per token; unknown headers are never stored)
        self.known: dict[str, Caller] = {}

    def caller(self, metadata) -> Caller | None:
        """caller_from_metadata, without hashing a token already seen."""
        settings = self.server.settings
        for key, value in metadata or ():
            if key == "authorization" and isinstance(value, str):
                hit = self.known.get(value)
                if hit is None:
                    hit = caller_from_metadata(settings, ((key, value),))
                    if hit is None or not settings.serving.auth_enabled:
                        break
                    if len(self.known) < 1024:
                        self.known[value] = hit
                return hit
        return caller_from_metadata(settings, metadata)

    def _peer_ok(self, cm: "CallMetrics", context) -> None:
        if not self.peers.take(peer_host(context)):
            cm.done("RESOURCE_EXHAUSTED")
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"rate limit of {self.server.settings.serving.peer_rate_limit_per_second}"
                          "/s for this client address exceeded; retry with backoff")

    def _refuse(self, cm: "CallMetrics", code: grpc.StatusCode,
                message: str) -> grpc.RpcMethodHandler:
        def refuse(_request_iterator, context):  # never reads the request: no wait on the client
            cm.start()
            self._peer_ok(cm, context)
            cm.done(code.name)
            context.abort(code, message)
        return grpc.stream_unary_rpc_method_handler(refuse)

    def _slot(self, cm: "CallMetrics", context) -> None:
        if not self.slow_slots.acquire(blocking=False):
            cm.done("RESOURCE_EXHAUSTED")
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many open streaming or health "
                          "calls; retry shortly")

    def intercept_service(self, continuation, details):
        # runs on gRPC's one polling thread, under its server lock, for every call: keep it short
        method = details.method  # /package.Service/Method
        known = self.methods.get(method)
        if known is None:
            # metric labels: the method's, or "other" (a caller must not mint label series)
            known = (method.split("/")[1] if method.count("/") >= 2 else "",
                     self.server.metrics.calls(method))
            if method in KNOWN_METHODS:  # bounded: unknown paths are never stored
                self.methods[method] = known
        service, cm = known
        if method == HEALTH_CHECK:
            return self._cached(method, lambda: self._health_check(cm, continuation(details)))
        if method == HEALTH_WATCH:
            return self._cached(method, lambda: self._health_watch(cm))
        settings = self.server.settings
        caller = self.caller(details.invocation_metadata)
        if caller is None:
            return self._refuse(cm, grpc.StatusCode.UNAUTHENTICATED,
                                "missing or unknown bearer token: send metadata "
                                "'authorization: Bearer <token>'")
        if service not in ROLE_SERVICES.get(caller.role, ()):
            return self._refuse(cm, grpc.StatusCode.PERMISSION_DENIED,
                                f"role {caller.role!r} may not call {service or method!r}")
        if not self.tokens.take(caller.name):
            return self._refuse(cm, grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"rate limit of {settings.serving.rate_limit_per_second}/s for "
                                f"{caller.name} exceeded; retry with backoff")
        wrapped = self.handlers.get(method)
        if wrapped is not None:
            return wrapped
        return self._cached(method, lambda: self._wrap(cm, continuation(details)))

    def _cached(self, method: str, build):
        wrapped = self.handlers.get(method)
        if wrapped is None:
            wrapped = build()
            if wrapped is not None:
                self.handlers[method] = wrapped
        return wrapped

    def _wrap(self, cm: "CallMetrics", handler):
        """The service's handler with the per-address limit, counted and timed (unary), or held
        to a slow slot (streams)."""
        if handler is None:
            return None
        name = cm.name
        deserialize = handler.request_deserializer
        if handler.stream_stream is not None:  # reflection
            inner = handler.stream_stream

            def stream(request_iterator, context):
                cm.start()
                self._peer_ok(cm, context)
                self._slot(cm, context)
                t0 = time.perf_counter()
                try:
                    yield from inner((decode(deserialize, raw, context, name)
                                      for raw in request_iterator), context)
                finally:
                    self.slow_slots.release()
                    cm.done(_code_of(context), time.perf_counter() - t0)
            return grpc.stream_stream_rpc_method_handler(
                stream, response_serializer=handler.response_serializer)
        if handler.unary_unary is None:
            return handler
        inner = handler.unary_unary

        def timed(raw, context):
            cm.start()
            self._peer_ok(cm, context)
            t0 = time.perf_counter()
            try:
                reply = inner(decode(deserialize, raw, context, name), context)
            except Exception:
                cm.done(_code_of(context, "UNKNOWN"), time.perf_counter() - t0)
                raise
            cm.done("OK", time.perf_counter() - t0)
            return reply

        return grpc.unary_unary_rpc_method_handler(
            timed, response_serializer=handler.response_serializer)

    def _health_check(self, cm: "CallMetrics", handler):
        """Health Check, open: reads its request only while holding a slow slot."""
        inner, deserialize = handler.unary_unary, handler.request_deserializer

        def check(request_iterator, context):
            cm.start()
            self._peer_ok(cm, context)
            self._slot(cm, context)
            t0 = time.perf_counter()
            code = "UNKNOWN"
            try:
                raw = next(request_iterator, None)
                if raw is None:
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, "no HealthCheckRequest sent")
                reply = inner(decode(deserialize, raw, context, "HealthCheckRequest"), context)
                code = "OK"
                return reply
            except Exception:
                code = _code_of(context, "UNKNOWN")
                raise
            finally:
                self.slow_slots.release()
                cm.done(code, time.perf_counter() - t0)
        return grpc.stream_unary_rpc_method_handler(
            check, response_serializer=handler.response_serializer)

    def _health_watch(self, cm: "CallMetrics"):
        """Health Watch, open: the status now, then each change, for at most
        ``serving.stream_idle_seconds`` while holding a slow slot."""
        server = self.server

        def watch(request_iterator, context):
            cm.start()
            self._peer_ok(cm, context)
            self._slot(cm, context)
            t0 = time.perf_counter()
            try:
                raw = next(request_iterator, None)
                if raw is None:
                    return
                request = decode(health_pb2.HealthCheckRequest.FromString, raw, context,
                                 "HealthCheckRequest")
                end = time.monotonic() + server.settings.serving.stream_idle_seconds
                last = None
                while context.is_active() and time.monotonic() < end:
                    status = server.health_status(request.service)
                    if status != last:
                        last = status
                        yield health_pb2.HealthCheckResponse(status=status)
                    time.sleep(0.1)
            finally:
                self.slow_slots.release()
                cm.done(_code_of(context), time.perf_counter() - t0)
        return grpc.stream_stream_rpc_method_handler(
            watch, response_serializer=health_pb2.HealthCheckResponse.SerializeToString)


def tracing_interceptors(settings: Settings) -> list:
    """With ``serving.tracing``: OpenTelemetry's gRPC server interceptor (one span per call,
    joined to the caller's trace through its metadata), exporting to the tracer provider the
    process has set, else to a new SDK provider with the OTLP exporter (configured by the standard
    OTEL_EXPORTER_OTLP_* variables). SettingsError names the package to install when it is
    missing."""
    if not settings.serving.tracing:
        return []
    try:
        from opentelemetry import trace
        from opentelemetry.instrumentation.grpc import server_interceptor
    except ImportError as e:
        raise SettingsError(
            "serving.tracing is on but opentelemetry-instrumentation-grpc is not installed "
            f"({e}): pip install 'freshrec[tracing]' (or "
            "opentelemetry-instrumentation-grpc==0.66b2), or set serving.tracing: false") from None
    provider = trace.get_tracer_provider()
    if isinstance(provider, trace.ProxyTracerProvider):  # the process configured none
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
        except ImportError as e:
            raise SettingsError(
                "serving.tracing is on and no tracer provider is set, but opentelemetry-sdk or "
                f"opentelemetry-exporter-otlp-proto-grpc is missing ({e}): pip install "
                "'freshrec[tracing]'") from None
        provider = TracerProvider(resource=Resource.create({"service.name": "freshrec-serving"}))
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        trace.set_tracer_provider(provider)
    return [server_interceptor(tracer_provider=provider)]


# ---- metrics and cache ------------------------------------------------------------------------
def _code_of(context, default: str = "OK") -> str:
    """The status code a handler ended with (set by abort or set_code), else ``default``."""
    code = context.code()
    return code.name if code is not None else default


# the grpc_type label of the standard metrics, by method path (reflection: a bidirectional stream)
METHOD_TYPES = {f"/{d.services_by_name[n].full_name}/{m.name}":
                ("bidi_stream" if m.client_streaming and m.server_streaming else
                 "client_stream" if m.client_streaming else
                 "server_stream" if m.server_streaming else "unary")
                for d, n in ((rec_pb2.DESCRIPTOR, "Recommender"), (admin_pb2.DESCRIPTOR, "Admin"),
                             (health_pb2.DESCRIPTOR, "Health"))
                for m in d.services_by_name[n].methods} | {
                f"/{s}/ServerReflectionInfo": "bidi_stream" for s in REFLECTION}
GRPC_BUCKETS = (.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10)


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


class UserCache:
    """LRU of recent results per (user, request). An entry dies with the user's new events, any
    delta or snapshot (generation bumps) or its TTL. A result computed before an invalidation is
    never stored after it: ``put`` takes the token read before the work began."""

    def __init__(self, size: int, ttl: float) -> None:
        self.size, self.ttl = size, ttl
        self.data: OrderedDict[tuple, tuple[float, tuple[int, int], object]] = OrderedDict()
        self.user_generation: dict[str, int] = {}  # bounded: cleared (with a generation bump)
        self.max_users = max(1024, 2 * size)
        self.generation = 0
        self.lock = threading.Lock()

    def token(self, user: str) -> tuple[int, int]:
        return self.generation, self.user_generation.get(user, 0)

    def get(self, key: tuple):
        if not self.size:
            return None
        with self.lock:
            hit = self.data.get(key)
            if hit is None:
                return None
            stamp, token, value = hit
            if token != self.token(key[0]) or time.monotonic() - stamp > self.ttl:
                del self.data[key]
                return None
            self.data.move_to_end(key)
            return value

    def put(self, key: tuple, value, token: tuple[int, int]) -> None:
        if not self.size:
            return
        with self.lock:
            if token != self.token(key[0]):
                return
            self.data[key] = (time.monotonic(), token, value)
            self.data.move_to_end(key)
            while len(self.data) > self.size:
                self.data.popitem(last=False)

    def invalidate_user(self, user: str) -> None:
        with self.lock:
            # stale entries fail the token check on get and age out of the LRU
            self.user_generation[user] = self.user_generation.get(user, 0) + 1
            if len(self.user_generation) > self.max_users:  # bounded memory: start over
                self.user_generation.clear()
                self.generation += 1
                self.data.clear()

    def invalidate_all(self) -> None:
        with self.lock:
            self.generation += 1
            self.data.clear()


# ---- the servicers ----------------------------------------------------------------------------
NO_FILTERS = Filters()


def _filters(msg) -> Filters:
    return Filters(include_categories=frozenset(msg.include_categories),
                   exclude_items=frozenset(msg.exclude_items),
                   exclude_seen=msg.exclude_seen if msg.HasField("exclude_seen") else True)


def _scored(result: Result):
    return [rec_pb2.ScoredItem(item_id=s.item_id, score=s.score, source=s.source,
                               explanation=s.explanation, propensity=1.0) for s in result.items]


class RecommenderServicer(rec_grpc.RecommenderServicer):
    def __init__(self, server: "FreshrecServer") -> None:
        self.s = server

    def _check_k(self, k: int, context) -> None:
        max_k = self.s.settings.serving.max_k
        if not 1 <= k <= max_k:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"k must be within [1, {max_k}], got {k}")

    def _check_id(self, value: str, field: str, context) -> None:
        limit = self.s.settings.serving.max_id_length
        if not value:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{field} is empty")
        if len(value) > limit:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"{field} is {len(value)} characters long; at most {limit}")

    def _check_filters(self, f, context) -> None:
        limit = self.s.settings.serving.max_id_length
        if len(f.exclude_items) > 10_000 or len(f.include_categories) > 1_000:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "too many filter values (at most "
                          "10000 exclude_items and 1000 include_categories)")
        if any(len(x) > limit for x in [*f.exclude_items, *f.include_categories]):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"a filter value is longer than {limit} characters")

    def _check_context(self, ctx, context) -> None:
        problem = self.s.context_problem(ctx)
        if problem:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"context {problem}")

    def Recommend(self, request, context):
        s = self.s
        self._check_id(request.user_id, "user_id", context)
        self._check_k(request.k, context)
        has_filters = request.HasField("filters")
        if has_filters:
            self._check_filters(request.filters, context)
        if request.context:
            self._check_context(request.context, context)
        if len(request.request_id) > s.settings.serving.max_id_length:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request_id is longer than "
                          f"{s.settings.serving.max_id_length} characters")
        s.require_state(context)
        user = s.pseudonym(request.user_id)
        arm = s.arm_for(user)
        state = arm.state
        arm.served.inc()
        filters = _filters(request.filters) if has_filters else NO_FILTERS
        ctx = dict(request.context) if request.context else {}
        explain = request.want_explanations
        cache = s.cache
        key = token = None
        if cache.size:
            key = (user, request.k, filters, tuple(sorted(ctx.items())), state.model_version,
                   explain)
            token = cache.token(user)
            cached = cache.get(key)
            if cached is not None:
                s.metrics.cache_hits.inc()
                reply = rec_pb2.RecommendResponse()
                reply.CopyFrom(cached[0])
                return self._served(request, reply, user, cached[1], cached[2], None)
            s.metrics.cache_misses.inc()
        s.check_deadline(context)
        # Request-time freshness: the user's own new events count now, whatever the model kind.
        recent = s.recent_events(user)
        rr = s.reranker
        n = max(request.k, rr.candidates) if rr else request.k
        result = recommend(state, user, n, filters, ctx, recent, s.settings.serving.overfetch,
                           explain=explain)
        if rr is not None and not result.cold_start:
            # explores: not cached, every served item carries its propensity (and is logged)
            history = [i for i, _ in reversed(recent)] + sorted(state.seen.get(user, ()))
            picked = rr.rerank(state, user, history, result.items, request.k)
            reply = rec_pb2.RecommendResponse(
                items=[rec_pb2.ScoredItem(item_id=s.item_id, score=s.score, source=f"{s.source}+{rr.name}",
                                          explanation=s.explanation, propensity=p) for s, p in picked],
                model_version=result.model_version, cold_start=False, arm=arm.name)
            return self._served(request, reply, user, [s.item_id for s, _ in picked],
                                [float(s.score) for s, _ in picked], [float(p) for _, p in picked],
                                candidates=result.items)
        items = result.items[:request.k]
        ids, scores = [x.item_id for x in items], [x.score for x in items]
        if not result.cold_start and next(s.sample_tick) % s.sample_every == 0:
            arm.monitor.add(ids, scores)
        # fields left at their defaults are not passed: protobuf sets each one it is given
        reply = rec_pb2.RecommendResponse(model_version=result.model_version)
        if result.cold_start:
            reply.cold_start = True
        if arm.name:
            reply.arm = arm.name
        add = reply.items.add
        for x in items:
            if x.explanation:
                add(item_id=x.item_id, score=x.score, source=x.source, explanation=x.explanation,
                    propensity=1.0)
            else:
                add(item_id=x.item_id, score=x.score, source=x.source, propensity=1.0)
        if key is not None:
            cache.put(key, (reply, ids, scores), token)
        return self._served(request, reply, user, ids, scores, None)

    def _served(self, request, reply, user: str, items: list[str], scores: list[float],
                propensities: list[float] | None, candidates: list | None = None):
        """Name the slate (the request's request_id or a new one) and log it as an impression
        (propensity 1.0 per item when the ranker was deterministic; a re-ranked slate also logs
        the candidates it was chosen from, which off-policy learning needs)."""
        imp = self.s.impressions
        if imp is None:
            reply.request_id = request.request_id
            return reply
        rid = request.request_id or imp.new_request_id()
        reply.request_id = rid
        if items:
            imp.record(rid, user, reply.model_version, reply.arm or None, items,
                       scores, propensities or [1.0] * len(items),
                       None if candidates is None else [c.item_id for c in candidates],
                       None if candidates is None else [float(c.score) for c in candidates])
        return reply

    def SimilarItems(self, request, context):
        self._check_id(request.item_id, "item_id", context)
        self._check_k(request.k, context)
        self._check_filters(request.filters, context)
        state = self.s.require_state(context)
        self.s.check_deadline(context)
        try:
            result = similar_items(state, request.item_id, request.k, _filters(request.filters),
                                   self.s.settings.serving.overfetch)
        except NotFound as e:
            context.abort(grpc.StatusCode.NOT_FOUND, str(e))
        return rec_pb2.SimilarItemsResponse(items=_scored(result), model_version=result.model_version)

    def RecordEvents(self, request, context):
        limit = self.s.settings.serving.max_events_per_call
        if not request.events:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "events is empty: send at least one")
        if len(request.events) > limit:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"{len(request.events)} events in one call; at most {limit}")
        accepted, rejections = [], []
        for n, ev in enumerate(request.events):
            reason = self.s.validate_event(ev)
            if reason:
                rejections.append(rec_pb2.Rejection(index=n, reason=reason))
            else:
                accepted.append(self.s.event_record(ev))
        self.s.check_deadline(context)
        self.s.wal.append(accepted)  # durable (fsynced) before the reply
        self.s.note_events(accepted)
        if self.s.reranker is not None:
            for r in accepted:
                self.s.reranker.feedback(r["user_id"], r["item_id"], r["event_type"])
        return rec_pb2.RecordEventsResponse(accepted=len(accepted), rejections=rejections)


class AdminServicer(admin_grpc.AdminServicer):
    def __init__(self, server: "FreshrecServer") -> None:
        self.s = server

    def _audited(self, action: str, request: dict, context, fn):
        who = caller_from_metadata(self.s.settings, context.invocation_metadata())
        name = who.name if who else "?"
        try:
            reply = fn()
        except Exception as e:
            self.s.audit.record(name, action, request, "error", str(e))
            if isinstance(e, (ValueError, FileNotFoundError, LookupError)):
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            raise
        self.s.audit.record(name, action, request, "ok", str(reply).replace("\n", " ")[:500])
        return reply

    def LoadSnapshot(self, request, context):
        path = self.s.snapshot_path(request.path, context) if request.path else None

        def do():
            state = self.s.load(path)
            return admin_pb2.LoadSnapshotResponse(model_version=state.model_version,
                                                  n_items=state.items.size,
                                                  n_users=len(state.user_rows))
        return self._audited("LoadSnapshot", {"path": request.path[:300]}, context, do)

    def LoadModel(self, request, context):
        model = request.model.strip()
        if model and not MODEL_SPEC.fullmatch(model):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"model {model[:80]!r} is neither a version number nor an alias of "
                          "freshrec-retrieval (letters, digits, - and _, e.g. champion or 3)")

        def do():
            arm = self.s.find_arm(request.arm)
            before = arm.state.model_version if arm is not None else ""
            state = self.s.load(model=model or None, arm=request.arm or None)
            return admin_pb2.LoadModelResponse(model_version=state.model_version,
                                               n_items=state.items.size,
                                               n_users=len(state.user_rows),
                                               previous_model_version=before,
                                               arm=arm.name if arm is not None else "")
        return self._audited("LoadModel", {"model": model[:80], "arm": request.arm[:80]}, context,
                             do)

    def ApplyDeltas(self, request, context):
        self.s.require_state(context)
        users = (lambda u: u) if request.users_pseudonymized else self.s.pseudonym
        bound = self.s.settings.serving.max_vector_norm

        def check_ids(ids, field: str, named=lambda i: repr(i[:80])) -> None:
            seen: set[str] = set()
            for n, i in enumerate(ids):
                if not i:
                    raise ValueError(f"{field}[{n}]: empty id")
                if i in seen:
                    raise ValueError(f"{field}[{n}]: {named(i)} appears twice in one call; send "
                                     "each id once")
                seen.add(i)

        def vec(v, field: str, n: int, dim: int, who: str) -> np.ndarray:
            a = np.asarray(v.values, dtype=np.float32)
            if a.shape != (dim,):
                raise ValueError(f"{field}[{n}] ({who}) has {a.size} values; the index has "
                                 f"dimension {dim}")
            if not np.all(np.isfinite(a)):
                raise ValueError(f"{field}[{n}] ({who}) holds NaN or infinite values")
            norm = float(np.linalg.norm(a.astype(np.float64)))
            if norm > bound:
                raise ValueError(f"{field}[{n}] ({who}) has norm {norm:.4g}, above "
                                 f"serving.max_vector_norm {bound:g}")
            return a

        def do():
            with self.s._load_lock:  # no load swaps the state under this delta
                state = self.s.require_state(context)
                if request.expect_state_id and request.expect_state_id != self.s.state_id:
                    context.abort(grpc.StatusCode.ABORTED,
                                  f"the replica loaded another state (state_id {self.s.state_id}, "
                                  f"delta computed for {request.expect_state_id}): read Status "
                                  "and compute the delta again")
                # Vectors belong to one model's space: they go to the states serving
                # request.model_version (empty: the control arm's model); everything else to every
                # arm's state (histories are model-independent; each state folds them in itself).
                states = self.s.distinct_states()
                target = request.model_version or state.model_version
                targets = [st for st in states if st.model_version == target]
                if (request.upsert_items or request.upsert_users) and not targets:
                    raise ValueError(f"no arm serves {target!r}: item/user vectors not applied "
                                     f"(serving: {sorted({st.model_version for st in states})})")
                # validate the whole call before changing anything
                item_ids = [v.id for v in request.upsert_items]
                check_ids(item_ids, "upsert_items")
                check_ids(list(request.remove_items), "remove_items")
                both = set(item_ids) & set(request.remove_items)
                if both:
                    raise ValueError(f"item {sorted(both)[0][:80]!r} is both upserted and removed "
                                     "in one call")
                user_ids = [users(v.id) for v in request.upsert_users]
                check_ids(user_ids, "upsert_users", named=lambda u: f"user {u[:40]}")
                removed_users = [users(u) for u in request.remove_users]
                check_ids(removed_users, "remove_users", named=lambda u: f"user {u[:40]}")
                check_ids([users(h.user_id) for h in request.upsert_histories],
                          "upsert_histories", named=lambda u: f"user {u[:40]}")
                vectors = []
                for st in targets:
                    dim = st.items.dim
                    items_up = [(v.id, vec(v, "upsert_items", n, dim, f"item {v.id[:80]!r}"))
                                for n, v in enumerate(request.upsert_items)]
                    users_up = {u: vec(v, "upsert_users", n, dim, f"user {u[:40]}")
                                for n, (u, v) in enumerate(zip(user_ids, request.upsert_users))}
                    vectors.append((st, items_up, users_up))
                for n, h in enumerate(request.upsert_histories):
                    if len(h.item_ids) != len(h.weights):
                        raise ValueError(f"upsert_histories[{n}]: {len(h.item_ids)} items but "
                                         f"{len(h.weights)} weights")
                    if not all(np.isfinite(h.weights)):
                        raise ValueError(f"upsert_histories[{n}]: a weight is NaN or infinite")
                n_up = u_up = 0
                for st, items_up, users_up in vectors:
                    n_up = st.items.upsert(items_up)
                    u_up = st.upsert_users(users_up)
                n_rm = u_rm = h_up = 0
                for n, st in enumerate(states):
                    removed = st.items.remove(list(request.remove_items))
                    for table, version in request.applied_versions.items():
                        st.delta_versions[table] = version
                    if request.newest_event_ts:
                        st.newest_event_ts = max(st.newest_event_ts or 0.0,
                                                 request.newest_event_ts)
                    # a removed user (erased upstream) loses vector, history and recent events
                    gone = sum(st.forget_user(u) for u in removed_users)
                    hist = sum(st.set_history(users(h.user_id), list(h.item_ids),
                                              list(h.weights))
                               for h in request.upsert_histories)
                    if n == 0:
                        n_rm, u_rm, h_up = removed, gone, hist
                for u in removed_users:
                    self.s.forget_recent(u)
                self.s.cache.invalidate_all()
                self.s.update_gauges()
            return admin_pb2.ApplyDeltasResponse(items_upserted=n_up, items_removed=n_rm,
                                                 users_upserted=u_up, users_removed=u_rm,
                                                 index_size=state.items.size,
                                                 histories_upserted=h_up)
        summary = {"upsert_items": len(request.upsert_items), "remove_items": len(request.remove_items),
                   "upsert_users": len(request.upsert_users), "remove_users": len(request.remove_users),
                   "upsert_histories": len(request.upsert_histories)}
        return self._audited("ApplyDeltas", summary, context, do)

    def DeleteUser(self, request, context):
        if not request.user_id:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "user_id is empty")
        if len(request.user_id) > self.s.settings.serving.max_id_length:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"user_id is longer than "
                          f"{self.s.settings.serving.max_id_length} characters")

        def do():
            removed, rows = self.s.delete_user(self.s.pseudonym(request.user_id), request.user_id)
            return admin_pb2.DeleteUserResponse(vector_removed=removed, rows_deleted=rows)
        # The audit names neither the raw id nor the pseudonym (the erasure log holds that).
        return self._audited("DeleteUser", {"user": "(see privacy/erasures.jsonl)"}, context, do)

    def Status(self, request, context):
        if self.s.state is None and self.s.host is not None:
            # one of several processes with nothing loaded yet: the host's processes still, so
            # the refresher and the rollout reach each of them (freshrec.api.replicas.host_processes)
            reply = admin_pb2.StatusResponse(state_id=self.s.state_id)
            self.s.host.describe(reply, context)
            return reply
        state = self.s.require_state(context)
        reply = admin_pb2.StatusResponse(
            model_version=state.model_version, index_size=state.items.size,
            index_type=state.items.index_type,
            delta_versions={k: v for k, v in state.delta_versions.items() if v is not None},
            refresh_lag_seconds=self.s.refresh_lag(), n_users=len(state.user_rows),
            device="cuda" if self.s.use_gpu else "cpu",
            experiment=self.s.settings.serving.experiment.name if self.s.assigner else "",
            arms=[self._arm_status(a) for a in self.s.arms], state_id=self.s.state_id)
        if self.s.host is not None:  # one of several processes on this host: serving/host.py
            self.s.host.describe(reply, context)
        return reply

    @staticmethod
    def _arm_status(a: ArmState):
        ref, now = a.monitor.reference, a.monitor.summary()
        out = admin_pb2.ArmStatus(name=a.name, model=a.model, share=a.share,
                                  model_version=a.state.model_version, index_size=a.state.items.size,
                                  monitor_samples=now["samples"] if now else 0)
        if ref is not None:
            out.reference_score_mean, out.popular_share_reference = ref.mean, ref.popular_share
        if now is not None:
            out.served_score_mean, out.popular_share = now["score"]["mean"], now["popular_share"]
            if ref is not None:
                out.score_drift, out.popularity_drift = now["score_drift"], now["popularity_drift"]
        return out


# ---- the server -------------------------------------------------------------------------------
def serving_gpu(requested: str) -> bool:
    """Whether the server searches on the GPU for ``device`` (auto, cpu, cuda): where FAISS has a
    GPU build and sees a GPU (its GPU replica), or else where torch sees one (the exact torch
    search, :class:`recmodels.batcher.TorchExactSearch`). ``cuda`` with neither raises."""
    if requested == "cpu":
        return False
    choice = resolve_device("auto" if requested == "cuda" else requested, need=("faiss", "torch"))
    gpu = choice.faiss_gpu or choice.torch_device == "cuda"
    if requested == "cuda" and not gpu:
        raise DeviceUnavailable("device 'cuda' requested but neither FAISS nor torch sees a GPU: "
                                "on a CUDA machine install the gpu extra (pip install -e "
                                "'.[gpu]') or a CUDA torch, otherwise set device to auto or cpu")
    return gpu


class FreshrecServer:
    def __init__(self, settings: Settings, use_gpu: bool | None = None) -> None:
        from freshrec.storage.crypto import private_umask

        private_umask()  # logs, snapshots, landed files: the owner's only (0600 / 0700)
        from freshrec.privacy.volume import check_volume_encryption

        check_volume_encryption(settings, "serve")  # refuses, naming the setting
        self.settings = settings
        if use_gpu is None:
            use_gpu = serving_gpu(settings.device)
        self.use_gpu = use_gpu
        self.host = None  # serving.host.ProcessSlot when a supervisor started this process
        self.arms: tuple[ArmState, ...] = ()  # swapped whole; arms[0] is the control
        self._state: ServingState | None = None
        self.metrics = Metrics()
        exp = settings.serving.experiment
        self.assigner = Assigner(exp) if exp.enabled else None
        self.sample_tick = itertools.count()
        self.sample_every = settings.serving.monitor.sample_every
        self.metrics.registry.register(OnlineCollector(online_report_path(settings.data_dir)))
        self.cache = UserCache(settings.serving.cache_size, settings.serving.cache_ttl_seconds)
        from freshrec.storage.crypto import cipher_for

        self.audit = AuditLog(settings.data_dir / "audit" / "admin.jsonl", cipher_for(settings))
        self.wal = EventLog(settings)
        self.impressions: ImpressionLog | None = None
        if settings.serving.log_impressions:
            self.impressions = ImpressionLog(settings)
        # user -> their newest events, least recently active first (an LRU under max_recent_users)
        self.recent: OrderedDict[str, deque] = OrderedDict()
        self.recent_lock = threading.Lock()
        # Loads, deltas and deletions change the served state: one at a time, so a delta never
        # lands on a state that a concurrent load is replacing, and erasures do not race.
        self._load_lock = threading.RLock()
        self.state_id = 0  # bumped by every load; ApplyDeltas may name the one it was computed for
        # raw id -> pseudonym, the HMAC (chain) computed once per id while it stays among the
        # PSEUDONYM_CACHE most recent; cleared whole by every erasure (forget_recent)
        self._pseudonym = functools.lru_cache(maxsize=PSEUDONYM_CACHE)(pseudonymizer(settings))
        self._health: dict[str, int] = {}
        self.health = health.HealthServicer()
        self._server: grpc.Server | None = None
        self._metrics_http = None
        self._stop = threading.Event()
        self.port = 0
        self.metrics_port = 0
        self.started_at = time.time()
        from serving.rerank import load_reranker

        self.reranker = load_reranker(settings)

    # helpers used by the servicers
    def pseudonym(self, raw: str) -> str:
        return self._pseudonym(raw)

    def snapshot_path(self, raw: str, context) -> Path:
        """A LoadSnapshot path, only inside the snapshots directory: relative paths are taken from
        it; ``..``, symlinks and absolute paths that lead elsewhere are refused."""
        root = self.settings.snapshots_dir.resolve()
        if "\x00" in raw or len(raw) > 4096:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "path is not a usable path")
        try:
            p = Path(raw)
            resolved = (p if p.is_absolute() else root / p).resolve()
            inside = resolved.is_relative_to(root) and resolved != root
            has_manifest = inside and (resolved / "manifest.json").is_file()
        except (OSError, ValueError, RuntimeError) as e:  # too long, a symlink loop, bad bytes
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"path {raw[:200]!r} is not a usable path ({type(e).__name__})")
        if not inside:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"path {raw[:200]!r} is outside the snapshots directory {root}: give a "
                          "snapshot directory inside it (relative paths are taken from there)")
        if not has_manifest:
            context.abort(grpc.StatusCode.NOT_FOUND, f"path {raw[:200]!r}: no snapshot there "
                          "(no manifest.json)")
        return resolved

    def set_health(self, status: int) -> None:
        for service in ("", RECOMMENDER, ADMIN):
            self._health[service] = status
            self.health.set(service, status)

    def health_status(self, service: str) -> int:
        return self._health.get(service, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)

    @property
    def state(self) -> ServingState | None:
        """The control arm's state (the only one without an experiment)."""
        return self._state

    @state.setter
    def state(self, state: ServingState | None) -> None:
        """Assigned directly (benchmarks): that state becomes the one unnamed arm."""
        self._state = state
        if state is not None and (not self.arms or self.arms[0].state is not state):
            self.arms = (self._arm("", state.model_version, 1.0, version_of(state.model_version),
                                   state, {}),)

    def arm_for(self, user: str) -> ArmState:
        """The arm serving ``user``: by the experiment's salted hash, else the only one."""
        arms = self.arms
        if self.assigner is None or len(arms) == 1:
            return arms[0]
        return arms[self.assigner.index(user)]

    def find_arm(self, name: str | None) -> ArmState | None:
        """The arm named (empty: the control); ValueError names the known arms."""
        arms = self.arms
        if not name:
            return arms[0] if arms else None
        for a in arms:
            if a.name == name:
                return a
        known = ", ".join(a.name for a in arms if a.name) or "none (no serving.experiment)"
        raise ValueError(f"no arm {name!r}; arms: {known}")

    def distinct_states(self) -> list[ServingState]:
        return distinct_states(self.arms)

    def require_state(self, context) -> ServingState:
        state = self.state
        if state is None:
            context.abort(grpc.StatusCode.UNAVAILABLE, "no index loaded yet; call "
                          "Admin.LoadSnapshot or wait for start-up to finish")
        return state

    @staticmethod
    def check_deadline(context) -> None:
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed before the answer")

    def validate_event(self, ev) -> str | None:
        """None, or why the event is refused: the event rules (freshrec/contracts/events.py, the
        same the clean job applies, on the pseudonymized user id it will see) plus the request
        limits of serving (raw id length, context size)."""
        from freshrec.contracts.events import WHITESPACE, rules_for

        rules, limit = rules_for(self.settings), self.settings.serving.max_id_length
        value = ev.value if ev.HasField("value") else None
        user = self.pseudonym(ev.user_id) if ev.user_id.strip(WHITESPACE) else ""
        reason = rules.check(user, ev.item_id, ev.event_type,
                             ev.ts or datetime.now(timezone.utc).isoformat(), value, ev.event_id)
        if reason:
            return rules.explain(reason, event_type=ev.event_type, value=value, ts=ev.ts)
        if max(len(ev.user_id), len(ev.item_id), len(ev.event_id)) > limit:
            return f"an id is longer than {limit} characters (serving.max_id_length)"
        problem = self.context_problem(ev.context)
        return f"context {problem}" if problem else None

    def context_problem(self, ctx) -> str | None:
        """None, or why a context map (request or event) is too large."""
        cfg = self.settings.serving
        if len(ctx) > cfg.max_context_entries:
            return (f"has {len(ctx)} entries; at most {cfg.max_context_entries} "
                    "(serving.max_context_entries)")
        size = sum(len(k.encode()) + len(v.encode()) for k, v in ctx.items())
        if size > cfg.max_context_bytes:
            return (f"holds {size} bytes of keys and values; at most {cfg.max_context_bytes} "
                    "(serving.max_context_bytes)")
        return None

    def event_record(self, ev) -> dict:
        """The raw (text) row of an accepted event, as the write-ahead log lands it for clean."""
        from freshrec.contracts.events import WHITESPACE, value_text

        ts = ev.ts or datetime.now(timezone.utc).isoformat()
        return {"event_id": ev.event_id.strip(WHITESPACE) or None,
                "user_id": self.pseudonym(ev.user_id), "item_id": ev.item_id.strip(WHITESPACE),
                "event_type": ev.event_type.strip(WHITESPACE),
                "value": value_text(ev.value) if ev.HasField("value") else None, "ts": ts,
                "context": json.dumps(dict(ev.context)) if ev.context else None}

    def note_events(self, records: list[dict]) -> None:
        if not records:
            return
        from freshrec.contracts.events import rules_for

        n = self.settings.serving.recent_events_per_user
        cap = self.settings.serving.max_recent_users
        rules = rules_for(self.settings)  # the weight clean will write to silver events.weight
        now = time.time()
        evicted = 0
        with self.recent_lock:
            for r in records:
                w = rules.weight(r["event_type"], r["value"])
                q = self.recent.get(r["user_id"])
                if q is None:
                    q = self.recent[r["user_id"]] = deque(maxlen=n)
                else:
                    self.recent.move_to_end(r["user_id"])
                q.append((r["item_id"], w, now))
            while len(self.recent) > cap:  # the least recently active go first
                self.recent.popitem(last=False)
                evicted += 1
            held = len(self.recent)
        self.metrics.recent_users.set(held)
        if evicted:
            self.metrics.recent_evictions.inc(evicted)
        for user in {r["user_id"] for r in records}:
            self.cache.invalidate_user(user)
        self.metrics.events.inc(len(records))

    def recent_events(self, user: str) -> list[tuple[str, float]]:
        if user not in self.recent:  # most calls: no lock (a dict lookup is atomic)
            return []
        with self.recent_lock:
            return [(i, w) for i, w, _ in self.recent.get(user, ())]

    def delete_user(self, user: str, raw_id: str | None = None) -> tuple[bool, int]:
        """Erase ``user`` (a pseudonym) from this replica's memory and everywhere on disk
        (:func:`freshrec.privacy.erasure.erase_user`: tables and every earlier version, landing, logs,
        snapshots, MLflow artifacts); other replicas drop them at the refresher's next round.
        Returns (whether this replica held them, rows removed from the Delta tables)."""
        from freshrec.privacy.erasure import erase_user

        with self._load_lock:  # one erasure at a time in this process (the file lock: across)
            removed = self.forget_user(user)
            if self.impressions is not None:
                self.impressions.flush()  # this process's buffered slates reach the log first
            report = erase_user(self.settings, user, raw_id)
            removed = self.forget_user(user) or removed  # events recorded meanwhile
        return removed, sum(report["tables"].values())  # rows_deleted: the Delta tables' rows

    def forget_user(self, user: str) -> bool:
        """Drop a user's vector, history and recent events from this replica, every arm's state
        (not the tables)."""
        removed = False
        for st in self.distinct_states():
            removed = st.forget_user(user) or removed
        return self.forget_recent(user) or removed

    def forget_recent(self, user: str) -> bool:
        """Drop a user's recent (not yet refreshed) events, cached replies and cached pseudonyms
        (the pseudonym cache is cleared whole: it is keyed by raw ids, which erasure never sees)."""
        self._pseudonym.cache_clear()
        with self.recent_lock:
            removed = self.recent.pop(user, None) is not None
        self.cache.invalidate_user(user)
        return removed

    def refresh_lag(self) -> float:
        state = self.state
        if state is None or state.newest_event_ts is None:
            return 0.0
        return max(0.0, time.time() - state.newest_event_ts)

    def update_gauges(self) -> None:
        state = self.state
        if state is None:
            return
        m = self.metrics
        m.index_size.set(state.items.size)
        m.users.set(len(state.user_vectors))
        m.model.clear()
        m.arm_info.clear()
        for a in self.arms:
            m.model.labels(a.state.model_version).set(1)
            m.arm_info.labels(a.label, a.state.model_version).set(a.share)
        m.refresh_lag.set(self.refresh_lag())

    def update_monitor(self) -> dict[str, dict | None]:
        """Recompute the drift gauges from each arm's sampled window; returns them per arm."""
        m, out = self.metrics, {}
        for g in (m.score, m.score_ref, m.score_drift, m.popular, m.popular_ref,
                  m.popularity_drift, m.monitor_samples):
            g.clear()
        for a in self.arms:
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

    def _arm(self, name: str, spec: str, share: float, version: int | None,
             state: ServingState, reuse: dict[int, ArmMonitor]) -> ArmState:
        cfg = self.settings.serving
        monitor = reuse.get(id(state))
        if monitor is None:
            monitor = reuse[id(state)] = ArmMonitor(state, cfg.monitor, cfg.overfetch)
        a = ArmState(name, spec, share, version, state, monitor)
        a.served = self.metrics.served.labels(a.label, state.model_version)
        return a

    def check_experiment(self) -> dict[str, int]:
        """Resolve every arm's model in the registry: {arm: version}; ExperimentError names the
        first arm whose alias or version does not exist."""
        from freshrec.contracts import registry
        from freshrec.tracking import mlflow_for

        out = {}
        mlflow_for(self.settings)
        for a in self.assigner.arms:
            try:
                out[a.name] = registry.resolve(a.model).version
            except LookupError as e:
                raise ExperimentError(f"experiment {self.assigner.name!r} arm {a.name!r}: "
                                      f"model {a.model!r} does not exist ({e})") from None
        return out

    def _load_arms(self, snapshot: Path | None, model: str | int | None,
                   arm: str | None, fallback: bool = False) -> tuple[ArmState, ...]:
        """The new arms tuple: every arm (first load, or LoadModel with neither model nor arm:
        aliases re-resolved), or one arm (``arm``, default the control) replaced by ``model`` /
        ``snapshot``. States are shared between arms serving the same version."""
        old = self.arms
        monitors = {id(a.state): a.monitor for a in old}
        if self.assigner is None:
            self.find_arm(arm)  # no arm but the unnamed one: ValueError for any name
            state = load_state(self.settings, snapshot, use_gpu=self.use_gpu, model=model,
                               fallback=fallback)
            spec = str(snapshot or model or self.settings.serving.model)
            return (self._arm("", spec, 1.0, version_of(state.model_version), state, monitors),)
        if not old or (snapshot is None and model is None and arm is None):
            versions = self.check_experiment()
            by_version = {a.version: a.state for a in old if a.version is not None}
            arms = []
            for a in self.assigner.arms:
                v = versions[a.name]
                state = by_version.get(v)
                if state is None:
                    state = by_version[v] = load_state(self.settings, use_gpu=self.use_gpu,
                                                       model=v, fallback=fallback)
                arms.append(self._arm(a.name, a.model, a.share, v, state, monitors))
            return tuple(arms)
        target = self.find_arm(arm)
        version = None
        if snapshot is None:
            from freshrec.contracts import registry
            from freshrec.tracking import mlflow_for

            mlflow_for(self.settings)
            spec = model if model is not None else next(
                a.model for a in self.assigner.arms if a.name == target.name)
            version = registry.resolve(spec).version
        state = next((a.state for a in old if version is not None and a.version == version), None)
        if state is None:
            state = load_state(self.settings, snapshot, use_gpu=self.use_gpu, model=version)
        spec = str(snapshot) if snapshot is not None else str(spec)
        return tuple(self._arm(a.name, spec, a.share, version, state, monitors)
                     if a is target else a for a in old)

    def load(self, snapshot: Path | None = None, model: str | int | None = None,
             arm: str | None = None, fallback: bool = False) -> ServingState:
        """Load a snapshot (a path, or the snapshot of registered ``model``: alias or version,
        default ``serving.model``) and swap it in atomically: requests see the old or the new
        model. A failed load raises and leaves the old model serving.

        With ``serving.experiment``: the first load loads every arm; later loads replace the
        model of ``arm`` (default: the control arm), or, with neither ``model`` nor ``arm`` nor
        ``snapshot``, reload every arm from the settings (aliases re-resolved). Returns the state
        of the arm loaded (the control's when all were). ``fallback`` (start-up): an unusable
        snapshot is skipped for an older one (:func:`serving.state.load_state`)."""
        with self._load_lock:
            arms = self._load_arms(snapshot, model, arm, fallback)
            self.arms = arms
            self.state = state = arms[0].state
            self.state_id += 1  # deltas computed for the old state are refused from now on
            if arm:
                state = self.find_arm(arm).state
            gc.collect()
            gc.freeze()  # the loaded state is long-lived: keep the cyclic GC from re-scanning it
            stamps = [st.newest_event_ts for st in distinct_states(arms)]
            newest = None if None in stamps else min(stamps)
            if newest is not None:  # events every served snapshot already holds
                with self.recent_lock:
                    for user in list(self.recent):
                        kept = deque((e for e in self.recent[user] if e[2] > newest),
                                     maxlen=self.recent[user].maxlen)
                        if kept:
                            self.recent[user] = kept
                        else:
                            del self.recent[user]
            self.cache.invalidate_all()
            self.update_gauges()
            self.update_monitor()
        self.set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info("serving %s", ", ".join(f"{a.label}: {a.state.model_version}" for a in arms))
        return state

    def swap(self, state: ServingState) -> None:
        """Serve ``state`` as the one unnamed arm from now on (tests, benchmarks): under the load
        lock, so no delta or erasure is half applied across the swap; a new ``state_id`` refuses
        deltas computed for the old state."""
        with self._load_lock:
            self.state = state
            self.state_id += 1
            gc.collect()
            gc.freeze()
            self.cache.invalidate_all()
            self.update_gauges()
        self.set_health(health_pb2.HealthCheckResponse.SERVING)

    # lifecycle
    def start(self, port: int | None = None, load: bool = True) -> int:
        import faiss

        cfg = self.settings.serving
        faiss.omp_set_num_threads(cfg.faiss_threads)
        self.set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        creds = self._credentials()  # a half-configured or unreadable TLS setup stops here
        if cfg.auth_enabled and not cfg.tokens:
            raise SettingsError("serving.tokens is empty with serving.auth_enabled on: list the "
                                "SHA-256 of your client and admin tokens in the profile")
        if self.assigner is not None and load:
            self.check_experiment()  # refuse to start: an arm names a model that does not exist
        tracing = tracing_interceptors(self.settings)  # a missing package stops start-up here
        try:
            self.wal.land(everyone=True)  # whatever a crashed server left in the log
        except Exception:  # noqa: BLE001 - a bad segment stays in the log; serve anyway
            log.exception("landing the logs left by earlier servers failed; the segments stay "
                          "in the log and the flush loop retries")
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=cfg.workers),
                             interceptors=[*tracing, GuardInterceptor(self)],
                             options=[("grpc.max_receive_message_length", cfg.max_message_bytes)],
                             maximum_concurrent_rpcs=cfg.max_concurrent_rpcs)
        rec_grpc.add_RecommenderServicer_to_server(RecommenderServicer(self), server)
        admin_grpc.add_AdminServicer_to_server(AdminServicer(self), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        names = (rec_pb2.DESCRIPTOR.services_by_name["Recommender"].full_name,
                 admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name,
                 health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                 reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, server)
        address = f"{cfg.host}:{cfg.port if port is None else port}"
        self.port = server.add_secure_port(address, creds) if creds else \
            server.add_insecure_port(address)
        server.start()
        self._server = server
        if cfg.metrics_port >= 0:
            self._metrics_http, _ = start_http_server(cfg.metrics_port, addr=cfg.host,
                                                      registry=self.metrics.registry)
            self.metrics_port = self._metrics_http.server_port
        threading.Thread(target=self._flush_loop, name="wal-flush", daemon=True).start()
        threading.Thread(target=self._monitor_loop, name="monitor", daemon=True).start()
        log.info("freshrec serving on %s:%d (%s, auth %s, metrics :%s)", cfg.host, self.port,
                 "TLS" if creds else "plaintext", "on" if cfg.auth_enabled else "OFF",
                 self.metrics_port or "off")
        if load:
            try:
                self.load(fallback=True)
            except (FileNotFoundError, LookupError, ValueError) as e:
                log.warning("%s; serving NOT_SERVING until Admin.LoadModel", e)
            skipped = [w for st in self.distinct_states() for w in st.skipped_snapshots]
            self.metrics.snapshots_skipped.set(len(skipped))
            if skipped:
                log.warning("start-up fell back to an older snapshot; skipped: %s",
                            "; ".join(skipped))
        return self.port

    def _credentials(self):
        """TLS credentials, None for plaintext. Settings refuse half a configuration; a file that
        cannot be read or holds no PEM block stops start-up naming the setting (never a silent
        fall-back to plaintext)."""
        cfg = self.settings.serving
        if not (cfg.tls_cert_file or cfg.tls_key_file or cfg.tls_client_ca_file):
            return None

        def pem(setting: str) -> bytes | None:
            path = getattr(cfg, setting)
            if not path:
                return None
            try:
                data = Path(path).read_bytes()
            except OSError as e:
                raise SettingsError(f"serving.{setting} {path} cannot be read ({e.strerror}): "
                                    "fix the path or its permissions") from None
            if b"-----BEGIN" not in data:
                raise SettingsError(f"serving.{setting} {path} holds no PEM block")
            return data

        key, cert, ca = pem("tls_key_file"), pem("tls_cert_file"), pem("tls_client_ca_file")
        if key is None or cert is None:  # settings refuse this too
            raise SettingsError("serving.tls_cert_file and serving.tls_key_file go together")
        return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca,
                                           require_client_auth=ca is not None)

    def _flush_loop(self) -> None:
        while not self._stop.wait(self.settings.serving.wal_flush_seconds):
            try:
                self.wal.land()
                self.metrics.refresh_lag.set(self.refresh_lag())
            except Exception:  # keep serving; the events stay in the log for the next try
                log.exception("landing the write-ahead log failed; will retry")

    def _monitor_loop(self) -> None:
        while not self._stop.wait(self.settings.serving.monitor.interval_seconds):
            try:
                self.update_monitor()
            except Exception:  # a gauge must never take the server down
                log.exception("updating the monitoring gauges failed; will retry")

    def stop(self, grace: float | None = None) -> None:
        """Stop taking calls, let in-flight ones finish (grace), land the log."""
        self._stop.set()
        self.set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        if self._server is not None:
            self._server.stop(self.settings.serving.grace_seconds if grace is None else grace).wait()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
        self.wal.close()
        if self.reranker is not None:
            self.reranker.save()  # the online bandit's state survives the restart
        self.wal.land()  # this process's last events; its log directory goes with them
        if self.impressions is not None:
            self.impressions.close()  # flushed and fsynced; the next round takes them

    def wait(self) -> None:
        if self._server is not None:
            self._server.wait_for_termination()
