"""Evidence bundles: everything needed to re-check a ban offline, and the checker.

A bundle is a zip file (``.pgev``) holding ``manifest.json`` and raw tensor files. The
manifest carries every signed claim as base64 protobuf bytes, so nothing in it has to be
trusted: ``verify_bundle`` re-checks each signature against the keys the claims themselves
bind (node ids are hashes of public keys; the audit order is signed by the coordinator), each
tensor against the digest its sender signed, and then re-runs the recomputation.

Kinds:

- ``audit``: the audited node's signed commitments contradict an honest recomputation (or the
  state it served is not the state it committed to). VALID means the accused cheated.
- ``false-accusation``: an auditor signed a FAIL verdict, but the recomputation over the same
  signed artifacts passes. VALID means the auditor lied.
- ``false-clearance``: an auditor signed a PASS verdict, but the recomputation over the same
  signed artifacts fails by more than ``FALSE_CLEARANCE_MARGIN`` times the tolerance (so that
  no honest recomputation could have passed), and nothing the auditor says it saw (the claims
  attached to its verdict) contradicts the bundle's artifacts. VALID means the auditor covered
  for a cheater.
- ``equivocation``: two different payloads signed by the same node for one computation: the
  same (run, epoch, attempt, step, micro-batch, direction, stage); a retried attempt is another
  computation.
- ``initial-state``: the coordinator's signed order to build a stage from the run seed at step 0,
  and the holder's signed claim (step report or state attestation) that the stage's state at step 0
  has another digest than the seeded initialisation, which ``verify`` rebuilds from the order's
  model, seed and stage. VALID means the holder started from other weights (a backdoor).
- ``contradiction``: the holder's signed update report of step t and its signed claim about its
  state at the start of step t + 1 name different digests. VALID means it swapped its weights
  after committing.
- ``off-attestation``: a state the coordinator received from a holder, with the holder's signed
  attestation, that does not hash to the digest the attestation signs, after the coordinator asked
  for it ``judge.OFF_ATTESTATION_LIMIT`` times. The state's bytes carry no signature of their own,
  so VALID here rests on the coordinator's receipt of them (its own fetch over its own channel):
  it shows the signed attestation and the bytes disagree, not who put the bytes on the wire.

Every kind but ``equivocation`` must hold every artifact its audit kind needs
(``audit.missing_artifacts``: the state, the inputs, the compared outputs, the tokens), and the
audit order must restate the settings the accused node signed (``claims.bound_to_order``: its
reports and sent tensors carry its assignment digest, epoch and attempt), so that neither a
bundle with a piece left out nor an order with other settings (a changed dropout or depth)
proves anything against a node that computed honestly what it was assigned.
"""

from __future__ import annotations

import base64
import json
import time
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeguard import audit, claims
from pipeguard.computation import REFEREE_THREADS, Determinism, StageComputation, StageSetup
from pipeguard.device import device_class
from pipeguard.errors import PipeguardError
from pipeguard.identity import PublicIdentity, node_id_for
from pipeguard import compression
from pipeguard.compression import PACKED, Packed
from pipeguard.tensors import ReceivedTensor, TORCH_DTYPES, header_dtype, payload_digest, payload_nbytes, tensor_bytes
from pipeguard.v1 import pipeguard_pb2 as pb

FORMAT = "pipeguard-evidence/1"


FALSE_CLEARANCE_MARGIN = 10.0
"""A PASS is provably false only when the recomputation deviates by more than this many times the
tolerance: honest recomputations with other thread counts stay within the per-element tolerance
(forward and backward deviations 0 at 2 threads vs 1, updates within the honest range at the
default 1e-4; benchmarks/audit_tolerance.py --quick), so no honest auditor lands on the wrong side
of 10x, while a cheater near the tolerance is still banned itself (just not its auditor)."""


def clearly_fails(finding: "audit.Finding", tolerance: float) -> bool:
    """The recomputation fails beyond any honest auditor's rounding (exact mode: any deviation)."""
    if finding.verdict != pb.VERDICT_FAIL:
        return False
    return finding.deviation > FALSE_CLEARANCE_MARGIN * tolerance if tolerance > 0 else finding.deviation != 0


