"""The node's side of the coordinator relationship: register, heartbeat, fetch the dataset."""

from __future__ import annotations

import asyncio
import logging
import os
import time
import stat
from pathlib import Path
from typing import Awaitable, Callable

import torch

from pipeguard import __version__
from pipeguard.computation import node_build
from pipeguard.config import NetConfig, TimeoutConfig
from pipeguard.data import Dataset
from pipeguard.errors import (DataLoss, FailedPrecondition, NotFound, PermissionDenied, PipeguardError, RemoteError,
                              Unauthenticated, Unavailable)
from pipeguard.identity import PUBLIC_KEY_BYTES, Identity, KeyFileError, PublicIdentity, node_id_for, write_private_file
from pipeguard.rpc import backoff, channel, connect
from pipeguard import claims
from pipeguard.signing import sign
from pipeguard.tensors import receive_state
from pipeguard.v1 import pipeguard_pb2 as pb
from pipeguard.v1 import pipeguard_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

KEY_FILE = "coordinator.pub"
"""File in the node's home holding the coordinator key trusted on first use (hex, 0600)."""


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
        self.device = torch.device("cpu")
        """Where this node computes (``NodeConfig.device`` resolved): its class is registered."""
        self.coordinator_key: PublicIdentity | None = None
        self.run_id = ""
        self.registered = asyncio.Event()
        self.banned: set[str] = set()
        self._datasets: dict[bytes, Dataset] = {}
        self.members: dict[str, PublicIdentity] = {}
        """Registered, non-banned nodes (from the last heartbeat): who may fetch retained data."""
        self.members_version = 0
        """The coordinator's version of ``members`` (sent back so that it can leave the list out)."""
        self.role = pb.ROLE_UNSPECIFIED
        self._seq = 0
        self._last_beat = 0.0
        self._beat_lock = asyncio.Lock()  # one heartbeat at a time: sequence numbers stay in order
        self.interval = timeouts.heartbeat_interval
        """Seconds between heartbeats: the coordinator's value once registered."""
        self._channel = channel(coordinator, net, timeouts)
        self.stub = pb_grpc.CoordinatorStub(self._channel)
        self.on_banned: Callable[[set[str]], None] = lambda banned: None
        self.before_heartbeat: Callable[[], Awaitable[None]] | None = None
        """Awaited before each regular heartbeat (experiments: node:silent stops them)."""
        self.member_list: list[pb.PeerInfo] = []
        """The coordinator's last member list as sent (ids, addresses, keys)."""
        self.after_heartbeat: Callable[[list[pb.PeerInfo]], Awaitable[None]] | None = None
        """Awaited after each regular heartbeat with ``member_list`` (experiments: refusal:frame)."""

    @property
    def key_file(self) -> Path:
        """Where the coordinator key trusted on first use is remembered."""
        return Path(self.home).expanduser() / KEY_FILE

    def remembered_key(self) -> bytes | None:
        """The coordinator key remembered from an earlier registration, if any."""
        path = self.key_file
        if not path.exists():
            return None
        mode = path.stat().st_mode
        if mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise KeyFileError(f"{path} is writable by group or others (mode {stat.S_IMODE(mode):o}); "
                               f"run `chmod 600 {path}`")
        try:
            raw = bytes.fromhex(path.read_text().strip())
        except ValueError:
            raw = b""
        if len(raw) != PUBLIC_KEY_BYTES:
            raise KeyFileError(f"{path} does not hold a hex-encoded {PUBLIC_KEY_BYTES}-byte public key; "
                               "delete it to trust the coordinator's key on first use again")
        return raw

    def _remember(self, key: bytes) -> None:
        write_private_file(self.key_file, key.hex() + "\n")

    async def register(self) -> None:
        """Register with the coordinator, trusting only the pinned key, or else the remembered one.

        Without a pin, the first coordinator key this node registers with is remembered in
        ``home/coordinator.pub`` (trust on first use) and any other key is refused afterwards.
        A pin overrides the remembered key (and replaces it once registration succeeds).
        """
        await connect(self._channel, self.coordinator, self.timeouts)
        nonce = os.urandom(16)
        hello = await self.stub.Hello(pb.HelloRequest(client_nonce=nonce))
        key = claims.coordinator_hello(hello, nonce)  # fresh and signed by the key it offers; trusted?
        offered = hello.coordinator_key
        if self.pinned is not None:
            try:
                remembered = self.remembered_key()
            except KeyFileError as exc:  # the pin decides; the file is rewritten below
                log.warning("%s", exc)
                remembered = None
            if offered != self.pinned:
                raise Unauthenticated(
                    f"coordinator key {offered.hex()} does not match the pinned key {self.pinned.hex()}")
        else:
            remembered = self.remembered_key()
            if remembered is not None and offered != remembered:
                raise Unauthenticated(
                    f"the coordinator presents key {offered.hex()}, but this node trusted key {remembered.hex()} "
                    f"on first use (remembered in {self.key_file}); refusing to register. If the coordinator's "
                    f"key changed on purpose, delete {self.key_file} or pin the new key with --coordinator-key "
                    f"{offered.hex()}; otherwise someone else is answering at {self.coordinator}"
                )
        req = pb.RegisterRequest(public_key=self.identity.public_key, address=self.address,
                                 challenge=hello.challenge, version=__version__,
                                 build=node_build(device=self.device))
        reply = await self.stub.Register(sign(req, self.identity))
        if reply.heartbeat_interval_ms:
            self.interval = reply.heartbeat_interval_ms / 1000
        if remembered != offered:
            if self.pinned is None:
                log.info("trusting coordinator key %s on first use; remembered in %s", offered.hex(), self.key_file)
            elif remembered is None:
                log.info("remembering the pinned coordinator key %s in %s", offered.hex(), self.key_file)
            else:
                log.warning("pinned coordinator key %s replaces the remembered key %s in %s", offered.hex(),
                            remembered.hex(), self.key_file)
            self._remember(offered)
        self.coordinator_key, self.run_id = key, reply.run_id
        self.registered.set()
        log.info("registered with coordinator %s (key %s…) for run %s as %s",
                 self.coordinator, key.public_key.hex()[:16], reply.run_id, reply.node_id)

    async def run(self) -> None:
        """Register, then heartbeat; re-register whenever the coordinator forgets us. A failure is
        retried after the next delay of ``rpc.backoff`` (the schedule starts over once registered)."""
        delays = backoff(self.timeouts)
        while True:
            try:
                if not self.registered.is_set():
                    await self.register()
                    delays = backoff(self.timeouts)
                if self.before_heartbeat is not None:
                    await self.before_heartbeat()
                await self.heartbeat()
                if self.after_heartbeat is not None:
                    await self.after_heartbeat(self.member_list)
                await asyncio.sleep(self.interval)
            except PipeguardError as exc:
                delay = next(delays)
                if isinstance(exc, RemoteError) and isinstance(exc, (NotFound, Unauthenticated)):
                    self.registered.clear()  # the coordinator forgot us (a restart): register again
                if isinstance(exc, Unavailable):
                    log.debug("coordinator %s: %s (retry in %.1fs)", self.coordinator, exc, delay)
                elif isinstance(exc, RemoteError):
                    log.warning("coordinator %s: %s (retry in %.1fs)", self.coordinator, exc, delay)
                    if isinstance(exc, PermissionDenied):
                        log.error("this node is banned: %s", exc)
                else:
                    log.error("coordinator %s: %s: %s (retry in %.1fs)", self.coordinator, exc.code.name, exc, delay)
                await asyncio.sleep(delay)

    async def refresh(self) -> None:
        """An extra heartbeat now (at most one at a time), to learn of nodes that just joined."""
        if not self.registered.is_set():
            return
        if time.monotonic() - self._last_beat < 0.05:
            return
        try:
            await self.heartbeat()
        except PipeguardError as exc:
            log.debug("membership refresh failed: %s", exc)

    async def heartbeat(self) -> None:
        async with self._beat_lock:
            await self._heartbeat()

    async def _heartbeat(self) -> None:
        """One heartbeat; the reply is acted on only if the coordinator signed it for this seq."""
        key = self.coordinator_key
        if key is None:
            raise FailedPrecondition("not registered with a coordinator yet")
        self._seq += 1
        req = self.stats()
        req.node_id, req.seq, req.members_version = self.identity.node_id, self._seq, self.members_version
        reply = await self.stub.Heartbeat(sign(req, self.identity))
        claims.heartbeat_reply(reply, key, req.seq)
        self._last_beat = time.monotonic()
        self.role = reply.role
        if reply.members_version == 0 or reply.members_version != req.members_version:
            # A new list (or a coordinator that always sends it); an unchanged one is left out.
            self.members = {m.node_id: PublicIdentity(m.public_key) for m in reply.members
                            if node_id_for(m.public_key) == m.node_id}
            self.member_list = list(reply.members)
            self.members_version = reply.members_version
        banned = set(reply.banned)
        if banned != self.banned:
            self.banned = banned
            self.on_banned(banned)

    async def dataset(self, digest: bytes) -> Dataset:
        """The run's dataset: kept in memory once verified, else from the disk cache, else
        fetched from the coordinator and verified (every audit of a first or last stage asks)."""
        if digest in self._datasets:
            return self._datasets[digest]
        ds = await self._load_dataset(digest)
        self._datasets = {digest: ds}  # one run's dataset at a time
        return ds

    async def _load_dataset(self, digest: bytes) -> Dataset:
        cache = self.home / "data" / f"{digest.hex()}.bin"
        if cache.exists():
            ds = await asyncio.get_running_loop().run_in_executor(None, Dataset.load, cache)
            if ds.digest == digest:
                return ds
            log.warning("cached dataset %s is corrupt; fetching again", cache)
        val_offset, parts = 0, []
        async for chunk in self.stub.FetchData(pb.FetchDataRequest(digest=digest)):
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
        req = sign(pb.FetchCheckpointRequest(run_id=self.run_id, stage=stage, step=step,
                                             requester=self.identity.node_id), self.identity)
        named, _ = await receive_state(self.stub.FetchCheckpoint(req), self.net.max_tensor_bytes,
                                       max_tensors=self.net.max_state_tensors,
                                       max_total_bytes=self.net.state_bytes_limit)
        log.info("fetched checkpoint of stage %d at step %d from the coordinator", stage, step)
        return named

    async def close(self) -> None:
        await self._channel.close()
