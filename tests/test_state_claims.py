"""A node's signed claims about its own state, against the run seed and against each other.

Unit tier: the rules in ``pipeguard.claims`` (``seeded_start``, ``contradicting_commitments``,
``off_attestation``) and the bundles built on them (``initial-state``, ``contradiction``,
``off-attestation``), with real keys, real signatures and the real seeded stage: what
``verify_bundle`` accepts, and every near miss it must refuse (an honest claim, another step,
another signer, an edited claim, another coordinator).
"""

from __future__ import annotations

import pytest
import torch

from pipeguard import claims
from pipeguard.computation import StageComputation, StageSetup, model_spec, train_spec
from pipeguard.evidence import (verify_bundle, write_contradiction_bundle, write_initial_state_bundle,
                                write_off_attestation_bundle)
from pipeguard.identity import Identity
from pipeguard.model import GPTConfig, OptimSettings
from pipeguard.signing import sign
from pipeguard.v1 import pipeguard_pb2 as pb

pytestmark = pytest.mark.unit

RUN = "state-claims-run"
GPT = GPTConfig(block_size=16, n_layer=2, n_head=2, n_embd=16)
MODEL = model_spec(GPT)
TRAIN = train_spec(OptimSettings(lr=3e-3, warmup_steps=2, total_steps=10), seed=11, micro_batches=2,
                   micro_batch_size=2)


@pytest.fixture(scope="module")
def keys():
    return Identity.generate(), Identity.generate()  # coordinator, stage holder


def seeded(stage: int = 1) -> StageComputation:
    return StageComputation.build(StageSetup.from_specs(MODEL, TRAIN, stage, 2))


def backdoored() -> StageComputation:
    comp = seeded()
    with torch.no_grad():
        next(comp.module.parameters()).add_(1e-2)
    return comp


def order(coord: Identity, holder: Identity, **kw) -> pb.AssignRequest:
    fields = dict(run_id=RUN, epoch=1, stage=1, num_stages=2, model=MODEL, train=TRAIN, node_id=holder.node_id,
                  start_step=0)
    fields.update(kw)
    return sign(pb.AssignRequest(**fields), coord)


def report(holder: Identity, digest: bytes, step: int = 0, **kw) -> pb.StepReport:
    kw.setdefault("epoch", 1)
    return sign(pb.StepReport(run_id=RUN, step=step, stage=1, node_id=holder.node_id, state_digest=digest, **kw),
                holder)


def attestation(holder: Identity, digest: bytes, step: int = 0) -> pb.StateAttestation:
    return sign(pb.StateAttestation(run_id=RUN, node_id=holder.node_id, stage=1, step=step, state_digest=digest,
                                    epoch=1), holder)


@pytest.mark.parametrize("claim_kind", ["step-report", "attestation"])
def test_a_step_zero_claim_other_than_the_seeded_init_is_proof_of_a_backdoor(tmp_path, keys, claim_kind):
    coord, holder = keys
    digest = backdoored().digest()
    claim = report(holder, digest) if claim_kind == "step-report" else attestation(holder, digest)
    path = write_initial_state_bundle(tmp_path / "b.pgev", order(coord, holder), claim, coord.public_key,
                                      holder.public_key)
    result = verify_bundle(path, pinned_coordinator=coord.public_key)
    assert result.valid and result.kind == "initial-state" and result.accused == holder.node_id, result.summary
    assert "seeded initialisation" in result.summary


@pytest.mark.parametrize("case", ["honest", "other-step", "from-checkpoint", "other-signer", "edited",
                                  "other-coordinator", "other-stage"])
def test_initial_state_bundles_that_prove_nothing_are_refused(tmp_path, keys, case):
    coord, holder = keys
    other = Identity.generate()
    digest = seeded().digest() if case == "honest" else backdoored().digest()
    o = order(coord, holder, **({"start_step": 4, "state_digest": digest} if case == "from-checkpoint" else {}))
    claim = report(other if case == "other-signer" else holder, digest, step=3 if case == "other-step" else 0)
    if case == "other-stage":
        claim.stage = 0
        sign(claim, holder)
    if case == "edited":
        claim.state_digest = bytes(32)  # after signing
    key = other.public_key if case == "other-signer" else holder.public_key
    path = write_initial_state_bundle(tmp_path / "b.pgev", o, claim, coord.public_key, key)
    pinned = Identity.generate().public_key if case == "other-coordinator" else coord.public_key
    result = verify_bundle(path, pinned_coordinator=pinned)
    assert not result.valid, result.summary