class BundleError(Exception):
    """The bundle is malformed or does not prove what it claims."""


@dataclass
class VerifyResult:
    valid: bool
    kind: str
    accused: str
    summary: str


# -- writing ------------------------------------------------------------------------------------


class _Writer:
    def __init__(self) -> None:
        self.claims: dict[str, dict] = {}
        self.tensors: dict[str, dict] = {}
        self.files: dict[str, bytes] = {}

    def claim(self, name: str, msg) -> None:
        self.claims[name] = {"type": msg.DESCRIPTOR.full_name, "b64": base64.b64encode(msg.SerializeToString()).decode()}

    def tensor(self, name: str, t: "torch.Tensor | Packed") -> None:
        if not isinstance(t, Packed):
            t = t.detach().contiguous()
        fname = f"tensors/{len(self.tensors):05d}.bin"
        self.tensors[name] = {"dtype": int(header_dtype(t)), "shape": list(t.shape), "file": fname}
        self.files[fname] = bytes(tensor_bytes(t))

    def received(self, name: str, rt: ReceivedTensor) -> None:
        self.claim(name, rt.commitment)
        self.tensor(name, rt.tensor)

    def write(self, path: Path, manifest: dict) -> None:
        manifest = {"format": FORMAT, "created": time.time(), **manifest, "claims": self.claims,
                    "tensors": self.tensors}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
            zf.writestr("manifest.json", json.dumps(manifest, indent=1, sort_keys=True))
            for fname, data in self.files.items():
                zf.writestr(fname, data)
        tmp.replace(path)


def _write_artifacts(w: _Writer, art: audit.Artifacts) -> None:
    w.claim("request", art.request)
    if art.attestation is not None:
        w.claim("attestation", art.attestation)
    for name, t in art.state.items():
        w.tensor(f"state/{name}", t)
    if art.next_attestation is not None:
        w.claim("next_attestation", art.next_attestation)
    for name, t in art.next_state.items():
        w.tensor(f"next_state/{name}", t)
    for mb, rt in art.inputs.items():
        w.received(f"input/{mb}", rt)
    for mb, rt in art.grads_in.items():
        w.received(f"grad_in/{mb}", rt)
    for (direction, mb), rt in art.outputs.items():
        w.received(f"output/{direction}/{mb}", rt)
    for mb, (x, y) in art.tokens.items():
        w.tensor(f"tokens/{mb}/x", x)
        w.tensor(f"tokens/{mb}/y", y)


def write_audit_bundle(path: Path, art: audit.Artifacts, finding: audit.Finding, coordinator_key: bytes,
                       false_verdict: pb.AuditVerdict | None = None, auditor_key: bytes = b"") -> Path:
    """An ``audit`` bundle (accused: the audited node), or with ``false_verdict`` a
    ``false-accusation`` bundle (a FAIL verdict) or ``false-clearance`` bundle (a PASS verdict),
    accused: the auditor."""
    w = _Writer()
    _write_artifacts(w, art)
    for name, t in finding.recomputed.items():
        w.tensor(f"recomputed/{name}", t)
    manifest = {
        "kind": "audit" if false_verdict is None else
                ("false-clearance" if false_verdict.verdict == pb.VERDICT_PASS else "false-accusation"),
        "accused": false_verdict.auditor if false_verdict is not None else art.request.target.node_id,
        "coordinator_key": coordinator_key.hex(),
        "finding": {"verdict": pb.Verdict.Name(finding.verdict), "deviation": finding.deviation,
                    "detail": finding.detail, "tolerance": art.request.tolerance},
    }
    if false_verdict is not None:
        w.claim("verdict", false_verdict)
        manifest["auditor_key"] = auditor_key.hex()
    w.write(path, manifest)
    return path


