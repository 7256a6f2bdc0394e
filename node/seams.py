"""Where a malicious node's behaviour meets the honest node: wrappers chosen at build time.

The honest node's modules (stage, schedule, admission, retention, service, auditor,
membership) hold no attack call sites. ``node.daemon.build`` asks ``Seams.for_behaviour``; an
honest node gets None and plain objects. A malicious node gets its objects wrapped here, each
seam calling the behaviour's hooks (node/attacks.py) and only the wrappers whose hooks the
behaviour overrides:

=================================  ====================================================================
seam                               hooks
=================================  ====================================================================
``TamperedComputation``            ``on_forward`` (the activation sent), ``on_backward`` (the input
(wraps ``StageComputation``)       gradient sent), ``on_gradients`` (before the optimizer step),
                                   ``on_update`` (after the optimizer step, before the node commits),
                                   ``on_build`` (built from the seed, before it commits),
                                   ``on_committed`` (after it committed); on the compute thread
``TamperedPeers``                  ``pause("send")`` before each push, ``on_send`` on the signed chunk
(wraps ``PeerPool``)               stream (``PeerPool.push``'s ``rewrite``)
``TamperedService``                ``pause("rpc")`` before the RPCs the node answers (RunStep,
(a ``NodeService``)                ApplyUpdate, FetchState, FetchTensor, Audit, PushTensor),
                                   ``on_serve_state`` and ``on_serve_tensor`` on what it serves,
                                   ``on_receive`` on each tensor it accepts
``LyingSigner``                    ``on_verdict`` before the node signs a verdict as auditor
(wraps ``VerdictSigner``)
``heartbeat``                      ``pause("heartbeat")`` (``Membership.before_heartbeat``)
``heartbeat_reply``                ``on_heartbeat`` with the member list (``Membership.after_heartbeat``)
=================================  ====================================================================

A new hook is the hook on ``Behaviour`` plus the line in its seam that calls it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from pipeguard.compression import decompress
from pipeguard.computation import Forward, StageComputation, StageSetup, to_wire
from pipeguard.identity import Identity
from pipeguard.v1 import pipeguard_pb2 as pb
from node.attacks import HOOKS, NO_MICRO_BATCH, AttackContext, Behaviour, overrides
from node.auditor import VerdictSigner
from node.peers import PeerPool
from node.service import NodeService
from node.stage import BuildComputation, StageRuntime

FORWARD, BACKWARD = pb.DIRECTION_FORWARD, pb.DIRECTION_BACKWARD


class Seams:
    """One malicious node's behaviour and the contexts its hooks get."""

    def __init__(self, behaviour: Behaviour, identity: Identity):
        self.behaviour = behaviour
        self.identity = identity
        self.hooks = {hook for hook in HOOKS if overrides(behaviour, hook)}
        """The hooks the behaviour changes; only their seams are wrapped."""
        self.runtime: StageRuntime | None = None
        """The node's runtime (its stage and step, for contexts); set once built."""

    @classmethod
    def for_behaviour(cls, behaviour: Behaviour, identity: Identity) -> "Seams | None":
        """None for an honest node (a behaviour that overrides no hook): it is built from plain objects."""
        return cls(behaviour, identity) if any(overrides(behaviour, h) for h in HOOKS) else None

    def wants(self, *hooks: str) -> bool:
        return any(h in self.hooks for h in hooks)

    def context(self, step: int, micro_batch: int = NO_MICRO_BATCH, direction: int = 0,
                peer: str = "") -> AttackContext:
        a = self.runtime.assignment if self.runtime is not None else None
        stage = a.stage if a is not None else -1
        return AttackContext(step, micro_batch, stage, self.identity.node_id, direction, peer, self.identity)

    async def pause(self, what: str, step: int, micro_batch: int = NO_MICRO_BATCH, direction: int = 0,
                    peer: str = "") -> None:
        """The behaviour's ``pause`` hook (node:slow, node:silent) before a send, RPC or heartbeat."""
        if "pause" in self.hooks:
            await self.behaviour.pause(self.context(step, micro_batch, direction, peer), what)

    def neighbour(self, direction: int) -> str:
        """The receiver of what this stage sends in ``direction`` ("" where there is none)."""
        a = self.runtime.assignment if self.runtime is not None else None
        peer = None if a is None else a.next if direction == FORWARD else a.prev
        return peer.node_id if peer is not None else ""

    # -- the seams -----------------------------------------------------------------------------

    def computation(self, build: BuildComputation = StageComputation.build) -> BuildComputation:
        """``build``, with the computation wrapped when the behaviour tampers with its outputs."""
        if not self.wants("on_forward", "on_backward", "on_gradients", "on_update", "on_build", "on_committed"):
            return build

        def tampered(setup: StageSetup, state: dict[str, torch.Tensor] | None = None,
                     device: torch.device | None = None) -> TamperedComputation:
            comp = TamperedComputation(build(setup, state, device), self)
            if state is None and "on_build" in self.hooks:  # experiments: state:backdoor
                self.behaviour.on_build(self.context(0), comp.inner.module, comp.inner.opt)
            return comp
        return tampered

    def peers(self, pool: PeerPool) -> PeerPool:
        return TamperedPeers(pool, self) if self.wants("pause", "on_send") else pool  # type: ignore[return-value]

    def service(self, *args, **kwargs) -> NodeService:
        """The node's service (``NodeService``'s arguments): it pauses before answering and tampers
        with what it serves where the behaviour says so."""
        if not self.wants("pause", "on_serve_state", "on_serve_tensor", "on_receive"):
            return NodeService(*args, **kwargs)
        return TamperedService(self, *args, **kwargs)

    def verdict_signer(self, signer: VerdictSigner) -> VerdictSigner:
        return LyingSigner(signer, self) if self.wants("on_verdict") else signer

    def heartbeat(self):
        """``Membership.before_heartbeat`` (node:silent stops heartbeats too), or None."""
        if "pause" not in self.hooks:
            return None
        return lambda: self.pause("heartbeat", self.runtime.completed_step + 1)

    def heartbeat_reply(self):
        """``Membership.after_heartbeat`` (refusal:frame floods the members), or None."""
        if "on_heartbeat" not in self.hooks:
            return None
        return lambda members: self.behaviour.on_heartbeat(self.context(self.runtime.completed_step + 1), members)


