"""The node's side of the coordinator relationship: register, heartbeat, fetch the dataset."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Callable

import grpc

from pipeguard import __version__
from pipeguard.config import NetConfig, TimeoutConfig
from pipeguard.data import Dataset
from pipeguard.errors import DataLoss, FailedPrecondition, PermissionDenied, PipeguardError, Unauthenticated, from_rpc_error
from pipeguard.identity import Identity, PublicIdentity, node_id_for
from pipeguard.rpc import channel
from pipeguard.signing import sign, verify
from pipeguard.v1 import pipeguard_pb2 as pb
from pipeguard.v1 import pipeguard_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)


class Membership:
    """Keeps this node registered with the coordinator for as long as the daemon runs."""

    def __init__(self, identity: Identity, coordinator: str, pinned_key: str, home: Path,
                 net: NetConfig, timeouts: TimeoutConfig, stats: Callable[[], pb.HeartbeatRequest]):
        self.identity = identity
        self.coordinator = coordinator
        self.pinned = bytes.fromhex(pinned_key) if pinned_key else None
        self.home = home
        self.net = net
        self.timeouts = timeouts
        self.stats = stats
        self.address = ""
        self.coordinator_key: PublicIdentity | None = None
        self.run_id = ""
        self.registered = asyncio.Event()
        self.banned: set[str] = set()
        self.members: dict[str, PublicIdentity] = {}
        """Registered, non-banned nodes (from the last heartbeat): who may fetch retained data."""
        self.role = pb.ROLE_UNSPECIFIED
        self._seq = 0
        self._channel = channel(coordinator, net)
        self.stub = pb_grpc.CoordinatorStub(self._channel)
        self.on_banned: Callable[[set[str]], None] = lambda banned: None

    async def register(self) -> None:
        nonce = os.urandom(16)
        hello = await self.stub.Hello(pb.HelloRequest(client_nonce=nonce), timeout=self.timeouts.request)
        if hello.client_nonce != nonce:
            raise Unauthenticated("coordinator did not echo our nonce")
        if self.pinned is not None and hello.coordinator_key != self.pinned:
            raise Unauthenticated(
                f"coordinator key {hello.coordinator_key.hex()} does not match the pinned key {self.pinned.hex()}"
            )
        key = PublicIdentity(hello.coordinator_key)
        verify(hello, key, what="coordinator hello")
        req = pb.RegisterRequest(public_key=self.identity.public_key, address=self.address,
                                 challenge=hello.challenge, version=__version__)
        reply = await self.stub.Register(sign(req, self.identity), timeout=self.timeouts.request)
        self.coordinator_key, self.run_id = key, reply.run_id
        self.registered.set()
        log.info("registered with coordinator %s (key %s…) for run %s as %s",
                 self.coordinator, key.public_key.hex()[:16], reply.run_id, reply.node_id)

    async def run(self) -> None:
        """Register, then heartbeat; re-register whenever the coordinator forgets us."""
        delay = self.timeouts.retry_backoff
        while True:
            try:
                if not self.registered.is_set():
                    await self.register()
                    delay = self.timeouts.retry_backoff
                await self.heartbeat()
                await asyncio.sleep(self.timeouts.heartbeat_interval)
            except grpc.aio.AioRpcError as err:
                exc = from_rpc_error(err)
                if err.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAUTHENTICATED):
                    self.registered.clear()
                level = logging.DEBUG if err.code() == grpc.StatusCode.UNAVAILABLE else logging.WARNING
                log.log(level, "coordinator %s: %s (retry in %.1fs)", self.coordinator, exc, delay)
                if isinstance(exc, PermissionDenied):
                    log.error("this node is banned: %s", exc)
                await asyncio.sleep(delay)
                delay = min(2 * delay, self.timeouts.retry_max)
            except PipeguardError as exc:
                log.error("coordinator %s refused: %s (retry in %.1fs)", self.coordinator, exc, delay)
                await asyncio.sleep(delay)
                delay = min(2 * delay, self.timeouts.retry_max)

    async def heartbeat(self) -> None:
        """One heartbeat; the reply is acted on only if the coordinator signed it for this seq."""
        key = self.coordinator_key
        if key is None:
            raise FailedPrecondition("not registered with a coordinator yet")
        self._seq += 1
        req = self.stats()
        req.node_id, req.seq = self.identity.node_id, self._seq
        reply = await self.stub.Heartbeat(sign(req, self.identity), timeout=self.timeouts.request)
        verify(reply, key, what="heartbeat reply")
        if reply.seq != req.seq:
            raise Unauthenticated(f"heartbeat reply is for seq {reply.seq}, not {req.seq} (a replayed reply)")
        self.role = reply.role
        self.members = {m.node_id: PublicIdentity(m.public_key) for m in reply.members
                        if node_id_for(m.public_key) == m.node_id}
        banned = set(reply.banned)
        if banned != self.banned:
            self.banned = banned
            self.on_banned(banned)

    async def dataset(self, digest: bytes) -> Dataset:
        """The run's dataset, from the local cache or fetched from the coordinator and verified."""
        cache = self.home / "data" / f"{digest.hex()}.bin"
        if cache.exists():
            ds = Dataset.load(cache)
            if ds.digest == digest:
                return ds
            log.warning("cached dataset %s is corrupt; fetching again", cache)
        val_offset, parts = 0, []
        async for chunk in self.stub.FetchData(pb.FetchDataRequest(digest=digest), timeout=self.timeouts.step):
            if chunk.total_bytes:
                val_offset = chunk.val_offset
            parts.append(chunk.data)
        ds = Dataset(blob=b"".join(parts), val_offset=val_offset)
        if ds.digest != digest:
            raise DataLoss(f"dataset from coordinator hashes to {ds.digest.hex()[:16]}, expected {digest.hex()[:16]}")
        cache.parent.mkdir(parents=True, exist_ok=True)
        ds.save(cache)
        log.info("fetched dataset %s… (%d bytes)", digest.hex()[:16], len(ds.blob))
        return ds

    async def fetch_checkpoint(self, stage: int, step: int) -> dict:
        """The coordinator's verified checkpoint of ``stage`` at ``step`` (caller checks the digest)."""
        from pipeguard.tensors import StateAssembler

        req = sign(pb.FetchCheckpointRequest(run_id=self.run_id, stage=stage, step=step,
                                             requester=self.identity.node_id), self.identity)
        asm = StateAssembler(self.net.max_tensor_bytes)
        try:
            async for chunk in self.stub.FetchCheckpoint(req, timeout=self.timeouts.step):
                asm.add(chunk)
        except grpc.aio.AioRpcError as err:
            raise from_rpc_error(err) from None
        log.info("fetched checkpoint of stage %d at step %d from the coordinator", stage, step)
        return asm.finish()

    async def close(self) -> None:
        await self._channel.close()
