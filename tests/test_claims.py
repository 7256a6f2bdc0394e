"""The signed-claim rules (pipeguard/claims.py): each accepts its signer and refuses another
signer, and a validly signed claim about something else, with the error its callers rely on.
And nobody else checks a signature: only claims.py (and signing.py, which defines it) call
``signing.verify``."""

from __future__ import annotations

import ast
import warnings
from pathlib import Path

import pytest
import torch

from pipeguard import claims
from pipeguard.errors import (AuditIncomplete, DataLoss, FailedPrecondition, InvalidArgument, PipeguardError,
                              Unauthenticated)
from pipeguard.identity import Identity
from pipeguard.signing import sign
from pipeguard.tensors import state_digest
from pipeguard.v1 import pipeguard_pb2 as pb

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
RUN = "run-1"
COORD, NODE, OTHER = Identity.generate(), Identity.generate(), Identity.generate()


def peer(identity: Identity, stage: int = 1) -> pb.PeerInfo:
    return pb.PeerInfo(node_id=identity.node_id, public_key=identity.public_key, address="127.0.0.1:1", stage=stage)


def signed(msg, identity: Identity = COORD):
    return sign(msg, identity)


# -- orders ---------------------------------------------------------------------------------------


def run_step(**kw) -> pb.RunStepRequest:
    return pb.RunStepRequest(**{"run_id": RUN, "epoch": 1, "step": 3, "node_id": NODE.node_id, **kw})


def check_order(msg, coordinator=COORD.public()):
    claims.order(msg, coordinator, node_id=NODE.node_id, run_id=RUN, what="run-step")


def test_order_from_the_coordinator_for_this_node_and_run_is_accepted():
    check_order(signed(run_step()))


@pytest.mark.parametrize("msg, coordinator, error", [
    (lambda: signed(run_step(), OTHER), COORD.public(), Unauthenticated),
    (lambda: signed(run_step()), None, FailedPrecondition),
    (lambda: signed(run_step(node_id=OTHER.node_id)), COORD.public(), InvalidArgument),
    (lambda: signed(run_step(run_id="other")), COORD.public(), FailedPrecondition),
], ids=["wrong-signer", "not-registered", "other-node", "other-run"])
def test_order_refusals(msg, coordinator, error):
    with pytest.raises(error):
        check_order(msg(), coordinator)


def test_audit_order_names_its_auditor():
    req = signed(pb.AuditRequest(run_id=RUN, audit_id=1, auditor=NODE.node_id))
    claims.audit_order(req, COORD.public(), auditor=NODE.node_id)
    claims.audit_order(req, COORD.public())  # pipeguard verify: the signature alone
    with pytest.raises(InvalidArgument):
        claims.audit_order(req, COORD.public(), auditor=OTHER.node_id)
    with pytest.raises(Unauthenticated):
        claims.audit_order(req, OTHER.public(), auditor=NODE.node_id)
    with pytest.raises(FailedPrecondition):
        claims.audit_order(req, None)


def test_hello_is_fresh_and_signed_by_the_key_it_offers():
    hello = signed(pb.HelloReply(client_nonce=b"n" * 16, coordinator_key=COORD.public_key, challenge=b"c" * 16))
    assert claims.coordinator_hello(hello, b"n" * 16).public_key == COORD.public_key
    with pytest.raises(Unauthenticated, match="nonce"):
        claims.coordinator_hello(hello, b"m" * 16)
    forged = signed(pb.HelloReply(client_nonce=b"n" * 16, coordinator_key=COORD.public_key), OTHER)
    with pytest.raises(Unauthenticated, match="bad signature"):
        claims.coordinator_hello(forged, b"n" * 16)


def test_heartbeat_reply_answers_this_seq():
    reply = signed(pb.HeartbeatReply(seq=4))
    claims.heartbeat_reply(reply, COORD.public(), 4)
    with pytest.raises(Unauthenticated, match="replayed"):
        claims.heartbeat_reply(reply, COORD.public(), 5)
    with pytest.raises(Unauthenticated, match="bad signature"):
        claims.heartbeat_reply(reply, OTHER.public(), 4)


# -- nodes' messages --------------------------------------------------------------------------------


