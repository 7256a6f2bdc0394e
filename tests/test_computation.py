"""The stage computation: chained stages make claims that the audit check confirms exactly.

Unit tier, no network: a 4-stage split (first, two middle, last) trained one step in process
through ``pipeguard.computation``, every claim really signed, each audit kind of each stage
fed to ``audit.check`` at tolerance 0. Plus the one set-up validation, shared by the node and
the auditor.
"""

from __future__ import annotations

import math

import pytest
import torch

from node.stage import Assignment
from pipeguard import audit
from pipeguard import claims as rules
from pipeguard.claims import served_state
from pipeguard.computation import StageComputation, StageSetup, model_spec, train_spec
from pipeguard.data import stdlib_corpus
from pipeguard.errors import InvalidArgument
from pipeguard.identity import Identity
from pipeguard.model import GPTConfig, OptimSettings, lr_at
from pipeguard.signing import sign
from pipeguard.tensors import PAYLOAD_DIGEST, WIRE_DTYPES, ReceivedTensor, payload_digest
from pipeguard.v1 import pipeguard_pb2 as pb

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]

RUN, SEED, STEP, EPOCH, M, B = "computation-run", 11, 0, 1, 2, 2
STAGES = 4
GPT = GPTConfig(block_size=16, n_layer=4, n_head=2, n_embd=16)
OPTIM = OptimSettings(lr=3e-3, warmup_steps=2, total_steps=10)
MODEL, TRAIN = model_spec(GPT), train_spec(OPTIM, seed=SEED, micro_batches=M, micro_batch_size=B)
FORWARD, BACKWARD = pb.DIRECTION_FORWARD, pb.DIRECTION_BACKWARD


def assigned(stage: int) -> bytes:
    """The assignment digest each stage signs (the audit orders below restate the same settings)."""
    return rules.assignment_digest(pb.AssignRequest(run_id=RUN, stage=stage, num_stages=STAGES, model=MODEL,
                                                    train=TRAIN, tolerance=0.0))


@pytest.fixture(scope="module")
def claims():
    """One step of a 4-stage pipeline, with what each stage would sign (reports, attestations, tensors)."""
    dataset = stdlib_corpus(65536)
    ids = [Identity.generate() for _ in range(STAGES)]
    peers = [pb.PeerInfo(node_id=i.node_id, public_key=i.public_key, stage=s) for s, i in enumerate(ids)]
    comps = [StageComputation.build(StageSetup.from_specs(MODEL, TRAIN, s, STAGES)) for s in range(STAGES)]
    states = [c.snapshot() for c in comps]
    sent: dict[tuple[int, int, int], ReceivedTensor] = {}  # (sender stage, direction, mb) -> signed tensor

    def commit(stage: int, direction: int, mb: int, t):
        receiver = stage + 1 if direction == FORWARD else stage - 1
        header = pb.TensorHeader(run_id=RUN, step=STEP, micro_batch=mb, stage=stage, direction=direction,
                                 sender=ids[stage].node_id, receiver=ids[receiver].node_id,
                                 dtype=WIRE_DTYPES[t.dtype], shape=list(t.shape), epoch=EPOCH,
                                 assignment_digest=assigned(stage), digest_algorithm=PAYLOAD_DIGEST)
        if stage > 0:  # the inputs it was computed from, as a node names them
            header.input_digest = sent[(stage - 1, FORWARD, mb)].commitment.payload_digest
        if direction == BACKWARD and stage < STAGES - 1:
            header.grad_input_digest = sent[(stage + 1, BACKWARD, mb)].commitment.payload_digest
        c = sign(pb.TensorCommitment(header=header, payload_digest=payload_digest(header, t.contiguous())), ids[stage])
        sent[(stage, direction, mb)] = ReceivedTensor(commitment=c, tensor=t.contiguous())

    tokens = {mb: comps[0].setup.batch(dataset, STEP, mb) for mb in range(M)}
    for mb in range(M):
        fwds, x = [], tokens[mb][0]  # (B, T)
        for s, c in enumerate(comps):
            fwds.append(c.forward(STEP, mb, x))
            if s < STAGES - 1:
                x = fwds[-1].output  # (B, T, C)
                commit(s, FORWARD, mb, x)
        g = tokens[mb][1]  # (B, T)
        for s in reversed(range(STAGES)):
            _, g = comps[s].backward(fwds[s], g)
            if s > 0:
                commit(s, BACKWARD, mb, g)
    sq = [c.grad_sq_norm() for c in comps]
    update = pb.ApplyUpdateRequest(run_id=RUN, step=STEP, global_grad_norm=math.sqrt(sum(sq)), lr=lr_at(STEP, OPTIM),
                                   epoch=EPOCH)
    digests = [c.digest() for c in comps]
    for c in comps:
        c.update(update.global_grad_norm, update.lr)
    return dict(ids=ids, peers=peers, states=states, next_states=[c.snapshot() for c in comps],
                digests=digests, next_digests=[c.digest() for c in comps], sq=sq, update=update, sent=sent,
                tokens=tokens)


