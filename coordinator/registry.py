"""Who is in the run: identities, addresses, roles, heartbeats, bans."""

from __future__ import annotations

import logging
import os
import secrets
import time
from dataclasses import dataclass, field

from pipeguard.computation import describe_build
from pipeguard.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, PermissionDenied, ResourceExhausted, Unauthenticated
from pipeguard.config import ConfigError, parse_hostport
from pipeguard.identity import PUBLIC_KEY_BYTES, PublicIdentity, node_id_for
from pipeguard import claims
from pipeguard.signing import encode_field
from pipeguard.v1 import pipeguard_pb2 as pb
from coordinator.config import RegistryConfig

log = logging.getLogger(__name__)

MAX_ADDRESS_CHARS = 300
"""Longest address a node may register (a DNS name is at most 253 characters, plus :PORT)."""


@dataclass
class NodeRecord:
    node_id: str
    public_key: bytes
    address: str
    role: int = pb.ROLE_STANDBY
    stage: int = -1
    registered_at: float = field(default_factory=time.time)
    last_heartbeat: float = field(default_factory=time.monotonic)
    heartbeat_seq: int = 0
    tensors_sent: int = 0
    tensors_received: int = 0
    tensors_rejected: int = 0
    ban_reason: str = ""
    build: pb.NodeBuild = field(default_factory=pb.NodeBuild)
    """What it computes with, as it registered (``pipeguard.computation.node_build``)."""

    @property
    def identity(self) -> PublicIdentity:
        return PublicIdentity(self.public_key)

    def peer_info(self) -> pb.PeerInfo:
        return pb.PeerInfo(node_id=self.node_id, address=self.address, public_key=self.public_key)

    def to_json(self) -> dict:
        return {"node_id": self.node_id, "public_key": self.public_key.hex(), "address": self.address,
                "role": self.role, "stage": self.stage, "registered_at": self.registered_at,
                "ban_reason": self.ban_reason,
                "build": {"torch_version": self.build.torch_version, "device": self.build.device,
                          "threads": self.build.threads, "cuda_version": self.build.cuda_version}}

    @classmethod
    def from_json(cls, d: dict) -> "NodeRecord":
        rec = cls(node_id=d["node_id"], public_key=bytes.fromhex(d["public_key"]), address=d["address"],
                  role=d["role"], stage=d["stage"], registered_at=d["registered_at"], ban_reason=d["ban_reason"],
                  build=pb.NodeBuild(**d.get("build", {})))
        if rec.role != pb.ROLE_BANNED:  # nobody is known to be alive until it heartbeats again
            rec.role = pb.ROLE_OFFLINE
        rec.last_heartbeat = 0.0
        return rec


