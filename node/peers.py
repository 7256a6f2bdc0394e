"""Outgoing tensor traffic: one channel per peer, signed chunk streams, retries."""

from __future__ import annotations

import asyncio
import logging
import random

import grpc
import torch

from pipeguard.config import NetConfig, TimeoutConfig
from pipeguard.errors import from_rpc_error
from pipeguard.identity import Identity
from pipeguard.rpc import RETRYABLE, channel
from pipeguard.tensors import TensorSender
from pipeguard.v1 import pipeguard_pb2 as pb
from pipeguard.v1 import pipeguard_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

PUSH_TENSOR = "/{}/PushTensor".format(pb.DESCRIPTOR.services_by_name["Node"].full_name)
"""The PushTensor method path, for a call that takes chunks already serialised."""


class PeerPool:
    """Channels to other nodes, keyed by address, reused across steps."""

    def __init__(self, identity: Identity, net: NetConfig, timeouts: TimeoutConfig):
        self.identity = identity
        self.net = net
        self.timeouts = timeouts
        self._stubs: dict[str, tuple[grpc.aio.Channel, pb_grpc.NodeStub, grpc.aio.StreamUnaryMultiCallable]] = {}
        self.sent = 0
        self.sent_bytes = 0

    def stub(self, address: str) -> pb_grpc.NodeStub:
        return self._entry(address)[1]

    def _push_call(self, address: str) -> grpc.aio.StreamUnaryMultiCallable:
        """PushTensor taking serialised ``TensorChunk`` bytes (``TensorSender.wire_chunks``)."""
        return self._entry(address)[2]

    def _entry(self, address: str):
        if address not in self._stubs:
            ch = channel(address, self.net)
            push = ch.stream_unary(PUSH_TENSOR, request_serializer=None, response_deserializer=pb.PushReply.FromString)
            self._stubs[address] = (ch, pb_grpc.NodeStub(ch), push)
        return self._stubs[address]

    async def push(self, address: str, header: pb.TensorHeader, tensor: torch.Tensor) -> pb.TensorCommitment:
        """Stream ``tensor`` to ``address``, signed; retry while the peer is unreachable.

        Returns the signed commitment (kept by the caller for audits). Chunks are hashed as
        they are sent (the next one on a worker thread while this one is written); Ed25519
        signatures are deterministic, so a retry re-sends exactly the same signed claim, never
        a second, different one. That is also why ALREADY_EXISTS after an attempt that failed in
        transit counts as delivered: the receiver got that attempt's bytes, only its reply was
        lost, and it refuses the identical copy as a replay.
        """
        sender = TensorSender(header, tensor, self.identity, self.net.chunk_bytes)
        delay = self.timeouts.retry_backoff
        attempts = 5
        maybe_delivered = False
        for attempt in range(1, attempts + 1):
            try:
                await self._push_call(address)(sender.wire_chunks(), timeout=self.timeouts.request)
                break
            except grpc.aio.AioRpcError as err:
                if err.code() == grpc.StatusCode.ALREADY_EXISTS and maybe_delivered:
                    log.debug("push to %s: an earlier attempt was delivered (%s)", address, err.details())
                    break
                if err.code() not in RETRYABLE or attempt == attempts:
                    raise from_rpc_error(err) from None
                maybe_delivered = True
                log.debug("push to %s failed (%s); retry %d", address, err.code().name, attempt)
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay = min(2 * delay, self.timeouts.retry_max)
        self.sent += 1
        self.sent_bytes += len(sender.payload)
        assert sender.commitment is not None
        return sender.commitment

    async def close(self) -> None:
        for ch, *_ in self._stubs.values():
            await ch.close()
        self._stubs.clear()
