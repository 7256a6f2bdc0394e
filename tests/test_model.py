"""The GPT and its pipeline stages: partitioning, equivalence with the whole model, dropout."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeguard.model import GPT, GPTConfig, Randomness, StageModule, partition, preset

pytestmark = pytest.mark.unit

CFG = GPTConfig(block_size=16, vocab_size=256, n_layer=5, n_head=2, n_embd=16)


@settings(max_examples=200, deadline=None)
@given(n_layer=st.integers(1, 48), num_stages=st.integers(1, 48))
def test_partition_is_contiguous_complete_and_balanced(n_layer, num_stages):
    cfg = GPTConfig(n_layer=n_layer, n_head=1, n_embd=8)
    if num_stages > n_layer:
        with pytest.raises(ValueError, match=f"use at most {n_layer} stages"):
            partition(cfg, num_stages)
        return
    specs = partition(cfg, num_stages)
    assert [s.index for s in specs] == list(range(num_stages))
    assert all(s.num_stages == num_stages for s in specs)
    assert specs[0].first_block == 0 and specs[-1].last_block == n_layer
    for a, b in zip(specs, specs[1:]):
        assert a.last_block == b.first_block, "stages are contiguous"
    sizes = [len(s.blocks) for s in specs]
    assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1, f"unbalanced: {sizes}"
    assert sizes == sorted(sizes, reverse=True), "earlier stages take the remainder"
    assert [s.has_embedding for s in specs] == [True] + [False] * (num_stages - 1)
    assert [s.has_head for s in specs] == [False] * (num_stages - 1) + [True]
    assert partition(cfg, num_stages) == specs, "a pure function of its arguments"


def test_partition_refuses_zero_stages():
    with pytest.raises(ValueError, match=">= 1"):
        partition(CFG, 0)


def _chain(stages, x, rng=None):
    for s in stages:
        x = s(x, rng)
    return x


def _stages(cfg, n, seed):
    return [StageModule(cfg, spec, seed) for spec in partition(cfg, n)]


def _tokens(cfg, batch=3, seed=0):
    return torch.randint(0, cfg.vocab_size, (batch, cfg.block_size), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("num_stages", [1, 2, 3, 5])
def test_stage_modules_chained_equal_the_whole_model(num_stages):
    gpt = GPT(CFG, seed=11)
    stages = _stages(CFG, num_stages, seed=11)
    idx = _tokens(CFG)
    with torch.no_grad():
        expected = gpt(idx)  # (B, T, vocab)
        got = _chain(stages, idx)
    assert got.shape == (3, CFG.block_size, CFG.vocab_size)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_stage_gradients_equal_the_whole_model():
    gpt = GPT(CFG, seed=5)
    stages = _stages(CFG, 3, seed=5)
    idx = _tokens(CFG)
    targets = _tokens(CFG, seed=1)
    StageModule.loss(gpt(idx), targets).backward()
    StageModule.loss(_chain(stages, idx), targets).backward()
    grads = {n: p.grad for s in stages for n, p in s.named_parameters()}
    for name, p in gpt.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize("num_stages", [2, 3, 5])
def test_stage_state_dicts_merge_into_the_models(num_stages):
    gpt = GPT(CFG, seed=3)
    merged = {}
    for s in _stages(CFG, num_stages, seed=3):
        sd = s.state_dict()
        assert not set(sd) & set(merged), "stages never share a parameter"
        merged.update(sd)
    expected = gpt.state_dict()
    assert set(merged) == set(expected)
    for name, t in expected.items():
        assert torch.equal(merged[name], t), name
    # and they load into a fresh model
    fresh = GPT(CFG, seed=4)
    fresh.load_state_dict(merged)


def test_seed_changes_the_weights():
    a, b = GPT(CFG, seed=1).state_dict(), GPT(CFG, seed=2).state_dict()
    assert not torch.equal(a["blocks.0.attn.c_attn.weight"], b["blocks.0.attn.c_attn.weight"])


def test_dropout_masks_are_a_function_of_seed_step_and_micro_batch():
    cfg = GPTConfig(block_size=16, n_layer=3, n_head=2, n_embd=16, dropout=0.2)
    gpt = GPT(cfg, seed=9)
    idx = _tokens(cfg)
    with torch.no_grad():
        base = gpt(idx, Randomness(seed=9, step=4, micro_batch=1))
        again = gpt(idx, Randomness(seed=9, step=4, micro_batch=1))
        other_mb = gpt(idx, Randomness(seed=9, step=4, micro_batch=2))
        other_step = gpt(idx, Randomness(seed=9, step=5, micro_batch=1))
        other_seed = gpt(idx, Randomness(seed=10, step=4, micro_batch=1))
        no_dropout = gpt(idx)
        # a pipeline draws the same masks as the whole model: they depend on the layer, not the stage
        staged = _chain(_stages(cfg, 3, seed=9), idx, Randomness(seed=9, step=4, micro_batch=1))
    torch.testing.assert_close(again, base, rtol=0, atol=0)
    torch.testing.assert_close(staged, base, rtol=0, atol=0)
    for name, out in [("micro-batch", other_mb), ("step", other_step), ("seed", other_seed), ("none", no_dropout)]:
        assert not torch.equal(out, base), f"changing the {name} must change the dropout masks"


def test_config_errors_say_what_to_fix():
    with pytest.raises(ValueError, match="divisible by n_head"):
        GPTConfig(n_embd=10, n_head=3)
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\)"):
        GPTConfig(dropout=1.0)
    with pytest.raises(ValueError, match="n_layer must be >= 1"):
        GPTConfig(n_layer=0)
    with pytest.raises(ValueError, match="choose one of"):
        preset("huge")