def write_equivocation_bundle(path: Path, first, second, signer_key: bytes) -> Path:
    """Two claims signed by one node about the same thing that disagree: two TensorCommitments
    with one header and different payload digests, or two StateAttestations of one state."""
    w = _Writer()
    w.claim("first", first)
    w.claim("second", second)
    w.write(path, {"kind": "equivocation", "accused": node_id_for(signer_key), "signer_key": signer_key.hex()})
    return path


def write_initial_state_bundle(path: Path, order: pb.AssignRequest, claim, coordinator_key: bytes,
                               holder_key: bytes) -> Path:
    """The signed order to build a stage from the seed at step 0 and its holder's signed claim of another state."""
    w = _Writer()
    w.claim("order", order)
    w.claim("claim", claim)
    w.write(path, {"kind": "initial-state", "accused": node_id_for(holder_key), "coordinator_key": coordinator_key.hex(),
                   "signer_key": holder_key.hex()})
    return path


def write_contradiction_bundle(path: Path, update: pb.UpdateReport, later, holder_key: bytes) -> Path:
    """A holder's signed update report of step t and its contradicting signed claim about step t + 1."""
    w = _Writer()
    w.claim("update", update)
    w.claim("later", later)
    w.write(path, {"kind": "contradiction", "accused": node_id_for(holder_key), "signer_key": holder_key.hex()})
    return path


def write_off_attestation_bundle(path: Path, attestation: pb.StateAttestation, named: dict[str, torch.Tensor],
                                 holder_key: bytes, coordinator_key: bytes, times: int) -> Path:
    """A state served to the coordinator under an attestation it does not hash to (``times`` times)."""
    w = _Writer()
    w.claim("attestation", attestation)
    for name, t in named.items():
        w.tensor(f"state/{name}", t)
    w.write(path, {"kind": "off-attestation", "accused": node_id_for(holder_key), "signer_key": holder_key.hex(),
                   "coordinator_key": coordinator_key.hex(), "times": times})
    return path


def _state_claim(r: "_Reader", name: str):
    """A claim about a stage's state: a step report or a state attestation (the manifest says which)."""
    entry = r.manifest["claims"].get(name)
    types = {cls.DESCRIPTOR.full_name: cls for cls in (pb.StepReport, pb.StateAttestation)}
    if not isinstance(entry, dict) or entry.get("type") not in types:
        raise BundleError(f"claim {name!r} must be a step report or a state attestation")
    return r.claim(name, types[entry["type"]])


def _verify_state_claims(r: "_Reader", kind: str, pinned_coordinator: bytes | None) -> VerifyResult:
    key = bytes.fromhex(r.manifest["signer_key"])
    holder = node_id_for(key)
    if kind == "initial-state":
        coordinator_key = bytes.fromhex(r.manifest.get("coordinator_key", ""))
        if pinned_coordinator is not None and coordinator_key != pinned_coordinator:
            raise BundleError("the assign order was signed by a different coordinator than the pinned one")
        order, claim = r.claim("order", pb.AssignRequest), _state_claim(r, "claim")
        seeded = StageComputation.seeded_digest(StageSetup.from_specs(order.model, order.train, order.stage,
                                                                      order.num_stages))
        why_not = claims.seeded_start(order, claim, coordinator_key, key, seeded)
        if why_not is not None:
            return VerifyResult(False, kind, holder, why_not)
        return VerifyResult(True, kind, holder, f"node {holder} claims a state of stage {order.stage} at step 0 "
                            f"({claim.state_digest.hex()[:16]}…) other than the seeded initialisation "
                            f"({seeded.hex()[:16]}…)")
    if kind == "contradiction":
        update, later = r.claim("update", pb.UpdateReport), _state_claim(r, "later")
        why_not = claims.contradicting_commitments(update, later, key)
        if why_not is not None:
            return VerifyResult(False, kind, holder, why_not)
        return VerifyResult(True, kind, holder, f"node {holder} committed to one state of stage {update.stage} "
                            f"after step {update.step} and claimed another at the start of step {later.step}")
    att = r.claim("attestation", pb.StateAttestation)
    named = {n.removeprefix("state/"): r.tensor(n) for n in r.names("state/")}
    if not claims.off_attestation(att, key, named):
        return VerifyResult(False, kind, holder, "the state hashes to the digest its attestation signs")
    return VerifyResult(True, kind, holder, f"the state of stage {att.stage} at step {att.step} that node {holder} "
                        f"served the coordinator {r.manifest.get('times', '?')} times does not hash to the digest "
                        "it signed (as received by the coordinator: the bytes carry no signature of their own)")


