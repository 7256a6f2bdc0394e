"""Misbehaviour for experiments: built-in attacks, gating, user plug-ins.

Each behaviour's effect on the message it tampers with, on real tensors, with real signatures
(``pipeguard.tensors``' sender and receiver) and a real stage module and optimizer.
"""

from __future__ import annotations

import asyncio
import math
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

pytestmark = pytest.mark.unit

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


# -- every built-in, one by one -------------------------------------------------------------------

from pipeguard.errors import PipeguardError  # noqa: E402
from pipeguard.identity import Identity  # noqa: E402
from pipeguard.model import GPTConfig, OptimSettings, Randomness, StageModule, clip_and_step, make_optimizer, \
    named_state, partition  # noqa: E402
from pipeguard.tensors import TensorSender, make_header, receive_tensor, state_digest, tensor_digest  # noqa: E402
from pipeguard.v1 import pipeguard_pb2 as pb  # noqa: E402

SENDER = Identity.generate()
RECEIVER = Identity.generate()


def ctx_at(step: int, mb: int = 1, direction: int = pb.DIRECTION_FORWARD, peer: str = "", signer=None):
    return AttackContext(step, mb, 1, SENDER.node_id, direction, peer, signer)


def builtin(name: str, **params) -> Behaviour:
    return attacks.BUILTINS[name](attacks.Params(**params))


def test_every_builtin_builds_from_the_config_surface():
    from node.config import AttackConfig

    cfg = AttackConfig(behaviours=sorted(attacks.BUILTINS), rate=0.5, start_step=1, stop_step=4, micro_batches=[0, 2],
                       accomplices=["b" * 32])
    chain = attacks.from_config(cfg, seed=3)
    assert [p.name for p in chain.parts] == sorted(attacks.BUILTINS)
    assert all(p.stop_step == 4 and p.micro_batches == {0, 2} for p in chain.parts)
    expected = {"forward:reverse", "forward:random", "forward:noise", "forward:scale", "forward:zero",
                "forward:sign-flip", "forward:constant-direction", "forward:stale", "wire:bad-signature",
                "wire:replay", "wire:equivocate", "state:false-commitment", "update:skip", "update:poison",
                "audit:accuse", "audit:clear", "node:silent", "node:slow"}
    assert expected <= set(attacks.BUILTINS)
    assert {k.replace("forward:", "backward:") for k in expected if k.startswith("forward:")} <= set(attacks.BUILTINS)


@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_tensor_attacks_touch_only_their_direction(direction):
    x = activation()
    other = "backward" if direction == "forward" else "forward"
    for kind in attacks.TENSOR_KINDS:
        b = builtin(f"{direction}:{kind}")
        hook, untouched = (b.on_forward, b.on_backward) if direction == "forward" else (b.on_backward, b.on_forward)
        assert untouched(CTX, x) is x, f"{direction}:{kind} touched the {other} direction"
        if kind != "stale":  # stale needs an earlier step first
            out = hook(CTX, x)
            assert out.shape == x.shape and out.dtype == x.dtype and not torch.equal(out, x), kind


@pytest.mark.parametrize("k", [10.0, -0.5])
def test_scale_multiplies_by_k_exactly(k):
    x = activation()
    assert torch.equal(builtin("forward:scale", scale=k).on_forward(CTX, x), x * k)
    assert torch.equal(builtin("backward:scale", scale=k).on_backward(CTX, x), x * k)


def test_zero_sends_zeros():
    out = builtin("backward:zero").on_backward(CTX, activation())
    assert torch.equal(out, torch.zeros(4, 16, 32))


@pytest.mark.parametrize("fraction", [0.1, 0.5, 1.0])
def test_sign_flip_flips_about_a_fraction_of_elements_and_nothing_else(fraction):
    x = activation()
    b = builtin("forward:sign-flip", fraction=fraction)
    out = b.on_forward(CTX, x)
    flipped = out != x
    assert torch.equal(out[flipped], -x[flipped]), "changed elements are exactly negated"
    assert torch.equal(out[~flipped], x[~flipped])
    assert float(flipped.float().mean()) == pytest.approx(fraction, abs=0.02)
    assert torch.equal(b.on_forward(CTX, x), out), "reproducible per message"
    if fraction < 1:
        assert not torch.equal(b.on_forward(ctx_at(3, mb=2), x), out), "a new choice for another message"


