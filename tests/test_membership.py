"""The node's side of the coordinator relationship, in-process: heartbeat replies it may act on.

A scripted coordinator answers heartbeats; the node must act (ban list, members, role) only on
a reply the coordinator it registered with signed, for the heartbeat it just sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
from pathlib import Path

import grpc
import pytest

from node.membership import Membership
from pipeguard.config import NetConfig, TimeoutConfig
from pipeguard.errors import Unauthenticated
from pipeguard.identity import Identity
from pipeguard.signing import sign
from pipeguard.v1 import pipeguard_pb2 as pb
from pipeguard.v1 import pipeguard_pb2_grpc as pb_grpc

pytestmark = pytest.mark.timeout(60)

RUN = "run-membership"
DEADLINE = 10.0
NET = NetConfig(chunk_bytes=16 * 1024, max_message_bytes=1 << 20)
TIMEOUTS = TimeoutConfig(request=DEADLINE, retry_backoff=0.05, retry_max=0.2)


class ReplyFault(enum.Enum):
    UNSIGNED = "reply without a signature"
    SIGNED_BY_ROGUE = "reply signed by a key other than the coordinator's"
    TAMPERED = "ban list changed after the coordinator signed"
    OLD_SEQ = "a genuine reply to an earlier heartbeat, replayed"


class ScriptedCoordinator(pb_grpc.CoordinatorServicer):
    """Answers heartbeats with a ban list, honestly or with ``fault``."""

    def __init__(self, coord: Identity, banned: list[str]):
        self.coord = coord
        self.banned = banned
        self.fault: ReplyFault | None = None
        self.first: pb.HeartbeatReply | None = None

    async def Heartbeat(self, request, context):
        reply = sign(pb.HeartbeatReply(role=pb.ROLE_STANDBY, banned=self.banned, seq=request.seq), self.coord)
        self.first = self.first or reply
        if self.fault is ReplyFault.UNSIGNED:
            reply.ClearField("signature")
        elif self.fault is ReplyFault.SIGNED_BY_ROGUE:
            sign(reply, Identity.generate())
        elif self.fault is ReplyFault.TAMPERED:
            reply.banned.append("f" * 32)
        elif self.fault is ReplyFault.OLD_SEQ:
            reply = self.first
        return reply


@contextlib.asynccontextmanager
async def membership_with(servicer: pb_grpc.CoordinatorServicer, home: Path, pinned: str = ""):
    server = grpc.aio.server(options=NET.grpc_options())
    pb_grpc.add_CoordinatorServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    member = Membership(Identity.generate(), f"127.0.0.1:{port}", pinned, home, NET, TIMEOUTS,
                        stats=lambda: pb.HeartbeatRequest())
    try:
        yield member
    finally:
        await member.close()
        await server.stop(None)


@pytest.mark.parametrize("fault", list(ReplyFault), ids=lambda f: f.name.lower())
def test_heartbeat_reply_not_from_the_coordinator_is_not_acted_on(tmp_path, fault):
    async def scenario():
        coord = Identity.generate()
        coordinator = ScriptedCoordinator(coord, banned=["a" * 32])
        async with membership_with(coordinator, tmp_path) as member:
            member.coordinator_key, member.run_id = coord.public(), RUN
            seen: list[set[str]] = []
            member.on_banned = seen.append
            await member.heartbeat()  # genuine: the ban list is taken
            assert member.banned == {"a" * 32} and seen == [{"a" * 32}]

            coordinator.banned = []  # what a forger would like the node to believe: nobody is banned
            coordinator.fault = fault
            with pytest.raises(Unauthenticated):
                await member.heartbeat()
            assert member.banned == {"a" * 32} and seen == [{"a" * 32}], f"{fault.value} was acted on"

            coordinator.fault = None
            await member.heartbeat()
            assert member.banned == set() and seen == [{"a" * 32}, set()]

    asyncio.run(scenario())
