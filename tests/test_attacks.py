"""Misbehaviour for experiments: built-in attacks, gating, user plug-ins."""

from __future__ import annotations

import textwrap

import pytest
import torch

from node import attacks
from node.attacks import (
    AttackContext,
    BackwardNoise,
    BackwardReverse,
    Behaviour,
    ForwardRandom,
    ForwardReverse,
    Gated,
    build,
    load_plugin,
)

CTX = AttackContext(step=3, micro_batch=1, stage=1, node_id="a" * 32)


def activation(seed: int = 0) -> torch.Tensor:
    return torch.randn(4, 16, 32, generator=torch.Generator().manual_seed(seed))  # (B, T, C)


def test_honest_behaviour_passes_tensors_through():
    x = activation()
    assert Behaviour().on_forward(CTX, x) is x
    assert Behaviour().on_backward(CTX, x) is x


def test_forward_reverse_negates_activations_only():
    x = activation()
    assert torch.equal(ForwardReverse().on_forward(CTX, x), -x)
    assert ForwardReverse().on_backward(CTX, x) is x


def test_backward_reverse_negates_gradients_only():
    g = activation()
    assert torch.equal(BackwardReverse().on_backward(CTX, g), -g)
    assert BackwardReverse().on_forward(CTX, g) is g


def test_forward_random_replaces_values_within_the_tensors_range():
    x = activation() * 3 + 1
    out = ForwardRandom().on_forward(CTX, x)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert not torch.allclose(out, x)
    assert float(out.min()) >= float(x.min()) and float(out.max()) <= float(x.max())
    # spread over the range, not a constant
    assert float(out.std()) > 0.2 * float(x.max() - x.min())
    # reproducible per message, different across messages
    assert torch.equal(ForwardRandom().on_forward(CTX, x), out)
    other = AttackContext(step=3, micro_batch=2, stage=1, node_id="a" * 32)
    assert not torch.equal(ForwardRandom().on_forward(other, x), out)
    assert ForwardRandom().on_backward(CTX, x) is x


@pytest.mark.parametrize("std", [1.0, 0.01])
def test_backward_noise_adds_gaussian_noise_to_gradients(std):
    g = activation() * 1e-3
    out = BackwardNoise(std).on_backward(CTX, g)
    noise = out - g
    assert out.shape == g.shape
    assert abs(float(noise.mean())) < 0.1 * std
    assert float(noise.std()) == pytest.approx(std, rel=0.1)
    assert BackwardNoise(std).on_forward(CTX, g) is g


def _fires(gated: Gated, step: int, mb: int) -> bool:
    x = activation()
    return gated.on_forward(AttackContext(step, mb, 1, "a" * 32), x) is not x


def test_gated_rate_zero_never_fires_and_rate_one_always_does():
    never = Gated(ForwardReverse(), rate=0.0, start_step=0, seed=1)
    always = Gated(ForwardReverse(), rate=1.0, start_step=0, seed=1)
    pairs = [(s, m) for s in range(10) for m in range(8)]
    assert not any(_fires(never, s, m) for s, m in pairs)
    assert all(_fires(always, s, m) for s, m in pairs)
    assert never.fired == 0 and always.fired == len(pairs)


def test_gated_respects_start_step():
    gated = Gated(ForwardReverse(), rate=1.0, start_step=5, seed=1)
    assert [_fires(gated, s, 0) for s in range(8)] == [False] * 5 + [True] * 3


def test_gated_rate_is_a_probability_and_reproducible():
    pattern = [_fires(Gated(ForwardReverse(), 0.3, 0, seed=7), s, m) for s in range(40) for m in range(10)]
    again = [_fires(Gated(ForwardReverse(), 0.3, 0, seed=7), s, m) for s in range(40) for m in range(10)]
    other_seed = [_fires(Gated(ForwardReverse(), 0.3, 0, seed=8), s, m) for s in range(40) for m in range(10)]
    assert pattern == again
    assert pattern != other_seed
    assert 0.22 < sum(pattern) / len(pattern) < 0.38


def test_build_chains_configured_behaviours():
    chain = build(["forward:reverse", "backward:noise"], rate=1.0, start_step=0, noise_std=0.5, plugin="", seed=1)
    x = activation()
    assert torch.equal(chain.on_forward(CTX, x), -x)
    assert float((chain.on_backward(CTX, x) - x).std()) == pytest.approx(0.5, rel=0.1)
    assert chain.fired == 2
    assert chain.name == "forward:reverse+backward:noise"
    honest = build([], rate=1.0, start_step=0, noise_std=1.0, plugin="", seed=1)
    assert honest.name == "honest" and honest.on_forward(CTX, x) is x


PLUGINS = {
    "subclass": """
        from node.attacks import Behaviour

        class ScaleUp(Behaviour):
            def on_forward(self, ctx, activation):
                return activation * 10 if ctx.step >= 2 else activation
    """,
    "duck-typed": """
        class ScaleUp:
            def on_forward(self, ctx, activation):
                return activation * 10 if ctx.step >= 2 else activation
    """,
    "dataclass with postponed annotations": """
        from __future__ import annotations
        from dataclasses import dataclass

        @dataclass
        class ScaleUp:
            factor: float = 10.0

            def on_forward(self, ctx, activation):
                return activation * self.factor if ctx.step >= 2 else activation
    """,
}


@pytest.mark.parametrize("kind", sorted(PLUGINS))
def test_plugin_from_a_file_is_loaded_and_used(tmp_path, kind):
    path = tmp_path / "my_attack.py"
    path.write_text(textwrap.dedent(PLUGINS[kind]))
    plugin = load_plugin(f"{path}:ScaleUp")
    x = activation()
    assert torch.equal(plugin.on_forward(CTX, x), x * 10)
    assert plugin.on_backward(CTX, x) is x, "a missing hook is honest"

    chain = build([], rate=1.0, start_step=0, noise_std=1.0, plugin=f"{path}:ScaleUp", seed=1)
    early = AttackContext(step=1, micro_batch=0, stage=1, node_id="a" * 32)
    assert chain.on_forward(early, x) is x
    assert torch.equal(chain.on_forward(CTX, x), x * 10)
    assert chain.fired == 1


@pytest.mark.parametrize(
    "source, spec, fragment",
    [
        (None, "{dir}/missing.py:ScaleUp", "does not exist"),
        ("class Other: pass\n", "{path}:ScaleUp", "has no class 'ScaleUp'"),
        ("class ScaleUp:\n    pass\n", "{path}:ScaleUp", "defines none of on_forward, on_backward, on_verdict"),
    ],
)
def test_bad_plugin_specs_give_clear_errors(tmp_path, source, spec, fragment):
    path = tmp_path / "plug.py"
    if source is not None:
        path.write_text(source)
    with pytest.raises(ValueError, match=fragment):
        load_plugin(spec.format(dir=tmp_path, path=path))


def test_builtins_are_documented_in_the_module_docstring():
    for name in attacks.BUILTINS:
        assert f"``{name}``" in attacks.__doc__, f"{name} is not listed in node/attacks.py's docstring"
