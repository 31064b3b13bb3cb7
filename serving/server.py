"""The gRPC server: Recommender and Admin services over the serving state, plus health, reflection,
bearer-token auth with roles, TLS, per-client rate limits, a per-user cache, Prometheus metrics, an
audit log of admin calls and graceful shutdown.

The servicers are thin adapters: they validate the request, pseudonymize user ids (the same HMAC
as ingest) and call the pure logic in :mod:`serving.logic`. Accepted events are appended to the
write-ahead log (fsynced) before ``RecordEvents`` replies, then moved to the landing zone.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
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
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from freshrec.device import resolve_device
from freshrec.privacy import pseudonymize
from freshrec.settings import Settings
from serving.audit import AuditLog
from serving.logic import Filters, NotFound, Result, recommend, similar_items
from serving.proto import stubs
from serving.state import ServingState, load_state
from serving.impressions import ImpressionLog
from serving.wal import EventLog

log = logging.getLogger(__name__)
pb = stubs()
rec_pb2, rec_grpc = pb["recommender_pb2"], pb["recommender_pb2_grpc"]
admin_pb2, admin_grpc = pb["admin_pb2"], pb["admin_pb2_grpc"]

RECOMMENDER = "freshrec.v1.Recommender"
ADMIN = "freshrec.v1.Admin"
OPEN_SERVICES = ("grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection",
                 "grpc.reflection.v1.ServerReflection")
ROLE_SERVICES = {"client": {RECOMMENDER}, "admin": {RECOMMENDER, ADMIN}}


# ---- auth and rate limits ---------------------------------------------------------------------
@dataclass(frozen=True)
class Caller:
    name: str
    role: str


def caller_from_metadata(settings: Settings, metadata) -> Caller | None:
    if not settings.serving.auth_enabled:
        return Caller("anonymous", "admin")
    for key, value in metadata or ():
        if key == "authorization" and value.lower().startswith("bearer "):
            digest = hashlib.sha256(value[7:].strip().encode()).hexdigest()
            for t in settings.serving.tokens:
                if t.sha256 == digest:
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


def _abort_handler(code: grpc.StatusCode, message: str):
    def abort(request, context):
        context.abort(code, message)
    return grpc.unary_unary_rpc_method_handler(abort)


class GuardInterceptor(grpc.ServerInterceptor):
    """Authenticates, authorizes by role, rate-limits per client, and counts every call."""

    def __init__(self, server: "FreshrecServer") -> None:
        self.server = server
        self.buckets: dict[str, TokenBucket] = {}
        self.handlers: dict[str, grpc.RpcMethodHandler] = {}
        self.lock = threading.Lock()

    def intercept_service(self, continuation, details):
        method = details.method  # /package.Service/Method
        service = method.split("/")[1] if method.count("/") >= 2 else ""
        if service in OPEN_SERVICES:
            return continuation(details)
        settings = self.server.settings
        caller = caller_from_metadata(settings, details.invocation_metadata)
        m = self.server.metrics
        name = method.rsplit("/", 1)[-1]
        if caller is None:
            m.requests.labels(name, "UNAUTHENTICATED").inc()
            return _abort_handler(grpc.StatusCode.UNAUTHENTICATED,
                                  "missing or unknown bearer token: send metadata "
                                  "'authorization: Bearer <token>'")
        if service not in ROLE_SERVICES.get(caller.role, ()):
            m.requests.labels(name, "PERMISSION_DENIED").inc()
            return _abort_handler(grpc.StatusCode.PERMISSION_DENIED,
                                  f"role {caller.role!r} may not call {service}")
        with self.lock:
            bucket = self.buckets.get(caller.name)
            if bucket is None:
                bucket = self.buckets[caller.name] = TokenBucket(
                    settings.serving.rate_limit_per_second, settings.serving.rate_limit_burst)
        if not bucket.take():
            m.requests.labels(name, "RESOURCE_EXHAUSTED").inc()
            return _abort_handler(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                  f"rate limit of {settings.serving.rate_limit_per_second}/s for "
                                  f"{caller.name} exceeded; retry with backoff")
        return self._timed_handler(method, name, continuation, details)

    def _timed_handler(self, method: str, name: str, continuation, details):
        """The service's handler wrapped to count and time calls; built once per method."""
        wrapped = self.handlers.get(method)
        if wrapped is not None:
            return wrapped
        handler = continuation(details)
        if handler is None or handler.unary_unary is None:
            return handler
        inner = handler.unary_unary
        m = self.server.metrics
        latency = m.latency.labels(name)
        ok = m.requests.labels(name, "OK")

        def timed(request, context):
            t0 = time.perf_counter()
            try:
                reply = inner(request, context)
            except Exception:
                code = context.code().name if context.code() else "UNKNOWN"
                m.requests.labels(name, code).inc()
                latency.observe(time.perf_counter() - t0)
                raise
            ok.inc()
            latency.observe(time.perf_counter() - t0)
            return reply

        wrapped = grpc.unary_unary_rpc_method_handler(
            timed, request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)
        self.handlers[method] = wrapped
        return wrapped


