"""Operator orders in-process: the admin token, ban, unban, stop, audit rate (real gRPC, port 0)."""

from __future__ import annotations

import asyncio
import enum
import json
import os
import stat
import tomllib

import grpc
import pytest

from coordinator.admin import Admin, load_or_create_token
from pipeguard.identity import Identity, KeyFileError
from pipeguard.v1 import pipeguard_pb2 as pb
from tests.test_coordinator_service import DEADLINE, coordinator_bed

pytestmark = [pytest.mark.grpc, pytest.mark.timeout(60)]

TOKEN = "t0ken-for-tests-0123456789abcdef"
C = grpc.StatusCode


def auth(token: str = TOKEN, scheme: str = "Bearer") -> tuple[tuple[str, str], ...]:
    return (("authorization", f"{scheme} {token}"),)


class Order(enum.Enum):
    BAN = "Ban"
    UNBAN = "Unban"
    STOP_RUN = "StopRun"
    SET_AUDIT_RATE = "SetAuditRate"


def request(order: Order, node_id: str = "") -> object:
    return {
        Order.BAN: pb.BanRequest(node_id=node_id, reason="test"),
        Order.UNBAN: pb.UnbanRequest(node_id=node_id),
        Order.STOP_RUN: pb.StopRunRequest(),
        Order.SET_AUDIT_RATE: pb.SetAuditRateRequest(rate=0.5),
    }[order]


class Credential(enum.Enum):
    NONE = "no authorization metadata"
    WRONG = "a wrong token"
    PREFIX = "the right token cut short"
    WRONG_SCHEME = "the right token as Basic"


def metadata(cred: Credential):
    return {Credential.NONE: (), Credential.WRONG: auth("x" * len(TOKEN)), Credential.PREFIX: auth(TOKEN[:-1]),
            Credential.WRONG_SCHEME: auth(scheme="Basic")}[cred]


@pytest.mark.parametrize("cred", list(Credential), ids=lambda c: c.name)
@pytest.mark.parametrize("order", list(Order), ids=lambda o: o.name)
def test_orders_without_the_right_token_are_unauthenticated_and_change_nothing(tmp_path, order, cred):
    async def scenario():
        async with coordinator_bed(tmp_path) as bed:
            bed.service.admin = Admin(TOKEN, bed.service.clock)
            node = Identity.generate()
            await bed.register(node)
            before = await bed.stub.Status(pb.StatusRequest(), timeout=DEADLINE)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await getattr(bed.stub, order.value)(request(order, node.node_id), timeout=DEADLINE,
                                                     metadata=metadata(cred))
            assert err.value.code() == C.UNAUTHENTICATED
            after = await bed.stub.Status(pb.StatusRequest(), timeout=DEADLINE)  # readable without a token
            assert (after.phase, after.audit_rate, [n.role for n in after.nodes]) == \
                (before.phase, before.audit_rate, [n.role for n in before.nodes])

    asyncio.run(scenario())


def test_manual_ban_takes_the_audit_ban_path_without_evidence_then_unban(tmp_path):
    async def scenario():
        async with coordinator_bed(tmp_path) as bed:
            clock = bed.service.clock
            bed.service.admin = Admin(TOKEN, clock)
            holder, other = Identity.generate(), Identity.generate()
            for i, node in enumerate((holder, other)):
                await bed.register(node, address=f"127.0.0.1:{7101 + i}")
                await bed.heartbeat(node, seq=1)
            rec = bed.registry.nodes[holder.node_id]
            rec.role, rec.stage = pb.ROLE_STAGE, 0
            clock.pipeline.nodes, clock.state.step = [rec], 7

            reply = await bed.stub.Ban(pb.BanRequest(node_id=holder.node_id[:8], reason="serves garbage",
                                                     operator="alice@ops"), timeout=DEADLINE, metadata=auth())
            assert reply.node_id == holder.node_id and reply.step == 7
            # The same consequences as a conviction: banned, the pipeline re-formed from a checkpoint
            # at or before the current step, peers told through heartbeats. No evidence bundle.
            assert rec.role == pb.ROLE_BANNED and clock.pipeline.reform_needed and clock.pipeline.suspect_step == 7
            assert rec.ban_reason.startswith("manual: serves garbage (by alice@ops from ipv4:127.0.0.1:")
            assert clock.state.evidence == []
            status = await bed.stub.Status(pb.StatusRequest(), timeout=DEADLINE)
            ban = [e for e in status.events if e.kind == "banned"][-1]
            assert ban.node_id == holder.node_id and "alice@ops" in ban.message and "evidence" not in ban.message
            assert ban.time > 0 and list(status.evidence) == []
            assert list((await bed.heartbeat(other, seq=2)).banned) == [holder.node_id]
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await bed.heartbeat(holder, seq=2)
            assert err.value.code() == C.PERMISSION_DENIED
            saved = json.loads((tmp_path / "state.json").read_text())
            assert [n["role"] for n in saved["nodes"] if n["node_id"] == holder.node_id] == [pb.ROLE_BANNED]

            with pytest.raises(grpc.aio.AioRpcError) as err:
                await bed.stub.Ban(pb.BanRequest(node_id=holder.node_id), timeout=DEADLINE, metadata=auth())
            assert err.value.code() == C.FAILED_PRECONDITION

            await bed.stub.Unban(pb.UnbanRequest(node_id=holder.node_id, operator="bob"), timeout=DEADLINE,
                                 metadata=auth())
            assert (rec.role, rec.stage, rec.ban_reason) == (pb.ROLE_OFFLINE, -1, "")
            assert (await bed.heartbeat(holder, seq=3)).role == pb.ROLE_STANDBY, "back as a standby"
            assert list((await bed.heartbeat(other, seq=3)).banned) == []
            kinds = [e.kind for e in (await bed.stub.Status(pb.StatusRequest(), timeout=DEADLINE)).events]
            assert kinds[-2:] == ["unbanned", "node_back"]

    asyncio.run(scenario())


