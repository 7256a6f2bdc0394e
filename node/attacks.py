"""Misbehaviour for experiments: the plug-in interface and the built-in attacks.

A behaviour is any object with the hooks below (subclass ``Behaviour`` and override what you
need; the defaults are honest). Every built-in is written against these same hooks.

=====================================================  ==================================================
hook                                                   called
=====================================================  ==================================================
``on_forward(ctx, activation) -> tensor``              on each activation about to go downstream, before
                                                       signing (the attacker signs what it sends): its
                                                       float32 values as the wire carries them (under a
                                                       compressed ``train.wire_dtype``, decompressed);
                                                       what it returns is compressed again, then signed
``on_backward(ctx, grad) -> tensor``                   on each input gradient about to go upstream (the same)
``on_send(ctx, chunks) -> chunks``                     on the signed ``TensorChunk`` stream about to be
                                                       pushed, *after* signing (tamper with the wire)
``on_serve_tensor(ctx, commitment, tensor, sent)``     when a retained tensor is served to an auditor or
                                                       the judge (``FetchTensor``); returns (commitment,
                                                       tensor); ``ctx.signer`` can sign a new commitment
``on_serve_state(ctx, named, digest)``                 when the stage state is served (``FetchState``);
                                                       returns (named, digest), the attestation signs it
``on_gradients(ctx, module, optimizer, global_norm,    before the optimizer step, the step's gradients
lr, clip)``                                            accumulated in ``module`` (update:ride)
``on_update(ctx, module, optimizer, before)``          after the optimizer step, before the node commits
                                                       to its new state; may change module/optimizer in
                                                       place (``before``: the named state before the step)
``on_build(ctx, module, optimizer)``                   after the stage is built from the run seed (not from
                                                       a checkpoint), before the node commits to it; may
                                                       change module/optimizer in place
``on_committed(ctx, module, optimizer)``               right after the node committed to its new state
                                                       (the update report's digest); may change
                                                       module/optimizer in place, behind the commitment
``async pause(ctx, what)``                             before sending a tensor (``"send"``), answering an
                                                       RPC (``"rpc"``) or a heartbeat (``"heartbeat"``);
                                                       may sleep (slow) or never return (silent)
``on_verdict(ctx, verdict) -> verdict``                on a verdict this node is about to sign as auditor
                                                       (``ctx.step``/``ctx.stage``: the audited step and
                                                       stage, ``ctx.peer``: the audited node)
``on_receive(ctx, commitment, tensor)``                on each tensor this node accepted from a neighbour
                                                       (verified; ``ctx.peer``: its sender)
``async on_heartbeat(ctx, members)``                   after each heartbeat reply, with the member list
                                                       (``pb.PeerInfo``: id, address, key)
=====================================================  ==================================================

``ctx`` is an ``AttackContext``: step, micro-batch (-1 where there is none), the node's stage
and id, the direction, the peer (receiver, requester or audited node) and the node's signing
identity. Every hook call is gated the same way by the node's ``[attack]`` settings: ``rate``
(probability per call), ``start_step`` <= step < ``stop_step`` (-1: never stops) and
``micro_batches`` (empty: all).

Load your own with ``pipeguard-node --attack-plugin my_attack.py:MyAttack`` (or
``attack.plugin`` in the node's TOML). The class is instantiated with no arguments.
Example::

    # my_attack.py
    from node.attacks import Behaviour

    class ScaleUp(Behaviour):
        def on_forward(self, ctx, activation):
            return activation * 10 if ctx.step >= 5 else activation

Built-ins (``--attack NAME``, repeatable; gated by ``--attack-rate``, ``--attack-start``,
``--attack-stop``, ``--attack-micro-batches``). Tensor attacks exist for both directions,
``forward:KIND`` on activations and ``backward:KIND`` on input gradients:

- ``forward:reverse``, ``backward:reverse``  negate the tensor (Lu et al.)
- ``forward:random``, ``backward:random``  uniform noise over the tensor's own value range (Lu et al.)
- ``forward:noise``, ``backward:noise``  add Gaussian noise: std ``noise_scale`` x the tensor's std
  when ``noise_scale`` > 0, else the absolute ``noise_std`` (Lu et al.'s backward attack: std 1)
- ``forward:scale``, ``backward:scale``  multiply by ``scale`` (k)
- ``forward:zero``, ``backward:zero``  send zeros
- ``forward:sign-flip``, ``backward:sign-flip``  flip the sign of a ``fraction`` of the elements,
  chosen afresh (reproducibly) for each message
- ``forward:constant-direction``, ``backward:constant-direction``  add one fixed unit direction
  (derived from the attack seed), scaled to the tensor's norm: every message is pushed the same way
  (BTARD-style)
- ``forward:ride``, ``backward:ride``  spend the audit's whole per-element allowance: move every
  element by ``ride`` x the default tolerance x (|x| + rms(x)) (``ride`` < 1 stays within it, > 1
  exceeds it); activations in one fixed direction per element (derived from the attack seed, the
  same for every message, so the push accumulates), gradients against their own sign (every small
  gradient element is flipped)
- ``forward:stale``, ``backward:stale``  send this micro-batch's output of the last earlier step
  the attack saw (remembered by the behaviour itself)

Protocol attacks:

- ``wire:bad-signature``  flip a payload byte after signing: the bytes no longer match the signature
- ``wire:replay``  send this micro-batch's signed stream of an earlier step again instead of this one
- ``wire:equivocate``  serve auditors a different, validly signed version (negated) of a tensor it
  sent, while the receiver holds the real one
- ``forward:switch-attempt``  a malicious upstream: in the first attempt of a step send negated
  activations, keep the successor's signed gradients of that attempt, fail the attempt (its own
  backward raises), send the honest activations in the retry, then serve auditors the kept gradients
  of the failed attempt as the ones it received (two signed gradients of the honest successor for
  one micro-batch: equivocation, had no header named the attempt)
- ``state:false-commitment``  serve auditors (node requesters) a state other than the committed one
  (one weight perturbed), with an attestation over what it serves
- ``update:skip``  skip its own optimizer step (weights and optimizer state stay as they were), sent
  tensors stay honest
- ``update:poison``  perturb its weights after the optimizer step (Gaussian, ``noise_scale`` or 1e-2 x
  each weight's std), sent tensors stay honest
- ``state:backdoor``  build its stage from other weights than the seeded initialisation (one weight
  perturbed) and commit to them, honestly computed from then on
- ``state:off-attestation``  serve its state (to auditors and the coordinator alike) with one weight
  perturbed, under an attestation of the committed digest: the bytes contradict the attestation
- ``state:withhold``  serve no auditor, and not the judge, the state of a step it has begun (its
  audits cannot be completed); the coordinator's checkpoint and export fetches are served
- ``update:swap-after-commit``  perturb its weights right after committing to its updated state
  (``noise_scale`` or 1e-2 x each weight's std), keep claiming the committed digest, and serve the
  state it holds under it
- ``update:ride``  steer every weight by the largest step deviation an update audit accepts
  (``ride`` x the way to the edge of ``pipeguard.computation.update_bounds`` plus the tolerance
  floor), in one fixed direction per weight, every step
- ``audit:accuse``  as an auditor, report every audited node as cheating (a lying auditor)
- ``audit:clear``  as an auditor, sign PASS for ``accomplices`` (everybody when empty) whatever the
  recomputation found
- ``audit:shield``  as an auditor, answer "incomplete" (VERDICT_ERROR) for ``accomplices``
  (everybody when empty) whatever the recomputation found
- ``refusal:frame``  an outsider's frame attack (here with this node's own key, naming others): after
  each heartbeat, flood every other member's PushTensor with streams naming each of the others as
  their sender (forged complete streams, forged first chunks that then stall, streams that never
  send a chunk), to fill the receivers' stream slots and get the named honest nodes charged with
  the refusals; ``frame_flood`` is the same flood for a party with no registered key
- ``node:silent``  from its first firing on, never send, answer or heartbeat again (a node that
  hangs mid-step); the daemon still shuts down on SIGTERM
- ``node:slow``  wait ``delay`` seconds before each tensor it sends
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from pipeguard.model import derive_seed

log = logging.getLogger(__name__)

NO_MICRO_BATCH = -1
"""``AttackContext.micro_batch`` for events that belong to no micro-batch (updates, heartbeats)."""


@dataclass(frozen=True)
class AttackContext:
    """What a behaviour knows about the message or event it is tampering with."""

    step: int
    """Optimizer step."""
    micro_batch: int
    """Micro-batch index within the step (``NO_MICRO_BATCH`` for updates, states, heartbeats)."""
    stage: int
    """The attacker's stage (for verdicts: the audited stage)."""
    node_id: str
    """The attacker's node id."""
    direction: int = 0
    """``pb.DIRECTION_FORWARD`` / ``DIRECTION_BACKWARD`` for tensors, 0 otherwise."""
    peer: str = ""
    """The other party: the receiver of a send, the requester of a fetch ("" = the coordinator),
    the audited node of a verdict."""
    signer: Any = field(default=None, compare=False, repr=False)
    """The node's ``pipeguard.identity.Identity``, for behaviours that sign claims of their own."""

    def generator(self, *salt: object) -> torch.Generator:
        """A generator unique to this message, for reproducible random attacks."""
        g = torch.Generator()
        g.manual_seed(derive_seed(self.node_id, self.step, self.micro_batch, *salt))
        return g


