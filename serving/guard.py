"""The guard of the gRPC server: one interceptor in front of every call that authenticates
(bearer tokens, by their SHA-256 in ``serving.tokens``), authorizes by role, rate-limits per token
and per client address (:mod:`serving.limits`), bounds the calls that may wait on a client (health,
reflection) and counts and times every call (:mod:`serving.metrics`). Reads the settings and the
call's metadata; keeps its state in memory and writes nothing."""

from __future__ import annotations

import hashlib
import hmac
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health_pb2

from freshrec.settings import Settings
from serving.limits import RateLimits
from serving.methods import ADMIN, HEALTH_CHECK, HEALTH_WATCH, KNOWN_METHODS, RECOMMENDER, REFLECTION
from serving.metrics import CallMetrics, code_of

if TYPE_CHECKING:
    from serving.server import FreshrecServer

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

    def _peer_ok(self, cm: CallMetrics, context) -> None:
        if not self.peers.take(peer_host(context)):
            cm.done("RESOURCE_EXHAUSTED")
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"rate limit of {self.server.settings.serving.peer_rate_limit_per_second}"
                          "/s for this client address exceeded; retry with backoff")

    def _refuse(self, cm: CallMetrics, code: grpc.StatusCode,
                message: str) -> grpc.RpcMethodHandler:
        def refuse(_request_iterator, context):  # never reads the request: no wait on the client
            cm.start()
            self._peer_ok(cm, context)
            cm.done(code.name)
            context.abort(code, message)
        return grpc.stream_unary_rpc_method_handler(refuse)

    def _slot(self, cm: CallMetrics, context) -> None:
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

    def _wrap(self, cm: CallMetrics, handler):
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
                    cm.done(code_of(context), time.perf_counter() - t0)
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
                cm.done(code_of(context, "UNKNOWN"), time.perf_counter() - t0)
                raise
            cm.done("OK", time.perf_counter() - t0)
            return reply

        return grpc.unary_unary_rpc_method_handler(
            timed, response_serializer=handler.response_serializer)

    def _health_check(self, cm: CallMetrics, handler):
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
                code = code_of(context, "UNKNOWN")
                raise
            finally:
                self.slow_slots.release()
                cm.done(code, time.perf_counter() - t0)
        return grpc.stream_unary_rpc_method_handler(
            check, response_serializer=handler.response_serializer)

    def _health_watch(self, cm: CallMetrics):
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
                cm.done(code_of(context), time.perf_counter() - t0)
        return grpc.stream_stream_rpc_method_handler(
            watch, response_serializer=health_pb2.HealthCheckResponse.SerializeToString)
