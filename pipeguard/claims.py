"""Signed-claim rules: every "X must be signed by Y, binding Z" check of pipeguard, in one place.

``pipeguard.signing`` holds the canonical encoding and the raw signature check; this module says
who must have signed each message, and what the signed message must bind (the run, node, stage,
step, epoch or digest it is about) before a daemon, the judge or ``pipeguard verify`` acts on it.
Nothing else calls ``signing.verify`` (tests/test_claims.py fails a module that does).

A bad signature is always ``Unauthenticated``. A validly signed claim that binds something else
raises what its caller needs (given on each rule; where two callers need different ones, the
rule takes ``unbound``): an order for another node is ``InvalidArgument``, a state for another
step leaves an audit ``AuditIncomplete``, a malformed evidence bundle is a ``BundleError``.

==========================================  ===========================  =========================
claim                                       signed by                    rule
==========================================  ===========================  =========================
Assign/RunStep/ApplyUpdate/AbortStep order  the coordinator              ``order``
Audit order (and the bundle's copy)         the coordinator              ``audit_order``
Hello reply, heartbeat reply                the coordinator              ``coordinator_hello``,
                                                                         ``heartbeat_reply``
registration, heartbeat                     the node                     ``registration``,
                                                                         ``heartbeat``
step report, update report                  the stage's holder           ``stage_report``,
                                                                         ``audited_reports``
FetchState/FetchTensor/FetchCheckpoint      the requester (or the        ``fetch_request``
                                            coordinator)
tensor commitment (header + digest)         the tensor's sender          ``tensor_commitment``,
                                                                         ``sent_tensor``
a pushed stream's header (first chunk)      the tensor's sender          ``tensor_header``
state attestation                           the stage's holder           ``served_state``,
                                                                         ``committed_state``
audit verdict                               the auditor                  ``audit_verdict``
claims attached to a verdict                the node each one names      ``attached_signer``
two versions of one output                  their common signer          ``equivocation``
a stage's state at step 0 vs. the seed      the coordinator (the order)  ``seeded_start``
                                            and the stage's holder
a state claim vs. the update report before  the stage's holder           ``contradicting_commitments``
a served state vs. its own attestation      the stage's holder           ``off_attestation``
==========================================  ===========================  =========================

What a node signs binds what it agreed to compute and when: every tensor header, step report
and update report carries the epoch, the attempt of the step and the node's
``assignment_digest`` (model, train spec, stage, stage count, data digest, tolerance, as its
AssignRequest fixed them); an output's header also names the digests of the inputs it was
computed from, and a step report every tensor the step computed from. An audit order is judged against those: ``audited_reports`` refuses an order
whose settings, epoch or attempt are not the ones the audited node signed, and a verdict
answers one order only (``order_digest``, which covers the coordinator's per-start session).
"""

from __future__ import annotations

import hashlib
from typing import Iterable

import torch
from google.protobuf.message import Message

from pipeguard.errors import (AuditIncomplete, DataLoss, FailedPrecondition, InvalidArgument, PipeguardError,
                              Unauthenticated)
from pipeguard.identity import PublicIdentity, node_id_for
from pipeguard import tensors
from pipeguard.signing import canonical_bytes, verify
from pipeguard.v1 import pipeguard_pb2 as pb

# -- keys -----------------------------------------------------------------------------------------


def peer_key(peer: pb.PeerInfo, unbound: type[Exception] = Unauthenticated) -> PublicIdentity:
    """The key of ``peer``, whose node id must be the hash of its public key (else ``unbound``)."""
    if node_id_for(peer.public_key) != peer.node_id:
        raise unbound(f"peer {peer.node_id} does not match its public key")
    return PublicIdentity(peer.public_key)


def _coordinator(key: PublicIdentity | None) -> PublicIdentity:
    if key is None:
        raise FailedPrecondition("not registered with a coordinator yet")
    return key


# -- what a signer agreed to ------------------------------------------------------------------------


def assignment_terms(msg: pb.AssignRequest | pb.AuditRequest) -> pb.AssignmentTerms:
    """The settings a stage computes under, as an AssignRequest fixes them (or an audit order restates them)."""
    return pb.AssignmentTerms(run_id=msg.run_id, stage=msg.stage, num_stages=msg.num_stages, model=msg.model,
                              train=msg.train, data_digest=msg.data_digest, tolerance=msg.tolerance)


