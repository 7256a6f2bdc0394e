"""The Node gRPC service in-process: a real server on port 0, real stubs, hostile peers.

The node under test serves the middle stage of a three-stage run. The test plays every other
party with real Ed25519 keys: the coordinator (signs orders), the previous and next stages
(push activations and gradients), a stranger, and a sink server that receives what the node
sends on. Each hostile message must be answered with its precise status code, counted against
the peer that claimed to send it, and leave the node serving: a valid push still succeeds.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import logging
import math
import re
import tracemalloc
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
import torch

from node.membership import Membership
from node.peers import PeerPool
from node.service import ANONYMOUS, FETCH_QUEUE, NodeService
from node.stage import StageRuntime
from pipeguard import audit, claims
from pipeguard.config import NetConfig, TimeoutConfig
from pipeguard.data import Dataset
from pipeguard.rpc import server_options
from pipeguard.errors import PipeguardError
from pipeguard.identity import Identity
from pipeguard.model import GPTConfig, OptimSettings, StageModule, lr_at, make_optimizer, named_state, partition
from pipeguard.signing import canonical_bytes, sign, verify
from pipeguard.compression import Packed, compress, decompress
from pipeguard.tensors import (TensorSender, make_header, new_payload_hash, payload_digest, receive_tensor, state_digest,
                               wire_nbytes)
from pipeguard.v1 import pipeguard_pb2 as pb
from pipeguard.v1 import pipeguard_pb2_grpc as pb_grpc

pytestmark = [pytest.mark.grpc, pytest.mark.timeout(60)]

RUN = "run-node-service"
SEED = 21
GPT = GPTConfig(block_size=8, vocab_size=256, n_layer=3, n_head=2, n_embd=16)
MICRO_BATCHES, MICRO_BATCH_SIZE = 2, 2
ACT_SHAPE = [MICRO_BATCH_SIZE, GPT.block_size, GPT.n_embd]  # (B, T, C): 1 KiB of float32
STAGE = 1
MAX_TENSOR_BYTES = 64 * 1024
CHUNK_BYTES = 256  # so every tensor travels in several chunks
DEADLINE = 10.0
OPTIM = OptimSettings(lr=1e-3, warmup_steps=2, total_steps=10)
FORWARD, BACKWARD = pb.DIRECTION_FORWARD, pb.DIRECTION_BACKWARD
NET = NetConfig(chunk_bytes=16 * 1024, max_message_bytes=1024 * 1024, max_tensor_bytes=MAX_TENSOR_BYTES)


# -- the test bed ------------------------------------------------------------------------------


class Sink(pb_grpc.NodeServicer):
    """Stands in for the neighbours' servers: verifies and keeps what the node sends them."""

    def __init__(self, node: Identity):
        self.node = node
        self.received: list[pb.TensorCommitment] = []
        self.tensors: list = []
        """The wire tensors received, in order."""

    async def PushTensor(self, request_iterator, context):
        rt = await receive_tensor(request_iterator, max_tensor_bytes=MAX_TENSOR_BYTES,
                                  admit=lambda header: self.node.public())
        self.received.append(rt.commitment)
        self.tensors.append(rt.tensor)
        return pb.PushReply(received_bytes=wire_nbytes(rt.tensor))


@dataclass
class Bed:
    node: Identity
    coord: Identity
    prev: Identity
    next: Identity
    stranger: Identity
    service: NodeService
    runtime: StageRuntime
    stub: pb_grpc.NodeStub
    sink: Sink
    sink_address: str
    assign_reply: pb.AssignReply | None = None
    epoch: int = 0
    step: int = 0
    attempt: int = 0
    """Attempt of the step the test's tensors carry (RunStepRequest.attempt)."""
    pushed: int = field(default=0)
    address: str = ""
    wire_dtype: str = "fp32"
    """The run's ``train.wire_dtype`` (what the test's tensors travel as)."""

    def peer_info(self, ident: Identity, stage: int) -> pb.PeerInfo:
        info = pb.PeerInfo(node_id=ident.node_id, address=self.sink_address, public_key=ident.public_key)
        if "stage" in pb.PeerInfo.DESCRIPTOR.fields_by_name:  # the schema is growing a stage per peer
            info.stage = stage
        return info

    def assign_request(self, epoch: int, **overrides) -> pb.AssignRequest:
        req = pb.AssignRequest(
            run_id=RUN, epoch=epoch, stage=STAGE, num_stages=3, node_id=self.node.node_id,
            model=pb.ModelSpec(block_size=GPT.block_size, vocab_size=GPT.vocab_size, n_layer=GPT.n_layer,
                               n_head=GPT.n_head, n_embd=GPT.n_embd),
            train=pb.TrainSpec(seed=SEED, micro_batches=MICRO_BATCHES, micro_batch_size=MICRO_BATCH_SIZE,
                               lr=OPTIM.lr, warmup_steps=OPTIM.warmup_steps, total_steps=OPTIM.total_steps,
                               min_lr_ratio=OPTIM.min_lr_ratio, weight_decay=OPTIM.weight_decay,
                               beta1=OPTIM.beta1, beta2=OPTIM.beta2, grad_clip=OPTIM.grad_clip,
                               wire_dtype="" if self.wire_dtype == "fp32" else self.wire_dtype),
            prev=self.peer_info(self.prev, STAGE - 1), next=self.peer_info(self.next, STAGE + 1),
            data_digest=DATASET.digest,
            start_step=0,
        )
        for name, value in overrides.items():
            setattr(req, name, value)
        return req

    def tensor_chunks(self, sender: Identity | None = None, *, signer: Identity | None = None,
                      step: int | None = None, micro_batch: int = 0, direction: int = FORWARD,
                      stage: int | None = None, receiver: str | None = None, run_id: str = RUN,
                      tensor: torch.Tensor | None = None, digest_algorithm: int | None = None
                      ) -> list[pb.TensorChunk]:
        """A signed chunk stream; by default a valid activation from the previous stage."""
        sender = sender or self.prev
        if stage is None:
            stage = STAGE - 1 if direction == FORWARD else STAGE + 1
        if tensor is None:
            tensor = compress(torch.randn(ACT_SHAPE, generator=torch.Generator().manual_seed(self.pushed)),
                              self.wire_dtype)
            self.pushed += 1
        header = make_header(run_id=run_id, step=self.step if step is None else step, micro_batch=micro_batch,
                             stage=stage, direction=direction, sender=sender.node_id,
                             receiver=receiver or self.node.node_id, tensor=tensor, epoch=self.epoch)
        header.attempt = self.attempt
        if digest_algorithm is not None:
            header.digest_algorithm = digest_algorithm
        return list(TensorSender(header, tensor, signer or sender, CHUNK_BYTES).chunks())

    async def push(self, chunks: list[pb.TensorChunk]) -> tuple[grpc.StatusCode, str]:
        try:
            await self.stub.PushTensor(iter(chunks), timeout=DEADLINE)
        except grpc.aio.AioRpcError as err:
            return err.code(), err.details() or ""
        return grpc.StatusCode.OK, ""

    async def order(self, method: str, request, signer: Identity | None = None, unsigned: bool = False):
        """Call an order RPC, signed by ``signer`` (default: the coordinator) unless ``unsigned``."""
        if not unsigned:
            sign(request, signer or self.coord)
        return await getattr(self.stub, method)(request, timeout=DEADLINE)

    def stats(self) -> dict[str, tuple[int, int, str]]:
        return {peer: (s.accepted, s.rejected, s.last_reason) for peer, s in self.service.peer_stats.items()}

    def unattributed(self) -> dict[str, int]:
        return {peer: s.unattributed for peer, s in self.service.peer_stats.items() if s.unattributed}


g = torch.Generator().manual_seed(0)
DATASET = Dataset(blob=bytes(torch.randint(0, 256, (4096,), generator=g, dtype=torch.uint8).tolist()),
                  val_offset=3072)


