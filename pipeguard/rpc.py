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


def server_options(net: NetConfig) -> dict:
    """Keyword arguments for ``grpc.aio.server``: explicit message limits and ``RejectMalformed``."""
    return {"options": net.grpc_options(), "interceptors": [RejectMalformed()]}


async def start_server(net: NetConfig, register: Callable[[grpc.aio.Server], None],
                       service_names: list[str]) -> tuple[grpc.aio.Server, str, health.aio.HealthServicer]:
    """Start a grpc.aio server with explicit message limits and the health service.

    Returns the server, the address to advertise (``net.advertise`` or the bound address)
    and the health servicer (set to SERVING for every name in ``service_names``).
    """
    server = grpc.aio.server(**server_options(net))
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
