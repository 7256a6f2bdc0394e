"""Slow and dead links: deadlines sized to the link and the tensors, keepalives that drop a dead
connection, and the relay (tests/links.py) that benchmarks/wan.py adds latency with.

The multi-process half (an auditor frozen mid-audit while the run goes on) is the
``auditor-frozen-mid-audit`` fault of tests/test_faults.py.
"""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from coordinator.config import CoordinatorConfig
from pipeguard.config import ConfigError, NetConfig, TimeoutConfig
from pipeguard.errors import DeadlineExceeded, Unavailable
from pipeguard.rpc import channel, default_deadline, server_options
from pipeguard.v1 import pipeguard_pb2 as pb
from tests.conftest import tiny_run
from tests.links import DelayRelay

pytestmark = [pytest.mark.grpc, pytest.mark.timeout(60)]

SERVICE = "test.Links"


def _request(stage: int, compute_seconds: float) -> pb.AuditRequest:
    return pb.AuditRequest(stage=stage, report=pb.StepReport(compute_seconds=compute_seconds))


def test_a_sized_audit_deadline_follows_the_link_the_tensors_and_the_reported_compute():
    slow = tiny_run({"timeouts.link_mbit": 1.0})
    fast = tiny_run({"timeouts.link_mbit": 1000.0})
    req = _request(1, 0.5)
    assert slow.timeouts.audit == fast.timeouts.audit == 0.0  # the default: sized per audit
    assert slow.audit_timeout(req) > fast.audit_timeout(req) > fast.timeouts.request
    # The bytes: a bigger model's audits move more.
    wide = tiny_run({"timeouts.link_mbit": 1.0, "model.n_embd": 128})
    assert wide.audit_bytes(1) > slow.audit_bytes(1) and wide.audit_timeout(req) > slow.audit_timeout(req)
    # The compute: 8 x what the stage reported, never more than the step timeout (a report is the audited
    # node's word), nor less than nothing.
    t = fast.timeouts
    base = fast.audit_timeout(_request(1, 0.0))
    assert fast.audit_timeout(_request(1, 2.0)) == pytest.approx(base + 16.0)
    assert fast.audit_timeout(_request(1, 1e9)) == pytest.approx(base + t.step)
    assert fast.audit_timeout(_request(1, float("nan"))) == pytest.approx(base + t.step)
    assert fast.audit_timeout(_request(1, -5.0)) == pytest.approx(base)
    # Each audit queued before it at the auditor adds its own allowance.
    assert fast.audit_timeout(req, queued=2) == pytest.approx(3 * fast.audit_timeout(req))
    # An explicit timeouts.audit wins.
    assert tiny_run({"timeouts.audit": 42.0}).audit_timeout(req, queued=5) == 42.0


def test_audit_bytes_count_the_stage_state_and_the_step_tensors():
    cfg = CoordinatorConfig()  # tiny: 4 blocks of width 64 over 3 stages
    C, T, V = 64, 64, 256
    block = 12 * C * C + 13 * C
    first = 2 * block + V * C + T * C  # stage 0: two blocks and the embeddings
    tensors = 8 * cfg.train.micro_batches * 4 * cfg.train.micro_batch_size * T * C
    assert cfg.audit_bytes(0) == 2 * 12 * first + tensors
    assert cfg.audit_bytes() == max(cfg.audit_bytes(s) for s in range(3))