@dataclass
class _Sent(Forward):
    """A forward pass whose sent output is the behaviour's, not the honest one (the graph, kept
    for the backward, is honest)."""

    sent: object = None
    """The wire tensor sent (``to_wire`` of the behaviour's tensor)."""

    @property
    def output(self):
        return self.sent


class TamperedComputation:
    """A ``StageComputation`` whose sent outputs and update go through the behaviour."""

    def __init__(self, inner: StageComputation, seams: Seams):
        self.inner = inner
        self.seams = seams
        self._step = -1
        """The step of the last forward: the step whose gradients the next update applies."""
        self._committing = False
        """An update was applied: the next digest is the node's commitment to it."""

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    @property
    def setup(self) -> StageSetup:
        return self.inner.setup

    def forward(self, step: int, micro_batch: int, x: torch.Tensor) -> Forward:
        fwd = self.inner.forward(step, micro_batch, x)
        self._step = step
        if self.setup.is_last:
            return fwd
        ctx = self.seams.context(step, micro_batch, FORWARD, self.seams.neighbour(FORWARD))
        sent = self.seams.behaviour.on_forward(ctx, self._seen(fwd.output))  # attacks see host tensors
        return _Sent(fwd.step, fwd.micro_batch, fwd.x, fwd.y, to_wire(sent, self.setup.wire_dtype))

    def _seen(self, t: torch.Tensor) -> torch.Tensor:
        """What a tensor attack tampers with: the values the receiver would get (the honest output
        compressed and decompressed: itself for the fp32 wire); what it returns is compressed
        again (``to_wire``), so the poisoned message is a well-formed wire tensor of the run's
        wire dtype, and on a compressed wire an unchanged value keeps its code."""
        return decompress(to_wire(t, self.setup.wire_dtype))

    def backward(self, fwd: Forward, g: torch.Tensor) -> tuple[float, torch.Tensor | None]:
        loss, grad = self.inner.backward(fwd, g)
        if grad is None:
            return loss, None
        ctx = self.seams.context(fwd.step, fwd.micro_batch, BACKWARD, self.seams.neighbour(BACKWARD))
        return loss, to_wire(self.seams.behaviour.on_backward(ctx, self._seen(grad)), self.setup.wire_dtype)

    def digest(self) -> bytes:
        digest = self.inner.digest()
        if self._committing and "on_committed" in self.seams.hooks:  # experiments: update:swap-after-commit
            self.seams.behaviour.on_committed(self.seams.context(self._step), self.inner.module, self.inner.opt)
        self._committing = False
        return digest

    def update(self, global_norm: float, lr: float) -> None:
        self._committing = True
        ctx = self.seams.context(self._step)
        if "on_gradients" in self.seams.hooks:  # update:ride: sees the gradients the step applies
            self.seams.behaviour.on_gradients(ctx, self.inner.module, self.inner.opt, global_norm, lr,
                                              self.setup.optim.grad_clip)
        if "on_update" not in self.seams.hooks:  # update:skip / update:poison: before the node commits
            return self.inner.update(global_norm, lr)
        before = self.inner.snapshot()
        self.inner.update(global_norm, lr)
        self.seams.behaviour.on_update(ctx, self.inner.module, self.inner.opt, before)


