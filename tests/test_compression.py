"""Wire compression: each wire dtype's error bound, determinism, the int8 layout's checks, audits
of compressed outputs, attacks on a compressed wire, and fp32 staying byte for byte what it was."""

from __future__ import annotations

import asyncio
import hashlib
import math

import pytest
import torch

from node.attacks import Reverse
from node.seams import Seams
from pipeguard import compression
from pipeguard.audit import wire_deviation
from pipeguard.compression import BLOCK, Packed, compress, decompress, quantum, validate
from pipeguard.computation import StageComputation, StageSetup, to_wire, train_spec
from pipeguard.data import Dataset
from pipeguard.errors import DataLoss, InvalidArgument, ResourceExhausted
from pipeguard.identity import Identity
from pipeguard.model import GPTConfig, OptimSettings
from pipeguard.tensors import TensorSender, make_header, payload_nbytes, receive_tensor, tensor_bytes, tensor_digest
from pipeguard.v1 import pipeguard_pb2 as pb

pytestmark = pytest.mark.unit

WIRES = ["fp32", "fp16", "bf16", "int8"]
GPT = GPTConfig(block_size=8, vocab_size=256, n_layer=2, n_head=2, n_embd=16)
OPTIM = OptimSettings(lr=1e-3, warmup_steps=2, total_steps=10)


def activation(seed: int = 14, shape=(2, 8, 16), dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype) * 3


def payload(w) -> bytes:
    """The bytes a wire tensor travels as (what is signed)."""
    return bytes(tensor_bytes(w))


# -- fp32 is what it was -------------------------------------------------------------------------


def test_fp32_wire_is_byte_identical_to_before_compression_existed():
    """Digests computed on main before wire dtypes existed: the same tensor, the same signed bytes;
    the default train spec serialises as before (so every assignment and audit-order digest too)."""
    t = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(14), dtype=torch.float64)
    w = to_wire(t)
    assert w.dtype == torch.float32 and to_wire(t, "fp32").dtype == torch.float32
    assert tensor_digest(w).hex() == "5ea582b9d79a727a0136383312f8ff20f480d2c1ea5816d404417a66235678c7"
    assert tensor_digest(w, pb.DIGEST_ALGORITHM_SHA256).hex() == \
        "807b58dba39b92dfcd1fa159b3243c3b770d74c1bcbd0166e04d6021c5da4c85"
    spec = train_spec(OPTIM, seed=5, micro_batches=2, micro_batch_size=4)
    assert hashlib.sha256(spec.SerializeToString(deterministic=True)).hexdigest() == \
        "c69f2fbc277d97c7b87db5623477cf5ced2b4e0fc7ec478760afb6260002b4d9"
    assert spec.wire_dtype == "" and train_spec(OPTIM, seed=5, micro_batches=2, micro_batch_size=4,
                                                wire_dtype="int8").wire_dtype == "int8"
    # a float32 CPU tensor goes out as itself, no copy
    x = activation()
    assert to_wire(x).data_ptr() == x.data_ptr()


def test_unset_wire_dtype_in_an_order_means_fp32_and_unknown_ones_are_refused():
    base = dict(seed=5, micro_batches=2, micro_batch_size=4)
    assert StageSetup.from_specs(pb.ModelSpec(block_size=8, vocab_size=256, n_layer=2, n_head=2, n_embd=16),
                                 train_spec(OPTIM, **base), 0, 2).wire_dtype == "fp32"
    with pytest.raises(InvalidArgument, match="wire_dtype must be one of"):
        StageSetup.from_specs(pb.ModelSpec(block_size=8, vocab_size=256, n_layer=2, n_head=2, n_embd=16),
                              pb.TrainSpec(wire_dtype="int4", micro_batches=2, micro_batch_size=4), 0, 2)


# -- round trips ---------------------------------------------------------------------------------