@dataclass(frozen=True)
class Hook:
    """How ``Gated`` and ``Chain`` treat a hook (every hook is declared once, on ``Behaviour``)."""

    name: str
    returns: int
    """How many of the arguments after ``ctx`` the hook returns, rewritten (1: that value, 2: a
    pair, 0: nothing, the hook acts by side effect or by waiting)."""
    event: str
    """The gate's name for a call (``{0}``: the first argument after ``ctx``); it seeds the coin."""
    is_async: bool = False


def hook(returns: int, event: str = ""):
    """Declare a method of ``Behaviour`` as a hook (see ``Hook``); the event defaults to the name
    without ``on_``, dashed (``on_serve_state`` -> ``serve-state``)."""
    def mark(fn):
        fn.__hook__ = Hook(fn.__name__, returns, event or fn.__name__.removeprefix("on_").replace("_", "-"),
                           asyncio.iscoroutinefunction(fn))
        return fn
    return mark


class Behaviour:
    """Honest by default. Override hooks to misbehave (see the module docstring).

    A new hook is one method here, marked ``@hook``, and the seam that calls it (node/seams.py):
    gating, chaining and plug-in defaults follow from the declaration."""

    name = "honest"

    @hook(returns=1)
    def on_forward(self, ctx: AttackContext, activation: torch.Tensor) -> torch.Tensor:
        return activation

    @hook(returns=1)
    def on_backward(self, ctx: AttackContext, grad: torch.Tensor) -> torch.Tensor:
        return grad

    @hook(returns=1)
    def on_send(self, ctx: AttackContext, chunks: list) -> list:
        """``chunks``: the signed ``pb.TensorChunk`` stream; return the stream to push."""
        return chunks

    @hook(returns=2)
    def on_serve_tensor(self, ctx: AttackContext, commitment, tensor: torch.Tensor, sent: bool):
        """A retained tensor (``sent``: this node sent it, else received it) is about to be served
        with its ``pb.TensorCommitment``; return the (commitment, tensor) to serve."""
        return commitment, tensor

    @hook(returns=2)
    def on_serve_state(self, ctx: AttackContext, named: dict[str, torch.Tensor], digest: bytes):
        """The state at the start of ``ctx.step`` is about to be served; return (named, digest)."""
        return named, digest

    @hook(returns=0)
    def on_gradients(self, ctx: AttackContext, module: torch.nn.Module, optimizer: torch.optim.Optimizer,
                     global_norm: float, lr: float, clip: float) -> None:
        """Called on the compute thread before the optimizer step of ``ctx.step`` (gradients accumulated)."""

    @hook(returns=0)
    def on_update(self, ctx: AttackContext, module: torch.nn.Module, optimizer: torch.optim.Optimizer,
                  before: dict[str, torch.Tensor]) -> None:
        """Called on the compute thread after the optimizer step of ``ctx.step``."""

    @hook(returns=0)
    def on_build(self, ctx: AttackContext, module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Called on the compute thread after the stage is built from the run seed (``ctx.step``: 0)."""

    @hook(returns=0)
    def on_committed(self, ctx: AttackContext, module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Called on the compute thread right after the node committed to its state after ``ctx.step``."""

    @hook(returns=0, event="pause-{0}")
    async def pause(self, ctx: AttackContext, what: str) -> None:
        """Awaited before a send (``"send"``), an RPC answer (``"rpc"``), a heartbeat (``"heartbeat"``)."""

    @hook(returns=1)
    def on_verdict(self, ctx: AttackContext, verdict):
        """``verdict`` is a ``pb.AuditVerdict`` before signing; return the one to sign."""
        return verdict

    @hook(returns=0)
    def on_receive(self, ctx: AttackContext, commitment, tensor: torch.Tensor) -> None:
        """A tensor from a neighbour passed every check and was accepted, with its ``pb.TensorCommitment``."""

    @hook(returns=0)
    async def on_heartbeat(self, ctx: AttackContext, members: list) -> None:
        """Awaited after each heartbeat reply; ``members``: the coordinator's member list
        (``pb.PeerInfo``: node id, address, key). Must not block (it delays the next heartbeat)."""


HOOK_SPECS: dict[str, Hook] = {fn.__hook__.name: fn.__hook__ for fn in vars(Behaviour).values()
                               if hasattr(fn, "__hook__")}
HOOKS = tuple(HOOK_SPECS)
"""The hook names, in declaration order."""


def overrides(obj: object, hook: str) -> bool:
    """Whether ``obj`` changes ``hook`` from the honest default (so callers can skip costly set-up)."""
    if isinstance(obj, (Gated, Chain)):
        return obj.overrides(hook)
    impl = getattr(type(obj), hook, None)
    return impl is not None and impl is not getattr(Behaviour, hook)


@dataclass
class Params:
    """Parameters of the built-ins (the node's ``[attack]`` settings)."""

    noise_std: float = 1.0
    noise_scale: float = 0.0
    scale: float = 10.0
    fraction: float = 0.1
    delay: float = 2.0
    accomplices: tuple[str, ...] = ()
    seed: int = 0
    ride: float = 0.9


# -- tensor attacks ------------------------------------------------------------------------------


class TensorAttack(Behaviour):
    """A tampering function applied to activations (``forward``) or input gradients (``backward``)."""

    kind = ""

    def __init__(self, direction: str = "forward", params: Params | None = None):
        if direction not in ("forward", "backward"):
            raise ValueError(f"direction must be forward or backward, not {direction!r}")
        self.direction = direction
        self.params = params or Params()
        self.name = f"{direction}:{self.kind}"

    def tamper(self, ctx: AttackContext, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def on_forward(self, ctx, activation):
        return self.tamper(ctx, activation) if self.direction == "forward" else activation

    def on_backward(self, ctx, grad):
        return self.tamper(ctx, grad) if self.direction == "backward" else grad


class Reverse(TensorAttack):
    kind = "reverse"

    def tamper(self, ctx, t):
        return -t


class Random(TensorAttack):
    kind = "random"

    def tamper(self, ctx, t):
        lo, hi = t.min(), t.max()
        u = torch.rand(t.shape, generator=ctx.generator("random"), dtype=t.dtype)
        return lo + (hi - lo) * u


class Noise(TensorAttack):
    kind = "noise"

    def tamper(self, ctx, t):
        p = self.params
        std = p.noise_scale * float(t.float().std()) if p.noise_scale > 0 else p.noise_std
        noise = torch.randn(t.shape, generator=ctx.generator("noise"), dtype=t.dtype)
        return t + std * noise


class Scale(TensorAttack):
    kind = "scale"

    def tamper(self, ctx, t):
        return t * self.params.scale


class Zero(TensorAttack):
    kind = "zero"

    def tamper(self, ctx, t):
        return torch.zeros_like(t)


class SignFlip(TensorAttack):
    kind = "sign-flip"

    def tamper(self, ctx, t):
        mask = torch.rand(t.shape, generator=ctx.generator("sign-flip")) < self.params.fraction
        return torch.where(mask, -t, t)


class ConstantDirection(TensorAttack):
    kind = "constant-direction"

    def __init__(self, direction: str = "forward", params: Params | None = None):
        super().__init__(direction, params)
        self._units: dict[tuple[int, ...], torch.Tensor] = {}

    def unit(self, shape: torch.Size) -> torch.Tensor:
        """The fixed unit direction for tensors of ``shape`` (the same for every message)."""
        key = tuple(shape)
        if key not in self._units:
            g = torch.Generator()
            g.manual_seed(derive_seed(self.params.seed, "constant-direction", self.direction, *key))
            u = torch.randn(key, generator=g, dtype=torch.float64)
            self._units[key] = u / torch.linalg.vector_norm(u)
        return self._units[key]

    def tamper(self, ctx, t):
        norm = float(torch.linalg.vector_norm(t.double()))
        return (t.double() + norm * self.unit(t.shape)).to(t.dtype)


class History:
    """What a behaviour saw, per key, for its last few steps: ``earlier`` is the newest entry of a
    step before the given one, so a retried or rolled-back step never counts as earlier."""

    def __init__(self, keep: int = 2):
        self.keep = keep
        self._seen: dict[object, dict[int, object]] = {}

    def remember(self, key: object, step: int, value: object) -> None:
        steps = self._seen.setdefault(key, {})
        steps[step] = value
        for old in sorted(steps)[:-self.keep]:
            del steps[old]

    def earlier(self, key: object, step: int):
        steps = self._seen.get(key, {})
        before = [s for s in steps if s < step]
        return steps[max(before)] if before else None


class Stale(TensorAttack):
    """Remembers what it saw per micro-batch; sends the newest tensor of an earlier step."""

    kind = "stale"

    def __init__(self, direction: str = "forward", params: Params | None = None):
        super().__init__(direction, params)
        self.history = History()

    def tamper(self, ctx, t):
        earlier = self.history.earlier(ctx.micro_batch, ctx.step)
        self.history.remember(ctx.micro_batch, ctx.step, t.detach().clone())
        if earlier is None or earlier.shape != t.shape:
            return t  # nothing earlier to resend (the first step, or after a rollback)
        return earlier


def fixed_direction(seed: int, salt: str, shape) -> torch.Tensor:
    """A fixed pattern of +1/-1 per element for tensors of ``shape`` (the same every call)."""
    g = torch.Generator()
    g.manual_seed(derive_seed(seed, "ride", salt, *tuple(shape)))
    return torch.randint(0, 2, tuple(shape), generator=g, dtype=torch.float64) * 2 - 1


def ride_budget(params: Params) -> float:
    """The per-element relative budget the ride attacks spend: ``ride`` x the default tolerance."""
    from pipeguard.audit import DEFAULT_TOLERANCE

    return params.ride * DEFAULT_TOLERANCE


class Ride(TensorAttack):
    """Moves every element by ``ride`` x tolerance x (|x| + rms(x)): the whole allowance of
    ``pipeguard.audit.deviation`` at ``ride`` = 1."""

    kind = "ride"

    def tamper(self, ctx, t):
        x = t.double()
        allowance = ride_budget(self.params) * (x.abs() + x.pow(2).mean().sqrt())
        if self.direction == "backward":  # against each gradient element's sign
            d = torch.where(x >= 0, -1.0, 1.0).to(torch.float64)
        else:
            d = fixed_direction(self.params.seed, self.direction, t.shape)
        return (x + allowance * d).to(t.dtype)


class UpdateRide(Behaviour):
    """Steers every weight by ``ride`` x the most an update audit accepts, each step, one fixed
    direction per weight: to the edge of ``update_bounds`` (at the default tolerance) plus the
    floor tolerance x (|step| + rms(step))."""

    name = "update:ride"

    def __init__(self, params: Params | None = None):
        self.params = params or Params()
        self._bounds: tuple[int, dict] | None = None

    def on_gradients(self, ctx, module, optimizer, global_norm, lr, clip):
        from pipeguard.computation import update_bounds

        self._bounds = (ctx.step, update_bounds(module, optimizer, global_norm, lr, clip,
                                                ride_budget(Params(ride=1.0))))

    def on_update(self, ctx, module, optimizer, before):
        if self._bounds is None or self._bounds[0] != ctx.step:
            return  # no bounds for this step (its gradients hook did not fire): stay honest
        bounds = self._bounds[1]
        tol, ride = ride_budget(Params(ride=1.0)), self.params.ride
        with torch.no_grad():
            for name, p in sorted(module.named_parameters()):
                key = f"param/{name}"
                if key not in bounds:
                    continue
                lo, hi = bounds[key]
                a = p.double()
                step = a - before[key].double()
                floor = tol * (step.abs() + step.pow(2).mean().sqrt())
                d = fixed_direction(self.params.seed, key, p.shape)
                edge = torch.where(d > 0, torch.maximum(hi, a) + floor, torch.minimum(lo, a) - floor)
                p.copy_((a + ride * (edge - a)).to(p.dtype))


# Lu et al.'s attacks under their original names (kept for plug-in authors and tests).
class ForwardReverse(Reverse):
    def __init__(self, params: Params | None = None):
        super().__init__("forward", params)


class ForwardRandom(Random):
    def __init__(self, params: Params | None = None):
        super().__init__("forward", params)


class BackwardReverse(Reverse):
    def __init__(self, params: Params | None = None):
        super().__init__("backward", params)


class BackwardNoise(Noise):
    def __init__(self, std: float = 1.0, params: Params | None = None):
        p = params or Params()
        super().__init__("backward", Params(**{**p.__dict__, "noise_std": std}))


# -- protocol attacks ----------------------------------------------------------------------------


class BadSignature(Behaviour):
    name = "wire:bad-signature"

    def on_send(self, ctx, chunks):
        out = [type(c)() for c in chunks]
        for new, old in zip(out, chunks):
            new.CopyFrom(old)
        for c in out:
            if c.data:
                data = bytearray(c.data)
                data[len(data) // 2] ^= 0x01
                c.data = bytes(data)
                break
        return out


class Replay(Behaviour):
    """Sends, instead of this stream, the newest signed stream of an earlier step for the same
    micro-batch and direction (again on every retry of the step)."""

    name = "wire:replay"

    def __init__(self):
        self.history = History()

    def on_send(self, ctx, chunks):
        key = (ctx.direction, ctx.micro_batch)
        earlier = self.history.earlier(key, ctx.step)
        self.history.remember(key, ctx.step, chunks)
        return chunks if earlier is None else earlier


def sign_tensor_commitment(header, tensor: torch.Tensor, signer):
    """A fresh ``pb.TensorCommitment`` by ``signer`` over ``tensor`` under ``header``."""
    from pipeguard.signing import canonical_bytes
    from pipeguard.tensors import payload_digest
    from pipeguard.v1 import pipeguard_pb2 as pb

    commitment = pb.TensorCommitment(header=header, payload_digest=payload_digest(header, tensor))
    commitment.signature = signer.sign(canonical_bytes(commitment))
    return commitment


class Equivocate(Behaviour):
    name = "wire:equivocate"

    def on_serve_tensor(self, ctx, commitment, tensor, sent):
        if not sent or ctx.signer is None:
            return commitment, tensor
        from pipeguard.compression import remap

        other = remap(tensor, lambda t: -t)  # in the run's wire dtype
        return sign_tensor_commitment(commitment.header, other, ctx.signer), other


class SwitchAttempt(Behaviour):
    """Input A in a step's first attempt, input B in its retry, and the successor's gradient for A
    served to auditors as if it answered B (see the module docstring)."""

    name = "forward:switch-attempt"

    def __init__(self):
        self.failed: set[int] = set()
        """Steps whose first attempt this node has failed."""
        self.kept: dict[tuple[int, int], tuple[object, torch.Tensor]] = {}
        """(step, micro-batch) -> the successor's signed gradient of the failed attempt."""

    def on_forward(self, ctx, activation):
        return activation if ctx.step in self.failed else (-activation).contiguous()

    def on_receive(self, ctx, commitment, tensor):
        from pipeguard.v1 import pipeguard_pb2 as pb

        if ctx.direction == pb.DIRECTION_BACKWARD and ctx.step not in self.failed:
            self.kept[(ctx.step, ctx.micro_batch)] = (commitment, tensor)

    def on_backward(self, ctx, grad):
        from pipeguard.errors import FailedPrecondition

        if ctx.step not in self.failed:
            self.failed.add(ctx.step)
            raise FailedPrecondition(f"forward:switch-attempt fails attempt 1 of step {ctx.step} on purpose")
        return grad

    def on_serve_tensor(self, ctx, commitment, tensor, sent):
        from pipeguard.v1 import pipeguard_pb2 as pb

        kept = self.kept.get((ctx.step, ctx.micro_batch))
        if sent or ctx.direction != pb.DIRECTION_BACKWARD or kept is None:
            return commitment, tensor
        return kept


class FalseCommitment(Behaviour):
    name = "state:false-commitment"

    def on_serve_state(self, ctx, named, digest):
        from pipeguard.tensors import state_digest

        if not ctx.peer:  # the coordinator (checkpoints, the judge) gets the truth; auditors do not
            return named, digest
        served = dict(named)
        name = next(n for n in sorted(served) if n.startswith("param/"))
        served[name] = served[name] + 1e-2 * torch.randn(served[name].shape, generator=ctx.generator("state"))
        return served, state_digest(served.items())


def _perturb(module: torch.nn.Module, g: torch.Generator, rel: float) -> None:
    """Add Gaussian noise of ``rel`` x each weight's std (at least 1e-3) to every parameter, in place."""
    with torch.no_grad():
        for p in module.parameters():
            std = float(p.float().std()) if p.numel() > 1 else float(p.abs().max())
            p.add_(rel * max(std, 1e-3) * torch.randn(p.shape, generator=g, dtype=p.dtype))


class Backdoor(Behaviour):
    name = "state:backdoor"

    def on_build(self, ctx, module, optimizer):
        with torch.no_grad():
            p = next(module.parameters())
            p.add_(1e-2 * torch.randn(p.shape, generator=ctx.generator("backdoor"), dtype=p.dtype))


class OffAttestation(Behaviour):
    name = "state:off-attestation"

    def on_serve_state(self, ctx, named, digest):
        served = dict(named)
        name = next(n for n in sorted(served) if n.startswith("param/"))
        served[name] = served[name] + 1e-2 * torch.randn(served[name].shape, generator=ctx.generator("off"))
        return served, digest  # the attestation still signs the committed digest


class Withhold(Behaviour):
    """state:withhold: serve nobody (auditors, the judge) the state of a step it has begun; the
    coordinator's checkpoint and export fetches, which come before, are served."""

    name = "state:withhold"

    def __init__(self):
        self.running = -1
        """The newest step this node has sent a tensor of."""

    async def pause(self, ctx, what):
        if what == "send":
            self.running = max(self.running, ctx.step)

    def on_serve_state(self, ctx, named, digest):
        from pipeguard.errors import FailedPrecondition

        if ctx.step <= self.running:
            raise FailedPrecondition(f"state of step {ctx.step} withheld (state:withhold)")
        return named, digest


class SwapAfterCommit(Behaviour):
    name = "update:swap-after-commit"

    def __init__(self, params: Params | None = None):
        self.params = params or Params()

    def on_committed(self, ctx, module, optimizer):
        _perturb(module, ctx.generator("swap"), self.params.noise_scale if self.params.noise_scale > 0 else 1e-2)


class UpdateSkip(Behaviour):
    name = "update:skip"

    def on_update(self, ctx, module, optimizer, before):
        from pipeguard.model import load_named_state

        load_named_state(module, optimizer, before)


class UpdatePoison(Behaviour):
    name = "update:poison"

    def __init__(self, params: Params | None = None):
        self.params = params or Params()

    def on_update(self, ctx, module, optimizer, before):
        rel = self.params.noise_scale if self.params.noise_scale > 0 else 1e-2
        g = ctx.generator("update")
        with torch.no_grad():
            for p in module.parameters():
                std = float(p.float().std()) if p.numel() > 1 else float(p.abs().max())
                p.add_(rel * max(std, 1e-3) * torch.randn(p.shape, generator=g, dtype=p.dtype))


class AuditAccuse(Behaviour):
    name = "audit:accuse"

    def on_verdict(self, ctx, verdict):
        from pipeguard.v1 import pipeguard_pb2 as pb

        verdict.verdict = pb.VERDICT_FAIL
        verdict.detail = "forward activation deviates from recomputation by 1.7 (made up)"
        verdict.deviation = 1.7
        return verdict


class AuditClear(Behaviour):
    name = "audit:clear"

    def __init__(self, params: Params | None = None):
        self.accomplices = set((params or Params()).accomplices)

    def on_verdict(self, ctx, verdict):
        from pipeguard.v1 import pipeguard_pb2 as pb

        if self.accomplices and ctx.peer not in self.accomplices:
            return verdict
        if verdict.verdict == pb.VERDICT_PASS:
            return verdict
        verdict.verdict = pb.VERDICT_PASS
        verdict.deviation = 0.0
        verdict.detail = f"audit of step {ctx.step} stage {ctx.stage} matches (made up)"
        return verdict


class AuditShield(Behaviour):
    name = "audit:shield"

    def __init__(self, params: Params | None = None):
        self.accomplices = set((params or Params()).accomplices)

    def on_verdict(self, ctx, verdict):
        from pipeguard.v1 import pipeguard_pb2 as pb

        if self.accomplices and ctx.peer not in self.accomplices:
            return verdict
        verdict.verdict = pb.VERDICT_ERROR
        verdict.deviation = 0.0
        verdict.detail = f"audit incomplete: the state of step {ctx.step} was not served (made up)"
        return verdict


class Silent(Behaviour):
    """Fires at a send; from then on every pause (send, RPC, heartbeat) blocks until the daemon
    shuts down (``latched``)."""

    name = "node:silent"

    def __init__(self):
        self.latched = False

    async def pause(self, ctx, what):
        if not self.latched and what != "send":
            return  # it falls silent mid-step, at a send; before that it answers as usual
        if not self.latched:
            log.warning("going silent at step %d (%s)", ctx.step, what)
        self.latched = True
        await asyncio.Event().wait()  # never set: cancelled when the daemon stops


class Slow(Behaviour):
    name = "node:slow"

    def __init__(self, params: Params | None = None):
        self.delay = (params or Params()).delay

    async def pause(self, ctx, what):
        if what == "send":
            await asyncio.sleep(self.delay)


async def _held(chunks: list, hold: float):
    """Yield ``chunks``, then keep the stream open (sending nothing) for up to ``hold`` seconds."""
    for chunk in chunks:
        yield chunk
    await asyncio.sleep(hold)


async def frame_flood(members: list, signer, *, exclude: str = "", step: int = 0, streams: int = 4,
                      hold: float = 5.0) -> tuple[int, int]:
    """refusal:frame's flood, also for a party with no registered key (``signer``: any
    ``Identity``): against every member but ``exclude``, ``streams`` streams naming each other
    member as their sender (complete streams and first chunks that then stall, both signed by
    ``signer``, not by the node named) and ``streams`` that never send a chunk, each held at most
    ``hold`` seconds. Returns (streams opened, streams refused). Plain TCP (no TLS): experiments."""
    import grpc

    from pipeguard.tensors import TensorSender, make_header
    from pipeguard.v1 import pipeguard_pb2 as pb
    from pipeguard.v1 import pipeguard_pb2_grpc as pb_grpc

    channels, calls = [], []
    try:
        for target in members:
            if target.node_id == exclude or not target.address:
                continue
            channel = grpc.aio.insecure_channel(target.address)
            channels.append(channel)
            push = pb_grpc.NodeStub(channel).PushTensor
            for named in members:
                if named.node_id in (target.node_id, exclude):
                    continue
                for i in range(streams):
                    t = torch.zeros(1)
                    header = make_header(run_id="", step=step, micro_batch=i, stage=0, direction=pb.DIRECTION_FORWARD,
                                         sender=named.node_id, receiver=target.node_id, tensor=t, epoch=0)
                    chunks = list(TensorSender(header, t, signer, 1 << 16).chunks())
                    stream = _held(chunks, 0.0) if i % 2 == 0 else _held(chunks[:1], hold)
                    calls.append(push(stream, timeout=hold + 1.0))
            for _ in range(streams):
                calls.append(push(_held([], hold), timeout=hold + 1.0))
        results = await asyncio.gather(*calls, return_exceptions=True)
        return len(calls), sum(isinstance(r, grpc.aio.AioRpcError) for r in results)
    finally:
        for channel in channels:
            await channel.close()


class Frame(Behaviour):
    """refusal:frame: one ``frame_flood`` at a time, started after a heartbeat."""

    name = "refusal:frame"

    def __init__(self):
        self.flood: asyncio.Future | None = None
        self.floods = 0

    async def on_heartbeat(self, ctx, members):
        if self.flood is None or self.flood.done():
            if self.flood is not None and not self.flood.cancelled() and self.flood.exception() is None:
                opened, refused = self.flood.result()
                log.info("frame flood %d: %d streams, %d refused", self.floods, opened, refused)
            self.floods += 1
            self.flood = asyncio.ensure_future(frame_flood(members, ctx.signer, exclude=ctx.node_id, step=ctx.step))


TENSOR_KINDS: dict[str, type[TensorAttack]] = {
    cls.kind: cls for cls in (Reverse, Random, Noise, Scale, Zero, SignFlip, ConstantDirection, Stale, Ride)}

BUILTINS: dict[str, Callable[[Params], Behaviour]] = {
    **{f"{d}:{k}": (lambda p, d=d, cls=cls: cls(d, p)) for d in ("forward", "backward")
       for k, cls in TENSOR_KINDS.items()},
    "wire:bad-signature": lambda p: BadSignature(),
    "wire:replay": lambda p: Replay(),
    "wire:equivocate": lambda p: Equivocate(),
    "forward:switch-attempt": lambda p: SwitchAttempt(),
    "state:false-commitment": lambda p: FalseCommitment(),
    "state:backdoor": lambda p: Backdoor(),
    "state:off-attestation": lambda p: OffAttestation(),
    "state:withhold": lambda p: Withhold(),
    "update:swap-after-commit": SwapAfterCommit,
    "update:skip": lambda p: UpdateSkip(),
    "update:poison": UpdatePoison,
    "update:ride": UpdateRide,
    "audit:accuse": lambda p: AuditAccuse(),
    "audit:clear": AuditClear,
    "audit:shield": AuditShield,
    "refusal:frame": lambda p: Frame(),
    "node:silent": lambda p: Silent(),
    "node:slow": Slow,
}
"""Name -> factory taking the built-ins' ``Params``."""


# -- gating and chaining -------------------------------------------------------------------------


class Gated(Behaviour):
    """Fires ``inner``'s hooks with probability ``rate`` per call, for ``start_step`` <= step <
    ``stop_step`` (-1: no end) and, where a call has a micro-batch, only for ``micro_batches``
    (empty: all). The coin is reproducible: seeded by (seed, behaviour, hook, step, micro-batch)."""

    def __init__(self, inner: Behaviour, rate: float, start_step: int, seed: int, stop_step: int = -1,
                 micro_batches: tuple[int, ...] | list[int] = ()):
        self.inner, self.rate, self.start_step, self.seed = inner, rate, start_step, seed
        self.stop_step = stop_step
        self.micro_batches = frozenset(micro_batches)
        self.name = getattr(inner, "name", type(inner).__name__)
        self.fired = 0

    def overrides(self, hook: str) -> bool:
        return overrides(self.inner, hook)

    def _fires(self, ctx: AttackContext, event: str) -> bool:
        if ctx.step < self.start_step or (self.stop_step >= 0 and ctx.step >= self.stop_step):
            return False
        if self.micro_batches and ctx.micro_batch >= 0 and ctx.micro_batch not in self.micro_batches:
            return False
        if self.rate >= 1.0:
            return True
        g = torch.Generator()
        g.manual_seed(derive_seed(self.seed, "gate", self.name, event, ctx.step, ctx.micro_batch))
        return float(torch.rand((), generator=g)) < self.rate

    def _note(self, changed: bool, event: str, ctx: AttackContext) -> None:
        if changed:
            self.fired += 1
            log.debug("attack %s fired on %s step %d mb %d", self.name, event, ctx.step, ctx.micro_batch)

    def _call(self, spec: Hook, ctx: AttackContext, args: tuple):
        """``spec``'s hook of ``inner`` if the gate opens for this call, else the honest default."""
        event = spec.event.format(*args)
        # A latched behaviour (node:silent after it fired) stays in force whatever the gate says.
        if not (getattr(self.inner, "latched", False) or self._fires(ctx, event)):
            return getattr(Behaviour, spec.name)(self, ctx, *args)
        if spec.returns == 0:  # noted before the call: a pause may never return
            self._note(overrides(self.inner, spec.name), event, ctx)
            return getattr(self.inner, spec.name)(ctx, *args)
        before = [_fingerprint(a) for a in args[:spec.returns]]
        out = getattr(self.inner, spec.name)(ctx, *args)
        outs = (out,) if spec.returns == 1 else tuple(out)
        self._note(any(o is not a or (b is not None and _fingerprint(o) != b)
                       for o, a, b in zip(outs, args, before)), event, ctx)
        return out


def _fingerprint(value) -> bytes | None:
    """A protobuf message's bytes (a hook may rewrite one in place), None for anything else."""
    return value.SerializeToString(deterministic=True) if hasattr(value, "SerializeToString") else None


class Chain(Behaviour):
    """Apply several behaviours in order: each gets what the one before it returned."""

    def __init__(self, parts: list[Behaviour]):
        self.parts = parts
        self.name = "+".join(getattr(p, "name", type(p).__name__) for p in parts) or "honest"

    def overrides(self, hook: str) -> bool:
        return any(overrides(p, hook) for p in self.parts)

    def _call(self, spec: Hook, ctx: AttackContext, args: tuple):
        for p in self.parts:
            out = getattr(p, spec.name)(ctx, *args)
            if spec.returns:
                args = ((out,) if spec.returns == 1 else tuple(out)) + args[spec.returns:]
        return args[0] if spec.returns == 1 else args[:spec.returns] if spec.returns else None

    async def _call_async(self, spec: Hook, ctx: AttackContext, args: tuple) -> None:
        for p in self.parts:
            await getattr(p, spec.name)(ctx, *args)

    @property
    def fired(self) -> int:
        return sum(getattr(p, "fired", 0) for p in self.parts)


def _dispatch(cls: type, spec: Hook) -> None:
    """Give ``cls`` (``Gated``, ``Chain``) the hook ``spec`` as a method that goes through its ``_call``."""
    if spec.is_async and cls is Chain:
        async def method(self, ctx, *args):
            await self._call_async(spec, ctx, args)
    elif spec.is_async:
        async def method(self, ctx, *args):
            await self._call(spec, ctx, args)
    else:
        def method(self, ctx, *args):
            return self._call(spec, ctx, args)
    method.__name__ = method.__qualname__ = spec.name
    method.__doc__ = getattr(Behaviour, spec.name).__doc__
    setattr(cls, spec.name, method)


for _spec in HOOK_SPECS.values():
    _dispatch(Gated, _spec)
    _dispatch(Chain, _spec)


def load_plugin(spec: str) -> Behaviour:
    """Instantiate ``path/to/file.py:ClassName``."""
    path, _, name = spec.rpartition(":")
    file = Path(path).expanduser()
    if not file.is_file():
        raise ValueError(f"attack plugin file {file} does not exist")
    module_spec = importlib.util.spec_from_file_location(f"pipeguard_attack_{file.stem}", file)
    if module_spec is None or module_spec.loader is None:
        raise ValueError(f"cannot load attack plugin {file}")
    module = importlib.util.module_from_spec(module_spec)
    # Registered before it runs, as importlib's recipe does: dataclasses and typing look the
    # defining module up in sys.modules.
    sys.modules[module_spec.name] = module
    module_spec.loader.exec_module(module)
    cls = getattr(module, name, None)
    if cls is None:
        raise ValueError(f"attack plugin {file} has no class {name!r}")
    obj = cls()
    if not any(hasattr(obj, h) for h in HOOKS):
        raise ValueError(f"{spec} defines none of on_forward, on_backward, on_verdict (nor any other hook: "
                         f"{', '.join(HOOKS)})")
    honest = Behaviour()
    for hook in HOOKS:  # honest defaults for duck-typed plug-ins
        if not hasattr(obj, hook):
            setattr(obj, hook, getattr(honest, hook))
    return obj


def build(behaviours: list[str], rate: float, start_step: int, noise_std: float, plugin: str, seed: int, *,
          stop_step: int = -1, micro_batches: tuple[int, ...] | list[int] = (), noise_scale: float = 0.0,
          scale: float = 10.0, fraction: float = 0.1, delay: float = 2.0,
          accomplices: tuple[str, ...] | list[str] = (), ride: float = 0.9) -> Chain:
    """The node's behaviour from its config; an empty chain is honest."""
    params = Params(noise_std=noise_std, noise_scale=noise_scale, scale=scale, fraction=fraction, delay=delay,
                    accomplices=tuple(accomplices), seed=seed, ride=ride)
    unknown = [b for b in behaviours if b not in BUILTINS]
    if unknown:
        raise ValueError(f"unknown attack(s) {unknown}; choose from {sorted(BUILTINS)}")
    inners = [BUILTINS[name](params) for name in behaviours]
    if plugin:
        inners.append(load_plugin(plugin))
    return Chain([Gated(inner, rate, start_step, seed, stop_step, micro_batches) for inner in inners])


def from_config(cfg, seed: int) -> Chain:
    """``build`` from a ``node.config.AttackConfig`` (``seed``: the resolved attack seed)."""
    return build(cfg.behaviours, cfg.rate, cfg.start_step, cfg.noise_std, cfg.plugin, seed, stop_step=cfg.stop_step,
                 micro_batches=cfg.micro_batches, noise_scale=cfg.noise_scale, scale=cfg.scale, fraction=cfg.fraction,
                 delay=cfg.delay, accomplices=cfg.accomplices, ride=cfg.ride)


__all__ = ["AttackContext", "Behaviour", "BUILTINS", "Chain", "Gated", "Params", "build", "from_config",
           "load_plugin", "overrides"]
