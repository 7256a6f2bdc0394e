"""The exception family shared by both daemons, and its mapping to gRPC status codes.

Servicers raise these; ``abort_on_error`` turns them into a precise gRPC status at the
boundary. Clients call ``from_rpc_error`` to get the typed exception back.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Awaitable, Callable, TypeVar

import grpc

log = logging.getLogger(__name__)


class PipeguardError(Exception):
    """Base class. ``code`` is the gRPC status a servicer answers with."""

    code = grpc.StatusCode.INTERNAL


class InvalidArgument(PipeguardError):
    """Malformed message: wrong shape/dtype, wrong receiver, unknown enum value."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class Unauthenticated(PipeguardError):
    """Bad signature, or a sender whose key is unknown."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(PipeguardError):
    """A banned sender, or an order from someone who may not give it."""

    code = grpc.StatusCode.PERMISSION_DENIED


class AlreadyExists(PipeguardError):
    """A replayed message, or a second registration of a live identity."""

    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(PipeguardError):
    """The message is valid but not now: stale step, node not assigned, wrong run."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(PipeguardError):
    """A claimed size over a configured limit."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DataLoss(PipeguardError):
    """Payload bytes do not match their signed digest, or a truncated stream."""

    code = grpc.StatusCode.DATA_LOSS


class NotFound(PipeguardError):
    """Something asked for does not exist (dataset digest, node id)."""

    code = grpc.StatusCode.NOT_FOUND


class Unavailable(PipeguardError):
    """A peer cannot be reached."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(PipeguardError):
    """A timeout ran out."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


_BY_CODE = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        Unauthenticated,
        PermissionDenied,
        AlreadyExists,
        FailedPrecondition,
        ResourceExhausted,
        DataLoss,
        NotFound,
        Unavailable,
        DeadlineExceeded,
    )
}


def from_rpc_error(err: grpc.RpcError) -> PipeguardError:
    """Turn a gRPC error seen by a client back into the typed exception."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    detail = err.details() if hasattr(err, "details") else str(err)
    cls = _BY_CODE.get(code, PipeguardError)
    exc = cls(f"{code.name}: {detail}")
    return exc


F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def abort_on_error(method: F) -> F:
    """Decorate an async servicer method: typed errors become their gRPC status.

    Anything unexpected is logged with its traceback and answered INTERNAL, so a bug in a
    handler never takes the daemon down. ``self.on_rejected(context, exc)`` is called, when the
    servicer defines it, so rejections can be counted per peer.
    """

    @functools.wraps(method)
    async def wrapper(self, request, context: grpc.aio.ServicerContext):
        try:
            return await method(self, request, context)
        except PipeguardError as exc:
            hook = getattr(self, "on_rejected", None)
            if hook is not None:
                hook(method.__name__, exc)
            log.warning("%s rejected: %s: %s", method.__name__, exc.code.name, exc)
            await context.abort(exc.code, str(exc))
        except grpc.aio.AbortError:
            raise
        except Exception:  # noqa: BLE001 - the boundary: never let a handler kill the daemon
            log.exception("%s failed", method.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, f"{method.__name__}: internal error")

    return wrapper  # type: ignore[return-value]