@contextlib.asynccontextmanager
async def node_bed(home: Path, *, registered: bool = True, assigned: bool = True, wire_dtype: str = "fp32",
                   **service_options):
    node, coord, prev, nxt, stranger = (Identity.generate() for _ in range(5))
    DATASET.save(_cache_path(home))  # Assign finds the dataset in the node's cache, no coordinator needed

    sink = Sink(node)
    sink_server = grpc.aio.server(options=NET.grpc_options())
    pb_grpc.add_NodeServicer_to_server(sink, sink_server)
    sink_port = sink_server.add_insecure_port("127.0.0.1:0")
    await sink_server.start()

    timeouts = TimeoutConfig(request=DEADLINE, step=DEADLINE, retry_backoff=0.05, retry_max=0.2)
    peers = PeerPool(node, NET, timeouts)
    runtime = StageRuntime(node, peers, timeouts)
    service: NodeService | None = None
    # Points at a port nothing listens on; run() is never called, the test plays the coordinator.
    membership = Membership(node, "127.0.0.1:9", "", home, NET, timeouts, stats=lambda: service.heartbeat_stats())
    if registered:
        membership.coordinator_key, membership.run_id = coord.public(), RUN
    service = NodeService(node, runtime, membership, MAX_TENSOR_BYTES, NET.chunk_bytes, **service_options)
    server = grpc.aio.server(**server_options(NET))
    pb_grpc.add_NodeServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=NET.grpc_options())
    bed = Bed(node=node, coord=coord, prev=prev, next=nxt, stranger=stranger, service=service, runtime=runtime,
              stub=pb_grpc.NodeStub(channel), sink=sink, sink_address=f"127.0.0.1:{sink_port}",
              address=f"127.0.0.1:{port}", wire_dtype=wire_dtype)
    try:
        if assigned:
            bed.epoch = 1
            bed.assign_reply = await bed.order("Assign", bed.assign_request(epoch=1))
        yield bed
    finally:
        await channel.close()
        await server.stop(None)
        await sink_server.stop(None)
        runtime.close()
        await peers.close()
        await membership.close()


def _cache_path(home: Path) -> Path:
    path = home / "data" / f"{DATASET.digest.hex()}.bin"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def run(coro):
    return asyncio.run(coro)


async def run_one_step(bed: Bed) -> tuple[pb.StepReport, pb.UpdateReport]:
    """Drive one whole step as coordinator and both neighbours; the node's state moves on."""
    for mb in range(MICRO_BATCHES):
        assert await bed.push(bed.tensor_chunks(micro_batch=mb)) == (grpc.StatusCode.OK, "")
        grad = bed.tensor_chunks(bed.next, micro_batch=mb, direction=BACKWARD)
        assert await bed.push(grad) == (grpc.StatusCode.OK, "")
    report = await bed.order("RunStep", pb.RunStepRequest(run_id=RUN, epoch=bed.epoch, step=bed.step,
                                                          node_id=bed.node.node_id))
    lr = lr_at(bed.step, OPTIM)
    update = await bed.order("ApplyUpdate", pb.ApplyUpdateRequest(
        run_id=RUN, epoch=bed.epoch, step=bed.step, node_id=bed.node.node_id,
        global_grad_norm=math.sqrt(report.grad_sq_norm), lr=lr))
    bed.step += 1
    return report, update


async def attested_state(bed: Bed, step: int) -> pb.StateAttestation:
    """FetchState of the state at the start of ``step``, as the coordinator asks; its attestation."""
    request = sign(pb.FetchStateRequest(run_id=RUN, node_id=bed.node.node_id, step=step, stage=STAGE,
                                        include_optimizer=True), bed.coord)
    chunks = [c async for c in bed.stub.FetchState(request, timeout=DEADLINE)]
    assert chunks[-1].HasField("attestation")
    return chunks[-1].attestation


# -- a healthy node --------------------------------------------------------------------------


def test_assign_commits_to_the_stage_the_order_describes(tmp_path):
    async def scenario():
        async with node_bed(tmp_path) as bed:
            module = StageModule(GPT, partition(GPT, 3)[STAGE], SEED)
            opt = make_optimizer(module, OPTIM)
            # the digest the node commits to is that of the stage anyone can rebuild from the run seed
            assert bed.assign_reply.state_digest == state_digest(named_state(module, opt))
            assert bed.assign_reply.num_params == sum(p.numel() for p in module.parameters())
            assert bed.service.epoch == 1

    run(scenario())


def test_middle_stage_runs_a_signed_step_over_grpc(tmp_path):
    async def scenario():
        async with node_bed(tmp_path) as bed:
            report, update = await run_one_step(bed)

            verify(report, bed.node.public(), what="step report")
            verify(update, bed.node.public(), what="update report")
            assert (report.run_id, report.step, report.stage, report.node_id) == (RUN, 0, STAGE, bed.node.node_id)
            assert report.state_digest == bed.assign_reply.state_digest, "commits to the state it started from"
            assert report.micro_batches == MICRO_BATCHES and report.grad_sq_norm > 0
            assert update.state_digest != report.state_digest, "the update moved the weights"

            # it sent one activation forward and one gradient back per micro-batch, each signed for its receiver
            sent = sorted((c.header.direction, c.header.micro_batch, c.header.receiver) for c in bed.sink.received)
            assert sent == sorted([(FORWARD, mb, bed.next.node_id) for mb in range(MICRO_BATCHES)]
                                  + [(BACKWARD, mb, bed.prev.node_id) for mb in range(MICRO_BATCHES)])
            assert all(c.header.stage == STAGE and c.header.step == 0 for c in bed.sink.received)

            hb = bed.service.heartbeat_stats()
            assert (hb.tensors_sent, hb.tensors_received, hb.tensors_rejected) == (4, 4, 0)
            assert bed.stats() == {bed.prev.node_id: (2, 0, ""), bed.next.node_id: (2, 0, "")}

            # the next step's tensors are welcome now
            assert await bed.push(bed.tensor_chunks(step=1)) == (grpc.StatusCode.OK, "")

    run(scenario())


# -- hostile tensors ---------------------------------------------------------------------------


class Fault(enum.Enum):
    BAD_SIGNATURE = "signature bytes flipped"
    IMPERSONATION = "claims to be the previous stage, signed with another key"
    UNKNOWN_SENDER = "signed by a key the node does not know"
    BANNED_SENDER = "sender is on the ban list"
    NOT_THE_NEIGHBOUR = "the next stage sends an activation"
    WRONG_DIRECTION = "the previous stage sends a gradient"
    WRONG_STAGE = "the previous stage claims another stage index"
    WRONG_RECEIVER = "addressed to another node"
    WRONG_SHAPE = "activation of the wrong shape"
    WRONG_DTYPE = "activation of the wrong dtype"
    MICRO_BATCH_OUT_OF_RANGE = "micro-batch index beyond the step's micro-batches"
    WRONG_RUN = "tensor of another run"
    REPLAY = "a valid message sent twice"
    STALE_STEP = "tensor for a step already applied"
    FUTURE_STEP = "tensor for a step not yet started"
    OVERSIZED = "claimed size over max_tensor_bytes"
    TRUNCATED = "stream ends before the signed last chunk"
    EXTRA_BYTES = "more payload than the shape allows"
    PAYLOAD_TAMPERED = "payload bytes changed after signing"
    DIGEST_REPLACED = "payload changed and its digest recomputed, signature kept"
    NO_HEADER = "first chunk without a header"
    HEADER_UNSIGNED = "first chunk without the header signature"
    HEADER_SIGNATURE_FLIPPED = "header signature bytes flipped"
    UNKNOWN_DIGEST_ALGORITHM = "a signed header naming a payload digest algorithm nobody knows"


