"""Refusal attribution on its own: who is taken out of the pipeline after a step failed every
attempt, and the bound on framing (coordinator/attribution.py; no network)."""

from __future__ import annotations

import asyncio
import math
import time

import pytest

from coordinator.attribution import RefusalAttribution, attribute
from coordinator.pipeline import Pipeline
from coordinator.registry import NodeRecord, Registry
from coordinator.state import EventLog, RunStore
from pipeguard.identity import Identity
from pipeguard.v1 import pipeguard_pb2 as pb
from tests.test_planning import plan_for

pytestmark = [pytest.mark.unit, pytest.mark.timeout(30)]


def attribution_with_pipeline(tmp_path, stages: int = 3, standbys: int = 1) -> tuple[RefusalAttribution, list[str]]:
    """Attribution over a real registry, run store and event log, whose pipeline is formed of
    ``stages`` registered nodes in order, with ``standbys`` more registered as standbys."""
    store = RunStore(tmp_path)
    state, _ = store.load_or_create("run-attribution")
    registry = Registry(30.0, challenge_ttl=5.0)
    pipeline = Pipeline()
    ids = []
    for i in range(stages + standbys):
        node = Identity.generate()
        rec = NodeRecord(node_id=node.node_id, public_key=node.public_key, address=f"127.0.0.1:{7100 + i}",
                         role=pb.ROLE_STAGE if i < stages else pb.ROLE_STANDBY, stage=i if i < stages else -1)
        rec.heartbeat_seq = 1
        rec.last_heartbeat = math.inf  # heartbeating throughout, unless a test silences it
        registry.nodes[rec.node_id] = rec
        ids.append(rec.node_id)
    pipeline.nodes, pipeline.slots = [registry.nodes[i] for i in ids[:stages]], list(range(stages))
    return RefusalAttribution(registry, state, store, EventLog(store), pipeline, attempts=3,
                              heartbeat_interval=0.01), ids


def refused(att: RefusalAttribution, sender: str, reporter: str, count: int) -> None:
    """What ``reporter``'s heartbeat reports: it has refused ``count`` of ``sender``'s messages."""
    att.registry.rejected_by_peers.setdefault(sender, {})[reporter] = count


def unattributed(att: RefusalAttribution, sender: str, reporter: str, count: int) -> None:
    """``reporter`` has refused ``count`` of ``sender``'s signed streams as stale or replayed."""
    att.registry.unattributed_by_peers.setdefault(sender, {})[reporter] = count


def test_one_accuser_only_routes_the_sender_around_it_is_not_demoted(tmp_path):
    att, (a, b, c, d) = attribution_with_pipeline(tmp_path)
    refused(att, b, c, 1)  # before the step: not counted
    before = att.snapshot()
    refused(att, b, c, 7)
    refused(att, a, c, 50)  # c is not a's neighbour: ignored
    asyncio.run(att.after_failures(4, before))
    assert att.state.distrusted == {}, "one receiver's word demotes nobody"
    assert list(att.state.set_aside) == [b] and "6 of its messages" in att.state.set_aside[b]
    assert "3 failed attempts of step 4" in att.state.set_aside[b] and "not demoted" in att.state.set_aside[b]
    assert att.pipeline.reform_needed
    assert att.events.recent[-1].kind == "node_set_aside" and att.events.recent[-1].node_id == b
    assert all(r.role != pb.ROLE_BANNED for r in att.registry.nodes.values()), "not a ban"
    plan = plan_for(list(att.registry.nodes.values()), distrusted=att.state.distrusted, step=4,
                    set_aside=att.state.set_aside)
    assert plan.holders[1].node_id == d and not plan.skipped, "the standby takes its stage"
    assert RunStore(tmp_path).load_or_create("run-attribution", resume=True)[0].set_aside == att.state.set_aside


