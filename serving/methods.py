"""The gRPC surface of the server: the generated message and stub modules (``rec_pb2``,
``rec_grpc``, ``admin_pb2``, ``admin_grpc``), the service names, and the method paths it answers
with their call types. Reads and writes nothing but the generated stubs (generated on first import
when missing or older than the .proto files: :func:`freshrec.api.proto.stubs`)."""

from __future__ import annotations

from grpc_health.v1 import health_pb2

from freshrec.api.proto import stubs

pb = stubs()
rec_pb2, rec_grpc = pb["recommender_pb2"], pb["recommender_pb2_grpc"]
admin_pb2, admin_grpc = pb["admin_pb2"], pb["admin_pb2_grpc"]

RECOMMENDER = "freshrec.v1.Recommender"
ADMIN = "freshrec.v1.Admin"
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
HEALTH_WATCH = "/grpc.health.v1.Health/Watch"
# reflection needs a token (any role); health stays open (load balancers probe it without one)
REFLECTION = ("grpc.reflection.v1alpha.ServerReflection", "grpc.reflection.v1.ServerReflection")
_SERVICES = ((rec_pb2.DESCRIPTOR, "Recommender"), (admin_pb2.DESCRIPTOR, "Admin"),
             (health_pb2.DESCRIPTOR, "Health"))
KNOWN_METHODS = {f"/{d.services_by_name[n].full_name}/{m.name}"
                 for d, n in _SERVICES
                 for m in d.services_by_name[n].methods} | {
                 f"/{s}/ServerReflectionInfo" for s in REFLECTION}
# the grpc_type label of the standard metrics, by method path (reflection: a bidirectional stream)
METHOD_TYPES = {f"/{d.services_by_name[n].full_name}/{m.name}":
                ("bidi_stream" if m.client_streaming and m.server_streaming else
                 "client_stream" if m.client_streaming else
                 "server_stream" if m.server_streaming else "unary")
                for d, n in _SERVICES
                for m in d.services_by_name[n].methods} | {
                f"/{s}/ServerReflectionInfo": "bidi_stream" for s in REFLECTION}
