"""Pipeline formation as a pure plan (coordinator/planning.py): no network, no clock."""

from __future__ import annotations

import pytest

from coordinator.planning import Plan, plan
from coordinator.registry import NodeRecord
from pipeguard.v1 import pipeguard_pb2 as pb

pytestmark = [pytest.mark.unit, pytest.mark.timeout(10)]


def node(i: int, role: int = pb.ROLE_STANDBY, stage: int = -1) -> NodeRecord:
    """Node ``n<i>``, registered i-th."""
    return NodeRecord(node_id=f"n{i}", public_key=bytes(32), address=f"127.0.0.1:{7100 + i}", role=role, stage=stage,
                      registered_at=float(i))


def pipeline_of(stages: int, standbys: int = 0) -> list[NodeRecord]:
    """Stage holders n0..n<stages-1> in order, then standbys."""
    return [node(i, pb.ROLE_STAGE, i) for i in range(stages)] + [node(stages + i) for i in range(standbys)]


def plan_for(nodes: list[NodeRecord], *, stages: int = 3, alive=None, distrusted=(), skipped=(), step: int = 10,
             formed: bool = True, min_nodes: int = 0, just_started: bool = False, history=None,
             suspect_step=None, set_aside=()) -> Plan | None:
    return plan(stages=stages, nodes=nodes, alive={r.node_id for r in nodes} if alive is None else alive,
                distrusted=distrusted, skipped=set(skipped), step=step, formed=formed, min_nodes=min_nodes,
                just_started=just_started, history=set(range(stages)) if history is None else history,
                suspect_step=suspect_step, set_aside=list(set_aside))


def holders(p: Plan) -> dict[int, str]:
    return {slot: r.node_id for slot, r in p.holders.items()}


def test_fresh_start_gives_stages_in_registration_order_and_waits_for_min_nodes():
    nodes = [node(i) for i in (2, 0, 1, 3)]  # registered n0, n1, n2, n3 (listed out of order)
    p = plan_for(nodes, step=0, formed=False, history=set())
    assert holders(p) == {0: "n0", 1: "n1", 2: "n2"} and p.skipped == set() and p.rollback_to is None
    assert p.slots == [0, 1, 2] and p.lost == []
    assert plan_for(nodes, step=0, formed=False, history=set(), min_nodes=5) is None, "standbys to be ready first"
    assert plan_for(nodes[:2], step=0, formed=False, history=set()) is None, "two nodes cannot hold three stages"


def test_stage_holders_keep_their_stage():
    nodes = [node(0), node(1, pb.ROLE_STAGE, 2), node(2, pb.ROLE_STAGE, 0), node(3, pb.ROLE_STAGE, 1)]
    p = plan_for(nodes)
    assert holders(p) == {0: "n2", 1: "n3", 2: "n1"}, "the standby registered first does not displace anyone"
    assert p.rollback_to is None and p.lost == []


def test_a_lost_middle_stage_goes_to_the_standby_from_a_checkpoint():
    nodes = pipeline_of(3, standbys=1)
    p = plan_for(nodes, alive={"n0", "n2", "n3"})
    assert holders(p) == {0: "n0", 1: "n3", 2: "n2"} and p.skipped == set()
    assert p.lost == [1] and p.rollback_to == 10, "the standby starts from the newest checkpoint"


def test_a_lost_middle_stage_without_a_standby_is_skipped():
    nodes = pipeline_of(3)
    p = plan_for(nodes, alive={"n0", "n2"})
    assert holders(p) == {0: "n0", 2: "n2"} and p.skipped == p.newly_skipped == {1} and p.slots == [0, 2]
    assert p.rollback_to == 10
    again = plan_for(nodes, alive={"n0", "n2"}, skipped={1})
    assert again.skipped == {1} and again.newly_skipped == set() and again.rollback_to is None, "skipped before"
    assert plan_for(nodes, alive={"n0", "n2"}, step=0) is None, "never skipped before the first step"
    assert plan_for(nodes, alive={"n0", "n2"}, just_started=True) is None, "its holder may be back any moment"


def test_a_lost_first_stage_without_a_standby_waits():
    assert plan_for(pipeline_of(3), alive={"n1", "n2"}) is None
    assert plan_for(pipeline_of(3), alive={"n0", "n1"}) is None, "nor can the last stage be skipped"


def test_a_holder_not_back_yet_after_a_restart_keeps_its_stage_waiting():
    nodes = pipeline_of(3, standbys=1)
    nodes[1].role = pb.ROLE_OFFLINE
    alive = {"n0", "n2", "n3"}
    assert plan_for(nodes, alive=alive, just_started=True) is None
    assert holders(plan_for(nodes, alive=alive)) == {0: "n0", 1: "n3", 2: "n2"}


@pytest.mark.parametrize("why", ["distrusted", "banned"])
def test_a_distrusted_or_banned_node_never_gets_a_stage(why):
    nodes = pipeline_of(3, standbys=2)
    bad = nodes[3]  # the standby registered first
    if why == "banned":
        bad.role = pb.ROLE_BANNED
    p = plan_for(nodes, alive={"n0", "n2", "n3", "n4"}, distrusted={"n3"} if why == "distrusted" else ())
    assert holders(p) == {0: "n0", 1: "n4", 2: "n2"}
    p = plan_for(nodes[:3] + [nodes[4]], distrusted={"n1"})  # a distrusted stage holder loses its stage
    assert holders(p) == {0: "n0", 1: "n4", 2: "n2"} and p.lost == [1]


def test_a_conviction_rolls_back_to_at_or_before_its_suspect_step():
    p = plan_for(pipeline_of(3), suspect_step=7)
    assert holders(p) == {0: "n0", 1: "n1", 2: "n2"} and p.lost == [] and p.rollback_to == 7
    assert plan_for(pipeline_of(3), suspect_step=12).rollback_to == 10, "never past the current step"


def test_a_node_set_aside_gives_its_stage_to_a_standby_and_is_the_last_spare_picked():
    nodes = pipeline_of(3, standbys=1)  # n0 n1 n2 hold stages, n3 stands by
    p = plan_for(nodes, set_aside=["n1"])
    assert holders(p) == {0: "n0", 1: "n3", 2: "n2"} and p.lost == [1], "the standby takes stage 1 (from a checkpoint)"
    # later n2 is set aside too, with n1 the only spare: n1 takes stage 2, as the last resort it is
    nodes = [node(0, pb.ROLE_STAGE, 0), node(1), node(2, pb.ROLE_STAGE, 2), node(3, pb.ROLE_STAGE, 1)]
    assert holders(plan_for(nodes, set_aside=["n1", "n2"])) == {0: "n0", 1: "n3", 2: "n1"}
    # the one set aside longest ago is picked first, and nobody set aside is ever kept out for good
    nodes = [node(0, pb.ROLE_STAGE, 0), node(1), node(2), node(3, pb.ROLE_STAGE, 1)]
    assert holders(plan_for(nodes, set_aside=["n2", "n1"])) == {0: "n0", 1: "n3", 2: "n2"}
    assert holders(plan_for(pipeline_of(3), set_aside=["n1"])) == {0: "n0", 1: "n1", 2: "n2"}, \
        "with no one else to take it, a node set aside keeps its stage (no rollback)"
