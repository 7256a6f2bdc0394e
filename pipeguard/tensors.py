"""Tensors on the wire: raw bytes + dtype + shape, streamed in chunks, never pickled.

The first chunk carries the ``TensorHeader``; the last carries the payload digest and the
sender's signature over the ``TensorCommitment``. The header names the digest's hash
(``digest_algorithm``: BLAKE3 from this build's senders, SHA-256 in headers that name none, as
every tensor signed before the field had), so any party can recompute a commitment's digest
with the hash its signer committed to (``payload_digest``). Sender and receiver both hash while
the chunks flow. The receiver checks the claimed size, the algorithm and the header against what
its stage expects *before* allocating, then assembles the bytes into one preallocated buffer
that becomes the tensor without another copy.

Copies and page faults cost as much as hashing here, so the path keeps both down: the sender
builds each serialised chunk with one copy of the payload (``wire_chunks``); PushTensor's chunks
are parsed by ``parse_chunk``, which leaves the payload in the bytes gRPC delivered, so it is
hashed and copied once, straight into the tensor; the receive buffer is mapped for huge pages
(``_payload_buffer``). Chunks of ``OFFLOAD_BYTES`` or more are hashed on a small worker pool
(BLAKE3 and SHA-256 release the GIL) while the next one is read or written; smaller ones inline.
"""

from __future__ import annotations

import asyncio
import ctypes
import hashlib
import math
import mmap
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Iterable, Iterator

import blake3
import torch
from google.protobuf.message import DecodeError

from pipeguard import compression
from pipeguard.compression import PACKED, Packed
from pipeguard.errors import DataLoss, InvalidArgument, ResourceExhausted
from pipeguard.identity import Identity, PublicIdentity
from pipeguard import claims
from pipeguard.signing import canonical_bytes
from pipeguard.v1 import pipeguard_pb2 as pb

TORCH_DTYPES: dict[int, torch.dtype] = {
    pb.DTYPE_FLOAT32: torch.float32,
    pb.DTYPE_FLOAT16: torch.float16,
    pb.DTYPE_BFLOAT16: torch.bfloat16,
    pb.DTYPE_INT64: torch.int64,
}
WIRE_DTYPES: dict[torch.dtype, int] = {v: k for k, v in TORCH_DTYPES.items()}
MAX_DIMS = 8
MAX_DIM = 2**63 - 1
"""Largest dimension a shape may have (torch sizes are int64; the wire's are uint64)."""
OFFLOAD_BYTES = 4 * 1024 * 1024
"""Chunks at least this large are hashed (and copied) on the worker pool; smaller ones inline on
the event loop. BLAKE3 hashes 1 MiB (the default chunk) in ~0.25 ms here, and gRPC's own threads
keep moving bytes meanwhile, so at that size a thread hop costs more than it overlaps: on these
shared 2-core machines pooled 1 MiB chunks reached 0.27-0.38 of raw TCP, inline ones 0.34-0.49,
same runs (benchmarks/README.md)."""
_hash_pool: ThreadPoolExecutor | None = None


def _pool() -> ThreadPoolExecutor:
    """The worker threads that hash (and copy) large chunks, shared by all streams of a process."""
    global _hash_pool
    if _hash_pool is None:
        _hash_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="pipeguard-hash")
    return _hash_pool


def wire_dtype(dtype: torch.dtype) -> int:
    try:
        return WIRE_DTYPES[dtype]
    except KeyError:
        raise InvalidArgument(f"dtype {dtype} cannot travel; use one of {list(WIRE_DTYPES)}") from None


def torch_dtype(value: int) -> torch.dtype:
    try:
        return TORCH_DTYPES[value]
    except KeyError:
        raise InvalidArgument(f"unknown dtype enum value {value}") from None


def header_dtype(t: "torch.Tensor | Packed") -> int:
    """The ``pb.DType`` a wire tensor (a torch tensor or a ``Packed`` layout) travels as."""
    return t.dtype if isinstance(t, Packed) else wire_dtype(t.dtype)


def wire_nbytes(t: "torch.Tensor | Packed") -> int:
    """Payload bytes of a wire tensor."""
    return t.nbytes if isinstance(t, Packed) else t.numel() * t.element_size()


