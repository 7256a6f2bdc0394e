"""The Coordinator gRPC service in-process: registration, heartbeats, dataset, status.

A real CoordinatorService (registry, step clock, run store, event log) is served on port 0;
the clock is never started. Nodes are played by the test with real Ed25519 keys.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import os
import threading
import tomllib
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import torch

from coordinator import audits as audits_mod
from coordinator.clock import StepClock
from coordinator.config import CoordinatorConfig, ModelConfig, PipelineConfig, RegistryConfig
from coordinator.daemon import build_clock
from coordinator.registry import NodeRecord, Registry
from coordinator.service import RESUME_TRAILER, CoordinatorService
from coordinator.state import WATCH_BACKLOG, EventLog, RunStore
from pipeguard.app.status import follow
from pipeguard.computation import describe_build, node_build
from pipeguard.config import NetConfig, TimeoutConfig
from pipeguard.data import Dataset
from pipeguard.rpc import server_options
from pipeguard.errors import Unauthenticated
from pipeguard.identity import Identity, node_id_for
from pipeguard.signing import sign, verify
from pipeguard.v1 import pipeguard_pb2 as pb
from pipeguard.v1 import pipeguard_pb2_grpc as pb_grpc

pytestmark = [pytest.mark.grpc, pytest.mark.timeout(60)]

RUN = "run-coordinator-service"
DEADLINE = 10.0
C = grpc.StatusCode

g = torch.Generator().manual_seed(0)
DATASET = Dataset(blob=bytes(torch.randint(0, 256, (50_000,), generator=g, dtype=torch.uint8).tolist()),
                  val_offset=45_000)


@dataclass
class Bed:
    coord: Identity
    service: CoordinatorService
    registry: Registry
    stub: pb_grpc.CoordinatorStub
    address: str = ""

    async def hello(self) -> pb.HelloReply:
        return await self.stub.Hello(pb.HelloRequest(client_nonce=os.urandom(16)), timeout=DEADLINE)

    async def register(self, node: Identity, address: str = "127.0.0.1:7101", build: pb.NodeBuild | None = None,
                       **overrides) -> pb.RegisterReply:
        hello = await self.hello()
        req = pb.RegisterRequest(public_key=node.public_key, address=address, challenge=hello.challenge,
                                 version="test", build=build)
        sign(req, node)
        for name, value in overrides.items():
            setattr(req, name, value)
        return await self.stub.Register(req, timeout=DEADLINE)

    async def heartbeat(self, node: Identity, seq: int, signer: Identity | None = None,
                        **fields) -> pb.HeartbeatReply:
        req = pb.HeartbeatRequest(node_id=node.node_id, seq=seq, **fields)
        return await self.stub.Heartbeat(sign(req, signer or node), timeout=DEADLINE)


@contextlib.asynccontextmanager
async def coordinator_bed(state_dir: Path, *, challenge_ttl: float = DEADLINE, limits: RegistryConfig | None = None,
                          audits: bool = False, required_build: pb.NodeBuild | None = None):
    """``audits``: the clock comes with its judge and audit scheduler, as the daemon builds it."""
    cfg = CoordinatorConfig(run_id=RUN, state_dir=str(state_dir),
                            model=ModelConfig(n_layer=2, n_embd=16, n_head=2, block_size=16),
                            pipeline=PipelineConfig(stages=2),
                            net=NetConfig(bind="127.0.0.1:0", chunk_bytes=16 * 1024, max_message_bytes=1 << 20),
                            timeouts=TimeoutConfig(heartbeat_interval=0.5, heartbeat_timeout=30.0))
    store = RunStore(state_dir)
    coord = Identity.load_or_create(store.key_path)
    state, resumed = store.load_or_create(cfg.run_id)
    assert not resumed
    events = EventLog(store)
    registry = Registry(cfg.timeouts.heartbeat_timeout, challenge_ttl=challenge_ttl, limits=limits,
                        required_build=required_build)
    if audits:
        clock = build_clock(cfg, coord, registry, state, store, events, DATASET)
    else:
        clock = StepClock(cfg, coord, registry, state, store, events, DATASET.digest)
    service = CoordinatorService(cfg, coord, registry, clock, events, DATASET)
    server = grpc.aio.server(**server_options(cfg.net))
    pb_grpc.add_CoordinatorServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=cfg.net.grpc_options())
    try:
        yield Bed(coord=coord, service=service, registry=registry, stub=pb_grpc.CoordinatorStub(channel),
                  address=f"127.0.0.1:{port}")
    finally:
        await channel.close()
        await server.stop(None)
        await clock.close()


def run(coro):
    return asyncio.run(coro)


# -- the happy path --------------------------------------------------------------------------


def test_hello_is_signed_by_the_coordinator_and_echoes_the_nonce(tmp_path):
    async def scenario():
        async with coordinator_bed(tmp_path) as bed:
            nonce = os.urandom(16)
            a = await bed.stub.Hello(pb.HelloRequest(client_nonce=nonce), timeout=DEADLINE)
            b = await bed.hello()
            assert a.coordinator_key == bed.coord.public_key and a.run_id == RUN and a.client_nonce == nonce
            verify(a, bed.coord.public(), what="hello")
            assert len(a.challenge) == 32 and a.challenge != b.challenge, "every Hello gets a fresh challenge"
            # the key a node may pin is the one on disk, reused across restarts
            assert Identity.load_or_create(tmp_path / "coordinator.key").public_key == a.coordinator_key

    run(scenario())


def test_register_with_a_signed_challenge_then_status_lists_the_node(tmp_path):
    async def scenario():
        async with coordinator_bed(tmp_path) as bed:
            nodes = [Identity.generate() for _ in range(3)]
            for i, node in enumerate(nodes):
                reply = await bed.register(node, address=f"127.0.0.1:{7101 + i}")
                assert reply.node_id == node.node_id == node_id_for(node.public_key)
                assert reply.run_id == RUN and reply.heartbeat_interval_ms == 500
            await bed.heartbeat(nodes[0], seq=1, tensors_sent=5, tensors_received=4, tensors_rejected=1,
                                peers=[pb.PeerCounters(peer=nodes[1].node_id, accepted=4, rejected=1,
                                                       last_reason="UNAUTHENTICATED")])

            status = await bed.stub.Status(pb.StatusRequest(), timeout=DEADLINE)
            assert status.run_id == RUN and status.phase == pb.RUN_PHASE_WAITING and status.step == 0
            assert status.num_stages == 2 and status.coordinator_key == bed.coord.public_key
            assert status.coordinator_key_hex == bed.coord.public_key.hex(), "the same key, as hex"
            assert all(not n.HasField("stage") for n in status.nodes), "standbys hold no stage"
            by_id = {n.node_id: n for n in status.nodes}
            assert set(by_id) == {n.node_id for n in nodes}
            assert [by_id[n.node_id].address for n in nodes] == ["127.0.0.1:7101", "127.0.0.1:7102", "127.0.0.1:7103"]
            assert all(n.role == pb.ROLE_STANDBY for n in status.nodes)
            first = by_id[nodes[0].node_id]
            assert (first.tensors_sent, first.tensors_received, first.tensors_rejected) == (5, 4, 1)
            assert by_id[nodes[1].node_id].rejected_by_peers == 1, "peers' rejections are charged to the sender"
            assert 0 <= first.heartbeat_age_s < DEADLINE
            assert [e.kind for e in status.events].count("node_registered") == 3
            assert tomllib.loads(status.config_toml)["run_id"] == RUN
            # run state on disk already knows the nodes
            assert (tmp_path / "state.json").read_text().count('"node_id"') == 3

    run(scenario())


def test_each_node_registers_its_build_and_exact_mode_admits_only_the_coordinators(tmp_path):
    """Recomputations are bit-identical only between equal builds: the coordinator records each
    node's (torch, device, threads), shows it, keeps it across restarts, and in exact mode
    refuses a node whose build its judge could not reproduce bit for bit."""
    mine = node_build(threads=1)
    other = pb.NodeBuild(torch_version=mine.torch_version, device="cpu", threads=2)

    async def scenario():
        async with coordinator_bed(tmp_path, required_build=mine) as bed:
            same, different = Identity.generate(), Identity.generate()
            await bed.register(same, build=mine)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await bed.register(different, address="127.0.0.1:7102", build=other)
            assert refused.value.code() == C.FAILED_PRECONDITION
            assert "exact mode" in refused.value.details() and "threads = 1" in refused.value.details()
            assert set(bed.registry.nodes) == {same.node_id}, "a refused node holds no place"
            status = await bed.stub.Status(pb.StatusRequest(), timeout=DEADLINE)
            assert [n.build for n in status.nodes] == [describe_build(mine)]
            assert "1 thread" in describe_build(mine) and f"torch {torch.__version__}" in describe_build(mine)
            restored = NodeRecord.from_json(bed.registry.nodes[same.node_id].to_json())
            assert restored.build == mine, "the build survives a coordinator restart"

    run(scenario())

    async def tolerant():  # with a tolerance > 0 (the default) any build is admitted and recorded
        async with coordinator_bed(tmp_path / "tolerant") as bed:
            node = Identity.generate()
            await bed.register(node, build=other)
            assert bed.registry.nodes[node.node_id].build == other

    run(tolerant())


def test_a_gpu_node_registers_its_device_class_and_is_audited_by_its_class_first(tmp_path):
    """Issue 13: a node's device class (and CUDA version) is registered under its signature, shown
    in status, kept across restarts; the scheduler picks an auditor of the target's class first and
    falls back to another class (whose recomputation then applies audit.cross_device_tolerance)."""
    h200 = pb.NodeBuild(torch_version=torch.__version__, device="cuda:NVIDIA H200", threads=1, cuda_version="12.8")
    cpu = node_build(threads=1)

    async def scenario():
        async with coordinator_bed(tmp_path, audits=True) as bed:
            target, gpu_peer, cpu_peer = Identity.generate(), Identity.generate(), Identity.generate()
            await bed.register(target, build=h200)
            await bed.register(cpu_peer, address="127.0.0.1:7102", build=cpu)
            with pytest.raises(grpc.aio.AioRpcError) as forged:  # the build is under the node's signature
                await _register_with_swapped_build(bed, gpu_peer, signed=cpu, sent=h200)
            assert forged.value.code() == C.UNAUTHENTICATED
            await bed.register(gpu_peer, address="127.0.0.1:7103", build=h200)
            status = await bed.stub.Status(pb.StatusRequest(), timeout=DEADLINE)
            shown = {n.node_id: n.build for n in status.nodes}
            assert "cuda:NVIDIA H200 (CUDA 12.8)" in shown[target.node_id] and "cpu" in shown[cpu_peer.node_id]
            rec = bed.registry.nodes[target.node_id]
            assert NodeRecord.from_json(rec.to_json()).build == h200, "the class survives a restart"
            for node in (target, gpu_peer, cpu_peer):
                bed.registry.nodes[node.node_id].role = pb.ROLE_STANDBY
            scheduler = bed.service.clock.audits
            req = pb.AuditRequest(target=pb.PeerInfo(node_id=target.node_id))
            picks = {scheduler._choose_auditor(req).node_id for _ in range(20)}
            assert picks == {gpu_peer.node_id}, "an auditor of the target's class first"
            bed.registry.nodes[gpu_peer.node_id].role = pb.ROLE_OFFLINE
            assert scheduler._choose_auditor(req).node_id == cpu_peer.node_id, "else another class"

    run(scenario())


def test_a_stage_keeps_its_follower_over_a_free_standby_and_the_clock_reports_its_audit_waits(tmp_path):
    """Issue 12: the auditor following a stage (it holds the state the next audit starts from) is
    ordered the stage's audits while its run lasts and it keeps up, even when a standby, the
    preferred tier, is free: a switch would cost a whole state fetch. Past its queue bound, or at
    the end of its run, the stage is drawn afresh (the standby first). Time the step clock spends
    waiting for audits is in Status (``audit_wait_s``)."""
    async def scenario():
        async with coordinator_bed(tmp_path, audits=True) as bed:
            target, follower, standby = Identity.generate(), Identity.generate(), Identity.generate()
            for i, node in enumerate((target, follower, standby)):
                await bed.register(node, address=f"127.0.0.1:{7110 + i}")
            for node, role in ((target, pb.ROLE_STAGE), (follower, pb.ROLE_STAGE), (standby, pb.ROLE_STANDBY)):
                bed.registry.nodes[node.node_id].role = role
            scheduler = bed.service.clock.audits
            req = pb.AuditRequest(stage=1, target=pb.PeerInfo(node_id=target.node_id))
            scheduler.following[1] = (follower.node_id, 3)
            picks = [scheduler._choose_auditor(req).node_id for _ in range(3)]
            assert picks == [follower.node_id] * 3, "the follower keeps its stage for the rest of its run"
            assert scheduler._choose_auditor(req).node_id == standby.node_id, "run over: the standby first"
            scheduler.following[1] = (follower.node_id, 3)
            scheduler.in_flight[follower.node_id] = audits_mod.SPILL_AT + audits_mod.FOLLOWER_EXTRA
            assert scheduler._choose_auditor(req).node_id == standby.node_id, "a follower too far behind loses it"

            before = (await bed.stub.Status(pb.StatusRequest(), timeout=DEADLINE)).audit_wait_s
            slow = asyncio.ensure_future(asyncio.sleep(0.3))
            scheduler.pending[10**9] = (5, slow)
            await scheduler.drain(4)  # nothing of step <= 4 is running: no wait
            assert (await bed.stub.Status(pb.StatusRequest(), timeout=DEADLINE)).audit_wait_s == before
            await scheduler.drain(5)
            waited = (await bed.stub.Status(pb.StatusRequest(), timeout=DEADLINE)).audit_wait_s - before
            assert 0.25 <= waited < 5, waited
            del scheduler.pending[10**9]

    run(scenario())


async def _register_with_swapped_build(bed: Bed, node: Identity, *, signed: pb.NodeBuild, sent: pb.NodeBuild):
    """A registration signed over one build and sent with another."""
    hello = await bed.hello()
    req = pb.RegisterRequest(public_key=node.public_key, address="127.0.0.1:7103", challenge=hello.challenge,
                             version="test", build=signed)
    sign(req, node)
    req.build.CopyFrom(sent)
    return await bed.stub.Register(req, timeout=DEADLINE)


def test_registering_again_keeps_one_record_and_updates_the_address(tmp_path):
    async def scenario():
        async with coordinator_bed(tmp_path) as bed:
            node = Identity.generate()
            await bed.register(node, address="127.0.0.1:7101")
            await bed.heartbeat(node, seq=5)
            bed.registry.nodes[node.node_id].last_heartbeat -= 31.0  # silent past the 30 s timeout: restarted
            await bed.register(node, address="127.0.0.1:7202")
            status = await bed.stub.Status(pb.StatusRequest(), timeout=DEADLINE)
            assert [(n.node_id, n.address) for n in status.nodes] == [(node.node_id, "127.0.0.1:7202")]
            assert [e.message for e in status.events if e.kind == "node_registered"][-1].count("re-registered") == 1
            # a restarted node counts heartbeats from 1 again
            await bed.heartbeat(node, seq=1)

    run(scenario())


def test_a_second_registration_of_a_live_node_is_refused_until_it_falls_silent(tmp_path):
    async def scenario():
        async with coordinator_bed(tmp_path) as bed:
            node = Identity.generate()
            await bed.register(node, address="127.0.0.1:7101")
            # a registration whose reply was lost is answered again: the node never heartbeated
            await bed.register(node, address="127.0.0.1:7101")
            await bed.heartbeat(node, seq=1)
            rec = bed.registry.nodes[node.node_id]
            rec.role, rec.stage = pb.ROLE_STAGE, 0

            # the same key from elsewhere (a copied key file, or a restart within the timeout)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await bed.register(node, address="10.6.6.6:7101")
            assert err.value.code() == C.ALREADY_EXISTS and "is live" in err.value.details()
            assert (rec.address, rec.role, rec.stage, rec.heartbeat_seq) == ("127.0.0.1:7101", pb.ROLE_STAGE, 0, 1)
            await bed.heartbeat(node, seq=2)  # the live one is undisturbed

            # declared offline (30 s without heartbeats): the node that restarts with its key comes back
            rec.last_heartbeat -= 31.0
            assert bed.registry.expire() == [rec]
            reply = await bed.register(node, address="127.0.0.1:7202")
            assert reply.node_id == node.node_id
            assert (rec.address, rec.role, rec.stage) == ("127.0.0.1:7202", pb.ROLE_STANDBY, -1)
            assert (await bed.heartbeat(node, seq=1)).role == pb.ROLE_STANDBY

    run(scenario())


def test_heartbeat_reply_is_signed_by_the_coordinator_and_echoes_the_seq(tmp_path):
    async def scenario():
        async with coordinator_bed(tmp_path) as bed:
            node, banned = Identity.generate(), Identity.generate()
            await bed.register(node)
            await bed.register(banned)
            _ban(bed, banned)
            reply = await bed.heartbeat(node, seq=41)
            verify(reply, bed.coord.public(), what="heartbeat reply")
            assert reply.seq == 41 and list(reply.banned) == [banned.node_id]

    run(scenario())


def test_heartbeat_replies_carry_the_member_list_only_when_the_nodes_copy_is_stale(tmp_path):
    async def scenario():
        async with coordinator_bed(tmp_path) as bed:
            a, b, c = Identity.generate(), Identity.generate(), Identity.generate()
            await bed.register(a, address="127.0.0.1:7101")
            await bed.register(b, address="127.0.0.1:7102")
            first = await bed.heartbeat(a, seq=1)
            assert first.members_version != 0
            assert {m.node_id for m in first.members} == {a.node_id, b.node_id}
            same = await bed.heartbeat(a, seq=2, members_version=first.members_version)
            verify(same, bed.coord.public(), what="heartbeat reply")
            assert same.members_version == first.members_version and len(same.members) == 0
            assert len((await bed.heartbeat(b, seq=1)).members) == 2, "a node without the list gets it"

            await bed.register(c, address="127.0.0.1:7103")  # a join changes the list
            joined = await bed.heartbeat(a, seq=3, members_version=first.members_version)
            assert joined.members_version != first.members_version
            assert {m.node_id for m in joined.members} == {a.node_id, b.node_id, c.node_id}
            await bed.register(c, address="127.0.0.1:7203")  # so does a new address
            moved = await bed.heartbeat(a, seq=4, members_version=joined.members_version)
            assert {m.address for m in moved.members} == {"127.0.0.1:7101", "127.0.0.1:7102", "127.0.0.1:7203"}
            _ban(bed, b)  # and a ban: b leaves the members and enters the ban list
            after_ban = await bed.heartbeat(a, seq=5, members_version=moved.members_version)
            assert {m.node_id for m in after_ban.members} == {a.node_id, c.node_id}
            assert list(after_ban.banned) == [b.node_id]
            quiet = await bed.heartbeat(a, seq=6, members_version=after_ban.members_version)
            assert len(quiet.members) == 0 and list(quiet.banned) == [b.node_id], "the ban list is always sent"

    run(scenario())
    # A restarted coordinator starts from another random version, so no node keeps a stale list.
    assert len({Registry(10.0, 10.0).members_version for _ in range(8)}) == 8


def test_a_displaced_node_leaves_the_member_list_in_heartbeat_replies(tmp_path):
    async def scenario():
        async with coordinator_bed(tmp_path) as bed:
            a, b, c = (Identity.generate() for _ in range(3))
            bed.registry.limits.max_nodes = 2
            await bed.register(a)
            await bed.register(b)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await bed.register(c)
            assert err.value.code() == C.RESOURCE_EXHAUSTED and "registry.max_nodes" in err.value.details()

            bed.registry.nodes[a.node_id].last_heartbeat = 0.0  # a goes silent: its place is free
            assert [r.node_id for r in bed.registry.expire()] == [a.node_id]
            await bed.register(c)
            assert set(bed.registry.nodes) == {b.node_id, c.node_id}
            reply = await bed.heartbeat(c, seq=1)  # the cached member list was rebuilt without a
            assert {m.node_id for m in reply.members} == {b.node_id, c.node_id}

    run(scenario())


def test_a_stage_holder_back_from_missed_heartbeats_is_shown_serving_its_stage(tmp_path):
    async def scenario():
        async with coordinator_bed(tmp_path) as bed:
            holder, standby = Identity.generate(), Identity.generate()
            for i, node in enumerate((holder, standby)):
                await bed.register(node, address=f"127.0.0.1:{7101 + i}")
                await bed.heartbeat(node, seq=1)
            rec = bed.registry.nodes[holder.node_id]
            rec.role, rec.stage = pb.ROLE_STAGE, 1
            bed.service.clock.pipeline.nodes = [rec]
            for r in bed.registry.nodes.values():  # both go silent for longer than the timeout
                r.last_heartbeat = 0.0
            assert {r.node_id for r in bed.registry.expire()} == {holder.node_id, standby.node_id}
            offline = {n.node_id: n for n in (await bed.stub.Status(pb.StatusRequest(), timeout=DEADLINE)).nodes}
            assert offline[holder.node_id].role == pb.ROLE_OFFLINE and offline[holder.node_id].HasField("stage")
            assert offline[holder.node_id].stage == 1, "an offline holder's stage is shown while nobody else has it"
            assert not offline[standby.node_id].HasField("stage"), "no stage: absent, not stage 0"

            reply = await bed.heartbeat(holder, seq=2)
            assert (reply.role, reply.stage) == (pb.ROLE_STAGE, 1), "it still serves stage 1 of the pipeline"
            assert (await bed.heartbeat(standby, seq=2)).role == pb.ROLE_STANDBY
            status = await bed.stub.Status(pb.StatusRequest(), timeout=DEADLINE)
            roles = {n.node_id: (n.role, n.stage) for n in status.nodes}
            assert roles[holder.node_id] == (pb.ROLE_STAGE, 1) and roles[standby.node_id][0] == pb.ROLE_STANDBY
            back = [e.message for e in status.events if e.kind == "node_back"]
            assert back == [f"node {holder.node_id[:8]} is back (stage 1)",
                            f"node {standby.node_id[:8]} is back (standby)"]

    run(scenario())


def test_fetch_data_streams_the_dataset_by_digest(tmp_path):
    async def scenario():
        async with coordinator_bed(tmp_path) as bed:
            chunks = [c async for c in bed.stub.FetchData(pb.FetchDataRequest(digest=DATASET.digest),
                                                          timeout=DEADLINE)]
            assert len(chunks) == 4, "50 kB in 16 KiB chunks"
            assert chunks[0].total_bytes == len(DATASET.blob) and chunks[0].val_offset == DATASET.val_offset
            got = Dataset(blob=b"".join(c.data for c in chunks), val_offset=chunks[0].val_offset)
            assert got.digest == DATASET.digest

            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in bed.stub.FetchData(pb.FetchDataRequest(digest=b"\x00" * 32), timeout=DEADLINE):
                    pass
            assert err.value.code() == C.NOT_FOUND

    run(scenario())


def test_watch_replays_then_follows_events(tmp_path):
    async def scenario():
        async with coordinator_bed(tmp_path) as bed:
            first = Identity.generate()
            await bed.register(first)
            call = bed.stub.Watch(pb.WatchRequest(after_seq=0), timeout=DEADLINE)
            replayed = await call.read()
            assert (replayed.kind, replayed.node_id) == ("node_registered", first.node_id)

            second = Identity.generate()
            await bed.register(second)
            live = await asyncio.wait_for(call.read(), DEADLINE)
            assert (live.kind, live.node_id) == ("node_registered", second.node_id)
            assert live.seq == replayed.seq + 1
            call.cancel()

    run(scenario())


def test_a_watcher_that_falls_behind_is_told_where_to_resume_and_misses_nothing(tmp_path):
    """More than WATCH_BACKLOG events while a watcher reads nothing: its stream sends what it had
    queued, in order, then ends RESOURCE_EXHAUSTED naming the after_seq that resumes it (in the
    details and the trailer); Watch(after_seq=N) then continues at N + 1. Never a silent end."""
    async def scenario():
        async with coordinator_bed(tmp_path) as bed:
            events = bed.service.events
            events.emit("waiting", "before the watcher", step=0)
            call = bed.stub.Watch(pb.WatchRequest(after_seq=0), timeout=DEADLINE)
            assert (await call.read()).seq == 1  # replayed: the stream is subscribed
            for i in range(WATCH_BACKLOG + 50):  # in one go: the stream's task cannot run in between
                events.emit("audit_rate", f"flood {i}", step=0)
            seqs = []
            with pytest.raises(grpc.aio.AioRpcError) as err:
                while True:
                    ev = await call.read()
                    assert ev is not grpc.aio.EOF, "the stream of a watcher that fell behind ended OK"
                    seqs.append(ev.seq)
            assert err.value.code() == C.RESOURCE_EXHAUSTED
            cut = int(dict(err.value.trailing_metadata())[RESUME_TRAILER])
            assert f"after_seq={cut}" in err.value.details()
            assert seqs == list(range(2, cut + 1)) and cut == 1 + WATCH_BACKLOG, "what was queued, in order"
            assert events.watchers == set(), "a cut watcher is forgotten"

            resumed = bed.stub.Watch(pb.WatchRequest(after_seq=cut), timeout=DEADLINE)
            rest = [(await resumed.read()).seq for _ in range(events.seq - cut)]
            assert rest == list(range(cut + 1, events.seq + 1)), "the resumed stream picks up at cut + 1"
            resumed.cancel()

    run(scenario())


def test_status_follow_resumes_a_watch_that_fell_behind_as_the_proto_says(tmp_path):
    """`pipeguard status --watch`'s loop (pipeguard.app.status.follow), over a synchronous channel,
    reading nothing while the coordinator emits more than a watcher may leave unread: it is cut
    off, resumes by itself, and sees every event once, in order."""
    async def scenario():
        async with coordinator_bed(tmp_path) as bed:
            events = bed.service.events
            events.emit("waiting", "before the watcher", step=0)
            started, flooded = threading.Event(), threading.Event()
            total = 1 + WATCH_BACKLOG + 200
            resumes: list[int] = []

            def watcher() -> list[int]:
                with grpc.insecure_channel(bed.address) as ch:
                    seen = follow(pb_grpc.CoordinatorStub(ch), 0, lambda details, last: resumes.append(last))
                    seqs = [next(seen).seq]
                    started.set()
                    assert flooded.wait(DEADLINE)
                    for ev in seen:
                        seqs.append(ev.seq)
                        if ev.seq == total:
                            return seqs
                    raise AssertionError("follow ended")

            reading = asyncio.ensure_future(asyncio.to_thread(watcher))
            assert await asyncio.to_thread(started.wait, DEADLINE)
            for i in range(total - 1):  # in one go: the stream's task cannot run in between
                events.emit("audit_rate", f"flood {i}", step=0)
            flooded.set()
            seqs = await asyncio.wait_for(reading, 2 * DEADLINE)
            assert seqs == list(range(1, total + 1)), "every event once, in order, across the resume"
            assert len(resumes) == 1 and 1 < resumes[0] < total, resumes

    run(scenario())


# -- hostile registrations and heartbeats ----------------------------------------------------


class Fault(enum.Enum):
    WRONG_SIGNATURE = "registration signed by another key"
    TAMPERED_AFTER_SIGNING = "address changed after the node signed"
    REUSED_CHALLENGE = "a challenge used for a successful registration, used again"
    UNKNOWN_CHALLENGE = "a challenge the coordinator never issued"
    EXPIRED_CHALLENGE = "a challenge past its time to live"
    SHORT_PUBLIC_KEY = "public key of 31 bytes"
    LONG_PUBLIC_KEY = "public key of 33 bytes"
    BAD_ADDRESS = "address without a port"
    NON_ASCII_PORT = "port in digits other than ASCII (int() refuses '²', takes '٣')"
    PORT_ZERO = "port 0 (bindable, not reachable)"
    LONG_ADDRESS = "a valid HOST:PORT of 500 kB (it would go to every node in every heartbeat reply)"
    EMPTY_ADDRESS = "no address"
    HEARTBEAT_UNKNOWN_NODE = "heartbeat from a node that never registered"
    HEARTBEAT_REPLAYED_SEQ = "heartbeat with a sequence number already seen"
    HEARTBEAT_OLD_SEQ = "heartbeat with an older sequence number"
    HEARTBEAT_FORGED = "heartbeat for a registered node, signed by someone else"
    HEARTBEAT_BANNED = "heartbeat from a banned node"
    REGISTER_BANNED = "registration of a banned key"


EXPECTED = {
    Fault.WRONG_SIGNATURE: (C.UNAUTHENTICATED, "bad signature on registration"),
    Fault.TAMPERED_AFTER_SIGNING: (C.UNAUTHENTICATED, "bad signature on registration"),
    Fault.REUSED_CHALLENGE: (C.UNAUTHENTICATED, "unknown or expired challenge"),
    Fault.UNKNOWN_CHALLENGE: (C.UNAUTHENTICATED, "unknown or expired challenge"),
    Fault.EXPIRED_CHALLENGE: (C.UNAUTHENTICATED, "unknown or expired challenge"),
    Fault.SHORT_PUBLIC_KEY: (C.INVALID_ARGUMENT, "public_key must be 32 bytes"),
    Fault.LONG_PUBLIC_KEY: (C.INVALID_ARGUMENT, "public_key must be 32 bytes"),
    Fault.BAD_ADDRESS: (C.INVALID_ARGUMENT, "HOST:PORT"),
    Fault.NON_ASCII_PORT: (C.INVALID_ARGUMENT, "HOST:PORT"),
    Fault.PORT_ZERO: (C.INVALID_ARGUMENT, "port in 1-65535"),
    Fault.LONG_ADDRESS: (C.INVALID_ARGUMENT, "at most 300"),
    Fault.EMPTY_ADDRESS: (C.INVALID_ARGUMENT, "HOST:PORT"),
    Fault.HEARTBEAT_UNKNOWN_NODE: (C.NOT_FOUND, "register first"),
    Fault.HEARTBEAT_REPLAYED_SEQ: (C.ALREADY_EXISTS, "replayed"),
    Fault.HEARTBEAT_OLD_SEQ: (C.ALREADY_EXISTS, "replayed"),
    Fault.HEARTBEAT_FORGED: (C.UNAUTHENTICATED, "bad signature on heartbeat"),
    Fault.HEARTBEAT_BANNED: (C.PERMISSION_DENIED, "banned"),
    Fault.REGISTER_BANNED: (C.PERMISSION_DENIED, "banned"),
}


def _ban(bed: Bed, node: Identity) -> None:
    bed.registry.ban(bed.registry.nodes[node.node_id], "test: equivocation")


async def hostile(bed: Bed, fault: Fault, node: Identity):
    """Perform the offending call for ``fault``; ``node`` is registered (seq 3) beforehand where needed."""
    other = Identity.generate()
    if fault is Fault.WRONG_SIGNATURE:
        hello = await bed.hello()
        req = pb.RegisterRequest(public_key=other.public_key, address="127.0.0.1:7300", challenge=hello.challenge)
        return await bed.stub.Register(sign(req, node), timeout=DEADLINE)
    if fault is Fault.TAMPERED_AFTER_SIGNING:
        hello = await bed.hello()
        req = sign(pb.RegisterRequest(public_key=other.public_key, address="127.0.0.1:7300",
                                      challenge=hello.challenge), other)
        req.address = "10.0.0.66:7300"
        return await bed.stub.Register(req, timeout=DEADLINE)
    if fault is Fault.REUSED_CHALLENGE:
        hello = await bed.hello()
        req = sign(pb.RegisterRequest(public_key=other.public_key, address="127.0.0.1:7300",
                                      challenge=hello.challenge), other)
        await bed.stub.Register(req, timeout=DEADLINE)
        return await bed.stub.Register(req, timeout=DEADLINE)
    if fault is Fault.UNKNOWN_CHALLENGE:
        await bed.hello()
        req = sign(pb.RegisterRequest(public_key=other.public_key, address="127.0.0.1:7300",
                                      challenge=os.urandom(32)), other)
        return await bed.stub.Register(req, timeout=DEADLINE)
    if fault is Fault.EXPIRED_CHALLENGE:
        bed.registry.challenge_ttl = -1.0  # every challenge issued from now on is already expired
        return await bed.register(other)
    if fault is Fault.SHORT_PUBLIC_KEY:
        return await bed.register(other, public_key=other.public_key[:31])
    if fault is Fault.LONG_PUBLIC_KEY:
        return await bed.register(other, public_key=other.public_key + b"\x00")
    if fault is Fault.BAD_ADDRESS:
        return await bed.register(other, address="node7.example.org")
    if fault is Fault.NON_ASCII_PORT:
        await bed.register(Identity.generate(), address="127.0.0.1:٣")
        return await bed.register(other, address="127.0.0.1:7²")
    if fault is Fault.LONG_ADDRESS:
        return await bed.register(other, address="n" * 500_000 + ".example.org:7300")
    if fault is Fault.PORT_ZERO:
        return await bed.register(other, address="127.0.0.1:000000")
    if fault is Fault.EMPTY_ADDRESS:
        return await bed.register(other, address="")
    if fault is Fault.HEARTBEAT_UNKNOWN_NODE:
        return await bed.heartbeat(other, seq=1)
    if fault is Fault.HEARTBEAT_REPLAYED_SEQ:
        return await bed.heartbeat(node, seq=3)
    if fault is Fault.HEARTBEAT_OLD_SEQ:
        return await bed.heartbeat(node, seq=2)
    if fault is Fault.HEARTBEAT_FORGED:
        return await bed.heartbeat(node, seq=4, signer=other, tensors_rejected=99)
    if fault is Fault.HEARTBEAT_BANNED:
        _ban(bed, node)
        return await bed.heartbeat(node, seq=4)
    if fault is Fault.REGISTER_BANNED:
        _ban(bed, node)
        return await bed.register(node)
    raise AssertionError(f"no scenario for {fault}")


@pytest.mark.parametrize("fault", list(Fault), ids=lambda f: f.name.lower())
def test_hostile_registration_or_heartbeat_is_refused(tmp_path, fault):
    code, fragment = EXPECTED[fault]

    async def scenario():
        async with coordinator_bed(tmp_path) as bed:
            node = Identity.generate()
            await bed.register(node)
            await bed.heartbeat(node, seq=3)
            known_before = set(bed.registry.nodes)

            with pytest.raises(grpc.aio.AioRpcError) as err:
                await hostile(bed, fault, node)
            assert err.value.code() == code, f"{fault.value}: got {err.value.code().name} ({err.value.details()})"
            assert fragment in err.value.details(), err.value.details()

            # nothing was admitted or changed by the refused call
            if fault is not Fault.REUSED_CHALLENGE:  # its first registration was legitimate
                assert set(bed.registry.nodes) == known_before
            rec = bed.registry.nodes[node.node_id]
            assert rec.heartbeat_seq == 3 and rec.tensors_rejected == 0

            # and the coordinator keeps serving
            if fault is Fault.EXPIRED_CHALLENGE:
                bed.registry.challenge_ttl = DEADLINE
            newcomer = Identity.generate()
            assert (await bed.register(newcomer)).node_id == newcomer.node_id
            if fault not in (Fault.HEARTBEAT_BANNED, Fault.REGISTER_BANNED):
                reply = await bed.heartbeat(node, seq=4)
                assert reply.role == pb.ROLE_STANDBY and list(reply.banned) == []
            else:
                reply = await bed.heartbeat(newcomer, seq=1)
                assert list(reply.banned) == [node.node_id], "the ban list reaches every node"

    run(scenario())


# -- the step clock against scripted stages ----------------------------------------------------


class ScriptedStage(pb_grpc.NodeServicer):
    """A stage that answers RunStep and ApplyUpdate with reports signed by its own key; ``lie``
    overrides fields of its UpdateReport (a report replayed from another step, stage or run)."""

    START, AFTER = b"\x01" * 32, b"\x02" * 32

    def __init__(self, node: Identity, slot: int, lie: dict, assignment: bytes):
        self.node, self.slot, self.lie, self.assignment = node, slot, lie, assignment

    async def RunStep(self, request, context):
        return sign(pb.StepReport(run_id=request.run_id, step=request.step, stage=self.slot, node_id=self.node.node_id,
                                  state_digest=self.START, grad_sq_norm=1.0, micro_batches=1, epoch=request.epoch,
                                  attempt=request.attempt, assignment_digest=self.assignment), self.node)

    async def ApplyUpdate(self, request, context):
        report = pb.UpdateReport(run_id=request.run_id, step=request.step, stage=self.slot,
                                 node_id=self.node.node_id, state_digest=self.AFTER, epoch=request.epoch,
                                 attempt=request.attempt, assignment_digest=self.assignment)
        for name, value in self.lie.items():
            setattr(report, name, value)
        return sign(report, self.node)


@contextlib.asynccontextmanager
async def scripted_pipeline(bed: Bed, lies: list[dict]):
    """Stage i is a ScriptedStage lying with ``lies[i]``; the clock's pipeline is set to them."""
    servers, records = [], []
    clock = bed.service.clock
    for slot, lie in enumerate(lies):
        node = Identity.generate()
        server = grpc.aio.server()
        pb_grpc.add_NodeServicer_to_server(ScriptedStage(node, slot, lie, clock.assignment_digest(slot)), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        servers.append(server)
        rec = NodeRecord(node_id=node.node_id, public_key=node.public_key, address=f"127.0.0.1:{port}",
                         role=pb.ROLE_STAGE, stage=slot)
        bed.registry.nodes[rec.node_id] = rec
        records.append(rec)
    clock.pipeline.nodes, clock.pipeline.slots = records, list(range(len(lies)))
    clock.state.epoch = 1
    clock.state.commitments = {str(s): ScriptedStage.START.hex() for s in range(len(lies))}
    try:
        yield clock
    finally:
        for server in servers:
            await server.stop(None)


def test_clock_applies_honest_update_reports(tmp_path):
    async def scenario():
        async with coordinator_bed(tmp_path) as bed, scripted_pipeline(bed, [{}, {}]) as clock:
            await clock.run_step(0)
            assert clock.state.step == 1
            assert clock.state.commitments == {"0": ScriptedStage.AFTER.hex(), "1": ScriptedStage.AFTER.hex()}

    run(scenario())


@pytest.mark.parametrize("lie", [{"run_id": "another-run"}, {"step": 7}, {"stage": 0}, {"node_id": "f" * 32},
                                 {"epoch": 0}, {"attempt": 1}, {"assignment_digest": b"x" * 32}],
                         ids=["run_id", "step", "stage", "node_id", "epoch", "attempt", "assignment"])
def test_clock_refuses_an_update_report_for_another_step_stage_or_node(tmp_path, lie):
    """... or a replayed one of another epoch or attempt, or one computed under another assignment."""
    async def scenario():
        async with coordinator_bed(tmp_path) as bed, scripted_pipeline(bed, [{}, lie]) as clock:
            before = dict(clock.state.commitments)
            with pytest.raises(Unauthenticated, match="update report"):
                await clock.run_step(0)
            assert clock.state.step == 0
            assert clock.state.commitments == before, "no stage's commitment moved on a refused step"

    run(scenario())


# -- malformed bytes ------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["Hello", "Register", "Heartbeat", "SetAuditRate"])
def test_request_bytes_that_do_not_parse_get_invalid_argument(tmp_path, method):
    """grpc itself would answer UNKNOWN; pipeguard.rpc.RejectMalformed answers INVALID_ARGUMENT."""
    async def scenario():
        async with coordinator_bed(tmp_path) as bed:
            channel = grpc.aio.insecure_channel(bed.address)
            try:
                raw = channel.unary_unary(f"/pipeguard.v1.Coordinator/{method}", request_serializer=None,
                                          response_deserializer=None)
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await raw(b"\x0a\xff\xff\x03", timeout=DEADLINE)  # a length prefix past the end
                assert err.value.code() == C.INVALID_ARGUMENT and "malformed request" in err.value.details()
            finally:
                await channel.close()
            node = Identity.generate()
            assert (await bed.register(node)).node_id == node.node_id, "still serving"

    run(scenario())


# -- registration floods ------------------------------------------------------------------------


async def _codes(calls) -> list[grpc.StatusCode]:
    out = []
    for result in await asyncio.gather(*calls, return_exceptions=True):
        if isinstance(result, grpc.aio.AioRpcError):
            out.append(result.code())
        elif isinstance(result, BaseException):
            raise result
        else:
            out.append(C.OK)
    return out


def test_a_registration_flood_is_bounded_and_honest_nodes_keep_their_place(tmp_path):
    limits = RegistryConfig(max_nodes=1000, max_open_challenges=40, registrations_per_s=0.001, registration_burst=30)

    async def scenario():
        async with coordinator_bed(tmp_path, limits=limits) as bed:
            honest = Identity.generate()
            await bed.register(honest)
            await bed.heartbeat(honest, seq=1)
            state_before = (tmp_path / "state.json").stat().st_size

            # 60 Hellos: at most 40 challenges are open at once
            hellos = await asyncio.gather(*[bed.hello() for _ in range(40)])
            codes = await _codes([bed.hello() for _ in range(20)])
            assert codes == [C.RESOURCE_EXHAUSTED] * 20

            # 40 fresh keys answer them: 29 more fit the burst of 30 (the honest node took one)
            async def register(hello):
                node = Identity.generate()
                req = pb.RegisterRequest(public_key=node.public_key, address="127.0.0.1:7300",
                                         challenge=hello.challenge)
                return await bed.stub.Register(sign(req, node), timeout=DEADLINE)

            codes = await _codes([register(h) for h in hellos])
            assert codes.count(C.OK) == 29 and codes.count(C.RESOURCE_EXHAUSTED) == 11, codes
            assert len(bed.registry.nodes) == 30

            # the honest node still heartbeats; the refused ones left nothing behind
            reply = await bed.heartbeat(honest, seq=2)
            assert reply.role == pb.ROLE_STANDBY and len(reply.members) == 30
            assert len(bed.registry._challenges) == 0, "every challenge was used once"
            assert (tmp_path / "state.json").stat().st_size < 30 * (state_before + 1024)

    run(scenario())


def test_a_full_registry_displaces_the_longest_silent_idle_node_or_refuses(tmp_path):
    limits = RegistryConfig(max_nodes=3)

    async def scenario():
        async with coordinator_bed(tmp_path, limits=limits) as bed:
            nodes = [Identity.generate() for _ in range(3)]
            for i, node in enumerate(nodes):
                await bed.register(node, address=f"127.0.0.1:{7101 + i}")
                await bed.heartbeat(node, seq=1)
            bed.registry.nodes[nodes[0].node_id].stage = 0  # holds a stage: never displaced
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await bed.register(Identity.generate())
            assert err.value.code() == C.RESOURCE_EXHAUSTED and "registry.max_nodes" in err.value.details()

            for node in nodes[:2]:  # both silent; only the one without a stage may go
                bed.registry.nodes[node.node_id].last_heartbeat -= 31.0
            newcomer = Identity.generate()
            await bed.register(newcomer)
            assert set(bed.registry.nodes) == {nodes[0].node_id, nodes[2].node_id, newcomer.node_id}
            with pytest.raises(grpc.aio.AioRpcError) as err:  # the forgotten one is told to register again
                await bed.heartbeat(nodes[1], seq=2)
            assert err.value.code() == C.NOT_FOUND

    run(scenario())
