"""PeerPool.push against a scripted receiver in-process: what is retried, what is an answer,
and how many streams a sender keeps open to one peer.

The receiver verifies every stream like a node does and refuses a second copy of a
(step, direction, micro-batch) as a replay; the script makes it lose replies or refuse.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum

import grpc
import pytest
import torch

from node.peers import PeerPool
from pipeguard.config import NetConfig, TimeoutConfig
from pipeguard.errors import AlreadyExists, ResourceExhausted
from pipeguard.identity import Identity
from pipeguard.rpc import BUSY
from pipeguard.tensors import make_header, receive_tensor
from pipeguard.v1 import pipeguard_pb2 as pb
from pipeguard.v1 import pipeguard_pb2_grpc as pb_grpc

pytestmark = [pytest.mark.grpc, pytest.mark.timeout(60)]

NET = NetConfig(chunk_bytes=1024, max_message_bytes=1 << 20, max_tensor_bytes=1 << 20)
TIMEOUTS = TimeoutConfig(request=10.0, retry_backoff=0.01, retry_max=0.05)


class Answer(enum.Enum):
    OK = "accept and reply"
    LOSE_REPLY = "accept the tensor, then fail the call as if the reply was lost in transit"
    TOO_BIG = "refuse with RESOURCE_EXHAUSTED, as for a size over the limit"
    BUSY = "refuse with RESOURCE_EXHAUSTED marked momentary: too many streams at once"


class Receiver(pb_grpc.NodeServicer):
    def __init__(self, sender: Identity, script: list[Answer], hold: float = 0.0):
        self.sender = sender
        self.script = list(script)
        self.hold = hold
        self.calls = 0
        self.open = self.most_open = 0
        self.kept: dict[tuple[int, int, int], pb.TensorCommitment] = {}

    async def PushTensor(self, request_iterator, context):
        self.calls += 1
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        try:
            return await self._push(request_iterator, context)
        finally:
            self.open -= 1

    async def _push(self, request_iterator, context):
        answer = self.script.pop(0) if self.script else Answer.OK
        if answer is Answer.TOO_BIG:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "tensor exceeds the limit")
        if answer is Answer.BUSY:
            context.set_trailing_metadata((BUSY,))
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many streams in flight")
        await asyncio.sleep(self.hold)
        refused = []

        def admit(h: pb.TensorHeader):
            if (h.step, h.direction, h.micro_batch) in self.kept:
                refused.append(h)
                raise AlreadyExists("replay")
            return self.sender.public()

        try:
            rt = await receive_tensor(request_iterator, max_tensor_bytes=NET.max_tensor_bytes, admit=admit)
        except AlreadyExists:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, "replay: already received")
        h = rt.commitment.header
        self.kept[(h.step, h.direction, h.micro_batch)] = rt.commitment
        if answer is Answer.LOSE_REPLY:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "connection reset")
        return pb.PushReply(received_bytes=rt.tensor.numel() * rt.tensor.element_size())


@contextlib.asynccontextmanager
async def receiver(sender: Identity, script: list[Answer], *, hold: float = 0.0, net: NetConfig = NET,
                   timeouts: TimeoutConfig = TIMEOUTS):
    rx = Receiver(sender, script, hold)
    server = grpc.aio.server(options=NET.grpc_options())
    pb_grpc.add_NodeServicer_to_server(rx, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    pool = PeerPool(sender, net, timeouts)
    try:
        yield rx, pool, f"127.0.0.1:{port}"
    finally:
        await pool.close()
        await server.stop(None)


def _header(sender: Identity, tensor: torch.Tensor, micro_batch: int = 1) -> pb.TensorHeader:
    return make_header(run_id="run", step=3, micro_batch=micro_batch, stage=0, direction=pb.DIRECTION_FORWARD,
                       sender=sender.node_id, receiver="next", tensor=tensor)


def test_retry_after_a_lost_reply_counts_the_first_delivery():
    async def scenario():
        sender, tensor = Identity.generate(), torch.randn(4, 300)  # several chunks
        async with receiver(sender, [Answer.LOSE_REPLY]) as (rx, pool, address):
            commitment = await pool.push(address, _header(sender, tensor), tensor)
            assert rx.calls == 2, "retried once, and the retry was refused as a replay"
            assert list(rx.kept.values()) == [commitment], "the receiver holds exactly what was committed"
            assert pool.sent == 1

    asyncio.run(scenario())


def test_a_replay_refused_on_the_first_attempt_is_still_an_error():
    async def scenario():
        sender, tensor = Identity.generate(), torch.randn(4, 300)
        async with receiver(sender, []) as (rx, pool, address):
            await pool.push(address, _header(sender, tensor), tensor)
            with pytest.raises(AlreadyExists):
                await pool.push(address, _header(sender, tensor), tensor)
            assert rx.calls == 2 and pool.sent == 1

    asyncio.run(scenario())


def test_a_size_refusal_is_an_answer_not_retried():
    async def scenario():
        sender, tensor = Identity.generate(), torch.randn(4, 300)
        async with receiver(sender, [Answer.TOO_BIG] * 5) as (rx, pool, address):
            with pytest.raises(ResourceExhausted):
                await pool.push(address, _header(sender, tensor), tensor)
            assert rx.calls == 1 and pool.sent == 0

    asyncio.run(scenario())


def test_a_busy_receiver_is_retried_until_it_has_room():
    async def scenario():
        sender, tensor = Identity.generate(), torch.randn(4, 300)
        async with receiver(sender, [Answer.BUSY] * 6) as (rx, pool, address):
            commitment = await pool.push(address, _header(sender, tensor), tensor)
            assert rx.calls == 7, "busy refusals do not use up the attempts an unreachable peer gets"
            assert list(rx.kept.values()) == [commitment]

    asyncio.run(scenario())


def test_a_receiver_busy_for_longer_than_a_step_fails_the_push():
    async def scenario():
        sender, tensor = Identity.generate(), torch.randn(4, 300)
        patience = TimeoutConfig(request=10.0, step=0.3, retry_backoff=0.01, retry_max=0.05)
        async with receiver(sender, [Answer.BUSY] * 1000, timeouts=patience) as (rx, pool, address):
            with pytest.raises(ResourceExhausted):
                await pool.push(address, _header(sender, tensor), tensor)
            assert 1 < rx.calls < 1000 and pool.sent == 0

    asyncio.run(scenario())


def test_a_sender_keeps_at_most_half_the_receivers_budget_open_to_it():
    async def scenario():
        sender = Identity.generate()
        net = NetConfig(chunk_bytes=1024, max_message_bytes=1 << 20, max_tensor_bytes=1 << 20, max_inflight_streams=4)
        async with receiver(sender, [], hold=0.05, net=net) as (rx, pool, address):
            tensors = [torch.randn(4, 300) for _ in range(6)]
            await asyncio.gather(*(pool.push(address, _header(sender, t, micro_batch=mb), t)
                                   for mb, t in enumerate(tensors)))
            assert rx.most_open == 2 and len(rx.kept) == 6 and rx.calls == 6

    asyncio.run(scenario())