def payload_nbytes(dtype: int, shape) -> int:
    """Bytes a payload of this dtype and shape must hold (a packed layout's own size,
    ``compression.packed_nbytes``); validates both."""
    if dtype not in PACKED:
        item = torch.empty((), dtype=torch_dtype(dtype)).element_size()
    if len(shape) > MAX_DIMS:
        raise InvalidArgument(f"tensor has {len(shape)} dimensions; at most {MAX_DIMS} allowed")
    if any(int(d) > MAX_DIM for d in shape):  # the wire allows 2^64 - 1; torch shapes are int64
        raise InvalidArgument(f"tensor dimension over {MAX_DIM} in shape {[int(d) for d in shape]}")
    if dtype in PACKED:
        return compression.packed_nbytes(dtype, shape)
    return item * math.prod(int(d) for d in shape)


def tensor_bytes(t: "torch.Tensor | Packed") -> memoryview:
    """A zero-copy byte view of ``t`` (made contiguous and moved to CPU first if needed; a
    ``Packed`` layout's payload).

    The view keeps the tensor alive. ``bytes(t.untyped_storage())`` is far slower, and
    ``Tensor.numpy()`` needs NumPy, which pipeguard does not depend on.
    """
    if isinstance(t, Packed):
        t = t.payload
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    n = t.numel() * t.element_size()
    if n == 0:
        return memoryview(b"")
    arr = (ctypes.c_char * n).from_address(t.data_ptr())
    arr.owner = t  # the memoryview references arr, arr references the tensor
    return memoryview(arr).cast("B")


PAYLOAD_DIGEST = pb.DIGEST_ALGORITHM_BLAKE3
"""The hash this build's senders name in every tensor header they make (``make_header``): BLAKE3
hashes ~2.5x faster than SHA-256 on one core and releases the GIL. Receivers and ``pipeguard
verify`` accept every algorithm in ``DIGEST_ALGORITHMS``, whatever this is."""
DIGEST_ALGORITHMS: dict[int, Callable[[], object]] = {
    pb.DIGEST_ALGORITHM_UNSPECIFIED: hashlib.sha256,  # tensors signed before the field existed
    pb.DIGEST_ALGORITHM_SHA256: hashlib.sha256,
    pb.DIGEST_ALGORITHM_BLAKE3: blake3.blake3,
}
"""Payload digest algorithms a commitment may name, and the hash each stands for (32-byte digests)."""


def _digest_prefix(dtype: int, shape) -> bytes:
    return b"pipeguard-tensor\x00" + struct.pack(f">II{len(shape)}Q", dtype, len(shape), *shape)


def new_payload_hash(dtype: int, shape, algorithm: int = PAYLOAD_DIGEST):
    """A hash object of ``algorithm`` (a ``DigestAlgorithm``: what the header names) primed with
    dtype and shape; feed it the payload bytes. An unknown algorithm is InvalidArgument."""
    try:
        h = DIGEST_ALGORITHMS[algorithm]()
    except KeyError:
        raise InvalidArgument(f"unknown payload digest algorithm {algorithm} (known: "
                              f"{', '.join(pb.DigestAlgorithm.Name(a) for a in DIGEST_ALGORITHMS)})") from None
    h.update(_digest_prefix(dtype, shape))
    return h


def tensor_digest(t: "torch.Tensor | Packed", algorithm: int = PAYLOAD_DIGEST) -> bytes:
    """The payload digest of ``t`` under ``algorithm`` (the one ``make_header`` names by default)."""
    h = new_payload_hash(header_dtype(t), list(t.shape), algorithm)
    h.update(tensor_bytes(t))
    return h.digest()


class _Staging(threading.local):
    """A host buffer, one per thread, that device tensors are copied into to be hashed."""

    buf: torch.Tensor | None = None


_staging = _Staging()
STAGING_MIN_BYTES = 1 << 20


def staged_bytes(t: torch.Tensor) -> memoryview:
    """The bytes of ``t`` as ``tensor_bytes`` gives them, through a host buffer reused on this
    thread (pinned when CUDA is available) for a tensor on an accelerator: no allocation per
    tensor. The view is valid until the next call on this thread: consume it at once."""
    t = t.detach()
    if t.device.type == "cpu":
        return tensor_bytes(t)
    n = t.numel() * t.element_size()
    buf = _staging.buf
    if buf is None or buf.numel() < n:
        buf = torch.empty(max(n, STAGING_MIN_BYTES), dtype=torch.uint8, pin_memory=torch.cuda.is_available())
        _staging.buf = buf
    host = buf[:n].view(t.dtype).view(t.shape)
    host.copy_(t)  # synchronous: the bytes are there when it returns
    return tensor_bytes(host)


