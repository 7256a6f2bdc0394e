"""gRPC plumbing both daemons share: servers, the typed client layer (channels, deadlines, typed errors,
retries), TLS, health, logging.

Every server and channel of pipeguard is made here (``start_server``, ``channel``,
``blocking_channel``), so TLS (``net.tls_*``) applies to all of them or none.
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import inspect
import json
import logging
import os
import random
import signal
from pathlib import Path
from typing import Awaitable, Callable, Iterator

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from pipeguard.config import ConfigError, NetConfig, TimeoutConfig, parse_hostport, server_keepalive_options
from pipeguard.errors import DeadlineExceeded, InvalidArgument, PipeguardError, Unavailable, from_rpc_error

log = logging.getLogger(__name__)

BUSY = ("pipeguard-busy", "1")
"""Trailing metadata a server adds to RESOURCE_EXHAUSTED when the refusal is momentary (too many
streams at once) rather than about the message: the caller may retry after a backoff."""


def is_busy(err: Exception) -> bool:
    """True for a RESOURCE_EXHAUSTED that the server marked momentary with ``BUSY``."""
    if not isinstance(err, grpc.aio.AioRpcError) or err.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
        return False
    return any((key, value) == BUSY for key, value in (err.trailing_metadata() or ()))


def install_event_loop_policy() -> None:
    """Use uvloop when it is installed; the standard loop otherwise."""
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


MALLOC_MMAP_THRESHOLD = 32 * 1024 * 1024
"""Allocations below this come from glibc's heap, not a mapping of their own (glibc's dynamic
threshold reaches the same ceiling, but only after it has unmapped a few)."""
MALLOC_TRIM_THRESHOLD = 256 * 1024 * 1024
"""Free memory glibc keeps at the top of its heap before handing it back to the OS."""


def retain_freed_memory() -> bool:
    """Have glibc (where it is the allocator) keep freed memory for reuse; True if it took the settings.

    Each gRPC message reaches Python as a fresh bytes object (1 MiB per tensor chunk, and the
    sender builds one per chunk too). With glibc's defaults those are freed back to the OS at
    once, so the next ones fault in every page again: ~3800 page faults per 16 MiB received,
    measured here (benchmarks/transport.py), costing about as much as hashing the bytes. Every
    daemon calls this at start (``run_daemon``); it holds at most ``MALLOC_TRIM_THRESHOLD`` of
    free memory per arena."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (macOS, Windows): nothing to tune
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
    return bool(mallopt(m_mmap_threshold, MALLOC_MMAP_THRESHOLD)) and bool(
        mallopt(m_trim_threshold, MALLOC_TRIM_THRESHOLD))


def run_daemon(name: str, serve: Callable[[asyncio.Event], Awaitable[None]]) -> int:
    """Run ``serve(stop)`` on a fresh event loop until it returns; SIGINT/SIGTERM set ``stop``.

    Returns the daemon's exit status: 0, or 1 after logging why it failed (the traceback only at
    DEBUG: a startup failure should read as one plain line)."""
    install_event_loop_policy()
    retain_freed_memory()

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await serve(stop)

    try:
        asyncio.run(run())
    except Exception as exc:  # noqa: BLE001 - report startup failures plainly
        log.error("%s failed: %s", name, exc, exc_info=log.isEnabledFor(logging.DEBUG))
        return 1
    return 0


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


def parses_requests_with(parse: Callable[[bytes], object]):
    """Decorate a servicer method: ``RejectMalformed`` parses its requests with ``parse`` (raw
    bytes in; a ``DecodeError`` for malformed input) instead of the generated deserializer. For
    PushTensor, whose chunks ``pipeguard.tensors.parse_chunk`` reads without copying the payload."""

    def mark(method):
        method.request_parser = parse
        return method

    return mark


class RejectMalformed(grpc.aio.ServerInterceptor):
    """Answer a request whose bytes do not parse as its message with INVALID_ARGUMENT.

    grpc parses requests before the servicer runs and answers a parse failure with UNKNOWN;
    this interceptor takes the parsing over so that malformed input gets a precise status, is
    logged, and (for a stream) the handler's own error path runs. Every server of pipeguard
    installs it (``start_server``). A method marked with ``parses_requests_with`` is parsed
    with its own parser.
    """

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        parse, method = handler.request_deserializer, handler_call_details.method
        behaviour = (handler.stream_unary or handler.stream_stream or handler.unary_unary
                     or handler.unary_stream)
        parse = getattr(behaviour, "request_parser", parse)

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

            async def stream_gen_behaviour(raw_iterator, context):
                # A stream-stream handler written as an async generator (server reflection's).
                try:
                    async for item in inner(requests(raw_iterator), context):
                        yield item
                except InvalidArgument as exc:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

            kind = "stream_unary" if handler.stream_unary else "stream_stream"
            behaviour = stream_gen_behaviour if inspect.isasyncgenfunction(inner) else stream_behaviour
            return handler._replace(request_deserializer=None, **{kind: behaviour})

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
        if handler is None or handler.stream_unary is None:  # stream-stream: only server reflection's
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
    """Keyword arguments for ``grpc.aio.server``: explicit message limits, keepalive pings permitted
    (and sent: ``config.server_keepalive_options``), ``FinishReading`` and ``RejectMalformed``."""
    timeouts = timeouts or TimeoutConfig()
    return {"options": net.grpc_options() + server_keepalive_options(timeouts),
            "interceptors": [FinishReading(net.drain_bytes, timeouts.drain), RejectMalformed()]}


