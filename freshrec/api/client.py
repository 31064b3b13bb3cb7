"""A small gRPC client for freshrec (used by the CLI, the tests and the benchmarks).

``address`` names one server (``host:port``), several (``host1:port,host2:port``: replicas behind
a client-side balancer) or any gRPC target (``dns:///name:port``, ``ipv4:...``). The channel uses
gRPC's ``round_robin`` policy over every address the target resolves to and a retry policy on the
read-only calls (``Recommend``, ``SimilarItems``): UNAVAILABLE is retried on the next replica, at
most ``attempts`` tries per call with exponential backoff, and each try waits (up to the call's
deadline) for a replica that is ready (``wait_for_ready``), reconnecting after 0.1 s, so a replica
or process that dies mid-call costs a retry, not a failed call; a client whose every server is down
gets DEADLINE_EXCEEDED at the deadline instead of UNAVAILABLE at once. ``RecordEvents`` and the Admin calls
are not retried by the channel: an event is taken once only when it carries an ``event_id`` (send
one and retry yourself), and the refresher and rollout retry their Admin calls per replica.
"""

from __future__ import annotations

import ipaddress
import json
import socket
from pathlib import Path

import grpc

from freshrec.api.proto import stubs

RETRIED_SERVICE = "freshrec.v1.Recommender"
RETRIED_METHODS = ("Recommend", "SimilarItems")


def service_config(attempts: int = 4, initial_backoff: float = 0.05,
                   max_backoff: float = 1.0) -> str:
    """gRPC service config: round_robin, and UNAVAILABLE retried on the read-only calls."""
    if not 2 <= attempts <= 5:  # gRPC caps maxAttempts at 5 (larger values are silently cut)
        raise ValueError(f"attempts must be within [2, 5], got {attempts}")
    return json.dumps({
        "loadBalancingConfig": [{"round_robin": {}}],
        "methodConfig": [{
            "name": [{"service": RETRIED_SERVICE, "method": m} for m in RETRIED_METHODS],
            "retryPolicy": {"maxAttempts": attempts, "initialBackoff": f"{initial_backoff}s",
                            "maxBackoff": f"{max_backoff}s", "backoffMultiplier": 2,
                            "retryableStatusCodes": ["UNAVAILABLE"]}}]})


def _split(hostport: str) -> tuple[str, str]:
    host, sep, port = hostport.strip().rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"address {hostport!r} is not host:port (e.g. 10.0.0.5:50051)")
    return host.strip("[]"), port


def target(address: str) -> tuple[str, str | None]:
    """The gRPC target for ``address`` and the authority to present (the first host name, so TLS
    checks the certificate against a name, not an IP), or None to keep gRPC's default.

    ``host:port`` stays as it is; ``a:p1,b:p2`` becomes one ``ipv4:``/``ipv6:`` target over every
    address (host names are resolved now, each to all its addresses); a target with a scheme
    (``dns:///``, ``ipv4:``, ``unix:``) is passed through."""
    address = address.strip()
    if not address:
        raise ValueError("server address is empty: give host:port, host:port,host:port or "
                         "dns:///name:port")
    if "," not in address:
        return address, None
    v4, v6, authority = [], [], None
    for part in address.split(","):
        host, port = _split(part)
        try:
            ips = [ipaddress.ip_address(host)]
        except ValueError:  # a name: every address it has
            authority = authority or f"{host}:{port}"
            try:
                infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
            except socket.gaierror as e:
                raise ValueError(f"address {part!r}: cannot resolve {host!r} ({e})") from None
            ips = list(dict.fromkeys(ipaddress.ip_address(i[4][0]) for i in infos))
        for ip in ips:
            (v4 if ip.version == 4 else v6).append(f"{ip}:{port}" if ip.version == 4
                                                   else f"[{ip}]:{port}")
    if v4 and v6:  # one target holds one family: keep IPv4 (loopback and most fleets)
        v6 = []
    return ("ipv4:" + ",".join(v4)) if v4 else ("ipv6:" + ",".join(v6)), authority


def channel_options(address: str, options: list | None = None, attempts: int = 4) -> tuple[str, list]:
    tgt, authority = target(address)
    opts = [("grpc.service_config", service_config(attempts)), ("grpc.enable_retries", 1),
            ("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 2000)]
    if authority:
        opts.append(("grpc.default_authority", authority))
    names = {k for k, _ in options or ()}
    return tgt, [o for o in opts if o[0] not in names] + list(options or ())


class Client:
    def __init__(self, address: str, token: str | None = None, ca_file: str | None = None,
                 cert_file: str | None = None, key_file: str | None = None,
                 options: list | None = None, attempts: int = 4,
                 wait_for_ready: bool = True) -> None:
        pb = stubs()
        self.rec_pb2, self.admin_pb2 = pb["recommender_pb2"], pb["admin_pb2"]
        self.address, self.wait_for_ready = address, wait_for_ready
        tgt, opts = channel_options(address, options, attempts)
        if ca_file:
            creds = grpc.ssl_channel_credentials(
                root_certificates=Path(ca_file).read_bytes(),
                private_key=Path(key_file).read_bytes() if key_file else None,
                certificate_chain=Path(cert_file).read_bytes() if cert_file else None)
            self.channel = grpc.secure_channel(tgt, creds, options=opts)
        else:
            self.channel = grpc.insecure_channel(tgt, options=opts)
        self.recommender = pb["recommender_pb2_grpc"].RecommenderStub(self.channel)
        self.admin = pb["admin_pb2_grpc"].AdminStub(self.channel)
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()

    def recommend(self, user_id: str, k: int = 10, timeout: float = 5.0, context=None,
                  request_id: str = "", explain: bool = False, **filters):
        """``explain``: ask for each item's explanation (left empty otherwise)."""
        req = self.rec_pb2.RecommendRequest(user_id=user_id, k=k,
                                            filters=self.rec_pb2.Filters(**filters),
                                            context=context or {}, request_id=request_id,
                                            want_explanations=explain)
        return self.recommender.Recommend(req, timeout=timeout, metadata=self.metadata,
                                          wait_for_ready=self.wait_for_ready)

    def similar(self, item_id: str, k: int = 10, timeout: float = 5.0, **filters):
        req = self.rec_pb2.SimilarItemsRequest(item_id=item_id, k=k,
                                               filters=self.rec_pb2.Filters(**filters))
        return self.recommender.SimilarItems(req, timeout=timeout, metadata=self.metadata,
                                             wait_for_ready=self.wait_for_ready)

    def record(self, events: list[dict], timeout: float = 5.0):
        req = self.rec_pb2.RecordEventsRequest(events=[self.rec_pb2.Event(**e) for e in events])
        return self.recommender.RecordEvents(req, timeout=timeout, metadata=self.metadata)

    def call_admin(self, method: str, request, timeout: float = 60.0, metadata=()):
        return getattr(self.admin, method)(request, timeout=timeout,
                                           metadata=self.metadata + tuple(metadata))

    def close(self) -> None:
        self.channel.close()