# -- reading and verifying ------------------------------------------------------------------------


MAX_MANIFEST_BYTES = 64 * 1024 * 1024
"""Largest manifest.json a bundle may hold (uncompressed)."""
MAX_MEMBER_BYTES = 1 << 32
"""Largest tensor file a bundle may hold (uncompressed); each is also checked against its shape
before it is read, so a small zip cannot inflate into memory (a zip bomb)."""
_READ_ERRORS = (OSError, EOFError, zipfile.BadZipFile, zlib.error, NotImplementedError, RuntimeError)


class _Reader:
    def __init__(self, path: Path):
        try:
            self.zf = zipfile.ZipFile(path)
            self.manifest = json.loads(self._member("manifest.json", None, MAX_MANIFEST_BYTES))
        except (KeyError, json.JSONDecodeError, UnicodeDecodeError, RecursionError, *_READ_ERRORS) as exc:
            raise BundleError(f"not a readable evidence bundle: {type(exc).__name__}: {exc}") from None
        if not isinstance(self.manifest, dict):
            raise BundleError("not a readable evidence bundle: the manifest is not a JSON object")
        if self.manifest.get("format") != FORMAT:
            raise BundleError(f"unknown bundle format {self.manifest.get('format')!r}")
        for section in ("claims", "tensors"):
            if not isinstance(self.manifest.setdefault(section, {}), dict):
                raise BundleError(f"the manifest's {section!r} is not a JSON object")

    def _member(self, name: str, expected: int | None, limit: int = MAX_MEMBER_BYTES) -> bytes:
        """A member's bytes, refused before reading when its declared size is over ``limit`` or is not
        ``expected`` (zipfile never inflates past the declared size)."""
        info = self.zf.getinfo(name)
        if info.file_size > limit:
            raise BundleError(f"{name} holds {info.file_size} bytes; at most {limit} allowed")
        if expected is not None and info.file_size != expected:
            raise BundleError(f"{name} holds {info.file_size} bytes, its shape needs {expected}")
        return self.zf.read(info)

    def has(self, name: str) -> bool:
        return name in self.manifest["claims"]

    def claim(self, name: str, cls):
        entry = self.manifest["claims"].get(name)
        if not isinstance(entry, dict):
            raise BundleError(f"bundle lacks claim {name!r}")
        if entry["type"] != cls.DESCRIPTOR.full_name:
            raise BundleError(f"claim {name!r} is a {entry['type']}, expected {cls.DESCRIPTOR.full_name}")
        try:
            return cls.FromString(base64.b64decode(entry["b64"], validate=True))
        except Exception as exc:  # noqa: BLE001 - any decoding failure means a bad bundle
            raise BundleError(f"claim {name!r} does not decode: {exc}") from None

    def tensor(self, name: str) -> "torch.Tensor | Packed":
        entry = self.manifest["tensors"].get(name)
        if not isinstance(entry, dict):
            raise BundleError(f"bundle lacks tensor {name!r}")
        dtype, shape = entry.get("dtype"), entry.get("shape")
        if not (isinstance(dtype, int) and isinstance(shape, list) and all(type(d) is int for d in shape)):
            raise BundleError(f"tensor {name!r}: dtype and shape must be an integer and a list of integers")
        try:
            expected = payload_nbytes(dtype, shape)
        except PipeguardError as exc:
            raise BundleError(f"tensor {name!r}: {exc}") from None
        try:
            data = bytearray(self._member(str(entry.get("file")), expected))
        except (KeyError, *_READ_ERRORS) as exc:
            raise BundleError(f"tensor {name!r} unreadable: {type(exc).__name__}: {exc}") from None
        if dtype in PACKED:  # the signed layout, checked as a receiver checks it
            packed = Packed(dtype, tuple(shape), torch.frombuffer(data, dtype=torch.uint8).clone() if data
                            else torch.empty(0, dtype=torch.uint8))
            try:
                compression.validate(packed)
            except PipeguardError as exc:
                raise BundleError(f"tensor {name!r}: {exc}") from None
            return packed
        dtype = TORCH_DTYPES[dtype]
        return torch.frombuffer(data, dtype=dtype).view(shape).clone() if data else torch.empty(shape, dtype=dtype)

    def names(self, prefix: str) -> list[str]:
        return sorted(n for n in self.manifest["tensors"] if n.startswith(prefix))

    def received(self, name: str, signer: pb.PeerInfo) -> ReceivedTensor:
        commitment = self.claim(name, pb.TensorCommitment)
        tensor = self.tensor(name)
        claims.sent_tensor(commitment, signer, what=name, unbound=BundleError)
        try:
            digest = payload_digest(commitment.header, tensor)  # the hash the signed header names
        except PipeguardError as exc:
            raise BundleError(f"{name}: {exc}") from None
        if digest != commitment.payload_digest:
            raise BundleError(f"{name}: tensor bytes do not match the signed digest")
        return ReceivedTensor(commitment=commitment, tensor=tensor)


