"""The coordinator's channels to nodes: one per address, calls signed by the coordinator, errors typed
(``rpc.TypedErrors`` on every channel)."""

from __future__ import annotations

import grpc

from pipeguard.config import NetConfig, TimeoutConfig
from pipeguard.identity import Identity
from pipeguard.rpc import channel
from pipeguard.signing import sign
from pipeguard.v1 import pipeguard_pb2_grpc as pb_grpc
from coordinator.registry import NodeRecord


class NodeChannels:
    def __init__(self, identity: Identity, net: NetConfig, timeouts: TimeoutConfig):
        self.identity = identity
        self.net = net
        self.timeouts = timeouts
        self._channels: dict[str, tuple[grpc.aio.Channel, pb_grpc.NodeStub]] = {}

    def stub_for(self, address: str) -> pb_grpc.NodeStub:
        if address not in self._channels:
            ch = channel(address, self.net, self.timeouts)
            self._channels[address] = (ch, pb_grpc.NodeStub(ch))
        return self._channels[address][1]

    async def call(self, rec: NodeRecord, method: str, request, timeout: float):
        """``method`` on ``rec``'s node, ``request`` signed by the coordinator."""
        return await getattr(self.stub_for(rec.address), method)(sign(request, self.identity), timeout=timeout)

    async def stream(self, rec: NodeRecord, method: str, request, timeout: float):
        """The messages of a server-streaming ``method`` on ``rec``'s node, ``request`` signed by the coordinator."""
        async for msg in getattr(self.stub_for(rec.address), method)(sign(request, self.identity), timeout=timeout):
            yield msg

    async def close(self) -> None:
        for ch, _ in self._channels.values():
            await ch.close()