@pytest.mark.parametrize("wire", WIRES)
def test_each_wire_dtype_round_trips_within_its_documented_bound(wire):
    x = activation(shape=(3, 7, 50))  # 1050 elements: the last int8 block is short
    w = compress(x, wire)
    y = decompress(w)
    assert y.dtype == torch.float32 and y.shape == x.shape
    err = (y.double() - x.double()).abs()
    if wire == "fp32":
        assert torch.equal(y, x)
        return
    q = quantum(w)
    assert bool((err <= q / 2).all()), f"{wire}: an element is off by more than half a quantum"
    if wire == "fp16":
        assert float((err / x.double().abs()).max()) <= 2.0 ** -11
    elif wire == "bf16":
        assert float((err / x.double().abs()).max()) <= 2.0 ** -8
    else:
        flat = x.double().reshape(-1)
        for start in range(0, flat.numel(), BLOCK):  # |x - q s| <= s / 2 <= m / 127 per block
            m = float(flat[start:start + BLOCK].abs().max())
            assert float(err.reshape(-1)[start:start + BLOCK].max()) <= m / 127
        assert w.nbytes == 4 * math.ceil(1050 / BLOCK) + 1050 == payload_nbytes(pb.DTYPE_INT8_BLOCK64, list(x.shape))


@pytest.mark.parametrize("wire", WIRES)
def test_compression_is_deterministic_and_blind_to_memory_layout(wire):
    x = activation(shape=(4, 8, 64))
    strided = x.transpose(0, 2).contiguous().transpose(0, 2)  # the same values, another layout
    assert not strided.is_contiguous()
    first, again, other = compress(x, wire), compress(x.clone(), wire), compress(strided, wire)
    assert payload(first) == payload(again) == payload(other)
    assert tensor_digest(first) == tensor_digest(other)
    # idempotent: what a receiver decodes encodes to the very bytes that were signed
    assert payload(compress(decompress(first), wire)) == payload(first)
    assert payload(compress(x.double(), wire)) == payload(first), "read as float32 whatever comes in"


def test_int8_layout_is_the_documented_one():
    """Scales (float32, powers of two) then codes, value = code x scale, half to even."""
    x = torch.zeros(BLOCK + 3)
    x[0], x[1], x[2], x[3] = 127.0, 0.5, 1.5, -2.5  # block 0: max 127, so scale 1
    x[BLOCK:] = torch.tensor([1e-3, -4e-3, 0.0])  # block 1: max 4e-3 -> 2^-14 (127 * 2^-14 >= 4e-3 > 127 * 2^-15)
    w = compress(x, "int8")
    raw = w.payload
    scales = raw[:8].view(torch.float32)
    codes = raw[8:].view(torch.int8)
    assert scales.tolist() == [1.0, 2.0 ** -14]
    assert codes[:4].tolist() == [127, 0, 2, -2]  # 0.5 -> 0, 1.5 -> 2, -2.5 -> -2
    assert codes[BLOCK:].tolist() == [round(1e-3 * 2 ** 14), round(-4e-3 * 2 ** 14), 0]
    assert torch.equal(decompress(w), codes.float() * scales.repeat_interleave(BLOCK)[:BLOCK + 3])
    zeros = compress(torch.zeros(10), "int8")
    assert zeros.payload[:4].view(torch.float32).tolist() == [0.0] and not bool(zeros.payload[4:].any())
    special = decompress(compress(torch.tensor([float("nan"), float("inf"), -float("inf"), 1.0]), "int8"))
    assert special.tolist() == [0.0, compression.INT8_LIMIT, -compression.INT8_LIMIT, 0.0]
    assert bool(torch.isfinite(special).all())


# -- malformed int8 payloads ----------------------------------------------------------------------


def corrupt(w: Packed, at: int, value: bytes) -> Packed:
    raw = bytearray(w.payload.tolist())
    raw[at:at + len(value)] = value
    return Packed(w.dtype, w.shape, torch.tensor(list(raw), dtype=torch.uint8))