def assignment_digest(msg: pb.AssignRequest | pb.AuditRequest) -> bytes:
    """SHA-256 of ``assignment_terms``: what the node signs into its headers and reports."""
    return hashlib.sha256(canonical_bytes(assignment_terms(msg))).digest()


def order_digest(req: pb.AuditRequest) -> bytes:
    """SHA-256 of an audit order's canonical bytes (all of it but the signature, which signs them):
    what a verdict binds, so that it answers that order and no other."""
    return hashlib.sha256(b"pipeguard-audit-order\x00" + canonical_bytes(req)).digest()


def bound_to_order(claim: pb.StepReport | pb.UpdateReport | pb.TensorHeader, req: pb.AuditRequest, what: str,
                   unbound: type[Exception] = InvalidArgument) -> None:
    """A report or output header of the audited node was signed in the order's epoch and attempt and
    under the assignment the order restates (``unbound`` otherwise): an order with other settings
    (a changed model, dropout or tolerance) or a replayed claim of another attempt judges nothing."""
    if (claim.epoch, claim.attempt) != (req.epoch, req.attempt):
        raise unbound(f"{what} is of epoch {claim.epoch} attempt {claim.attempt}, the audit order of epoch "
                      f"{req.epoch} attempt {req.attempt}")
    if claim.assignment_digest != assignment_digest(req):
        raise unbound(f"{what} was signed under other assignment settings than the audit order's "
                      "(model, train spec, stage, data or tolerance differ)")


# -- the coordinator's messages to nodes ----------------------------------------------------------


def order(msg: Message, coordinator: PublicIdentity | None, *, node_id: str, run_id: str, what: str) -> None:
    """An Assign/RunStep/ApplyUpdate/AbortStep order is signed by the coordinator this node registered
    with (FailedPrecondition before registration), addressed to this node (InvalidArgument) and for
    its run (FailedPrecondition)."""
    verify(msg, _coordinator(coordinator), what=f"{what} order")
    if msg.node_id != node_id:
        raise InvalidArgument(f"{what} order is addressed to {msg.node_id!r}, not this node")
    if msg.run_id != run_id:
        raise FailedPrecondition(f"{what} order is for run {msg.run_id!r}, not {run_id!r}")


def audit_order(req: pb.AuditRequest, coordinator: PublicIdentity | None, *, auditor: str | None = None,
                what: str = "audit order") -> None:
    """An audit order is signed by the coordinator (FailedPrecondition before registration) and, for a
    node asked to audit, names it as the auditor (InvalidArgument). ``pipeguard verify`` checks the
    signature alone (an order the coordinator audited itself names no auditor)."""
    verify(req, _coordinator(coordinator), what=what)
    if auditor is not None and req.auditor != auditor:
        raise InvalidArgument(f"audit order is addressed to {req.auditor!r}, not this node")


def coordinator_hello(hello: pb.HelloReply, nonce: bytes) -> PublicIdentity:
    """A Hello reply echoes the node's fresh nonce and is signed by the key it offers; returns that
    key (whether to trust it is the node's pin or trust-on-first-use decision)."""
    if hello.client_nonce != nonce:
        raise Unauthenticated("coordinator did not echo our nonce")
    key = PublicIdentity(hello.coordinator_key)
    verify(hello, key, what="coordinator hello")
    return key


def heartbeat_reply(reply: pb.HeartbeatReply, coordinator: PublicIdentity, seq: int) -> None:
    """A heartbeat reply is signed by the coordinator for the heartbeat it answers (a replayed reply
    for an earlier seq is Unauthenticated too)."""
    verify(reply, coordinator, what="heartbeat reply")
    if reply.seq != seq:
        raise Unauthenticated(f"heartbeat reply is for seq {reply.seq}, not {seq} (a replayed reply)")


# -- nodes' messages to the coordinator -----------------------------------------------------------


def registration(req: pb.RegisterRequest) -> None:
    """A registration is signed by the key it registers (its node id is that key's hash); the
    challenge it signs is the registry's to check."""
    verify(req, PublicIdentity(req.public_key), what="registration")