C = grpc.StatusCode
# fault -> (status, who is charged, a regex the details match). Charged: "prev"/"next" (its
# ``rejected`` count, what refusal attribution reads, grows: it signed the header of something an
# honest sender never sends), "prev?" (it signed the header, but an honest slow or retrying
# sender gets this refusal too: only its ``unattributed`` count grows) or "nobody" (no valid
# header signature of the sender it names: the anonymous bucket).
EXPECTED = {
    Fault.BAD_SIGNATURE: (C.UNAUTHENTICATED, "prev", "bad signature"),
    Fault.IMPERSONATION: (C.UNAUTHENTICATED, "nobody", "bad header signature"),
    Fault.UNKNOWN_SENDER: (C.UNAUTHENTICATED, "nobody", "unknown sender"),
    Fault.BANNED_SENDER: (C.PERMISSION_DENIED, "prev", "banned"),
    Fault.NOT_THE_NEIGHBOUR: (C.PERMISSION_DENIED, "next", "does not serve stage 0|not the previous stage"),
    Fault.WRONG_DIRECTION: (C.PERMISSION_DENIED, "prev", "does not serve stage 2|not the next stage"),
    Fault.WRONG_STAGE: (C.PERMISSION_DENIED, "prev", "does not serve stage 0|not the previous stage"),
    Fault.WRONG_RECEIVER: (C.INVALID_ARGUMENT, "nobody", "not this node"),  # anyone may forward a stream
    Fault.WRONG_SHAPE: (C.INVALID_ARGUMENT, "prev", r"expected float32 \[2, 8, 16\], .*shape \[2, 9, 16\]"),
    Fault.WRONG_DTYPE: (C.INVALID_ARGUMENT, "prev", r"expected float32 \[2, 8, 16\], got dtype 2 "),
    Fault.MICRO_BATCH_OUT_OF_RANGE: (C.INVALID_ARGUMENT, "prev", "out of range"),
    Fault.WRONG_RUN: (C.FAILED_PRECONDITION, "prev?", "tensor is for run"),
    Fault.REPLAY: (C.ALREADY_EXISTS, "prev?", "replay"),
    Fault.STALE_STEP: (C.FAILED_PRECONDITION, "prev?", "this stage is at step 1"),
    Fault.FUTURE_STEP: (C.FAILED_PRECONDITION, "prev?", "this stage is at step 0"),
    Fault.OVERSIZED: (C.RESOURCE_EXHAUSTED, "prev", "exceeds the limit"),
    Fault.TRUNCATED: (C.DATA_LOSS, "prev", "without a signature"),
    Fault.EXTRA_BYTES: (C.INVALID_ARGUMENT, "prev", "longer than its shape allows"),
    # The signature covers the claimed digest and is checked first; the bytes are then
    # compared with it. So changed bytes under an intact signature are DATA_LOSS (errors.DataLoss:
    # "payload bytes do not match their signed digest"), and a recomputed digest breaks the
    # signature: UNAUTHENTICATED.
    Fault.PAYLOAD_TAMPERED: (C.DATA_LOSS, "prev", "do not match the signed digest"),
    Fault.DIGEST_REPLACED: (C.UNAUTHENTICATED, "prev", "bad signature"),
    Fault.NO_HEADER: (C.INVALID_ARGUMENT, "nobody", "must carry the header"),
    Fault.HEADER_UNSIGNED: (C.UNAUTHENTICATED, "nobody", "bad header signature"),
    Fault.HEADER_SIGNATURE_FLIPPED: (C.UNAUTHENTICATED, "nobody", "bad header signature"),
    Fault.UNKNOWN_DIGEST_ALGORITHM: (C.INVALID_ARGUMENT, "prev", "unknown payload digest algorithm 99"),
}


def _replace(chunks: list[pb.TensorChunk], i: int, **fields) -> list[pb.TensorChunk]:
    c = pb.TensorChunk()
    c.CopyFrom(chunks[i])
    for name, value in fields.items():
        if name == "header":
            c.header.CopyFrom(value)
        else:
            setattr(c, name, value)
    return chunks[:i] + [c] + chunks[i + 1:]


def _flip(b: bytes) -> bytes:
    return bytes([b[0] ^ 0x01]) + b[1:]


def unknown_algorithm_chunks(bed: Bed, algorithm: int) -> list[pb.TensorChunk]:
    """A valid stream whose header, re-signed by its sender, names ``algorithm`` (no sender of
    this build can hash with it, so the header is rewritten after the fact)."""
    chunks = bed.tensor_chunks()
    header = pb.TensorHeader()
    header.CopyFrom(chunks[0].header)
    header.digest_algorithm = algorithm
    commitment = sign(pb.TensorCommitment(header=header, payload_digest=chunks[-1].payload_digest), bed.prev)
    chunks = _replace(chunks, 0, header=header, header_signature=bed.prev.sign(canonical_bytes(header)))
    return _replace(chunks, -1, signature=commitment.signature)


async def hostile(bed: Bed, fault: Fault) -> list[pb.TensorChunk]:
    """Set the scene for ``fault`` and return the offending stream (always for micro-batch 0)."""
    if fault is Fault.BAD_SIGNATURE:
        chunks = bed.tensor_chunks()
        return _replace(chunks, -1, signature=_flip(chunks[-1].signature))
    if fault is Fault.IMPERSONATION:
        return bed.tensor_chunks(bed.prev, signer=bed.stranger)
    if fault is Fault.UNKNOWN_SENDER:
        return bed.tensor_chunks(bed.stranger)
    if fault is Fault.BANNED_SENDER:
        bed.runtime.banned = {bed.prev.node_id}  # what Membership.on_banned does on a heartbeat reply
        return bed.tensor_chunks()
    if fault is Fault.NOT_THE_NEIGHBOUR:
        return bed.tensor_chunks(bed.next, direction=FORWARD, stage=STAGE - 1)
    if fault is Fault.WRONG_DIRECTION:
        return bed.tensor_chunks(bed.prev, direction=BACKWARD, stage=STAGE - 1)
    if fault is Fault.WRONG_STAGE:
        return bed.tensor_chunks(stage=STAGE + 1)
    if fault is Fault.WRONG_RECEIVER:
        return bed.tensor_chunks(receiver=bed.next.node_id)
    if fault is Fault.WRONG_SHAPE:
        return bed.tensor_chunks(tensor=torch.randn(ACT_SHAPE[0], ACT_SHAPE[1] + 1, ACT_SHAPE[2]))
    if fault is Fault.WRONG_DTYPE:
        return bed.tensor_chunks(tensor=torch.randn(ACT_SHAPE).to(torch.float16))
    if fault is Fault.MICRO_BATCH_OUT_OF_RANGE:
        return bed.tensor_chunks(micro_batch=MICRO_BATCHES)
    if fault is Fault.WRONG_RUN:
        return bed.tensor_chunks(run_id="another-run")
    if fault is Fault.REPLAY:
        chunks = bed.tensor_chunks()
        assert await bed.push(chunks) == (C.OK, "")
        return chunks
    if fault is Fault.STALE_STEP:
        await run_one_step(bed)
        return bed.tensor_chunks(step=bed.step - 1)
    if fault is Fault.FUTURE_STEP:
        return bed.tensor_chunks(step=bed.step + 1)
    if fault is Fault.OVERSIZED:
        header = bed.tensor_chunks()[0].header
        del header.shape[:]
        header.shape.extend([1024, 1024, 16])  # 64 MiB of float32 against a 64 KiB limit
        return [pb.TensorChunk(header=header, header_signature=bed.prev.sign(canonical_bytes(header)),
                               data=b"\x00" * 64)]
    if fault is Fault.TRUNCATED:
        chunks = bed.tensor_chunks()
        assert len(chunks) == 4
        return chunks[:-1]
    if fault is Fault.EXTRA_BYTES:
        chunks = bed.tensor_chunks()
        return _replace(chunks, -1, data=chunks[-1].data + b"\x00\x00\x00\x00")
    if fault is Fault.PAYLOAD_TAMPERED:
        chunks = bed.tensor_chunks()
        return _replace(chunks, 1, data=_flip(chunks[1].data))
    if fault is Fault.DIGEST_REPLACED:
        chunks = _replace(bed.tensor_chunks(), 1, data=b"\x00" * CHUNK_BYTES)
        h = new_payload_hash(pb.DTYPE_FLOAT32, ACT_SHAPE)
        for c in chunks:
            h.update(c.data)
        return _replace(chunks, -1, payload_digest=h.digest())
    if fault is Fault.NO_HEADER:
        chunks = bed.tensor_chunks()
        first = pb.TensorChunk()
        first.CopyFrom(chunks[0])
        first.ClearField("header")
        return [first] + chunks[1:]
    if fault is Fault.HEADER_UNSIGNED:
        chunks = bed.tensor_chunks()
        return _replace(chunks, 0, header_signature=b"")
    if fault is Fault.HEADER_SIGNATURE_FLIPPED:
        chunks = bed.tensor_chunks()
        return _replace(chunks, 0, header_signature=_flip(chunks[0].header_signature))
    if fault is Fault.UNKNOWN_DIGEST_ALGORITHM:
        return unknown_algorithm_chunks(bed, 99)
    raise AssertionError(f"no scenario for {fault}")