def payload_digest(header: pb.TensorHeader, t: "torch.Tensor | Packed") -> bytes:
    """The payload digest a TensorCommitment under ``header`` over ``t`` carries: the hash the
    header names (SHA-256 for a header that names none), whatever this build sends with."""
    return tensor_digest(t, header.digest_algorithm)


def state_digest(named: Iterable[tuple[str, torch.Tensor]]) -> bytes:
    """SHA-256 over (name, dtype, shape, bytes) of each tensor, in name order (so any party
    holding the same named tensors, in any order, computes the same digest). Tensors on an
    accelerator are read through one reused host buffer (``staged_bytes``)."""
    h = hashlib.sha256(b"pipeguard-state\x00")
    for name, t in sorted(named, key=lambda item: item[0]):
        raw_name = name.encode()
        h.update(struct.pack(">I", len(raw_name)) + raw_name)
        h.update(_digest_prefix(wire_dtype(t.dtype), list(t.shape)))
        h.update(staged_bytes(t))
    return h.digest()


def make_header(
    *,
    run_id: str,
    step: int,
    micro_batch: int,
    stage: int,
    direction: int,
    sender: str,
    receiver: str,
    tensor: "torch.Tensor | Packed",
    epoch: int = 0,
    digest_algorithm: int = PAYLOAD_DIGEST,
) -> pb.TensorHeader:
    return pb.TensorHeader(
        digest_algorithm=digest_algorithm,
        epoch=epoch,
        run_id=run_id,
        step=step,
        micro_batch=micro_batch,
        stage=stage,
        direction=direction,
        sender=sender,
        receiver=receiver,
        dtype=header_dtype(tensor),
        shape=list(tensor.shape),
    )


class TensorSender:
    """Turns (header, tensor) into a chunk stream; ``commitment`` is set once exhausted.

    ``chunks()`` yields ``TensorChunk`` messages; ``wire_chunks()`` yields the same messages
    already serialised (byte for byte what ``SerializeToString`` gives), built with one copy of
    the payload and hashed ahead on the worker pool. Each call starts a fresh stream.
    """

    def __init__(self, header: pb.TensorHeader, tensor: "torch.Tensor | Packed", identity: Identity, chunk_bytes: int):
        if chunk_bytes <= 0:
            raise ValueError("chunk_bytes must be positive")
        self.header = header
        self.payload = tensor_bytes(tensor)
        self.identity = identity
        self.chunk_bytes = chunk_bytes
        self.commitment: pb.TensorCommitment | None = None
        self.header_signature = identity.sign(canonical_bytes(header))
        """The first chunk's ``header_signature`` (``claims.tensor_header``)."""

    def _starts(self) -> range:
        return range(0, max(len(self.payload), 1), self.chunk_bytes)

    def _commit(self, h) -> pb.TensorCommitment:
        commitment = pb.TensorCommitment(header=self.header, payload_digest=h.digest())
        commitment.signature = self.identity.sign(canonical_bytes(commitment))
        self.commitment = commitment
        return commitment

    def chunks(self) -> Iterator[pb.TensorChunk]:
        h = new_payload_hash(self.header.dtype, self.header.shape, self.header.digest_algorithm)
        starts = self._starts()
        last = len(starts) - 1
        for i, start in enumerate(starts):
            piece = self.payload[start : start + self.chunk_bytes]
            h.update(piece)
            chunk = pb.TensorChunk(data=bytes(piece))
            if i == 0:
                chunk.header.CopyFrom(self.header)
                chunk.header_signature = self.header_signature
            if i == last:
                commitment = self._commit(h)
                chunk.payload_digest = commitment.payload_digest
                chunk.signature = commitment.signature
            yield chunk

    async def wire_chunks(self) -> AsyncIterator[bytes]:
        """Serialised ``TensorChunk``s; chunk k+1 is hashed on the worker pool while k is sent."""
        h = new_payload_hash(self.header.dtype, self.header.shape, self.header.digest_algorithm)
        starts = self._starts()
        last = len(starts) - 1
        head = pb.TensorChunk(header=self.header).SerializeToString()  # field 1
        signed_head = pb.TensorChunk(header_signature=self.header_signature).SerializeToString()  # field 5

        def build(i: int) -> bytes:  # strictly in order: build(i + 1) starts after build(i) ends
            piece = self.payload[starts[i] : starts[i] + self.chunk_bytes]
            h.update(piece)
            parts = [head] if i == 0 else []
            if len(piece):  # field 2; proto3 leaves out empty bytes
                parts += [_DATA_TAG, _varint(len(piece)), piece]
            if i == last:  # fields 3 and 4
                c = self._commit(h)
                parts.append(pb.TensorChunk(payload_digest=c.payload_digest, signature=c.signature).SerializeToString())
            if i == 0:  # field 5
                parts.append(signed_head)
            return b"".join(parts)

        loop = asyncio.get_running_loop()

        def start(i: int) -> asyncio.Future:
            if min(self.chunk_bytes, len(self.payload) - starts[i]) >= OFFLOAD_BYTES:
                return loop.run_in_executor(_pool(), build, i)
            done = loop.create_future()
            done.set_result(build(i))
            return done

        # The first chunk is built here: handing it to the pool would only add a thread hop
        # (a one-chunk activation gains nothing from the pool, and hops cost most on a busy host).
        message = build(0)
        for i in range(len(starts)):
            pending = start(i + 1) if i < last else None  # built while chunk i is written
            yield message
            if pending is not None:
                message = await pending