# ---- metrics and cache ------------------------------------------------------------------------
class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("freshrec_requests", "gRPC calls by method and status code",
                                ["method", "code"], registry=r)
        self.latency = Histogram("freshrec_request_seconds", "gRPC call latency", ["method"],
                                 buckets=(.0005, .001, .002, .005, .01, .02, .05, .1, .5, 1, 5),
                                 registry=r)
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


class UserCache:
    """LRU of recent results per (user, request). An entry dies with the user's new events, any
    delta or snapshot (generation bumps) or its TTL. A result computed before an invalidation is
    never stored after it: ``put`` takes the token read before the work began."""

    def __init__(self, size: int, ttl: float) -> None:
        self.size, self.ttl = size, ttl
        self.data: OrderedDict[tuple, tuple[float, tuple[int, int], object]] = OrderedDict()
        self.user_generation: dict[str, int] = {}
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

    def invalidate_all(self) -> None:
        with self.lock:
            self.generation += 1
            self.data.clear()


# ---- the servicers ----------------------------------------------------------------------------
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

    def Recommend(self, request, context):
        self._check_id(request.user_id, "user_id", context)
        self._check_k(request.k, context)
        self._check_filters(request.filters, context)
        if len(request.request_id) > self.s.settings.serving.max_id_length:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request_id is longer than "
                          f"{self.s.settings.serving.max_id_length} characters")
        state = self.s.require_state(context)
        user = self.s.pseudonym(request.user_id)
        filters = _filters(request.filters)
        ctx = dict(request.context)
        key = (user, request.k, filters, tuple(sorted(ctx.items())), state.model_version)
        token = self.s.cache.token(user)
        cached = self.s.cache.get(key)
        if cached is not None:
            self.s.metrics.cache_hits.inc()
            reply = rec_pb2.RecommendResponse()
            reply.CopyFrom(cached[0])
            return self._served(request, reply, user, cached[1], cached[2], None)
        self.s.metrics.cache_misses.inc()
        self.s.check_deadline(context)
        # Request-time freshness: the user's own new events count now, whatever the model kind.
        recent = self.s.recent_events(user)
        rr = self.s.reranker
        n = max(request.k, rr.candidates) if rr else request.k
        result = recommend(state, user, n, filters, ctx, recent, self.s.settings.serving.overfetch)
        if rr is not None and not result.cold_start:
            # explores: not cached, every served item carries its propensity (and is logged)
            history = [i for i, _ in reversed(recent)] + sorted(state.seen.get(user, ()))
            picked = rr.rerank(state, user, history, result.items, request.k)
            reply = rec_pb2.RecommendResponse(
                items=[rec_pb2.ScoredItem(item_id=s.item_id, score=s.score, source=f"{s.source}+{rr.name}",
                                          explanation=s.explanation, propensity=p) for s, p in picked],
                model_version=result.model_version, cold_start=False)
            return self._served(request, reply, user, [s.item_id for s, _ in picked],
                                [float(s.score) for s, _ in picked], [float(p) for _, p in picked])
        result.items[:] = result.items[:request.k]
        reply = rec_pb2.RecommendResponse(items=_scored(result), model_version=result.model_version,
                                          cold_start=result.cold_start)
        ids, scores = [s.item_id for s in result.items], [float(s.score) for s in result.items]
        self.s.cache.put(key, (reply, ids, scores), token)
        return self._served(request, reply, user, ids, scores, None)

    def _served(self, request, reply, user: str, items: list[str], scores: list[float],
                propensities: list[float] | None):
        """Name the slate (the request's request_id or a new one) and log it as an impression
        (propensity 1.0 per item when the ranker was deterministic)."""
        imp = self.s.impressions
        if imp is None:
            reply.request_id = request.request_id
            return reply
        rid = request.request_id or imp.new_request_id()
        reply.request_id = rid
        if items:
            imp.record(rid, user, reply.model_version, getattr(reply, "arm", None) or None, items,
                       scores, propensities or [1.0] * len(items))
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
        def do():
            state = self.s.load(Path(request.path) if request.path else None)
            return admin_pb2.LoadSnapshotResponse(model_version=state.model_version,
                                                  n_items=state.items.size,
                                                  n_users=len(state.user_rows))
        return self._audited("LoadSnapshot", {"path": request.path}, context, do)

    def LoadModel(self, request, context):
        def do():
            before = self.s.state.model_version if self.s.state else ""
            state = self.s.load(model=request.model or None)
            return admin_pb2.LoadModelResponse(model_version=state.model_version,
                                               n_items=state.items.size,
                                               n_users=len(state.user_rows),
                                               previous_model_version=before)
        return self._audited("LoadModel", {"model": request.model}, context, do)

    def ApplyDeltas(self, request, context):
        state = self.s.require_state(context)

        def vec(v) -> np.ndarray:
            a = np.asarray(v.values, dtype=np.float32)
            if a.shape != (state.items.dim,):
                raise ValueError(f"vector for {v.id!r} has {a.size} values; the index has "
                                 f"dimension {state.items.dim}")
            if not np.all(np.isfinite(a)):
                raise ValueError(f"vector for {v.id!r} holds NaN or infinite values")
            return a

        def do():
            users = (lambda u: u) if request.users_pseudonymized else self.s.pseudonym
            items_up = [(v.id, vec(v)) for v in request.upsert_items]
            users_up = {users(v.id): vec(v) for v in request.upsert_users}
            n_up = state.items.upsert(items_up)
            n_rm = state.items.remove(list(request.remove_items))
            for table, version in request.applied_versions.items():
                state.delta_versions[table] = version
            if request.newest_event_ts:
                state.newest_event_ts = max(state.newest_event_ts or 0.0, request.newest_event_ts)
            u_up = state.upsert_users(users_up)
            # a removed user (erased upstream) loses vector, history and recent events here
            u_rm = sum(self.s.forget_user(users(u)) for u in request.remove_users)
            h_up = 0
            for h in request.upsert_histories:
                if len(h.item_ids) != len(h.weights):
                    raise ValueError(f"history of {h.user_id!r}: {len(h.item_ids)} items but "
                                     f"{len(h.weights)} weights")
                h_up += state.set_history(users(h.user_id), list(h.item_ids), list(h.weights))
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

        def do():
            removed, rows = self.s.delete_user(self.s.pseudonym(request.user_id))
            return admin_pb2.DeleteUserResponse(vector_removed=removed, rows_deleted=rows)
        # The audit names the pseudonym, never the raw id.
        return self._audited("DeleteUser", {"user": self.s.pseudonym(request.user_id)}, context, do)

    def Status(self, request, context):
        state = self.s.require_state(context)
        return admin_pb2.StatusResponse(
            model_version=state.model_version, index_size=state.items.size,
            index_type=state.items.index_type,
            delta_versions={k: v for k, v in state.delta_versions.items() if v is not None},
            refresh_lag_seconds=self.s.refresh_lag(), n_users=len(state.user_rows),
            device="cuda" if self.s.use_gpu else "cpu")