def test_constant_direction_pushes_every_message_along_one_direction():
    b = builtin("forward:constant-direction", seed=5)
    pushes = []
    for step, seed in [(0, 1), (1, 2), (7, 3)]:
        x = activation(seed)
        out = b.on_forward(ctx_at(step, mb=step % 3), x)
        push = (out - x).double()
        # the push is as long as the message itself ...
        assert float(torch.linalg.vector_norm(push)) == pytest.approx(float(torch.linalg.vector_norm(x)), rel=1e-5)
        pushes.append(push / torch.linalg.vector_norm(push))
    # ... and points the same way every time
    for p in pushes[1:]:
        assert float((p * pushes[0]).sum()) == pytest.approx(1.0, abs=1e-5)
    # another seed, another direction
    other = builtin("forward:constant-direction", seed=6).unit(torch.Size([4, 16, 32]))
    assert abs(float((other * pushes[0]).sum())) < 0.1


def test_stale_resends_an_earlier_steps_output():
    b = builtin("forward:stale")
    x0, x1, x2 = activation(0), activation(1), activation(2)
    assert torch.equal(b.on_forward(ctx_at(0), x0), x0), "nothing earlier at the first step"
    assert torch.equal(b.on_forward(ctx_at(1), x1), x0)
    assert torch.equal(b.on_forward(ctx_at(2), x2), x1)
    assert torch.equal(b.on_forward(ctx_at(2), x2), x1), "and again when the step is retried"
    other_mb = activation(9)
    assert torch.equal(b.on_forward(ctx_at(2, mb=0), other_mb), other_mb), "per micro-batch memory"
    # after a rollback to step 0 nothing it holds is earlier: honest until it is
    again = activation(3)
    assert torch.equal(b.on_forward(ctx_at(0), again), again)


@pytest.mark.parametrize("direction", ["forward", "backward"])
@pytest.mark.parametrize("noise_scale", [0.05, 1.0])
def test_relative_noise_has_the_configured_std(direction, noise_scale):
    x = activation() * 3.0
    b = builtin(f"{direction}:noise", noise_scale=noise_scale)
    out = (b.on_forward if direction == "forward" else b.on_backward)(CTX, x)
    noise = out - x
    assert float(noise.std()) == pytest.approx(noise_scale * float(x.std()), rel=0.05)
    assert abs(float(noise.mean())) < 0.05 * noise_scale * float(x.std())


def test_absolute_noise_on_activations_uses_noise_std():
    x = activation() * 1e-3
    out = builtin("forward:noise", noise_std=0.5).on_forward(CTX, x)
    assert float((out - x).std()) == pytest.approx(0.5, rel=0.05)


# -- the wire -------------------------------------------------------------------------------------


def signed_stream(step: int, mb: int = 1, seed: int = 0):
    t = activation(seed)
    header = make_header(run_id="run", step=step, micro_batch=mb, stage=1, direction=pb.DIRECTION_FORWARD,
                         sender=SENDER.node_id, receiver=RECEIVER.node_id, tensor=t)
    sender = TensorSender(header, t, SENDER, chunk_bytes=2048)
    return t, list(sender.chunks())


def receive(chunks):
    async def it():
        for c in chunks:
            yield c

    return asyncio.run(receive_tensor(it(), max_tensor_bytes=1 << 24, admit=lambda h: SENDER.public()))


def test_bad_signature_stream_fails_the_real_verifier():
    t, chunks = signed_stream(3)
    assert torch.equal(receive(chunks).tensor, t), "the honest stream verifies"
    bad = builtin("wire:bad-signature").on_send(ctx_at(3), chunks)
    assert len(bad) == len(chunks) and [c.signature for c in bad] == [c.signature for c in chunks]
    assert sum(a.data != b.data for a, b in zip(bad, chunks)) == 1, "one payload byte differs"
    with pytest.raises(PipeguardError) as err:
        receive(bad)
    assert err.value.code.name in ("DATA_LOSS", "UNAUTHENTICATED"), err.value
    assert torch.equal(receive(chunks).tensor, t), "the original stream is untouched"


def test_replay_sends_an_earlier_valid_stream():
    b = builtin("wire:replay")
    _, first = signed_stream(2, seed=0)
    assert b.on_send(ctx_at(2), first) is first, "nothing to replay at the first step"
    _, second = signed_stream(3, seed=1)
    replayed = b.on_send(ctx_at(3), second)
    assert replayed is first
    assert b.on_send(ctx_at(3), second) is first, "and again when the step is retried"
    rt = receive(replayed)  # a valid signature ...
    assert rt.commitment.header.step == 2, "... on the earlier step's header, which admission refuses"
    _, other_mb = signed_stream(3, mb=0, seed=2)
    assert b.on_send(ctx_at(3, mb=0), other_mb) is other_mb, "per micro-batch memory"