def test_registration_and_heartbeat_are_signed_by_the_node():
    reg = pb.RegisterRequest(public_key=NODE.public_key, address="127.0.0.1:5", challenge=b"c" * 16)
    claims.registration(sign(reg, NODE))
    with pytest.raises(Unauthenticated):
        claims.registration(sign(reg, OTHER))
    beat = pb.HeartbeatRequest(node_id=NODE.node_id, seq=1)
    claims.heartbeat(sign(beat, NODE), NODE.public())
    with pytest.raises(Unauthenticated):
        claims.heartbeat(sign(beat, OTHER), NODE.public())


def terms(**kw) -> pb.AssignRequest:
    """The assignment of NODE at stage 1 (what its reports' assignment digest hashes)."""
    return pb.AssignRequest(**{"run_id": RUN, "stage": 1, "num_stages": 3, "model": pb.ModelSpec(n_layer=3, dropout=0.0),
                               "train": pb.TrainSpec(seed=5, micro_batches=2), "data_digest": b"d" * 32,
                               "tolerance": 1e-3, **kw})


ASSIGNED = claims.assignment_digest(terms())


def report(**kw) -> pb.StepReport:
    return sign(pb.StepReport(**{"run_id": RUN, "step": 3, "stage": 1, "node_id": NODE.node_id, "epoch": 2,
                                 "attempt": 1, "assignment_digest": ASSIGNED, "state_digest": b"s" * 32, **kw}), NODE)


def test_stage_report_binds_run_step_stage_and_node():
    bind = dict(kind="step", run_id=RUN, step=3, stage=1, node_id=NODE.node_id, epoch=2, attempt=1,
                assignment=ASSIGNED)
    claims.stage_report(report(), NODE.public(), **bind)
    with pytest.raises(Unauthenticated, match="bad signature"):
        claims.stage_report(report(), OTHER.public(), **bind)
    for field, value in (("run_id", "other"), ("step", 4), ("stage", 2), ("node_id", OTHER.node_id)):
        with pytest.raises(Unauthenticated, match="different step/stage/node"):
            claims.stage_report(report(**{field: value}), NODE.public(), **bind)


@pytest.mark.parametrize("field, value", [("epoch", 1), ("attempt", 0), ("assignment_digest", b"x" * 32)])
def test_a_replayed_report_of_another_epoch_attempt_or_assignment_answers_nothing(field, value):
    bind = dict(kind="step", run_id=RUN, step=3, stage=1, node_id=NODE.node_id, epoch=2, attempt=1,
                assignment=ASSIGNED)
    with pytest.raises(Unauthenticated, match="replayed report|another assignment"):
        claims.stage_report(report(**{field: value}), NODE.public(), **bind)


def audit_of_report(**kw) -> pb.AuditRequest:
    t = terms()
    req = pb.AuditRequest(**{"run_id": RUN, "kind": pb.AUDIT_KIND_FORWARD, "step": 3, "stage": 1, "num_stages": 3,
                             "model": t.model, "train": t.train, "data_digest": t.data_digest,
                             "tolerance": t.tolerance, "epoch": 2, "attempt": 1, "report": report(), **kw})
    req.target.CopyFrom(peer(NODE))
    return req


def test_the_assignment_digest_covers_every_setting_the_node_agreed_to():
    assert claims.assignment_digest(audit_of_report()) == ASSIGNED  # an order restates the assignment
    changed = [terms(stage=2), terms(num_stages=4), terms(model=pb.ModelSpec(n_layer=3, dropout=0.1)),
               terms(model=pb.ModelSpec(n_layer=4)), terms(train=pb.TrainSpec(seed=5, micro_batches=2, lr=1.0)),
               terms(data_digest=b"e" * 32), terms(tolerance=1e-2), terms(run_id="other")]
    assert len({claims.assignment_digest(t) for t in changed} | {ASSIGNED}) == len(changed) + 1