def heartbeat(req: pb.HeartbeatRequest, node: PublicIdentity) -> None:
    """A heartbeat is signed by the registered node it names."""
    verify(req, node, what="heartbeat")


def stage_report(rep: pb.StepReport | pb.UpdateReport, holder: PublicIdentity, *, kind: str, run_id: str,
                 step: int, stage: int, node_id: str, epoch: int, attempt: int, assignment: bytes) -> None:
    """A stage's ``kind`` report ("step" or "update") is signed by the stage's holder and answers this
    run, step, stage, node, epoch and attempt, under the assignment digest the holder was given
    (Unauthenticated otherwise: a replayed report of another attempt or epoch answers nothing)."""
    verify(rep, holder, what=f"{kind} report from stage {stage}")
    noun = "report" if kind == "step" else f"{kind} report"
    if (rep.run_id, rep.step, rep.stage, rep.node_id) != (run_id, step, stage, node_id):
        raise Unauthenticated(f"stage {stage} {noun} is for a different step/stage/node")
    if (rep.epoch, rep.attempt) != (epoch, attempt):
        raise Unauthenticated(f"stage {stage} {noun} is of epoch {rep.epoch} attempt {rep.attempt}, not "
                              f"{epoch}/{attempt} (a replayed report)")
    if rep.assignment_digest != assignment:
        raise Unauthenticated(f"stage {stage} {noun} was computed under another assignment than the one given")


def audited_reports(req: pb.AuditRequest) -> None:
    """An audit order carries the audited node's own step report for the audited step (InvalidArgument
    otherwise), signed by it, and for an update audit its signed update report; both of the order's
    epoch and attempt and under the assignment the order restates (``bound_to_order``)."""
    if (req.report.run_id, req.report.node_id, req.report.step, req.report.stage) != (
            req.run_id, req.target.node_id, req.step, req.stage):
        raise InvalidArgument("the step report in the audit order is not the audited node's for this step")
    verify(req.report, peer_key(req.target), what="audited node's step report")
    bound_to_order(req.report, req, "the audited node's step report")
    if req.kind == pb.AUDIT_KIND_UPDATE:
        up = req.update_report
        if (up.run_id, up.node_id, up.step, up.stage) != (req.run_id, req.target.node_id, req.step, req.stage):
            raise InvalidArgument("the update report in the audit order is not the audited node's for this step")
        verify(up, peer_key(req.target), what="audited node's update report")
        bound_to_order(up, req, "the audited node's update report")
        if (req.update.run_id, req.update.step, req.update.epoch, req.update.attempt, req.update.node_id) != (
                req.run_id, req.step, req.epoch, req.attempt, req.target.node_id):
            raise InvalidArgument("the ApplyUpdate order in the audit order is not the audited node's for this step")


def fetch_request(request: Message, requester: PublicIdentity, what: str) -> None:
    """A FetchState/FetchTensor/FetchCheckpoint request is signed by its requester (the coordinator
    when it names none); who may fetch at all is the server's to decide."""
    verify(request, requester, what=what)


# -- tensors and states -----------------------------------------------------------------------------


def tensor_header(header: pb.TensorHeader, signature: bytes, sender: PublicIdentity) -> None:
    """A pushed stream's header (its first chunk's ``header_signature``) is signed by the sender it
    names. The receiver checks it before it reads anything else or gives the stream a slot, so that
    nobody without the sender's key holds a slot in its name, and a refusal is charged to a sender
    only when it signed what was refused (node/service.py)."""
    if not signature or not sender.verify(signature, canonical_bytes(header)):
        raise Unauthenticated(f"bad header signature on a tensor stream (claimed sender {header.sender[:8]})")


def tensor_commitment(commitment: pb.TensorCommitment, sender: PublicIdentity, what: str = "tensor commitment") -> None:
    """A tensor commitment (its header: run, step, micro-batch, direction, sender, receiver, epoch;
    and the payload digest) is signed by the tensor's sender, whose key the receiver's admission
    chose from the header before the payload was read."""
    verify(commitment, sender, what=what)


