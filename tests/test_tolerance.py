"""The audit tolerance is per element and cannot be ridden (issue 11, item 7). Unit tier.

A 3-stage pipeline trains two steps in process through ``pipeguard.computation`` (one torch
thread, as a node runs by default) and records what each stage would commit to. Then
``pipeguard.audit.check`` -- the function auditors, the judge and ``pipeguard verify`` run --
judges those claims at the default tolerance:

- a budget-riding claim that spends just under the per-element allowance passes, one just over
  it fails (activations, gradients, and an update steered by ``update:ride``);
- honest recomputation with 2 threads of claims made with 1 passes every audit of every stage.

The multi-process half (a riding node through real servers) is tests/test_tolerance_servers.py;
the long-run effect of riding on the loss is benchmarks/budget_riding.py.
"""

from __future__ import annotations

import math

import pytest
import torch

from coordinator.config import AuditConfig
from node.attacks import AttackContext, Params, Ride, UpdateRide
from pipeguard import audit
from pipeguard.computation import Determinism, StageComputation, StageSetup, model_spec, train_spec
from pipeguard.data import stdlib_corpus
from pipeguard.model import GPTConfig, OptimSettings, lr_at
from pipeguard.tensors import ReceivedTensor
from pipeguard.v1 import pipeguard_pb2 as pb

pytestmark = [pytest.mark.unit, pytest.mark.timeout(180)]

STAGES, SEED, M, B = 3, 5, 2, 4
GPT = GPTConfig(block_size=32, n_layer=3, n_head=4, n_embd=128)
OPTIM = OptimSettings(lr=3e-3, warmup_steps=1, total_steps=20)
MODEL, TRAIN = model_spec(GPT), train_spec(OPTIM, seed=SEED, micro_batches=M, micro_batch_size=B)
FORWARD, BACKWARD = pb.DIRECTION_FORWARD, pb.DIRECTION_BACKWARD
TOL = audit.DEFAULT_TOLERANCE
DIGEST, NEXT_DIGEST = b"\x01" * 32, b"\x02" * 32  # check() compares digests with reports, not contents
RIDER = 1


def setup(stage: int) -> StageSetup:
    return StageSetup.from_specs(MODEL, TRAIN, stage, STAGES)


def train_step(comps: list[StageComputation], dataset, step: int, rider_hooks=None) -> dict:
    """One pipeline step; returns every stage's claims. ``rider_hooks``: (before_update, after_update)
    called around stage ``RIDER``'s optimizer step (update:ride)."""
    last = STAGES - 1
    rec = {"step": step, "stages": [dict(inputs={}, grads_in={}, outputs={}, state=c.snapshot()) for c in comps]}
    tokens = {}
    for mb in range(M):
        tokens[mb] = comps[0].setup.batch(dataset, step, mb)
        fwds, x = [], tokens[mb][0]  # (B, T)
        for s, c in enumerate(comps):
            fwds.append(c.forward(step, mb, x))
            if s < last:
                x = fwds[-1].output.contiguous()  # (B, T, C)
                rec["stages"][s]["outputs"][(FORWARD, mb)] = x.clone()
                rec["stages"][s + 1]["inputs"][mb] = x.clone()
        g = tokens[mb][1]
        for s in range(last, -1, -1):
            _, g = comps[s].backward(fwds[s], g)
            if s > 0:
                g = g.contiguous()  # (B, T, C)
                rec["stages"][s]["outputs"][(BACKWARD, mb)] = g.clone()
                rec["stages"][s - 1]["grads_in"][mb] = g.clone()
    sq = [c.grad_sq_norm() for c in comps]
    norm, lr = math.sqrt(sum(sq)), lr_at(step, OPTIM)
    for s, c in enumerate(comps):
        before = c.snapshot()
        if rider_hooks and s == RIDER:
            rider_hooks[0](c, norm, lr)
        c.update(norm, lr)
        if rider_hooks and s == RIDER:
            rider_hooks[1](c, before)
        rec["stages"][s].update(next_state=c.snapshot(), grad_sq_norm=sq[s])
    rec.update(global_norm=norm, lr=lr, tokens=tokens)
    return rec


