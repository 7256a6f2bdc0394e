"""A cheap statistical screen on received tensors, in the spirit of SENTINEL.

Two checks. Across steps, for each direction it keeps an exponential moving average of the
log-norm of received tensors (and, for activations, of their per-channel mean vector) and
flags a tensor whose norm is over 10x off the running norm, whose mean direction turned
against the running mean (a sign flip), or that holds NaN/Inf. Within a step, it compares
the step's micro-batches with each other (``cross_check``): honest micro-batches of one step
have norms within a small factor of each other and activations that point the same way, so
an attacker that poisons only some of them stands out even when it poisoned the baseline
from the very first step. A flag only forces an audit of that message:
the screen alone never bans anyone, so false positives cost an audit, not a node.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pipeguard.v1 import pipeguard_pb2 as pb

WARMUP = 3
"""Tensors observed per direction before the screen flags anything."""
NORM_FACTOR = 10.0
"""Flag a tensor whose norm is this many times above or below the running norm. Honest norms
drift as training goes (gradients shrink fast early on), but by far less per step than this."""
ALPHA = 0.1


@dataclass
class _Running:
    n: int = 0
    mean: float = 0.0
    direction: torch.Tensor | None = None

    def update(self, log_norm: float, channel_mean: torch.Tensor | None) -> None:
        if self.n == 0:
            self.mean = log_norm
        else:
            self.mean += ALPHA * (log_norm - self.mean)
        if channel_mean is not None:
            self.direction = channel_mean.clone() if self.direction is None else \
                (1 - ALPHA) * self.direction + ALPHA * channel_mean
        self.n += 1


CROSS_NORM_FACTOR = 8.0
"""Within a step, norms further apart than this factor flag the step's micro-batches."""


class Screen:
    def __init__(self) -> None:
        self._stats = {pb.DIRECTION_FORWARD: _Running(), pb.DIRECTION_BACKWARD: _Running()}
        self._seen: dict[tuple[int, int], list[tuple[int, float, torch.Tensor | None]]] = {}
        """(step, direction) -> [(micro-batch, log-norm, channel mean)] for cross_check."""

    def cross_check(self, step: int) -> list[pb.ScreenFlag]:
        """Flags for micro-batches of ``step`` that disagree with the rest of the step; forgets it.

        Disagreement flags every micro-batch involved: when an attacker poisoned half of them,
        nobody can tell from statistics which half is honest, and audits are cheap next to that.
        """
        flags = []
        for direction in (pb.DIRECTION_FORWARD, pb.DIRECTION_BACKWARD):
            seen = self._seen.pop((step, direction), [])
            if len(seen) < 2:
                continue
            norms = [n for _, n, _ in seen]
            suspects: dict[int, str] = {}
            if max(norms) - min(norms) > math.log(CROSS_NORM_FACTOR):
                for mb, n, _ in seen:
                    suspects[mb] = (f"norms within the step differ {math.exp(max(norms) - min(norms)):.3g}x "
                                    f"(this one {math.exp(n - min(norms)):.3g}x the smallest)")
            means = [(mb, m) for mb, _, m in seen if m is not None and float(torch.linalg.vector_norm(m)) > 0]
            for i, (mb_a, a) in enumerate(means):
                for mb_b, b in means[i + 1:]:
                    cos = float(torch.nn.functional.cosine_similarity(a, b, dim=0))
                    if cos < 0.0:
                        for mb in (mb_a, mb_b):
                            suspects.setdefault(mb, f"mean activation points against micro-batch "
                                                    f"{mb_b if mb == mb_a else mb_a}'s (cosine {cos:.2f})")
            flags += [pb.ScreenFlag(direction=direction, micro_batch=mb, reason=r) for mb, r in sorted(suspects.items())]
        for key in [k for k in self._seen if k[0] <= step]:
            del self._seen[key]
        return flags

    def observe(self, direction: int, tensor: torch.Tensor, step: int = -1, micro_batch: int = 0) -> str | None:
        """Return why ``tensor`` looks suspicious, or None. Updates the baseline with clean ones."""
        t = tensor.detach().float()
        if not bool(torch.isfinite(t).all()):
            return "non-finite values"
        log_norm = math.log(float(torch.linalg.vector_norm(t)) + 1e-12)
        channel_mean = t.reshape(-1, t.shape[-1]).mean(0) if direction == pb.DIRECTION_FORWARD and t.dim() else None
        if step >= 0:
            self._seen.setdefault((step, direction), []).append((micro_batch, log_norm, channel_mean))
        s = self._stats[direction]
        reason = None
        if s.n >= WARMUP:
            if abs(log_norm - s.mean) > math.log(NORM_FACTOR):
                reason = f"norm is {math.exp(log_norm - s.mean):.3g}x the running norm"
            elif channel_mean is not None and s.direction is not None:
                cos = float(torch.nn.functional.cosine_similarity(channel_mean, s.direction, dim=0))
                if cos < 0.0:
                    reason = f"mean activation points against the running mean (cosine {cos:.2f})"
        if reason is None:
            s.update(log_norm, channel_mean)
        return reason
