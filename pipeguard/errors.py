"""The exception family shared by both daemons, and its mapping to gRPC status codes.

Servicers raise these; ``abort_on_error`` turns them into a precise gRPC status at the
boundary. Calls through pipeguard's channels raise them back (``rpc.TypedErrors`` applies
``from_rpc_error`` to every call), as errors that are also ``grpc.aio.AioRpcError``.
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


class AuditIncomplete(PipeguardError):
    """An audit could not gather what it needs (or what it got is about something else); it proves
    nothing about anyone."""


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


class _RemoteStatus:
    """The ``code`` of an error that came back over gRPC: the status code itself for pipeguard's
    protocol (``exc.code.name``, ``exc.code == StatusCode.X``) that can also be called, as
    ``grpc.RpcError``'s protocol has it (``err.code()``)."""

    __slots__ = ("status",)

    def __init__(self, status: grpc.StatusCode):
        self.status = status

    def __call__(self) -> grpc.StatusCode:
        return self.status

    def __getattr__(self, name: str):
        return getattr(self.status, name)

    def __eq__(self, other: object) -> bool:
        return self.status == (other.status if isinstance(other, _RemoteStatus) else other)

    def __hash__(self) -> int:
        return hash(self.status)

    def __repr__(self) -> str:
        return repr(self.status)


class RemoteError(grpc.aio.AioRpcError):
    """Mixed into the typed errors that calls through pipeguard's channels raise (``rpc.TypedErrors``).

    Such an error is both the typed exception (``except InvalidArgument``, ``exc.code.name``) and
    a ``grpc.aio.AioRpcError`` (``except grpc.RpcError``, ``err.code()``, ``err.details()``,
    ``err.trailing_metadata()``), so callers written either way keep working.
    """

    def __init__(self, err: grpc.RpcError):
        status = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
        details = err.details() if hasattr(err, "details") else str(err)
        grpc.aio.AioRpcError.__init__(
            self, status, _metadata(err, "initial_metadata"), _metadata(err, "trailing_metadata"), details,
            err.debug_error_string() if hasattr(err, "debug_error_string") else None)
        self.code = _RemoteStatus(status)  # type: ignore[assignment]
        self.args = (f"{status.name}: {details}",)

    def __str__(self) -> str:
        return self.args[0]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.args[0]!r})"


def _metadata(err: grpc.RpcError, which: str):
    try:
        return getattr(err, which)() or ()
    except Exception:  # noqa: BLE001 - a sync call's metadata may be unavailable
        return ()


_REMOTE: dict[type[PipeguardError], type] = {
    cls: type(cls.__name__, (cls, RemoteError), {"__module__": __name__, "__qualname__": f"Remote{cls.__name__}",
                                                   "__doc__": f"{cls.__name__}, answered by a peer over gRPC."})
    for cls in (PipeguardError, *_BY_CODE.values())
}


def from_rpc_error(err: grpc.RpcError) -> PipeguardError:
    """The typed exception for a gRPC error a client saw (also a ``grpc.aio.AioRpcError``, see
    ``RemoteError``); an error that is typed already is returned as it is."""
    if isinstance(err, PipeguardError):
        return err
    status = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    return _REMOTE[_BY_CODE.get(status, PipeguardError)](err)


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
            status = grpc.StatusCode[exc.code.name]  # a plain StatusCode, also for a RemoteError
            log.warning("%s rejected: %s: %s", method.__name__, status.name, exc)
            await context.abort(status, str(exc))
        except grpc.aio.AbortError:
            raise
        except Exception:  # noqa: BLE001 - the boundary: never let a handler kill the daemon
            log.exception("%s failed", method.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, f"{method.__name__}: internal error")

    return wrapper  # type: ignore[return-value]
