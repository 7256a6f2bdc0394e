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

from pipeguard.data import Dataset
from pipeguard.model import GPT, GPTConfig, OptimSettings, Randomness, clip_and_step, grad_sq_norm, lr_at, make_optimizer


@dataclass
class ReferenceResult:
    losses: list[float]
    state_dict: dict[str, torch.Tensor]
    tokens_per_s: float


def train_reference(gpt: GPTConfig, optim: OptimSettings, dataset: Dataset, *, seed: int, steps: int,
                    micro_batches: int, micro_batch_size: int, start_step: int = 0) -> ReferenceResult:
    model = GPT(gpt, seed)
    opt = make_optimizer(model, optim)
    losses = []
    t0 = time.perf_counter()
    for step in range(start_step, start_step + steps):
        total = 0.0
        for mb in range(micro_batches):
            x, y = dataset.batch(seed, step, mb, micro_batch_size, gpt.block_size)  # (B, T) each
            logits = model(x, Randomness(seed, step, mb))  # (B, T, vocab)
            loss = GPT.loss(logits, y)
            total += float(loss.detach())
            (loss / micro_batches).backward()
        norm = math.sqrt(grad_sq_norm(model))
        clip_and_step(model, opt, norm, lr_at(step, optim), optim.grad_clip)
        losses.append(total / micro_batches)
    elapsed = time.perf_counter() - t0
    tokens = steps * micro_batches * micro_batch_size * gpt.block_size
    return ReferenceResult(losses=losses, state_dict={k: v.detach().clone() for k, v in model.state_dict().items()},
                           tokens_per_s=tokens / elapsed)