@pytest.mark.parametrize("change", [
    {"model": pb.ModelSpec(n_layer=3, dropout=0.5)},  # dropout changed: recomputation would differ
    {"model": pb.ModelSpec(n_layer=2)},               # depth changed
    {"tolerance": 0.0},                               # exact mode the node never agreed to
    {"train": pb.TrainSpec(seed=6, micro_batches=2)},
    {"epoch": 1},                                     # a replayed report of another epoch
    {"attempt": 0},                                   # ... or of another attempt of the step
])
def test_an_audit_order_with_other_settings_than_the_node_signed_judges_nothing(change):
    claims.audited_reports(audit_of_report())
    with pytest.raises(InvalidArgument, match="other assignment settings|epoch"):
        claims.audited_reports(audit_of_report(**change))


def test_the_audit_orders_reports_are_the_audited_nodes_own():
    req = audit_of_report()
    claims.audited_reports(req)
    req.report.CopyFrom(report(step=2))
    with pytest.raises(InvalidArgument):
        claims.audited_reports(req)
    req.report.CopyFrom(sign(pb.StepReport(run_id=RUN, step=3, stage=1, node_id=NODE.node_id), OTHER))
    with pytest.raises(Unauthenticated):
        claims.audited_reports(req)
    req.report.CopyFrom(report())
    req.kind = pb.AUDIT_KIND_UPDATE
    req.update_report.CopyFrom(sign(pb.UpdateReport(run_id=RUN, step=3, stage=1, node_id=NODE.node_id), OTHER))
    with pytest.raises(Unauthenticated, match="update report"):
        claims.audited_reports(req)
    req.target.public_key = OTHER.public_key  # a node id that is not its key's hash
    with pytest.raises(Unauthenticated, match="does not match its public key"):
        claims.audited_reports(req)


def test_fetch_request_is_signed_by_its_requester():
    req = pb.FetchStateRequest(run_id=RUN, node_id=OTHER.node_id, step=3, requester=NODE.node_id)
    claims.fetch_request(sign(req, NODE), NODE.public(), what="fetch-state request")
    with pytest.raises(Unauthenticated, match="fetch-state request"):
        claims.fetch_request(sign(req, OTHER), NODE.public(), what="fetch-state request")


def test_peer_key_binds_the_node_id_to_its_key():
    assert claims.peer_key(peer(NODE)).public_key == NODE.public_key
    bad = pb.PeerInfo(node_id=NODE.node_id, public_key=OTHER.public_key)
    with pytest.raises(Unauthenticated):
        claims.peer_key(bad)
    with pytest.raises(InvalidArgument):
        claims.peer_key(bad, unbound=InvalidArgument)


# -- tensors and states -------------------------------------------------------------------------------


def commitment(sender: Identity = NODE, digest: bytes = b"\x11" * 32, signer: Identity | None = None):
    header = pb.TensorHeader(run_id=RUN, step=3, micro_batch=0, stage=1, direction=pb.DIRECTION_FORWARD,
                             sender=sender.node_id, receiver=OTHER.node_id, dtype=pb.DTYPE_FLOAT32, shape=[2])
    return sign(pb.TensorCommitment(header=header, payload_digest=digest), signer or sender)


def test_tensor_commitment_is_signed_by_its_sender():
    claims.tensor_commitment(commitment(), NODE.public())
    with pytest.raises(Unauthenticated):
        claims.tensor_commitment(commitment(signer=OTHER), NODE.public())


def test_sent_tensor_names_its_sender():
    claims.sent_tensor(commitment(), peer(NODE), what="input/0")
    with pytest.raises(Unauthenticated, match="bad signature"):
        claims.sent_tensor(commitment(signer=OTHER), peer(NODE), what="input/0")
    with pytest.raises(ValueError, match="expected"):
        claims.sent_tensor(commitment(sender=OTHER), peer(NODE), what="input/0", unbound=ValueError)


STATE = {"param/w": torch.arange(4, dtype=torch.float32)}


def attestation(signer: Identity = NODE, **kw) -> pb.StateAttestation:
    fields = {"run_id": RUN, "node_id": NODE.node_id, "stage": 1, "step": 3, "epoch": 2,
              "state_digest": state_digest(iter(STATE.items())), **kw}
    return sign(pb.StateAttestation(**fields), signer)


def audit_req() -> pb.AuditRequest:
    return pb.AuditRequest(run_id=RUN, stage=1, step=3, epoch=2)


