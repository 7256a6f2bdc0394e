"""Evidence rests on what the accused signed, not on the coordinator's word (issue 11, item 4).

Unit tier over real signed claims of a 4-stage pipeline (tests/test_computation.py's fixture):
``pipeguard verify`` refuses a bundle whose audit order restates other settings than the ones
the accused node signed (its assignment digest: a changed dropout or depth), a bundle that leaves
out an artifact its audit kind needs (a false accusation without the compared output), a bundle
whose input is a second version signed by the upstream node rather than the one the accused
computed from, and a verdict replayed from another order with the same audit id.
"""

from __future__ import annotations

import math

import pytest
import torch

from pipeguard import audit, claims as rules, evidence
from pipeguard.evidence import verify_bundle, write_audit_bundle
from pipeguard.identity import Identity
from pipeguard.signing import sign
from pipeguard.tensors import ReceivedTensor, tensor_digest
from pipeguard.v1 import pipeguard_pb2 as pb
from tests.test_computation import BACKWARD, FORWARD, MODEL, claims, artifacts  # noqa: F401 - claims: fixture

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]

STAGE = 1
AUDITOR = Identity.generate()


def honest(cl, coord: Identity, kind: int = pb.AUDIT_KIND_FORWARD) -> audit.Artifacts:
    return artifacts(cl, STAGE, kind, coord)


def reorder(art: audit.Artifacts, coord: Identity, **change) -> audit.Artifacts:
    """The same artifacts under an order the coordinator re-signed with ``change``."""
    req = pb.AuditRequest()
    req.CopyFrom(art.request)
    for name, value in change.items():
        if isinstance(value, pb.ModelSpec):
            getattr(req, name).CopyFrom(value)
        else:
            setattr(req, name, value)
    req.signature = b""
    art.request = sign(req, coord)
    return art


def accusation(art: audit.Artifacts, coord: Identity, path, order: pb.AuditRequest | None = None):
    """An auditor's signed FAIL on ``art``'s order (or on ``order``), written as a false-accusation bundle."""
    req = pb.AuditRequest()
    req.CopyFrom(art.request)
    req.auditor = AUDITOR.node_id
    req.signature = b""
    art.request = sign(req, coord)
    answered = order or art.request
    verdict = sign(pb.AuditVerdict(run_id=answered.run_id, audit_id=answered.audit_id, auditor=AUDITOR.node_id,
                                   verdict=pb.VERDICT_FAIL, deviation=math.inf, detail="made up",
                                   order_digest=rules.order_digest(answered)), AUDITOR)
    finding = audit.check(art) if not audit.missing_artifacts(art) else audit.Finding(pb.VERDICT_PASS, 0.0, "")
    return write_audit_bundle(path, art, finding, coord.public_key, false_verdict=verdict,
                              auditor_key=AUDITOR.public_key)


def test_a_false_accusation_of_honest_work_verifies(claims, tmp_path):
    coord = Identity.generate()
    result = verify_bundle(accusation(honest(claims, coord), coord, tmp_path / "a.pgev"))
    assert result.valid and result.accused == AUDITOR.node_id, result.summary


@pytest.mark.parametrize("leave_out", ["output", "input", "attestation"])
def test_a_bundle_without_an_artifact_its_kind_needs_is_invalid(claims, tmp_path, leave_out):
    """Without the compared output nothing was compared: such a 'false accusation' once verified."""
    coord = Identity.generate()
    art = honest(claims, coord)
    if leave_out == "output":
        art.outputs.clear()
    elif leave_out == "input":
        art.inputs.clear()
    path = accusation(art, coord, tmp_path / "a.pgev")
    if leave_out == "attestation":
        art.attestation = None
        path = write_audit_bundle(tmp_path / "b.pgev", art, audit.Finding(pb.VERDICT_PASS, 0.0, ""), coord.public_key)
    result = verify_bundle(path)
    assert not result.valid
    assert "lacks" in result.summary, result.summary


@pytest.mark.parametrize("change", [
    {"model": pb.ModelSpec(block_size=MODEL.block_size, vocab_size=MODEL.vocab_size, n_layer=MODEL.n_layer,
                           n_head=MODEL.n_head, n_embd=MODEL.n_embd, dropout=0.2)},
    {"tolerance": 1e-12},
    {"data_digest": b"\x07" * 32},
], ids=["dropout", "tolerance", "data"])
def test_an_order_with_other_settings_than_the_node_signed_convicts_nobody(claims, tmp_path, change):
    """The coordinator signs an order with dropout switched on: recomputation differs from the
    honest node's outputs. Its bundle once verified VALID against the honest node; the node's
    signed report and outputs name its assignment digest, which the order no longer matches."""
    coord = Identity.generate()
    art = reorder(honest(claims, coord), coord, **change)
    finding = audit.Finding(pb.VERDICT_FAIL, math.inf, "recomputed under the changed order")
    result = verify_bundle(write_audit_bundle(tmp_path / "a.pgev", art, finding, coord.public_key))
    assert not result.valid
    assert "other assignment settings" in result.summary, result.summary