def test_the_coordinator_and_verify_agree_on_the_seeded_digest():
    """The seeded digest is a function of (model, seed, stage, stages): rebuilding gives the same bytes,
    another seed or stage does not."""
    setup = StageSetup.from_specs(MODEL, TRAIN, 1, 2)
    assert StageComputation.seeded_digest(setup) == seeded().digest()
    assert StageComputation.seeded_digest(StageSetup.from_specs(MODEL, TRAIN, 0, 2)) != seeded().digest()
    other_seed = pb.TrainSpec()
    other_seed.CopyFrom(TRAIN)
    other_seed.seed = 12
    assert StageComputation.seeded_digest(StageSetup.from_specs(MODEL, other_seed, 1, 2)) != seeded().digest()


def update_report(holder: Identity, digest: bytes, step: int, epoch: int = 1) -> pb.UpdateReport:
    return sign(pb.UpdateReport(run_id=RUN, step=step, stage=1, node_id=holder.node_id, state_digest=digest,
                                epoch=epoch), holder)


@pytest.mark.parametrize("later_kind", ["step-report", "attestation"])
def test_a_step_report_contradicting_the_update_report_before_it_is_proof(tmp_path, keys, later_kind):
    _, holder = keys
    committed, swapped = seeded().digest(), backdoored().digest()
    later = report(holder, swapped, step=5) if later_kind == "step-report" else attestation(holder, swapped, step=5)
    path = write_contradiction_bundle(tmp_path / "c.pgev", update_report(holder, committed, 4), later,
                                      holder.public_key)
    result = verify_bundle(path)
    assert result.valid and result.kind == "contradiction" and result.accused == holder.node_id, result.summary


@pytest.mark.parametrize("case", ["agree", "not-the-next-step", "other-signer", "edited", "other-stage"])
def test_contradiction_bundles_that_prove_nothing_are_refused(tmp_path, keys, case):
    _, holder = keys
    other = Identity.generate()
    committed = seeded().digest()
    swapped = committed if case == "agree" else backdoored().digest()
    update = update_report(holder, committed, 4)
    later = report(other if case == "other-signer" else holder, swapped, step=7 if case == "not-the-next-step" else 5)
    if case == "other-stage":
        later.stage = 0
        sign(later, holder)
    if case == "edited":
        update.state_digest = swapped  # after signing: "the update report said so too"
    path = write_contradiction_bundle(tmp_path / "c.pgev", update, later, holder.public_key)
    assert not verify_bundle(path).valid


def test_a_state_off_its_own_attestation_is_shown_and_an_honest_one_is_not(tmp_path, keys):
    coord, holder = keys
    comp = seeded()
    named = comp.snapshot()
    att = attestation(holder, comp.digest(), step=3)
    assert not claims.off_attestation(att, holder.public_key, named)
    honest = write_off_attestation_bundle(tmp_path / "h.pgev", att, named, holder.public_key, coord.public_key, 3)
    assert not verify_bundle(honest).valid
    off = dict(named)
    name = next(n for n in sorted(off) if n.startswith("param/"))
    off[name] = off[name] + 1e-2
    assert claims.off_attestation(att, holder.public_key, off)
    result = verify_bundle(write_off_attestation_bundle(tmp_path / "o.pgev", att, off, holder.public_key,
                                                        coord.public_key, 3))
    assert result.valid and result.kind == "off-attestation" and result.accused == holder.node_id, result.summary
    assert "as received by the coordinator" in result.summary


def test_an_update_report_and_a_later_claim_from_another_epoch_are_no_contradiction(tmp_path, keys):
    """A rollback in between legitimately changes the state: claims of two epochs prove nothing."""
    _, holder = keys
    path = write_contradiction_bundle(tmp_path / "c.pgev", update_report(holder, seeded().digest(), 4, epoch=2),
                                      report(holder, backdoored().digest(), step=5), holder.public_key)
    result = verify_bundle(path)
    assert not result.valid and "epoch" in result.summary