_DATA_TAG = bytes([(2 << 3) | 2])  # TensorChunk.data: field 2, wire type LEN


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


class WireChunk:
    """A ``TensorChunk`` read from its wire bytes (``parse_chunk``) without copying the payload:
    ``data`` is a view into those bytes; every other field is parsed by protobuf as usual."""

    __slots__ = ("raw", "start", "size", "fields")

    def __init__(self, raw: bytes, start: int, size: int, fields: pb.TensorChunk):
        self.raw = raw
        self.start = start
        """Offset of the payload slice in ``raw``."""
        self.size = size
        """Payload bytes (0 when the chunk carries none)."""
        self.fields = fields
        """The chunk's other fields (header, payload digest, signatures)."""

    @property
    def data(self) -> memoryview:
        return memoryview(self.raw)[self.start : self.start + self.size]

    @property
    def header(self) -> pb.TensorHeader:
        return self.fields.header

    @property
    def payload_digest(self) -> bytes:
        return self.fields.payload_digest

    @property
    def signature(self) -> bytes:
        return self.fields.signature

    @property
    def header_signature(self) -> bytes:
        return self.fields.header_signature

    def HasField(self, name: str) -> bool:  # noqa: N802 - the protobuf method it stands in for
        return self.fields.HasField(name)

    def ByteSize(self) -> int:  # noqa: N802
        return len(self.raw)


_DATA_FIELD_TAG = (2 << 3) | 2  # TensorChunk.data: field 2, wire type LEN


