"""Coordinated attacks: a lying auditor shielding its accomplice, and a patient attacker.

Unit tier: ``false-clearance`` evidence bundles built in-process from real signed claims (an
auditor's signed PASS over a tampered activation) and what ``verify_bundle`` accepts and
refuses. Multi-process tier: real testnets where the standby auditor signs PASS for the stage
node it covers (``audit:clear``); the coordinator's re-check of PASS verdicts must catch and ban
both, and nobody else.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipeguard import audit, claims
from pipeguard.data import stdlib_corpus
from pipeguard.evidence import FALSE_CLEARANCE_MARGIN, verify_bundle, write_audit_bundle
from pipeguard.identity import Identity
from pipeguard.computation import StageComputation, StageSetup, model_spec, train_spec
from pipeguard.model import GPTConfig, OptimSettings
from pipeguard.signing import sign
from pipeguard.tensors import PAYLOAD_DIGEST, WIRE_DTYPES, ReceivedTensor, payload_digest
from pipeguard.v1 import pipeguard_pb2 as pb
from tests.conftest import tiny_run

pytestmark = pytest.mark.multiprocess

SEED = 7
GPT = GPTConfig(block_size=32, n_layer=3, n_head=2, n_embd=32)
TOL = 1e-3
RUN = "collusion-run"


# -- unit tier: false-clearance bundles --------------------------------------------------------


@pytest.fixture(scope="module")
def dataset():
    return stdlib_corpus(262144)


def forward_audit(dataset, tamper, verdict_kind=pb.VERDICT_PASS, attach=True, seen_tamper=None):
    """A forward audit of stage 0 (of 3), micro-batch 0, step 0, with every claim really signed:
    the target's step report, state attestation and output commitment, the coordinator's audit
    order and the auditor's verdict. ``tamper`` changes the output the target sends;
    ``seen_tamper`` (if given) the version attached to the verdict, signed by the target too."""
    coord, target, nxt, auditor = (Identity.generate() for _ in range(4))
    model, train = model_spec(GPT), train_spec(OptimSettings(lr=3e-3, warmup_steps=2, total_steps=10), seed=SEED,
                                               micro_batches=4, micro_batch_size=4)
    comp = StageComputation.build(StageSetup.from_specs(model, train, 0, 3))
    state = comp.snapshot()
    digest = comp.digest()
    assigned = claims.assignment_digest(pb.AssignRequest(run_id=RUN, stage=0, num_stages=3, model=model,
                                                         train=train, tolerance=TOL))
    report = sign(pb.StepReport(run_id=RUN, step=0, stage=0, node_id=target.node_id, state_digest=digest,
                                micro_batches=4, epoch=1, assignment_digest=assigned), target)
    attestation = sign(pb.StateAttestation(run_id=RUN, node_id=target.node_id, stage=0, step=0,
                                           state_digest=digest, epoch=1), target)
    x, y = comp.setup.batch(dataset, 0, 0)
    out = comp.forward(0, 0, x).output

    def commit(t):
        t = t.contiguous()
        header = pb.TensorHeader(run_id=RUN, step=0, micro_batch=0, stage=0, direction=pb.DIRECTION_FORWARD,
                                 sender=target.node_id, receiver=nxt.node_id, dtype=WIRE_DTYPES[t.dtype],
                                 shape=list(t.shape), epoch=1, assignment_digest=assigned,
                                 digest_algorithm=PAYLOAD_DIGEST)
        return ReceivedTensor(commitment=sign(pb.TensorCommitment(header=header, payload_digest=payload_digest(header, t)),
                                              target), tensor=t)

    sent = commit(tamper(out))
    req = pb.AuditRequest(
        run_id=RUN, audit_id=5, kind=pb.AUDIT_KIND_FORWARD, step=0, stage=0, micro_batch=0, num_stages=3,
        model=model, train=train,
        report=report, tolerance=TOL, epoch=1, auditor=auditor.node_id,
        tokens_digest=audit.tokens_digest({0: (x, y)}))
    req.target.CopyFrom(pb.PeerInfo(node_id=target.node_id, public_key=target.public_key, stage=0))
    req.next.CopyFrom(pb.PeerInfo(node_id=nxt.node_id, public_key=nxt.public_key, stage=1))
    sign(req, coord)
    art = audit.Artifacts(request=req, state=state, attestation=attestation,
                          outputs={(pb.DIRECTION_FORWARD, 0): sent}, tokens={0: (x, y)})
    verdict = pb.AuditVerdict(run_id=RUN, audit_id=5, auditor=auditor.node_id, verdict=verdict_kind,
                              detail="matches (made up)", order_digest=claims.order_digest(req))
    if attach:
        seen = art if seen_tamper is None else audit.Artifacts(
            request=req, attestation=attestation, outputs={(pb.DIRECTION_FORWARD, 0): commit(seen_tamper(out))})
        audit.attach_artifacts(verdict, seen)
    sign(verdict, auditor)
    return art, verdict, coord, auditor


def bundle(tmp_path, art, verdict, coord, auditor, name="b.pgev") -> Path:
    finding = audit.check(art)
    return write_audit_bundle(tmp_path / name, art, finding, coord.public_key, false_verdict=verdict,
                              auditor_key=auditor.public_key)


def test_a_pass_signed_over_a_reversed_activation_is_proof_against_the_auditor(tmp_path, dataset):
    art, verdict, coord, auditor = forward_audit(dataset, lambda t: -t)
    result = verify_bundle(bundle(tmp_path, art, verdict, coord, auditor), pinned_coordinator=coord.public_key)
    assert result.valid, result.summary
    assert result.kind == "false-clearance" and result.accused == auditor.node_id
    # The same artifacts also convict the audited node (the ordinary audit bundle).
    cheat = write_audit_bundle(tmp_path / "cheat.pgev", art, audit.check(art), coord.public_key)
    assert verify_bundle(cheat).valid and verify_bundle(cheat).accused == art.request.target.node_id


@pytest.mark.parametrize("case", ["honest-output", "near-tolerance", "verdict-is-fail", "auditor-saw-other-data",
                                  "verdict-forged"])
def test_false_clearance_bundles_that_prove_nothing_are_refused(tmp_path, dataset, case):
    tamper = {"honest-output": lambda t: t,
              # Fails the tolerance (2e-3 > 1e-3) but within the margin: an honest auditor's rounding
              # could not be blamed, so only the audited node can be convicted.
              "near-tolerance": lambda t: t * (1 + 2 * TOL)}.get(case, lambda t: -t)
    art, verdict, coord, auditor = forward_audit(
        dataset, tamper, verdict_kind=pb.VERDICT_FAIL if case == "verdict-is-fail" else pb.VERDICT_PASS,
        seen_tamper=(lambda t: t) if case == "auditor-saw-other-data" else None)
    if case == "verdict-forged":
        verdict.detail = "edited after signing"
    result = verify_bundle(bundle(tmp_path, art, verdict, coord, auditor))
    assert not result.valid, result.summary
    if case == "near-tolerance":
        assert f"{FALSE_CLEARANCE_MARGIN:g}x" in result.summary
        assert audit.check(art).verdict == pb.VERDICT_FAIL  # ...while the cheat itself is still a cheat
    if case == "auditor-saw-other-data":
        assert "equivocated" in result.summary


def test_a_made_up_other_version_attached_to_the_pass_does_not_excuse_the_auditor(tmp_path, dataset):
    art, verdict, coord, auditor = forward_audit(dataset, lambda t: -t)
    fake = pb.TensorCommitment()
    fake.CopyFrom(verdict.commitments[0])
    fake.payload_digest = bytes(32)  # "the target showed me another output" -- never signed by it
    verdict.commitments.append(fake)
    sign(verdict, auditor)
    result = verify_bundle(bundle(tmp_path, art, verdict, coord, auditor))
    assert result.valid and result.accused == auditor.node_id, result.summary


def test_screen_flagged_audits_are_marked_for_a_recheck_of_their_pass(tmp_path):
    from coordinator.audits import AuditScheduler, StepRecord
    from coordinator.config import AuditConfig, CoordinatorConfig, PipelineConfig, TrainConfig
    from coordinator.registry import NodeRecord

    ids = [Identity.generate() for _ in range(3)]
    nodes = [NodeRecord(node_id=i.node_id, public_key=i.public_key, address=f"127.0.0.1:{7001 + n}", stage=n)
             for n, i in enumerate(ids)]
    # Stage 2 flagged the activation stage 1 sent it for micro-batch 1; nothing else is drawn (rate 0).
    reports = [pb.StepReport(run_id=RUN, step=3, stage=n, node_id=i.node_id) for n, i in enumerate(ids)]
    reports[2].flags.add(direction=pb.DIRECTION_FORWARD, micro_batch=1)
    for screen in (True, False):
        cfg = CoordinatorConfig(audit=AuditConfig(rate=0.0, tolerance=TOL, screen=screen),
                                train=TrainConfig(micro_batches=4), pipeline=PipelineConfig(stages=3))
        sched = AuditScheduler(cfg=cfg, run_id=RUN, data_digest=b"", identity=Identity.generate(), registry=None,
                               events=None, dataset=None, judge=None, channels=None)
        drawn = sched.select(StepRecord(step=3, epoch=1, nodes=nodes, slots=[0, 1, 2], reports=reports))
        if not screen:
            assert drawn == [] and sched.flagged_ids == set()
            continue
        assert [(r.stage, r.kind, r.micro_batch, r.target.node_id) for r in drawn] == [
            (1, pb.AUDIT_KIND_FORWARD, 1, ids[1].node_id)]
        assert sched.flagged_ids == {drawn[0].audit_id}, "its PASS will be re-checked by the coordinator"


def test_forward_and_backward_audits_of_a_stage_step_whose_update_is_audited_are_folded_into_it():
    """The update audit replays the whole stage-step and compares everything the stage sent, so
    the forward/backward audits drawn for the same stage and step are not replayed again; a
    screen-flagged message is still audited on its own (its PASS is always re-checked)."""
    from coordinator.audits import AuditScheduler, StepRecord
    from coordinator.config import AuditConfig, CoordinatorConfig, PipelineConfig, TrainConfig
    from coordinator.registry import NodeRecord

    ids = [Identity.generate() for _ in range(3)]
    nodes = [NodeRecord(node_id=i.node_id, public_key=i.public_key, address=f"127.0.0.1:{7001 + n}", stage=n)
             for n, i in enumerate(ids)]
    reports = [pb.StepReport(run_id=RUN, step=3, stage=n, node_id=i.node_id) for n, i in enumerate(ids)]
    reports[2].flags.add(direction=pb.DIRECTION_FORWARD, micro_batch=1)
    cfg = CoordinatorConfig(audit=AuditConfig(rate=1.0, tolerance=TOL, screen=True),
                            train=TrainConfig(micro_batches=4), pipeline=PipelineConfig(stages=3))
    sched = AuditScheduler(cfg=cfg, run_id=RUN, data_digest=b"", identity=Identity.generate(), registry=None,
                           events=None, dataset=None, judge=None, channels=None)
    record = StepRecord(step=3, epoch=1, nodes=nodes, slots=[0, 1, 2], reports=reports)
    drawn = sched.select(record)
    assert record.update_drawn == {0, 1, 2}, "p = 1: every stage's update audit is drawn"
    assert [(r.stage, r.kind, r.micro_batch) for r in drawn] == [(1, pb.AUDIT_KIND_FORWARD, 1)], "only the flagged one"
    # 4 micro-batches: stages 0 and 1 send activations, stages 1 and 2 send gradients; one flagged
    assert sched.stats.folded == 4 * 4 - 1
    # kept to run on their own should the update audit of their stage-step not be settled
    assert sorted((pos, len(drawn)) for pos, drawn in record.folded.items()) == [(0, 4), (1, 7), (2, 4)]
    assert all(kind != pb.AUDIT_KIND_UPDATE for drawn in record.folded.values() for kind, _ in drawn)
    assert (pb.AUDIT_KIND_FORWARD, 1) not in record.folded[1], "the flagged one is audited on its own"
    cfg.audit.rate = 0.0
    assert sched.select(StepRecord(step=4, epoch=1, nodes=nodes, slots=[0, 1, 2], reports=reports[:2] + [
        pb.StepReport(run_id=RUN, step=4, stage=2, node_id=ids[2].node_id)])) == []
    assert sched.stats.folded == 15, "nothing drawn, nothing folded"


def test_the_forward_and_backward_audits_drawn_for_a_stage_step_go_out_as_one_order():
    """One order per stage-step for its drawn forward/backward messages (AuditRequest.also): each
    message keeps its own odds of being drawn; a screen-flagged one still goes on its own."""
    import random

    from coordinator.audits import AuditScheduler, StepRecord
    from coordinator.config import AuditConfig, CoordinatorConfig, PipelineConfig, TrainConfig
    from coordinator.registry import NodeRecord

    ids = [Identity.generate() for _ in range(3)]
    nodes = [NodeRecord(node_id=i.node_id, public_key=i.public_key, address=f"127.0.0.1:{7001 + n}", stage=n)
             for n, i in enumerate(ids)]
    cfg = CoordinatorConfig(audit=AuditConfig(rate=0.5, tolerance=TOL, screen=True),
                            train=TrainConfig(micro_batches=4), pipeline=PipelineConfig(stages=3))
    sched = AuditScheduler(cfg=cfg, run_id=RUN, data_digest=b"", identity=Identity.generate(), registry=None,
                           events=None, dataset=stdlib_corpus(65536), judge=None, channels=None)
    sched.rng = random.Random(7)  # a fixed draw, for the test only
    checked, orders = 0, 0
    for step in range(40):
        reports = [pb.StepReport(run_id=RUN, step=step, stage=n, node_id=i.node_id) for n, i in enumerate(ids)]
        reports[2].flags.add(direction=pb.DIRECTION_FORWARD, micro_batch=1)  # stage 1's activation 1
        record = StepRecord(step=step, epoch=1, nodes=nodes, slots=[0, 1, 2], reports=reports)
        drawn = sched.select(record)
        flagged = [r for r in drawn if r.audit_id in sched.flagged_ids]
        assert [(r.stage, r.kind, r.micro_batch, len(r.also)) for r in flagged] == [(1, pb.AUDIT_KIND_FORWARD, 1, 0)]
        merged = [r for r in drawn if r.audit_id not in sched.flagged_ids]
        assert len({r.stage for r in merged}) == len(merged), "one order per stage-step"
        for r in merged:
            assert r.stage not in record.update_drawn, "an audited update answers them (folded)"
            items = {(r.kind, r.micro_batch), *((it.kind, it.micro_batch) for it in r.also)}
            assert len(items) == 1 + len(r.also), "no message twice"
            assert all((k, r.stage) not in ((pb.AUDIT_KIND_FORWARD, 2), (pb.AUDIT_KIND_BACKWARD, 0)) for k, _ in items)
            assert (pb.AUDIT_KIND_FORWARD, 1) not in items or r.stage != 1, "the flagged one is not repeated"
            checked += len(items)
        orders += len(merged)
    assert orders < checked, "several messages of a stage-step share an order"
    assert sched.stats.merged == checked - orders


# -- multi-process tier ---------------------------------------------------------------------------


def collusion_run(steps: int, rate: float, recheck: float, screen: bool = True):
    return tiny_run({"pipeline.stages": 3, "pipeline.min_nodes": 4, "train.steps": steps, "audit.rate": rate,
                     "audit.screen": screen, "audit.recheck_rate": recheck, "audit.checkpoint_every": 4,
                     "audit.retention": 4})


def start(net, tables: dict[int, str]) -> None:
    """Four nodes in order (node i serves stage i, node 3 stands by and is the preferred auditor)."""
    net.start_coordinator()
    for i in range(4):
        extra = []
        if i in tables:
            path = net.workdir / f"node{i}.toml"
            path.write_text(tables[i].replace("ATTACKER", net.nodes[1].node_id if len(net.nodes) > 1 else ""))
            extra = ["--config", str(path)]
        net.start_node(*extra)
        net.wait_registered(i + 1)


def banned(status: pb.StatusReply) -> dict[str, str]:
    return {n.node_id: n.ban_reason for n in status.nodes if n.role == pb.ROLE_BANNED}


@pytest.mark.timeout(180)
def test_colluding_auditor_and_its_accomplice_are_both_banned(testnet):
    # Screen off: only random audits (p = 0.5) and random re-checks (0.5) of their PASS verdicts.
    net = testnet(collusion_run(steps=14, rate=0.5, recheck=0.5, screen=False))
    start(net, {1: '[attack]\nbehaviours = ["forward:reverse"]\nstart_step = 1\n',
                3: '[attack]\nbehaviours = ["audit:clear"]\naccomplices = ["ATTACKER"]\n'})
    attacker, liar = net.nodes[1].node_id, net.nodes[3].node_id
    status = net.wait_finished(timeout=160)

    bans = banned(status)
    assert set(bans) == {attacker, liar}, bans
    assert "false clearance" in bans[liar] and attacker[:8] in bans[liar]
    results = {verify_bundle(Path(p)).kind: verify_bundle(Path(p)) for p in status.evidence}
    assert results["false-clearance"].valid and results["false-clearance"].accused == liar
    assert results["audit"].valid and results["audit"].accused == attacker
    assert all(r.valid for r in results.values()), [r.summary for r in results.values()]
    out = subprocess.run([sys.executable, "-m", "pipeguard.app.cli", "verify", *status.evidence, "--coordinator-key",
                          status.coordinator_key_hex], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "VALID (false-clearance)" in out.stdout, out.stdout + out.stderr
    # No standby is left: stage 1 is bypassed and training goes on to the end.
    assert any(e.kind == "stage_skipped" for e in status.events)
    assert [p.step for p in status.losses] == list(range(14))


@pytest.mark.timeout(150)
def test_patient_attacker_is_caught_only_after_it_starts(testnet):
    k = 5
    net = testnet(collusion_run(steps=12, rate=0.5, recheck=0.1, screen=False))
    start(net, {1: f'[attack]\nbehaviours = ["forward:reverse"]\nstart_step = {k}\n'})
    attacker = net.nodes[1].node_id
    status = net.wait_finished(timeout=130)

    bans = banned(status)
    assert set(bans) == {attacker}, bans
    ban = next(e for e in status.events if e.kind == "banned")
    assert ban.step >= k, f"convicted for step {ban.step}, before it started cheating at {k}"
    assert not any(e.kind == "audit_failed" and e.step < k for e in status.events)
    assert all(verify_bundle(Path(p)).valid for p in status.evidence)
