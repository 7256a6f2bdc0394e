"""Operator orders: the admin token; ban, unban, stop the run, change the audit rate.

The mutating Coordinator calls carry ``authorization: Bearer <token>`` in their gRPC metadata.
The token lives in ``admin_token_file`` (default ``STATE_DIR/admin.token``), created ``0600``
with a random value on first start; it is compared in constant time. Status and Watch need no
token. Over a plaintext channel anyone on the path can read the token: use TLS (``net.tls_*``)
when the coordinator is reached over a network.

A manual ban goes through ``Convictions.convict``, the same path as a ban after a confirmed audit
(roll back a stage holder's work to the last checkpoint, hand its stage to a standby), only
without an evidence bundle; the reason says it was manual, who ordered it and from where.
"""

from __future__ import annotations

import hmac
import logging
import math
import os
import secrets
import stat
from pathlib import Path

from pipeguard.errors import FailedPrecondition, InvalidArgument, NotFound, Unauthenticated
from pipeguard.identity import KeyFileError
from pipeguard.v1 import pipeguard_pb2 as pb
from coordinator.clock import StepClock
from coordinator.registry import NodeRecord

log = logging.getLogger(__name__)

TOKEN_FILE = "admin.token"
"""Default token file name inside the state directory."""
MIN_TOKEN_CHARS = 16
MIN_PREFIX = 8
"""Shortest node id prefix an order may use (status shows 8 characters)."""


def token_path(admin_token_file: str, state_dir: str) -> Path:
    return Path(admin_token_file or Path(state_dir) / TOKEN_FILE).expanduser()


def load_or_create_token(path: Path) -> str:
    """The admin token in ``path``; a new random one (file created 0600) if there is none."""
    if path.exists():
        mode = path.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise KeyFileError(f"admin token file {path} is accessible by group or others (mode "
                               f"{stat.S_IMODE(mode):o}); run `chmod 600 {path}`")
        token = path.read_text().strip()
        if len(token) < MIN_TOKEN_CHARS:
            raise KeyFileError(f"admin token file {path} holds no usable token (at least {MIN_TOKEN_CHARS} "
                               "characters); delete it to have a new one made at start")
        return token
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, (token + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    log.info("created the admin token in %s (mode 600)", path)
    return token


def read_token(path: str | Path) -> str:
    """A client's side: the token from a file (what ``pipeguard admin --token-file`` reads)."""
    return Path(path).expanduser().read_text().strip()


def caller(context) -> str:
    """Where an order came from: the peer address, and the client certificate's name under mutual TLS."""
    where = context.peer() or "an unknown peer"
    names = (context.auth_context() or {}).get("x509_common_name") or []
    if names:
        where += f", certificate CN={names[0].decode(errors='replace')}"
    return where


class Admin:
    """Checks the admin token and carries out operator orders."""

    def __init__(self, token: str, clock: StepClock):
        if len(token) < MIN_TOKEN_CHARS:
            raise ValueError(f"the admin token must have at least {MIN_TOKEN_CHARS} characters")
        self._token = token.encode()
        self.clock = clock

    def authorize(self, context, operator: str) -> str:
        """Check the bearer token of a call; returns who gave the order, for the events."""
        presented = b""
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                scheme, _, credential = (value if isinstance(value, str) else value.decode()).partition(" ")
                if scheme.lower() == "bearer":
                    presented = credential.strip().encode()
        if not hmac.compare_digest(presented, self._token):
            raise Unauthenticated("this call needs the admin token (metadata `authorization: Bearer <token>`; "
                                  "`pipeguard admin --token-file PATH`)" if not presented else "wrong admin token")
        name = operator.strip()[:100] or "an unnamed operator"
        return f"{name} from {caller(context)}"

    def _reply(self, detail: str, node_id: str = "") -> pb.AdminReply:
        st = self.clock.state
        return pb.AdminReply(detail=detail, node_id=node_id, phase=st.phase, step=st.step)

    def resolve(self, node_id: str) -> NodeRecord:
        """The node whose id is ``node_id`` or starts with it (at least 8 characters, unique)."""
        nodes = self.clock.registry.nodes
        if node_id in nodes:
            return nodes[node_id]
        if len(node_id) < MIN_PREFIX:
            raise InvalidArgument(f"node id {node_id!r}: give the full id or at least its first {MIN_PREFIX} characters")
        found = [r for r in nodes.values() if r.node_id.startswith(node_id)]
        if not found:
            raise NotFound(f"no registered node has an id starting with {node_id!r}")
        if len(found) > 1:
            raise InvalidArgument(f"{node_id!r} matches {len(found)} nodes; give more of the id")
        return found[0]

    def ban(self, node_id: str, reason: str, who: str) -> pb.AdminReply:
        rec = self.resolve(node_id)
        if rec.role == pb.ROLE_BANNED:
            raise FailedPrecondition(f"node {rec.node_id[:8]} is already banned: {rec.ban_reason}")
        self.clock.convictions.convict(rec.node_id, -1, f"manual: {reason.strip() or 'no reason given'} (by {who})")
        return self._reply(f"banned node {rec.node_id}", rec.node_id)

    def unban(self, node_id: str, who: str) -> pb.AdminReply:
        rec = self.resolve(node_id)
        if rec.role != pb.ROLE_BANNED:
            raise FailedPrecondition(f"node {rec.node_id[:8]} is not banned")
        self.clock.registry.unban(rec)  # offline until it heartbeats or registers again
        self.clock.persist()
        self.clock.events.emit("unbanned", f"node {rec.node_id[:8]} unbanned (by {who}); it rejoins as a standby",
                               node_id=rec.node_id, step=self.clock.state.step)
        self.clock.membership_changed.set()
        return self._reply(f"unbanned node {rec.node_id}", rec.node_id)

    async def stop_run(self, who: str) -> pb.AdminReply:
        phase = self.clock.state.phase
        if phase in (pb.RUN_PHASE_FINISHED, pb.RUN_PHASE_FAILED, pb.RUN_PHASE_STOPPED):
            raise FailedPrecondition(f"the run is already {pb.RunPhase.Name(phase).removeprefix('RUN_PHASE_').lower()}")
        if self.clock.stopping:
            raise FailedPrecondition("the run is already stopping")
        saved = await self.clock.stop(who)
        step = self.clock.state.step
        if saved is not None:
            where = f"checkpoint at step {saved}"
        else:
            latest = self.clock.checkpoints.latest(step)
            where = f"no checkpoint at step {step}: a resumed run starts from " + (
                f"the checkpoint at step {latest}" if latest is not None else "the beginning")
        return self._reply(f"run stopped at step {step}, {where}; continue it with `pipeguard-coordinator --resume`")

    def set_audit_rate(self, rate: float, who: str) -> pb.AdminReply:
        if not (math.isfinite(rate) and 0.0 <= rate <= 1.0):
            raise InvalidArgument(f"audit rate must be in [0, 1], got {rate}")
        clock = self.clock
        old = clock.cfg.audit.rate
        clock.cfg.audit.rate = rate  # the scheduler draws with the rate in force
        clock.state.audit_rate = rate
        clock.persist()
        clock.events.emit("audit_rate", f"audit rate {old:g} -> {rate:g} (by {who})", step=clock.state.step)
        return self._reply(f"audit rate {old:g} -> {rate:g}")