class TamperedPeers:
    """A ``PeerPool`` whose pushes pause first and whose signed streams the behaviour may rewrite."""

    def __init__(self, inner: PeerPool, seams: Seams):
        self.inner = inner
        self.seams = seams

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    async def push(self, address: str, header: pb.TensorHeader, tensor: torch.Tensor) -> pb.TensorCommitment:
        s = self.seams
        await s.pause("send", header.step, header.micro_batch, header.direction, header.receiver)
        rewrite: Callable | None = None
        if "on_send" in s.hooks:  # experiments: wire:bad-signature, wire:replay
            ctx = s.context(header.step, header.micro_batch, header.direction, header.receiver)
            rewrite = lambda chunks: s.behaviour.on_send(ctx, chunks)  # noqa: E731
        return await self.inner.push(address, header, tensor, rewrite=rewrite)


class TamperedService(NodeService):
    """A ``NodeService`` that pauses before the RPCs it answers and tampers with what it serves."""

    def __init__(self, seams: Seams, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._seams = seams

    async def RunStep(self, request, context):
        await self._seams.pause("rpc", request.step)
        return await super().RunStep(request, context)

    async def ApplyUpdate(self, request, context):
        await self._seams.pause("rpc", request.step)
        return await super().ApplyUpdate(request, context)

    async def FetchState(self, request, context):
        await self._seams.pause("rpc", request.step, peer=request.requester)
        return await super().FetchState(request, context)

    async def FetchTensor(self, request, context):
        await self._seams.pause("rpc", request.step, request.micro_batch, request.direction, request.requester)
        return await super().FetchTensor(request, context)

    async def Audit(self, request, context):
        await self._seams.pause("rpc", request.step, request.micro_batch)
        return await super().Audit(request, context)

    async def _receive(self, request_iterator, context=None):
        await self._seams.pause("rpc", self.runtime.completed_step + 1)
        return await super()._receive(request_iterator, context)

    async def served_state(self, request: pb.FetchStateRequest):
        named, digest, epoch = await super().served_state(request)
        if "on_serve_state" in self._seams.hooks:  # experiments: state:false-commitment
            named, digest = self._seams.behaviour.on_serve_state(
                self._seams.context(request.step, peer=request.requester), named, digest)
        return named, digest, epoch

    def accept(self, rt) -> None:
        super().accept(rt)
        if "on_receive" in self._seams.hooks:  # experiments: forward:switch-attempt
            h = rt.commitment.header
            self._seams.behaviour.on_receive(self._seams.context(h.step, h.micro_batch, h.direction, h.sender),
                                             rt.commitment, rt.tensor)

    def served_tensor(self, request: pb.FetchTensorRequest):
        commitment, tensor = super().served_tensor(request)
        if "on_serve_tensor" in self._seams.hooks:  # experiments: wire:equivocate
            ctx = self._seams.context(request.step, request.micro_batch, request.direction, request.requester)
            commitment, tensor = self._seams.behaviour.on_serve_tensor(ctx, commitment, tensor, request.sent)
        return commitment, tensor


class LyingSigner(VerdictSigner):
    """Signs the verdict the behaviour makes of the honest one (audit:accuse, audit:clear)."""

    def __init__(self, inner: VerdictSigner, seams: Seams):
        super().__init__(inner.identity)
        self.inner = inner
        self.seams = seams

    def sign(self, req: pb.AuditRequest, verdict: pb.AuditVerdict) -> pb.AuditVerdict:
        ctx = AttackContext(req.step, req.micro_batch, req.stage, self.identity.node_id, peer=req.target.node_id,
                            signer=self.identity)
        return self.inner.sign(req, self.seams.behaviour.on_verdict(ctx, verdict))
