"""Tensors on the wire: chunked signed streams, digests, named state streams."""

from __future__ import annotations

import asyncio
import hashlib
import struct

import blake3
import pytest
import torch
from google.protobuf.message import DecodeError

from pipeguard.errors import DataLoss, InvalidArgument, ResourceExhausted, Unauthenticated
from pipeguard.identity import Identity
from pipeguard.signing import canonical_bytes
from pipeguard.tensors import (
    PAYLOAD_DIGEST,
    StateAssembler,
    TensorSender,
    make_header,
    new_payload_hash,
    parse_chunk,
    payload_digest,
    receive_tensor,
    state_chunks,
    state_digest,
    tensor_bytes,
    tensor_digest,
)
from pipeguard.v1 import pipeguard_pb2 as pb

pytestmark = pytest.mark.unit

SENDER = Identity.generate()
RECEIVER = Identity.generate()


def header_for(t: torch.Tensor, **overrides) -> pb.TensorHeader:
    fields = dict(run_id="run", step=3, micro_batch=1, stage=0, direction=pb.DIRECTION_FORWARD,
                  sender=SENDER.node_id, receiver=RECEIVER.node_id, tensor=t)
    fields.update(overrides)
    return make_header(**fields)


async def _aiter(items):
    for item in items:
        yield item


def receive(chunks, *, max_tensor_bytes=1 << 30, admit=None):
    admitted = []

    def default_admit(header):
        admitted.append(pb.TensorHeader().FromString(header.SerializeToString()))
        return SENDER.public()

    rt = asyncio.run(receive_tensor(_aiter(chunks), max_tensor_bytes=max_tensor_bytes,
                                    admit=admit or default_admit))
    return rt, admitted


def send(t: torch.Tensor, chunk_bytes: int = 1 << 20, **header_overrides):
    sender = TensorSender(header_for(t, **header_overrides), t, SENDER, chunk_bytes)
    return sender, list(sender.chunks())


def _gen(dtype, shape):
    g = torch.Generator().manual_seed(0)
    if dtype == torch.int64:
        return torch.randint(-(2 ** 40), 2 ** 40, shape, generator=g)
    return torch.randn(shape, generator=g).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64])
