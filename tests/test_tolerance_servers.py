"""A budget-riding node through real servers (issue 11, item 7). Multi-process tier.

The testnet of tests/test_adversary.py (coordinator, three stages of the tiny model, a standby
that audits; every message and update audited, p = 1, screen on); stage 1's node rides the
audit's per-element allowance with the built-in ``ride`` behaviours, configured with the flags
a user types. Beyond the allowance it is convicted, with evidence that verifies offline, and
only it; within it nothing can tell it from rounding, so nobody is convicted and the run
completes (the unit half, and why that is harmless, are tests/test_tolerance.py and
benchmarks/budget_riding.py).
"""

from __future__ import annotations

import pytest

from pipeguard.v1 import pipeguard_pb2 as pb
from tests.test_adversary import STEPS, adversary_run, assert_attacker_banned_with_evidence, run_with_attacker

pytestmark = pytest.mark.multiprocess


@pytest.mark.timeout(150)
@pytest.mark.parametrize("attack, reason", [
    ("forward:ride", "forward activation"),
    ("update:ride", "weight update"),
], ids=["forward:ride", "update:ride"])
def test_a_ride_beyond_the_allowance_is_convicted_at_p_1(testnet, attack, reason):
    net = testnet(adversary_run())
    status, ids = run_with_attacker(net, ["--attack", attack, "--attack-ride", "3"])
    assert_attacker_banned_with_evidence(status, ids, reason)


@pytest.mark.timeout(150)
def test_a_ride_within_the_allowance_is_not_convicted_and_the_run_completes(testnet):
    net = testnet(adversary_run())
    status, ids = run_with_attacker(net, ["--attack", "forward:ride", "--attack", "backward:ride",
                                          "--attack", "update:ride", "--attack-ride", "0.9"])
    assert {n.node_id for n in status.nodes if n.role == pb.ROLE_BANNED} == set()
    assert status.detections == 0 and not status.evidence
    holder = {n.stage: n.node_id for n in status.nodes if n.role == pb.ROLE_STAGE}
    assert holder[1] == ids[1], "the rider kept its stage: nothing it did is distinguishable from rounding"
    assert [p.step for p in status.losses] == list(range(STEPS)), "the run finished every step"