@pytest.mark.parametrize("fault", list(Fault), ids=lambda f: f.name.lower())
def test_hostile_tensor_is_refused_counted_and_survived(tmp_path, fault):
    code, charged, fragment = EXPECTED[fault]

    async def scenario():
        async with node_bed(tmp_path) as bed:
            chunks = await hostile(bed, fault)
            peer = {"prev": bed.prev.node_id, "prev?": bed.prev.node_id, "next": bed.next.node_id,
                    "nobody": ANONYMOUS}[charged]
            before = bed.stats()
            unattributed_before = bed.unattributed()
            received_before = bed.service.heartbeat_stats().tensors_received

            tracemalloc.start()
            try:
                got_code, details = await bed.push(chunks)
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()

            assert got_code == code, f"{fault.value}: expected {code.name}, got {got_code.name} ({details})"
            assert re.search(fragment, details), details
            assert peak < 16 * 1024 * 1024, f"{fault.value}: {peak} bytes allocated while refusing"

            # charged to the peer that signed the header of what it did wrong, nobody else; a refusal
            # an honest sender can get too, or one without its signature, is charged to no node
            acc, rej, _ = before.get(peer, (0, 0, ""))
            if charged == "prev?":
                assert bed.stats()[peer] == (acc, rej, code.name)
                assert bed.unattributed() == {**unattributed_before, peer: unattributed_before.get(peer, 0) + 1}
            else:
                assert bed.stats()[peer] == (acc, rej + 1, code.name)
                assert bed.unattributed() == unattributed_before
            assert {p: s for p, s in bed.stats().items() if p != peer} == \
                {p: s for p, s in before.items() if p != peer}
            hb = bed.service.heartbeat_stats()
            assert hb.tensors_rejected == 1
            assert hb.tensors_received == received_before
            assert {p.peer: (p.rejected, p.last_reason) for p in hb.peers}[peer] == (
                rej + (charged != "prev?"), code.name)
            charged_nodes = {p.peer for p in hb.peers if p.rejected and p.peer != ANONYMOUS}
            assert charged_nodes <= ({peer} if charged in ("prev", "next") else set()), \
                "nobody is charged for what it did not sign"

            # and the node keeps serving: a valid activation is still accepted
            bed.runtime.banned = set()
            assert await bed.push(bed.tensor_chunks(micro_batch=1)) == (C.OK, "")
            assert bed.stats()[bed.prev.node_id][0] == before.get(bed.prev.node_id, (0, 0, ""))[0] + 1

    run(scenario())


@pytest.mark.parametrize("algorithm", [pb.DIGEST_ALGORITHM_UNSPECIFIED, pb.DIGEST_ALGORITHM_SHA256,
                                       pb.DIGEST_ALGORITHM_BLAKE3], ids=lambda a: pb.DigestAlgorithm.Name(a))
def test_tensors_under_every_known_digest_algorithm_are_accepted(tmp_path, algorithm):
    """A sender naming SHA-256 (explicitly, or by naming nothing, as before the field existed) is
    as welcome as one using this build's BLAKE3; the commitment kept names what was signed."""
    async def scenario():
        async with node_bed(tmp_path) as bed:
            assert await bed.push(bed.tensor_chunks(digest_algorithm=algorithm)) == (C.OK, "")
            kept = bed.runtime.admission.inbox[(bed.step, FORWARD, 0)]
            assert kept.commitment.header.digest_algorithm == algorithm
            assert kept.commitment.payload_digest == payload_digest(kept.commitment.header, kept.tensor)

    run(scenario())


# -- a compressed wire (train.wire_dtype = "int8") ------------------------------------------------


def test_int8_wire_step_sends_and_takes_compressed_tensors(tmp_path):
    """Under an int8 run the node takes int8 block payloads, computes on their float32 values, and
    sends its own outputs as int8 blocks, signed over the compressed bytes."""
    async def scenario():
        async with node_bed(tmp_path, wire_dtype="int8") as bed:
            report, _ = await run_one_step(bed)
            assert report.micro_batches == MICRO_BATCHES
            assert {c.header.dtype for c in bed.sink.received} == {pb.DTYPE_INT8_BLOCK64}
            assert all(isinstance(t, Packed) and t.nbytes == 4 * 4 + 2 * 8 * 16 for t in bed.sink.tensors)
            for c, t in zip(bed.sink.received, bed.sink.tensors):
                assert c.payload_digest == payload_digest(c.header, t), "signed over the compressed bytes"
            kept = bed.runtime.kept_tensor(0, FORWARD, 0, False)
            assert isinstance(kept.tensor, Packed), "kept for audits as it was signed"
            assert bed.runtime.computation.setup.wire_dtype == "int8", "from the signed assignment"

    run(scenario())


def _nan_scale(bed: Bed) -> list[pb.TensorChunk]:
    w = compress(torch.randn(ACT_SHAPE), "int8")
    raw = bytearray(w.payload.tolist())
    raw[0:4] = bytes(torch.tensor([float("nan")]).view(torch.uint8).tolist())
    return bed.tensor_chunks(tensor=Packed(w.dtype, w.shape, torch.tensor(list(raw), dtype=torch.uint8)))


def _short(bed: Bed) -> list[pb.TensorChunk]:
    chunks = bed.tensor_chunks()
    return _replace(chunks, -1, data=chunks[-1].data[:-1])


@pytest.mark.parametrize("case,code,fragment", [
    ("nan scale", C.INVALID_ARGUMENT, "scale of block 0 is not finite"),
    ("a byte too many", C.INVALID_ARGUMENT, "longer than its shape allows"),
    ("a byte too few", C.DATA_LOSS, "header promised 272"),
    ("float32 to an int8 run", C.INVALID_ARGUMENT, r"expected int8 blocks \(DTYPE_INT8_BLOCK64\) \[2, 8, 16\]"),
])
def test_malformed_int8_payload_is_refused_and_the_node_keeps_serving(tmp_path, case, code, fragment):
    async def scenario():
        async with node_bed(tmp_path, wire_dtype="int8") as bed:
            if case == "nan scale":
                chunks = _nan_scale(bed)
            elif case == "a byte too many":
                chunks = bed.tensor_chunks()
                chunks = _replace(chunks, -1, data=chunks[-1].data + b"\x00")
            elif case == "a byte too few":
                chunks = _short(bed)
            else:
                chunks = bed.tensor_chunks(tensor=torch.randn(ACT_SHAPE))
            got, details = await bed.push(chunks)
            assert got == code and re.search(fragment, details), (got, details)
            assert bed.stats()[bed.prev.node_id][1] == 1, "charged to the sender that signed it"
            assert (bed.step, FORWARD, 0) not in bed.runtime.admission.inbox
            assert await bed.push(bed.tensor_chunks(micro_batch=1)) == (C.OK, "")
            got = bed.runtime.admission.inbox[(bed.step, FORWARD, 1)].tensor
            assert isinstance(got, Packed) and decompress(got).dtype == torch.float32

    run(scenario())


def test_unknown_digest_algorithm_is_logged_and_the_node_keeps_serving(tmp_path, caplog):
    async def scenario():
        async with node_bed(tmp_path) as bed:
            with caplog.at_level(logging.WARNING):
                code, details = await bed.push(unknown_algorithm_chunks(bed, 7))
            assert code == C.INVALID_ARGUMENT and "unknown payload digest algorithm 7" in details
            assert any("PushTensor rejected: INVALID_ARGUMENT" in r.getMessage() and "algorithm 7" in r.getMessage()
                       for r in caplog.records), [r.getMessage() for r in caplog.records]
            assert await bed.push(bed.tensor_chunks(micro_batch=1)) == (C.OK, "")

    run(scenario())


