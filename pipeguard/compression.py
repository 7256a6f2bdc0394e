"""Wire compression: what activations and gradients become between stages, and back.

The wire dtype is a run setting (``TrainSpec.wire_dtype``, in every node's signed assignment and
every audit order): ``fp32`` (the default: float32, the bytes are the tensor's own), ``fp16``,
``bf16`` or ``int8`` (8-bit blocks, below). ``compress`` is a deterministic function of the
tensor's float32 values, run on the host (``computation.to_wire``, the one sending point), so
the bytes a node signs are the compressed bytes and an auditor that recomputes and compresses
the same way gets the same bytes: exact audits stay exact. ``decompress`` turns a wire tensor
into the float32 input of the receiving stage (its compute dtype applies from there).

- ``fp16``: IEEE binary16, round to nearest even, saturating: values beyond +-65504 become
  +-65504 (NaN stays NaN). Error: half a binary16 ulp of the value (relative 2^-11), absolute
  2^-25 below 2^-14 (subnormals).
- ``bf16``: bfloat16, round to nearest even (float32's range). Error: relative 2^-8.
- ``int8`` (``DTYPE_INT8_BLOCK64``): the tensor flattened in row-major order, cut into blocks of
  ``BLOCK`` = 64 consecutive elements (the last one may be shorter). Each block has a scale
  ``s``, a power of two, and one signed 8-bit code ``q`` per element, ``value = q * s``:

  1. NaN becomes 0 and every value is clamped to +-``INT8_LIMIT`` = 127 * 2^121 (~3.38e38, just
     under float32's largest; +-inf included), so that every code times its scale is a float32;
  2. ``m`` = the block's largest ``|x|``; ``m = 0``: ``s = 0`` and every code 0;
  3. otherwise ``s = 2^e`` with ``e`` the smallest integer such that ``127 * 2^e >= m``, but at
     least -149 (``s`` stays a float32: the smallest subnormal) and so at most 121;
  4. ``q = round_half_to_even(x / s)``, within [-127, 127] (-128 never occurs).

  Every step is exact (division by a power of two, in float64) except the one rounding in 4,
  which IEEE defines, so the codes are the same on every machine; ``q * s`` is exact in float32,
  so decoding is too. Error: ``|x - q * s| <= s / 2 <= m / 127`` (``s < 2m / 127``; 0 at the
  2^-149 floor, where every float32 is a multiple of ``s``); a block's largest element is coded
  with ``|q|`` in [64, 127] (above that floor). Encoding is idempotent: decoding and encoding
  again gives the same bytes, and a payload is well-formed exactly when it is the encoding of its
  own decoded values (``validate``), so each value tensor has one payload.

  Payload (``packed_nbytes``): the ``ceil(n / 64)`` scales as little-endian float32, then the
  ``n`` codes as int8, ``4 * ceil(n / 64) + n`` bytes for ``n`` elements; the header carries the
  logical shape. A scale that is not finite, negative, not 0 or a power of two in [2^-149, 2^121],
  a code of -128, or any other non-canonical payload is refused as INVALID_ARGUMENT
  (``validate``, on receipt, after the signature checks).

A wire tensor in memory is a torch tensor (fp32, fp16, bf16: its bytes are the payload) or a
``Packed`` (int8: payload bytes plus the logical shape). The backward pass is straight-through:
the gradient of a stage's output arrives compressed, is decompressed and backpropagated as is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pipeguard.errors import InvalidArgument
from pipeguard.v1 import pipeguard_pb2 as pb

BLOCK = 64
"""Elements per block of the int8 layout."""
MIN_EXP, MAX_EXP = -149, 121
"""Exponents a block scale may have: float32's smallest subnormal to the largest that keeps
127 x scale a float32."""
INT8_LIMIT = 127.0 * 2.0 ** MAX_EXP
"""The largest magnitude the int8 layout codes (larger values, and +-inf, are clamped to it)."""
FP16_MAX = 65504.0

WIRE_DTYPES: dict[str, int] = {
    "fp32": pb.DTYPE_FLOAT32,
    "fp16": pb.DTYPE_FLOAT16,
    "bf16": pb.DTYPE_BFLOAT16,
    "int8": pb.DTYPE_INT8_BLOCK64,
}
"""The wire dtypes a run may use (``train.wire_dtype``) and the DType each travels as."""
WIRE_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "int8": "int8 blocks (DTYPE_INT8_BLOCK64)"}
"""How refusals name each wire dtype."""
PACKED = {pb.DTYPE_INT8_BLOCK64}
"""DTypes whose payload is a layout of its own (``Packed``), not one element after another."""
_FLOATS = {"fp16": torch.float16, "bf16": torch.bfloat16}


def check(name: str) -> str:
    """The canonical name of a wire dtype setting ("" = fp32); ValueError saying what is accepted."""
    key = name or "fp32"
    if key not in WIRE_DTYPES:
        raise ValueError(f"wire_dtype must be one of {list(WIRE_DTYPES)}, got {name!r}")
    return key


@dataclass(frozen=True, eq=False)
class Packed:
    """A tensor in a packed wire layout: its payload bytes and the logical shape they encode."""

    dtype: int
    """The ``pb.DType`` (``DTYPE_INT8_BLOCK64``)."""
    shape: tuple[int, ...]
    """The logical shape, as the header carries it."""
    payload: torch.Tensor
    """uint8, 1-D, contiguous, on the host: ``packed_nbytes(dtype, shape)`` bytes."""

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.payload.numel()


def packed_nbytes(dtype: int, shape) -> int:
    """Payload bytes of a packed layout for a logical shape: scales, then codes."""
    assert dtype == pb.DTYPE_INT8_BLOCK64, dtype
    n = math.prod(int(d) for d in shape)
    return 4 * (-(-n // BLOCK)) + n


# -- the codecs ---------------------------------------------------------------------------------


def _block_scales(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scales (nb,) float64, x padded to (nb, BLOCK) float64) of float32 values ``x`` (flat)."""
    n = x.numel()
    nb = -(-n // BLOCK)
    padded = torch.zeros(nb * BLOCK, dtype=torch.float64)
    padded[:n] = x.double()
    blocks = padded.view(nb, BLOCK)
    m = blocks.abs().amax(dim=1)  # (nb,)
    _, E = torch.frexp(m)  # m = f * 2^E, f in [0.5, 1): 2^(E-1) <= m < 2^E
    e = E - 7  # 127 * 2^(E-7) < 2^E: either E - 7 or E - 6 is the smallest e with 127 * 2^e >= m
    e = torch.where(torch.ldexp(torch.full_like(m, 127.0), e) >= m, e, e + 1).clamp(MIN_EXP, MAX_EXP)
    scales = torch.where(m > 0, torch.ldexp(torch.ones_like(m), e), torch.zeros_like(m))
    return scales, blocks


def encode_int8(x: torch.Tensor) -> Packed:
    """The int8 block layout of ``x`` (any float dtype, any device; read as float32 on the host)."""
    shape = tuple(x.shape)
    flat = torch.nan_to_num(x.detach().to(device="cpu", dtype=torch.float32).reshape(-1), nan=0.0,
                            posinf=INT8_LIMIT, neginf=-INT8_LIMIT).clamp(-INT8_LIMIT, INT8_LIMIT)
    n = flat.numel()
    scales, blocks = _block_scales(flat)
    safe = torch.where(scales > 0, scales, torch.ones_like(scales)).unsqueeze(1)
    codes = torch.round(blocks / safe).clamp(-127, 127).to(torch.int8).reshape(-1)[:n]  # half to even
    payload = torch.empty(packed_nbytes(pb.DTYPE_INT8_BLOCK64, shape), dtype=torch.uint8)
    nb = scales.numel()
    payload[: 4 * nb] = scales.to(torch.float32).view(torch.uint8)  # little-endian hosts (torch's)
    payload[4 * nb:] = codes.view(torch.uint8)
    return Packed(pb.DTYPE_INT8_BLOCK64, shape, payload)


def _parts(p: Packed) -> tuple[torch.Tensor, torch.Tensor]:
    """(scales (nb,) float32, codes (n,) int8) views of a packed payload."""
    n = p.numel
    nb = -(-n // BLOCK)
    if p.payload.numel() != 4 * nb + n:
        raise InvalidArgument(f"int8 block payload of {p.payload.numel()} bytes for shape {list(p.shape)}: "
                              f"expected {4 * nb + n}")
    raw = p.payload.contiguous()
    return raw[: 4 * nb].view(torch.float32), raw[4 * nb:].view(torch.int8)


def decode_int8(p: Packed) -> torch.Tensor:
    """The float32 values (logical shape) of an int8 block payload: exact ``q * s``."""
    scales, codes = _parts(p)
    n = codes.numel()
    per_element = scales.repeat_interleave(BLOCK)[:n] if n else scales
    return (codes.to(torch.float32) * per_element).view(p.shape)


def validate(p: Packed) -> None:
    """InvalidArgument unless ``p`` is a well-formed payload of its layout (the module docstring):
    called by receivers and by ``pipeguard verify`` before a payload's values are used."""
    if p.dtype != pb.DTYPE_INT8_BLOCK64:
        raise InvalidArgument(f"dtype {p.dtype} is not a packed layout")
    scales, codes = _parts(p)
    bad = ~torch.isfinite(scales)
    if bool(bad.any()):
        raise InvalidArgument(f"int8 block payload: scale of block {int(bad.nonzero()[0])} is not finite")
    mant, exp = torch.frexp(scales)
    power = (mant == 0.5) & (exp - 1 >= MIN_EXP) & (exp - 1 <= MAX_EXP)
    bad = ~(power | (scales.view(torch.int32) == 0))  # +0.0 only: -0.0 is another byte string
    if bool(bad.any()):
        raise InvalidArgument(f"int8 block payload: scale of block {int(bad.nonzero()[0])} "
                              f"({float(scales[int(bad.nonzero()[0])])!r}) is not 0 or a power of two in "
                              f"[2^{MIN_EXP}, 2^{MAX_EXP}]")
    if bool((codes == -128).any()):
        raise InvalidArgument("int8 block payload: code -128 (codes lie in [-127, 127])")
    again = encode_int8(decode_int8(p))
    if not torch.equal(again.payload, p.payload):
        raise InvalidArgument("int8 block payload is not canonical (it is not the encoding of its own values)")


def compress(t: torch.Tensor, name: str) -> "torch.Tensor | Packed":
    """The wire form of ``t`` under wire dtype ``name``: detached, contiguous, on the host. fp32 is
    what it always was (float32, a no-op for a float32 CPU tensor). A wire tensor of this dtype
    comes back unchanged."""
    key = check(name)
    if isinstance(t, Packed):
        if t.dtype != WIRE_DTYPES[key]:
            raise ValueError(f"a {t.dtype} payload is not the {key} wire dtype")
        return t
    if key == "int8":
        return encode_int8(t)
    x = t.detach().to(device="cpu", dtype=torch.float32)
    if key == "fp16":
        x = x.clamp(-FP16_MAX, FP16_MAX)  # saturate: NaN stays NaN
    return x.to(_FLOATS.get(key, torch.float32)).contiguous()


def decompress(w) -> torch.Tensor:
    """The float32 values of a wire tensor (a received activation or gradient, a recomputed
    output); tensors of other dtypes (token ids) and float32 ones pass through unchanged."""
    if isinstance(w, Packed):
        return decode_int8(w)
    if w.dtype in (torch.float16, torch.bfloat16):
        return w.float()
    return w


def remap(w, fn) -> "torch.Tensor | Packed":
    """``fn`` applied to a wire tensor's values, back in the same wire dtype (attacks that rewrite
    what they serve)."""
    if isinstance(w, Packed):
        return encode_int8(fn(decode_int8(w)))
    return fn(w).to(w.dtype).contiguous()


def dtype_name(w) -> str:
    """The wire dtype setting a wire tensor travels as (``fp32`` for a float32 tensor)."""
    value = w.dtype if isinstance(w, Packed) else {torch.float32: pb.DTYPE_FLOAT32, torch.float16: pb.DTYPE_FLOAT16,
                                                   torch.bfloat16: pb.DTYPE_BFLOAT16}.get(w.dtype, -1)
    return next((k for k, v in WIRE_DTYPES.items() if v == value), "")


# -- what one quantum is -------------------------------------------------------------------------


def quantum(w) -> torch.Tensor | None:
    """Per element (float64, logical shape), one step of the wire format at that element: an
    int8 block's scale, one bf16/fp16 ulp at the element's magnitude; None for fp32 (the
    tolerance covers float32's last bits). What tolerance-mode audits allow on top of their
    relative tolerance (``pipeguard.audit.deviation``): a recomputation that differs in the last
    bits may round to the neighbouring code."""
    if isinstance(w, Packed):
        scales, codes = _parts(w)
        return scales.double().repeat_interleave(BLOCK)[: codes.numel()].view(w.shape)
    if w.dtype in (torch.float16, torch.bfloat16):
        mant_bits, min_exp = (10, -14) if w.dtype == torch.float16 else (7, -126)
        _, exp = torch.frexp(w.double().abs())  # |x| = f * 2^exp, f in [0.5, 1)
        exp = torch.clamp(exp - 1, min=min_exp)  # the binade, subnormals in the lowest
        return torch.ldexp(torch.ones_like(w, dtype=torch.float64), exp - mant_bits)
    return None
