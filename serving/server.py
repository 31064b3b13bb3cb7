"""The gRPC server process: :class:`FreshrecServer` is the serving domain
(:class:`serving.service.FreshrecService`) listening for calls. It builds the gRPC server with the
guard interceptor in front (:mod:`serving.guard`: bearer-token auth with roles, per-client rate
limits, metrics) and tracing where configured (:mod:`serving.tracing`), serves the Recommender
and Admin servicers (:mod:`serving.grpc_api`), health and reflection, over TLS when configured,
exposes the Prometheus metrics (:mod:`serving.metrics`) over HTTP, and starts and stops it all
gracefully.

It reads the TLS certificate, key and client CA files (``serving.tls_*``); at start it lands what
earlier servers left in the write-ahead log, a background loop moves the log to the landing zone
every ``serving.wal_flush_seconds``, and stop lands this process's last events, saves the
re-ranking bandit's state and closes the impression log.

The names other modules import from here (the servicers, the guard, the stubs, ``serving_gpu``,
``tracing_interceptors``, ...) are re-exported from the modules that now hold them.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from freshrec.settings import Settings, SettingsError
from serving.grpc_api import AdminServicer, RecommenderServicer
from serving.guard import GuardInterceptor
from serving.methods import ADMIN, RECOMMENDER, admin_grpc, admin_pb2, rec_grpc, rec_pb2
from serving.service import FreshrecService
from serving.tracing import tracing_interceptors

# Re-exported: what tests, benchmarks, freshrec/cli and serving/host.py import from here, and the
# other public names this module had before the split (they live in the modules named).
from serving.admin import MODEL_SPEC
from serving.cache import UserCache
from serving.gpu import serving_gpu
from serving.guard import ROLE_SERVICES, Caller, caller_from_metadata, decode, peer_host
from serving.limits import RateLimits, TokenBucket
from serving.methods import HEALTH_CHECK, HEALTH_WATCH, KNOWN_METHODS, METHOD_TYPES, REFLECTION
from serving.metrics import GRPC_BUCKETS, CallMetrics, Metrics
from serving.service import NO_FILTERS, PSEUDONYM_CACHE

__all__ = [
    "ADMIN", "GRPC_BUCKETS", "HEALTH_CHECK", "HEALTH_WATCH", "KNOWN_METHODS", "METHOD_TYPES",
    "MODEL_SPEC", "NO_FILTERS", "PSEUDONYM_CACHE", "RECOMMENDER", "REFLECTION", "ROLE_SERVICES",
    "AdminServicer", "CallMetrics", "Caller", "FreshrecServer", "GuardInterceptor", "Metrics",
    "RateLimits", "RecommenderServicer", "TokenBucket", "UserCache", "admin_grpc", "admin_pb2",
    "caller_from_metadata", "decode", "peer_host", "rec_grpc", "rec_pb2", "serving_gpu",
    "tracing_interceptors",
]

log = logging.getLogger(__name__)


class FreshrecServer(FreshrecService):
    """The serving domain plus its gRPC server: health, lifecycle (start, stop, wait)."""

    def __init__(self, settings: Settings, use_gpu: bool | None = None) -> None:
        self.started_at = time.time()
        self.host = None  # serving.host.ProcessSlot when a supervisor started this process
        self._health: dict[str, int] = {}
        self.health = health.HealthServicer()
        self._server: grpc.Server | None = None
        self._metrics_http = None
        self._stop = threading.Event()
        self.port = 0
        self.metrics_port = 0
        super().__init__(settings, use_gpu)

    def set_health(self, status: int) -> None:
        for service in ("", RECOMMENDER, ADMIN):
            self._health[service] = status
            self.health.set(service, status)

    def health_status(self, service: str) -> int:
        return self._health.get(service, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)

    def serving_started(self) -> None:
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
