"""Single-process training of the same model, seed and micro-batching: the yardstick.

The distributed pipeline must reproduce this: same losses and final parameters within a
tight tolerance (tests/test_pipeline_correctness.py), and its throughput is measured against
this (benchmarks/pipeline_efficiency.py).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from pipeguard.computation import StageComputation, StageSetup
from pipeguard.data import Dataset
from pipeguard.model import GPTConfig, OptimSettings, lr_at


@dataclass
class ReferenceResult:
    losses: list[float]
    state_dict: dict[str, torch.Tensor]
    tokens_per_s: float


def train_reference(gpt: GPTConfig, optim: OptimSettings, dataset: Dataset, *, seed: int, steps: int,
                    micro_batches: int, micro_batch_size: int, start_step: int = 0) -> ReferenceResult:
    """Train the whole model as one stage (the stage computation of a 1-stage pipeline)."""
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