def f32(v: float) -> bytes:
    return bytes(torch.tensor([v], dtype=torch.float32).view(torch.uint8).tolist())


@pytest.mark.parametrize("what,at,value,message", [
    ("nan scale", 0, f32(float("nan")), "scale of block 0 is not finite"),
    ("inf scale", 4, f32(float("inf")), "scale of block 1 is not finite"),
    ("negative scale", 0, f32(-1.0), "not 0 or a power of two"),
    ("negative zero", 0, f32(-0.0), "not 0 or a power of two"),
    ("scale not a power of two", 0, f32(0.75), "not 0 or a power of two"),
    ("scale too large", 0, f32(2.0 ** 122), "not 0 or a power of two"),
    ("code -128", 8, b"\x80", "code -128"),
    ("scale twice as large as it should be", None, None, "not canonical"),
])
def test_malformed_int8_payloads_are_invalid_argument(what, at, value, message):
    w = compress(activation(shape=(2, BLOCK)), "int8")  # two blocks: scales at 0 and 4, codes from 8
    validate(w)
    if at is None:  # every code halved and the scale doubled: the same values, not the canonical bytes
        scales = w.payload[:8].view(torch.float32) * 2
        codes = torch.round(w.payload[8:].view(torch.int8).float() / 2).to(torch.int8)
        bad = Packed(w.dtype, w.shape, torch.cat([scales.view(torch.uint8), codes.view(torch.uint8)]))
    else:
        bad = corrupt(w, at, value)
    with pytest.raises(InvalidArgument, match=message):
        validate(bad)


def test_receiver_checks_the_int8_size_before_allocating_and_the_layout_before_delivering():
    sender = Identity.generate()
    good = compress(activation(), "int8")

    def stream(w, shape=None, extra=b"", nan_scale=False):
        header = make_header(run_id="r", step=0, micro_batch=0, stage=0, direction=pb.DIRECTION_FORWARD,
                             sender=sender.node_id, receiver="x", tensor=w)
        if shape is not None:
            del header.shape[:]
            header.shape.extend(shape)
        if nan_scale:
            w = corrupt(w, 0, f32(float("nan")))
        chunks = list(TensorSender(header, w, sender, 64).chunks())
        if extra:
            chunks[-1].data += extra

        async def gen():
            for c in chunks:
                yield c
        return gen()

    async def receive(s, limit=1 << 20):
        return await receive_tensor(s, max_tensor_bytes=limit, admit=lambda header: sender.public())

    rt = asyncio.run(receive(stream(good)))
    assert isinstance(rt.tensor, Packed) and payload(rt.tensor) == payload(good)
    assert torch.equal(decompress(rt.tensor), decompress(good))
    with pytest.raises(ResourceExhausted):  # 4 * 2^20 / 64 + 2^20 bytes claimed, against 1 MiB
        asyncio.run(receive(stream(good, shape=[1024, 1024])))
    with pytest.raises(InvalidArgument, match="longer than its shape allows"):
        asyncio.run(receive(stream(good, extra=b"\x00")))
    with pytest.raises(DataLoss):  # fewer bytes than the layout of the claimed shape holds
        asyncio.run(receive(stream(good, shape=[2, 8, 17])))
    with pytest.raises(InvalidArgument, match="not finite"):  # signed, digest right, layout wrong
        asyncio.run(receive(stream(good, nan_scale=True)))


# -- audits of compressed outputs ------------------------------------------------------------------


def setup(wire: str, stage: int = 0) -> StageSetup:
    return StageSetup(stage=stage, num_stages=2, gpt=GPT, optim=OPTIM, seed=3, micro_batches=2, micro_batch_size=2,
                      wire_dtype=wire)


