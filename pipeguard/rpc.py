"""gRPC plumbing both daemons share: servers, channels, TLS, deadlines, retries, health, logging.

Every server and channel of pipeguard is made here (``start_server``, ``channel``,
``blocking_channel``), so TLS (``net.tls_*``) applies to all of them or none.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import os
import random
from pathlib import Path
from typing import Awaitable, Callable, TypeVar

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from pipeguard.config import ConfigError, NetConfig, TimeoutConfig, parse_hostport
from pipeguard.errors import InvalidArgument, PipeguardError, Unavailable, from_rpc_error

log = logging.getLogger(__name__)
T = TypeVar("T")

# Codes worth retrying: the peer may come back. Everything else is an answer; in particular
# RESOURCE_EXHAUSTED (a size over a limit) would be refused again, byte for byte.
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
BUSY = ("pipeguard-busy", "1")
"""Trailing metadata a server adds to RESOURCE_EXHAUSTED when the refusal is momentary (too many
streams at once) rather than about the message: the caller may retry after a backoff."""


def is_busy(err: grpc.aio.AioRpcError) -> bool:
    """True for a RESOURCE_EXHAUSTED that the server marked momentary with ``BUSY``."""
    if err.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
        return False
    return any((key, value) == BUSY for key, value in (err.trailing_metadata() or ()))


def install_event_loop_policy() -> None:
    """Use uvloop when it is installed; the standard loop otherwise."""
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def setup_logging(level: str, prefix: str) -> None:
    """Configure the root logger once, with the daemon's identity in every line."""
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format=f"%(asctime)s %(levelname)-7s [{prefix}] %(name)s: %(message)s",
        force=True,
    )


def set_log_prefix(prefix: str) -> None:
    for handler in logging.getLogger().handlers:
        fmt = f"%(asctime)s %(levelname)-7s [{prefix}] %(name)s: %(message)s"
        handler.setFormatter(logging.Formatter(fmt))


class RejectMalformed(grpc.aio.ServerInterceptor):
    """Answer a request whose bytes do not parse as its message with INVALID_ARGUMENT.

    grpc parses requests before the servicer runs and answers a parse failure with UNKNOWN;
    this interceptor takes the parsing over so that malformed input gets a precise status, is
    logged, and (for a stream) the handler's own error path runs. Every server of pipeguard
    installs it (``start_server``).
    """

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        parse, method = handler.request_deserializer, handler_call_details.method

        def parsed(raw: bytes):
            try:
                return parse(raw)
            except DecodeError as exc:
                log.warning("%s rejected: INVALID_ARGUMENT: malformed request (%s)", method, exc)
                raise InvalidArgument(f"{method}: malformed request: {exc}") from None

        if handler.request_streaming:
            inner = handler.stream_unary or handler.stream_stream

            async def requests(raw_iterator):
                async for raw in raw_iterator:
                    yield parsed(raw)

            async def stream_behaviour(raw_iterator, context):
                # A handler decorated with errors.abort_on_error answers the InvalidArgument a
                # malformed chunk raises itself (and charges it to the sender); any other gets it here.
                try:
                    return await inner(requests(raw_iterator), context)
                except InvalidArgument as exc:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

            kind = "stream_unary" if handler.stream_unary else "stream_stream"
            return handler._replace(request_deserializer=None, **{kind: stream_behaviour})

        inner = handler.unary_unary or handler.unary_stream
        kind = "unary_unary" if handler.unary_unary else "unary_stream"

        async def decode(raw: bytes, context):
            try:
                return parsed(raw)
            except InvalidArgument as exc:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

        if inspect.isasyncgenfunction(inner):
            async def gen_behaviour(raw, context):
                request = await decode(raw, context)
                async for item in inner(request, context):
                    yield item

            return handler._replace(request_deserializer=None, **{kind: gen_behaviour})

        async def behaviour(raw, context):
            return await inner(await decode(raw, context), context)

        return handler._replace(request_deserializer=None, **{kind: behaviour})