def _load_artifacts(r: _Reader, pinned_coordinator: bytes | None) -> audit.Artifacts:
    req = r.claim("request", pb.AuditRequest)
    coordinator_key = bytes.fromhex(r.manifest.get("coordinator_key", ""))
    if pinned_coordinator is not None and coordinator_key != pinned_coordinator:
        raise BundleError("the audit order was signed by a different coordinator than the pinned one")
    claims.audit_order(req, PublicIdentity(coordinator_key), what="audit order (coordinator signature)")
    audit.validate_request(req)
    art = audit.Artifacts(request=req)
    art.attestation = r.claim("attestation", pb.StateAttestation)
    art.state = {n.removeprefix("state/"): r.tensor(n) for n in r.names("state/")}
    claims.served_state(art.attestation, req.target, req, req.step, art.state)
    if r.has("next_attestation"):
        art.next_attestation = r.claim("next_attestation", pb.StateAttestation)
        art.next_state = {n.removeprefix("next_state/"): r.tensor(n) for n in r.names("next_state/")}
        claims.served_state(art.next_attestation, req.target, req, req.step + 1, art.next_state)
    for mb in audit.micro_batches_of(req):
        if f"input/{mb}" in r.manifest["claims"]:
            art.inputs[mb] = r.received(f"input/{mb}", req.prev)
        if f"grad_in/{mb}" in r.manifest["claims"]:
            art.grads_in[mb] = r.received(f"grad_in/{mb}", req.next)
        for direction in (pb.DIRECTION_FORWARD, pb.DIRECTION_BACKWARD):
            name = f"output/{direction}/{mb}"
            if name in r.manifest["claims"]:
                rt = r.received(name, req.target)
                receiver = req.next if direction == pb.DIRECTION_FORWARD else req.prev
                audit.check_tensor_header(rt, req, direction, mb, req.target.node_id, receiver.node_id)
                art.outputs[(direction, mb)] = rt
        if f"tokens/{mb}/x" in r.manifest["tensors"]:
            art.tokens[mb] = (r.tensor(f"tokens/{mb}/x"), r.tensor(f"tokens/{mb}/y"))
    lacks = audit.missing_artifacts(art)
    if lacks:
        raise BundleError(f"the bundle lacks what its {audit.KIND_NAMES[req.kind]} audit needs: {', '.join(lacks)}")
    audit.check_headers(art)
    audit.check_tokens(art)
    return art