@pytest.mark.parametrize("wire", WIRES)
def test_honest_recomputation_of_a_compressed_output_deviates_by_exactly_zero(wire):
    s = setup(wire)
    x = s.batch(Dataset(blob=bytes(range(256)) * 8, val_offset=1536), 0, 0)[0]  # (B, T) tokens
    sent = to_wire(StageComputation.build(s).forward(0, 0, x).output, wire)
    again = to_wire(StageComputation.build(s).forward(0, 0, x).output, wire)
    assert payload(sent) == payload(again)
    assert wire_deviation(again, sent, 0.0) == 0.0 and wire_deviation(again, sent, 1e-4) == 0.0
    # the next stage takes it as float32
    nxt = StageComputation.build(setup(wire, 1))
    assert nxt.forward(0, 0, sent).x.dtype == torch.float32


def test_one_quantum_flip_passes_tolerance_mode_but_not_exact_mode():
    x = activation(shape=(2, 8, 16))
    w = compress(x, "int8")
    flipped = corrupt(w, 4 * 4 + 5, bytes([(int(w.payload[4 * 4 + 5]) + 1) % 256]))  # one code one step up
    validate(flipped)
    assert wire_deviation(flipped, w, 0.0) > 0, "exact mode sees any changed code"
    assert wire_deviation(flipped, w, 1e-4) == 0.0, "tolerance mode allows one quantum"
    two = corrupt(w, 4 * 4 + 5, bytes([(int(w.payload[4 * 4 + 5]) + 2) % 256]))
    assert wire_deviation(two, w, 1e-4) > 1e-4, "but not two"
    assert wire_deviation(compress(x, "fp16"), w, 1e-4) == math.inf, "another wire dtype never matches"
    for half in ("bf16", "fp16"):  # one ulp of the wire format, likewise
        h = compress(x, half)
        up = h.clone()
        up.view(torch.int16)[0, 0, 0] += 1  # the next representable value away from zero
        assert wire_deviation(up, h, 0.0) > 0 and wire_deviation(up, h, 1e-4) == 0.0
        up.view(torch.int16)[0, 0, 0] += 1
        assert wire_deviation(up, h, 1e-4) > 1e-4, "two ulps exceed the allowance"


def test_reverse_attack_negates_the_int8_codes_it_sends():
    """Tensor attacks act on the wire tensor: forward:reverse under int8 sends every code negated
    (same scales), a well-formed payload that an audit's recomputation does not match."""
    s = setup("int8")
    seams = Seams(Reverse("forward"), Identity.generate())
    comp = seams.computation()(s, None, None)
    x = torch.randint(0, 256, (2, 8))
    honest = to_wire(StageComputation.build(s).forward(0, 0, x).output, "int8")
    sent = to_wire(comp.forward(0, 0, x).output, "int8")
    assert isinstance(sent, Packed)
    validate(sent)
    nb = -(-honest.numel // BLOCK)
    assert torch.equal(sent.payload[:4 * nb], honest.payload[:4 * nb])
    assert torch.equal(sent.payload[4 * nb:].view(torch.int8), -honest.payload[4 * nb:].view(torch.int8))
    assert wire_deviation(honest, sent, 1e-4) > 1.0


def test_equivocation_under_int8_signs_a_second_well_formed_payload():
    """wire:equivocate serves auditors a different signed tensor in the run's wire dtype: a
    canonical int8 payload whose commitment differs from the one its receiver holds."""
    from node.attacks import AttackContext, Equivocate, sign_tensor_commitment

    signer = Identity.generate()
    w = compress(activation(), "int8")
    header = make_header(run_id="r", step=0, micro_batch=0, stage=0, direction=pb.DIRECTION_FORWARD,
                         sender=signer.node_id, receiver="x", tensor=w)
    honest = sign_tensor_commitment(header, w, signer)
    ctx = AttackContext(0, 0, 0, signer.node_id, pb.DIRECTION_FORWARD, "auditor", signer)
    commitment, other = Equivocate().on_serve_tensor(ctx, honest, w, True)
    assert isinstance(other, Packed)
    validate(other)
    assert commitment.payload_digest != honest.payload_digest
    assert torch.equal(decompress(other), -decompress(w))
