"""Hostile input against the real gRPC servers: named faults, hypothesis strategies, checks.

Shared by ``tests/test_hostile_input.py`` (a few examples per target, in CI) and
``benchmarks/fuzz.py`` (many). A *target* is a real servicer on loopback port 0 — the
coordinator (``tests.test_coordinator_service.coordinator_bed``, with operator orders on) or a
middle-stage node (``tests.test_node_service.node_bed``) — played against by a client with
real Ed25519 keys. Each case is a named fault with parameters drawn by hypothesis; ``run_case``
sends it and checks, for every case:

- the precise gRPC status named for its fault in ``EXPECTED`` (never UNKNOWN or INTERNAL);
- the run's state is unchanged (a digest of registry, event log, state file, stage state);
- the daemon keeps serving (``probe``: a valid call succeeds afterwards);
- memory stays bounded (the process's peak RSS over the case, reset before each case).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hashlib
import json
import math
import os
import re
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import grpc
import torch
from hypothesis import strategies as st

from coordinator.admin import Admin
from pipeguard.config import ConfigError, parse_hostport
from pipeguard.identity import Identity
from pipeguard.model import lr_at
from pipeguard.signing import canonical_bytes, sign, verify
from pipeguard.v1 import pipeguard_pb2 as pb
from pipeguard.v1 import pipeguard_pb2_grpc as pb_grpc
from tests import test_coordinator_service as cs
from tests import test_node_service as ns

C = grpc.StatusCode
CALL_DEADLINE = 10.0
BIG = 64 * 1024 * 1024
"""The hostile client's own message limit: far above the servers' 1 MiB, so oversized
messages reach the server and are refused there."""
CLIENT_OPTIONS = [("grpc.max_send_message_length", BIG), ("grpc.max_receive_message_length", BIG)]
RSS_BOUND = 64 * 1024 * 1024
"""A case may raise the process's peak RSS by at most this much (the largest claim a case
makes is 2^64 bytes; the servers' limits are 64 KiB per tensor and 1 MiB per message)."""


# -- memory ------------------------------------------------------------------------------------


