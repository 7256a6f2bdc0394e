"""Tensors on the wire: raw bytes + dtype + shape, streamed in chunks, never pickled.

The first chunk carries the ``TensorHeader``; the last carries the payload digest and the
sender's signature over the ``TensorCommitment``. Sender and receiver both hash while the
chunks flow. The receiver checks the claimed size against its limit and the header against
what its stage expects *before* allocating, then assembles the bytes into one preallocated
``bytearray`` that becomes the tensor without another copy.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import struct
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Iterator

import torch

from pipeguard.errors import DataLoss, InvalidArgument, ResourceExhausted
from pipeguard.identity import Identity, PublicIdentity
from pipeguard.signing import canonical_bytes, verify
from pipeguard.v1 import pipeguard_pb2 as pb

TORCH_DTYPES: dict[int, torch.dtype] = {
    pb.DTYPE_FLOAT32: torch.float32,
    pb.DTYPE_FLOAT16: torch.float16,
    pb.DTYPE_BFLOAT16: torch.bfloat16,
    pb.DTYPE_INT64: torch.int64,
}
WIRE_DTYPES: dict[torch.dtype, int] = {v: k for k, v in TORCH_DTYPES.items()}
MAX_DIMS = 8


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


def payload_nbytes(dtype: int, shape) -> int:
    """Bytes a payload of this dtype and shape must hold; validates both."""
    item = torch.empty((), dtype=torch_dtype(dtype)).element_size()
    if len(shape) > MAX_DIMS:
        raise InvalidArgument(f"tensor has {len(shape)} dimensions; at most {MAX_DIMS} allowed")
    return item * math.prod(int(d) for d in shape)


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A zero-copy byte view of ``t`` (made contiguous and moved to CPU first if needed).

    The view keeps the tensor alive. ``bytes(t.untyped_storage())`` is far slower, and
    ``Tensor.numpy()`` needs NumPy, which pipeguard does not depend on.
    """
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


def _digest_prefix(dtype: int, shape) -> bytes:
    return b"pipeguard-tensor\x00" + struct.pack(f">II{len(shape)}Q", dtype, len(shape), *shape)


def new_payload_hash(dtype: int, shape) -> "hashlib._Hash":
    """A SHA-256 object primed with dtype and shape; feed it the payload bytes."""
    h = hashlib.sha256()
    h.update(_digest_prefix(dtype, shape))
    return h


def tensor_digest(t: torch.Tensor) -> bytes:
    """The payload digest a TensorCommitment over ``t`` would carry."""
    h = new_payload_hash(wire_dtype(t.dtype), list(t.shape))
    h.update(tensor_bytes(t))
    return h.digest()


def state_digest(named: Iterator[tuple[str, torch.Tensor]]) -> bytes:
    """SHA-256 over (name, dtype, shape, bytes) of each tensor, in the order given."""
    h = hashlib.sha256(b"pipeguard-state\x00")
    for name, t in named:
        raw_name = name.encode()
        h.update(struct.pack(">I", len(raw_name)) + raw_name)
        h.update(_digest_prefix(wire_dtype(t.dtype), list(t.shape)))
        h.update(tensor_bytes(t))
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
    tensor: torch.Tensor,
) -> pb.TensorHeader:
    return pb.TensorHeader(
        run_id=run_id,
        step=step,
        micro_batch=micro_batch,
        stage=stage,
        direction=direction,
        sender=sender,
        receiver=receiver,
        dtype=wire_dtype(tensor.dtype),
        shape=list(tensor.shape),
    )


class TensorSender:
    """Turns (header, tensor) into a chunk stream; ``commitment`` is set once exhausted."""

    def __init__(self, header: pb.TensorHeader, tensor: torch.Tensor, identity: Identity, chunk_bytes: int):
        if chunk_bytes <= 0:
            raise ValueError("chunk_bytes must be positive")
        self.header = header
        self.payload = tensor_bytes(tensor)
        self.identity = identity
        self.chunk_bytes = chunk_bytes
        self.commitment: pb.TensorCommitment | None = None

    def chunks(self) -> Iterator[pb.TensorChunk]:
        h = new_payload_hash(self.header.dtype, self.header.shape)
        n = len(self.payload)
        starts = range(0, max(n, 1), self.chunk_bytes)
        last = len(starts) - 1
        for i, start in enumerate(starts):
            piece = self.payload[start : start + self.chunk_bytes]
            h.update(piece)
            chunk = pb.TensorChunk(data=bytes(piece))
            if i == 0:
                chunk.header.CopyFrom(self.header)
            if i == last:
                commitment = pb.TensorCommitment(header=self.header, payload_digest=h.digest())
                commitment.signature = self.identity.sign(canonical_bytes(commitment))
                self.commitment = commitment
                chunk.payload_digest = commitment.payload_digest
                chunk.signature = commitment.signature
            yield chunk


@dataclass
class ReceivedTensor:
    commitment: pb.TensorCommitment
    tensor: torch.Tensor


async def receive_tensor(
    stream: AsyncIterator[pb.TensorChunk],
    *,
    max_tensor_bytes: int,
    admit: Callable[[pb.TensorHeader], PublicIdentity],
) -> ReceivedTensor:
    """Read one tensor stream, checking everything before the tensor is handed out.

    ``admit(header)`` validates the header against the receiver's expectations (run, step,
    receiver, sender, shape) and returns the sender's public identity, or raises. It runs
    on the first chunk, before any payload memory is allocated.
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
    sender = admit(header)

    buf = bytearray(nbytes)
    h = new_payload_hash(header.dtype, header.shape)
    offset = 0
    chunk = first
    while True:
        data = chunk.data
        end = offset + len(data)
        if end > nbytes:
            raise InvalidArgument(f"payload longer than its shape allows ({nbytes} bytes)")
        buf[offset:end] = data
        h.update(data)
        offset = end
        if chunk.signature:
            break
        try:
            chunk = await it.__anext__()
        except StopAsyncIteration:
            raise DataLoss(f"tensor stream ended after {offset} of {nbytes} bytes without a signature") from None
        if chunk.HasField("header"):
            raise InvalidArgument("header repeated inside a tensor stream")
    if offset != nbytes:
        raise DataLoss(f"tensor stream carried {offset} bytes, header promised {nbytes}")
    commitment = pb.TensorCommitment(header=header, payload_digest=chunk.payload_digest, signature=chunk.signature)
    verify(commitment, sender, what="tensor commitment")
    if h.digest() != commitment.payload_digest:
        raise DataLoss("payload bytes do not match the signed digest")
    dtype = torch_dtype(header.dtype)
    shape = [int(d) for d in header.shape]
    if nbytes == 0:
        tensor = torch.empty(shape, dtype=dtype)
    else:
        tensor = torch.frombuffer(buf, dtype=dtype).view(shape)
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
    """Rebuild named tensors from StateChunks, checking sizes against ``max_tensor_bytes``."""

    def __init__(self, max_tensor_bytes: int):
        self.max_tensor_bytes = max_tensor_bytes
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