def received_by(cl, stage: int) -> list[pb.ReceivedDigest]:
    """What ``stage`` computed from, as its step report names it."""
    out = []
    for mb in range(M):
        for sender, direction in ((stage - 1, FORWARD), (stage + 1, BACKWARD)):
            if (sender, direction, mb) in cl["sent"]:
                out.append(pb.ReceivedDigest(direction=direction, micro_batch=mb,
                                             payload_digest=cl["sent"][(sender, direction, mb)].commitment.payload_digest))
    return out


def artifacts(cl, stage: int, kind: int, coord: Identity | None = None, also: tuple = ()) -> audit.Artifacts:
    """The artifacts of an audit of ``stage``'s micro-batch 0 message ``kind`` (and of each further
    (kind, micro-batch) in ``also``, merged into the one order), as ``gather`` would assemble them."""
    ids, peers = cl["ids"], cl["peers"]
    coord = coord or Identity.generate()
    me = ids[stage]
    report = sign(pb.StepReport(run_id=RUN, step=STEP, stage=stage, node_id=me.node_id,
                                state_digest=cl["digests"][stage], grad_sq_norm=cl["sq"][stage], micro_batches=M,
                                epoch=EPOCH, assignment_digest=assigned(stage),
                                received=received_by(cl, stage)), me)
    mbs = list(range(M)) if kind == pb.AUDIT_KIND_UPDATE else sorted({0, *(mb for _, mb in also)})
    req = pb.AuditRequest(run_id=RUN, audit_id=1, kind=kind, step=STEP, stage=stage, micro_batch=0,
                          num_stages=STAGES, model=MODEL, train=TRAIN, report=report, tolerance=0.0, epoch=EPOCH,
                          target=peers[stage], tokens_digest=audit.tokens_digest({mb: cl["tokens"][mb] for mb in mbs}))
    req.also.extend(pb.AuditItem(kind=k, micro_batch=mb) for k, mb in also)
    if stage > 0:
        req.prev.CopyFrom(peers[stage - 1])
    if stage < STAGES - 1:
        req.next.CopyFrom(peers[stage + 1])
    if kind == pb.AUDIT_KIND_UPDATE:
        req.update.CopyFrom(cl["update"])
        req.update.node_id = me.node_id
        req.update_report.CopyFrom(sign(pb.UpdateReport(run_id=RUN, step=STEP, stage=stage, node_id=me.node_id,
                                                        state_digest=cl["next_digests"][stage], epoch=EPOCH,
                                                        assignment_digest=assigned(stage)), me))
    sign(req, coord)
    audit.validate_request(req)

    def attest(step: int, digest: bytes) -> pb.StateAttestation:
        return sign(pb.StateAttestation(run_id=RUN, node_id=me.node_id, stage=stage, step=step, state_digest=digest,
                                        epoch=EPOCH), me)

    art = audit.Artifacts(request=req, state=cl["states"][stage], attestation=attest(STEP, cl["digests"][stage]))
    served_state(art.attestation, peers[stage], req, STEP, art.state)
    sent = cl["sent"]
    for mb in mbs:
        forward, backward = audit.compares(req, mb)
        if stage > 0:
            art.inputs[mb] = sent[(stage - 1, FORWARD, mb)]
        if backward and stage < STAGES - 1:
            art.grads_in[mb] = sent[(stage + 1, BACKWARD, mb)]
        if forward and stage < STAGES - 1:
            art.outputs[(FORWARD, mb)] = sent[(stage, FORWARD, mb)]
        if backward and stage > 0:
            art.outputs[(BACKWARD, mb)] = sent[(stage, BACKWARD, mb)]
    audit.check_headers(art)
    if kind == pb.AUDIT_KIND_UPDATE:
        art.next_state = cl["next_states"][stage]
        art.next_attestation = attest(STEP + 1, cl["next_digests"][stage])
        served_state(art.next_attestation, peers[stage], req, STEP + 1, art.next_state)
    if art.needs_tokens():
        art.tokens = {mb: cl["tokens"][mb] for mb in mbs}
        audit.check_tokens(art)
    return art