def sent_tensor(commitment: pb.TensorCommitment, sender: pb.PeerInfo, what: str,
                unbound: type[Exception] = Unauthenticated) -> None:
    """``tensor_commitment`` for a commitment held apart from its stream (an evidence bundle): its
    header names ``sender``, whose node id is its key's hash (else ``unbound``), and it signed it."""
    if node_id_for(sender.public_key) != sender.node_id or commitment.header.sender != sender.node_id:
        raise unbound(f"{what}: signed by {commitment.header.sender[:8]}, expected {sender.node_id[:8]}")
    tensor_commitment(commitment, PublicIdentity(sender.public_key), what=what)


def served_state(att: pb.StateAttestation, holder: pb.PeerInfo, req: pb.AuditRequest, step: int,
                 named: dict[str, torch.Tensor]) -> None:
    """A state served for an audit comes with an attestation signed by the audited node, binding the
    audit's run, that node, the audited stage, ``step`` and the audit's epoch, and the state hashes
    to the digest it signs (AuditIncomplete otherwise)."""
    verify(att, peer_key(holder), what="state attestation")
    if att.epoch != req.epoch:
        raise AuditIncomplete(f"the state served is from epoch {att.epoch}, the audit is of epoch {req.epoch} "
                              "(the run was rolled back since)")
    if (att.run_id, att.node_id, att.stage, att.step) != (req.run_id, holder.node_id, req.stage, step):
        raise AuditIncomplete(f"state attestation is for {att.node_id[:8]} stage {att.stage} step {att.step}, "
                              f"expected {holder.node_id[:8]} stage {req.stage} step {step}")
    if tensors.state_digest(iter(named.items())) != att.state_digest:
        raise AuditIncomplete("served state does not hash to the digest its attestation signs")


def committed_state(att: pb.StateAttestation | None, holder: PublicIdentity, committed: bytes, *, stage: int,
                    step: int) -> None:
    """A state kept as a checkpoint comes with its holder's signed attestation naming the digest the
    stage committed to (DataLoss otherwise; the checkpoint store re-hashes the state itself)."""
    if att is None or att.state_digest != committed:
        raise DataLoss(f"stage {stage} served a state other than the one it committed to for step {step}")
    verify(att, holder, what="state attestation")


# -- verdicts and what they carry ---------------------------------------------------------------------


def audit_verdict(verdict: pb.AuditVerdict, req: pb.AuditRequest, auditor_key: bytes,
                  unbound: type[Exception] = PipeguardError) -> None:
    """A verdict is signed by the auditor the order named (``auditor_key``) and answers that order:
    its audit id, run and auditor, and the order's digest (``order_digest``: not another order with
    the same id, e.g. from before a coordinator restart) (else ``unbound``: the coordinator's audit
    fails, a bundle is a ``BundleError``)."""
    verify(verdict, PublicIdentity(auditor_key), what="audit verdict")
    if verdict.auditor != node_id_for(auditor_key) or verdict.auditor != req.auditor:
        raise unbound("the verdict is not signed by the auditor the order named")
    if (verdict.audit_id, verdict.run_id) != (req.audit_id, req.run_id) or verdict.order_digest != order_digest(req):
        raise unbound("the verdict answers a different audit order")


def owner(claim: pb.TensorCommitment | pb.StateAttestation) -> str:
    """The node a claim speaks for: a tensor's sender, or a state's holder."""
    return claim.header.sender if isinstance(claim, pb.TensorCommitment) else claim.node_id


def attached_signer(claim: pb.TensorCommitment | pb.StateAttestation,
                    parties: Iterable[pb.PeerInfo]) -> pb.PeerInfo | None:
    """The audit party (target, prev, next) that signed ``claim``, a claim attached to a verdict, or
    None: a claim counts only if validly signed by the node it names (an auditor cannot excuse itself,
    or frame anyone, with made-up claims)."""
    by_id = {p.node_id: p for p in parties if p.node_id}
    signer = by_id.get(owner(claim))
    if signer is None:
        return None
    try:
        verify(claim, PublicIdentity(signer.public_key), what="claim attached to the verdict")
    except PipeguardError:
        return None
    return signer


def tensor_subject(h: pb.TensorHeader) -> tuple:
    """What one computation of a tensor is: an honest node sends exactly one tensor per (run, epoch,
    attempt, step, micro-batch, direction, stage, sender). A retried attempt or a new epoch is
    another computation (its inputs may differ), never a contradiction."""
    return (h.run_id, h.epoch, h.attempt, h.step, h.micro_batch, h.direction, h.stage, h.sender)


