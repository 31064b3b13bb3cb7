"""A small gRPC client for freshrec (used by the CLI, the tests and the benchmarks)."""

from __future__ import annotations

from pathlib import Path

import grpc

from serving.proto import stubs


class Client:
    def __init__(self, address: str, token: str | None = None, ca_file: str | None = None,
                 cert_file: str | None = None, key_file: str | None = None,
                 options: list | None = None) -> None:
        pb = stubs()
        self.rec_pb2, self.admin_pb2 = pb["recommender_pb2"], pb["admin_pb2"]
        if ca_file:
            creds = grpc.ssl_channel_credentials(
                root_certificates=Path(ca_file).read_bytes(),
                private_key=Path(key_file).read_bytes() if key_file else None,
                certificate_chain=Path(cert_file).read_bytes() if cert_file else None)
            self.channel = grpc.secure_channel(address, creds, options=options or [])
        else:
            self.channel = grpc.insecure_channel(address, options=options or [])
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
        return self.recommender.Recommend(req, timeout=timeout, metadata=self.metadata)

    def similar(self, item_id: str, k: int = 10, timeout: float = 5.0, **filters):
        req = self.rec_pb2.SimilarItemsRequest(item_id=item_id, k=k,
                                               filters=self.rec_pb2.Filters(**filters))
        return self.recommender.SimilarItems(req, timeout=timeout, metadata=self.metadata)

    def record(self, events: list[dict], timeout: float = 5.0):
        req = self.rec_pb2.RecordEventsRequest(events=[self.rec_pb2.Event(**e) for e in events])
        return self.recommender.RecordEvents(req, timeout=timeout, metadata=self.metadata)

    def call_admin(self, method: str, request, timeout: float = 60.0):
        return getattr(self.admin, method)(request, timeout=timeout, metadata=self.metadata)

    def close(self) -> None:
        self.channel.close()