CASES = [(s, k) for s in range(STAGES) for k in (pb.AUDIT_KIND_FORWARD, pb.AUDIT_KIND_BACKWARD, pb.AUDIT_KIND_UPDATE)
         if not (k == pb.AUDIT_KIND_FORWARD and s == STAGES - 1) and not (k == pb.AUDIT_KIND_BACKWARD and s == 0)]


@pytest.mark.parametrize("stage,kind", CASES, ids=[f"stage{s}-{audit.KIND_NAMES[k]}" for s, k in CASES])
def test_chained_stage_claims_pass_their_audits_exactly(claims, stage, kind):
    finding = audit.check(artifacts(claims, stage, kind))
    assert finding.verdict == pb.VERDICT_PASS, finding.detail
    assert finding.deviation == 0.0, finding.detail


def test_a_changed_claim_fails_at_tolerance_zero(claims):
    art = artifacts(claims, 1, pb.AUDIT_KIND_FORWARD)
    rt = art.outputs[(FORWARD, 0)]
    art.outputs[(FORWARD, 0)] = ReceivedTensor(commitment=rt.commitment, tensor=rt.tensor * (1 + 1e-6))
    assert audit.check(art).verdict == pb.VERDICT_FAIL


def test_an_exact_update_is_verified_without_the_next_state_and_kept_as_a_replica(claims):
    """An auditor need not fetch the state after an update: a recomputed state that hashes to the
    committed digest proves it (and is the state the next step starts from)."""
    art = artifacts(claims, 1, pb.AUDIT_KIND_UPDATE)
    art.next_state, art.next_attestation = {}, None  # as gather(next_state=False) leaves it
    finding = audit.check(art)
    assert finding.verdict == pb.VERDICT_PASS, finding.detail
    assert finding.next_state is not None
    assert StageComputation.build(StageSetup.from_specs(MODEL, TRAIN, 1, STAGES),
                                  finding.next_state).digest() == claims["next_digests"][1]


def test_an_update_off_its_commitment_needs_the_next_state_and_then_fails(claims):
    """A false update digest is never taken on the recomputation's word: without the served state
    the check asks for it; with the served state (the node's own false one) it fails."""
    art = artifacts(claims, 1, pb.AUDIT_KIND_UPDATE)
    off = claims["next_states"][1].copy()
    name = next(n for n in off if n.startswith("param/"))
    off[name] = off[name] * -1  # a poisoned update: the node commits to (and serves) this state
    digest = StageComputation.build(StageSetup.from_specs(MODEL, TRAIN, 1, STAGES), off).digest()
    art.request.update_report.state_digest = digest
    lazy = audit.Artifacts(**{**art.__dict__, "next_state": {}, "next_attestation": None})
    with pytest.raises(audit.NeedNextState):
        audit.check(lazy)
    art.next_state = off
    art.next_attestation = pb.StateAttestation(state_digest=digest)
    finding = audit.check(art)
    assert finding.verdict == pb.VERDICT_FAIL and finding.next_state is None, finding.detail


