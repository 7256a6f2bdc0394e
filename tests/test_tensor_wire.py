"""The fast tensor path is the same wire format: pre-serialised chunks and pool-hashed receives."""

from __future__ import annotations

import asyncio

import pytest
import torch

from pipeguard.errors import DataLoss
from pipeguard.identity import Identity
from pipeguard.tensors import OFFLOAD_BYTES, TensorSender, make_header, receive_tensor, tensor_digest
from pipeguard.v1 import pipeguard_pb2 as pb

pytestmark = pytest.mark.unit

SENDER = Identity.generate()


def _sender(t: torch.Tensor, chunk_bytes: int) -> TensorSender:
    header = make_header(run_id="run", step=2, micro_batch=1, stage=0, direction=pb.DIRECTION_FORWARD,
                         sender=SENDER.node_id, receiver="next", tensor=t)
    return TensorSender(header, t, SENDER, chunk_bytes)


async def _collect(sender: TensorSender) -> list[bytes]:
    return [m async for m in sender.wire_chunks()]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64])
@pytest.mark.parametrize(
    "numel, chunk_bytes",
    [
        (0, 1024),                          # empty: one chunk with header and signature only
        (1, 1024),                          # one chunk
        (1000, 999),                        # chunk boundaries split elements
        (OFFLOAD_BYTES // 2, OFFLOAD_BYTES),  # pieces hashed on the worker pool
        (300_000, OFFLOAD_BYTES + 7),       # pool, short last piece hashed inline
    ],
)
def test_wire_chunks_are_the_serialised_chunks(dtype, numel, chunk_bytes):
    t = torch.arange(numel).to(dtype)
    reference = _sender(t, chunk_bytes)
    expected = [c.SerializeToString() for c in reference.chunks()]
    fast = _sender(t, chunk_bytes)
    assert asyncio.run(_collect(fast)) == expected
    assert fast.commitment == reference.commitment


async def _parsed(messages: list[bytes]):
    for m in messages:
        yield pb.TensorChunk.FromString(m)


def test_large_tensor_round_trip_through_the_pool():
    t = torch.randn(3, OFFLOAD_BYTES // 4 + 5)  # three chunks of OFFLOAD_BYTES and a short one
    sender = _sender(t, OFFLOAD_BYTES)
    messages = asyncio.run(_collect(sender))
    assert len(messages) == 4
    rt = asyncio.run(receive_tensor(_parsed(messages), max_tensor_bytes=1 << 30, admit=lambda h: SENDER.public()))
    assert torch.equal(rt.tensor, t) and rt.tensor.dtype == t.dtype
    assert rt.commitment == sender.commitment
    assert rt.commitment.payload_digest == tensor_digest(t)


def test_flipped_byte_in_a_pooled_chunk_is_caught():
    t = torch.randn(2, OFFLOAD_BYTES // 4)
    chunks = list(_sender(t, OFFLOAD_BYTES).chunks())
    chunks[0].data = bytes([chunks[0].data[0] ^ 1]) + chunks[0].data[1:]
    messages = [c.SerializeToString() for c in chunks]
    with pytest.raises(DataLoss, match="do not match the signed digest"):
        asyncio.run(receive_tensor(_parsed(messages), max_tensor_bytes=1 << 30, admit=lambda h: SENDER.public()))