@pytest.fixture(scope="module")
def claims():
    """Claims of steps 0 and 1 (step 1 has AdamW moments), made with one thread."""
    with Determinism(1).scope():
        dataset = stdlib_corpus(65536)
        comps = [StageComputation.build(setup(s)) for s in range(STAGES)]
        return dataset, [train_step(comps, dataset, step) for step in (0, 1)]


def artifacts(rec: dict, stage: int, kind: int, tolerance: float = TOL, outputs=None,
              next_state=None) -> audit.Artifacts:
    st = rec["stages"][stage]
    mbs = list(range(M)) if kind == pb.AUDIT_KIND_UPDATE else [0]
    req = pb.AuditRequest(
        kind=kind, step=rec["step"], stage=stage, micro_batch=0, num_stages=STAGES, tolerance=tolerance,
        model=MODEL, train=TRAIN,
        report=pb.StepReport(step=rec["step"], stage=stage, state_digest=DIGEST, grad_sq_norm=st["grad_sq_norm"]),
        update=pb.ApplyUpdateRequest(step=rec["step"], global_grad_norm=rec["global_norm"], lr=rec["lr"]),
        update_report=pb.UpdateReport(step=rec["step"], stage=stage, state_digest=NEXT_DIGEST))
    art = audit.Artifacts(request=req, attestation=pb.StateAttestation(state_digest=DIGEST), state=st["state"])
    outs = {**st["outputs"], **(outputs or {})}
    for mb in mbs:
        if stage > 0:
            art.inputs[mb] = ReceivedTensor(pb.TensorCommitment(), st["inputs"][mb])
        if stage < STAGES - 1 and kind != pb.AUDIT_KIND_FORWARD:
            art.grads_in[mb] = ReceivedTensor(pb.TensorCommitment(), st["grads_in"][mb])
        for d in (FORWARD, BACKWARD):
            wanted = kind == pb.AUDIT_KIND_UPDATE or (d == FORWARD) == (kind == pb.AUDIT_KIND_FORWARD)
            if wanted and (d, mb) in outs:
                art.outputs[(d, mb)] = ReceivedTensor(pb.TensorCommitment(), outs[(d, mb)])
    if kind == pb.AUDIT_KIND_UPDATE:
        art.next_state = next_state if next_state is not None else st["next_state"]
        art.next_attestation = pb.StateAttestation(state_digest=NEXT_DIGEST)
    art.tokens = {mb: rec["tokens"][mb] for mb in mbs}
    return art


def ctx(step: int, mb: int = 0, direction: int = 0) -> AttackContext:
    return AttackContext(step, mb, RIDER, "r" * 32, direction)


def test_the_default_tolerance_is_the_configs():
    assert AuditConfig().tolerance == TOL


# -- riding activations and gradients ---------------------------------------------------------------
#
# Before issue 11 an audit compared max|a - b| / max|b| with 1e-3: every element could move by
# just under 1e-3 x the tensor's largest element, and the ride at that maximum passed. Measured on
# stage 1's step-1 outputs of micro-batch 0 here: the activation's max|y| is 3.4 x its rms, the
# input gradient's 11.2 x; the old ride (every element moved by 0.999e-3 max|b|, activations one
# fixed way, gradients against their sign) reads 0.999e-3 under the old rule (passes) and 0.0034
# (activation) / 0.0112 (gradient) under the new one, 34x / 112x the 1e-4 tolerance; it moves the
# median element 20x / 77x more than the new rule allows, shifts the whole tensor by 0.34% / 1.1%
# in relative L2 (the new rule's whole ride: 0.019% / 0.018%), and flips the sign of 0.13% / 1.3%
# of the elements.


@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_a_ride_just_under_the_per_element_bound_passes_and_just_over_fails(claims, direction):
    _, recs = claims
    rec = recs[1]
    d = FORWARD if direction == "forward" else BACKWARD
    kind = pb.AUDIT_KIND_FORWARD if direction == "forward" else pb.AUDIT_KIND_BACKWARD
    honest = rec["stages"][RIDER]["outputs"][(d, 0)]
    found = {}
    for share in (0.99, 1.01):
        ridden = Ride(direction, Params(ride=share, seed=3)).tamper(ctx(1, 0, d), honest)
        assert not torch.equal(ridden, honest)
        found[share] = audit.check(artifacts(rec, RIDER, kind, outputs={(d, 0): ridden}))
    assert found[0.99].verdict == pb.VERDICT_PASS, found[0.99].detail
    assert 0.9 * TOL < found[0.99].deviation <= TOL, "the ride spends (nearly) the whole allowance"
    assert found[1.01].verdict == pb.VERDICT_FAIL, found[1.01].detail
    assert TOL < found[1.01].deviation < 1.1 * TOL