def test_an_audit_starts_from_a_replica_only_of_the_committed_digest(claims):
    """A replica stands in for the fetched state only under the digest the step report commits to."""
    art = artifacts(claims, 1, pb.AUDIT_KIND_FORWARD)
    art.attestation, art.replica_of = None, claims["digests"][1]
    assert audit.check(art).verdict == pb.VERDICT_PASS
    art.replica_of = claims["next_digests"][1]  # a state the auditor holds, but not this step's
    finding = audit.check(art)
    assert finding.verdict == pb.VERDICT_FAIL and "false commitment" in finding.detail


def test_one_workspace_reused_across_audits_gives_every_audit_the_same_finding(claims):
    """An auditor reloads the module and optimizer of its last audit of a stage instead of building
    them: every audit kind of every stage, run twice through one workspace in between a failing one,
    finds what a freshly built computation finds (deviation 0), and a kept replica is a copy that
    later audits do not overwrite."""
    ws = audit.Workspace()
    bad = artifacts(claims, 1, pb.AUDIT_KIND_FORWARD)
    rt = bad.outputs[(FORWARD, 0)]
    bad.outputs[(FORWARD, 0)] = ReceivedTensor(commitment=rt.commitment, tensor=rt.tensor * (1 + 1e-6))
    lazy = artifacts(claims, 1, pb.AUDIT_KIND_UPDATE)
    lazy.next_state, lazy.next_attestation = {}, None
    kept = audit.check(lazy, workspace=ws).next_state
    assert kept is not None
    for _ in range(2):
        assert audit.check(bad, workspace=ws).verdict == pb.VERDICT_FAIL
        for stage, kind in CASES:
            finding = audit.check(artifacts(claims, stage, kind), workspace=ws)
            assert (finding.verdict, finding.deviation) == (pb.VERDICT_PASS, 0.0), (stage, kind, finding.detail)
    assert audit.check(artifacts(claims, 1, pb.AUDIT_KIND_FORWARD), workspace=ws).verdict == pb.VERDICT_PASS
    assert StageComputation.build(StageSetup.from_specs(MODEL, TRAIN, 1, STAGES), kept).digest() == \
        claims["next_digests"][1], "the replica kept from the first audit is intact"


F_, B_ = pb.AUDIT_KIND_FORWARD, pb.AUDIT_KIND_BACKWARD
MERGED = [(0, F_, ((F_, 1),)), (1, F_, ((B_, 0), (F_, 1), (B_, 1))), (2, B_, ((F_, 1),)), (3, B_, ((B_, 1),))]


@pytest.mark.parametrize("stage,kind,also", MERGED, ids=[f"stage{s}-{audit.KIND_NAMES[k]}+{len(a)}" for s, k, a in MERGED])
def test_one_order_for_several_messages_of_a_stage_step_checks_each_of_them(claims, stage, kind, also):
    """The coordinator merges the forward and backward audits it draws for one stage-step into one
    order (AuditRequest.also): one replay compares every message it names, exactly, and a message
    changed after signing fails the order whichever of them it is."""
    art = artifacts(claims, stage, kind, also=also)
    assert audit.missing_artifacts(art) == []
    finding = audit.check(art)
    assert (finding.verdict, finding.deviation) == (pb.VERDICT_PASS, 0.0), finding.detail
    assert f"and {len(also)} more" in finding.detail
    named = {(kind, 0), *also}
    for k, mb in sorted(named):
        key = (FORWARD if k == F_ else BACKWARD, mb)
        assert key in art.outputs, f"the {audit.KIND_NAMES[k]} output of micro-batch {mb} is compared"
        bad = artifacts(claims, stage, kind, also=also)
        rt = bad.outputs[key]
        bad.outputs[key] = ReceivedTensor(commitment=rt.commitment, tensor=rt.tensor * (1 + 1e-6))
        failed = audit.check(bad)
        assert failed.verdict == pb.VERDICT_FAIL and f"micro-batch {mb}" in failed.detail, failed.detail
    unnamed = [(d, mb) for d in (FORWARD, BACKWARD) for mb in range(M)
               if ((F_ if d == FORWARD else B_), mb) not in named]
    assert not any(key in art.outputs for key in unnamed), "only the named messages are fetched and compared"


