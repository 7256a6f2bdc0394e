"""The node's side of the coordinator relationship, in-process: whom it trusts, what it acts on.

A scripted coordinator answers heartbeats; the node must act (ban list, members, role) only on
a reply the coordinator it registered with signed, for the heartbeat it just sent. Real
coordinators (tests/test_coordinator_service.py's bed) with different keys check that the node
remembers the first coordinator key it registered with and refuses any other.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import stat
from pathlib import Path

import grpc
import pytest
import torch

from node.membership import Membership
from pipeguard.config import NetConfig, TimeoutConfig
from pipeguard.errors import Unauthenticated
from pipeguard.identity import Identity
from pipeguard.signing import sign
from pipeguard.v1 import pipeguard_pb2 as pb
from pipeguard.v1 import pipeguard_pb2_grpc as pb_grpc
from tests.test_coordinator_service import coordinator_bed

pytestmark = [pytest.mark.grpc, pytest.mark.timeout(60)]

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


# -- trust on first use of the coordinator's key -------------------------------------------------


def _member(bed, home: Path, pinned: str = "") -> Membership:
    member = Membership(Identity.load_or_create(home / "node.key"), bed.address, pinned, home, NET, TIMEOUTS,
                        stats=lambda: pb.HeartbeatRequest())
    member.address = "127.0.0.1:7101"
    return member


def test_first_coordinator_key_is_remembered_and_another_refused(tmp_path):
    async def scenario():
        home = tmp_path / "node"
        key_file = home / "coordinator.pub"
        async with coordinator_bed(tmp_path / "first") as first:
            member = _member(first, home)
            await member.register()
            await member.close()
            assert key_file.read_text().strip() == first.coord.public_key.hex()
            build = first.registry.nodes[member.identity.node_id].build
            assert (build.torch_version, build.device, build.threads) == (torch.__version__, "cpu",
                                                                          torch.get_num_threads())
            assert stat.S_IMODE(key_file.stat().st_mode) == 0o600

            again = _member(first, home)  # the node restarted: the same coordinator is still trusted
            await again.register()
            await again.close()

        async with coordinator_bed(tmp_path / "impostor") as impostor:
            member = _member(impostor, home)
            with pytest.raises(Unauthenticated) as err:
                await member.register()
            await member.close()
            message = str(err.value)
            assert impostor.coord.public_key.hex() in message and first.coord.public_key.hex() in message
            assert str(key_file) in message and "--coordinator-key" in message, "the error says how to fix it"
            assert not member.registered.is_set() and member.coordinator_key is None
            assert impostor.registry.nodes == {}, "the node never registered with the other key"
            assert key_file.read_text().strip() == first.coord.public_key.hex()

    asyncio.run(scenario())


def test_a_pinned_key_overrides_the_remembered_one(tmp_path):
    async def scenario():
        home = tmp_path / "node"
        async with coordinator_bed(tmp_path / "old") as old:
            member = _member(old, home)
            await member.register()
            await member.close()
        async with coordinator_bed(tmp_path / "new") as new:
            member = _member(new, home, pinned=new.coord.public_key.hex())
            await member.register()
            await member.close()
            assert member.coordinator_key == new.coord.public()
            assert (home / "coordinator.pub").read_text().strip() == new.coord.public_key.hex()
            unpinned = _member(new, home)  # the pin is remembered: dropping it later keeps trusting this key
            await unpinned.register()
            await unpinned.close()
            # and a pin refuses every other key, whatever the file says
            stranger = Identity.generate().public_key.hex()
            pinned_elsewhere = _member(new, home, pinned=stranger)
            with pytest.raises(Unauthenticated, match="pinned key"):
                await pinned_elsewhere.register()
            await pinned_elsewhere.close()

    asyncio.run(scenario())


def test_a_refused_coordinator_key_is_logged_with_the_fix(tmp_path, caplog):
    async def scenario():
        home = tmp_path / "node"
        home.mkdir()
        (home / "coordinator.pub").write_text(Identity.generate().public_key.hex() + "\n")
        (home / "coordinator.pub").chmod(0o600)
        async with coordinator_bed(tmp_path / "coordinator") as bed:
            member = _member(bed, home)
            task = asyncio.create_task(member.run())
            deadline = asyncio.get_running_loop().time() + DEADLINE
            while not any("UNAUTHENTICATED" in r.getMessage() for r in caplog.records):
                assert asyncio.get_running_loop().time() < deadline, "the refusal was never logged"
                await asyncio.sleep(0.02)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await member.close()
            record = next(r for r in caplog.records if "UNAUTHENTICATED" in r.getMessage())
            assert record.levelname == "ERROR" and "delete" in record.getMessage()
            assert bed.registry.nodes == {}

    with caplog.at_level(logging.INFO, logger="node.membership"):
        asyncio.run(scenario())


def test_the_member_list_is_kept_between_replies_that_leave_it_out_and_replaced_on_change(tmp_path):
    async def scenario():
        async with coordinator_bed(tmp_path / "coord") as bed:
            a, b, c = (_member(bed, tmp_path / name) for name in "abc")
            for m in (a, b):
                await m.register()
            await a.heartbeat()
            assert set(a.members) == {a.identity.node_id, b.identity.node_id} and a.members_version
            version = a.members_version
            await a.heartbeat()  # the reply leaves the unchanged list out; the node keeps its copy
            assert set(a.members) == {a.identity.node_id, b.identity.node_id} and a.members_version == version

            await c.register()
            await a.heartbeat()
            assert set(a.members) == {m.identity.node_id for m in (a, b, c)} and a.members_version != version
            bed.registry.ban(bed.registry.nodes[b.identity.node_id], "test")
            await a.heartbeat()
            assert set(a.members) == {a.identity.node_id, c.identity.node_id} and a.banned == {b.identity.node_id}
            for m in (a, b, c):
                await m.close()

    asyncio.run(scenario())