def test_valid_gradient_from_the_next_stage_is_accepted(tmp_path):
    async def scenario():
        async with node_bed(tmp_path) as bed:
            chunks = bed.tensor_chunks(bed.next, direction=BACKWARD)
            assert await bed.push(chunks) == (C.OK, "")
            assert bed.stats() == {bed.next.node_id: (1, 0, "")}
            # the same gradient again is a replay: refused, but charged to nobody (an honest sender
            # whose first reply was lost sends it again too)
            assert (await bed.push(chunks))[0] == C.ALREADY_EXISTS
            assert bed.stats() == {bed.next.node_id: (1, 0, "ALREADY_EXISTS")}
            assert bed.unattributed() == {bed.next.node_id: 1}

    run(scenario())


def test_tensors_before_assignment_are_refused(tmp_path):
    async def scenario():
        async with node_bed(tmp_path, assigned=False) as bed:
            code, details = await bed.push(bed.tensor_chunks())
            assert code == C.FAILED_PRECONDITION and "serves no stage" in details

    run(scenario())


# -- hostile orders ------------------------------------------------------------------------------


class OrderFault(enum.Enum):
    ASSIGN_FROM_ROGUE = "Assign signed by a key that is not the coordinator's"
    RUN_STEP_FROM_ROGUE = "RunStep signed by a key that is not the coordinator's"
    APPLY_UPDATE_FROM_ROGUE = "ApplyUpdate signed by a rogue key"
    ABORT_FROM_ROGUE = "AbortStep signed by a rogue key"
    FETCH_STATE_FROM_ROGUE = "FetchState signed by a rogue key"
    RUN_STEP_UNSIGNED = "RunStep without a signature"
    RUN_STEP_SIGNED_BY_NEIGHBOUR = "RunStep signed by a pipeline neighbour"
    RUN_STEP_TAMPERED = "RunStep changed after the coordinator signed it"
    RUN_STEP_FOR_ANOTHER_NODE = "RunStep addressed to another node"
    RUN_STEP_OTHER_RUN = "RunStep of another run"
    RUN_STEP_OLD_EPOCH = "RunStep for an assignment epoch the node does not hold"
    ASSIGN_OLD_EPOCH = "Assign not newer than the current assignment"
    ASSIGN_PEER_KEY_MISMATCH = "Assign names a peer whose id does not match its key"
    NOT_REGISTERED = "any order before the node registered with a coordinator"


ORDER_EXPECTED = {
    OrderFault.ASSIGN_FROM_ROGUE: (C.UNAUTHENTICATED, "bad signature on assign order"),
    OrderFault.RUN_STEP_FROM_ROGUE: (C.UNAUTHENTICATED, "bad signature on run-step order"),
    OrderFault.APPLY_UPDATE_FROM_ROGUE: (C.UNAUTHENTICATED, "bad signature on apply-update order"),
    OrderFault.ABORT_FROM_ROGUE: (C.UNAUTHENTICATED, "bad signature on abort-step order"),
    OrderFault.FETCH_STATE_FROM_ROGUE: (C.UNAUTHENTICATED, "bad signature on fetch-state"),
    OrderFault.RUN_STEP_UNSIGNED: (C.UNAUTHENTICATED, "bad signature"),
    OrderFault.RUN_STEP_SIGNED_BY_NEIGHBOUR: (C.UNAUTHENTICATED, "bad signature"),
    OrderFault.RUN_STEP_TAMPERED: (C.UNAUTHENTICATED, "bad signature"),
    OrderFault.RUN_STEP_FOR_ANOTHER_NODE: (C.INVALID_ARGUMENT, "not this node"),
    OrderFault.RUN_STEP_OTHER_RUN: (C.FAILED_PRECONDITION, "another-run"),
    OrderFault.RUN_STEP_OLD_EPOCH: (C.FAILED_PRECONDITION, "epoch"),
    OrderFault.ASSIGN_OLD_EPOCH: (C.FAILED_PRECONDITION, "not newer"),
    OrderFault.ASSIGN_PEER_KEY_MISMATCH: (C.INVALID_ARGUMENT, "does not match its public key"),
    OrderFault.NOT_REGISTERED: (C.FAILED_PRECONDITION, "not registered"),
}


async def hostile_order(bed: Bed, fault: OrderFault):
    rogue = Identity.generate()
    me = bed.node.node_id
    step = pb.RunStepRequest(run_id=RUN, epoch=bed.epoch, step=0, node_id=me)
    if fault is OrderFault.ASSIGN_FROM_ROGUE:
        return await bed.order("Assign", bed.assign_request(epoch=2), signer=rogue)
    if fault in (OrderFault.RUN_STEP_FROM_ROGUE, OrderFault.NOT_REGISTERED):
        return await bed.order("RunStep", step, signer=rogue if fault is OrderFault.RUN_STEP_FROM_ROGUE else None)
    if fault is OrderFault.APPLY_UPDATE_FROM_ROGUE:
        return await bed.order("ApplyUpdate", pb.ApplyUpdateRequest(
            run_id=RUN, epoch=bed.epoch, step=0, node_id=me, global_grad_norm=1.0, lr=lr_at(0, OPTIM)), signer=rogue)
    if fault is OrderFault.ABORT_FROM_ROGUE:
        return await bed.order("AbortStep", pb.AbortStepRequest(run_id=RUN, step=0, node_id=me), signer=rogue)
    if fault is OrderFault.FETCH_STATE_FROM_ROGUE:
        stream = bed.stub.FetchState(sign(pb.FetchStateRequest(run_id=RUN, node_id=me), rogue), timeout=DEADLINE)
        return [c async for c in stream]
    if fault is OrderFault.RUN_STEP_UNSIGNED:
        return await bed.order("RunStep", step, unsigned=True)
    if fault is OrderFault.RUN_STEP_SIGNED_BY_NEIGHBOUR:
        return await bed.order("RunStep", step, signer=bed.prev)
    if fault is OrderFault.RUN_STEP_TAMPERED:
        signed = sign(step, bed.coord)
        signed.step = 1
        return await bed.stub.RunStep(signed, timeout=DEADLINE)
    if fault is OrderFault.RUN_STEP_FOR_ANOTHER_NODE:
        step.node_id = bed.prev.node_id
        return await bed.order("RunStep", step)
    if fault is OrderFault.RUN_STEP_OTHER_RUN:
        step.run_id = "another-run"
        return await bed.order("RunStep", step)
    if fault is OrderFault.RUN_STEP_OLD_EPOCH:
        step.epoch = bed.epoch + 5
        return await bed.order("RunStep", step)
    if fault is OrderFault.ASSIGN_OLD_EPOCH:
        return await bed.order("Assign", bed.assign_request(epoch=bed.epoch))
    if fault is OrderFault.ASSIGN_PEER_KEY_MISMATCH:
        req = bed.assign_request(epoch=bed.epoch + 1)
        req.prev.public_key = bed.stranger.public_key
        return await bed.order("Assign", req)
    if fault is Fault.UNKNOWN_DIGEST_ALGORITHM:
        return unknown_algorithm_chunks(bed, 99)
    raise AssertionError(f"no scenario for {fault}")


@pytest.mark.parametrize("fault", list(OrderFault), ids=lambda f: f.name.lower())
def test_order_not_from_the_coordinator_is_refused(tmp_path, fault):
    code, fragment = ORDER_EXPECTED[fault]

    async def scenario():
        registered = fault is not OrderFault.NOT_REGISTERED
        async with node_bed(tmp_path, registered=registered, assigned=registered) as bed:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await hostile_order(bed, fault)
            assert err.value.code() == code, f"{fault.value}: {err.value.code().name} ({err.value.details()})"
            assert fragment in err.value.details()
            if fault is OrderFault.NOT_REGISTERED:
                return
            # nothing changed: the assignment stands and a genuine order still works
            assert bed.service.epoch == bed.epoch
            report, _ = await run_one_step(bed)
            assert report.step == 0 and report.state_digest == bed.assign_reply.state_digest

    run(scenario())


