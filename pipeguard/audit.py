"""Recomputation audits: gather what a node committed to, recompute it, compare.

One engine serves three callers: a node auditing another node, the coordinator confirming a
failed audit before anything happens, and ``pipeguard verify`` re-checking an evidence
bundle offline. ``gather`` fetches artifacts and checks each against its rule in
``pipeguard.claims`` (who signed it, what it binds); ``check`` is
pure computation over those artifacts and needs no network; it recomputes through
``pipeguard.computation``, the code the audited node ran.

What each audit kind needs, for the audited stage k:

=========  ===========================================  ==========================================
kind       inputs (signed by their senders)              compared with (signed by the audited node)
=========  ===========================================  ==========================================
FORWARD    state at step start; activation from k-1      activation k sent to k+1, as k+1 holds it
           (stage 0: tokens of the micro-batch)
BACKWARD   the same, plus the gradient from k+1          gradient k sent to k-1, as k-1 holds it
           (last stage: targets of the micro-batch)
UPDATE     the same for every micro-batch, plus the      every output above, and the state k
           coordinator's ApplyUpdate order               served for the next step (which must hash
                                                         to the digest k committed to)
=========  ===========================================  ==========================================

Tolerance (issue 11): per element. A recomputed activation or gradient ``a`` and a claimed
``b`` may differ by at most ``tol x (|b_i| + rms(b))`` in every element (``deviation``); a new
weight or AdamW moment must lie within the range that gradients within that bound produce
(``computation.update_bounds``, each step capped at AdamW's bound), plus the same floor
(``update_deviation``). Default ``DEFAULT_TOLERANCE`` = 1e-4; 0 is exact. Measured with
benchmarks/audit_tolerance.py --quick (torch 2.13 CPU, claims at 1 thread, recomputed at 2):
forward/backward deviations 0; raw per-element update deviation up to 2.9e-4, which the honest
range absorbs at 1e-4 (worst 2.3e-10) but not at 1e-5 (2.6e-5: an honest node would fail), so
1e-4 is the smallest decade that passes honest updates. Figures: docs/threat-model.md, "Tolerance".

Wire dtype (issue 14): outputs are compared as they travel. The recomputation is compressed to
the order's ``TrainSpec.wire_dtype`` (``computation.to_wire``) and ``wire_deviation`` compares it
with the signed one: exact mode needs equal values (so equal bytes); with a tolerance, one
quantum of the wire format per element is allowed first (a last-bit difference can round to the
neighbouring code), then the tolerance applies to the rest.

Hardware (issue 13): ``tolerance`` holds between parties of one device class (the run's value,
0 = exact). A party recomputing on another device class than the audited node registered
(``AuditRequest.target_device``) applies ``AuditRequest.cross_device_tolerance`` when it is
larger (``tolerance_for``); both are in the coordinator's signed order. docs/gpu.md.
"""

from __future__ import annotations

import asyncio

import hashlib
import logging
import math
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Protocol

import torch

from pipeguard.data import Dataset
from pipeguard import claims, compression
from pipeguard.errors import AuditIncomplete, InvalidArgument, PipeguardError
from pipeguard.identity import Identity, PublicIdentity
from pipeguard.computation import StageComputation, StageSetup, to_wire
from pipeguard.signing import sign
from pipeguard.tensors import (StateAssembler, ReceivedTensor, receive_commitment, receive_state, receive_tensor,
                               tensor_digest)
from pipeguard.v1 import pipeguard_pb2 as pb

log = logging.getLogger(__name__)

FORWARD, BACKWARD = pb.DIRECTION_FORWARD, pb.DIRECTION_BACKWARD
SHA256 = pb.DIGEST_ALGORITHM_SHA256
DEFAULT_TOLERANCE = 1e-4
"""The default ``audit.tolerance`` (coordinator/config.py keeps the same literal; tests/test_tolerance.py
checks they agree): see the module docstring for how it was calibrated."""
KIND_NAMES = {pb.AUDIT_KIND_FORWARD: "forward", pb.AUDIT_KIND_BACKWARD: "backward", pb.AUDIT_KIND_UPDATE: "update"}


# -- the run spec an audit recomputes under -----------------------------------------------------


def setup_of(req: pb.AuditRequest) -> StageSetup:
    """The set-up of the audited stage, as the audit order describes it (InvalidArgument if unusable)."""
    return StageSetup.from_specs(req.model, req.train, req.stage, req.num_stages)


def micro_batches_of(req: pb.AuditRequest) -> list[int]:
    """The micro-batches ``req`` recomputes: all of them for an update audit, else those of the
    order's own message and of each further one (``AuditRequest.also``), in order."""
    if req.kind == pb.AUDIT_KIND_UPDATE:
        return list(range(req.train.micro_batches))
    return sorted({req.micro_batch, *(it.micro_batch for it in req.also)})


def compares(req: pb.AuditRequest, mb: int) -> tuple[bool, bool]:
    """(forward, backward) for micro-batch ``mb`` of ``req``: whether the audit compares the
    activation the stage sent, and whether it runs the backward and compares the gradient the
    stage sent back (an update audit: both, for every micro-batch; the stage's position decides
    which of them exist)."""
    if req.kind == pb.AUDIT_KIND_UPDATE:
        return True, True
    items = {(req.kind, req.micro_batch), *((it.kind, it.micro_batch) for it in req.also)}
    return (pb.AUDIT_KIND_FORWARD, mb) in items, (pb.AUDIT_KIND_BACKWARD, mb) in items


# -- artifacts ----------------------------------------------------------------------------------