def test_equivocate_serves_a_different_validly_signed_tensor_for_sent_ones():
    from pipeguard.signing import verify

    t, chunks = signed_stream(3)
    honest = receive(chunks).commitment
    b = builtin("wire:equivocate")
    ctx = ctx_at(3, peer="c" * 32, signer=SENDER)
    commitment, served = b.on_serve_tensor(ctx, honest, t, sent=True)
    assert torch.equal(served, -t)
    assert commitment.header == honest.header and commitment.payload_digest != honest.payload_digest
    assert commitment.payload_digest == tensor_digest(served)
    verify(commitment, SENDER.public(), what="equivocated commitment")  # really signed: proof against it
    verify(honest, SENDER.public(), what="honest commitment")
    assert b.on_serve_tensor(ctx, honest, t, sent=False) == (honest, t), "received tensors are served as is"


def test_switch_attempt_sends_another_input_fails_the_attempt_and_serves_its_gradient():
    b = builtin("forward:switch-attempt")
    x = activation()
    assert torch.equal(b.on_forward(ctx_at(3), x), -x), "the first attempt gets input A"
    grad_a = torch.ones(2)
    b.on_receive(ctx_at(3, mb=1, direction=pb.DIRECTION_BACKWARD), "commitment A", grad_a)
    with pytest.raises(PipeguardError, match="on purpose"):
        b.on_backward(ctx_at(3, direction=pb.DIRECTION_BACKWARD), torch.zeros(2))
    assert torch.equal(b.on_forward(ctx_at(3), x), x), "the retry gets input B (honest)"
    g = torch.zeros(2)
    assert b.on_backward(ctx_at(3, direction=pb.DIRECTION_BACKWARD), g) is g, "and completes"
    b.on_receive(ctx_at(3, mb=1, direction=pb.DIRECTION_BACKWARD), "commitment B", g)
    served = b.on_serve_tensor(ctx_at(3, mb=1, direction=pb.DIRECTION_BACKWARD), "commitment B", g, sent=False)
    assert served == ("commitment A", grad_a), "auditors get the failed attempt's gradient"
    assert b.on_serve_tensor(ctx_at(3, mb=1, direction=pb.DIRECTION_BACKWARD), "mine", g, sent=True) == ("mine", g)


# -- state and updates ----------------------------------------------------------------------------

GPT = GPTConfig(block_size=16, n_layer=2, n_head=2, n_embd=16)


def stage_after_backward():
    spec = partition(GPT, 2)[0]
    module = StageModule(GPT, spec, seed=1)
    opt = make_optimizer(module, OptimSettings(lr=1e-2, warmup_steps=0, total_steps=10))
    x = torch.randint(0, GPT.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    module(x, Randomness(1, 0, 0)).pow(2).mean().backward()
    before = {n: t.clone() for n, t in named_state(module, opt)}
    return module, opt, before


def honest_step(module, opt):
    norm = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in module.parameters() if p.grad is not None))
    clip_and_step(module, opt, norm, 1e-2, 1.0)


def test_false_commitment_serves_auditors_another_state_and_the_coordinator_the_committed_one():
    module, opt, before = stage_after_backward()
    digest = state_digest(before.items())
    b = builtin("state:false-commitment")
    named, d = b.on_serve_state(ctx_at(3, peer=""), before, digest)
    assert named is before and d == digest
    named, d = b.on_serve_state(ctx_at(3, peer="c" * 32), before, digest)
    assert d != digest and d == state_digest(named.items()), "the attestation would sign what is served"
    changed = [n for n in named if not torch.equal(named[n], before[n])]
    assert len(changed) == 1 and changed[0].startswith("param/")


def test_update_skip_leaves_weights_and_optimizer_state_as_before_the_step():
    module, opt, before = stage_after_backward()
    honest_step(module, opt)
    assert state_digest(named_state(module, opt)) != state_digest(before.items())
    builtin("update:skip").on_update(ctx_at(3, mb=-1), module, opt, before)
    assert state_digest(named_state(module, opt)) == state_digest(before.items())


def test_update_poison_perturbs_the_stepped_weights():
    module, opt, before = stage_after_backward()
    honest_step(module, opt)
    stepped = {n: t.clone() for n, t in named_state(module, opt)}
    builtin("update:poison").on_update(ctx_at(3, mb=-1), module, opt, before)
    after = dict(named_state(module, opt))
    params = [n for n in stepped if n.startswith("param/")]
    assert all(not torch.equal(after[n], stepped[n]) for n in params)
    assert all(torch.isfinite(after[n]).all() for n in params)
    # far beyond any tolerance: the poison is 10x bigger than 1e-3 of the update in relative L2
    update = sum(float((stepped[n] - before[n]).pow(2).sum()) for n in params)
    poison = sum(float((after[n] - stepped[n]).pow(2).sum()) for n in params)
    assert math.sqrt(poison / update) > 10 * 1e-3


# -- auditors --------------------------------------------------------------------------------------


def verdict(kind: int) -> pb.AuditVerdict:
    return pb.AuditVerdict(run_id="run", audit_id=1, auditor=SENDER.node_id, verdict=kind, deviation=2.0,
                           detail="forward activation deviates")