def test_a_second_input_signed_by_the_upstream_node_convicts_nobody(claims, tmp_path):
    """A malicious upstream signs another activation under the very header it sent and builds a
    bundle from it with the honest node's output: the output names the input it was computed from."""
    coord = Identity.generate()
    art = honest(claims, coord)
    upstream = claims["ids"][STAGE - 1]
    original = art.inputs[0]
    other = (original.tensor + 1.0).contiguous()
    forged = sign(pb.TensorCommitment(header=original.commitment.header, payload_digest=tensor_digest(other)), upstream)
    art.inputs[0] = ReceivedTensor(commitment=forged, tensor=other)
    finding = audit.Finding(pb.VERDICT_FAIL, math.inf, "recomputed from the second input")
    result = verify_bundle(write_audit_bundle(tmp_path / "a.pgev", art, finding, coord.public_key))
    assert not result.valid
    assert "computed from" in result.summary, result.summary


def test_an_old_verdict_replayed_against_a_new_order_with_the_same_id_is_invalid(claims, tmp_path):
    """Audit ids restart at 1 after a coordinator restart: a FAIL the auditor signed for the old
    order #1 (another session) is no answer to the new order #1, and frames neither the auditor
    (false accusation) nor anyone else."""
    coord = Identity.generate()
    art = honest(claims, coord)
    old = pb.AuditRequest()
    old.CopyFrom(art.request)
    old.auditor, old.session, old.signature = AUDITOR.node_id, b"\x01" * 16, b""
    old = sign(old, coord)
    art = reorder(art, coord, session=b"\x02" * 16)
    result = verify_bundle(accusation(art, coord, tmp_path / "a.pgev", order=old))
    assert not result.valid
    assert "different audit order" in result.summary, result.summary


def test_an_honest_tensor_of_another_attempt_is_not_the_audited_one(claims, tmp_path):
    """The successor's gradient from a failed attempt, put in a bundle for the retry's order."""
    coord = Identity.generate()
    art = reorder(honest(claims, coord, pb.AUDIT_KIND_BACKWARD), coord, attempt=1)
    result = verify_bundle(write_audit_bundle(tmp_path / "a.pgev", art, audit.Finding(pb.VERDICT_FAIL, 1.0, ""),
                                              coord.public_key))
    assert not result.valid and "attempt" in result.summary, result.summary


def test_missing_artifacts_names_what_each_kind_needs(claims):
    coord = Identity.generate()
    art = honest(claims, coord, pb.AUDIT_KIND_UPDATE)
    assert audit.missing_artifacts(art) == []
    art.outputs.pop((BACKWARD, 1))
    art.grads_in.pop(0)
    art.next_attestation = None
    assert audit.missing_artifacts(art) == ["next_attestation", "grad_in/0", f"output/{BACKWARD}/1"]
    assert evidence.FORMAT  # the bundle format is unchanged: old readers still parse new bundles
    assert isinstance(FORWARD, int) and torch.is_tensor(art.state[next(iter(art.state))])


def test_a_second_gradient_signed_by_stage_1_convicts_stage_0_of_nothing(claims, tmp_path):
    """The first stage sends no gradient whose header could name what it received: its signed
    step report lists every tensor it computed from, so an update-audit bundle against it built
    from another gradient version (signed by its successor) proves nothing."""
    coord = Identity.generate()
    art = artifacts(claims, 0, pb.AUDIT_KIND_UPDATE, coord)
    original = art.grads_in[0]
    other = (original.tensor * 3.0).contiguous()
    forged = sign(pb.TensorCommitment(header=original.commitment.header, payload_digest=tensor_digest(other)),
                  claims["ids"][1])
    art.grads_in[0] = ReceivedTensor(commitment=forged, tensor=other)
    finding = audit.Finding(pb.VERDICT_FAIL, math.inf, "recomputed from the second gradient")
    result = verify_bundle(write_audit_bundle(tmp_path / "a.pgev", art, finding, coord.public_key))
    assert not result.valid
    assert "step report names" in result.summary, result.summary