def test_the_per_element_rule_is_not_the_largest_element_rule():
    # Every small element pushed by 0.5 x tolerance x max|b|: passes max|a-b|/max|b| <= tol, fails now.
    b = torch.randn(4096, generator=torch.Generator().manual_seed(0))
    a = b + 0.5 * TOL * b.abs().max() * torch.where(b.abs() < 0.1, -torch.sign(b), 0)
    assert float((a - b).abs().max() / b.abs().max()) < TOL
    assert audit.deviation(a, b) > TOL


# -- riding the update ------------------------------------------------------------------------------


@pytest.mark.parametrize("share, passes", [(0.9, True), (1.5, False)])
def test_update_ride_within_the_bound_passes_and_beyond_it_fails(claims, share, passes):
    dataset, recs = claims
    rec = recs[1]
    with Determinism(1).scope():
        comps = [StageComputation.build(setup(s), rec["stages"][s]["state"]) for s in range(STAGES)]
        rider = UpdateRide(Params(ride=share, seed=3))
        hooks = (lambda c, norm, lr: rider.on_gradients(ctx(1, -1), c.module, c.opt, norm, lr, OPTIM.grad_clip),
                 lambda c, before: rider.on_update(ctx(1, -1), c.module, c.opt, before))
        ridden = train_step(comps, dataset, 1, rider_hooks=hooks)["stages"][RIDER]["next_state"]
    honest = rec["stages"][RIDER]["next_state"]
    moved = [n for n in honest if n.startswith("param/") and not torch.equal(ridden[n], honest[n])]
    assert len(moved) == sum(1 for n in honest if n.startswith("param/")), "every weight was steered"
    finding = audit.check(artifacts(rec, RIDER, pb.AUDIT_KIND_UPDATE, next_state=ridden))
    assert (finding.verdict == pb.VERDICT_PASS) == passes, finding.detail


def test_no_weight_may_step_by_more_than_adams_cap(claims):
    # A step beyond lr x AdamW's cap fails whatever the gradients were (one element, 2 x lr).
    _, recs = claims
    rec = recs[1]
    st = rec["stages"][RIDER]
    name = next(n for n in sorted(st["next_state"]) if n.startswith("param/") and st["next_state"][n].dim() == 2)
    tampered = dict(st["next_state"])
    tampered[name] = tampered[name].clone()
    tampered[name].view(-1)[0] = st["state"][name].view(-1)[0] + 2 * rec["lr"]
    finding = audit.check(artifacts(rec, RIDER, pb.AUDIT_KIND_UPDATE, next_state=tampered))
    assert finding.verdict == pb.VERDICT_FAIL and name in finding.detail, finding.detail


# -- honest recomputation across thread counts --------------------------------------------------------

KINDS = [(s, k) for s in range(STAGES) for k in (pb.AUDIT_KIND_FORWARD, pb.AUDIT_KIND_BACKWARD, pb.AUDIT_KIND_UPDATE)
         if not (k == pb.AUDIT_KIND_FORWARD and s == STAGES - 1) and not (k == pb.AUDIT_KIND_BACKWARD and s == 0)]


def test_honest_recomputation_with_two_threads_passes_every_audit(claims):
    _, recs = claims
    raw = 0.0
    with Determinism(2).scope():
        for rec in recs:
            for stage, kind in KINDS:
                finding = audit.check(artifacts(rec, stage, kind))
                assert finding.verdict == pb.VERDICT_PASS, f"step {rec['step']} stage {stage}: {finding.detail}"
                raw = max(raw, audit.check(artifacts(rec, stage, kind, tolerance=0.0)).deviation)
    # The recomputation really differs in the last bits (so the pass above is not exact mode's):
    assert raw > 0, "2 threads reproduced 1 thread bit for bit: this test no longer crosses thread counts"