@pytest.mark.parametrize("node_id,code", [
    ("", C.INVALID_ARGUMENT),
    ("abc", C.INVALID_ARGUMENT),  # shorter than 8 characters
    ("f" * 40, C.NOT_FOUND),
])
def test_ban_of_an_unknown_or_ambiguous_node_is_refused(tmp_path, node_id, code):
    async def scenario():
        async with coordinator_bed(tmp_path) as bed:
            bed.service.admin = Admin(TOKEN, bed.service.clock)
            await bed.register(Identity.generate())
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await bed.stub.Ban(pb.BanRequest(node_id=node_id), timeout=DEADLINE, metadata=auth())
            assert err.value.code() == code

    asyncio.run(scenario())


def test_set_audit_rate_changes_the_scheduler_live_and_shows_in_status(tmp_path):
    async def scenario():
        async with coordinator_bed(tmp_path, audits=True) as bed:
            clock = bed.service.clock
            bed.service.admin = Admin(TOKEN, clock)
            for bad in (-0.1, 1.5, float("nan")):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await bed.stub.SetAuditRate(pb.SetAuditRateRequest(rate=bad), timeout=DEADLINE, metadata=auth())
                assert err.value.code() == C.INVALID_ARGUMENT
            reply = await bed.stub.SetAuditRate(pb.SetAuditRateRequest(rate=0.5, operator="carol"),
                                                timeout=DEADLINE, metadata=auth())
            assert "0.05 -> 0.5" in reply.detail and clock.audits.rate == 0.5
            status = await bed.stub.Status(pb.StatusRequest(), timeout=DEADLINE)
            assert status.audit_rate == 0.5 and tomllib.loads(status.config_toml)["audit"]["rate"] == 0.5
            assert [e.message for e in status.events if e.kind == "audit_rate"] == ["audit rate 0.05 -> 0.5 (by carol "
                                                                                    f"from {_peer(status)})"]
            assert json.loads((tmp_path / "state.json").read_text())["audit_rate"] == 0.5, "kept for --resume"

    asyncio.run(scenario())


def _peer(status: pb.StatusReply) -> str:
    msg = [e.message for e in status.events if e.kind == "audit_rate"][0]
    return msg[msg.index("from ") + 5 : -1]


def test_stop_run_marks_the_run_stopped_once(tmp_path):
    async def scenario():
        async with coordinator_bed(tmp_path) as bed:
            bed.service.admin = Admin(TOKEN, bed.service.clock)
            reply = await bed.stub.StopRun(pb.StopRunRequest(operator="dave"), timeout=DEADLINE, metadata=auth())
            assert reply.phase == pb.RUN_PHASE_STOPPED and "--resume" in reply.detail
            status = await bed.stub.Status(pb.StatusRequest(), timeout=DEADLINE)
            assert status.phase == pb.RUN_PHASE_STOPPED
            assert [e.kind for e in status.events][-1] == "stopped"
            assert json.loads((tmp_path / "state.json").read_text())["phase"] == pb.RUN_PHASE_STOPPED
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await bed.stub.StopRun(pb.StopRunRequest(), timeout=DEADLINE, metadata=auth())
            assert err.value.code() == C.FAILED_PRECONDITION

    asyncio.run(scenario())


def test_admin_token_file_is_made_0600_once_and_unsafe_ones_are_refused(tmp_path):
    path = tmp_path / "state" / "admin.token"
    token = load_or_create_token(path)
    assert len(token) >= 32 and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_token(path) == token, "reused on the next start"
    os.chmod(path, 0o640)
    with pytest.raises(KeyFileError, match="chmod 600"):
        load_or_create_token(path)
    os.chmod(path, 0o600)
    path.write_text("short\n")
    with pytest.raises(KeyFileError, match="delete it"):
        load_or_create_token(path)