def _status_kib(field_name: str) -> int:
    """A field of /proc/self/status in bytes (0 where there is no /proc: memory is then not checked)."""
    try:
        m = re.search(rf"^{field_name}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    except OSError:
        return 0
    return int(m.group(1)) * 1024 if m else 0


def reset_peak_rss() -> int:
    """Reset the kernel's peak-RSS mark of this process (Linux ``clear_refs`` 5); returns RSS now."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")
    return _status_kib("VmRSS")


def peak_rss() -> int:
    return _status_kib("VmHWM")


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=repr).encode()).hexdigest()


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else "-"


# -- cases -------------------------------------------------------------------------------------


@dataclass
class Case:
    fault: enum.Enum
    params: dict = field(default_factory=dict)

    def __repr__(self) -> str:
        shown = {k: (v if not isinstance(v, (bytes, str)) or len(v) < 40 else f"<{len(v)}>") for k, v in self.params.items()}
        return f"{self.fault.name}{shown}"


@dataclass
class Result:
    code: grpc.StatusCode
    details: str
    peak_rss_growth: int
    failures: list[str]


def garbage_bytes() -> st.SearchStrategy[bytes]:
    """Bytes that do not parse as any protobuf message: a field tag of wire type 6 or 7 (there are
    none) or a length prefix running past the end, then random bytes. (The broken part comes
    first: after random bytes it could be swallowed as the value of a random field.)"""
    return st.tuples(st.sampled_from([b"\x0f", b"\x0e", b"\x0a\xff\xff\x03", b"\x12\xff\x7f"]),
                     st.binary(max_size=64)).map(lambda t: t[0] + t[1])


async def raw_unary(channel: grpc.aio.Channel, service: str, method: str, payload: bytes) -> None:
    """Call ``method`` with ``payload`` as its serialised request (bypasses client-side parsing)."""
    call = channel.unary_unary(f"/pipeguard.v1.{service}/{method}", request_serializer=None,
                               response_deserializer=None)
    await call(payload, timeout=CALL_DEADLINE)


async def raw_stream_unary(channel: grpc.aio.Channel, service: str, method: str, payloads: list[bytes]) -> None:
    call = channel.stream_unary(f"/pipeguard.v1.{service}/{method}", request_serializer=None,
                                response_deserializer=None)
    await call(iter(payloads), timeout=CALL_DEADLINE)


async def raw_unary_stream(channel: grpc.aio.Channel, service: str, method: str, payload: bytes) -> None:
    call = channel.unary_stream(f"/pipeguard.v1.{service}/{method}", request_serializer=None,
                                response_deserializer=None)
    async for _ in call(payload, timeout=CALL_DEADLINE):
        pass


def _invalid_address(s: str) -> bool:
    try:
        parse_hostport(s, "address")
    except ConfigError:
        return True
    except Exception:  # noqa: BLE001 - anything else is what a case is meant to find; let it through
        return True
    return False


# == the coordinator ===========================================================================


class CFault(enum.Enum):
    REGISTER_FORGED_SIGNATURE = "registration with random signature bytes"
    REGISTER_UNDER_ANOTHER_KEY = "registration with a live node's public key, signed by another key"
    REGISTER_UNKNOWN_CHALLENGE = "registration answering a challenge never issued"
    REGISTER_REPLAYED = "a live node's earlier registration sent again"
    REGISTER_BAD_KEY_LENGTH = "public key that is not 32 bytes"
    REGISTER_BAD_ADDRESS = "address that is not HOST:PORT"
    REGISTER_LONG_ADDRESS = "a valid HOST:PORT longer than 300 characters"
    REGISTER_BANNED = "registration of a banned key"
    REGISTER_LIVE_ID = "a second registration of a node that is heartbeating"
    REGISTER_OVERSIZED = "registration larger than net.max_message_bytes"
    HEARTBEAT_UNKNOWN = "heartbeat of a node id never registered"
    HEARTBEAT_FORGED = "heartbeat for a live node, not signed by it"
    HEARTBEAT_REPLAYED = "heartbeat with a sequence number already seen"
    HEARTBEAT_BANNED = "heartbeat of a banned node"
    FETCH_DATA_WRONG_DIGEST = "dataset asked for by another digest"
    CHECKPOINT_UNREGISTERED = "checkpoint request from an unregistered node"
    CHECKPOINT_FORGED = "checkpoint request for a live node, not signed by it"
    CHECKPOINT_BANNED = "checkpoint request of a banned node"
    CHECKPOINT_OTHER_RUN = "checkpoint request for another run"
    CHECKPOINT_NO_SUCH_STEP = "checkpoint request for a step with no checkpoint"
    ADMIN_NO_OR_WRONG_TOKEN = "operator order without the admin token"
    ADMIN_BAD_AUDIT_RATE = "audit rate NaN, infinite or outside [0, 1]"
    ADMIN_UNKNOWN_NODE = "ban of a node id nobody has"
    ADMIN_UNBAN_NOT_BANNED = "unban of a node that is not banned"
    ADMIN_STOP_TWICE = "stop of a run that is already stopping"
    EXPORT_BEFORE_ASSIGNMENT = "export before any stage is assigned"
    GARBAGE_BYTES = "request bytes that are not a protobuf message"
    STATUS_ANY_HISTORY = "status with any history length (valid: answered, bounded)"


C_EXPECTED: dict[CFault, grpc.StatusCode] = {
    CFault.REGISTER_FORGED_SIGNATURE: C.UNAUTHENTICATED,
    CFault.REGISTER_UNDER_ANOTHER_KEY: C.UNAUTHENTICATED,
    CFault.REGISTER_UNKNOWN_CHALLENGE: C.UNAUTHENTICATED,
    CFault.REGISTER_REPLAYED: C.UNAUTHENTICATED,
    CFault.REGISTER_BAD_KEY_LENGTH: C.INVALID_ARGUMENT,
    CFault.REGISTER_BAD_ADDRESS: C.INVALID_ARGUMENT,
    CFault.REGISTER_LONG_ADDRESS: C.INVALID_ARGUMENT,
    CFault.REGISTER_BANNED: C.PERMISSION_DENIED,
    CFault.REGISTER_LIVE_ID: C.ALREADY_EXISTS,
    CFault.REGISTER_OVERSIZED: C.RESOURCE_EXHAUSTED,
    CFault.HEARTBEAT_UNKNOWN: C.NOT_FOUND,
    CFault.HEARTBEAT_FORGED: C.UNAUTHENTICATED,
    CFault.HEARTBEAT_REPLAYED: C.ALREADY_EXISTS,
    CFault.HEARTBEAT_BANNED: C.PERMISSION_DENIED,
    CFault.FETCH_DATA_WRONG_DIGEST: C.NOT_FOUND,
    CFault.CHECKPOINT_UNREGISTERED: C.UNAUTHENTICATED,
    CFault.CHECKPOINT_FORGED: C.UNAUTHENTICATED,
    CFault.CHECKPOINT_BANNED: C.PERMISSION_DENIED,
    CFault.CHECKPOINT_OTHER_RUN: C.FAILED_PRECONDITION,
    CFault.CHECKPOINT_NO_SUCH_STEP: C.NOT_FOUND,
    CFault.ADMIN_NO_OR_WRONG_TOKEN: C.UNAUTHENTICATED,
    CFault.ADMIN_BAD_AUDIT_RATE: C.INVALID_ARGUMENT,
    CFault.ADMIN_UNKNOWN_NODE: C.NOT_FOUND,
    CFault.ADMIN_UNBAN_NOT_BANNED: C.FAILED_PRECONDITION,
    CFault.ADMIN_STOP_TWICE: C.FAILED_PRECONDITION,
    CFault.EXPORT_BEFORE_ASSIGNMENT: C.FAILED_PRECONDITION,
    CFault.GARBAGE_BYTES: C.INVALID_ARGUMENT,
    CFault.STATUS_ANY_HISTORY: C.OK,
}

COORDINATOR_UNARY = {"Hello": "unary", "Register": "unary", "Heartbeat": "unary", "Status": "unary",
                     "Ban": "unary", "Unban": "unary", "StopRun": "unary", "SetAuditRate": "unary",
                     "FetchData": "stream", "FetchCheckpoint": "stream", "ExportState": "stream", "Watch": "stream"}

_sig = st.binary(min_size=0, max_size=96)
_seq_or_step = st.integers(min_value=0, max_value=2**64 - 1)


def coordinator_cases() -> dict[CFault, st.SearchStrategy[Case]]:
    f = CFault
    return {
        f.REGISTER_FORGED_SIGNATURE: st.builds(lambda s: Case(f.REGISTER_FORGED_SIGNATURE, {"signature": s}), _sig),
        f.REGISTER_UNDER_ANOTHER_KEY: st.just(Case(f.REGISTER_UNDER_ANOTHER_KEY)),
        f.REGISTER_UNKNOWN_CHALLENGE: st.builds(lambda c: Case(f.REGISTER_UNKNOWN_CHALLENGE, {"challenge": c}), st.binary(max_size=96)),
        f.REGISTER_REPLAYED: st.just(Case(f.REGISTER_REPLAYED)),
        f.REGISTER_BAD_KEY_LENGTH: st.builds(lambda k: Case(f.REGISTER_BAD_KEY_LENGTH, {"key": k}),
                  st.binary(max_size=80).filter(lambda k: len(k) != 32)),
        f.REGISTER_BAD_ADDRESS: st.builds(lambda a: Case(f.REGISTER_BAD_ADDRESS, {"address": a}),
                  st.one_of(st.text(max_size=40).filter(_invalid_address),
                            st.from_regex(r"\A[a-z0-9.]{1,12}:[0-9]{6,9}\Z"),
                            # ports in digits other than ASCII: int() takes some, isdigit() more
                            st.tuples(st.from_regex(r"\A[a-z0-9.]{1,12}\Z"),
                                      st.lists(st.sampled_from("²³¹①٣١２９߂"), min_size=1, max_size=4))
                            .map(lambda t: f"{t[0]}:{''.join(t[1])}"))),
        f.REGISTER_LONG_ADDRESS: st.builds(lambda n, p: Case(f.REGISTER_LONG_ADDRESS, {"host": n, "port": p}),
                                           st.integers(300, 900_000), st.integers(1, 65535)),
        f.REGISTER_BANNED: st.just(Case(f.REGISTER_BANNED)),
        f.REGISTER_LIVE_ID: st.builds(lambda p: Case(f.REGISTER_LIVE_ID, {"port": p}), st.integers(1, 65535)),
        f.REGISTER_OVERSIZED: st.builds(lambda n: Case(f.REGISTER_OVERSIZED, {"size": n}), st.integers(1 << 20, 3 << 20)),
        f.HEARTBEAT_UNKNOWN: st.builds(lambda i, s: Case(f.HEARTBEAT_UNKNOWN, {"node_id": i, "seq": s}), st.text(max_size=64), _seq_or_step),
        f.HEARTBEAT_FORGED: st.builds(lambda s, q: Case(f.HEARTBEAT_FORGED, {"signature": s, "seq_ahead": q}), _sig, st.integers(1, 2**32)),
        f.HEARTBEAT_REPLAYED: st.builds(lambda b: Case(f.HEARTBEAT_REPLAYED, {"behind": b}), st.integers(0, 2**20)),
        f.HEARTBEAT_BANNED: st.just(Case(f.HEARTBEAT_BANNED)),
        f.FETCH_DATA_WRONG_DIGEST: st.builds(lambda d: Case(f.FETCH_DATA_WRONG_DIGEST, {"digest": d}), st.binary(max_size=64)),
        f.CHECKPOINT_UNREGISTERED: st.builds(lambda r: Case(f.CHECKPOINT_UNREGISTERED, {"requester": r}), st.text(max_size=64)),
        f.CHECKPOINT_FORGED: st.builds(lambda s: Case(f.CHECKPOINT_FORGED, {"signature": s}), _sig),
        f.CHECKPOINT_BANNED: st.just(Case(f.CHECKPOINT_BANNED)),
        f.CHECKPOINT_OTHER_RUN: st.builds(lambda r: Case(f.CHECKPOINT_OTHER_RUN, {"run_id": r}), st.text(max_size=40)),
        f.CHECKPOINT_NO_SUCH_STEP: st.builds(lambda s, g: Case(f.CHECKPOINT_NO_SUCH_STEP, {"step": s, "stage": g}), _seq_or_step,
                  st.integers(0, 2**32 - 1)),
        f.ADMIN_NO_OR_WRONG_TOKEN: st.builds(lambda m, t: Case(f.ADMIN_NO_OR_WRONG_TOKEN, {"method": m, "token": t}),
                  st.sampled_from(["Ban", "Unban", "StopRun", "SetAuditRate"]),
                  st.one_of(st.none(), st.from_regex(r"\A[A-Za-z0-9_-]{0,80}\Z"))),
        f.ADMIN_BAD_AUDIT_RATE: st.builds(lambda r: Case(f.ADMIN_BAD_AUDIT_RATE, {"rate": r}),
                  st.one_of(st.just(math.nan), st.just(math.inf), st.just(-math.inf),
                            st.floats(max_value=-1e-9, allow_nan=False), st.floats(min_value=1.000001, allow_nan=False))),
        f.ADMIN_UNKNOWN_NODE: st.builds(lambda i: Case(f.ADMIN_UNKNOWN_NODE, {"node_id": i}), st.from_regex(r"\Az[a-z0-9]{8,40}\Z")),
        f.ADMIN_UNBAN_NOT_BANNED: st.just(Case(f.ADMIN_UNBAN_NOT_BANNED)),
        f.ADMIN_STOP_TWICE: st.just(Case(f.ADMIN_STOP_TWICE)),
        f.EXPORT_BEFORE_ASSIGNMENT: st.builds(lambda o: Case(f.EXPORT_BEFORE_ASSIGNMENT, {"include_optimizer": o}), st.booleans()),
        f.GARBAGE_BYTES: st.builds(lambda m, b: Case(f.GARBAGE_BYTES, {"method": m, "payload": b}),
                  st.sampled_from(sorted(COORDINATOR_UNARY)), garbage_bytes()),
        f.STATUS_ANY_HISTORY: st.builds(lambda h: Case(f.STATUS_ANY_HISTORY, {"history": h}), st.integers(0, 2**32 - 1)),
    }


class CoordinatorTarget:
    """A real coordinator service with operator orders on, one live node, one banned node."""

    name = "coordinator"
    expected = C_EXPECTED

    def __init__(self, home: Path):
        self.home = home
        self._stack = contextlib.AsyncExitStack()

    async def open(self) -> None:
        self.bed = await self._stack.enter_async_context(cs.coordinator_bed(self.home))
        self.token = secrets.token_hex(24)
        self.bed.service.admin = Admin(self.token, self.bed.service.clock)
        channel = await self._stack.enter_async_context(
            grpc.aio.insecure_channel(self.bed.address, options=CLIENT_OPTIONS))
        self.channel, self.stub = channel, pb_grpc.CoordinatorStub(channel)
        self.live, self.banned = Identity.generate(), Identity.generate()
        hello = await self.bed.hello()
        self.live_registration = sign(pb.RegisterRequest(public_key=self.live.public_key, address="127.0.0.1:7101",
                                                         challenge=hello.challenge, version="test"), self.live)
        await self.stub.Register(self.live_registration, timeout=CALL_DEADLINE)
        self.seq = 1
        await self.bed.heartbeat(self.live, seq=self.seq)
        await self.bed.register(self.banned, address="127.0.0.1:7102")
        cs._ban(self.bed, self.banned)
        self.stopped = False

    async def close(self) -> None:
        await self._stack.aclose()

    def state_digest(self) -> str:
        reg = self.bed.registry
        clock = self.bed.service.clock
        nodes = {i: (r.to_json(), r.heartbeat_seq, r.last_heartbeat, r.tensors_sent, r.tensors_received,
                     r.tensors_rejected) for i, r in reg.nodes.items()}
        events = [(e.seq, e.kind, e.message) for e in self.bed.service.events.recent]
        st_ = clock.state
        return _digest({"nodes": nodes, "rejected": reg.rejected_by_peers, "events": events,
                        "state": (st_.run_id, st_.step, st_.epoch, st_.phase, st_.commitments, st_.audit_rate,
                                  st_.evidence, st_.skipped, len(st_.losses)),
                        "rate": clock.cfg.audit.rate, "stopping": clock.stopping,
                        "files": [_file_digest(self.home / "state.json"), _file_digest(self.home / "events.jsonl")]})

    async def probe(self) -> None:
        """The coordinator still serves: a Hello, a heartbeat of the live node and a status."""
        hello = await self.bed.hello()
        verify(hello, self.bed.coord.public(), what="hello")
        self.seq += 1
        reply = await self.bed.heartbeat(self.live, seq=self.seq)
        verify(reply, self.bed.coord.public(), what="heartbeat reply")
        assert reply.seq == self.seq and list(reply.banned) == [self.banned.node_id]
        status = await self.stub.Status(pb.StatusRequest(), timeout=CALL_DEADLINE)
        assert len(status.nodes) == 2

    def _admin_md(self, token: str | None = None):
        return (("authorization", f"Bearer {self.token if token is None else token}"),)

    async def send(self, case: Case) -> None:
        f, p, bed, stub = case.fault, case.params, self.bed, self.stub
        other = Identity.generate()

        async def register(req: pb.RegisterRequest, signer: Identity | None, **after):
            if signer is not None:
                sign(req, signer)
            for k, v in after.items():
                setattr(req, k, v)
            return await stub.Register(req, timeout=CALL_DEADLINE)

        async def fresh(public_key: bytes, address: str = "127.0.0.1:7300") -> pb.RegisterRequest:
            hello = await bed.hello()
            return pb.RegisterRequest(public_key=public_key, address=address, challenge=hello.challenge, version="x")

        if f is CFault.REGISTER_FORGED_SIGNATURE:
            return await register(await fresh(other.public_key), None, signature=p["signature"])
        if f is CFault.REGISTER_UNDER_ANOTHER_KEY:  # knows only the public key: signs with its own
            return await register(await fresh(self.live.public_key, "10.6.6.6:7101"), other)
        if f is CFault.REGISTER_UNKNOWN_CHALLENGE:
            req = pb.RegisterRequest(public_key=other.public_key, address="127.0.0.1:7300", challenge=p["challenge"])
            return await register(req, other)
        if f is CFault.REGISTER_REPLAYED:
            return await stub.Register(self.live_registration, timeout=CALL_DEADLINE)
        if f is CFault.REGISTER_BAD_KEY_LENGTH:
            return await register(await fresh(p["key"]), other)
        if f is CFault.REGISTER_BAD_ADDRESS:
            return await register(await fresh(other.public_key, p["address"]), other)
        if f is CFault.REGISTER_LONG_ADDRESS:
            return await register(await fresh(other.public_key, "h" * p["host"] + f":{p['port']}"), other)
        if f is CFault.REGISTER_BANNED:
            return await register(await fresh(self.banned.public_key), self.banned)
        if f is CFault.REGISTER_LIVE_ID:
            return await register(await fresh(self.live.public_key, f"127.0.0.1:{p['port']}"), self.live)
        if f is CFault.REGISTER_OVERSIZED:
            return await register(await fresh(other.public_key, "h" * p["size"] + ":7300"), other)
        if f is CFault.HEARTBEAT_UNKNOWN:
            req = pb.HeartbeatRequest(node_id=p["node_id"], seq=p["seq"])
            return await stub.Heartbeat(sign(req, other), timeout=CALL_DEADLINE)
        if f is CFault.HEARTBEAT_FORGED:
            req = pb.HeartbeatRequest(node_id=self.live.node_id, seq=self.seq + p["seq_ahead"], tensors_rejected=99)
            req.signature = p["signature"]
            return await stub.Heartbeat(req, timeout=CALL_DEADLINE)
        if f is CFault.HEARTBEAT_REPLAYED:
            req = pb.HeartbeatRequest(node_id=self.live.node_id, seq=max(self.seq - p["behind"], 0))
            return await stub.Heartbeat(sign(req, self.live), timeout=CALL_DEADLINE)
        if f is CFault.HEARTBEAT_BANNED:
            req = pb.HeartbeatRequest(node_id=self.banned.node_id, seq=10**9)
            return await stub.Heartbeat(sign(req, self.banned), timeout=CALL_DEADLINE)
        if f is CFault.FETCH_DATA_WRONG_DIGEST:
            digest = p["digest"] if p["digest"] != cs.DATASET.digest else b""
            return [c async for c in stub.FetchData(pb.FetchDataRequest(digest=digest), timeout=CALL_DEADLINE)]
        if f in (CFault.CHECKPOINT_UNREGISTERED, CFault.CHECKPOINT_FORGED, CFault.CHECKPOINT_BANNED,
                 CFault.CHECKPOINT_OTHER_RUN, CFault.CHECKPOINT_NO_SUCH_STEP):
            run_id = cs.RUN if f is not CFault.CHECKPOINT_OTHER_RUN or p["run_id"] == cs.RUN else p["run_id"]
            signer = {CFault.CHECKPOINT_UNREGISTERED: other, CFault.CHECKPOINT_BANNED: self.banned}.get(f, self.live)
            requester = signer.node_id
            if f is CFault.CHECKPOINT_UNREGISTERED and p["requester"] not in bed.registry.nodes:
                requester = p["requester"]
            req = sign(pb.FetchCheckpointRequest(requester=requester, run_id=run_id, step=p.get("step", 0),
                                                 stage=p.get("stage", 0)), signer)
            if f is CFault.CHECKPOINT_FORGED:
                req.signature = p["signature"]
            return [c async for c in stub.FetchCheckpoint(req, timeout=CALL_DEADLINE)]
        if f is CFault.ADMIN_NO_OR_WRONG_TOKEN:
            md = () if p["token"] is None else self._admin_md(p["token"] if p["token"] != self.token else "")
            req = {"Ban": pb.BanRequest(node_id=self.live.node_id, reason="x"),
                   "Unban": pb.UnbanRequest(node_id=self.banned.node_id), "StopRun": pb.StopRunRequest(),
                   "SetAuditRate": pb.SetAuditRateRequest(rate=0.5)}[p["method"]]
            return await getattr(stub, p["method"])(req, metadata=md, timeout=CALL_DEADLINE)
        if f is CFault.ADMIN_BAD_AUDIT_RATE:
            return await stub.SetAuditRate(pb.SetAuditRateRequest(rate=p["rate"], operator="fuzz"),
                                           metadata=self._admin_md(), timeout=CALL_DEADLINE)
        if f is CFault.ADMIN_UNKNOWN_NODE:
            return await stub.Ban(pb.BanRequest(node_id=p["node_id"], reason="fuzz"), metadata=self._admin_md(),
                                  timeout=CALL_DEADLINE)
        if f is CFault.ADMIN_UNBAN_NOT_BANNED:
            return await stub.Unban(pb.UnbanRequest(node_id=self.live.node_id), metadata=self._admin_md(),
                                    timeout=CALL_DEADLINE)
        if f is CFault.ADMIN_STOP_TWICE:
            self.bed.service.clock.stopping = True  # as after a first StopRun still saving
            try:
                return await stub.StopRun(pb.StopRunRequest(operator="fuzz"), metadata=self._admin_md(),
                                          timeout=CALL_DEADLINE)
            finally:
                self.bed.service.clock.stopping = False
        if f is CFault.EXPORT_BEFORE_ASSIGNMENT:
            req = pb.ExportRequest(include_optimizer=p["include_optimizer"])
            return [c async for c in stub.ExportState(req, timeout=CALL_DEADLINE)]
        if f is CFault.GARBAGE_BYTES:
            if COORDINATOR_UNARY[p["method"]] == "unary":
                return await raw_unary(self.channel, "Coordinator", p["method"], p["payload"])
            return await raw_unary_stream(self.channel, "Coordinator", p["method"], p["payload"])
        if f is CFault.STATUS_ANY_HISTORY:
            reply = await stub.Status(pb.StatusRequest(history=p["history"]), timeout=CALL_DEADLINE)
            assert len(reply.events) <= len(self.bed.service.events.recent)
            return reply
        raise AssertionError(f"no scenario for {f}")


# == a middle-stage node ========================================================================


class NFault(enum.Enum):
    PUSH_FORGED_SIGNATURE = "tensor with random signature bytes"
    PUSH_IMPERSONATION = "tensor claiming the previous stage, signed by a stranger"
    PUSH_UNKNOWN_SENDER = "tensor from a sender id the node does not know"
    PUSH_BANNED_SENDER = "tensor from a banned sender"
    PUSH_CLAIMED_SIZE_OVER_LIMIT = "claimed shape far larger than the payload and max_tensor_bytes"
    PUSH_TOO_MANY_DIMS = "claimed shape with more than 8 dimensions"
    PUSH_DIM_OVER_INT64 = "a dimension past 2^63 (with a zero dimension, so the claimed size is 0)"
    PUSH_SHAPE_MISMATCH = "shape within the limit, not the stage's activation shape"
    PUSH_DTYPE_MISMATCH = "a known dtype the stage does not take"
    PUSH_UNKNOWN_DTYPE = "dtype enum value not in the schema"
    PUSH_UNKNOWN_DIRECTION = "direction enum value not in the schema"
    PUSH_TRUNCATED = "stream cut before its signed last chunk"
    PUSH_EMPTY = "a stream with no chunks"
    PUSH_EXTRA_BYTES = "more payload than the shape allows"
    PUSH_PAYLOAD_TAMPERED = "payload bytes changed after signing"
    PUSH_NO_HEADER = "first chunk without a header"
    PUSH_REPEATED_HEADER = "header repeated in a later chunk"
    PUSH_REPLAY = "a tensor already delivered, sent again"
    PUSH_WRONG_RECEIVER = "tensor addressed to someone else"
    PUSH_WRONG_RUN = "tensor of another run"
    PUSH_WRONG_STEP = "tensor for a step this stage is not at"
    PUSH_WRONG_EPOCH = "tensor of another assignment epoch"
    PUSH_MICRO_BATCH_OUT_OF_RANGE = "micro-batch index past the step's micro-batches"
    PUSH_OVERSIZED_MESSAGE = "one chunk larger than net.max_message_bytes"
    PUSH_NAN_INF = "a valid, signed activation holding NaN/Inf (accepted, flagged by the screen)"
    ORDER_FORGED = "order with random signature bytes"
    ORDER_OTHER_NODE = "order signed by the coordinator for another node"
    ORDER_OTHER_RUN = "order of another run"
    ORDER_WRONG_EPOCH = "order for an assignment epoch the node does not hold"
    ASSIGN_BAD_SPEC = "Assign with an impossible model or train spec"
    APPLY_UPDATE_BAD_LR = "ApplyUpdate with a learning rate off the schedule (NaN, Inf, any other)"
    FETCH_WRONG_NODE = "FetchState/FetchTensor addressed to another node"
    FETCH_UNREGISTERED = "fetch by a requester that is not a member"
    FETCH_BANNED = "fetch by a banned requester"
    FETCH_FORGED = "fetch for a member, not signed by it"
    FETCH_OTHER_RUN = "fetch for another run"
    FETCH_NOT_RETAINED = "fetch of a tensor or a state that is not kept"
    AUDIT_FORGED = "audit order not signed by the coordinator"
    AUDIT_OTHER_AUDITOR = "audit order addressed to another auditor"
    GARBAGE_BYTES = "request bytes that are not a protobuf message"


N_EXPECTED: dict[NFault, grpc.StatusCode] = {
    NFault.PUSH_FORGED_SIGNATURE: C.UNAUTHENTICATED,
    NFault.PUSH_IMPERSONATION: C.UNAUTHENTICATED,
    NFault.PUSH_UNKNOWN_SENDER: C.UNAUTHENTICATED,
    NFault.PUSH_BANNED_SENDER: C.PERMISSION_DENIED,
    NFault.PUSH_CLAIMED_SIZE_OVER_LIMIT: C.RESOURCE_EXHAUSTED,
    NFault.PUSH_TOO_MANY_DIMS: C.INVALID_ARGUMENT,
    NFault.PUSH_DIM_OVER_INT64: C.INVALID_ARGUMENT,
    NFault.PUSH_SHAPE_MISMATCH: C.INVALID_ARGUMENT,
    NFault.PUSH_DTYPE_MISMATCH: C.INVALID_ARGUMENT,
    NFault.PUSH_UNKNOWN_DTYPE: C.INVALID_ARGUMENT,
    NFault.PUSH_UNKNOWN_DIRECTION: C.INVALID_ARGUMENT,
    NFault.PUSH_TRUNCATED: C.DATA_LOSS,
    NFault.PUSH_EMPTY: C.INVALID_ARGUMENT,
    NFault.PUSH_EXTRA_BYTES: C.INVALID_ARGUMENT,
    NFault.PUSH_PAYLOAD_TAMPERED: C.DATA_LOSS,
    NFault.PUSH_NO_HEADER: C.INVALID_ARGUMENT,
    NFault.PUSH_REPEATED_HEADER: C.INVALID_ARGUMENT,
    NFault.PUSH_REPLAY: C.ALREADY_EXISTS,
    NFault.PUSH_WRONG_RECEIVER: C.INVALID_ARGUMENT,
    NFault.PUSH_WRONG_RUN: C.FAILED_PRECONDITION,
    NFault.PUSH_WRONG_STEP: C.FAILED_PRECONDITION,
    NFault.PUSH_WRONG_EPOCH: C.FAILED_PRECONDITION,
    NFault.PUSH_MICRO_BATCH_OUT_OF_RANGE: C.INVALID_ARGUMENT,
    NFault.PUSH_OVERSIZED_MESSAGE: C.RESOURCE_EXHAUSTED,
    NFault.PUSH_NAN_INF: C.OK,
    NFault.ORDER_FORGED: C.UNAUTHENTICATED,
    NFault.ORDER_OTHER_NODE: C.INVALID_ARGUMENT,
    NFault.ORDER_OTHER_RUN: C.FAILED_PRECONDITION,
    NFault.ORDER_WRONG_EPOCH: C.FAILED_PRECONDITION,
    NFault.ASSIGN_BAD_SPEC: C.INVALID_ARGUMENT,
    NFault.APPLY_UPDATE_BAD_LR: C.INVALID_ARGUMENT,
    NFault.FETCH_WRONG_NODE: C.INVALID_ARGUMENT,
    NFault.FETCH_UNREGISTERED: C.UNAUTHENTICATED,
    NFault.FETCH_BANNED: C.PERMISSION_DENIED,
    NFault.FETCH_FORGED: C.UNAUTHENTICATED,
    NFault.FETCH_OTHER_RUN: C.FAILED_PRECONDITION,
    NFault.FETCH_NOT_RETAINED: C.NOT_FOUND,  # FetchTensor; FetchState of an old step: FAILED_PRECONDITION
    NFault.AUDIT_FORGED: C.UNAUTHENTICATED,
    NFault.AUDIT_OTHER_AUDITOR: C.INVALID_ARGUMENT,
    NFault.GARBAGE_BYTES: C.INVALID_ARGUMENT,
}

NODE_METHODS = {"Assign": "unary", "RunStep": "unary", "ApplyUpdate": "unary", "AbortStep": "unary",
                "Audit": "unary", "FetchState": "stream", "FetchTensor": "stream", "PushTensor": "client"}
ORDERS = ["Assign", "RunStep", "ApplyUpdate", "AbortStep"]
_u64 = st.integers(min_value=0, max_value=2**64 - 1)


def _over_limit_shape() -> st.SearchStrategy[list[int]]:
    """1..8 dims, each < 2^63, whose float32 size exceeds the node's 64 KiB limit."""
    dims = st.lists(st.integers(1, 2**62), min_size=1, max_size=8)
    return dims.filter(lambda s: 4 * math.prod(s) > ns.MAX_TENSOR_BYTES)


def node_cases() -> dict[NFault, st.SearchStrategy[Case]]:
    f = NFault
    small_shape = st.lists(st.integers(0, 64), min_size=0, max_size=4).filter(
        lambda s: s != ns.ACT_SHAPE and 4 * math.prod(s) <= ns.MAX_TENSOR_BYTES)
    return {
        # (an empty signature marks a chunk that is not the last: that stream is truncated, DATA_LOSS)
        f.PUSH_FORGED_SIGNATURE: st.builds(lambda s: Case(f.PUSH_FORGED_SIGNATURE, {"signature": s}), st.binary(min_size=1, max_size=96)),
        f.PUSH_IMPERSONATION: st.just(Case(f.PUSH_IMPERSONATION)),
        f.PUSH_UNKNOWN_SENDER: st.builds(lambda s: Case(f.PUSH_UNKNOWN_SENDER, {"sender": s}), st.text(max_size=64)),
        f.PUSH_BANNED_SENDER: st.just(Case(f.PUSH_BANNED_SENDER)),
        f.PUSH_CLAIMED_SIZE_OVER_LIMIT: st.builds(lambda s, n: Case(f.PUSH_CLAIMED_SIZE_OVER_LIMIT, {"shape": s, "data": n}), _over_limit_shape(),
                  st.integers(0, 4096)),
        f.PUSH_TOO_MANY_DIMS: st.builds(lambda s: Case(f.PUSH_TOO_MANY_DIMS, {"shape": s}), st.lists(_u64, min_size=9, max_size=16)),
        f.PUSH_DIM_OVER_INT64: st.builds(lambda s, i: Case(f.PUSH_DIM_OVER_INT64, {"shape": s[:i] + [0] + s[i:]}),
                  st.lists(st.integers(2**63, 2**64 - 1), min_size=1, max_size=6), st.integers(0, 6)),
        f.PUSH_SHAPE_MISMATCH: st.builds(lambda s: Case(f.PUSH_SHAPE_MISMATCH, {"shape": s}), small_shape),
        f.PUSH_DTYPE_MISMATCH: st.builds(lambda d: Case(f.PUSH_DTYPE_MISMATCH, {"dtype": d}),
                  st.sampled_from([pb.DTYPE_FLOAT16, pb.DTYPE_BFLOAT16, pb.DTYPE_INT64])),
        f.PUSH_UNKNOWN_DTYPE: st.builds(lambda d: Case(f.PUSH_UNKNOWN_DTYPE, {"dtype": d}),
                  st.one_of(st.just(0), st.integers(5, 2**31 - 1), st.integers(-2**31, -1))),
        f.PUSH_UNKNOWN_DIRECTION: st.builds(lambda d: Case(f.PUSH_UNKNOWN_DIRECTION, {"direction": d}),
                  st.one_of(st.just(0), st.integers(3, 2**31 - 1), st.integers(-2**31, -1))),
        f.PUSH_TRUNCATED: st.builds(lambda k: Case(f.PUSH_TRUNCATED, {"keep": k}), st.integers(1, 3)),
        f.PUSH_EMPTY: st.just(Case(f.PUSH_EMPTY)),
        f.PUSH_EXTRA_BYTES: st.builds(lambda i, b: Case(f.PUSH_EXTRA_BYTES, {"chunk": i, "extra": b}), st.integers(0, 3),
                  st.binary(min_size=1, max_size=2048)),
        f.PUSH_PAYLOAD_TAMPERED: st.builds(lambda i, j: Case(f.PUSH_PAYLOAD_TAMPERED, {"byte": i, "xor": j}),
                  st.integers(0, 4 * math.prod(ns.ACT_SHAPE) - 1), st.integers(1, 255)),
        f.PUSH_NO_HEADER: st.just(Case(f.PUSH_NO_HEADER)),
        f.PUSH_REPEATED_HEADER: st.builds(lambda i: Case(f.PUSH_REPEATED_HEADER, {"chunk": i}), st.integers(1, 3)),
        f.PUSH_REPLAY: st.just(Case(f.PUSH_REPLAY)),
        f.PUSH_WRONG_RECEIVER: st.builds(lambda r: Case(f.PUSH_WRONG_RECEIVER, {"receiver": r}), st.text(max_size=64)),
        f.PUSH_WRONG_RUN: st.builds(lambda r: Case(f.PUSH_WRONG_RUN, {"run_id": r}), st.text(max_size=40).filter(lambda r: r != ns.RUN)),
        f.PUSH_WRONG_STEP: st.builds(lambda s: Case(f.PUSH_WRONG_STEP, {"step": s}), _u64.filter(lambda s: s != 0)),
        f.PUSH_WRONG_EPOCH: st.builds(lambda e: Case(f.PUSH_WRONG_EPOCH, {"epoch": e}), _u64.filter(lambda e: e != 1)),
        f.PUSH_MICRO_BATCH_OUT_OF_RANGE: st.builds(lambda m: Case(f.PUSH_MICRO_BATCH_OUT_OF_RANGE, {"micro_batch": m}),
                  st.integers(ns.MICRO_BATCHES, 2**32 - 1)),
        f.PUSH_OVERSIZED_MESSAGE: st.builds(lambda n: Case(f.PUSH_OVERSIZED_MESSAGE, {"size": n}), st.integers(1 << 20, 3 << 20)),
        f.PUSH_NAN_INF: st.builds(lambda idx, v: Case(f.PUSH_NAN_INF, {"positions": idx, "value": v}),
                  st.lists(st.integers(0, math.prod(ns.ACT_SHAPE) - 1), min_size=1, max_size=8),
                  st.sampled_from([math.nan, math.inf, -math.inf])),
        f.ORDER_FORGED: st.builds(lambda o, s: Case(f.ORDER_FORGED, {"order": o, "signature": s}), st.sampled_from(ORDERS), _sig),
        f.ORDER_OTHER_NODE: st.builds(lambda o, n: Case(f.ORDER_OTHER_NODE, {"order": o, "node_id": n}), st.sampled_from(ORDERS),
                  st.text(max_size=40)),
        f.ORDER_OTHER_RUN: st.builds(lambda o, r: Case(f.ORDER_OTHER_RUN, {"order": o, "run_id": r}), st.sampled_from(ORDERS),
                  st.text(max_size=40).filter(lambda r: r != ns.RUN)),
        f.ORDER_WRONG_EPOCH: st.builds(lambda o, e: Case(f.ORDER_WRONG_EPOCH, {"order": o, "epoch": e}), st.sampled_from(ORDERS),
                  _u64.filter(lambda e: e != 1)),
        f.ASSIGN_BAD_SPEC: st.builds(lambda w, v: Case(f.ASSIGN_BAD_SPEC, {"what": w, "value": v}),
                  st.sampled_from(["stage", "micro_batches", "micro_batch_size", "n_head", "num_stages"]),
                  st.integers(0, 2**31 - 1)),
        f.APPLY_UPDATE_BAD_LR: st.builds(lambda lr: Case(f.APPLY_UPDATE_BAD_LR, {"lr": lr}),
                  st.one_of(st.just(math.nan), st.just(math.inf), st.just(-math.inf), st.floats(allow_nan=False))
                  .filter(lambda lr: not math.isfinite(lr) or abs(lr - lr_at(0, ns.OPTIM)) > 1e-9)),
        f.FETCH_WRONG_NODE: st.builds(lambda m, n: Case(f.FETCH_WRONG_NODE, {"method": m, "node_id": n}),
                  st.sampled_from(["FetchState", "FetchTensor"]), st.text(max_size=40)),
        f.FETCH_UNREGISTERED: st.builds(lambda m, r: Case(f.FETCH_UNREGISTERED, {"method": m, "requester": r}),
                  st.sampled_from(["FetchState", "FetchTensor"]), st.text(min_size=1, max_size=64)),
        f.FETCH_BANNED: st.builds(lambda m: Case(f.FETCH_BANNED, {"method": m}), st.sampled_from(["FetchState", "FetchTensor"])),
        f.FETCH_FORGED: st.builds(lambda m, s: Case(f.FETCH_FORGED, {"method": m, "signature": s}),
                  st.sampled_from(["FetchState", "FetchTensor"]), _sig),
        f.FETCH_OTHER_RUN: st.builds(lambda m, r: Case(f.FETCH_OTHER_RUN, {"method": m, "run_id": r}),
                  st.sampled_from(["FetchState", "FetchTensor"]), st.text(max_size=40).filter(lambda r: r != ns.RUN)),
        f.FETCH_NOT_RETAINED: st.builds(lambda s, d, mb, sent: Case(f.FETCH_NOT_RETAINED, {"step": s, "direction": d, "micro_batch": mb,
                                                                     "sent": sent}),
                  _u64, st.integers(-2**31, 2**31 - 1), st.integers(0, 2**32 - 1), st.booleans()),
        f.AUDIT_FORGED: st.builds(lambda s: Case(f.AUDIT_FORGED, {"signature": s}), _sig),
        f.AUDIT_OTHER_AUDITOR: st.builds(lambda a: Case(f.AUDIT_OTHER_AUDITOR, {"auditor": a}), st.text(max_size=40)),
        f.GARBAGE_BYTES: st.builds(lambda m, b: Case(f.GARBAGE_BYTES, {"method": m, "payload": b}), st.sampled_from(sorted(NODE_METHODS)),
                  garbage_bytes()),
    }


class NodeTarget:
    """A real node service serving the middle of three stages, assigned, with one activation
    (micro-batch 0) already delivered for the current step."""

    name = "node"
    expected = N_EXPECTED

    def __init__(self, home: Path):
        self.home = home
        self._stack = contextlib.AsyncExitStack()

    async def open(self) -> None:
        self.bed = await self._stack.enter_async_context(ns.node_bed(self.home))
        channel = await self._stack.enter_async_context(
            grpc.aio.insecure_channel(self.bed.address, options=CLIENT_OPTIONS))
        self.channel, self.stub = channel, pb_grpc.NodeStub(channel)
        self.delivered_tensor = torch.randn(ns.ACT_SHAPE, generator=torch.Generator().manual_seed(12345))
        self.delivered = self.bed.tensor_chunks(micro_batch=0, tensor=self.delivered_tensor)
        assert await self.bed.push(self.delivered) == (C.OK, "")
        self.bed.service.membership.members = {self.bed.prev.node_id: self.bed.prev.public(),
                                               self.bed.next.node_id: self.bed.next.public()}

    async def close(self) -> None:
        await self._stack.aclose()

    def state_digest(self) -> str:
        rt, svc, m = self.bed.runtime, self.bed.service, self.bed.service.membership
        return _digest({
            "commitment": rt.state_commitment.hex(), "completed": rt.completed_step, "epoch": svc.epoch,
            "assignment": (rt.assignment.run_id, rt.assignment.epoch, rt.assignment.stage),
            "seen": sorted((list(k), v.hex()) for k, v in rt.admission.seen.items()),
            "inbox": sorted(list(k) for k in rt.admission.inbox), "grads_for": rt._grads_for, "banned": sorted(rt.banned),
            "peer_keys": sorted(svc.peer_keys), "members": sorted(m.members), "run": m.run_id,
            "coordinator": m.coordinator_key.public_key.hex(),
        })

    async def probe(self) -> None:
        """The node still serves: a valid gradient from the next stage is accepted, then dropped
        again with an AbortStep the coordinator signs (so every case starts from the same state)."""
        bed = self.bed
        chunks = bed.tensor_chunks(bed.next, micro_batch=1, direction=ns.BACKWARD)
        code, details = await bed.push(chunks)
        assert code == C.OK, f"a valid gradient was refused after the case: {code.name} {details}"
        await self._reset_step()

    async def _reset_step(self) -> None:
        bed = self.bed
        await bed.order("AbortStep", pb.AbortStepRequest(run_id=ns.RUN, epoch=bed.epoch, step=0,
                                                         node_id=bed.node.node_id, attempt=bed.attempt))
        bed.attempt += 1  # the aborted attempt's tensors are refused from now on: the next attempt's are not
        self.delivered = bed.tensor_chunks(micro_batch=0, tensor=self.delivered_tensor)  # same bytes, next attempt
        assert await bed.push(self.delivered) == (C.OK, "")

    def _order(self, name: str, **fields) -> Any:
        bed = self.bed
        base = dict(run_id=ns.RUN, epoch=bed.epoch, node_id=bed.node.node_id)
        base.update(fields)
        if name == "Assign":
            req = bed.assign_request(epoch=bed.epoch + 1)
            for k, v in fields.items():
                setattr(req, k, v)
            return req
        base.setdefault("step", 0)
        if name == "RunStep":
            return pb.RunStepRequest(**base)
        if name == "ApplyUpdate":
            return pb.ApplyUpdateRequest(**{"global_grad_norm": 1.0, "lr": lr_at(0, ns.OPTIM), **base})
        return pb.AbortStepRequest(**base)

    def _fetch(self, method: str, signer: Identity | None, **fields) -> Any:
        bed = self.bed
        base = dict(run_id=ns.RUN, node_id=bed.node.node_id, step=0)
        base.update(fields)
        if method == "FetchState":
            base.pop("direction", None), base.pop("micro_batch", None), base.pop("sent", None)
            req = pb.FetchStateRequest(stage=ns.STAGE, **base)
        else:
            req = pb.FetchTensorRequest(direction=base.pop("direction", ns.FORWARD), **base)
        return sign(req, signer) if signer is not None else req

    async def _stream(self, method: str, req) -> list:
        return [c async for c in getattr(self.stub, method)(req, timeout=CALL_DEADLINE)]

    async def _push(self, chunks: list[pb.TensorChunk]) -> None:
        await self.stub.PushTensor(iter(chunks), timeout=CALL_DEADLINE)

    async def send(self, case: Case) -> Any:
        f, p, bed = case.fault, case.params, self.bed
        other = Identity.generate()

        def header_only(**fields) -> list[pb.TensorChunk]:
            chunks = bed.tensor_chunks(micro_batch=1)
            h = chunks[0].header
            for k, v in fields.items():
                if k == "shape":
                    del h.shape[:]
                    h.shape.extend(v)
                else:
                    setattr(h, k, v)
            chunks[0].header_signature = bed.prev.sign(canonical_bytes(h))  # the sender signs what it claims
            return chunks

        if f is NFault.PUSH_FORGED_SIGNATURE:
            chunks = bed.tensor_chunks(micro_batch=1)
            chunks[-1].signature = p["signature"]
            return await self._push(chunks)
        if f is NFault.PUSH_IMPERSONATION:
            return await self._push(bed.tensor_chunks(bed.prev, signer=bed.stranger, micro_batch=1))
        if f is NFault.PUSH_UNKNOWN_SENDER:
            sender = p["sender"] if p["sender"] not in (bed.prev.node_id, bed.next.node_id) else ""
            chunks = bed.tensor_chunks(bed.stranger, micro_batch=1)
            chunks[0].header.sender = sender
            return await self._push(chunks)
        if f is NFault.PUSH_BANNED_SENDER:
            bed.runtime.banned = {bed.prev.node_id}
            try:
                return await self._push(bed.tensor_chunks(micro_batch=1))
            finally:
                bed.runtime.banned = set()
        if f in (NFault.PUSH_CLAIMED_SIZE_OVER_LIMIT, NFault.PUSH_TOO_MANY_DIMS, NFault.PUSH_DIM_OVER_INT64):
            chunks = header_only(shape=p["shape"])
            chunks[0].data = b"\x00" * p.get("data", 64)
            return await self._push(chunks[:1] + [pb.TensorChunk(signature=chunks[-1].signature)])
        if f is NFault.PUSH_SHAPE_MISMATCH:
            return await self._push(bed.tensor_chunks(micro_batch=1, tensor=torch.zeros(p["shape"])))
        if f is NFault.PUSH_DTYPE_MISMATCH:
            dtype = {pb.DTYPE_FLOAT16: torch.float16, pb.DTYPE_BFLOAT16: torch.bfloat16,
                     pb.DTYPE_INT64: torch.int64}[p["dtype"]]
            return await self._push(bed.tensor_chunks(micro_batch=1, tensor=torch.zeros(ns.ACT_SHAPE, dtype=dtype)))
        if f is NFault.PUSH_UNKNOWN_DTYPE:
            return await self._push(header_only(dtype=p["dtype"]))
        if f is NFault.PUSH_UNKNOWN_DIRECTION:
            return await self._push(header_only(direction=p["direction"]))
        if f is NFault.PUSH_TRUNCATED:
            return await self._push(bed.tensor_chunks(micro_batch=1)[:p["keep"]])
        if f is NFault.PUSH_EMPTY:
            return await self._push([])
        if f is NFault.PUSH_EXTRA_BYTES:
            chunks = bed.tensor_chunks(micro_batch=1)
            chunks[p["chunk"]].data += p["extra"]
            return await self._push(chunks)
        if f is NFault.PUSH_PAYLOAD_TAMPERED:
            chunks = bed.tensor_chunks(micro_batch=1)
            i, j = divmod(p["byte"], ns.CHUNK_BYTES)
            data = bytearray(chunks[i].data)
            data[j] ^= p["xor"]
            chunks[i].data = bytes(data)
            return await self._push(chunks)
        if f is NFault.PUSH_NO_HEADER:
            chunks = bed.tensor_chunks(micro_batch=1)
            chunks[0].ClearField("header")
            return await self._push(chunks)
        if f is NFault.PUSH_REPEATED_HEADER:
            chunks = bed.tensor_chunks(micro_batch=1)
            chunks[p["chunk"]].header.CopyFrom(chunks[0].header)
            return await self._push(chunks)
        if f is NFault.PUSH_REPLAY:
            return await self._push(self.delivered)
        if f is NFault.PUSH_WRONG_RECEIVER:
            receiver = p["receiver"] if p["receiver"] != bed.node.node_id else ""
            return await self._push(bed.tensor_chunks(micro_batch=1, receiver=receiver or "nobody"))
        if f is NFault.PUSH_WRONG_RUN:
            return await self._push(bed.tensor_chunks(micro_batch=1, run_id=p["run_id"]))
        if f is NFault.PUSH_WRONG_STEP:
            return await self._push(bed.tensor_chunks(micro_batch=1, step=p["step"]))
        if f is NFault.PUSH_WRONG_EPOCH:
            chunks = header_only(epoch=p["epoch"])
            return await self._push(chunks)
        if f is NFault.PUSH_MICRO_BATCH_OUT_OF_RANGE:
            return await self._push(bed.tensor_chunks(micro_batch=p["micro_batch"]))
        if f is NFault.PUSH_OVERSIZED_MESSAGE:
            chunks = bed.tensor_chunks(micro_batch=1)
            chunks[1].data = b"\x00" * p["size"]
            return await self._push(chunks)
        if f is NFault.PUSH_NAN_INF:
            t = torch.randn(ns.ACT_SHAPE)
            t.view(-1)[p["positions"]] = p["value"]
            flags_before = len(bed.runtime.admission.flags.get(0, []))
            try:
                await self._push(bed.tensor_chunks(micro_batch=1, tensor=t))
                reasons = [fl.reason for fl in bed.runtime.admission.flags.get(0, [])[flags_before:]]
                assert any("nan" in r.lower() or "inf" in r.lower() or "finite" in r.lower() for r in reasons), \
                    f"a NaN/Inf activation was not flagged by the screen: {reasons}"
            finally:
                await self._reset_step()  # the accepted tensor is dropped again: state as before
                bed.runtime.admission.flags.pop(0, None)
            return None
        if f in (NFault.ORDER_FORGED, NFault.ORDER_OTHER_NODE, NFault.ORDER_OTHER_RUN, NFault.ORDER_WRONG_EPOCH):
            fields = {NFault.ORDER_OTHER_NODE: {"node_id": p.get("node_id", "") if p.get("node_id") != bed.node.node_id
                                                else ""},
                      NFault.ORDER_OTHER_RUN: {"run_id": p.get("run_id", "")},
                      NFault.ORDER_WRONG_EPOCH: {"epoch": p.get("epoch", 0)}}.get(f, {})
            if f is NFault.ORDER_WRONG_EPOCH and p["order"] == "Assign":
                fields = {"epoch": min(p["epoch"], bed.epoch)}  # not newer than the one it holds
            req = sign(self._order(p["order"], **fields), bed.coord)
            if f is NFault.ORDER_FORGED:
                req.signature = p["signature"]
            return await getattr(self.stub, p["order"])(req, timeout=CALL_DEADLINE)
        if f is NFault.ASSIGN_BAD_SPEC:
            req = bed.assign_request(epoch=bed.epoch + 1)
            what, v = p["what"], p["value"]
            if what == "stage":
                req.stage = max(v, req.num_stages)
            elif what == "num_stages":
                req.num_stages = max(v, ns.GPT.n_layer + 1)
            elif what in ("micro_batches", "micro_batch_size"):
                setattr(req.train, what, 0)
            else:  # heads that do not divide the width
                req.model.n_head = v if v and ns.GPT.n_embd % v else ns.GPT.n_embd + 1
            return await bed.stub.Assign(sign(req, bed.coord), timeout=CALL_DEADLINE)
        if f is NFault.APPLY_UPDATE_BAD_LR:
            req = sign(self._order("ApplyUpdate", lr=p["lr"]), bed.coord)
            return await self.stub.ApplyUpdate(req, timeout=CALL_DEADLINE)
        if f in (NFault.FETCH_WRONG_NODE, NFault.FETCH_UNREGISTERED, NFault.FETCH_BANNED, NFault.FETCH_FORGED,
                 NFault.FETCH_OTHER_RUN):
            fields: dict[str, Any] = {}
            signer: Identity | None = bed.prev
            if f is NFault.FETCH_WRONG_NODE:
                fields["node_id"] = p["node_id"] if p["node_id"] != bed.node.node_id else ""
            elif f is NFault.FETCH_UNREGISTERED:
                fields["requester"] = p["requester"] if p["requester"] not in (bed.prev.node_id, bed.next.node_id) \
                    else "x"
                signer = other
            elif f is NFault.FETCH_BANNED:
                fields["requester"] = bed.prev.node_id
                bed.runtime.banned = {bed.prev.node_id}
            elif f is NFault.FETCH_OTHER_RUN:
                fields["run_id"] = p["run_id"]
            fields.setdefault("requester", bed.prev.node_id)
            req = self._fetch(p["method"], signer, **fields)
            if f is NFault.FETCH_FORGED:
                req.signature = p["signature"]
            try:
                return await self._stream(p["method"], req)
            finally:
                bed.runtime.banned = set()
        if f is NFault.FETCH_NOT_RETAINED:
            key = (p["step"], p["direction"], p["micro_batch"], p["sent"])
            if key[:3] == (0, ns.FORWARD, 0) and not key[3]:  # that one is kept
                key = (1, *key[1:])
            req = self._fetch("FetchTensor", bed.coord, requester="", step=key[0], direction=key[1],
                              micro_batch=key[2], sent=key[3])
            return await self._stream("FetchTensor", req)
        if f in (NFault.AUDIT_FORGED, NFault.AUDIT_OTHER_AUDITOR):
            req = pb.AuditRequest(run_id=ns.RUN, audit_id=1, step=0, stage=0,
                                  auditor=bed.node.node_id if f is NFault.AUDIT_FORGED else
                                  (p["auditor"] if p["auditor"] != bed.node.node_id else ""))
            sign(req, bed.coord)
            if f is NFault.AUDIT_FORGED:
                req.signature = p["signature"]
            return await self.stub.Audit(req, timeout=CALL_DEADLINE)
        if f is NFault.GARBAGE_BYTES:
            kind = NODE_METHODS[p["method"]]
            if kind == "unary":
                return await raw_unary(self.channel, "Node", p["method"], p["payload"])
            if kind == "stream":
                return await raw_unary_stream(self.channel, "Node", p["method"], p["payload"])
            return await raw_stream_unary(self.channel, "Node", p["method"], [p["payload"]])
        raise AssertionError(f"no scenario for {f}")


# == running cases ==============================================================================


class Harness:
    """One event loop that hosts a target's servers and sends it cases, one at a time."""

    def __init__(self, target_cls: type, home: Path):
        self.loop = asyncio.new_event_loop()
        self.target = target_cls(home)
        self.loop.run_until_complete(asyncio.wait_for(self.target.open(), 60))

    def close(self) -> None:
        try:
            self.loop.run_until_complete(asyncio.wait_for(self.target.close(), 60))
        finally:
            self.loop.close()

    def run_case(self, case: Case) -> Result:
        """Send ``case``; check status, state, that the target still serves, and memory."""
        target, failures = self.target, []
        expected = target.expected[case.fault]
        before = target.state_digest()
        base = reset_peak_rss()
        code, details = C.OK, ""
        try:
            self.loop.run_until_complete(asyncio.wait_for(target.send(case), 60))
        except grpc.aio.AioRpcError as err:
            code, details = err.code(), err.details() or ""
        except AssertionError as exc:
            failures.append(f"check failed: {exc}")
        except Exception as exc:  # noqa: BLE001 - a case that could not be sent is a failure too
            failures.append(f"case not sent: {type(exc).__name__}: {exc}")
        growth = max(peak_rss() - base, 0)
        if code != expected:
            failures.append(f"expected {expected.name}, got {code.name} ({details})")
        if code in (C.UNKNOWN, C.INTERNAL):
            failures.append(f"imprecise status {code.name} ({details})")
        after = target.state_digest()
        if after != before:
            failures.append("the run's state changed")
        if growth > RSS_BOUND:
            failures.append(f"peak RSS grew by {growth / 2**20:.1f} MiB")
        try:
            self.loop.run_until_complete(asyncio.wait_for(target.probe(), 60))
        except Exception as exc:  # noqa: BLE001 - reported as the case's failure
            failures.append(f"not serving afterwards: {type(exc).__name__}: {exc}")
        return Result(code, details, growth, failures)


TARGETS: dict[str, tuple[type, Callable[[], dict[enum.Enum, st.SearchStrategy[Case]]]]] = {
    "coordinator": (CoordinatorTarget, coordinator_cases),
    "node": (NodeTarget, node_cases),
}