@dataclass
class Artifacts:
    """Everything an audit recomputes from, each piece with the signature that binds it."""

    request: pb.AuditRequest
    state: dict[str, torch.Tensor] = field(default_factory=dict)
    attestation: pb.StateAttestation | None = None
    inputs: dict[int, ReceivedTensor] = field(default_factory=dict)
    """micro-batch -> activation the audited stage received (signed by the previous stage)."""
    grads_in: dict[int, ReceivedTensor] = field(default_factory=dict)
    """micro-batch -> gradient the audited stage received (signed by the next stage)."""
    outputs: dict[tuple[int, int], ReceivedTensor] = field(default_factory=dict)
    """(direction, micro-batch) -> what the audited stage sent (signed by it), as its receiver holds it."""
    next_state: dict[str, torch.Tensor] = field(default_factory=dict)
    next_attestation: pb.StateAttestation | None = None
    replica_of: bytes = b""
    """Set when ``state`` is the auditor's own verified replica (``Replicas``) rather than a fetched
    state: the digest it hashes to, which is the one the step report commits to (no attestation)."""
    tokens: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    """micro-batch -> (inputs, targets) from the dataset, for the first and last stage."""
    alternates: list[pb.TensorCommitment] = field(default_factory=list)
    """With ``gather(cross_check=True)``: senders' signed copies that differ from what their
    receivers hold (each one, with the receiver's copy, is proof of equivocation)."""

    def needs_tokens(self) -> bool:
        setup = setup_of(self.request)
        return setup.is_first or setup.is_last

    def fill_tokens(self, dataset: Dataset) -> None:
        self.tokens = tokens_for(self.request, dataset)


def tokens_for(req: pb.AuditRequest, dataset: Dataset) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """The (inputs, targets) of every micro-batch ``req`` covers, from the dataset."""
    setup = setup_of(req)
    return {mb: setup.batch(dataset, req.step, mb) for mb in micro_batches_of(req)}