def test_audit_clear_passes_its_accomplices_only():
    accomplice, stranger = "b" * 32, "c" * 32
    b = builtin("audit:clear", accomplices=(accomplice,))
    cleared = b.on_verdict(ctx_at(3, peer=accomplice), verdict(pb.VERDICT_FAIL))
    assert cleared.verdict == pb.VERDICT_PASS and cleared.deviation == 0.0
    assert b.on_verdict(ctx_at(3, peer=stranger), verdict(pb.VERDICT_FAIL)).verdict == pb.VERDICT_FAIL
    everyone = builtin("audit:clear")
    assert everyone.on_verdict(ctx_at(3, peer=stranger), verdict(pb.VERDICT_FAIL)).verdict == pb.VERDICT_PASS


def test_audit_accuse_fails_honest_work():
    assert builtin("audit:accuse").on_verdict(ctx_at(3), verdict(pb.VERDICT_PASS)).verdict == pb.VERDICT_FAIL


# -- timing ----------------------------------------------------------------------------------------


def test_silent_blocks_from_its_first_send_on_and_can_be_cancelled():
    gated = Gated(builtin("node:silent"), rate=1.0, start_step=2, seed=1, stop_step=3)

    async def scenario():
        await asyncio.wait_for(gated.pause(ctx_at(1), "send"), 1.0)  # before start_step: returns
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(gated.pause(ctx_at(2), "send"), 0.2)
        # latched: silent for everything after, even outside its gate
        for what in ("heartbeat", "rpc"):
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(gated.pause(ctx_at(9, mb=-1), what), 0.2)

    asyncio.run(scenario())


def test_silent_is_triggered_by_sends_only():
    b = builtin("node:silent")

    async def scenario():
        await asyncio.wait_for(b.pause(ctx_at(2), "heartbeat"), 1.0)
        await asyncio.wait_for(b.pause(ctx_at(2), "rpc"), 1.0)
        assert not b.latched

    asyncio.run(scenario())


def test_slow_delays_sends_only():
    b = builtin("node:slow", delay=30.0)

    async def scenario():
        await asyncio.wait_for(b.pause(ctx_at(2), "rpc"), 5.0)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(b.pause(ctx_at(2), "send"), 0.2)

    asyncio.run(scenario())


# -- gating ---------------------------------------------------------------------------------------


def test_gated_respects_stop_step():
    gated = Gated(ForwardReverse(), rate=1.0, start_step=2, seed=1, stop_step=5)
    assert [_fires(gated, s, 0) for s in range(7)] == [False, False, True, True, True, False, False]


def test_gated_targets_only_the_configured_micro_batches():
    gated = Gated(builtin("forward:scale"), rate=1.0, start_step=0, seed=1, micro_batches=[0, 2])
    assert [_fires(gated, 3, m) for m in range(4)] == [True, False, True, False]


def test_gating_applies_to_every_hook():
    ctx_off = ctx_at(9, mb=1, peer="c" * 32, signer=SENDER)  # outside stop_step
    t, chunks = signed_stream(9)
    honest_commitment = receive(chunks).commitment
    for name in attacks.BUILTINS:
        gated = Gated(builtin(name), rate=1.0, start_step=0, seed=1, stop_step=5)
        x = activation()
        assert gated.on_forward(ctx_off, x) is x and gated.on_backward(ctx_off, x) is x, name
        assert gated.on_send(ctx_off, chunks) is chunks, name
        assert gated.on_serve_tensor(ctx_off, honest_commitment, t, True) == (honest_commitment, t), name
        v = verdict(pb.VERDICT_FAIL)
        assert gated.on_verdict(ctx_off, v).verdict == pb.VERDICT_FAIL, name
        asyncio.run(asyncio.wait_for(gated.pause(ctx_off, "send"), 5.0))
        assert gated.fired == 0, name


def test_plugin_with_protocol_hooks_is_gated_like_a_builtin(tmp_path):
    path = tmp_path / "replayer.py"
    path.write_text(textwrap.dedent("""
        from node.attacks import Behaviour

        class DropLastChunk(Behaviour):
            def on_send(self, ctx, chunks):
                return chunks[:-1]
    """))
    chain = build([], rate=1.0, start_step=4, noise_std=1.0, plugin=f"{path}:DropLastChunk", seed=1)
    assert attacks.overrides(chain, "on_send") and not attacks.overrides(chain, "on_serve_state")
    _, chunks = signed_stream(3)
    assert chain.on_send(ctx_at(3), chunks) is chunks
    assert len(chain.on_send(ctx_at(4), chunks)) == len(chunks) - 1
    assert not attacks.overrides(build([], 1.0, 0, 1.0, "", 1), "on_forward"), "honest nodes skip the hooks"