async def start_server(net: NetConfig, register: Callable[[grpc.aio.Server], None], service_names: list[str],
                       timeouts: TimeoutConfig | None = None) -> tuple[grpc.aio.Server, str, health.aio.HealthServicer]:
    """Start a grpc.aio server with explicit message limits, the health service and server reflection.

    Returns the server, the address to advertise (``net.advertise`` or the bound address)
    and the health servicer (set to SERVING for every name in ``service_names``). Reflection
    lists ``service_names``, health and itself, and describes them from the generated code's
    descriptors, so a client needs nothing but the address (``grpcurl -plaintext HOST:PORT list``).
    """
    server = grpc.aio.server(**server_options(net, timeouts))
    register(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    health_name = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
    reflection.enable_server_reflection([*service_names, health_name, reflection.SERVICE_NAME], server)
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


# -- the client layer: every outgoing channel, its deadlines, errors and retries -----------------

STEP_METHODS = frozenset({"Assign", "RunStep", "ApplyUpdate", "FetchState", "FetchTensor", "FetchData",
                          "FetchCheckpoint", "ExportState"})
"""Calls whose default deadline is ``timeouts.step``: they wait for a step's compute or move a
stage's state; ``Audit`` gets ``timeouts.audit`` (callers size it when that is 0), ``Watch`` none
(it streams for as long as the caller listens), every other call ``timeouts.request``."""


def default_deadline(method: str, timeouts: TimeoutConfig) -> float | None:
    """Seconds a call to ``method`` (a full path such as /pipeguard.v1.Node/RunStep) may take when
    its caller passes no ``timeout``."""
    name = method.rsplit("/", 1)[-1]
    if name == "Watch":
        return None
    if name == "Audit":
        return timeouts.audit or timeouts.step
    return timeouts.step if name in STEP_METHODS else timeouts.request


class TypedErrors:
    """The client interceptor on every channel ``channel`` makes: a deadline from the config for a
    call that names none (``default_deadline``), and every failure raised as pipeguard's typed
    exception (``errors.from_rpc_error``: also a ``grpc.aio.AioRpcError``), for unary and
    streamed replies alike. Callers catch ``InvalidArgument``, ``Unavailable``, ... and never map
    gRPC errors themselves.

    grpc.aio files an interceptor under the first call arity it implements, so ``install``
    gives one instance per arity; they share this class's behaviour.
    """

    def __init__(self, timeouts: TimeoutConfig):
        self.timeouts = timeouts

    @staticmethod
    def install(timeouts: TimeoutConfig) -> list["TypedErrors"]:
        """The interceptors to pass to ``grpc.aio.*_channel``: one per call arity."""
        return [kind(timeouts) for kind in (_TypedUnaryUnary, _TypedUnaryStream, _TypedStreamUnary,
                                            _TypedStreamStream)]

    def _details(self, details):
        if details.timeout is not None:
            return details
        method = details.method.decode() if isinstance(details.method, bytes) else details.method
        return _with_timeout(details, default_deadline(method, self.timeouts))


def _with_timeout(details, timeout: float | None):
    """``details`` with ``timeout``: grpc.aio's are a namedtuple, the synchronous API's any object."""
    if hasattr(details, "_replace"):
        return details._replace(timeout=timeout)
    return _BlockingCallDetails(details.method, timeout, details.metadata, details.credentials,
                                getattr(details, "wait_for_ready", None), getattr(details, "compression", None))


class _BlockingCallDetails(
        collections.namedtuple("_BlockingCallDetails", "method timeout metadata credentials wait_for_ready compression"),
        grpc.ClientCallDetails):
    pass


class _TypedUnaryUnary(TypedErrors, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, client_call_details, request):
        call = await continuation(self._details(client_call_details), request)
        try:
            return await call
        except grpc.aio.AioRpcError as err:
            raise from_rpc_error(err) from None


class _TypedUnaryStream(TypedErrors, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, client_call_details, request):
        return _typed_stream(await continuation(self._details(client_call_details), request))


class _TypedStreamUnary(TypedErrors, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return _TypedUnaryReply(await continuation(self._details(client_call_details), request_iterator))


class _TypedStreamStream(TypedErrors, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return _typed_stream(await continuation(self._details(client_call_details), request_iterator))


async def _typed_stream(call):
    try:
        async for reply in call:
            yield reply
    except grpc.aio.AioRpcError as err:
        raise from_rpc_error(err) from None


class _TypedUnaryReply:
    """A stream-unary call whose await raises the typed exception (grpc.aio needs a call object
    back from a stream-unary interceptor); everything else is the call's own."""

    def __init__(self, call):
        self._call = call

    def __getattr__(self, name):
        return getattr(self._call, name)

    def __await__(self):
        try:
            return (yield from self._call.__await__())
        except grpc.aio.AioRpcError as err:
            raise from_rpc_error(err) from None


def channel(address: str, net: NetConfig, timeouts: TimeoutConfig | None = None) -> grpc.aio.Channel:
    """An asyncio channel to ``address``: TLS when ``net`` configures it, explicit message limits,
    and ``TypedErrors`` (deadlines from ``timeouts``, typed exceptions).

    The channel's own reconnect backoff follows ``retry_backoff`` up to ``retry_max`` (gRPC's
    default grows to 120 s, so a peer that was down for a while would be noticed back only minutes
    after it returned), and keepalive pings (``timeouts.keepalive``) drop a connection whose peer
    froze or whose link died, so calls on it fail fast (UNAVAILABLE) and the next one reconnects,
    instead of waiting out their deadlines on a connection that will never answer.
    """
    timeouts = timeouts or TimeoutConfig()
    options = net.grpc_options() + timeouts.keepalive_options() + [
        ("grpc.initial_reconnect_backoff_ms", int(timeouts.retry_backoff * 1000)),
        ("grpc.min_reconnect_backoff_ms", int(timeouts.retry_backoff * 1000)),
        ("grpc.max_reconnect_backoff_ms", int(timeouts.retry_max * 1000))]
    interceptors = TypedErrors.install(timeouts)
    creds = channel_credentials(net)
    if creds is None:
        return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)
    return grpc.aio.secure_channel(address, creds, options=options, interceptors=interceptors)


async def connect(ch: grpc.aio.Channel, address: str, timeouts: TimeoutConfig) -> None:
    """Wait until ``ch`` is ready, at most ``timeouts.connect`` seconds (raises ``Unavailable``)."""
    try:
        await asyncio.wait_for(ch.channel_ready(), timeouts.connect)
    except asyncio.TimeoutError:
        raise Unavailable(f"{address}: no connection within timeouts.connect ({timeouts.connect:g}s)") from None


def blocking_channel(address: str, net: NetConfig, timeouts: TimeoutConfig | None = None) -> grpc.Channel:
    """The same as ``channel`` for synchronous callers (the CLI, test and script helpers): typed
    errors and default deadlines for unary calls and streamed replies (``BlockingTypedErrors``)."""
    timeouts = timeouts or TimeoutConfig()
    options = net.grpc_options() + timeouts.keepalive_options()
    creds = channel_credentials(net)
    if creds is None:
        ch = grpc.insecure_channel(address, options=options)
    else:
        ch = grpc.secure_channel(address, creds, options=options)
    return grpc.intercept_channel(ch, BlockingTypedErrors(timeouts))


class BlockingTypedErrors(TypedErrors, grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """``TypedErrors`` for a synchronous channel (which files one interceptor under every arity it
    implements; pipeguard's synchronous callers make unary calls and read streamed replies)."""

    def intercept_unary_unary(self, continuation, client_call_details, request):
        outcome = continuation(self._details(client_call_details), request)
        err = outcome.exception()
        if isinstance(err, grpc.RpcError):
            raise from_rpc_error(err) from None
        return outcome

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return _BlockingTypedStream(continuation(self._details(client_call_details), request))


class _BlockingTypedStream:
    """A synchronous streamed reply whose iteration raises the typed exception; everything else
    (cancel, code, ...) is the call's own."""

    def __init__(self, call):
        self._call = call

    def __getattr__(self, name):
        return getattr(self._call, name)

    def __iter__(self):
        return self

    def __next__(self):
        try:
            return next(self._call)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None


def backoff(timeouts: TimeoutConfig) -> Iterator[float]:
    """The one retry schedule: jittered delays from ``retry_backoff``, doubling up to ``retry_max``."""
    delay = timeouts.retry_backoff
    while True:
        yield delay * (0.5 + random.random())
        delay = min(2 * delay, timeouts.retry_max)


def is_retryable(err: PipeguardError) -> bool:
    """Whether a failed call may succeed if made again: the peer could not be reached or did not
    answer in time, or refused only momentarily (``BUSY``). Everything else is an answer; in
    particular RESOURCE_EXHAUSTED about a size would be refused again, byte for byte."""
    return isinstance(err, (Unavailable, DeadlineExceeded)) or is_busy(err)


def write_ready_file(path: str, **info: object) -> None:
    """Atomically write ``info`` as JSON: tests and scripts learn the bound address from it."""
    if not path:
        return
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text(json.dumps(info))
    os.replace(tmp, p)
