"""Multi-process tests of the adversary library, one family at a time (issue 4).

Each test is a real testnet: a coordinator, three stage nodes and a standby (which audits), the
stage-1 node configured with a built-in attack through the same flags a user types.
Audits run at rate 1 with the screen on, so every message is checked and detection comes in
the first steps; the tests assert what a user checks with ``pipeguard status``: who is banned
(the attacker, and nobody honest), why, that the evidence verifies offline, and that the run
finishes with the standby holding the attacker's stage.

Tensor family: a representative few of the tensor attacks (the other kinds change the message
the same way, see tests/test_attacks.py; Lu et al.'s are in tests/test_audits.py).
Protocol family: behaviours that keep the tensors honest and cheat elsewhere (the update, the
state served to auditors, the copy served to auditors, going silent). ``audit:accuse`` is in
tests/test_audits.py and ``audit:clear`` with its accomplice in tests/test_collusion.py.
``wire:bad-signature`` and ``wire:replay`` are refused by every receiver (tests/test_attacks.py
checks the streams against the real verifier); the coordinator takes a node whose sends keep
being refused out of the pipeline without a ban, see tests/test_liveness.py.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from coordinator.config import CoordinatorConfig
from pipeguard.evidence import verify_bundle
from pipeguard.v1 import pipeguard_pb2 as pb
from tests.conftest import tiny_run

pytestmark = pytest.mark.multiprocess

STEPS = 2
ATTACKER = 1


def adversary_run(step_timeout: float = 60.0) -> CoordinatorConfig:
    """Three stages of the tiny model, two micro-batches, every message audited; the first step
    waits for all four nodes so the standby audits from step 0."""
    return tiny_run({"pipeline.stages": 3, "pipeline.min_nodes": 4, "train.steps": STEPS, "train.micro_batches": 2,
                     "audit.rate": 1.0, "audit.screen": True, "audit.checkpoint_every": 5, "audit.retention": 4,
                     "timeouts.step": step_timeout})


def run_with_attacker(net, attack: list[str], timeout: float = 100) -> tuple[pb.StatusReply, list[str]]:
    """Node 0 registers first (stage 0), the attacker second (stage 1); nodes 2 and 3 start
    together and take stage 2 and the standby in whatever order they register. Run to the end."""
    net.start_coordinator()
    net.start_node()
    net.wait_registered(1)
    net.start_node(*attack)
    net.wait_registered(2)
    late = [net.start_node(wait=False), net.start_node(wait=False)]
    for node in late:
        node.wait_ready()
    net.wait_registered(4)
    ids = [n.node_id for n in net.nodes]
    return net.wait_finished(timeout=timeout), ids


def assert_standby_took_stage_1(status: pb.StatusReply, ids: list[str]) -> None:
    holder = {n.stage: n.node_id for n in status.nodes if n.role == pb.ROLE_STAGE}
    assert holder[0] == ids[0]
    assert {holder[1], holder[2]} == {ids[2], ids[3]}, "the standby took the attacker's stage"


def roles(status: pb.StatusReply) -> dict[str, int]:
    return {n.node_id: n.role for n in status.nodes}


def assert_attacker_banned_with_evidence(status: pb.StatusReply, ids: list[str], reason: str) -> None:
    banned = {n.node_id for n in status.nodes if n.role == pb.ROLE_BANNED}
    assert banned == {ids[ATTACKER]}, f"exactly the attacker is banned, got {banned}"
    attacker = next(n for n in status.nodes if n.node_id == ids[ATTACKER])
    assert reason in attacker.ban_reason, attacker.ban_reason
    assert status.detections >= 1
    assert_standby_took_stage_1(status, ids)
    assert [p.step for p in status.losses] == list(range(STEPS)), "the run finished every step"
    assert status.evidence
    for path in status.evidence:
        result = verify_bundle(Path(path))
        assert result.valid, result.summary
        assert result.accused == ids[ATTACKER]


@pytest.mark.timeout(150)
@pytest.mark.parametrize("attack", [
    ["--attack", "backward:sign-flip", "--attack-fraction", "0.05"],
    ["--attack", "forward:constant-direction"],
    ["--attack", "forward:stale", "--attack-micro-batches", "1"],
], ids=["backward:sign-flip", "forward:constant-direction", "forward:stale"])
def test_tensor_attacks_are_caught_and_only_the_attacker_is_banned(testnet, attack):
    net = testnet(adversary_run())
    status, ids = run_with_attacker(net, attack)
    direction = "input gradient" if attack[1].startswith("backward") else "forward activation"
    assert_attacker_banned_with_evidence(status, ids, direction)


@pytest.mark.timeout(150)
@pytest.mark.parametrize("attack, reason", [
    ("update:poison", "update audit"),
    ("state:false-commitment", "equivocation"),
    ("wire:equivocate", "equivocation"),
])
def test_protocol_attacks_are_caught_and_only_the_attacker_is_banned(testnet, attack, reason):
    net = testnet(adversary_run())
    status, ids = run_with_attacker(net, ["--attack", attack])
    assert_attacker_banned_with_evidence(status, ids, reason)


@pytest.mark.timeout(150)
def test_a_node_that_goes_silent_mid_step_is_replaced_without_a_ban(testnet):
    # Silent at its send of micro-batch 1 of step 1: mid-step, after a whole honest step. The
    # coordinator's step deadline is short so the stalled step times out soon.
    net = testnet(adversary_run(step_timeout=15.0))
    status, ids = run_with_attacker(net, ["--attack", "node:silent", "--attack-start", "1",
                                          "--attack-micro-batches", "1"])
    assert {n.node_id for n in status.nodes if n.role == pb.ROLE_BANNED} == set(), "silence is not proof"
    assert roles(status)[ids[ATTACKER]] == pb.ROLE_OFFLINE
    assert any(e.kind == "node_offline" and e.node_id == ids[ATTACKER] for e in status.events)
    assert_standby_took_stage_1(status, ids)
    assert [p.step for p in status.losses] == list(range(STEPS))
    assert status.detections == 0 and not status.evidence
    # the silent daemon still shuts down cleanly on SIGTERM
    silent = net.nodes[ATTACKER].proc
    silent.send_signal(signal.SIGTERM)
    assert silent.wait(timeout=30) == 0, "a silent node exits cleanly when told to"