class FinishReading(grpc.aio.ServerInterceptor):
    """Read what a client is still streaming before answering its client-streaming call.

    A server that answers (refuses, or accepts early) before the client has half-closed resets
    the stream, and a client write that races the reset makes grpc.aio replace the server's
    status with INTERNAL "Internal error from Core" (grpc/grpc#36066): a push refused with
    INVALID_ARGUMENT after its first chunk reached its sender as INTERNAL now and then, more
    often the longer the stream. So every request-streaming handler answers only after the rest
    of the request stream is read and discarded: before ``context.abort`` and before a reply. The
    drain is bounded by ``net.drain_bytes`` and ``timeouts.drain``; a client that sends more or
    longer gets its answer at once (and may see it as INTERNAL). Every server installs it, outside
    ``RejectMalformed`` so that it counts and drops raw bytes without parsing them.
    """

    def __init__(self, max_bytes: int, timeout: float):
        self.max_bytes = max_bytes
        self.timeout = timeout

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.stream_unary is None:  # pipeguard has no stream-stream RPC
            return handler
        inner, method = handler.stream_unary, handler_call_details.method

        async def behaviour(request_iterator, context):
            reader = _DrainableStream(request_iterator)
            drained = _DrainFirstContext(context, lambda: reader.drain(self.max_bytes, self.timeout, method))
            try:
                reply = await inner(reader, drained)
            except grpc.aio.AbortError:  # abort() drained already
                raise
            except BaseException:
                await reader.drain(self.max_bytes, self.timeout, method)
                raise
            await reader.drain(self.max_bytes, self.timeout, method)
            return reply

        return handler._replace(stream_unary=behaviour)


class _DrainableStream:
    """A request iterator that remembers whether it reached its end, and can read the rest."""

    def __init__(self, stream):
        self._it = stream.__aiter__()
        self.ended = False

    def __aiter__(self):
        return self

    async def __anext__(self):
        try:
            return await self._it.__anext__()
        except StopAsyncIteration:
            self.ended = True
            raise

    async def drain(self, max_bytes: int, timeout: float, method: str) -> None:
        if self.ended:
            return
        read = 0

        async def rest() -> None:
            nonlocal read
            async for message in self:
                read += len(message) if isinstance(message, (bytes, bytearray)) else message.ByteSize()
                if read > max_bytes:
                    return

        try:
            await asyncio.wait_for(rest(), timeout)
        except asyncio.TimeoutError:
            pass
        except Exception as exc:  # noqa: BLE001 - the stream broke while draining: answer anyway
            log.debug("%s: draining the request stream failed: %r", method, exc)
        if not self.ended:
            log.debug("%s: answering before the client finished its stream (%d bytes drained)", method, read)


class _DrainFirstContext:
    """A servicer context whose ``abort`` first reads the rest of the request stream."""

    def __init__(self, context, drain):
        self._context = context
        self._drain = drain

    def __getattr__(self, name):
        return getattr(self._context, name)

    async def abort(self, code, details="", trailing_metadata=()):
        await self._drain()
        await self._context.abort(code, details, trailing_metadata)


def server_options(net: NetConfig, timeouts: TimeoutConfig | None = None) -> dict:
    """Keyword arguments for ``grpc.aio.server``: explicit message limits, ``FinishReading`` and
    ``RejectMalformed``."""
    drain = (timeouts or TimeoutConfig()).drain
    return {"options": net.grpc_options(), "interceptors": [FinishReading(net.drain_bytes, drain), RejectMalformed()]}