def tokens_digest(tokens: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> bytes:
    """What an audit order signs about its tokens: SHA-256 throughout, whatever tensors are sent with
    (the order's signature, in old bundles too, covers this exact value)."""
    h = hashlib.sha256(b"pipeguard-tokens\x00")
    for mb in sorted(tokens):
        x, y = tokens[mb]
        h.update(mb.to_bytes(4, "big") + tensor_digest(x, SHA256) + tensor_digest(y, SHA256))
    return h.digest()


def check_tokens(art: "Artifacts") -> None:
    """First/last stage: the tokens are the ones the coordinator signed into the audit order."""
    if art.needs_tokens() and tokens_digest(art.tokens) != art.request.tokens_digest:
        raise AuditIncomplete("the micro-batch tokens are not the ones the audit order commits to "
                              "(a different dataset, or substituted tokens)")


class StateWithheld(AuditIncomplete):
    """The audited node itself did not serve a state the audit needs (refused, failed or timed out)."""


class Fetcher(Protocol):
    """How ``gather`` reaches nodes; the node and the coordinator each provide one."""

    def fetch_state(self, peer: pb.PeerInfo, step: int, stage: int) -> Awaitable[
            tuple[dict[str, torch.Tensor], pb.StateAttestation]]: ...

    def fetch_tensor(self, peer: pb.PeerInfo, step: int, micro_batch: int, direction: int, sent: bool,
                     signer: pb.PeerInfo) -> Awaitable[ReceivedTensor]: ...


class RpcFetcher:
    """``audit.Fetcher`` over gRPC; requests are signed by ``identity`` (``requester`` = its id,
    or empty when the coordinator fetches)."""

    def __init__(self, identity: Identity, requester: str, stub_for, run_id: str, max_tensor_bytes: int,
                 timeout: float, epoch: int, *, max_state_tensors: int = StateAssembler.MAX_TENSORS,
                 max_state_bytes: int | None = None, attempt: int = 0):
        self.identity, self.requester, self.stub_for = identity, requester, stub_for
        self.run_id, self.max_tensor_bytes, self.timeout = run_id, max_tensor_bytes, timeout
        self.max_state_tensors, self.max_state_bytes = max_state_tensors, max_state_bytes
        """Bounds of one state transfer (``net.max_state_tensors``, ``net.state_bytes_limit``)."""
        self.epoch = epoch
        """Only tensors of this assignment epoch are accepted (the audited history)."""
        self.attempt = attempt
        """... and of this attempt of the step (a copy kept from an aborted attempt is another computation)."""

    async def fetch_state(self, peer: pb.PeerInfo, step: int, stage: int):
        req = sign(pb.FetchStateRequest(run_id=self.run_id, node_id=peer.node_id, include_optimizer=True, step=step,
                                        requester=self.requester, stage=stage), self.identity)
        named, attestation = await receive_state(
            self.stub_for(peer.address).FetchState(req, timeout=self.timeout), self.max_tensor_bytes,
            max_tensors=self.max_state_tensors, max_total_bytes=self.max_state_bytes)
        if attestation is None:
            raise AuditIncomplete(f"{peer.node_id[:8]} served its state without an attestation")
        return named, attestation

    async def fetch_tensors(self, peer: pb.PeerInfo, step: int, items: list[tuple[int, int, bool, pb.PeerInfo]]
                            ) -> list[ReceivedTensor]:
        """Several tensors of ``step`` from one holder in one call: (micro-batch, direction, sent,
        signer) each, in order (``FetchTensorRequest.more``); each is checked as ``fetch_tensor`` checks it."""
        (mb0, d0, s0, _), rest = items[0], items[1:]
        req = pb.FetchTensorRequest(run_id=self.run_id, node_id=peer.node_id, step=step, micro_batch=mb0, direction=d0,
                                    sent=s0, requester=self.requester)
        req.more.extend(pb.TensorRef(micro_batch=mb, direction=d, sent=s) for mb, d, s, _ in rest)
        call = self.stub_for(peer.address).FetchTensor(sign(req, self.identity), timeout=self.timeout)
        stream = call.__aiter__()
        out = []
        try:
            for mb, direction, _, signer in items:
                out.append(await receive_tensor(stream, max_tensor_bytes=self.max_tensor_bytes,
                                                admit=self._admit(peer, step, mb, direction, signer)))
        finally:
            call.cancel()  # a holder that streams more than it was asked for is not read further
        return out

    async def fetch_commitments(self, peer: pb.PeerInfo, step: int, items: list[tuple[int, int, bool, pb.PeerInfo]]
                                ) -> list[pb.TensorCommitment]:
        """The signed commitments of several tensors of ``step`` from one holder in one call, without
        their data (``FetchTensorRequest.commitment_only``); items as ``fetch_tensors``'s."""
        (mb0, d0, s0, _), rest = items[0], items[1:]
        req = pb.FetchTensorRequest(run_id=self.run_id, node_id=peer.node_id, step=step, micro_batch=mb0, direction=d0,
                                    sent=s0, requester=self.requester, commitment_only=True)
        req.more.extend(pb.TensorRef(micro_batch=mb, direction=d, sent=s) for mb, d, s, _ in rest)
        call = self.stub_for(peer.address).FetchTensor(sign(req, self.identity), timeout=self.timeout)
        stream = call.__aiter__()
        try:
            return [await receive_commitment(stream, self._admit(peer, step, mb, direction, signer))
                    for mb, direction, _, signer in items]
        finally:
            call.cancel()

    def _admit(self, peer: pb.PeerInfo, step: int, micro_batch: int, direction: int, signer: pb.PeerInfo):
        key = PublicIdentity(signer.public_key)

        def admit(header: pb.TensorHeader) -> PublicIdentity:
            if (header.step, header.micro_batch, header.direction, header.sender) != (
                    step, micro_batch, direction, signer.node_id) or (header.epoch, header.attempt) != (
                    self.epoch, self.attempt):
                raise AuditIncomplete(f"{peer.node_id[:8]} served a different tensor than asked for")
            return key
        return admit

    async def fetch_tensor(self, peer: pb.PeerInfo, step: int, micro_batch: int, direction: int, sent: bool,
                           signer: pb.PeerInfo) -> ReceivedTensor:
        req = sign(pb.FetchTensorRequest(run_id=self.run_id, node_id=peer.node_id, step=step, micro_batch=micro_batch,
                                         direction=direction, sent=sent, requester=self.requester), self.identity)
        call = self.stub_for(peer.address).FetchTensor(req, timeout=self.timeout)
        return await receive_tensor(call, max_tensor_bytes=self.max_tensor_bytes,
                                    admit=self._admit(peer, step, micro_batch, direction, signer))


async def fetch_batch(fetcher: Fetcher, holder: pb.PeerInfo, step: int,
                      items: list[tuple[int, int, bool, pb.PeerInfo]]) -> list[ReceivedTensor | PipeguardError]:
    """Each of ``items`` (micro-batch, direction, sent, signer) from ``holder``, or the error it
    gave: in calls of up to MAX_FETCH_TENSORS (``fetch_tensors``), and one by one for a call the
    holder did not serve whole."""
    out: list[ReceivedTensor | PipeguardError] = []
    many = getattr(fetcher, "fetch_tensors", None)
    for at in range(0, len(items), MAX_FETCH_TENSORS):
        part = items[at:at + MAX_FETCH_TENSORS]
        if many is not None and len(part) > 1:
            try:
                out.extend(await many(holder, step, part))
                continue
            except PipeguardError:
                pass  # one it does not hold (or will not serve) must not cost the others

        async def one(item):
            try:
                return await fetcher.fetch_tensor(holder, step, *item)
            except PipeguardError as exc:
                return exc
        out.extend((await _all({i: one(item) for i, item in enumerate(part)})).values())
    return out


async def fetch_commitment_batch(fetcher: Fetcher, holder: pb.PeerInfo, step: int,
                                 items: list[tuple[int, int, bool, pb.PeerInfo]]
                                 ) -> list[pb.TensorCommitment | PipeguardError]:
    """The signed commitment of each of ``items`` held by ``holder``, or the error it gave: in
    calls of up to MAX_FETCH_TENSORS without the data (``fetch_commitments``); a call the holder
    does not serve so, or a fetcher without it, falls back to the whole tensors (``fetch_batch``)."""
    many = getattr(fetcher, "fetch_commitments", None)
    out: list[pb.TensorCommitment | PipeguardError] = []
    for at in range(0, len(items), MAX_FETCH_TENSORS):
        part = items[at:at + MAX_FETCH_TENSORS]
        if many is not None:
            try:
                out.extend(await many(holder, step, part))
                continue
            except PipeguardError:
                pass  # served as whole tensors below (one it does not hold must not cost the others)
        out.extend(rt.commitment if isinstance(rt, ReceivedTensor) else rt
                   for rt in await fetch_batch(fetcher, holder, step, part))
    return out


async def _first_of(*attempts: Callable[[], Awaitable[ReceivedTensor]]) -> ReceivedTensor:
    errors = []
    for attempt in attempts:
        try:
            return await attempt()
        except PipeguardError as exc:
            errors.append(str(exc))
    raise AuditIncomplete("; ".join(errors))


MAX_FETCH_TENSORS = 64
"""Tensors one FetchTensor call may ask for (``FetchTensorRequest.more``): an update audit's
fetches from one holder (a micro-batch count of 64 or more is fetched in several calls)."""

FETCH_CONCURRENCY = 8
"""Tensor fetches one audit keeps in flight at once: over a link with a round-trip time, an
update audit's 4 x micro-batches fetches (twice, with ``cross_check``) would otherwise cost that
many round trips one after another."""


async def _all(jobs: dict, limit: int = FETCH_CONCURRENCY) -> dict:
    """Await every coroutine of ``jobs`` (key -> coroutine), at most ``limit`` at once; the first
    error cancels the rest and is raised."""
    gate = asyncio.Semaphore(limit)

    async def one(job):
        async with gate:
            return await job

    tasks = {key: asyncio.ensure_future(one(job)) for key, job in jobs.items()}
    try:
        await asyncio.gather(*tasks.values())
    finally:
        for t in tasks.values():
            t.cancel()
        await asyncio.gather(*tasks.values(), return_exceptions=True)
    return {key: t.result() for key, t in tasks.items()}


async def _state(fetcher: Fetcher, target: pb.PeerInfo, req: pb.AuditRequest, step: int, when: str):
    """``target``'s state of ``step``, authenticated (``claims.served_state``); StateWithheld if it is not served."""
    try:
        named, att = await fetcher.fetch_state(target, step, req.stage)
    except PipeguardError as exc:
        raise StateWithheld(f"audited node did not serve its state {when} step {req.step}: {exc}") from None
    # hashing a whole state takes a while: off the event loop (the node keeps serving meanwhile)
    await asyncio.to_thread(claims.served_state, att, target, req, step, named)
    return named, att


async def gather(req: pb.AuditRequest, fetcher: Fetcher, cross_check: bool = False, *, next_state: bool = True,
                 replicas: "Replicas | None" = None) -> Artifacts:
    """Fetch and authenticate everything ``req`` needs. Raises AuditIncomplete when it cannot
    (StateWithheld, before any other reason, when the audited node did not serve its state).

    Every tensor is taken from the node that *received* it first (it is signed by its sender, so
    the holder cannot forge it, and it is what the receiver computed with); the sender's own copy
    is the fallback. Taking the sender's copy first would let a sender that serves auditors
    another signed version than it sent (equivocation) frame its honest neighbour. With
    ``cross_check`` the sender's copy is fetched too (``cross_holders``), and every validly signed
    copy that differs from the receiver's is kept in ``Artifacts.alternates``: the pair proves
    equivocation. The state and the tensors are fetched side by side (``FETCH_CONCURRENCY``).

    An auditor passes its ``replicas``: a state it verified that hashes to the digest the step
    report commits to is used instead of a fetch (``Artifacts.replica_of``). With ``next_state``
    False an update audit does not fetch the state after the update (``fetch_next_state``, when
    ``check`` raises NeedNextState)."""
    setup = setup_of(req)
    art = Artifacts(request=req)
    target = req.target
    prev = req.prev if req.HasField("prev") else None
    nxt = req.next if req.HasField("next") else None
    kinds = req.kind

    async def held(receiver: pb.PeerInfo, sender: pb.PeerInfo, mb: int, direction: int,
                   want: bytes = b"") -> ReceivedTensor:
        """The tensor as its receiver holds it, else as its sender does; with ``want``, only a copy
        with that payload digest (the input the audited node signed it computed from)."""
        async def copy(holder: pb.PeerInfo, sent: bool) -> ReceivedTensor:
            rt = await fetcher.fetch_tensor(holder, req.step, mb, direction, sent, sender)
            if want and rt.commitment.payload_digest != want:
                raise AuditIncomplete(f"{holder.node_id[:8]} holds another {'input' if direction == FORWARD else 'gradient'} "
                                      f"of micro-batch {mb} than the one the audited node computed from")
            return rt
        return await _first_of(lambda: copy(receiver, False), lambda: copy(sender, True))

    reported = reported_inputs(req)
    wanted: list[tuple[tuple[str, int, int], pb.PeerInfo, pb.PeerInfo, int, int, bytes]] = []  # key, receiver, sender, ...
    for mb in micro_batches_of(req):
        forward, backward = compares(req, mb)
        if forward and not setup.is_last:
            assert nxt is not None
            wanted.append((("out", FORWARD, mb), nxt, target, mb, FORWARD, b""))
        if backward and not setup.is_first:
            assert prev is not None
            wanted.append((("out", BACKWARD, mb), prev, target, mb, BACKWARD, b""))
        if not setup.is_first:
            assert prev is not None
            wanted.append((("in", FORWARD, mb), target, prev, mb, FORWARD, reported.get((FORWARD, mb), b"")))
        if backward and not setup.is_last:
            assert nxt is not None
            wanted.append((("in", BACKWARD, mb), target, nxt, mb, BACKWARD, reported.get((BACKWARD, mb), b"")))

    async def from_receiver(receiver: pb.PeerInfo, group: list) -> dict:
        """The group's tensors as ``receiver`` holds them, in one call; any it does not serve (or
        serves another copy of than the one wanted) from the receiver, else the sender, one by one."""
        got = await fetch_batch(fetcher, receiver, req.step, [(mb, d, False, snd) for _, _, snd, mb, d, _ in group])
        out, again = {}, {}
        for (key, rcv, snd, mb, d, want), rt in zip(group, got):
            if isinstance(rt, ReceivedTensor) and (not want or rt.commitment.payload_digest == want):
                out[key] = rt
            else:
                again[key] = held(rcv, snd, mb, d, want)
        out.update(await _all(again))
        return out

    groups: dict[str, tuple[pb.PeerInfo, list]] = {}
    for item in wanted:
        groups.setdefault(item[1].node_id, (item[1], []))[1].append(item)
    jobs = {who: from_receiver(receiver, group) for who, (receiver, group) in groups.items()}

    async def tensors_of() -> dict:
        merged = {}
        for part in (await _all(jobs)).values():
            merged.update(part)
        return merged

    kept = replicas.get(req.report.state_digest) if replicas is not None and req.report.state_digest else None

    async def start_state():
        if kept is not None:
            art.replica_of = req.report.state_digest
            return kept, None
        return await _state(fetcher, target, req, req.step, "for")

    state = asyncio.ensure_future(start_state())
    tensors = asyncio.ensure_future(tensors_of())
    try:
        await asyncio.wait({state, tensors})
        art.state, art.attestation = state.result()  # a withheld state is the reason, whatever else failed
        got = tensors.result()
    finally:
        for t in (state, tensors):
            t.cancel()
        await asyncio.gather(state, tensors, return_exceptions=True)
    for (what, direction, mb), rt in got.items():
        if what == "out":
            art.outputs[(direction, mb)] = rt
        elif direction == FORWARD:
            art.inputs[mb] = rt
        else:
            art.grads_in[mb] = rt
    check_headers(art)
    if cross_check:
        art.alternates = [theirs for _, theirs, _ in await cross_holders(req, art, fetcher, receivers=False)]
    if kinds == pb.AUDIT_KIND_UPDATE and next_state:
        await fetch_next_state(art, fetcher)
    return art


async def fetch_next_state(art: Artifacts, fetcher: Fetcher) -> None:
    """Fetch and authenticate the state the audited node serves after the audited update."""
    req = art.request
    art.next_state, art.next_attestation = await _state(fetcher, req.target, req, req.step + 1, "after")


async def cross_holders(req: pb.AuditRequest, art: Artifacts, fetcher: Fetcher, receivers: bool = True
                        ) -> list[tuple[pb.PeerInfo, pb.TensorCommitment, pb.TensorCommitment]]:
    """Fetch every tensor of ``art`` again from its sender (and, with ``receivers``, from its
    receiver too) and return (sender, other copy, copy in ``art``) for each validly signed copy that
    differs from the one ``art`` holds under the same header: proof that its sender equivocated.
    A holder that cannot serve its copy proves nothing either way and is skipped. The copies are
    fetched side by side (``FETCH_CONCURRENCY``)."""
    prev = req.prev if req.HasField("prev") else None
    nxt = req.next if req.HasField("next") else None
    target = req.target
    items = [(rt, FORWARD, mb, prev, target) for mb, rt in art.inputs.items()]
    items += [(rt, BACKWARD, mb, nxt, target) for mb, rt in art.grads_in.items()]
    items += [(rt, d, mb, target, nxt if d == FORWARD else prev) for (d, mb), rt in art.outputs.items()]

    # every other copy, fetched per holder in one call: (item index, holder, sent)
    asks: dict[tuple[str, bool], tuple[pb.PeerInfo, list[int]]] = {}
    for i, (rt, direction, mb, sender, receiver) in enumerate(items):
        if sender is None:
            continue
        for holder, sent in [(sender, True)] + ([(receiver, False)] if receivers and receiver is not None else []):
            asks.setdefault((holder.node_id, sent), (holder, []))[1].append(i)

    async def copies(holder: pb.PeerInfo, sent: bool, which: list[int]):
        # only the signed commitments: two of one subject that differ are the proof, the bytes add nothing
        got = await fetch_commitment_batch(fetcher, holder, req.step,
                                           [(items[i][2], items[i][1], sent, items[i][3]) for i in which])
        return list(zip(which, got))

    fetched = await _all({key: copies(holder, key[1], which) for key, (holder, which) in asks.items()})
    pairs, found = [], set()
    for key in sorted(fetched, key=lambda k: not k[1]):  # the senders' own copies first
        for i, other in fetched[key]:
            rt, sender = items[i][0], items[i][3]
            if i in found or not isinstance(other, pb.TensorCommitment):
                continue  # a holder that cannot serve its copy proves nothing either way
            if other.payload_digest != rt.commitment.payload_digest and \
                    _header_key(other.header) == _header_key(rt.commitment.header):
                pairs.append((i, (sender, other, rt.commitment)))
                found.add(i)
    return [pair for _, pair in sorted(pairs, key=lambda p: p[0])]


def reported_inputs(req: pb.AuditRequest) -> dict[tuple[int, int], bytes]:
    """(direction, micro-batch) -> payload digest of each tensor the audited node's signed step
    report says it computed from."""
    return {(r.direction, r.micro_batch): r.payload_digest for r in req.report.received}


def check_tensor_header(rt: ReceivedTensor, req: pb.AuditRequest, direction: int, mb: int, sender: str,
                        receiver: str) -> None:
    """The tensor is the one audited (run, step, micro-batch, direction, sender, receiver, epoch,
    attempt); one the audited node sent was also signed under the assignment the order restates."""
    h = rt.commitment.header
    got = (h.run_id, h.step, h.micro_batch, h.direction, h.sender, h.receiver, h.epoch, h.attempt)
    want = (req.run_id, req.step, mb, direction, sender, receiver, req.epoch, req.attempt)
    if got != want:
        raise AuditIncomplete(f"tensor header {got} is not the one audited {want}")
    if sender == req.target.node_id:
        claims.bound_to_order(h, req, f"the audited node's {'activation' if direction == FORWARD else 'gradient'} "
                              f"of micro-batch {mb}", unbound=AuditIncomplete)


def check_headers(art: "Artifacts") -> None:
    """Every tensor is the one the audit is about: run, step, micro-batch, direction, sender,
    receiver and epoch. A signature alone only says who sent it, not that it belongs here."""
    req = art.request
    target = req.target.node_id
    reported = reported_inputs(req)
    for direction, received in ((FORWARD, art.inputs), (BACKWARD, art.grads_in)):
        for mb, rt in received.items():
            sender = req.prev.node_id if direction == FORWARD else req.next.node_id
            check_tensor_header(rt, req, direction, mb, sender, target)
            # The very tensor the audited node's signed report says it computed from: a neighbour
            # that signed a second version of it cannot have the audited node judged on that one.
            if reported.get((direction, mb)) != rt.commitment.payload_digest:
                raise AuditIncomplete(f"the {'input' if direction == FORWARD else 'gradient'} of micro-batch {mb} "
                                      "is not one the audited node's step report names as computed from")
    for (direction, mb), rt in art.outputs.items():
        receiver = req.next.node_id if direction == FORWARD else req.prev.node_id
        check_tensor_header(rt, req, direction, mb, target, receiver)
        # The inputs are the very ones the audited node signed it computed this output from: a
        # neighbour that signed a second version of its own tensor cannot have it recomputed here.
        h = rt.commitment.header
        if mb in art.inputs and h.input_digest != art.inputs[mb].commitment.payload_digest:
            raise AuditIncomplete(f"the input of micro-batch {mb} is not the one the audited node computed from")
        if direction == BACKWARD and mb in art.grads_in and \
                h.grad_input_digest != art.grads_in[mb].commitment.payload_digest:
            raise AuditIncomplete(f"the gradient of micro-batch {mb} is not the one the audited node computed from")


def missing_artifacts(art: "Artifacts") -> list[str]:
    """What ``art`` lacks of everything its audit kind needs (``gather`` fetches all of it; an
    evidence bundle must hold all of it: without the compared output nothing was compared)."""
    req = art.request
    setup = setup_of(req)
    kind = req.kind
    lacks = []
    if art.attestation is None:
        lacks.append("attestation")
    if kind == pb.AUDIT_KIND_UPDATE and art.next_attestation is None:
        lacks.append("next_attestation")
    for mb in micro_batches_of(req):
        forward, backward = compares(req, mb)
        if not setup.is_first and mb not in art.inputs:
            lacks.append(f"input/{mb}")
        if backward and not setup.is_last and mb not in art.grads_in:
            lacks.append(f"grad_in/{mb}")
        if forward and not setup.is_last and (FORWARD, mb) not in art.outputs:
            lacks.append(f"output/{FORWARD}/{mb}")
        if backward and not setup.is_first and (BACKWARD, mb) not in art.outputs:
            lacks.append(f"output/{BACKWARD}/{mb}")
        if (setup.is_first or setup.is_last) and mb not in art.tokens:
            lacks.append(f"tokens/{mb}")
    return lacks


# -- recomputation ------------------------------------------------------------------------------


@dataclass
class Finding:
    verdict: int
    deviation: float
    detail: str
    recomputed: dict[str, torch.Tensor] = field(default_factory=dict)
    next_state: dict[str, torch.Tensor] | None = None
    """For an update audit whose recomputed new state hashes to the digest the node committed to
    (exact agreement): that state, which an auditor may keep as a verified replica."""


class NeedNextState(Exception):
    """``check`` of an update audit gathered without the node's next state (``gather(next_state=False)``)
    whose recomputed state does not hash to the committed digest: the served next state is needed
    to tell rounding within the tolerance from a false update."""


class Replicas:
    """States an auditor verified by recomputation, by the digest they hash to (the last few).

    An update audit whose recomputed new state hashes to exactly the digest the node committed to
    has verified that state without fetching it; the next audit of that stage at the next step
    starts from it instead of fetching the state again (the step report commits to the same
    digest). Any state that hashes to the committed digest is the committed state, whoever
    computed it, so a replica is as good as a fetch; a digest it does not hold means a fetch."""

    def __init__(self, capacity: int = 4):
        self.capacity = capacity
        self._states: dict[bytes, dict[str, torch.Tensor]] = {}
        self.hits = 0

    def get(self, digest: bytes) -> dict[str, torch.Tensor] | None:
        state = self._states.get(digest)
        if state is not None:
            self.hits += 1
        return state

    def keep(self, digest: bytes, state: dict[str, torch.Tensor]) -> None:
        self._states.pop(digest, None)
        self._states[digest] = state
        while len(self._states) > self.capacity:
            del self._states[next(iter(self._states))]

    def __len__(self) -> int:
        return len(self._states)


def deviation(got: torch.Tensor, claimed: torch.Tensor, slack: torch.Tensor | None = None) -> float:
    """The largest per-element deviation ``|got - claimed| / (|claimed| + rms(claimed))`` (0 if
    equal; inf if shapes differ, anything is not finite, or an element differs where the scale is 0).
    ``slack`` (per element, tolerance mode on a compressed wire: ``wire_deviation``) is subtracted
    from each ``|got - claimed|`` first.

    Every element is bounded by its own size, with the tensor's rms as the floor for elements
    near zero: a tolerance t lets each element move by at most t x (|b| + rms(b)), so an
    attacker's per-message budget is a t-relative perturbation of the message itself, not t x
    its largest element spread over every small one."""
    got, claimed = got.detach().double(), claimed.detach().double()
    if got.shape != claimed.shape:
        return math.inf
    if not bool(torch.isfinite(claimed).all()) or not bool(torch.isfinite(got).all()):
        return math.inf
    if got.numel() == 0 or torch.equal(got, claimed):
        return 0.0
    excess = got - claimed if slack is None else torch.clamp((got - claimed).abs() - slack, min=0.0)
    return _worst(excess, claimed.abs() + _rms(claimed))


def wire_deviation(got, claimed, tolerance: float) -> float:
    """``deviation`` of a recomputed wire tensor from a claimed one (pipeguard/compression.py), over
    their float32 values: inf if their wire dtypes differ. Exact mode (``tolerance`` 0) asks for
    the same values, so the same bytes. Tolerance mode on a compressed wire first allows one
    quantum per element (``compression.quantum``, the larger of the two tensors'): a
    recomputation that differs from the claim in float32's last bits (another thread count or
    device) can round to the neighbouring code, a step far larger than the relative tolerance,
    and that must not convict an honest node. So there the tolerance bounds what is left after
    one quantum: an attacker can move every element by up to one quantum unseen (docs/threat-model.md)."""
    if compression.dtype_name(got) != compression.dtype_name(claimed) or tuple(got.shape) != tuple(claimed.shape):
        return math.inf
    slack = None
    if tolerance > 0:
        q_got, q_claimed = compression.quantum(got), compression.quantum(claimed)
        slack = None if q_got is None else torch.maximum(q_got, q_claimed)
    return deviation(compression.decompress(got), compression.decompress(claimed), slack)


def _rms(t: torch.Tensor) -> float:
    return math.sqrt(float(t.pow(2).mean())) if t.numel() else 0.0


def _worst(excess: torch.Tensor, scale: torch.Tensor) -> float:
    """max |excess| / scale over the elements (an excess where the scale is 0 is infinite)."""
    excess = excess.abs()
    if not bool((excess > 0).any()):
        return 0.0
    if bool(((excess > 0) & (scale <= 0)).any()):
        return math.inf
    return float((excess / torch.where(scale > 0, scale, torch.ones_like(scale))).max())


def update_deviation(got: torch.Tensor, claimed: torch.Tensor, base: torch.Tensor | None,
                     bounds: tuple[torch.Tensor, torch.Tensor] | None) -> float:
    """The largest per-element deviation of a claimed new state tensor from the honest range.

    ``got``: the recomputed tensor; ``bounds``: the range (``computation.update_bounds``) honest
    gradients within the tolerance lead to (None: only ``got`` is honest, exact mode); ``base``:
    the tensor before the step (weights: the deviation is measured on the step, ``new - base``).
    An element's excess outside [min(lo, got), max(hi, got)] is divided by ``|step| + rms(step)``
    of the recomputed step (or of the recomputed value, for moments)."""
    got, claimed = got.detach().double().reshape(-1), claimed.detach().double().reshape(-1)
    if got.shape != claimed.shape or not bool(torch.isfinite(claimed).all()):
        return math.inf
    if torch.equal(got, claimed):
        return 0.0
    lo, hi = got, got
    if bounds is not None:
        lo = torch.minimum(bounds[0].reshape(-1), got)
        hi = torch.maximum(bounds[1].reshape(-1), got)
    excess = torch.clamp(claimed - hi, min=0.0) + torch.clamp(lo - claimed, min=0.0)
    ref = got - base.detach().double().reshape(-1) if base is not None else got
    return _worst(excess, ref.abs() + _rms(ref))


def tolerance_for(req: pb.AuditRequest, device_class: str | None) -> float:
    """The tolerance a party recomputing on ``device_class`` applies to ``req``: the order's
    ``tolerance`` on the target's own class (or when either class is unknown), else the larger of
    it and ``cross_device_tolerance``. Exact mode (tolerance 0) stays exact: the coordinator admits
    only its own build then."""
    tol = req.tolerance
    if tol > 0 and device_class and req.target_device and device_class != req.target_device:
        return max(tol, req.cross_device_tolerance)
    return tol


def loosest_tolerance(req: pb.AuditRequest) -> float:
    """The largest tolerance any party may have applied to ``req`` (what a false clearance must
    exceed by the margin: an honest auditor on another class passed within it)."""
    return max(req.tolerance, req.cross_device_tolerance) if req.tolerance > 0 and req.target_device else req.tolerance


def _exceeds(dev: float, tolerance: float) -> bool:
    return dev > tolerance if tolerance > 0 else dev != 0.0


class Workspace:
    """The stage computations one auditor recomputes in, reused from audit to audit: an audit
    loads the state it starts from into the module and optimizer it used last time for that stage
    (``StageComputation.load`` replaces every weight and all AdamW state and drops gradients)
    instead of building them afresh (a module, an optimizer, on the first stage an embedding: more
    CPU than a micro-batch's forward on the small presets).

    Not thread-safe: one ``check`` at a time (an auditor's and the judge's run on one thread)."""

    def __init__(self, capacity: int = 4):
        self.capacity = capacity
        self._comps: dict[tuple, StageComputation] = {}

    def computation(self, req: pb.AuditRequest, setup: StageSetup, state: dict[str, torch.Tensor],
                    device: torch.device | None) -> StageComputation:
        """A computation of ``req``'s stage at ``state`` on ``device`` (ValueError or RuntimeError if
        the state does not fit the stage, as ``StageComputation.build``)."""
        key = (req.stage, req.num_stages, req.model.SerializeToString(deterministic=True),
               req.train.SerializeToString(deterministic=True), str(device or "cpu"))
        comp = self._comps.pop(key, None)
        if comp is None:
            comp = StageComputation.build(setup, state, device)
        else:
            comp.load(state)  # on error the half-loaded computation is dropped: the next audit builds afresh
        self._comps[key] = comp
        while len(self._comps) > self.capacity:
            del self._comps[next(iter(self._comps))]
        return comp


def check(art: Artifacts, device: torch.device | None = None, device_class: str | None = None,
          workspace: Workspace | None = None) -> Finding:
    """Recompute what ``art.request`` audits and compare. Pure: no network, deterministic.

    ``device``: where to recompute (cpu if None); ``device_class``: its class
    (``pipeguard.device.device_class``), which picks the tolerance (``tolerance_for``; None: the
    order's ``tolerance``). Comparisons run on the host in float64. For the first and last stage,
    ``art.tokens`` must hold the micro-batches' tokens (``Artifacts.fill_tokens``). With a
    ``workspace`` the recomputation reuses its module and optimizer for the stage."""
    req = art.request
    setup = setup_of(req)
    tol = tolerance_for(req, device_class)
    started = art.attestation.state_digest if art.attestation is not None else art.replica_of
    if not started or started != req.report.state_digest:
        return Finding(pb.VERDICT_FAIL, math.inf, "false commitment: the state the node served for step "
                       f"{req.step} is not the state its step report committed to")
    missing = [mb for mb in micro_batches_of(req) if mb not in art.tokens]
    if (setup.is_first or setup.is_last) and missing:
        raise AuditIncomplete(f"this stage's audit needs the tokens of micro-batches {missing}")
    if req.kind == pb.AUDIT_KIND_UPDATE and art.next_attestation is not None and \
            art.next_attestation.state_digest != req.update_report.state_digest:
        return Finding(pb.VERDICT_FAIL, math.inf, "false commitment: the state the node served after step "
                       f"{req.step} is not the state its update report committed to")
    try:
        comp = workspace.computation(req, setup, art.state, device) if workspace is not None else \
            StageComputation.build(setup, art.state, device)
    except (ValueError, RuntimeError) as exc:  # it hashes to the node's own commitment: its fault
        return Finding(pb.VERDICT_FAIL, math.inf, f"the committed state does not fit stage {req.stage}: {exc}")
    worst, where = 0.0, ""
    recomputed: dict[str, torch.Tensor] = {}
    exact_state: dict[str, torch.Tensor] | None = None
    for mb in micro_batches_of(req):
        x = art.tokens[mb][0] if setup.is_first else art.inputs[mb].tensor  # (B, T) or (B, T, C)
        fwd = comp.forward(req.step, mb, x)
        out_key = (FORWARD, mb)
        if out_key in art.outputs:
            out = to_wire(fwd.output, setup.wire_dtype)  # (B, T, C) on the host, compressed as the node sent it
            dev = wire_deviation(out, art.outputs[out_key].tensor, tol)
            recomputed[f"forward/{mb}"] = out
            if dev > worst or math.isinf(dev):
                worst, where = dev, f"forward activation of micro-batch {mb}"
        if compares(req, mb)[1]:
            g = art.tokens[mb][1] if setup.is_last else art.grads_in[mb].tensor  # (B, T) or (B, T, C)
            _, grad = comp.backward(fwd, g)
            if (BACKWARD, mb) in art.outputs:
                assert grad is not None
                grad = to_wire(grad, setup.wire_dtype)  # (B, T, C) on the host, compressed
                dev = wire_deviation(grad, art.outputs[(BACKWARD, mb)].tensor, tol)
                recomputed[f"backward/{mb}"] = grad
                if dev > worst or math.isinf(dev):
                    worst, where = dev, f"input gradient of micro-batch {mb}"
    if req.kind == pb.AUDIT_KIND_UPDATE:
        # The reported gradient norm feeds every stage's clipping: it is a claim to check too.
        sq = comp.grad_sq_norm()
        claimed = req.report.grad_sq_norm
        dev = abs(sq - claimed) / max(abs(claimed), 1e-30) if sq != claimed else 0.0
        if dev > worst or math.isinf(dev):
            worst, where = dev, "reported gradient norm"
        up = req.update
        # AdamW divides by sqrt(v): a last-bit difference in a near-zero gradient can become a
        # whole lr-sized step in that element. So each element of the new state is compared with
        # the range that gradients within the tolerance produce (computation.update_bounds),
        # and no weight may step by more than AdamW's cap; exact mode compares bits.
        # (only when the served next state is at hand to compare: an auditor that has not
        # fetched it needs no bounds when its recomputation hashes to the committed digest, and
        # otherwise fetches it and checks again)
        bounds = comp.update_bounds(up.global_grad_norm, up.lr, tol) if tol > 0 and \
            art.next_attestation is not None else {}
        comp.update(up.global_grad_norm, up.lr)
        # The recomputed new state hashing to the committed digest proves the update exact, with
        # no need to see the state the node serves for the next step (an auditor keeps it).
        exact = comp.digest() == req.update_report.state_digest
        if exact:
            # a copy: a workspace's computation is loaded with another state by the next audit
            exact_state = {name: t.clone() for name, t in comp.state()} if workspace is not None else dict(comp.state())
        elif art.next_attestation is None and not _exceeds(worst, tol):
            raise NeedNextState(f"the recomputed state after step {req.step} is not the committed one")
        for name, t in ([] if exact or art.next_attestation is None else comp.state()):
            t = t.cpu()  # compared on the host
            if name not in art.next_state:
                return Finding(pb.VERDICT_FAIL, math.inf, f"served next state lacks {name}")
            claimed = art.next_state[name]
            if claimed.shape != t.shape or not bool(torch.isfinite(claimed.double()).all()):
                return Finding(pb.VERDICT_FAIL, math.inf, f"served next {name} is malformed or not finite")
            base = art.state[name] if name.startswith("param/") else None
            if base is not None:
                recomputed[f"next/{name}"] = t.detach().clone()
            b = bounds.get(name)
            dev = update_deviation(t, claimed, base, None if b is None else (b[0].cpu(), b[1].cpu()))
            if dev > worst or math.isinf(dev):
                worst, where = dev, f"updated {name}" if base is None else f"weight update of {name}"
    if _exceeds(worst, tol):
        return Finding(pb.VERDICT_FAIL, worst, f"{where} deviates from recomputation by {worst:.3g} "
                       f"(tolerance {tol:g})", recomputed)
    what = KIND_NAMES.get(req.kind, "?") + (f" (and {len(req.also)} more messages)" if req.also else "")
    return Finding(pb.VERDICT_PASS, worst, f"{what} audit of step {req.step} stage {req.stage} matches "
                   f"(max deviation {worst:.3g}, tolerance {tol:g})", recomputed, next_state=exact_state)


def attach_artifacts(verdict: pb.AuditVerdict, art: Artifacts) -> None:
    """Put the signed claims an audit relied on into its verdict."""
    if art.attestation is not None:
        verdict.attestation.CopyFrom(art.attestation)
    if art.next_attestation is not None:
        verdict.next_attestation.CopyFrom(art.next_attestation)
    for rt in [*art.inputs.values(), *art.grads_in.values(), *art.outputs.values()]:
        verdict.commitments.append(rt.commitment)


def contradictions(verdict: pb.AuditVerdict, art: Artifacts) -> list[tuple[pb.PeerInfo, object, object]]:
    """(signer, theirs, ours): claims signed by the same node for the same thing, but different: one
    from what the auditor saw (its verdict), one from what the judge fetched. Only claims really
    signed by the audit party they name count (``claims.attached_signer``); each is equivocation."""
    pairs: list[tuple[object, object]] = []
    for theirs, ours in ((verdict.attestation, art.attestation), (verdict.next_attestation, art.next_attestation)):
        if ours is not None and theirs.node_id and theirs.state_digest != ours.state_digest and (
                theirs.node_id, theirs.stage, theirs.step, theirs.epoch) == (ours.node_id, ours.stage, ours.step,
                                                                             ours.epoch):
            pairs.append((theirs, ours))
    mine = {_header_key(rt.commitment.header): rt.commitment
            for rt in [*art.inputs.values(), *art.grads_in.values(), *art.outputs.values()]}
    for c in verdict.commitments:
        ours = mine.get(_header_key(c.header))
        if ours is not None and ours.payload_digest != c.payload_digest:
            pairs.append((c, ours))
    req = art.request
    parties = (req.target, req.prev, req.next)
    signed = []
    for theirs, ours in pairs:
        signer = claims.attached_signer(theirs, parties)
        if signer is not None:
            signed.append((signer, theirs, ours))
    return signed


def _header_key(h: pb.TensorHeader) -> tuple:
    return claims.tensor_subject(h)


def validate_request(req: pb.AuditRequest) -> None:
    """Structural checks on an audit order before any work is done."""
    if req.kind not in KIND_NAMES:
        raise InvalidArgument(f"unknown audit kind {req.kind}")
    if req.num_stages < 1 or req.stage >= req.num_stages:
        raise InvalidArgument(f"stage {req.stage} not within {req.num_stages}")
    if req.micro_batch >= max(1, req.train.micro_batches):
        raise InvalidArgument(f"micro-batch {req.micro_batch} out of range")
    if req.kind == pb.AUDIT_KIND_FORWARD and req.stage == req.num_stages - 1:
        raise InvalidArgument("the last stage sends no activations to audit")
    if req.kind == pb.AUDIT_KIND_BACKWARD and req.stage == 0:
        raise InvalidArgument("the first stage sends no gradients to audit")
    if req.also:
        if req.kind == pb.AUDIT_KIND_UPDATE:
            raise InvalidArgument("an update audit compares every message of its stage-step: it names no others")
        seen = {(req.kind, req.micro_batch)}
        for it in req.also:
            if it.kind not in (pb.AUDIT_KIND_FORWARD, pb.AUDIT_KIND_BACKWARD):
                raise InvalidArgument(f"a further audited message must be forward or backward, not kind {it.kind}")
            if it.micro_batch >= req.train.micro_batches:
                raise InvalidArgument(f"further audited micro-batch {it.micro_batch} out of range")
            if it.kind == pb.AUDIT_KIND_FORWARD and req.stage == req.num_stages - 1:
                raise InvalidArgument("the last stage sends no activations to audit")
            if it.kind == pb.AUDIT_KIND_BACKWARD and req.stage == 0:
                raise InvalidArgument("the first stage sends no gradients to audit")
            if (it.kind, it.micro_batch) in seen:
                raise InvalidArgument(f"the order names the {KIND_NAMES[it.kind]} message of micro-batch "
                                      f"{it.micro_batch} twice")
            seen.add((it.kind, it.micro_batch))
    claims.audited_reports(req)