# ---- the server -------------------------------------------------------------------------------
class FreshrecServer:
    def __init__(self, settings: Settings, use_gpu: bool | None = None) -> None:
        self.settings = settings
        if use_gpu is None:
            use_gpu = resolve_device(settings.device, need=("faiss",)).faiss_gpu
        self.use_gpu = use_gpu
        self.state: ServingState | None = None
        self.metrics = Metrics()
        self.cache = UserCache(settings.serving.cache_size, settings.serving.cache_ttl_seconds)
        self.audit = AuditLog(settings.data_dir / "audit" / "admin.jsonl")
        self.wal = EventLog(settings)
        self.impressions: ImpressionLog | None = None
        if settings.serving.log_impressions:
            self.impressions = ImpressionLog(settings)
        self.recent: dict[str, deque] = {}
        self.recent_lock = threading.Lock()
        self._load_lock = threading.Lock()
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
        p = self.settings.privacy
        return pseudonymize(raw, p.hmac_key) if p.pseudonymize_users else raw

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
        if len(ev.context) > 50:
            return "context has more than 50 entries"
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
        rules = rules_for(self.settings)  # the weight clean will write to silver events.weight
        now = time.time()
        with self.recent_lock:
            for r in records:
                w = rules.weight(r["event_type"], r["value"])
                self.recent.setdefault(r["user_id"], deque(maxlen=n)).append(
                    (r["item_id"], w, now))
        for user in {r["user_id"] for r in records}:
            self.cache.invalidate_user(user)
        self.metrics.events.inc(len(records))

    def recent_events(self, user: str) -> list[tuple[str, float]]:
        with self.recent_lock:
            return [(i, w) for i, w, _ in self.recent.get(user, ())]

    def delete_user(self, user: str) -> tuple[bool, int]:
        from freshrec.erasure import erase_user

        state = self.state
        removed = state.forget_user(user) if state else False
        with self.recent_lock:
            self.recent.pop(user, None)
        self.cache.invalidate_user(user)
        self.wal.land(everyone=True)  # every server's logged events reach landing, where erasure
        # finds them; logged slates reach the impressions table for the same reason
        if self.impressions is not None:
            from serving.impressions import take_impressions

            self.impressions.flush()
            take_impressions(self.settings)
        rows = erase_user(self.settings, user)
        return removed, sum(rows.values())

    def forget_user(self, user: str) -> bool:
        """Drop a user's vector, history and recent events from this replica (not the tables)."""
        state = self.state
        removed = state.forget_user(user) if state else False
        with self.recent_lock:
            removed = self.recent.pop(user, None) is not None or removed
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
        self.metrics.index_size.set(state.items.size)
        self.metrics.users.set(len(state.user_vectors))
        self.metrics.model.clear()
        self.metrics.model.labels(state.model_version).set(1)
        self.metrics.refresh_lag.set(self.refresh_lag())

    def load(self, snapshot: Path | None = None, model: str | int | None = None) -> ServingState:
        """Load a snapshot (a path, or the snapshot of registered ``model``: alias or version,
        default ``serving.model``) and swap it in atomically: requests see the old or the new
        model. A failed load raises and leaves the old model serving."""
        with self._load_lock:
            state = load_state(self.settings, snapshot, use_gpu=self.use_gpu, model=model)
            self.state = state
            gc.collect()
            gc.freeze()  # the loaded state is long-lived: keep the cyclic GC from re-scanning it
            if state.newest_event_ts is not None:  # events the snapshot already holds
                with self.recent_lock:
                    for user in list(self.recent):
                        kept = deque((e for e in self.recent[user] if e[2] > state.newest_event_ts),
                                     maxlen=self.recent[user].maxlen)
                        if kept:
                            self.recent[user] = kept
                        else:
                            del self.recent[user]
            self.cache.invalidate_all()
            self.update_gauges()
        for service in ("", RECOMMENDER, ADMIN):
            self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        log.info("serving %s", state.model_version)
        return state

    # lifecycle
    def start(self, port: int | None = None, load: bool = True) -> int:
        import faiss

        cfg = self.settings.serving
        faiss.omp_set_num_threads(cfg.faiss_threads)
        for service in ("", RECOMMENDER, ADMIN):
            self.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        self.wal.land(everyone=True)  # whatever a crashed server left in the log
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=cfg.workers),
                             interceptors=[GuardInterceptor(self)],
                             options=[("grpc.max_receive_message_length", 64 << 20)])
        rec_grpc.add_RecommenderServicer_to_server(RecommenderServicer(self), server)
        admin_grpc.add_AdminServicer_to_server(AdminServicer(self), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        names = (rec_pb2.DESCRIPTOR.services_by_name["Recommender"].full_name,
                 admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name,
                 health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                 reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, server)
        address = f"{cfg.host}:{cfg.port if port is None else port}"
        creds = self._credentials()
        self.port = server.add_secure_port(address, creds) if creds else \
            server.add_insecure_port(address)
        server.start()
        self._server = server
        if cfg.metrics_port >= 0:
            self._metrics_http, _ = start_http_server(cfg.metrics_port, addr=cfg.host,
                                                      registry=self.metrics.registry)
            self.metrics_port = self._metrics_http.server_port
        threading.Thread(target=self._flush_loop, name="wal-flush", daemon=True).start()
        log.info("freshrec serving on %s:%d (%s, auth %s, metrics :%s)", cfg.host, self.port,
                 "TLS" if creds else "plaintext", "on" if cfg.auth_enabled else "OFF",
                 self.metrics_port or "off")
        if load:
            try:
                self.load()
            except (FileNotFoundError, LookupError, ValueError) as e:
                log.warning("%s; serving NOT_SERVING until Admin.LoadModel", e)
        return self.port

    def _credentials(self):
        cfg = self.settings.serving
        if not (cfg.tls_cert_file and cfg.tls_key_file):
            return None
        key = Path(cfg.tls_key_file).read_bytes()
        cert = Path(cfg.tls_cert_file).read_bytes()
        ca = Path(cfg.tls_client_ca_file).read_bytes() if cfg.tls_client_ca_file else None
        return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca,
                                           require_client_auth=ca is not None)

    def _flush_loop(self) -> None:
        while not self._stop.wait(self.settings.serving.wal_flush_seconds):
            try:
                self.wal.land()
                self.metrics.refresh_lag.set(self.refresh_lag())
            except Exception:  # keep serving; the events stay in the log for the next try
                log.exception("landing the write-ahead log failed; will retry")

    def stop(self, grace: float | None = None) -> None:
        """Stop taking calls, let in-flight ones finish (grace), land the log."""
        self._stop.set()
        for service in ("", RECOMMENDER, ADMIN):
            self.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        if self._server is not None:
            self._server.stop(self.settings.serving.grace_seconds if grace is None else grace).wait()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
        self.wal.close()
        self.wal.land()  # this process's last events; its log directory goes with them
        if self.impressions is not None:
            self.impressions.close()  # flushed and fsynced; the next round takes them

    def wait(self) -> None:
        if self._server is not None:
            self._server.wait_for_termination()
