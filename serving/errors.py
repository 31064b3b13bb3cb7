"""Domain errors of the serving service (:mod:`serving.service`, :mod:`serving.deltas`): each
class carries the gRPC status code a client sees for it, so the service never touches a gRPC
context and the servicers (:mod:`serving.grpc_api`) answer every one the same way,
``context.abort(e.code, str(e))``. Reads and writes nothing.

``InvalidArgument`` is also a ``ValueError`` and ``NotFound`` a ``LookupError``, so in-process
callers that catch the built-in types (start-up, :mod:`serving.host`) keep catching them.
"""

from __future__ import annotations

import grpc


class ServiceError(Exception):
    """A request the service refuses; ``code``: the status the client sees, the message its
    details."""

    code = grpc.StatusCode.UNKNOWN


class InvalidArgument(ServiceError, ValueError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(ServiceError, LookupError):
    code = grpc.StatusCode.NOT_FOUND


class Unavailable(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(ServiceError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Aborted(ServiceError):
    code = grpc.StatusCode.ABORTED