def same_subject(a, b) -> bool:
    """Two claims by one signer about the same tensor or state, with different contents."""
    if isinstance(a, pb.TensorCommitment):
        if not isinstance(b, pb.TensorCommitment):
            return False
        return tensor_subject(a.header) == tensor_subject(b.header) and a.payload_digest != b.payload_digest
    if not isinstance(b, pb.StateAttestation):
        return False
    return ((a.run_id, a.node_id, a.stage, a.step, a.epoch) == (b.run_id, b.node_id, b.stage, b.step, b.epoch)
            and a.state_digest != b.state_digest)


def equivocation(first, second, signer_key: bytes) -> str | None:
    """None when ``first`` and ``second`` (two TensorCommitments, or two StateAttestations) prove that
    the node of ``signer_key`` signed two versions of its own output; else why they do not. Both must
    be signed by it (Unauthenticated), both about its own tensor or state, and about the same one."""
    for claim in (first, second):
        verify(claim, PublicIdentity(signer_key), what="equivocating claim")
    if {owner(first), owner(second)} != {node_id_for(signer_key)}:
        return "the claims are not about the signer's own output"
    if not same_subject(first, second):
        return "the two claims are not contradictory"
    return None


# -- a node's claims about its own state, against each other and against the run seed --------------


def seeded_start(order: pb.AssignRequest, claim: pb.StepReport | pb.StateAttestation, coordinator_key: bytes,
                 holder_key: bytes, seeded: bytes) -> str | None:
    """None when the coordinator's signed ``order`` (stage ``order.stage`` from step 0, built from the
    run seed: no state digest to load) and the holder's signed ``claim`` about that stage's state at
    the start of step 0 (its step report, or the attestation of the state it served) prove that it
    started from other weights than the seeded initialisation (``seeded``, the digest of
    ``StageComputation.build`` for the order's model, seed and stage); else why they do not.

    The state at the start of step 0 is the seeded one in every epoch (checkpoint 0 is checked
    against it), so the claim needs no epoch."""
    verify(order, PublicIdentity(coordinator_key), what="assign order")
    verify(claim, PublicIdentity(holder_key), what="initial state claim")
    holder = node_id_for(holder_key)
    if order.node_id != holder or claim.node_id != holder:
        return "the order and the claim are not both about the signer"
    if order.start_step != 0 or order.state_digest:
        return "the order does not build the stage from the run seed"
    if (claim.run_id, claim.stage, claim.step) != (order.run_id, order.stage, 0):
        return "the claim is not about the ordered stage's state at step 0"
    if claim.state_digest == seeded:
        return "the claimed state is the seeded initialisation"
    return None


def contradicting_commitments(update: pb.UpdateReport, later: pb.StepReport | pb.StateAttestation,
                              holder_key: bytes) -> str | None:
    """None when the holder's signed ``update`` report (its state after step t) and its signed
    ``later`` claim about its state at the start of step t + 1 (a step report or a state attestation),
    in the same run, stage and epoch, name different digests: nothing honest changes a stage's state
    between its update and its next step, so the pair proves it swapped its weights after committing.
    Else why they do not."""
    verify(update, PublicIdentity(holder_key), what="update report")
    verify(later, PublicIdentity(holder_key), what="state claim")
    holder = node_id_for(holder_key)
    if update.node_id != holder or later.node_id != holder:
        return "the claims are not about the signer's own state"
    if (later.run_id, later.stage, later.step) != (update.run_id, update.stage, update.step + 1):
        return "the claims are not about the same stage's state after one step and before the next"
    if later.epoch != update.epoch:
        return "the claims are from different assignment epochs (a rollback in between)"
    if later.state_digest == update.state_digest:
        return "the two claims agree"
    return None


def off_attestation(att: pb.StateAttestation, holder_key: bytes, named: dict[str, torch.Tensor]) -> bool:
    """Whether ``named``, served under the holder's validly signed attestation ``att``
    (Unauthenticated otherwise), fails to hash to the digest that attestation signs."""
    verify(att, PublicIdentity(holder_key), what="state attestation")
    if att.node_id != node_id_for(holder_key):
        raise Unauthenticated("the attestation is not the signer's own")
    return tensors.state_digest(iter(named.items())) != att.state_digest