@pytest.mark.parametrize("lr", [10 * lr_at(0, OPTIM), math.nan, math.inf], ids=["10x", "nan", "inf"])
def test_apply_update_refuses_a_learning_rate_off_schedule(tmp_path, lr):
    async def scenario():
        async with node_bed(tmp_path) as bed:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await bed.order("ApplyUpdate", pb.ApplyUpdateRequest(
                    run_id=RUN, epoch=bed.epoch, step=0, node_id=bed.node.node_id, global_grad_norm=1.0, lr=lr))
            assert err.value.code() == C.INVALID_ARGUMENT and "does not follow the schedule" in err.value.details()

    run(scenario())


# -- aborting a step ---------------------------------------------------------------------------


async def push_step_inputs(bed: Bed) -> None:
    for mb in range(MICRO_BATCHES):
        assert await bed.push(bed.tensor_chunks(micro_batch=mb)) == (C.OK, "")
        assert await bed.push(bed.tensor_chunks(bed.next, micro_batch=mb, direction=BACKWARD)) == (C.OK, "")


def test_abort_from_another_epoch_is_refused_and_the_gradients_stay(tmp_path):
    async def scenario():
        async with node_bed(tmp_path) as bed:
            await push_step_inputs(bed)
            me = bed.node.node_id
            report = await bed.order("RunStep", pb.RunStepRequest(run_id=RUN, epoch=bed.epoch, step=0, node_id=me))
            # an abort the coordinator signed for this step under an older assignment, replayed now
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await bed.order("AbortStep", pb.AbortStepRequest(run_id=RUN, epoch=bed.epoch - 1, step=0, node_id=me))
            assert err.value.code() == C.FAILED_PRECONDITION and "epoch" in err.value.details()
            update = pb.ApplyUpdateRequest(run_id=RUN, epoch=bed.epoch, step=0, node_id=me,
                                           global_grad_norm=math.sqrt(report.grad_sq_norm), lr=lr_at(0, OPTIM))
            applied = await bed.order("ApplyUpdate", update)
            assert applied.step == 0 and applied.state_digest != report.state_digest

    run(scenario())


def test_abort_of_the_current_epoch_drops_the_gradients(tmp_path):
    async def scenario():
        async with node_bed(tmp_path) as bed:
            await push_step_inputs(bed)
            me = bed.node.node_id
            report = await bed.order("RunStep", pb.RunStepRequest(run_id=RUN, epoch=bed.epoch, step=0, node_id=me))
            await bed.order("AbortStep", pb.AbortStepRequest(run_id=RUN, epoch=bed.epoch, step=0, node_id=me))
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await bed.order("ApplyUpdate", pb.ApplyUpdateRequest(
                    run_id=RUN, epoch=bed.epoch, step=0, node_id=me,
                    global_grad_norm=math.sqrt(report.grad_sq_norm), lr=lr_at(0, OPTIM)))
            assert err.value.code() == C.FAILED_PRECONDITION and "no finished gradients" in err.value.details()

    run(scenario())


def test_abort_of_a_running_step_is_refused_and_the_step_completes(tmp_path):
    async def scenario():
        async with node_bed(tmp_path) as bed:
            me = bed.node.node_id
            running = asyncio.create_task(
                bed.order("RunStep", pb.RunStepRequest(run_id=RUN, epoch=bed.epoch, step=0, node_id=me)))
            deadline = asyncio.get_running_loop().time() + DEADLINE
            while bed.runtime._running != 0:  # the step waits for its inputs
                assert asyncio.get_running_loop().time() < deadline, "RunStep never started"
                await asyncio.sleep(0.01)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await bed.order("AbortStep", pb.AbortStepRequest(run_id=RUN, epoch=bed.epoch, step=0, node_id=me))
            assert err.value.code() == C.FAILED_PRECONDITION and "still running" in err.value.details()
            await push_step_inputs(bed)
            report = await asyncio.wait_for(running, DEADLINE)
            assert report.step == 0 and report.micro_batches == MICRO_BATCHES

    run(scenario())


def test_abort_right_after_the_coordinator_cancels_the_step_waits_for_it_and_clears_its_inputs(tmp_path):
    # The coordinator gives up a failed attempt by cancelling the other stages' RunStep calls and
    # sends AbortStep at once; the cancellation may reach the node after the abort. The abort
    # waits for the step to stop, so the retry's streams are not refused as replays.
    async def scenario():
        async with node_bed(tmp_path) as bed:
            me = bed.node.node_id
            running = asyncio.create_task(
                bed.order("RunStep", pb.RunStepRequest(run_id=RUN, epoch=bed.epoch, step=0, node_id=me)))
            deadline = asyncio.get_running_loop().time() + DEADLINE
            while bed.runtime._running != 0:
                assert asyncio.get_running_loop().time() < deadline, "RunStep never started"
                await asyncio.sleep(0.01)
            assert await bed.push(bed.tensor_chunks(micro_batch=0)) == (C.OK, "")
            abort = asyncio.create_task(
                bed.order("AbortStep", pb.AbortStepRequest(run_id=RUN, epoch=bed.epoch, step=0, node_id=me)))
            while not bed.runtime._idle._waiters:  # the abort arrived first and waits for the step
                assert not abort.done(), f"the abort of a running step returned at once: {abort.exception()}"
                assert asyncio.get_running_loop().time() < deadline, "the abort never arrived"
                await asyncio.sleep(0.01)
            running.cancel()  # now the coordinator's cancellation of RunStep arrives
            await asyncio.wait_for(abort, DEADLINE)
            assert bed.runtime._running is None
            bed.attempt = 1  # the coordinator's retry is the next attempt
            await push_step_inputs(bed)  # micro-batch 0 again: accepted, not a replay
            report = await bed.order("RunStep", pb.RunStepRequest(run_id=RUN, epoch=bed.epoch, step=0, node_id=me,
                                                                  attempt=1))
            assert report.step == 0 and report.micro_batches == MICRO_BATCHES and report.attempt == 1

    run(scenario())


def test_tensors_of_another_attempt_are_refused_and_an_attempt_runs_once(tmp_path):
    """Retries are numbered: after attempt 0 of a step is aborted its tensors are refused (an
    upstream cannot feed the retry what it sent the failed attempt), while attempt 1 runs only
    tensors of attempt 1 (FAILED_PRECONDITION naming the attempts), and attempt 0 never runs again
    (nor does a replayed abort of it drop the retry's gradients); every output and report of the
    retry carries attempt 1 and this node's assignment digest."""
    async def scenario():
        async with node_bed(tmp_path) as bed:
            me = bed.node.node_id
            await bed.order("AbortStep", pb.AbortStepRequest(run_id=RUN, epoch=bed.epoch, step=0, node_id=me, attempt=0))
            code, details = await bed.push(bed.tensor_chunks(micro_batch=0))  # bed.attempt is 0
            assert code == C.FAILED_PRECONDITION and "attempt 0" in details and "ended" in details, details
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await bed.order("RunStep", pb.RunStepRequest(run_id=RUN, epoch=bed.epoch, step=0, node_id=me))
            assert err.value.code() == C.FAILED_PRECONDITION and "not newer" in err.value.details()
            bed.attempt = 1
            running = asyncio.create_task(bed.order(
                "RunStep", pb.RunStepRequest(run_id=RUN, epoch=bed.epoch, step=0, node_id=me, attempt=1)))
            await wait_until(lambda: bed.runtime._running == 0, "RunStep never started")
            bed.attempt = 2
            code, details = await bed.push(bed.tensor_chunks(micro_batch=0))
            assert code == C.FAILED_PRECONDITION and "runs attempt 1" in details, details
            bed.attempt = 1
            await push_step_inputs(bed)
            report = await asyncio.wait_for(running, DEADLINE)
            assert (report.epoch, report.attempt) == (bed.epoch, 1)
            assert report.assignment_digest == claims.assignment_digest(bed.assign_request(epoch=1))
            # A replayed abort of the old attempt drops nothing: the retry's gradients are applied.
            await bed.order("AbortStep", pb.AbortStepRequest(run_id=RUN, epoch=bed.epoch, step=0, node_id=me, attempt=0))
            update = pb.ApplyUpdateRequest(run_id=RUN, epoch=bed.epoch, step=0, node_id=me, attempt=1,
                                           global_grad_norm=math.sqrt(report.grad_sq_norm), lr=lr_at(0, OPTIM))
            applied = await bed.order("ApplyUpdate", update)
            assert (applied.epoch, applied.attempt, applied.assignment_digest) == (
                bed.epoch, 1, report.assignment_digest)
            assert bed.sink.received, "the node sent its outputs"
            kept = {(d, mb): k for (_, d, mb, sent), k in bed.runtime.retention.kept.items() if not sent}
            assert {(r.direction, r.micro_batch): r.payload_digest for r in report.received} == {
                key: k.commitment.payload_digest for key, k in kept.items()}, "the report names what it computed from"
            for c in bed.sink.received:  # what it sent names the attempt, the assignment and its inputs
                h = c.header
                assert (h.attempt, h.assignment_digest) == (1, report.assignment_digest)
                assert h.input_digest == kept[(FORWARD, h.micro_batch)].commitment.payload_digest
                if h.direction == BACKWARD:
                    assert h.grad_input_digest == kept[(BACKWARD, h.micro_batch)].commitment.payload_digest

    run(scenario())