async def start_server(net: NetConfig, register: Callable[[grpc.aio.Server], None], service_names: list[str],
                       timeouts: TimeoutConfig | None = None) -> tuple[grpc.aio.Server, str, health.aio.HealthServicer]:
    """Start a grpc.aio server with explicit message limits and the health service.

    Returns the server, the address to advertise (``net.advertise`` or the bound address)
    and the health servicer (set to SERVING for every name in ``service_names``).
    """
    server = grpc.aio.server(**server_options(net, timeouts))
    register(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    host, port = parse_hostport(net.bind, "net.bind")
    bind = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    creds = server_credentials(net)
    bound = server.add_secure_port(bind, creds) if creds is not None else server.add_insecure_port(bind)
    if bound == 0:
        raise Unavailable(f"cannot bind {net.bind}")
    if creds is not None:
        log.info("serving gRPC over TLS%s", " (client certificates required)" if net.tls_require_client_cert else "")
    await server.start()
    advertise = net.advertise or (f"{host}:{bound}" if host not in ("0.0.0.0", "::") else f"127.0.0.1:{bound}")
    for name in ["", *service_names]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, advertise, health_servicer


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).expanduser().read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def server_credentials(net: NetConfig) -> grpc.ServerCredentials | None:
    """TLS credentials for this daemon's server, or None to serve plaintext (no tls_cert)."""
    if not net.tls_cert:
        return None
    pair = (_read(net.tls_key, "net.tls_key"), _read(net.tls_cert, "net.tls_cert"))
    ca = _read(net.tls_ca, "net.tls_ca") if net.tls_ca else None
    return grpc.ssl_server_credentials([pair], root_certificates=ca, require_client_auth=net.tls_require_client_cert)


def channel_credentials(net: NetConfig) -> grpc.ChannelCredentials | None:
    """TLS credentials for outgoing calls (server checked against tls_ca, or the system roots; our own
    certificate offered for mutual TLS), or None for plaintext."""
    if not net.tls:
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=_read(net.tls_ca, "net.tls_ca") if net.tls_ca else None,
        private_key=_read(net.tls_key, "net.tls_key") if net.tls_key else None,
        certificate_chain=_read(net.tls_cert, "net.tls_cert") if net.tls_cert else None,
    )


def channel(address: str, net: NetConfig, timeouts: TimeoutConfig | None = None) -> grpc.aio.Channel:
    """An asyncio channel to ``address``: TLS when ``net`` configures it, with explicit message limits.

    With ``timeouts``, the channel's own reconnect backoff follows ``retry_backoff`` up to
    ``retry_max`` (gRPC's default grows to 120 s, so a peer that was down for a while would be
    noticed back only minutes after it returned).
    """
    options = net.grpc_options()
    if timeouts is not None:
        options += [("grpc.initial_reconnect_backoff_ms", int(timeouts.retry_backoff * 1000)),
                    ("grpc.min_reconnect_backoff_ms", int(timeouts.retry_backoff * 1000)),
                    ("grpc.max_reconnect_backoff_ms", int(timeouts.retry_max * 1000))]
    creds = channel_credentials(net)
    if creds is None:
        return grpc.aio.insecure_channel(address, options=options)
    return grpc.aio.secure_channel(address, creds, options=options)


def blocking_channel(address: str, net: NetConfig) -> grpc.Channel:
    """The same as ``channel`` for synchronous callers (the CLI, test and script helpers)."""
    creds = channel_credentials(net)
    if creds is None:
        return grpc.insecure_channel(address, options=net.grpc_options())
    return grpc.secure_channel(address, creds, options=net.grpc_options())


async def call_with_retry(fn: Callable[[], Awaitable[T]], timeouts: TimeoutConfig, what: str,
                          attempts: int = 5) -> T:
    """Await ``fn()``; retry transient failures with jittered exponential backoff.

    gRPC errors come back as pipeguard's typed exceptions.
    """
    delay = timeouts.retry_backoff
    for attempt in range(1, attempts + 1):
        try:
            return await fn()
        except grpc.aio.AioRpcError as err:
            if not (err.code() in RETRYABLE or is_busy(err)) or attempt == attempts:
                raise from_rpc_error(err) from None
            log.debug("%s failed (%s), retry %d in %.2fs", what, err.code().name, attempt, delay)
        await asyncio.sleep(delay * (0.5 + random.random()))
        delay = min(delay * 2, timeouts.retry_max)
    raise PipeguardError(f"{what}: unreachable")  # pragma: no cover


def write_ready_file(path: str, **info: object) -> None:
    """Atomically write ``info`` as JSON: tests and scripts learn the bound address from it."""
    if not path:
        return
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text(json.dumps(info))
    os.replace(tmp, p)