def _read_varint(raw: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    for _ in range(10):
        if pos >= len(raw):
            raise DecodeError("truncated varint")
        b = raw[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7
    raise DecodeError("varint longer than 10 bytes")


def parse_chunk(raw: bytes) -> WireChunk:
    """Parse a serialised ``TensorChunk`` (PushTensor's request parser, ``rpc.parses_requests_with``).

    Walks the top-level fields: the payload (field 2) stays where it is in ``raw``, and the rest
    (a few hundred bytes at most) is parsed by ``TensorChunk.FromString``, so every field but the
    payload has protobuf's own semantics and checks. Stricter than protobuf in one way: a chunk
    carrying its payload field twice is malformed (``DecodeError``), not "last one wins"."""
    if not isinstance(raw, bytes):
        raw = bytes(raw)
    pos, n = 0, len(raw)
    found: tuple[int, int, int] | None = None  # (tag offset, payload offset, end) of field 2
    while pos < n:
        tag_at = pos
        tag, pos = _read_varint(raw, pos)
        wire = tag & 7
        body = pos
        if wire == 0:
            _, pos = _read_varint(raw, pos)
        elif wire == 1:
            pos += 8
        elif wire == 2:
            length, body = _read_varint(raw, pos)
            pos = body + length
        elif wire == 5:
            pos += 4
        else:
            raise DecodeError(f"TensorChunk: unsupported wire type {wire} at byte {tag_at}")
        if pos > n:
            raise DecodeError(f"TensorChunk: field at byte {tag_at} runs past the message end")
        if tag == _DATA_FIELD_TAG:
            if found is not None:
                raise DecodeError("TensorChunk: payload field repeated in one chunk")
            found = (tag_at, body, pos)
    if found is None:
        return WireChunk(raw, 0, 0, pb.TensorChunk.FromString(raw))
    tag_at, body, end = found
    return WireChunk(raw, body, end - body, pb.TensorChunk.FromString(raw[:tag_at] + raw[end:]))


def _payload_of(chunk) -> tuple[bytes, int, int]:
    """(bytes object, offset, length) of a chunk's payload: a ``WireChunk``'s slice of its wire
    bytes, or a ``pb.TensorChunk``'s ``data``."""
    if isinstance(chunk, WireChunk):
        return chunk.raw, chunk.start, chunk.size
    data = chunk.data
    return data, 0, len(data)


HUGE_PAGE_BYTES = 2 * 1024 * 1024
"""Receive buffers at least this large are mapped for transparent huge pages, when the OS has them."""


def _payload_buffer(nbytes: int) -> torch.Tensor:
    """A fresh, uninitialised uint8 tensor of ``nbytes`` to receive a payload into.

    Its first write costs a page fault per page: for 16 MiB in 4 KiB pages, 4096 of them, measured
    here at 8-12 ms of system time, more than hashing it. A large buffer is therefore its own
    anonymous mapping advised for transparent huge pages (8 faults for 16 MiB; freed with the
    tensor). Where the OS has none (or THP is off) the advice is ignored: ordinary pages."""
    if nbytes < HUGE_PAGE_BYTES or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.empty(nbytes, dtype=torch.uint8)  # not bytearray: no zero fill
    m = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        m.madvise(mmap.MADV_HUGEPAGE)
    except OSError:
        pass
    return torch.frombuffer(m, dtype=torch.uint8)  # the tensor keeps the mapping alive


@dataclass
class ReceivedTensor:
    commitment: pb.TensorCommitment
    tensor: "torch.Tensor | Packed"
    """The signed payload as a wire tensor: a torch tensor of the header's dtype and shape, or a
    ``Packed`` layout (``compression.decompress`` gives its float32 values)."""


async def receive_commitment(stream: AsyncIterator[pb.TensorChunk],
                             admit: Callable[[pb.TensorHeader], PublicIdentity]) -> pb.TensorCommitment:
    """Read one tensor's signed commitment from a ``FetchTensorRequest.commitment_only`` stream:
    one chunk with the header, the payload digest and the signature and no data. ``admit`` checks
    the header and names the sender, whose signature is then checked (``claims.tensor_commitment``)."""
    try:
        chunk = await stream.__anext__()
    except StopAsyncIteration:
        raise DataLoss("the stream ended before the commitment asked for") from None
    if not chunk.HasField("header") or not chunk.signature or not chunk.payload_digest:
        raise InvalidArgument("a commitment chunk carries a header, a payload digest and a signature")
    if chunk.data:
        raise InvalidArgument("a commitment chunk carries no data")
    header = chunk.header
    if header.direction not in (pb.DIRECTION_FORWARD, pb.DIRECTION_BACKWARD):
        raise InvalidArgument(f"unknown direction enum value {header.direction}")
    payload_nbytes(header.dtype, header.shape)  # a known dtype and a sane shape
    commitment = pb.TensorCommitment(header=header, payload_digest=chunk.payload_digest, signature=chunk.signature)
    claims.tensor_commitment(commitment, admit(header))
    return commitment


async def receive_tensor(
    stream: AsyncIterator[pb.TensorChunk | WireChunk],
    *,
    max_tensor_bytes: int,
    admit: Callable[[pb.TensorHeader], PublicIdentity],
) -> ReceivedTensor:
    """Read one tensor stream, checking everything before the tensor is handed out.

    ``admit(header)`` validates the header against the receiver's expectations (run, step,
    receiver, sender, shape) and returns the sender's public identity, or raises. It runs
    on the first chunk, before any payload memory is allocated. The stream's chunks may be
    ``pb.TensorChunk``s or ``WireChunk``s (``parse_chunk``: the payload copied once, from the
    wire bytes into the tensor).
    """
    it = stream.__aiter__()
    try:
        first = await it.__anext__()
    except StopAsyncIteration:
        raise InvalidArgument("empty tensor stream") from None
    if not first.HasField("header"):
        raise InvalidArgument("first chunk of a tensor stream must carry the header")
    header = first.header
    if header.direction not in (pb.DIRECTION_FORWARD, pb.DIRECTION_BACKWARD):
        raise InvalidArgument(f"unknown direction enum value {header.direction}")
    nbytes = payload_nbytes(header.dtype, header.shape)
    if nbytes > max_tensor_bytes:
        raise ResourceExhausted(f"tensor of {nbytes} bytes exceeds the limit of {max_tensor_bytes} bytes")
    h = new_payload_hash(header.dtype, header.shape, header.digest_algorithm)  # unknown: InvalidArgument
    sender = admit(header)

    buf = _payload_buffer(nbytes)
    base = buf.data_ptr()

    def absorb(src: bytes, start: int, size: int, offset: int, _keep_alive: torch.Tensor = buf) -> None:
        # Hash the wire bytes, then copy them into place; both without the GIL. The default
        # argument keeps ``buf`` alive while a pool thread still writes into it, even if this
        # stream was abandoned; ``src`` is kept alive by the call itself.
        h.update(memoryview(src)[start : start + size])
        ctypes.memmove(base + offset, ctypes.cast(src, ctypes.c_void_p).value + start, size)

    loop = asyncio.get_running_loop()
    pending: asyncio.Future | None = None  # absorb() of the previous chunk, on the worker pool
    offset = 0
    chunk = first
    try:
        while True:
            src, start, size = _payload_of(chunk)
            end = offset + size
            if end > nbytes:
                raise InvalidArgument(f"payload longer than its shape allows ({nbytes} bytes)")
            if pending is not None:
                await pending  # one chunk in the pool at a time keeps the hash in order
                pending = None
            if size >= OFFLOAD_BYTES and not chunk.signature:  # the pool only helps if more is coming
                pending = loop.run_in_executor(_pool(), absorb, src, start, size, offset)
            elif size:
                absorb(src, start, size, offset)
            offset = end
            if chunk.signature:
                break
            try:
                chunk = await it.__anext__()
            except StopAsyncIteration:
                raise DataLoss(f"tensor stream ended after {offset} of {nbytes} bytes without a signature") from None
            if chunk.HasField("header"):
                raise InvalidArgument("header repeated inside a tensor stream")
    finally:
        if pending is not None:  # never leave a pool thread writing into an abandoned buffer
            await asyncio.wait([pending])
    if offset != nbytes:
        raise DataLoss(f"tensor stream carried {offset} bytes, header promised {nbytes}")
    commitment = pb.TensorCommitment(header=header, payload_digest=chunk.payload_digest, signature=chunk.signature)
    claims.tensor_commitment(commitment, sender)
    if h.digest() != commitment.payload_digest:
        raise DataLoss("payload bytes do not match the signed digest")
    shape = [int(d) for d in header.shape]
    if header.dtype in PACKED:
        packed = Packed(header.dtype, tuple(shape), buf)
        # a malformed layout (a NaN scale, say): InvalidArgument; a large one is checked off the loop
        if nbytes >= OFFLOAD_BYTES:
            await loop.run_in_executor(_pool(), compression.validate, packed)
        else:
            compression.validate(packed)
        return ReceivedTensor(commitment=commitment, tensor=packed)
    dtype = torch_dtype(header.dtype)
    if nbytes == 0:
        tensor = torch.empty(shape, dtype=dtype)
    else:
        tensor = buf.view(dtype).view(shape)
    return ReceivedTensor(commitment=commitment, tensor=tensor)


# -- named tensor streams (stage state) ----------------------------------------------------------


def state_chunks(named: list[tuple[str, torch.Tensor]], stage: int, completed_steps: int,
                 chunk_bytes: int) -> Iterator[pb.StateChunk]:
    """Stream (name, tensor) pairs as StateChunks of at most ``chunk_bytes`` payload each."""
    first_of_stream = True
    for name, t in named:
        payload = tensor_bytes(t)
        for start in range(0, max(len(payload), 1), chunk_bytes):
            chunk = pb.StateChunk(data=bytes(payload[start : start + chunk_bytes]), stage=stage)
            if start == 0:
                chunk.name, chunk.dtype = name, wire_dtype(t.dtype)
                chunk.shape.extend(t.shape)
            if first_of_stream:
                chunk.completed_steps = completed_steps
                first_of_stream = False
            yield chunk


class StateAssembler:
    """Rebuild named tensors from StateChunks, checking sizes against ``max_tensor_bytes``.

    A whole stream is bounded too: at most ``max_tensors`` names and ``max_total_bytes`` of
    payload (default 64 times ``max_tensor_bytes``), so a hostile peer cannot keep streaming
    new names until the deadline."""

    MAX_TENSORS = 10_000

    def __init__(self, max_tensor_bytes: int, *, max_tensors: int = MAX_TENSORS, max_total_bytes: int | None = None):
        self.max_tensor_bytes = max_tensor_bytes
        self.max_tensors = max_tensors
        self.max_total_bytes = 64 * max_tensor_bytes if max_total_bytes is None else max_total_bytes
        self._total = 0
        self.tensors: dict[str, torch.Tensor] = {}
        self.stages: dict[str, int] = {}
        self._name = ""
        self._buf = bytearray()
        self._need = 0
        self._dtype = pb.DTYPE_UNSPECIFIED
        self._shape: list[int] = []

    def add(self, chunk: pb.StateChunk) -> None:
        if chunk.name:
            self._finish()
            if chunk.name in self.tensors:
                raise InvalidArgument(f"tensor {chunk.name!r} sent twice")
            nbytes = payload_nbytes(chunk.dtype, chunk.shape)
            if nbytes > self.max_tensor_bytes:
                raise ResourceExhausted(f"tensor {chunk.name!r} of {nbytes} bytes exceeds the limit")
            if len(self.tensors) >= self.max_tensors:
                raise ResourceExhausted(f"state stream carries more than {self.max_tensors} tensors")
            if self._total + nbytes > self.max_total_bytes:
                raise ResourceExhausted(f"state stream exceeds {self.max_total_bytes} bytes at tensor {chunk.name!r}")
            self._total += nbytes
            self._name, self._dtype, self._shape = chunk.name, chunk.dtype, [int(d) for d in chunk.shape]
            self._buf, self._need = bytearray(), nbytes
            self.stages[chunk.name] = chunk.stage
        elif not self._name:
            raise InvalidArgument("state stream must start with a named chunk")
        if len(self._buf) + len(chunk.data) > self._need:
            raise InvalidArgument(f"tensor {self._name!r} carries more bytes than its shape allows")
        self._buf += chunk.data

    def _finish(self) -> None:
        if not self._name:
            return
        if len(self._buf) != self._need:
            raise DataLoss(f"tensor {self._name!r} truncated: {len(self._buf)} of {self._need} bytes")
        dtype = torch_dtype(self._dtype)
        t = torch.frombuffer(self._buf, dtype=dtype).view(self._shape) if self._need else torch.empty(
            self._shape, dtype=dtype)
        self.tensors[self._name] = t
        self._name = ""

    def finish(self) -> dict[str, torch.Tensor]:
        self._finish()
        return self.tensors


async def receive_state(chunks: AsyncIterator[pb.StateChunk], max_tensor_bytes: int, *,
                        max_tensors: int = StateAssembler.MAX_TENSORS, max_total_bytes: int | None = None
                        ) -> tuple[dict[str, torch.Tensor], pb.StateAttestation | None]:
    """A state stream (a FetchState or FetchCheckpoint reply) assembled within the limits of
    ``StateAssembler``: the named tensors, and the attestation the stream carried (None if none).
    Whether the attestation binds the state is the caller's rule (``claims.served_state``,
    ``claims.committed_state``)."""
    asm = StateAssembler(max_tensor_bytes, max_tensors=max_tensors, max_total_bytes=max_total_bytes)
    attestation = None
    async for chunk in chunks:
        if chunk.HasField("attestation"):
            attestation = chunk.attestation
        if chunk.name or chunk.data:
            asm.add(chunk)
    return asm.finish(), attestation


def signed_chunks(commitment: pb.TensorCommitment, tensor: "torch.Tensor | Packed",
                  chunk_bytes: int) -> Iterator[pb.TensorChunk]:
    """Re-stream a kept tensor exactly as its sender signed it (for audits: the original
    signature travels, so the receiver checks it against the original sender's key)."""
    payload = tensor_bytes(tensor)
    starts = range(0, max(len(payload), 1), chunk_bytes)
    last = len(starts) - 1
    for i, start in enumerate(starts):
        chunk = pb.TensorChunk(data=bytes(payload[start : start + chunk_bytes]))
        if i == 0:
            chunk.header.CopyFrom(commitment.header)
        if i == last:
            chunk.payload_digest = commitment.payload_digest
            chunk.signature = commitment.signature
        yield chunk
