"""A stage node whose messages its neighbours keep refusing is routed around (liveness).

``wire:bad-signature`` (bytes that do not match their signature) and ``wire:replay`` (an
earlier step's valid stream sent again) are refused by every receiver, so every attempt of the
step fails. Nobody can be banned for it (a refused stream is no evidence a third party could
check), but after ``pipeline.max_step_attempts`` failed attempts the coordinator attributes the
failures from the refusals the receivers reported and routes around the refused node: the standby
takes its stage and the run finishes. Bad bytes under the attacker's signed header are charged to
it; a stale replay is not (an honest retry looks the same) and only hints whom to route around
first. Either way one receiver's word demotes nobody. The attribution on its own (and the bound
on framing) is tested in tests/test_attribution.py.
"""

from __future__ import annotations

import math

import pytest

from pipeguard.v1 import pipeguard_pb2 as pb
from tests.conftest import tiny_run
from tests.test_adversary import ATTACKER, assert_standby_took_stage_1, roles, run_with_attacker

pytestmark = pytest.mark.multiprocess

STEPS = 3


def liveness_run() -> CoordinatorConfig:
    """Three stages of the tiny model, two micro-batches, the default audit rate; the first step
    waits for all four nodes (three stages and a standby)."""
    return tiny_run({"pipeline.stages": 3, "pipeline.min_nodes": 4, "train.steps": STEPS, "train.micro_batches": 2,
                     "timeouts.step": 20.0})


@pytest.mark.timeout(150)
@pytest.mark.parametrize("attack", ["wire:bad-signature", "wire:replay"])
def test_a_node_whose_messages_are_refused_is_taken_out_of_the_pipeline_not_banned(testnet, attack):
    net = testnet(liveness_run())
    status, ids = run_with_attacker(net, ["--attack", attack], timeout=120)
    assert [p.step for p in status.losses] == list(range(STEPS)), "the run finished every step"
    assert all(math.isfinite(p.loss) for p in status.losses)
    assert {n.node_id for n in status.nodes if n.role == pb.ROLE_BANNED} == set(), "a refused stream is no proof"
    assert roles(status)[ids[ATTACKER]] == pb.ROLE_STANDBY, "the attacker is back to standby"
    aside = [e for e in status.events if e.kind == "node_set_aside"]
    assert [e.node_id for e in aside] == [ids[ATTACKER]], [e.message for e in aside]
    assert ("refused by pipeline neighbour" if attack == "wire:bad-signature" else "stale or replayed") in aside[0].message
    assert not [e for e in status.events if e.kind == "node_demoted"], "one accuser (or none) demotes nobody"
    assert all(not n.distrusted and not n.ban_reason for n in status.nodes)
    assert_standby_took_stage_1(status, ids)
    assert status.detections == 0 and not status.evidence
