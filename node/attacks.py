"""Misbehaviour for experiments: the plug-in interface and the built-in attacks.

A behaviour is any object with the hooks below (subclass ``Behaviour`` and override what you
need; the defaults are honest). The node calls ``on_forward`` on every activation it is
about to send downstream and ``on_backward`` on every input gradient it is about to send
upstream, *before* signing: the attacker signs what it sends, as a real attacker would.

Load your own with ``pipeguard-node --attack-plugin my_attack.py:MyAttack`` (or
``attack.plugin`` in the node's TOML). The class is instantiated with no arguments.
Example::

    # my_attack.py
    from node.attacks import Behaviour

    class ScaleUp(Behaviour):
        def on_forward(self, ctx, activation):
            return activation * 10 if ctx.step >= 5 else activation

Built-ins (``--attack DIRECTION:KIND``, gated by ``--attack-rate`` and ``--attack-start``):

- ``forward:reverse``  negate the activation (Lu et al.)
- ``forward:random``   replace the activation with uniform noise over its own value range
- ``backward:noise``   add N(0, noise_std^2) to the gradient (Lu et al. use std 1)
- ``backward:reverse`` negate the gradient
- ``audit:accuse``     as an auditor, report every audited node as cheating (a lying auditor)

A behaviour may also override ``on_verdict(ctx, verdict)`` to change the verdict this node
signs when it audits someone (``ctx.step`` and ``ctx.stage`` are the audited step and stage).
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeguard.model import derive_seed

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AttackContext:
    """What a behaviour knows about the message it is tampering with."""

    step: int
    """Optimizer step."""
    micro_batch: int
    """Micro-batch index within the step."""
    stage: int
    """The attacker's stage."""
    node_id: str
    """The attacker's node id."""

    def generator(self, *salt: object) -> torch.Generator:
        """A generator unique to this message, for reproducible random attacks."""
        g = torch.Generator()
        g.manual_seed(derive_seed(self.node_id, self.step, self.micro_batch, *salt))
        return g


class Behaviour:
    """Honest by default. Override hooks to misbehave; return the tensor to send."""

    name = "honest"

    def on_forward(self, ctx: AttackContext, activation: torch.Tensor) -> torch.Tensor:
        return activation

    def on_backward(self, ctx: AttackContext, grad: torch.Tensor) -> torch.Tensor:
        return grad

    def on_verdict(self, ctx: AttackContext, verdict):
        """``verdict`` is a ``pb.AuditVerdict`` before signing; return the one to sign."""
        return verdict


class ForwardReverse(Behaviour):
    name = "forward:reverse"

    def on_forward(self, ctx, activation):
        return -activation


class ForwardRandom(Behaviour):
    name = "forward:random"

    def on_forward(self, ctx, activation):
        lo, hi = activation.min(), activation.max()
        u = torch.rand(activation.shape, generator=ctx.generator("random"), dtype=activation.dtype)
        return lo + (hi - lo) * u


class BackwardNoise(Behaviour):
    name = "backward:noise"

    def __init__(self, std: float = 1.0):
        self.std = std

    def on_backward(self, ctx, grad):
        noise = torch.randn(grad.shape, generator=ctx.generator("noise"), dtype=grad.dtype)
        return grad + self.std * noise


class BackwardReverse(Behaviour):
    name = "backward:reverse"

    def on_backward(self, ctx, grad):
        return -grad


class AuditAccuse(Behaviour):
    name = "audit:accuse"

    def on_verdict(self, ctx, verdict):
        from pipeguard.v1 import pipeguard_pb2 as pb

        verdict.verdict = pb.VERDICT_FAIL
        verdict.detail = "forward activation deviates from recomputation by 1.7 (made up)"
        verdict.deviation = 1.7
        return verdict


BUILTINS = {
    "forward:reverse": ForwardReverse,
    "forward:random": ForwardRandom,
    "backward:noise": BackwardNoise,
    "backward:reverse": BackwardReverse,
    "audit:accuse": AuditAccuse,
}


class Gated(Behaviour):
    """Fires ``inner`` with probability ``rate`` per message, from ``start_step`` on."""

    def __init__(self, inner: Behaviour, rate: float, start_step: int, seed: int):
        self.inner, self.rate, self.start_step, self.seed = inner, rate, start_step, seed
        self.name = getattr(inner, "name", type(inner).__name__)
        self.fired = 0

    def _fires(self, ctx: AttackContext, direction: str) -> bool:
        if ctx.step < self.start_step:
            return False
        g = torch.Generator()
        g.manual_seed(derive_seed(self.seed, "gate", self.name, direction, ctx.step, ctx.micro_batch))
        return float(torch.rand((), generator=g)) < self.rate

    def on_forward(self, ctx, activation):
        if not self._fires(ctx, "forward"):
            return activation
        out = self.inner.on_forward(ctx, activation)
        if out is not activation:
            self.fired += 1
            log.debug("attack %s fired on forward step %d mb %d", self.name, ctx.step, ctx.micro_batch)
        return out

    def on_backward(self, ctx, grad):
        if not self._fires(ctx, "backward"):
            return grad
        out = self.inner.on_backward(ctx, grad)
        if out is not grad:
            self.fired += 1
            log.debug("attack %s fired on backward step %d mb %d", self.name, ctx.step, ctx.micro_batch)
        return out

    def on_verdict(self, ctx, verdict):
        if not self._fires(ctx, "verdict") or not hasattr(self.inner, "on_verdict"):
            return verdict
        return self.inner.on_verdict(ctx, verdict)


class Chain(Behaviour):
    """Apply several behaviours in order."""

    def __init__(self, parts: list[Behaviour]):
        self.parts = parts
        self.name = "+".join(getattr(p, "name", type(p).__name__) for p in parts) or "honest"

    def on_forward(self, ctx, activation):
        for p in self.parts:
            activation = p.on_forward(ctx, activation)
        return activation

    def on_backward(self, ctx, grad):
        for p in self.parts:
            grad = p.on_backward(ctx, grad)
        return grad

    def on_verdict(self, ctx, verdict):
        for p in self.parts:
            verdict = p.on_verdict(ctx, verdict)
        return verdict

    @property
    def fired(self) -> int:
        return sum(getattr(p, "fired", 0) for p in self.parts)


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
    if not any(hasattr(obj, h) for h in ("on_forward", "on_backward", "on_verdict")):
        raise ValueError(f"{spec} defines none of on_forward, on_backward, on_verdict")
    for hook in ("on_forward", "on_backward", "on_verdict"):  # honest defaults for duck-typed plug-ins
        if not hasattr(obj, hook):
            setattr(obj, hook, getattr(Behaviour(), hook))
    return obj


def build(behaviours: list[str], rate: float, start_step: int, noise_std: float, plugin: str, seed: int) -> Chain:
    """The node's behaviour from its config; an empty chain is honest."""
    parts: list[Behaviour] = []
    for name in behaviours:
        inner = BackwardNoise(noise_std) if name == "backward:noise" else BUILTINS[name]()
        parts.append(Gated(inner, rate, start_step, seed))
    if plugin:
        parts.append(Gated(load_plugin(plugin), rate, start_step, seed))
    return Chain(parts)
