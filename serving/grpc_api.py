"""The gRPC servicers: thin adapters from the Recommender and Admin calls to the domain
(:class:`~serving.service.FreshrecService`, :class:`~serving.admin.AdminService`). They pass the
request message on, with the call's deadline (Recommender) or the caller's name from its bearer
token (Admin, for the audit log), and answer a :class:`~serving.errors.ServiceError` with its own
status: ``context.abort(e.code, str(e))``. Reads the call's metadata; writes nothing themselves.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from serving.admin import AdminService
from serving.errors import ServiceError
from serving.guard import caller_from_metadata
from serving.methods import admin_grpc, admin_pb2, rec_grpc

if TYPE_CHECKING:
    from serving.server import FreshrecServer


class RecommenderServicer(rec_grpc.RecommenderServicer):
    def __init__(self, server: "FreshrecServer") -> None:
        self.s = server

    def Recommend(self, request, context):
        try:
            return self.s.recommend(request, context.time_remaining)
        except ServiceError as e:
            context.abort(e.code, str(e))

    def SimilarItems(self, request, context):
        try:
            return self.s.similar_items(request, context.time_remaining)
        except ServiceError as e:
            context.abort(e.code, str(e))

    def RecordEvents(self, request, context):
        try:
            return self.s.record_events(request, context.time_remaining)
        except ServiceError as e:
            context.abort(e.code, str(e))


class AdminServicer(admin_grpc.AdminServicer):
    def __init__(self, server: "FreshrecServer") -> None:
        self.s = server
        self.admin = AdminService(server)

    def _who(self, context) -> str:
        """The caller's token name, for the audit log ("?" when it names none)."""
        who = caller_from_metadata(self.s.settings, context.invocation_metadata())
        return who.name if who else "?"

    def _call(self, context, operation, request):
        try:
            return operation(request, self._who(context))
        except ServiceError as e:
            context.abort(e.code, str(e))

    def LoadSnapshot(self, request, context):
        return self._call(context, self.admin.load_snapshot, request)

    def LoadModel(self, request, context):
        return self._call(context, self.admin.load_model, request)

    def ApplyDeltas(self, request, context):
        return self._call(context, self.admin.apply_deltas, request)

    def DeleteUser(self, request, context):
        return self._call(context, self.admin.delete_user, request)

    def Status(self, request, context):
        s = self.s
        if s.state is None and s.host is not None:
            # one of several processes with nothing loaded yet: the host's processes still, so
            # the refresher and the rollout reach each of them (freshrec.api.replicas.host_processes)
            reply = admin_pb2.StatusResponse(state_id=s.state_id)
        else:
            try:
                reply = self.admin.status()
            except ServiceError as e:
                context.abort(e.code, str(e))
        if s.host is not None:  # one of several processes on this host: serving/host.py
            s.host.describe(reply, context)
        return reply