class Registry:
    def __init__(self, heartbeat_timeout: float, challenge_ttl: float, limits: RegistryConfig | None = None,
                 required_build: pb.NodeBuild | None = None):
        self.nodes: dict[str, NodeRecord] = {}
        self.required_build = required_build
        """The only build admitted (exact mode: the coordinator's own), or None for any."""
        self.heartbeat_timeout = heartbeat_timeout
        self.challenge_ttl = challenge_ttl
        self.limits = limits or RegistryConfig()
        self._challenges: dict[bytes, float] = {}
        self._tokens = float(self.limits.registration_burst)
        self._tokens_at = time.monotonic()
        self.rejected_by_peers: dict[str, dict[str, int]] = {}
        """node id -> {reporting peer -> how many of its messages that peer rejected}: only streams the
        node signed the header of, refused for what an honest sender never sends (node/service.py)"""
        self.unattributed_by_peers: dict[str, dict[str, int]] = {}
        """node id -> {reporting peer -> its signed streams that peer refused for what an honest slow
        or retrying sender gets too (stale, replayed, timed out)}: a hint, never a charge"""
        self.members_version = secrets.randbits(62) | 1
        """Version of the member list in heartbeat replies; a random base, so that a restarted
        coordinator never reuses one. Bumped by ``members_changed``."""
        self._members: tuple[list[pb.PeerInfo], bytes, list[str], int] | None = None

    # -- registration --------------------------------------------------------------------------

    def issue_challenge(self) -> bytes:
        now = time.monotonic()
        for c in [c for c, exp in self._challenges.items() if exp < now]:
            del self._challenges[c]
        if len(self._challenges) >= self.limits.max_open_challenges:
            raise ResourceExhausted(f"{len(self._challenges)} registrations in progress (registry.max_open_challenges); "
                                    "retry shortly")
        challenge = os.urandom(32)
        self._challenges[challenge] = now + self.challenge_ttl
        return challenge

    def register(self, req: pb.RegisterRequest) -> tuple[NodeRecord, bool]:
        """Admit a node that signed a fresh challenge. Returns (record, is_new)."""
        if len(req.public_key) != PUBLIC_KEY_BYTES:
            raise InvalidArgument(f"public_key must be {PUBLIC_KEY_BYTES} bytes")
        if len(req.address) > MAX_ADDRESS_CHARS:  # it goes out to every node in every heartbeat reply
            raise InvalidArgument(f"address of {len(req.address)} characters; at most {MAX_ADDRESS_CHARS}")
        try:
            _, port = parse_hostport(req.address, "address")
        except ConfigError as exc:
            raise InvalidArgument(str(exc)) from None
        if port == 0:  # fine to bind, but nobody can reach it
            raise InvalidArgument(f"address must be HOST:PORT with a port in 1-65535, got {req.address!r}")
        expiry = self._challenges.pop(req.challenge, None)
        if expiry is None or expiry < time.monotonic():
            raise Unauthenticated("unknown or expired challenge; call Hello first")
        claims.registration(req)
        node_id = node_id_for(req.public_key)
        rec = self.nodes.get(node_id)
        if rec is not None and rec.role == pb.ROLE_BANNED:
            raise PermissionDenied(f"node {node_id} is banned: {rec.ban_reason}")
        if rec is not None and rec.heartbeat_seq > 0 and self.is_alive(rec):
            # Someone else holds this key (a copied key file) or the node restarted within the
            # heartbeat timeout; either way the live one keeps its place until it falls silent.
            raise AlreadyExists(
                f"node {node_id} is live (last heartbeat {time.monotonic() - rec.last_heartbeat:.1f}s ago); a "
                f"restarted node is admitted once it has been silent for {self.heartbeat_timeout:g}s")
        if self.required_build is not None and req.build != self.required_build:
            raise FailedPrecondition(
                f"this run audits in exact mode (audit.tolerance 0), which compares recomputations bit for bit "
                f"and needs every party on the coordinator's build ({describe_build(self.required_build)}); "
                f"node {node_id[:8]} registered {describe_build(req.build)}. Run it with that torch and "
                f"threads = {self.required_build.threads}, or give the coordinator a tolerance > 0")
        self._take_token()
        is_new = rec is None
        if rec is None:
            self._make_room()
            rec = NodeRecord(node_id=node_id, public_key=req.public_key, address=req.address)
            self.nodes[node_id] = rec
            self.members_changed()
        else:
            if rec.address != req.address:
                rec.address = req.address
                self.members_changed()
            if rec.role in (pb.ROLE_OFFLINE, pb.ROLE_STAGE):
                # A node that registers again has restarted and lost its stage state.
                rec.role, rec.stage = pb.ROLE_STANDBY, -1
        rec.build = pb.NodeBuild()
        rec.build.CopyFrom(req.build)
        rec.last_heartbeat = time.monotonic()
        rec.heartbeat_seq = 0
        return rec, is_new

    def _take_token(self) -> None:
        """Admit one registration under registry.registrations_per_s (burst registration_burst)."""
        now = time.monotonic()
        lim = self.limits
        self._tokens = min(float(lim.registration_burst), self._tokens + (now - self._tokens_at) * lim.registrations_per_s)
        self._tokens_at = now
        if self._tokens < 1.0:
            raise ResourceExhausted(f"more than {lim.registrations_per_s:g} registrations per second "
                                    "(registry.registrations_per_s); retry shortly")
        self._tokens -= 1.0

    def _make_room(self) -> None:
        """Keep at most registry.max_nodes records: displace the longest-silent offline node that
        holds no stage (it registers again if it comes back), or refuse the newcomer."""
        if len(self.nodes) < self.limits.max_nodes:
            return
        idle = [r for r in self.nodes.values()
                if r.role != pb.ROLE_BANNED and r.stage < 0 and not self.is_alive(r)]
        if not idle:
            raise ResourceExhausted(f"the registry holds {len(self.nodes)} nodes (registry.max_nodes), none of "
                                    "them idle; retry later")
        gone = min(idle, key=lambda r: r.last_heartbeat)
        del self.nodes[gone.node_id]
        self.rejected_by_peers.pop(gone.node_id, None)
        self.unattributed_by_peers.pop(gone.node_id, None)
        self.members_changed()
        log.info("registry full (%d nodes): forgot offline node %s to admit a new one", self.limits.max_nodes,
                 gone.node_id[:8])

    # -- liveness ------------------------------------------------------------------------------

    def heartbeat(self, req: pb.HeartbeatRequest) -> NodeRecord:
        rec = self.nodes.get(req.node_id)
        if rec is None:
            raise NotFound(f"node {req.node_id!r} is not registered; register first")
        claims.heartbeat(req, rec.identity)
        if rec.role == pb.ROLE_BANNED:
            raise PermissionDenied(f"node {rec.node_id} is banned: {rec.ban_reason}")
        if req.seq <= rec.heartbeat_seq:
            raise AlreadyExists(f"heartbeat seq {req.seq} replayed (last {rec.heartbeat_seq})")
        rec.heartbeat_seq = req.seq
        rec.last_heartbeat = time.monotonic()
        rec.tensors_sent, rec.tensors_received, rec.tensors_rejected = (
            req.tensors_sent, req.tensors_received, req.tensors_rejected)
        for p in req.peers:
            if p.peer in self.nodes and p.peer != rec.node_id:
                self.rejected_by_peers.setdefault(p.peer, {})[rec.node_id] = p.rejected
                self.unattributed_by_peers.setdefault(p.peer, {})[rec.node_id] = p.unattributed
        if rec.role == pb.ROLE_OFFLINE:
            # Back without re-registering: it kept running (a partition, or our own restart),
            # so it may still hold its stage; ``stage`` stays as a hint for reassignment.
            rec.role = pb.ROLE_STANDBY
        return rec

    def rejected_count(self, node_id: str) -> int:
        return sum(self.rejected_by_peers.get(node_id, {}).values())

    def is_alive(self, rec: NodeRecord) -> bool:
        return rec.role not in (pb.ROLE_BANNED, pb.ROLE_OFFLINE) and (
            time.monotonic() - rec.last_heartbeat) < self.heartbeat_timeout

    def expire(self) -> list[NodeRecord]:
        """Mark nodes silent for longer than the heartbeat timeout offline; returns them."""
        gone = []
        for rec in self.nodes.values():
            if rec.role in (pb.ROLE_STAGE, pb.ROLE_STANDBY) and not self.is_alive(rec):
                rec.role = pb.ROLE_OFFLINE
                gone.append(rec)
        return gone

    def live_standbys(self) -> list[NodeRecord]:
        return sorted((r for r in self.nodes.values() if r.role == pb.ROLE_STANDBY and self.is_alive(r)),
                      key=lambda r: r.registered_at)

    def banned_ids(self) -> list[str]:
        return self.members()[2]

    # -- the member list heartbeat replies carry -----------------------------------------------------

    def ban(self, rec: NodeRecord, reason: str) -> None:
        rec.role, rec.ban_reason = pb.ROLE_BANNED, reason
        self.members_changed()

    def unban(self, rec: NodeRecord) -> None:
        """Offline until it heartbeats (or registers) again; then a standby with no stage."""
        rec.role, rec.stage, rec.ban_reason = pb.ROLE_OFFLINE, -1, ""
        self.members_changed()

    def members_changed(self) -> None:
        """A node joined, changed address, or was banned or unbanned: the next heartbeat replies
        carry the new list (built once, not once per heartbeat)."""
        self.members_version += 1
        self._members = None

    def members(self) -> tuple[list[pb.PeerInfo], bytes, list[str]]:
        """(registered non-banned nodes, their canonical encoding as ``HeartbeatReply.members``
        for ``signing.sign``'s ``preencoded``, sorted banned ids), cached until ``members_changed``."""
        if self._members is None or self._members[3] != len(self.nodes):  # records added behind our back
            if self._members is not None:
                self.members_version += 1
            members = [r.peer_info() for r in self.nodes.values() if r.role != pb.ROLE_BANNED]
            self._members = (members, encode_field(pb.HeartbeatReply, "members", members),
                             sorted(r.node_id for r in self.nodes.values() if r.role == pb.ROLE_BANNED),
                             len(self.nodes))
        return self._members[0], self._members[1], self._members[2]