def test_served_state_binds_run_node_stage_step_epoch_and_digest():
    claims.served_state(attestation(), peer(NODE), audit_req(), 3, STATE)
    with pytest.raises(Unauthenticated):
        claims.served_state(attestation(OTHER), peer(NODE), audit_req(), 3, STATE)
    for field, value in (("run_id", "other"), ("node_id", OTHER.node_id), ("stage", 2), ("step", 4), ("epoch", 1),
                         ("state_digest", b"x" * 32)):
        with pytest.raises(AuditIncomplete):
            claims.served_state(attestation(**{field: value}), peer(NODE), audit_req(), 3, STATE)
    with pytest.raises(AuditIncomplete, match="does not hash"):
        claims.served_state(attestation(), peer(NODE), audit_req(), 3, {"param/w": torch.zeros(4)})


def test_committed_state_names_the_committed_digest():
    digest = state_digest(iter(STATE.items()))
    claims.committed_state(attestation(), NODE.public(), digest, stage=1, step=3)
    with pytest.raises(Unauthenticated):
        claims.committed_state(attestation(OTHER), NODE.public(), digest, stage=1, step=3)
    with pytest.raises(DataLoss):
        claims.committed_state(attestation(), NODE.public(), b"x" * 32, stage=1, step=3)
    with pytest.raises(DataLoss):
        claims.committed_state(None, NODE.public(), digest, stage=1, step=3)


# -- verdicts -------------------------------------------------------------------------------------------


def test_audit_verdict_is_the_named_auditors_answer_to_this_order():
    req = pb.AuditRequest(run_id=RUN, audit_id=7, auditor=OTHER.node_id, session=b"a" * 16)
    verdict = sign(pb.AuditVerdict(run_id=RUN, audit_id=7, auditor=OTHER.node_id, verdict=pb.VERDICT_PASS,
                                   order_digest=claims.order_digest(req)), OTHER)
    claims.audit_verdict(verdict, req, OTHER.public_key)
    with pytest.raises(Unauthenticated):
        claims.audit_verdict(verdict, req, NODE.public_key)
    for field, value in (("audit_id", 8), ("run_id", "other"), ("auditor", NODE.node_id), ("order_digest", b"")):
        wrong = pb.AuditVerdict()
        wrong.CopyFrom(verdict)
        setattr(wrong, field, value)
        with pytest.raises(PipeguardError) as exc:
            claims.audit_verdict(sign(wrong, OTHER), req, OTHER.public_key)
        assert type(exc.value) is PipeguardError  # what the coordinator's audit always raised
        with pytest.raises(ValueError):
            claims.audit_verdict(sign(wrong, OTHER), req, OTHER.public_key, unbound=ValueError)


def test_an_old_verdict_replayed_for_a_new_order_with_the_same_id_answers_nothing():
    """Audit ids restart at 1 after a coordinator restart: the verdict binds the whole order (whose
    session is drawn per start), so a verdict signed for the old order #7 answers no new order #7."""
    old = pb.AuditRequest(run_id=RUN, audit_id=7, auditor=OTHER.node_id, step=3, epoch=2, session=b"a" * 16)
    verdict = sign(pb.AuditVerdict(run_id=RUN, audit_id=7, auditor=OTHER.node_id, verdict=pb.VERDICT_FAIL,
                                   order_digest=claims.order_digest(old)), OTHER)
    claims.audit_verdict(verdict, old, OTHER.public_key)
    for change in ({"session": b"b" * 16}, {"epoch": 3}, {"attempt": 1}, {"step": 4}):
        new = pb.AuditRequest()
        new.CopyFrom(old)
        for k, v in change.items():
            setattr(new, k, v)
        with pytest.raises(PipeguardError, match="different audit order"):
            claims.audit_verdict(verdict, new, OTHER.public_key)


def test_an_attached_claim_counts_only_if_signed_by_the_party_it_names():
    parties = (peer(NODE), peer(OTHER, stage=2), pb.PeerInfo())
    assert claims.attached_signer(commitment(), parties).node_id == NODE.node_id
    assert claims.attached_signer(attestation(), parties).node_id == NODE.node_id
    assert claims.attached_signer(commitment(signer=OTHER), parties) is None  # forged
    assert claims.attached_signer(commitment(sender=COORD), parties) is None  # no party of the audit