def verify_bundle(path: Path, pinned_coordinator: bytes | None = None, device: torch.device | None = None
                  ) -> VerifyResult:
    """Re-check a bundle offline, recomputing on ``device`` (cpu if None; its class picks the
    tolerance, ``audit.tolerance_for``). Never raises for a bad bundle: returns valid=False and why."""
    device = torch.device("cpu") if device is None else device
    try:
        r = _Reader(Path(path))
        kind = r.manifest.get("kind", "?")
        accused = r.manifest.get("accused", "?")
        if kind == "equivocation":
            key = bytes.fromhex(r.manifest["signer_key"])
            signer = node_id_for(key)
            types = {r.manifest["claims"][n]["type"] for n in ("first", "second")}
            cls = pb.TensorCommitment if types == {pb.TensorCommitment.DESCRIPTOR.full_name} else pb.StateAttestation
            a, b = r.claim("first", cls), r.claim("second", cls)
            why_not = claims.equivocation(a, b, key)
            if why_not is not None:
                return VerifyResult(False, kind, signer, why_not)
            what = (f"tensor step {a.header.step} micro-batch {a.header.micro_batch}" if cls is pb.TensorCommitment
                    else f"state of stage {a.stage} at step {a.step}")
            return VerifyResult(True, kind, signer, f"node {signer} signed two different versions of its {what}")
        if kind in ("initial-state", "contradiction", "off-attestation"):
            return _verify_state_claims(r, kind, pinned_coordinator)
        art = _load_artifacts(r, pinned_coordinator)
        with Determinism.for_device(REFEREE_THREADS, device).scope():  # as the judge recomputed it
            finding = audit.check(art, device, device_class(device))
        req = art.request
        where = f"step {req.step} stage {req.stage} ({audit.KIND_NAMES[req.kind]} audit)"
        if kind == "audit":
            if finding.verdict == pb.VERDICT_FAIL:
                return VerifyResult(True, kind, req.target.node_id,
                                    f"node {req.target.node_id} cheated at {where}: {finding.detail}")
            return VerifyResult(False, kind, req.target.node_id, f"recomputation matches: {finding.detail}")
        if kind in ("false-accusation", "false-clearance"):
            auditor_key = bytes.fromhex(r.manifest["auditor_key"])
            verdict = r.claim("verdict", pb.AuditVerdict)
            claims.audit_verdict(verdict, req, auditor_key, unbound=BundleError)
            if kind == "false-clearance":
                if verdict.verdict != pb.VERDICT_PASS:
                    return VerifyResult(False, kind, verdict.auditor, "the auditor did not sign a PASS")
                if audit.contradictions(verdict, art):  # claims signed by the parties they name
                    return VerifyResult(False, kind, verdict.auditor, "the auditor saw other signed data than "
                                        "the bundle holds (its PASS may be honest; someone equivocated)")
                if clearly_fails(finding, audit.loosest_tolerance(req)):
                    return VerifyResult(True, kind, verdict.auditor, f"auditor {verdict.auditor} signed PASS for "
                                        f"{req.target.node_id[:8]} at {where}, but {finding.detail}")
                return VerifyResult(False, kind, verdict.auditor, "the recomputation does not fail by more than "
                                    f"{FALSE_CLEARANCE_MARGIN:g}x the tolerance: {finding.detail}")
            if verdict.verdict != pb.VERDICT_FAIL:
                return VerifyResult(False, kind, verdict.auditor, "the auditor did not accuse anyone")
            if finding.verdict == pb.VERDICT_PASS:
                return VerifyResult(True, kind, verdict.auditor, f"auditor {verdict.auditor} accused "
                                    f"{req.target.node_id[:8]} at {where}, but {finding.detail}")
            return VerifyResult(False, kind, verdict.auditor, f"the accusation holds: {finding.detail}")
        return VerifyResult(False, kind, accused, f"unknown bundle kind {kind!r}")
    except (BundleError, PipeguardError, KeyError, ValueError, TypeError, AttributeError, RecursionError) as exc:
        return VerifyResult(False, "?", "?", f"{type(exc).__name__}: {exc}")


def read_manifest(path: Path) -> dict:
    return _Reader(Path(path)).manifest