def test_a_sender_two_neighbours_refused_is_distrusted_and_not_planned_again(tmp_path):
    att, (a, b, c, d) = attribution_with_pipeline(tmp_path)
    before = att.snapshot()
    refused(att, b, a, 2)
    refused(att, b, c, 3)
    asyncio.run(att.after_failures(4, before))
    assert set(att.state.distrusted) == {b} and "2 different pipeline neighbours" in att.state.distrusted[b]
    assert att.events.recent[-1].kind == "node_demoted" and att.events.recent[-1].node_id == b
    assert att.state.set_aside == {}
    plan = plan_for(list(att.registry.nodes.values()), distrusted=att.state.distrusted, step=4)
    assert plan.holders[1].node_id == d and not plan.skipped
    assert RunStore(tmp_path).load_or_create("run-attribution", resume=True)[0].distrusted == att.state.distrusted


def test_accusers_add_up_over_the_run(tmp_path):
    # c refuses b (b set aside); b comes back later next to a, who refuses it too: two accusers
    att, (a, b, c, d) = attribution_with_pipeline(tmp_path)
    refused(att, b, c, 2)
    asyncio.run(att.after_failures(1, {}))
    assert att.state.distrusted == {} and list(att.state.set_aside) == [b]
    att.pipeline.nodes = [att.registry.nodes[i] for i in (a, b, d)]
    before = att.snapshot()
    refused(att, b, a, 2)
    asyncio.run(att.after_failures(2, before))
    assert set(att.state.distrusted) == {b}


def test_a_silent_pipeline_node_is_routed_around_before_any_live_one(tmp_path):
    # b crashed: the step failed with nothing charged, and b sends no heartbeat since. Rotating a
    # (live, honest) out instead would move a healthy stage and leave the dead one in place.
    att, (a, b, c, d) = attribution_with_pipeline(tmp_path)
    att.registry.nodes[b].last_heartbeat = time.monotonic() - 1.0
    asyncio.run(att.after_failures(4, att.snapshot()))
    assert att.state.distrusted == {} and list(att.state.set_aside) == [b] and att.pipeline.reform_needed
    assert "silent" in att.state.set_aside[b] and "not demoted" in att.state.set_aside[b]


def test_no_charged_refusals_route_around_one_node_in_turn_and_demote_nobody(tmp_path):
    att, (a, b, c, d) = attribution_with_pipeline(tmp_path)
    refused(att, b, c, 3)  # old refusals only
    asyncio.run(att.after_failures(4, att.snapshot()))
    assert att.state.distrusted == {} and list(att.state.set_aside) == [a] and att.pipeline.reform_needed
    assert "attributed to nobody" in att.state.set_aside[a]
    asyncio.run(att.after_failures(5, att.snapshot()))
    assert list(att.state.set_aside) == [a, b], "the next one round the pipeline"
    # stale or replayed streams of one sender (a hint, never a charge) say where to start
    before = att.snapshot()
    unattributed(att, c, b, 4)
    asyncio.run(att.after_failures(6, before))
    assert list(att.state.set_aside) == [a, b, c] and "stale or replayed" in att.state.set_aside[c]
    assert att.state.distrusted == {}


def test_a_receiver_that_frames_a_second_neighbour_is_distrusted_itself(tmp_path):
    # b lies: it reports refusing a's (honest) messages. a is set aside; the standby d takes stage
    # 0, and b reports d the same way: the reporter common to both is the one taken out, and a,
    # set aside on b's word alone, is a candidate like any other again.
    att, (a, b, c, d) = attribution_with_pipeline(tmp_path)
    refused(att, a, b, 4)
    asyncio.run(att.after_failures(1, {}))
    assert att.state.distrusted == {} and list(att.state.set_aside) == [a]
    att.pipeline.nodes = [att.registry.nodes[i] for i in (d, b, c)]
    before = att.snapshot()
    refused(att, d, b, 4)
    asyncio.run(att.after_failures(2, before))
    assert set(att.state.distrusted) == {b}, "the liar, never an honest neighbour"
    assert "second neighbour" in att.state.distrusted[b]
    assert att.state.set_aside == {}


def test_attribute_counts_only_pipeline_neighbours_and_breaks_ties_toward_the_earlier_stage():
    ids = ["a", "b", "c"]
    assert attribute(ids, {"a": {"c": 9}}, {}) is None, "c does not receive from a"
    assert attribute(ids, {"a": {"b": 2}, "b": {"a": 2}}, {}) == ("a", "b", 2)
    assert attribute(ids, {"b": {"a": 1, "c": 3}}, {"b": {"a": 1}}) == ("b", "c", 3)
