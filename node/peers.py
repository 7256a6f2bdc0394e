"""Outgoing tensor traffic: one channel per peer, signed chunk streams, bounded per peer, retries."""

from __future__ import annotations

import asyncio
import logging
from typing import Callable

import grpc
import torch

from pipeguard.config import NetConfig, TimeoutConfig
from pipeguard.errors import AlreadyExists, PipeguardError
from pipeguard.identity import Identity
from pipeguard.rpc import backoff, channel, is_busy, is_retryable
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
        self._sending: dict[str, asyncio.Semaphore] = {}
        self.sent = 0
        self.sent_bytes = 0

    def stub(self, address: str) -> pb_grpc.NodeStub:
        return self._entry(address)[1]

    def _push_call(self, address: str) -> grpc.aio.StreamUnaryMultiCallable:
        """PushTensor taking serialised ``TensorChunk`` bytes (``TensorSender.wire_chunks``)."""
        return self._entry(address)[2]

    def _entry(self, address: str):
        if address not in self._stubs:
            ch = channel(address, self.net, self.timeouts)
            push = ch.stream_unary(PUSH_TENSOR, request_serializer=None, response_deserializer=pb.PushReply.FromString)
            self._stubs[address] = (ch, pb_grpc.NodeStub(ch), push)
        return self._stubs[address]

    def _slots(self, address: str) -> asyncio.Semaphore:
        """Streams this node may have open to ``address`` at once (``net.peer_stream_slots``)."""
        if address not in self._sending:
            self._sending[address] = asyncio.Semaphore(self.net.stream_slots_per_peer)
        return self._sending[address]

    async def push(self, address: str, header: pb.TensorHeader, tensor: torch.Tensor, *,
                   rewrite: Callable[[list[pb.TensorChunk]], list[pb.TensorChunk]] | None = None,
                   ) -> pb.TensorCommitment:
        """Stream ``tensor`` to ``address``, signed; retry while the peer is unreachable or busy.

        Returns the signed commitment (kept by the caller for audits). Chunks are hashed as
        they are sent (the next one on a worker thread while this one is written); Ed25519
        signatures are deterministic, so a retry re-sends exactly the same signed claim, never
        a second, different one. That is also why ALREADY_EXISTS after an attempt that failed in
        transit counts as delivered: the receiver got that attempt's bytes, only its reply was
        lost, and it refuses the identical copy as a replay. A receiver that is busy (too many
        streams at once, see ``rpc.BUSY``) is retried for up to ``timeouts.step``; an unreachable
        one ``timeouts.retries`` times. Every attempt has the
        ``timeouts.request`` deadline plus the tensor's transfer time at ``timeouts.link_mbit``.

        ``rewrite`` (experiments only: node/seams.py passes a behaviour's ``on_send``) gets the signed chunk
        stream and returns the one actually pushed; the honest commitment is still returned.
        """
        sender = TensorSender(header, tensor, self.identity, self.net.chunk_bytes)
        wire = None
        if rewrite is not None:
            wire = [c.SerializeToString() for c in rewrite(list(sender.chunks()))]

        async def rewritten():
            for piece in wire:
                yield piece

        loop = asyncio.get_running_loop()
        deadline = self.timeouts.request + self.timeouts.transfer(len(sender.payload))
        give_up = loop.time() + self.timeouts.step
        delays = backoff(self.timeouts)
        failures = 0
        maybe_delivered = False
        while True:
            try:
                async with self._slots(address):
                    chunks = sender.wire_chunks() if wire is None else rewritten()
                    await self._push_call(address)(chunks, timeout=deadline)
                break
            except AlreadyExists as exc:
                if not maybe_delivered:
                    raise
                log.debug("push to %s: an earlier attempt was delivered (%s)", address, exc.details())
                break
            except PipeguardError as exc:
                if not is_retryable(exc):
                    raise
                delay = next(delays)
                if is_busy(exc):
                    if loop.time() + delay > give_up:
                        raise
                else:
                    failures += 1
                    if failures == self.timeouts.retries:
                        raise
                    maybe_delivered = True
                log.debug("push to %s failed (%s); retrying", address, exc.code.name)
            await asyncio.sleep(delay)
        self.sent += 1
        self.sent_bytes += len(sender.payload)
        assert sender.commitment is not None
        return sender.commitment

    async def close(self) -> None:
        for ch, *_ in self._stubs.values():
            await ch.close()
        self._stubs.clear()
