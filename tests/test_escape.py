"""Escapes through real servers: a backdoored start state, an accomplice auditor answering
"incomplete", a state served off its own attestation.

Multi-process tier: a coordinator and four nodes (node i serves stage i, node 3 stands by and is
the preferred auditor). Each test asserts that the cheater is convicted within a bounded number of
steps, that nobody honest is, that the evidence verifies offline, and that the run completes.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeguard.data import stdlib_corpus
from pipeguard.evidence import verify_bundle
from pipeguard.model import GPTConfig, OptimSettings
from pipeguard.reference import train_reference
from pipeguard.v1 import pipeguard_pb2 as pb
from tests.conftest import tiny_run
from tests.test_collusion import banned, start

pytestmark = pytest.mark.multiprocess


def escape_run(steps: int, rate: float, min_nodes: int = 4, checkpoint_every: int = 100):
    return tiny_run({"pipeline.stages": 3, "pipeline.min_nodes": min_nodes, "train.steps": steps, "audit.rate": rate,
                     "audit.screen": False, "audit.recheck_rate": 0.0, "audit.checkpoint_every": checkpoint_every,
                     "audit.retention": 4, "train.seed": 7, "model.n_layer": 3, "train.micro_batches": 4})


def clean_losses(steps: int) -> list[float]:
    """The losses of ``escape_run``'s training in one process, nobody attacking."""
    torch.set_num_threads(1)
    return train_reference(GPTConfig(block_size=32, n_layer=3, n_head=2, n_embd=32),
                           OptimSettings(lr=3e-3, warmup_steps=2, total_steps=steps), stdlib_corpus(262144), seed=7,
                           steps=steps, micro_batches=4, micro_batch_size=4).losses


@pytest.mark.timeout(150)
def test_a_backdoored_start_state_is_convicted_before_step_zero(testnet):
    # No audits at all: the seed alone catches it. Three nodes are left to form the pipeline again.
    net = testnet(escape_run(steps=4, rate=0.0, min_nodes=3))
    start(net, {1: '[attack]\nbehaviours = ["state:backdoor"]\n'})
    attacker = net.nodes[1].node_id
    status = net.wait_finished(timeout=130)
    bans = banned(status)
    assert set(bans) == {attacker}, bans
    assert "seeded initialisation" in bans[attacker]
    results = [verify_bundle(Path(p), pinned_coordinator=status.coordinator_key) for p in status.evidence]
    assert [r.kind for r in results] == ["initial-state"] and results[0].valid, [r.summary for r in results]
    assert results[0].accused == attacker
    assert [p.step for p in status.losses] == list(range(4))


@pytest.mark.timeout(170)
def test_an_auditor_answering_incomplete_for_its_partner_shields_nothing(testnet):
    steps = 6
    net = testnet(escape_run(steps=steps, rate=1.0))
    start(net, {1: '[attack]\nbehaviours = ["forward:reverse"]\nstart_step = 1\n',
                3: '[attack]\nbehaviours = ["audit:shield"]\naccomplices = ["ATTACKER"]\n'})
    attacker = net.nodes[1].node_id
    status = net.wait_finished(timeout=150)
    bans = banned(status)
    assert set(bans) == {attacker}, bans  # the shield is not convicted (an incomplete verdict proves nothing)
    ban = next(e for e in status.events if e.kind == "banned")
    assert ban.step == 1, "at p = 1 the first poisoned step convicts, through the judge's own re-check"
    assert any(e.kind == "audit_incomplete" and e.node_id == attacker for e in status.events)
    assert all(verify_bundle(Path(p)).valid for p in status.evidence)
    # Rolled back and trained on without the attacker: the run's losses are the clean run's.
    assert [p.step for p in status.losses] == list(range(steps))
    torch.testing.assert_close([p.loss for p in status.losses], clean_losses(steps), rtol=1e-4, atol=1e-5)


@pytest.mark.timeout(170)
def test_weights_swapped_after_commit_are_convicted_as_a_state_served_off_its_attestation(testnet):
    net = testnet(escape_run(steps=6, rate=1.0))
    start(net, {1: '[attack]\nbehaviours = ["update:swap-after-commit"]\nstart_step = 1\n'})
    attacker = net.nodes[1].node_id
    status = net.wait_finished(timeout=150)
    bans = banned(status)
    assert set(bans) == {attacker}, bans
    assert "off its own signed attestation" in bans[attacker]
    ban = next(e for e in status.events if e.kind == "banned")
    # From step 2 on every state it serves is off its attestation; at p = 1 the judge meets one
    # per stage-step (the update audit), and the third convicts.
    assert ban.step <= 4, ban
    results = [verify_bundle(Path(p)) for p in status.evidence]
    assert [r.kind for r in results] == ["off-attestation"] and results[0].valid, [r.summary for r in results]
    assert [p.step for p in status.losses] == list(range(6))