@pytest.mark.parametrize(
    "shape, chunk_bytes, n_chunks",
    [
        ((4, 8, 16), 1 << 20, 1),      # fits one chunk
        ((4, 8, 16), 1024, None),      # many chunks
        ((1000,), 999, None),          # chunk boundaries split elements
        ((3, 0, 5), 1024, 1),          # empty: one chunk, no bytes, still signed
        ((), 1024, 1),                 # scalar
    ],
)
def test_round_trip(dtype, shape, chunk_bytes, n_chunks):
    t = _gen(dtype, shape)
    sender, chunks = send(t, chunk_bytes)
    nbytes = t.numel() * t.element_size()
    expected_chunks = n_chunks or -(-nbytes // chunk_bytes)
    assert len(chunks) == expected_chunks
    assert all(len(c.data) <= chunk_bytes for c in chunks)
    # metadata only where it belongs: header first, digest and signature last
    assert chunks[0].HasField("header") and not any(c.HasField("header") for c in chunks[1:])
    assert chunks[-1].signature and not any(c.signature for c in chunks[:-1])

    rt, admitted = receive(chunks)

    assert rt.tensor.dtype == dtype
    assert tuple(rt.tensor.shape) == shape
    assert torch.equal(rt.tensor, t)
    assert len(admitted) == 1 and admitted[0] == sender.header
    assert rt.commitment == sender.commitment
    assert rt.commitment.payload_digest == tensor_digest(t)


def test_non_contiguous_tensor_travels_as_its_values():
    t = torch.arange(24, dtype=torch.float32).view(4, 6).t()  # (6, 4), not contiguous
    _, chunks = send(t, 1024)
    rt, _ = receive(chunks)
    assert torch.equal(rt.tensor, t)
    assert rt.commitment.payload_digest == tensor_digest(t.contiguous())


def test_commitment_signature_covers_header_and_digest():
    t = torch.randn(2, 3)
    sender, _ = send(t)
    c = sender.commitment
    assert SENDER.public().verify(c.signature, canonical_bytes(c))
    assert c.header == sender.header


def test_tensor_digest_binds_dtype_shape_and_bytes():
    t = torch.arange(6, dtype=torch.float32)
    base = tensor_digest(t)
    assert tensor_digest(t.clone()) == base
    assert tensor_digest(t.view(2, 3)) != base, "same bytes, other shape"
    half = torch.arange(6, dtype=torch.float16)
    assert tensor_digest(half.view(torch.bfloat16)) != tensor_digest(half), "same bytes, other dtype"
    with pytest.raises(InvalidArgument, match="cannot travel"):
        tensor_digest(t.to(torch.int32))
    other = t.clone()
    other[5] = 5.000001
    assert tensor_digest(other) != base
    # the digest is SHA-256 over a dtype/shape prefix and the raw little-endian bytes
    assert len(base) == 32
    assert bytes(tensor_bytes(t)) == b"".join(int(x).to_bytes(4, "little") for x in t.view(torch.int32))


# -- what a receiver refuses --------------------------------------------------------------------


def test_oversized_claim_is_refused_before_admission_or_allocation():
    t = torch.zeros(256)  # 1 KiB
    _, chunks = send(t)
    admitted = []
    with pytest.raises(ResourceExhausted, match="exceeds the limit of 1023 bytes"):
        receive(chunks, max_tensor_bytes=1023, admit=lambda h: admitted.append(h) or SENDER.public())
    assert admitted == []


def test_absurd_claimed_shape_is_refused_without_allocating():
    header = header_for(torch.zeros(1))
    del header.shape[:]
    header.shape.extend([1 << 40, 1 << 20])
    with pytest.raises(ResourceExhausted):
        receive([pb.TensorChunk(header=header)], max_tensor_bytes=1 << 30)


@pytest.mark.parametrize("shape", [[0, 2**63], [2**64 - 1, 0], [3, 0, 2**63 + 5]])
def test_a_dimension_past_int64_is_refused_even_when_the_size_is_zero(shape):
    """prod(shape) is 0, so no size limit refuses it; torch cannot hold the shape (TypeError)."""
    header = header_for(torch.zeros(1))
    del header.shape[:]
    header.shape.extend(shape)
    with pytest.raises(InvalidArgument, match="dimension over"):
        receive([pb.TensorChunk(header=header, signature=b"\x00" * 64)], max_tensor_bytes=1 << 30)
    asm = StateAssembler(max_tensor_bytes=1 << 30)
    with pytest.raises(InvalidArgument, match="dimension over"):
        asm.add(pb.StateChunk(name="param/x", dtype=pb.DTYPE_FLOAT32, shape=shape))
        asm.finish()


def _tamper(chunks, i, fn):
    c = pb.TensorChunk()
    c.CopyFrom(chunks[i])
    fn(c)
    return chunks[:i] + [c] + chunks[i + 1:]


@pytest.mark.parametrize(
    "case, error, match",
    [
        ("empty stream", InvalidArgument, "empty"),
        ("no header", InvalidArgument, "header"),
        ("header repeated", InvalidArgument, "repeated"),
        ("extra bytes", InvalidArgument, "longer than its shape"),
        ("truncated", DataLoss, "without a signature"),
        ("signed early", DataLoss, "header promised"),
        ("payload flipped", DataLoss, "do not match the signed digest"),
        ("digest replaced", Unauthenticated, "bad signature"),
        ("signature flipped", Unauthenticated, "bad signature"),
        ("too many dims", InvalidArgument, "dimensions"),
        ("unknown dtype", InvalidArgument, "dtype"),
        ("unknown direction", InvalidArgument, "direction"),
    ],
)
def test_malformed_streams_are_refused(case, error, match):
    t = torch.randn(4, 64)  # 1 KiB in 4 chunks of 256 bytes
    _, chunks = send(t, 256)
    assert len(chunks) == 4
    if case == "empty stream":
        chunks = []
    elif case == "no header":
        chunks = _tamper(chunks, 0, lambda c: c.ClearField("header"))
    elif case == "header repeated":
        chunks = _tamper(chunks, 1, lambda c: c.header.CopyFrom(chunks[0].header))
    elif case == "extra bytes":
        chunks = _tamper(chunks, 3, lambda c: setattr(c, "data", c.data + b"\x00"))
    elif case == "truncated":
        chunks = chunks[:-1]
    elif case == "signed early":
        chunks = _tamper(chunks, 2, lambda c: (setattr(c, "signature", chunks[3].signature),
                                               setattr(c, "payload_digest", chunks[3].payload_digest)))[:3]
    elif case == "payload flipped":
        chunks = _tamper(chunks, 1, lambda c: setattr(c, "data", bytes([c.data[0] ^ 1]) + c.data[1:]))
    elif case == "digest replaced":
        tampered = _tamper(chunks, 1, lambda c: setattr(c, "data", bytes([c.data[0] ^ 1]) + c.data[1:]))
        h = new_payload_hash(pb.DTYPE_FLOAT32, [4, 64])  # an honest digest of the tampered bytes
        for c in tampered:
            h.update(c.data)
        chunks = _tamper(tampered, 3, lambda c: setattr(c, "payload_digest", h.digest()))
    elif case == "signature flipped":
        chunks = _tamper(chunks, 3, lambda c: setattr(c, "signature", bytes([c.signature[0] ^ 1]) + c.signature[1:]))
    elif case == "too many dims":
        chunks = _tamper(chunks, 0, lambda c: c.header.shape.extend([1] * 8))
    elif case == "unknown dtype":
        chunks = _tamper(chunks, 0, lambda c: setattr(c.header, "dtype", 99))
    elif case == "unknown direction":
        chunks = _tamper(chunks, 0, lambda c: setattr(c.header, "direction", pb.DIRECTION_UNSPECIFIED))
    with pytest.raises(error, match=match):
        receive(chunks)


def test_admission_error_propagates_and_stops_the_stream():
    t = torch.randn(4, 64)
    _, chunks = send(t, 256)

    def refuse(header):
        raise InvalidArgument("not for me")

    with pytest.raises(InvalidArgument, match="not for me"):
        receive(chunks, admit=refuse)


def test_signature_from_another_key_is_refused():
    t = torch.randn(8)
    other = Identity.generate()
    sender = TensorSender(header_for(t), t, other, 1024)  # header claims SENDER, signed by other
    with pytest.raises(Unauthenticated):
        receive(list(sender.chunks()))


def test_sender_rejects_non_positive_chunk_size():
    with pytest.raises(ValueError):
        TensorSender(header_for(torch.zeros(1)), torch.zeros(1), SENDER, 0)


# -- named state streams ------------------------------------------------------------------------


def _state():
    g = torch.Generator().manual_seed(1)
    return [
        ("param/embed.wte.weight", torch.randn(64, 16, generator=g)),
        ("param/blocks.0.ln_1.bias", torch.randn(16, generator=g)),
        ("optim/blocks.0.ln_1.bias/step", torch.tensor([3.0])),
        ("optim/empty", torch.zeros(0)),
        ("param/half", torch.randn(5, 3, generator=g).to(torch.bfloat16)),
        ("param/ids", torch.arange(7, dtype=torch.int64)),
    ]


@pytest.mark.parametrize("chunk_bytes", [7, 256, 1 << 20])
def test_state_stream_round_trip(chunk_bytes):
    named = _state()
    chunks = list(state_chunks(named, stage=2, completed_steps=11, chunk_bytes=chunk_bytes))
    assert chunks[0].completed_steps == 11 and all(c.completed_steps == 0 for c in chunks[1:])
    assert all(len(c.data) <= chunk_bytes for c in chunks)
    assert sum(1 for c in chunks if c.name) == len(named)

    asm = StateAssembler(max_tensor_bytes=1 << 20)
    for c in chunks:
        asm.add(c)
    out = asm.finish()

    assert list(out) == [n for n, _ in named]
    for name, t in named:
        assert out[name].dtype == t.dtype and torch.equal(out[name], t), name
    assert set(asm.stages.values()) == {2}
    assert state_digest(iter(out.items())) == state_digest(iter(named))


def test_state_assembler_refuses_bad_streams():
    named = _state()
    chunks = list(state_chunks(named, stage=0, completed_steps=1, chunk_bytes=256))

    asm = StateAssembler(max_tensor_bytes=1 << 20)
    with pytest.raises(InvalidArgument, match="start with a named chunk"):
        asm.add(chunks[1])

    asm = StateAssembler(max_tensor_bytes=1 << 20)
    asm.add(chunks[0])
    with pytest.raises(DataLoss, match="truncated"):
        asm.finish()

    asm = StateAssembler(max_tensor_bytes=1 << 20)
    first = [c for c in chunks if c.name == "param/ids"][0]
    asm.add(first)
    with pytest.raises(InvalidArgument, match="sent twice"):
        asm.add(first)

    asm = StateAssembler(max_tensor_bytes=1000)  # the 4 KiB embedding is over the limit
    with pytest.raises(ResourceExhausted, match="param/embed.wte.weight"):
        asm.add(chunks[0])

    asm = StateAssembler(max_tensor_bytes=1 << 20)
    asm.add(first)
    with pytest.raises(InvalidArgument, match="more bytes"):
        asm.add(pb.StateChunk(data=b"\x00"))


def test_state_assembler_bounds_the_whole_stream():
    """A peer that keeps streaming new names is cut off by count and by total bytes."""
    def named_chunk(i: int) -> pb.StateChunk:
        return pb.StateChunk(name=f"param/x{i}", dtype=pb.DTYPE_FLOAT32, shape=[16], data=bytes(64))

    asm = StateAssembler(max_tensor_bytes=1 << 20, max_tensors=3)
    for i in range(3):
        asm.add(named_chunk(i))
    with pytest.raises(ResourceExhausted, match="more than 3 tensors"):
        asm.add(named_chunk(3))

    asm = StateAssembler(max_tensor_bytes=100, max_total_bytes=150)
    asm.add(named_chunk(0))
    asm.add(named_chunk(1))
    with pytest.raises(ResourceExhausted, match="exceeds 150 bytes"):
        asm.add(named_chunk(2))
    assert len(asm.finish()) == 2

    # the default total is 64 tensors' worth of the per-tensor limit
    asm = StateAssembler(max_tensor_bytes=64)
    for i in range(64):
        asm.add(named_chunk(i))
    with pytest.raises(ResourceExhausted):
        asm.add(named_chunk(64))


def test_state_digest_depends_on_names_and_values_not_order():
    named = _state()
    base = state_digest(iter(named))
    # Order-free, so a state rebuilt from a bundle or checkpoint (any order) hashes the same.
    assert state_digest(iter(named[::-1])) == base
    renamed = [("param/other", named[0][1])] + named[1:]
    assert state_digest(iter(renamed)) != base
    changed = [(named[0][0], named[0][1] + 1e-6)] + named[1:]
    assert state_digest(iter(changed)) != base
    assert state_digest(iter([(n, t.clone()) for n, t in named])) == base


# -- payload digest algorithms and the zero-copy chunk parser ------------------------------------

ALGORITHMS = [pb.DIGEST_ALGORITHM_UNSPECIFIED, pb.DIGEST_ALGORITHM_SHA256, pb.DIGEST_ALGORITHM_BLAKE3]


def test_sha256_named_digests_are_the_ones_signed_before_the_field_existed():
    """Known answer: a header naming no algorithm, or SHA-256, gets exactly the digest every
    commitment carried before (SHA-256 over the prefix and the bytes), so old bundles still verify."""
    t = torch.arange(12, dtype=torch.float32).view(3, 4)
    legacy = hashlib.sha256(b"pipeguard-tensor\x00" + struct.pack(">IIQQ", pb.DTYPE_FLOAT32, 2, 3, 4)
                            + tensor_bytes(t)).digest()
    for algorithm in (pb.DIGEST_ALGORITHM_UNSPECIFIED, pb.DIGEST_ALGORITHM_SHA256):
        assert payload_digest(header_for(t, digest_algorithm=algorithm), t) == legacy
    assert payload_digest(header_for(t), t) == blake3.blake3(
        b"pipeguard-tensor\x00" + struct.pack(">IIQQ", pb.DTYPE_FLOAT32, 2, 3, 4) + tensor_bytes(t)).digest()
    assert header_for(t).digest_algorithm == PAYLOAD_DIGEST == pb.DIGEST_ALGORITHM_BLAKE3


@pytest.mark.parametrize("algorithm", ALGORITHMS, ids=lambda a: pb.DigestAlgorithm.Name(a))
@pytest.mark.parametrize("wire", [False, True], ids=["messages", "wire-bytes"])
def test_every_known_algorithm_round_trips_and_a_flipped_byte_is_caught(algorithm, wire):
    t = torch.randn(4, 64)
    sender, chunks = send(t, 256, digest_algorithm=algorithm)
    as_received = (lambda cs: [parse_chunk(c.SerializeToString()) for c in cs]) if wire else list
    rt, _ = receive(as_received(chunks))
    assert torch.equal(rt.tensor, t) and rt.commitment == sender.commitment
    assert rt.commitment.header.digest_algorithm == algorithm
    assert rt.commitment.payload_digest == payload_digest(rt.commitment.header, t)
    flipped = pb.TensorChunk()
    flipped.CopyFrom(chunks[2])
    flipped.data = flipped.data[:7] + bytes([flipped.data[7] ^ 0x10]) + flipped.data[8:]
    with pytest.raises(DataLoss, match="do not match the signed digest"):
        receive(as_received(chunks[:2] + [flipped] + chunks[3:]))


def test_unknown_algorithm_is_refused_before_admission_or_allocation():
    t = torch.randn(4, 64)
    _, chunks = send(t, 256)
    chunks[0].header.digest_algorithm = 42
    admitted = []
    with pytest.raises(InvalidArgument, match="unknown payload digest algorithm 42"):
        receive(chunks, admit=lambda h: admitted.append(h))
    assert admitted == [], "refused on the header alone"
    with pytest.raises(InvalidArgument, match="unknown payload digest algorithm 42"):
        tensor_digest(t, 42)


def test_parse_chunk_matches_protobuf_without_copying_the_payload():
    t = torch.randn(4, 64)
    sender, chunks = send(t, 300)
    for c in chunks:
        raw = c.SerializeToString()
        w = parse_chunk(raw)
        assert bytes(w.data) == c.data and w.data.obj is raw, "a view into the wire bytes"
        for name in ("header", "payload_digest", "signature", "header_signature"):
            assert getattr(w, name) == getattr(c, name)
        assert w.HasField("header") == c.HasField("header")
    assert parse_chunk(b"").size == 0 and not parse_chunk(b"").HasField("header")
    assert bytes(parse_chunk(pb.TensorChunk(data=b"x" * 200).SerializeToString()).data) == b"x" * 200


@pytest.mark.parametrize("raw", [
    pb.TensorChunk(data=b"ab").SerializeToString() * 2,  # payload field twice
    b"\x12\x05ab",  # length past the end
    b"\x12" + b"\xff" * 11,  # varint too long
    b"\x0b",  # a group (wire type 3)
    b"\x0a\x03\xff\xff\xff",  # header that is not a TensorHeader
], ids=["payload-twice", "truncated", "long-varint", "group", "bad-header"])
def test_parse_chunk_refuses_malformed_bytes(raw):
    with pytest.raises(DecodeError):
        parse_chunk(raw)


def test_large_payloads_land_in_their_own_mapping():
    t = torch.randn(1024, 1024)  # 4 MiB: over HUGE_PAGE_BYTES
    _, chunks = send(t, 1 << 20)
    rt, _ = receive([parse_chunk(c.SerializeToString()) for c in chunks])
    assert torch.equal(rt.tensor, t)
    rt.tensor.add_(1)  # writable, and its own memory
    assert torch.equal(rt.tensor, t + 1)
