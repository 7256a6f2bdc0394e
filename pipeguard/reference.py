"""Single-process training of the same model, seed and micro-batching: the yardstick.

The distributed pipeline must reproduce this: same losses and final parameters within a
tight tolerance (tests/test_pipeline_correctness.py), and its throughput is measured against
this (benchmarks/pipeline_efficiency.py).

With a compressed wire dtype (``wire_dtype`` other than fp32) the pipeline's math differs from
one module's by the compression at each stage boundary, so the reference then runs the stages
one after another in this process and applies the same compression where the pipeline sends:
each stage's activation goes through ``to_wire`` and is decompressed as the next stage's input,
each input gradient likewise on the way back (straight-through).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from pipeguard.computation import StageComputation, StageSetup, to_wire
from pipeguard.data import Dataset
from pipeguard.model import GPTConfig, OptimSettings, lr_at


@dataclass
class ReferenceResult:
    losses: list[float]
    state_dict: dict[str, torch.Tensor]
    tokens_per_s: float


def train_reference(gpt: GPTConfig, optim: OptimSettings, dataset: Dataset, *, seed: int, steps: int,
                    micro_batches: int, micro_batch_size: int, start_step: int = 0, wire_dtype: str = "fp32",
                    num_stages: int = 1) -> ReferenceResult:
    """Train the whole model as one stage (the stage computation of a 1-stage pipeline); with a
    compressed ``wire_dtype``, as ``num_stages`` stages with that compression between them."""
    if wire_dtype != "fp32" and num_stages > 1:
        return _train_staged(gpt, optim, dataset, seed=seed, steps=steps, micro_batches=micro_batches,
                             micro_batch_size=micro_batch_size, start_step=start_step, wire_dtype=wire_dtype,
                             num_stages=num_stages)
    setup = StageSetup(stage=0, num_stages=1, gpt=gpt, optim=optim, seed=seed, micro_batches=micro_batches,
                       micro_batch_size=micro_batch_size)
    comp = StageComputation.build(setup)
    losses = []
    t0 = time.perf_counter()
    for step in range(start_step, start_step + steps):
        total = 0.0
        for mb in range(micro_batches):
            x, y = setup.batch(dataset, step, mb)  # (B, T) each
            loss, _ = comp.backward(comp.forward(step, mb, x), y)
            total += loss
        comp.update(math.sqrt(comp.grad_sq_norm()), lr_at(step, optim))
        losses.append(total / micro_batches)
    elapsed = time.perf_counter() - t0
    tokens = steps * micro_batches * micro_batch_size * gpt.block_size
    return ReferenceResult(losses=losses,
                           state_dict={k: v.detach().clone() for k, v in comp.module.state_dict().items()},
                           tokens_per_s=tokens / elapsed)


def _train_staged(gpt: GPTConfig, optim: OptimSettings, dataset: Dataset, *, seed: int, steps: int,
                  micro_batches: int, micro_batch_size: int, start_step: int, wire_dtype: str,
                  num_stages: int) -> ReferenceResult:
    """``num_stages`` stage computations in one process, compressed at every boundary as the
    pipeline compresses (``to_wire``), micro-batches in order, the global norm summed in stage order
    as the coordinator sums it."""
    setups = [StageSetup(stage=k, num_stages=num_stages, gpt=gpt, optim=optim, seed=seed,
                         micro_batches=micro_batches, micro_batch_size=micro_batch_size, wire_dtype=wire_dtype)
              for k in range(num_stages)]
    comps = [StageComputation.build(s) for s in setups]
    losses = []
    t0 = time.perf_counter()
    for step in range(start_step, start_step + steps):
        total = 0.0
        for mb in range(micro_batches):
            x, y = setups[0].batch(dataset, step, mb)  # (B, T) each
            passes, wire = [], x
            for comp in comps:
                fwd = comp.forward(step, mb, wire)
                passes.append(fwd)
                wire = to_wire(fwd.output, wire_dtype)  # (B, T, C), compressed; unused after the last
            g = y
            for comp, fwd in zip(reversed(comps), reversed(passes)):
                loss, grad = comp.backward(fwd, g)
                total += loss
                g = to_wire(grad, wire_dtype)  # (B, T, C) compressed, or None from the first stage
        norm = math.sqrt(sum(c.grad_sq_norm() for c in comps))
        for comp in comps:
            comp.update(norm, lr_at(step, optim))
        losses.append(total / micro_batches)
    elapsed = time.perf_counter() - t0
    tokens = steps * micro_batches * micro_batch_size * gpt.block_size
    state = {k: v.detach().clone() for comp in comps for k, v in comp.module.state_dict().items()}
    return ReferenceResult(losses=losses, state_dict=state, tokens_per_s=tokens / elapsed)