@pytest.mark.parametrize("change,needle", [
    (lambda r: r.also.add(kind=pb.AUDIT_KIND_FORWARD, micro_batch=0), "twice"),
    (lambda r: r.also.add(kind=pb.AUDIT_KIND_UPDATE, micro_batch=1), "forward or backward"),
    (lambda r: r.also.add(kind=pb.AUDIT_KIND_FORWARD, micro_batch=M), "out of range"),
    (lambda r: (setattr(r, "stage", 0), r.also.add(kind=pb.AUDIT_KIND_BACKWARD, micro_batch=1)), "first stage"),
    (lambda r: (setattr(r, "stage", STAGES - 1), setattr(r, "kind", pb.AUDIT_KIND_BACKWARD),
                r.also.add(kind=pb.AUDIT_KIND_FORWARD, micro_batch=1)), "last stage"),
    (lambda r: (setattr(r, "kind", pb.AUDIT_KIND_UPDATE), r.also.add(kind=pb.AUDIT_KIND_FORWARD, micro_batch=1)),
     "names no others"),
])
def test_an_order_naming_impossible_further_messages_is_refused_before_any_work(claims, change, needle):
    req = artifacts(claims, 1, pb.AUDIT_KIND_FORWARD).request
    change(req)
    with pytest.raises(InvalidArgument, match=needle):
        audit.validate_request(req)


def test_replicas_keep_the_last_few_by_digest():
    kept = audit.Replicas(capacity=2)
    for d in (b"a", b"b", b"c"):
        kept.keep(d, {"param/x": torch.zeros(1)})
    assert kept.get(b"a") is None and kept.get(b"c") is not None and len(kept) == 2 and kept.hits == 1


def test_building_from_a_state_reproduces_its_digest(claims):
    setup = StageSetup.from_specs(MODEL, TRAIN, 2, STAGES)
    assert StageComputation.build(setup, claims["next_states"][2]).digest() == claims["next_digests"][2]
    assert StageComputation.build(setup).digest() == claims["digests"][2], "built from the seed alone"


@pytest.mark.parametrize("model,train,stage,num_stages,needle", [
    (MODEL, TRAIN, 4, 4, "not within"),
    (MODEL, TRAIN, 0, 0, "not within"),
    (MODEL, TRAIN, 0, 5, "5 stages for 4 blocks"),
    (MODEL, train_spec(OPTIM, seed=SEED, micro_batches=0, micro_batch_size=B), 0, 4, "micro_batches"),
    (MODEL, train_spec(OPTIM, seed=SEED, micro_batches=M, micro_batch_size=0), 0, 4, "micro_batch_size"),
    (pb.ModelSpec(block_size=16, vocab_size=256, n_layer=4, n_head=3, n_embd=16), TRAIN, 0, 4, "bad model spec"),
], ids=["stage-out-of-range", "no-stages", "more-stages-than-blocks", "zero-micro-batches", "zero-batch-size",
        "heads-do-not-divide"])
def test_setup_validation_rejects_bad_specs(model, train, stage, num_stages, needle):
    with pytest.raises(InvalidArgument, match=needle):
        StageSetup.from_specs(model, train, stage, num_stages)


def test_the_node_and_the_auditor_derive_the_same_setup(claims):
    peers = claims["peers"]
    for stage in range(STAGES):
        req = pb.AssignRequest(run_id=RUN, epoch=EPOCH, stage=stage, num_stages=STAGES, model=MODEL, train=TRAIN)
        order = pb.AuditRequest(run_id=RUN, stage=stage, num_stages=STAGES, model=MODEL, train=TRAIN)
        if stage > 0:
            req.prev.CopyFrom(peers[stage - 1])
        if stage < STAGES - 1:
            req.next.CopyFrom(peers[stage + 1])
        node = Assignment.from_request(req).setup
        assert node == audit.setup_of(order)
        assert (node.is_first, node.is_last) == (node.spec.has_embedding, node.spec.has_head)
        assert (node.is_first, node.is_last) == (stage == 0, stage == STAGES - 1)