def test_equivocation_needs_two_versions_of_the_signers_own_output():
    a, b = commitment(digest=b"\x01" * 32), commitment(digest=b"\x02" * 32)
    assert claims.equivocation(a, b, NODE.public_key) is None
    assert claims.equivocation(attestation(), attestation(state_digest=b"y" * 32), NODE.public_key) is None
    assert "not contradictory" in claims.equivocation(a, a, NODE.public_key)
    theirs = commitment(sender=OTHER, digest=b"\x02" * 32, signer=NODE)
    assert "own output" in claims.equivocation(a, theirs, NODE.public_key)
    with pytest.raises(Unauthenticated):
        claims.equivocation(a, commitment(digest=b"\x02" * 32, signer=OTHER), NODE.public_key)


def test_two_tensors_of_different_attempts_or_epochs_are_not_equivocation():
    """A retried attempt is another computation (its upstream input may differ): two gradients of
    one micro-batch in attempts 0 and 1 contradict nothing. Within one attempt they do, whatever
    else their headers say (another input digest does not excuse a second version)."""
    def version(digest: bytes, **header) -> pb.TensorCommitment:
        c = commitment(digest=digest)
        for k, v in header.items():
            setattr(c.header, k, v)
        return sign(c, NODE)

    a = version(b"\x01" * 32, attempt=0)
    for other in ({"attempt": 1}, {"epoch": 1}, {"step": 4}, {"micro_batch": 1}, {"stage": 2},
                  {"direction": pb.DIRECTION_BACKWARD}):
        assert "not contradictory" in claims.equivocation(a, version(b"\x02" * 32, **other), NODE.public_key)
    assert claims.equivocation(a, version(b"\x02" * 32, input_digest=b"i" * 32), NODE.public_key) is None


# -- nobody else checks signatures ---------------------------------------------------------------------


ALLOWED = {Path("pipeguard/claims.py"), Path("pipeguard/signing.py")}


def _verify_calls(path: Path) -> list[int]:
    """Lines of ``path`` that import or call ``pipeguard.signing.verify`` (directly or as ``signing.verify``)."""
    with warnings.catch_warnings():  # a benchmark's invalid escape sequence is not ours to report here
        warnings.simplefilter("ignore", (DeprecationWarning, SyntaxWarning))
        tree = ast.parse(path.read_text(), str(path))
    lines = []
    signing_names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module == "pipeguard.signing"
                                                 or (node.level and node.module == "signing")):
            lines += [node.lineno for a in node.names if a.name in ("verify", "*")]
        elif isinstance(node, ast.ImportFrom) and node.module == "pipeguard":
            signing_names |= {a.asname or a.name for a in node.names if a.name == "signing"}
        elif isinstance(node, ast.Import):
            signing_names |= {a.asname or a.name for a in node.names if a.name == "pipeguard.signing"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr == "verify":
            base = ast.unparse(node.value)
            if base in signing_names or base.endswith("signing"):
                lines.append(node.lineno)
    return lines


def test_only_claims_calls_signing_verify():
    offenders = []
    for top in ("pipeguard", "node", "coordinator", "benchmarks"):
        for path in sorted((ROOT / top).rglob("*.py")):
            rel = path.relative_to(ROOT)
            if rel in ALLOWED or "v1" in rel.parts:
                continue
            offenders += [f"{rel}:{line}" for line in _verify_calls(path)]
    assert not offenders, ("signatures are checked in pipeguard/claims.py only; add a named rule there and call "
                           f"it instead of signing.verify: {offenders}")


def test_the_ast_check_sees_each_way_of_calling_verify(tmp_path):
    for src in ("from pipeguard.signing import verify\n", "from pipeguard.signing import sign, verify as v\n",
                "from pipeguard import signing\nsigning.verify(m, k)\n", "import pipeguard.signing\npipeguard.signing.verify(m, k)\n",
                "from pipeguard import signing as s\ns.verify(m, k)\n"):
        path = tmp_path / "mod.py"
        path.write_text(src)
        assert _verify_calls(path), src
    path.write_text("from pipeguard import claims\nclaims.order(m, k, node_id='', run_id='', what='')\n")
    assert not _verify_calls(path)