# -- concurrent streams ------------------------------------------------------------------------


async def held_stream(chunks: list[pb.TensorChunk], release: asyncio.Event):
    """The first chunk now, the rest once ``release`` is set: a stream that stays in flight."""
    yield chunks[0]
    await release.wait()
    for chunk in chunks[1:]:
        yield chunk


async def wait_until(condition, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + DEADLINE
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, what
        await asyncio.sleep(0.01)


def test_streams_over_the_limit_are_refused_at_once_as_busy(tmp_path):
    async def scenario():
        async with node_bed(tmp_path, max_inflight_streams=4) as bed:
            release = asyncio.Event()
            prev = bed.prev.node_id
            held = [asyncio.ensure_future(bed.stub.PushTensor(held_stream(bed.tensor_chunks(micro_batch=mb), release),
                                                              timeout=DEADLINE)) for mb in range(2)]
            await wait_until(lambda: bed.service.slots_of(prev).locked(), "the two streams never got in")

            call = bed.stub.PushTensor(iter(bed.tensor_chunks(step=bed.step + 1)), timeout=DEADLINE)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call
            assert err.value.code() == C.RESOURCE_EXHAUSTED and "in flight" in err.value.details()
            assert ("pipeguard-busy", "1") in tuple(err.value.trailing_metadata()), "marked momentary"
            assert bed.stats() == {}, "a busy refusal is nobody's fault"

            # half of the budget is the other neighbour's: the previous stage cannot crowd it out
            assert await bed.push(bed.tensor_chunks(bed.next, direction=BACKWARD)) == (C.OK, "")

            release.set()
            await asyncio.wait_for(asyncio.gather(*held), DEADLINE)
            assert bed.stats() == {bed.prev.node_id: (2, 0, ""), bed.next.node_id: (1, 0, "")}

    run(scenario())


def test_streams_naming_a_neighbour_without_its_signature_hold_no_slot_and_charge_nobody(tmp_path):
    """The frame attack on the wire: streams naming the previous stage, signed by a stranger (or not
    at all), or that never send a first chunk, never take one of its slots, and nothing is charged
    to it; its own stream gets in meanwhile."""
    async def scenario():
        async with node_bed(tmp_path, max_inflight_streams=2, stream_timeout=1.0) as bed:
            never = asyncio.Event()
            prev = bed.prev.node_id

            async def silent():
                await never.wait()
                yield pb.TensorChunk()

            forged = [asyncio.ensure_future(bed.push(bed.tensor_chunks(micro_batch=mb % MICRO_BATCHES,
                                                                       signer=bed.stranger)))
                      for mb in range(8)]
            idle = [asyncio.ensure_future(bed.stub.PushTensor(silent(), timeout=DEADLINE)) for _ in range(8)]
            assert [code for code, _ in await asyncio.gather(*forged)] == [C.UNAUTHENTICATED] * 8
            assert not bed.service.slots_of(prev).locked()
            assert await bed.push(bed.tensor_chunks()) == (C.OK, "")
            for call in idle:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await call
                assert err.value.code() == C.DEADLINE_EXCEEDED and "no first chunk" in err.value.details()
            assert bed.stats()[prev] == (1, 0, "")
            assert bed.stats()[ANONYMOUS][1] == 16
            hb = bed.service.heartbeat_stats()
            assert {p.peer: p.rejected for p in hb.peers}[prev] == 0

    run(scenario())


def test_an_idle_stream_is_dropped_and_frees_its_slot(tmp_path):
    async def scenario():
        async with node_bed(tmp_path, max_inflight_streams=1, stream_timeout=0.5) as bed:
            never = asyncio.Event()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await bed.stub.PushTensor(held_stream(bed.tensor_chunks(), never), timeout=DEADLINE)
            assert err.value.code() == C.DEADLINE_EXCEEDED and "not complete" in err.value.details()
            assert await bed.push(bed.tensor_chunks()) == (C.OK, "")

    run(scenario())


def test_a_member_flooding_fetch_state_queues_behind_itself_and_the_coordinator_is_served(tmp_path):
    """Issue 11, item 8: each FetchState clones or streams a whole state, so a registered node
    flooding them must not starve anyone. One requester's fetches are served one at a time, at
    most FETCH_QUEUE wait, one more is refused at once (RESOURCE_EXHAUSTED, marked busy), and the
    coordinator's fetch is served while the flood waits; every queued fetch is served in the end."""
    async def scenario():
        async with node_bed(tmp_path) as bed:
            flooder = bed.stranger
            bed.service.membership.members[flooder.node_id] = flooder.public()
            served, release = [], asyncio.Event()
            real = bed.service.served_state

            async def holding(request):  # the flooder's first fetch is still being served
                served.append(request.requester)
                if request.requester:
                    await release.wait()
                return await real(request)

            bed.service.served_state = holding

            def fetch(signer: Identity, requester: str):
                request = sign(pb.FetchStateRequest(run_id=RUN, node_id=bed.node.node_id, step=bed.step, stage=STAGE,
                                                    requester=requester, include_optimizer=True), signer)
                return asyncio.ensure_future(collect(bed.stub.FetchState(request, timeout=DEADLINE)))

            async def collect(call):
                return [c async for c in call]

            flood = [fetch(flooder, flooder.node_id) for _ in range(FETCH_QUEUE)]
            await wait_until(lambda: bed.service._fetch_queue[flooder.node_id] == FETCH_QUEUE,
                             "the flood never queued up")
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await fetch(flooder, flooder.node_id)
            assert err.value.code() == C.RESOURCE_EXHAUSTED and "already waiting" in err.value.details()
            assert ("pipeguard-busy", "1") in tuple(err.value.trailing_metadata()), "marked momentary"
            assert served == [flooder.node_id], "one of the flooder's fetches at a time"

            coordinator = await asyncio.wait_for(fetch(bed.coord, ""), DEADLINE)
            assert coordinator[-1].HasField("attestation"), "the coordinator was served while the flood waited"
            release.set()
            for chunks in await asyncio.wait_for(asyncio.gather(*flood), DEADLINE):
                assert chunks[-1].attestation.state_digest == coordinator[-1].attestation.state_digest
            assert bed.service._fetch_queue[flooder.node_id] == 0

    run(scenario())


def test_a_chunk_that_does_not_parse_is_invalid_argument_and_the_node_keeps_serving(tmp_path):
    async def scenario():
        async with node_bed(tmp_path) as bed:
            channel = grpc.aio.insecure_channel(bed.address)
            try:
                push = channel.stream_unary("/pipeguard.v1.Node/PushTensor", request_serializer=None,
                                            response_deserializer=None)
                good = bed.tensor_chunks()
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await push(iter([good[0].SerializeToString(), b"\x12\x80"]), timeout=DEADLINE)
                assert err.value.code() == C.INVALID_ARGUMENT and "malformed request" in err.value.details()
            finally:
                await channel.close()
            assert bed.stats()[bed.prev.node_id] == (0, 1, "INVALID_ARGUMENT"), "charged to the claimed sender"
            assert await bed.push(good) == (C.OK, "")

    run(scenario())


@pytest.mark.parametrize("refusal", ["dtype", "run", "claimed size", "busy"])
def test_a_push_refused_early_gets_its_status_however_much_the_sender_still_streams(tmp_path, refusal):
    """The node refuses these after the first chunk (or before any); the sender is still writing
    many more. Without ``rpc.FinishReading`` the refusal raced the stream's teardown and a few in
    a hundred came back INTERNAL ("Internal error from Core", grpc/grpc#36066)."""
    expected = {"dtype": C.INVALID_ARGUMENT, "run": C.FAILED_PRECONDITION, "claimed size": C.RESOURCE_EXHAUSTED,
                "busy": C.RESOURCE_EXHAUSTED}[refusal]
    rest = [pb.TensorChunk(data=b"\0" * 64 * 1024) for _ in range(16)]

    async def scenario():
        async with node_bed(tmp_path, max_inflight_streams=1) as bed:
            if refusal == "busy":
                release = asyncio.Event()
                held = asyncio.ensure_future(bed.stub.PushTensor(held_stream(bed.tensor_chunks(), release),
                                                                 timeout=DEADLINE))
                await wait_until(bed.service.slots_of(bed.prev.node_id).locked, "the first stream never got in")
            first = {"dtype": lambda: bed.tensor_chunks(micro_batch=1, tensor=torch.zeros(ACT_SHAPE, dtype=torch.int64)),
                     "run": lambda: bed.tensor_chunks(micro_batch=1, run_id="another run"),
                     "claimed size": lambda: bed.tensor_chunks(micro_batch=1, tensor=torch.zeros(64, 1024)),
                     "busy": lambda: bed.tensor_chunks(micro_batch=1)}[refusal]()[:1]
            codes = [(await bed.push(first + rest))[0] for _ in range(60)]
            assert codes == [expected] * 60, collections.Counter(c.name for c in codes)
            if refusal == "busy":
                release.set()
                await asyncio.wait_for(held, DEADLINE)

    run(scenario())


def test_a_rollback_serves_the_restart_state_under_the_new_epoch(tmp_path):
    """After a rollback the state at the restart step belongs to the new assignment: its
    attestation names the new epoch, so audits of the rerun step (ordered for that epoch) find it."""
    async def scenario():
        async with node_bed(tmp_path) as bed:
            start = bed.assign_reply.state_digest
            await run_one_step(bed)
            assert (await attested_state(bed, 0)).epoch == 1
            # the coordinator rolls the run back to step 0 in a new epoch
            bed.epoch = 2
            reply = await bed.order("Assign", bed.assign_request(epoch=2, state_digest=start))
            assert reply.state_digest == start
            attestation = await attested_state(bed, 0)
            assert (attestation.epoch, attestation.state_digest) == (2, start)
            bed.step = 0
            report, _ = await run_one_step(bed)
            assert report.state_digest == start and (await attested_state(bed, 0)).epoch == 2

    run(scenario())


def test_a_commitment_only_fetch_serves_each_signed_commitment_without_its_data(tmp_path):
    """The equivocation cross-check needs only the holders' signed commitments
    (``FetchTensorRequest.commitment_only``): one chunk per tensor, in order, with the header,
    digest and signature its sender signed and no data; the auditor's fetcher checks each
    signature, and a tampered one is refused."""
    async def scenario():
        async with node_bed(tmp_path) as bed:
            await run_one_step(bed)
            step = bed.step - 1
            refs = [(mb, d, sent) for mb in range(MICRO_BATCHES) for d in (FORWARD, BACKWARD) for sent in (True, False)]
            (mb0, d0, s0), rest = refs[0], refs[1:]
            req = pb.FetchTensorRequest(run_id=RUN, node_id=bed.node.node_id, step=step, micro_batch=mb0,
                                        direction=d0, sent=s0, requester="", commitment_only=True)
            req.more.extend(pb.TensorRef(micro_batch=m, direction=dd, sent=s) for m, dd, s in rest)
            chunks = [c async for c in bed.stub.FetchTensor(sign(req, bed.coord), timeout=DEADLINE)]
            assert len(chunks) == len(refs) and not any(c.data for c in chunks), "one data-less chunk per tensor"
            assert [(c.header.micro_batch, c.header.direction, c.header.sender == bed.node.node_id)
                    for c in chunks] == refs
            sent = {(c.header.direction, c.header.micro_batch): c for c in bed.sink.received}
            assert [(c.payload_digest, c.signature) for c, (mb, d, s) in zip(chunks, refs) if s] == \
                [(sent[(d, mb)].payload_digest, sent[(d, mb)].signature) for mb, d, s in refs if s]

            peer = pb.PeerInfo(node_id=bed.node.node_id, address=bed.address, public_key=bed.node.public_key)
            me = peer
            fetcher = audit.RpcFetcher(bed.coord, "", lambda _: bed.stub, RUN, 1 << 24, DEADLINE, bed.epoch)
            mine = [(mb, d, True, me) for mb in range(MICRO_BATCHES) for d in (FORWARD, BACKWARD)]
            got = await fetcher.fetch_commitments(peer, step, mine)
            assert [c.signature for c in got] == [sent[(d, mb)].signature for mb, d, _, _ in mine]
            other = Identity.generate()  # the same commitments, checked against another signer's key
            with pytest.raises(PipeguardError):
                await fetcher.fetch_commitments(peer, step, [(0, FORWARD, True, pb.PeerInfo(
                    node_id=bed.node.node_id, public_key=other.public_key))])

    run(scenario())


def test_one_fetch_tensor_call_serves_several_tensors_in_order_or_none(tmp_path):
    """An auditor fetches every tensor it needs from one holder in one call (``more``): each comes
    in the order asked, exactly as its sender signed it; a call naming one tensor the node does
    not hold serves none of them (NOT_FOUND), and one naming too many is refused."""
    async def scenario():
        async with node_bed(tmp_path) as bed:
            await run_one_step(bed)
            step = bed.step - 1

            def ask(refs: list[tuple[int, int, bool]]):
                (mb, d, sent), rest = refs[0], refs[1:]
                req = pb.FetchTensorRequest(run_id=RUN, node_id=bed.node.node_id, step=step, micro_batch=mb,
                                            direction=d, sent=sent, requester="")
                req.more.extend(pb.TensorRef(micro_batch=m, direction=dd, sent=s) for m, dd, s in rest)
                return bed.stub.FetchTensor(sign(req, bed.coord), timeout=DEADLINE)

            refs = [(mb, d, sent) for mb in range(MICRO_BATCHES) for d in (FORWARD, BACKWARD) for sent in (True, False)]
            chunks = [c async for c in ask(refs)]
            got = [(c.header.micro_batch, c.header.direction, c.header.sender == bed.node.node_id)
                   for c in chunks if c.HasField("header")]
            assert got == refs
            sent = {(c.header.direction, c.header.micro_batch): c for c in bed.sink.received}
            last = [c for c in chunks if c.signature]
            assert [c.signature for c, (mb, d, s) in zip(last, refs) if s] == \
                [sent[(d, mb)].signature for mb, d, s in refs if s], "each as signed when it was sent"

            with pytest.raises(grpc.aio.AioRpcError) as err:
                _ = [c async for c in ask([(0, FORWARD, True), (MICRO_BATCHES + 5, FORWARD, True)])]
            assert MICRO_BATCHES + 5 == 7
            assert err.value.code() == C.NOT_FOUND and "micro-batch 7" in err.value.details()

            with pytest.raises(grpc.aio.AioRpcError) as err:
                _ = [c async for c in ask([(0, FORWARD, True)] * 65)]
            assert err.value.code() == C.INVALID_ARGUMENT and "at most 64" in err.value.details()

    run(scenario())