@pytest.mark.timeout(170)
def test_an_honest_node_whose_audits_keep_coming_back_incomplete_is_never_convicted(testnet):
    """The other side of the re-check: incomplete verdicts about an honest node (its auditor always
    answers "incomplete") are recomputed by the judge, pass, and convict nobody — neither the honest
    node nor the auditor, whose word proves nothing either way; the run completes as clean."""
    steps = 4
    net = testnet(escape_run(steps=steps, rate=1.0))
    start(net, {3: '[attack]\nbehaviours = ["audit:shield"]\naccomplices = ["ATTACKER"]\n'})
    honest = net.nodes[1].node_id
    status = net.wait_finished(timeout=150)
    assert banned(status) == {}, banned(status)
    assert not status.evidence and status.detections == 0
    assert any(e.kind == "audit_incomplete" and e.node_id == honest for e in status.events), \
        "the auditor did answer incomplete about the honest node"
    assert all(not n.distrusted for n in status.nodes)
    assert [p.step for p in status.losses] == list(range(steps))


@pytest.mark.timeout(170)
@pytest.mark.parametrize("start_step, checkpoint_every", [(0, 100), (2, 2)], ids=["formation", "periodic"])
def test_a_holder_serving_the_checkpoint_fetch_off_its_attestation_is_routed_around(testnet, start_step,
                                                                                     checkpoint_every):
    """The coordinator's own checkpoint fetch (at formation, or every ``checkpoint_every`` steps)
    gets the holder's state off its signed attestation: the judge counts it, the holder is taken
    out of the pipeline at once (demoted) (a standby takes its stage from the last verified checkpoint) and the run
    completes every step, as clean, instead of retrying the same checkpoint forever. Nobody honest
    is demoted or banned; no audits at all (rate 0): the checkpoint alone catches it."""
    steps = 6
    net = testnet(escape_run(steps=steps, rate=0.0, checkpoint_every=checkpoint_every))
    start(net, {1: f'[attack]\nbehaviours = ["state:off-attestation"]\nstart_step = {start_step}\n'})
    attacker = net.nodes[1].node_id
    standby = net.nodes[3].node_id
    status = net.wait_finished(timeout=150)
    assert [p.step for p in status.losses] == list(range(steps)), "the run finished every planned step"
    assert banned(status) == {}, "one state off its attestation proves too little for a ban"
    aside = [e for e in status.events if e.kind == "node_demoted"]
    assert [e.node_id for e in aside] == [attacker], [e.message for e in aside]
    assert aside[0].step == start_step
    assert [e.node_id for e in status.events if e.kind == "off_attestation"] == [attacker]
    by_id = {n.node_id: n for n in status.nodes}
    assert by_id[standby].role == pb.ROLE_STAGE and by_id[standby].stage == 1, "the standby took the stage"
    assert by_id[attacker].role == pb.ROLE_STANDBY
    torch.testing.assert_close([p.loss for p in status.losses], clean_losses(steps), rtol=1e-4, atol=1e-5)


@pytest.mark.timeout(200)
def test_a_holder_withholding_its_state_from_every_audit_is_routed_around_and_its_steps_undone(testnet):
    """Stage 1 negates its activations from step 2 and serves no auditor, nor the judge, the state
    of any step it has begun, so none of its audits can be completed (at p = 1 every stage-step
    is audited: each update audit stands for the stage-step's forward audits, and those run on
    their own when it cannot be settled). A refusal proves nothing, so nobody is banned; but the
    second audit it keeps from the judge routes it around, and the run rolls back to before the
    first step it kept unchecked: the final losses are the clean run's, poison undone."""
    steps = 8
    net = testnet(escape_run(steps=steps, rate=1.0, checkpoint_every=2))
    start(net, {1: '[attack]\nbehaviours = ["forward:reverse", "state:withhold"]\nstart_step = 2\n'})
    attacker, standby = net.nodes[1].node_id, net.nodes[3].node_id
    status = net.wait_finished(timeout=180)
    assert banned(status) == {}, "withholding proves nothing: no ban"
    withheld = [e for e in status.events if e.kind == "state_withheld"]
    assert withheld and {e.node_id for e in withheld} == {attacker}, [e.message for e in withheld]
    aside = [e for e in status.events if e.kind == "node_set_aside"]
    assert [e.node_id for e in aside] == [attacker], [e.message for e in aside]
    assert not any(e.kind == "node_demoted" for e in status.events)
    by_id = {n.node_id: n for n in status.nodes}
    assert by_id[standby].role == pb.ROLE_STAGE and by_id[standby].stage == 1, "the standby took the stage"
    assert [p.step for p in status.losses] == list(range(steps))
    torch.testing.assert_close([p.loss for p in status.losses], clean_losses(steps), rtol=1e-4, atol=1e-5)