def test_keepalive_and_link_settings_are_checked():
    t = TimeoutConfig()
    assert (t.keepalive, t.keepalive_timeout, t.link_mbit) == (10.0, 10.0, 10.0)
    assert t.transfer(10 * 10**6 // 8) == pytest.approx(1.0)
    assert dict(t.keepalive_options())["grpc.keepalive_time_ms"] == 10_000
    with pytest.raises(ConfigError, match="keepalive must be at least 1"):
        TimeoutConfig(keepalive=0.5)
    for bad in ({"keepalive_timeout": 0}, {"link_mbit": 0}, {"audit": -1}):
        with pytest.raises(ConfigError, match="must be positive"):
            TimeoutConfig(**bad)
    # A call made with no deadline of its own: the step timeout while timeouts.audit is 0 (sized by callers).
    assert default_deadline("/pipeguard.v1.Node/Audit", t) == t.step
    assert default_deadline("/pipeguard.v1.Node/Audit", TimeoutConfig(audit=7)) == 7


async def _server(entered: asyncio.Event):
    async def hold(request, context):
        entered.set()
        await asyncio.sleep(30)
        return b""

    async def echo(request, context):
        return request

    server = grpc.aio.server(**server_options(NetConfig(), TimeoutConfig(keepalive=1.0, keepalive_timeout=1.0)))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {
        "Hold": grpc.unary_unary_rpc_method_handler(hold), "Echo": grpc.unary_unary_rpc_method_handler(echo)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


@pytest.mark.parametrize("keepalive", [True, False], ids=["keepalive", "no-keepalive"])
def test_a_call_on_a_link_that_went_dead_fails_fast_and_the_healed_link_serves_the_next(keepalive):
    """A call in flight when its link freezes (no RST, no FIN: the relay stops moving bytes) fails
    with UNAVAILABLE once a keepalive ping goes unanswered, well before its 20 s deadline; without
    keepalives it waits the deadline out. After the link heals the same channel serves a call."""

    async def scenario():
        entered = asyncio.Event()
        server, port = await _server(entered)
        relay = DelayRelay(("127.0.0.1", port), delay=0.0)
        relay_port = await relay.start()
        timeouts = TimeoutConfig(keepalive=1.0, keepalive_timeout=1.0) if keepalive else \
            TimeoutConfig(keepalive=3600.0, keepalive_timeout=3600.0)
        ch = channel(f"127.0.0.1:{relay_port}", NetConfig(), timeouts)
        try:
            assert await ch.unary_unary(f"/{SERVICE}/Echo")(b"hi", timeout=10) == b"hi"
            call = asyncio.ensure_future(ch.unary_unary(f"/{SERVICE}/Hold")(b"", timeout=20 if keepalive else 3))
            await asyncio.wait_for(entered.wait(), 10)
            relay.freeze()
            with pytest.raises(Unavailable if keepalive else DeadlineExceeded):
                await call
            relay.thaw()
            # Healed: the next call goes through (a fresh connection when the keepalive dropped the old one).
            for _ in range(50):
                try:
                    assert await ch.unary_unary(f"/{SERVICE}/Echo")(b"again", timeout=10) == b"again"
                    break
                except Unavailable:
                    await asyncio.sleep(0.2)
            else:
                pytest.fail("the healed link never served a call")
            if keepalive:
                assert relay.connections >= 2, "the dead connection was dropped and a new one made"
        finally:
            await ch.close()
            await relay.close()
            await server.stop(None)

    asyncio.run(scenario())


def test_an_idle_channel_pinging_every_second_is_not_sent_away():
    """Servers permit the keepalive pings of idle channels (no GOAWAY "too_many_pings"): a channel
    pinging every second for several seconds keeps its one connection."""

    async def scenario():
        server, port = await _server(asyncio.Event())
        relay = DelayRelay(("127.0.0.1", port), delay=0.0)
        relay_port = await relay.start()
        ch = channel(f"127.0.0.1:{relay_port}", NetConfig(), TimeoutConfig(keepalive=1.0, keepalive_timeout=2.0))
        try:
            assert await ch.unary_unary(f"/{SERVICE}/Echo")(b"a", timeout=10) == b"a"
            await asyncio.sleep(5.0)  # idle: about five pings
            assert await ch.unary_unary(f"/{SERVICE}/Echo")(b"b", timeout=10) == b"b"
            assert relay.connections == 1
        finally:
            await ch.close()
            await relay.close()
            await server.stop(None)

    asyncio.run(scenario())


def test_the_relay_holds_bytes_its_delay_each_way():
    async def scenario():
        server, port = await _server(asyncio.Event())
        relay = DelayRelay(("127.0.0.1", port), delay=0.1)
        relay_port = await relay.start()
        ch = channel(f"127.0.0.1:{relay_port}", NetConfig(), TimeoutConfig())
        try:
            await ch.unary_unary(f"/{SERVICE}/Echo")(b"warm", timeout=10)
            t0 = time.monotonic()
            assert await ch.unary_unary(f"/{SERVICE}/Echo")(b"x" * 100_000, timeout=10) == b"x" * 100_000
            assert time.monotonic() - t0 >= 0.2  # a lower bound only: request and reply each held 0.1 s
        finally:
            await ch.close()
            await relay.close()
            await server.stop(None)

    asyncio.run(scenario())
