"""The typed client layer (``rpc.channel``): typed errors for every call arity, deadlines from config."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from pipeguard.config import NetConfig, TimeoutConfig
from pipeguard.errors import DeadlineExceeded, NotFound, PermissionDenied, PipeguardError, RemoteError, from_rpc_error
from pipeguard.rpc import blocking_channel, channel, default_deadline, server_options

pytestmark = [pytest.mark.grpc, pytest.mark.timeout(60)]

SERVICE = "test.Echo"


def _handlers() -> grpc.GenericRpcHandler:
    async def refuse(request, context):
        await context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")

    async def one_then_refuse(request, context):
        yield b"one"
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, "enough")

    async def refuse_stream(request_iterator, context):
        async for _ in request_iterator:
            await context.abort(grpc.StatusCode.NOT_FOUND, "not that one")

    async def slow(request, context):
        await asyncio.sleep(5)
        return b""

    return grpc.method_handlers_generic_handler(SERVICE, {
        "Refuse": grpc.unary_unary_rpc_method_handler(refuse),
        "OneThenRefuse": grpc.unary_stream_rpc_method_handler(one_then_refuse),
        "RefuseStream": grpc.stream_unary_rpc_method_handler(refuse_stream),
        "Slow": grpc.unary_unary_rpc_method_handler(slow),
    })


def test_every_call_arity_raises_the_typed_error_which_is_also_an_aio_rpc_error():
    async def scenario():
        server = grpc.aio.server(**server_options(NetConfig()))
        server.add_generic_rpc_handlers((_handlers(),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        ch = channel(f"127.0.0.1:{port}", NetConfig(), TimeoutConfig(request=0.3))
        try:
            with pytest.raises(NotFound) as err:
                await ch.unary_unary(f"/{SERVICE}/Refuse")(b"")
            assert isinstance(err.value, grpc.aio.AioRpcError) and isinstance(err.value, RemoteError)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND == err.value.code
            assert err.value.code.name == "NOT_FOUND" and err.value.details() == "no such thing"
            assert str(err.value) == "NOT_FOUND: no such thing" and from_rpc_error(err.value) is err.value

            got = []
            with pytest.raises(PermissionDenied):
                async for item in ch.unary_stream(f"/{SERVICE}/OneThenRefuse")(b""):
                    got.append(item)
            assert got == [b"one"]

            with pytest.raises(NotFound, match="not that one"):
                await ch.stream_unary(f"/{SERVICE}/RefuseStream")(iter([b"a", b"b"]))

            with pytest.raises(DeadlineExceeded):  # no timeout given: timeouts.request applies
                await ch.unary_unary(f"/{SERVICE}/Slow")(b"")
            with pytest.raises(grpc.RpcError):  # code written against gRPC's errors still catches them
                await ch.unary_unary(f"/{SERVICE}/Refuse")(b"")
        finally:
            await ch.close()
            await server.stop(None)

    asyncio.run(scenario())


def test_deadlines_come_from_the_config_by_kind_of_call():
    t = TimeoutConfig(request=1, step=2, audit=3)
    assert default_deadline("/pipeguard.v1.Coordinator/Heartbeat", t) == 1
    assert default_deadline("/pipeguard.v1.Node/PushTensor", t) == 1
    assert default_deadline("/pipeguard.v1.Node/RunStep", t) == 2
    assert default_deadline("/pipeguard.v1.Node/FetchState", t) == 2
    assert default_deadline("/pipeguard.v1.Node/Audit", t) == 3
    assert default_deadline("/pipeguard.v1.Coordinator/Watch", t) is None
    assert issubclass(NotFound, PipeguardError)


def test_a_blocking_channel_raises_typed_errors_too():
    async def scenario():
        server = grpc.aio.server(**server_options(NetConfig()))
        server.add_generic_rpc_handlers((_handlers(),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()

        def calls():
            with blocking_channel(f"127.0.0.1:{port}", NetConfig(), TimeoutConfig(request=0.3)) as ch:
                with pytest.raises(NotFound) as err:
                    ch.unary_unary(f"/{SERVICE}/Refuse")(b"")
                assert err.value.code() == grpc.StatusCode.NOT_FOUND and isinstance(err.value, grpc.RpcError)
                got = []
                with pytest.raises(PermissionDenied):
                    for item in ch.unary_stream(f"/{SERVICE}/OneThenRefuse")(b""):
                        got.append(item)
                assert got == [b"one"]
                with pytest.raises(DeadlineExceeded):
                    ch.unary_unary(f"/{SERVICE}/Slow")(b"")

        try:
            await asyncio.get_running_loop().run_in_executor(None, calls)
        finally:
            await server.stop(None)

    asyncio.run(scenario())
