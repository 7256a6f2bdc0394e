"""A stage node whose messages its neighbours keep refusing is routed around (liveness).

``wire:bad-signature`` (bytes that do not match their signature) and ``wire:replay`` (an
earlier step's valid stream sent again) are refused by every receiver, so every attempt of the
step fails. Nobody can be banned for it (a refused stream is no evidence a third party could
check), but after MAX_STEP_ATTEMPTS failed attempts the coordinator attributes the failures from
the refusals the receivers reported and takes the refused node out of the pipeline for the rest
of the run: the standby takes its stage and the run finishes.
"""

from __future__ import annotations

import asyncio
import math

import pytest

from coordinator.clock import StepClock
from coordinator.config import CoordinatorConfig, ModelConfig, PipelineConfig
from coordinator.registry import NodeRecord, Registry
from coordinator.state import EventLog, RunStore
from pipeguard.config import TimeoutConfig
from pipeguard.identity import Identity
from pipeguard.v1 import pipeguard_pb2 as pb
from tests.test_adversary import ATTACKER, assert_standby_took_stage_1, roles, run_with_attacker
from tests.conftest import tiny_run_toml

pytestmark = pytest.mark.multiprocess

STEPS = 3


def liveness_toml() -> str:
    """Three stages of the tiny model, two micro-batches, the default audit rate; the first step
    waits for all four nodes (three stages and a standby)."""
    toml = tiny_run_toml(stages=3, steps=STEPS, micro_batches=2)
    return toml.replace("[pipeline]\n", "[pipeline]\nmin_nodes = 4\n").replace("step = 60.0", "step = 20.0")


@pytest.mark.timeout(150)
@pytest.mark.parametrize("attack", ["wire:bad-signature", "wire:replay"])
def test_a_node_whose_messages_are_refused_is_taken_out_of_the_pipeline_not_banned(testnet, attack):
    net = testnet(liveness_toml())
    status, ids = run_with_attacker(net, ["--attack", attack], timeout=120)
    assert [p.step for p in status.losses] == list(range(STEPS)), "the run finished every step"
    assert all(math.isfinite(p.loss) for p in status.losses)
    assert {n.node_id for n in status.nodes if n.role == pb.ROLE_BANNED} == set(), "a refused stream is no proof"
    assert roles(status)[ids[ATTACKER]] == pb.ROLE_STANDBY, "the attacker is back to standby"
    demoted = [e for e in status.events if e.kind == "node_demoted"]
    assert [e.node_id for e in demoted] == [ids[ATTACKER]], [e.message for e in demoted]
    assert "refused" in demoted[0].message
    attacker = next(n for n in status.nodes if n.node_id == ids[ATTACKER])
    assert "refused" in attacker.distrusted and not attacker.ban_reason
    assert all(not n.distrusted for n in status.nodes if n.node_id != ids[ATTACKER])
    assert_standby_took_stage_1(status, ids)
    assert status.detections == 0 and not status.evidence


# -- attribution, and the bound on framing (the coordinator's clock on its own) --------------------


def clock_with_pipeline(tmp_path, stages: int = 3, standbys: int = 1) -> tuple[StepClock, list[str]]:
    """A coordinator's clock (real registry, run store and event log) whose pipeline is formed of
    ``stages`` registered nodes in order, with ``standbys`` more registered as standbys."""
    cfg = CoordinatorConfig(run_id="run-liveness", state_dir=str(tmp_path),
                            model=ModelConfig(n_layer=3, n_embd=16, n_head=2, block_size=16),
                            pipeline=PipelineConfig(stages=stages),
                            timeouts=TimeoutConfig(heartbeat_interval=0.01, heartbeat_timeout=30.0))
    store = RunStore(tmp_path)
    state, _ = store.load_or_create(cfg.run_id)
    registry = Registry(cfg.timeouts.heartbeat_timeout, challenge_ttl=5.0)
    clock = StepClock(cfg, Identity.load_or_create(store.key_path), registry, state, store, EventLog(store), b"")
    ids = []
    for i in range(stages + standbys):
        node = Identity.generate()
        rec = NodeRecord(node_id=node.node_id, public_key=node.public_key, address=f"127.0.0.1:{7100 + i}",
                         role=pb.ROLE_STAGE if i < stages else pb.ROLE_STANDBY, stage=i if i < stages else -1)
        rec.heartbeat_seq = 1
        registry.nodes[rec.node_id] = rec
        ids.append(rec.node_id)
    clock.stage_nodes = [registry.nodes[i] for i in ids[:stages]]
    clock.slots = list(range(stages))
    return clock, ids


def refused(clock: StepClock, sender: str, reporter: str, count: int) -> None:
    """What ``reporter``'s heartbeat reports: it has refused ``count`` of ``sender``'s messages."""
    clock.registry.rejected_by_peers.setdefault(sender, {})[reporter] = count


def test_the_sender_its_pipeline_neighbours_refused_is_distrusted_and_not_planned_again(tmp_path):
    clock, (a, b, c, d) = clock_with_pipeline(tmp_path)
    refused(clock, b, c, 1)  # before the step: not counted
    before = {k: dict(v) for k, v in clock.registry.rejected_by_peers.items()}
    refused(clock, b, c, 7)
    refused(clock, a, c, 50)  # c is not a's neighbour: ignored
    asyncio.run(clock._distrust_refused(4, before))
    assert set(clock.state.distrusted) == {b} and "6 of its messages" in clock.state.distrusted[b]
    assert clock.reform_needed
    assert clock.events.recent[-1].kind == "node_demoted" and clock.events.recent[-1].node_id == b
    assert all(r.role != pb.ROLE_BANNED for r in clock.registry.nodes.values()), "not a ban"
    holders, skipped = clock._plan()
    assert holders[1].node_id == d and not skipped, "the standby takes the distrusted node's stage"
    assert RunStore(tmp_path).load_or_create("run-liveness", resume=True)[0].distrusted == clock.state.distrusted


def test_no_refusals_change_nothing(tmp_path):
    clock, (a, b, c, d) = clock_with_pipeline(tmp_path)
    refused(clock, b, c, 3)
    before = {k: dict(v) for k, v in clock.registry.rejected_by_peers.items()}
    asyncio.run(clock._distrust_refused(4, before))
    assert clock.state.distrusted == {} and not clock.reform_needed


def test_a_receiver_that_frames_a_second_neighbour_is_distrusted_itself(tmp_path):
    # b lies: it reports refusing a's (honest) messages. a goes; the standby d takes stage 0, and
    # b reports d the same way: the reporter common to both is the one taken out.
    clock, (a, b, c, d) = clock_with_pipeline(tmp_path)
    before = {}
    refused(clock, a, b, 4)
    asyncio.run(clock._distrust_refused(1, before))
    assert set(clock.state.distrusted) == {a}
    clock.stage_nodes = [clock.registry.nodes[i] for i in (d, b, c)]
    before = {k: dict(v) for k, v in clock.registry.rejected_by_peers.items()}
    refused(clock, d, b, 4)
    asyncio.run(clock._distrust_refused(2, before))
    assert set(clock.state.distrusted) == {a, b}, "the liar, not the second honest neighbour"
    assert "second neighbour" in clock.state.distrusted[b]
