"""The proof that the pipeline is right: distributed training == single-process training."""

from __future__ import annotations

import pytest
import torch

from pipeguard.data import stdlib_corpus
from pipeguard.model import GPTConfig, OptimSettings
from pipeguard.reference import train_reference
from tests.conftest import tiny_run

pytestmark = pytest.mark.multiprocess

STEPS = 5


def test_three_stage_pipeline_matches_single_process(testnet):
    net = testnet(tiny_run({"pipeline.stages": 3, "train.steps": STEPS, "train.micro_batches": 4, "train.seed": 7, "model.n_layer": 3}))
    net.start_coordinator()
    for _ in range(3):
        net.start_node()
    status = net.wait_finished(timeout=120)
    state = net.export_state()

    gpt = GPTConfig(block_size=32, n_layer=3, n_head=2, n_embd=32)
    optim = OptimSettings(lr=3e-3, warmup_steps=2, total_steps=STEPS)
    torch.set_num_threads(1)
    ref = train_reference(gpt, optim, stdlib_corpus(262144), seed=7, steps=STEPS, micro_batches=4,
                          micro_batch_size=4)

    losses = [p.loss for p in status.losses]
    assert [p.step for p in status.losses] == list(range(STEPS))
    torch.testing.assert_close(losses, ref.losses, rtol=1e-5, atol=1e-6)
    assert set(state) == set(ref.state_dict)
    for name, expected in ref.state_dict.items():
        torch.testing.assert_close(state[name], expected, rtol=1e-5, atol=1e-6, msg=f"parameter {name}")
    # training moved the weights: a pipeline that never applied updates would fail above too
    assert losses[-1] < losses[0]
