"""A status client written from pipeguard.proto alone, run by tests/test_status_api.py.

    python -I tests/status_client.py SANDBOX ADDRESS ADMIN_TOKEN_FILE COORDINATOR_NODE_ID

SANDBOX holds a copy of the generated code only (pipeguard/v1/*_pb2*.py, empty __init__ files).
This script imports nothing else of pipeguard's: grpc, the standard health and reflection
stubs, and protobuf. It checks what the proto promises a client, exits 0 and prints one JSON line
with what it saw; any broken promise is an AssertionError (exit 1, traceback on stderr).
"""

from __future__ import annotations

import hashlib
import json
import sys
import time

SANDBOX, ADDRESS, TOKEN_FILE, COORDINATOR_ID = sys.argv[1:5]
sys.path.insert(0, SANDBOX)

import grpc  # noqa: E402
from google.protobuf import descriptor_pb2  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc  # noqa: E402

import pipeguard  # noqa: E402
from pipeguard.v1 import pipeguard_pb2 as pb  # noqa: E402
from pipeguard.v1 import pipeguard_pb2_grpc as pb_grpc  # noqa: E402

assert pipeguard.__file__.startswith(SANDBOX), f"pipeguard came from {pipeguard.__file__}, not the sandbox"
DEADLINE = 30.0
FLOOD = 1300
"""Audit-rate orders sent while a watcher reads nothing: more than the 1000 events the proto says a
watcher may leave unread, plus what the transport holds in flight."""
SERVICE = "pipeguard.v1.Coordinator"


def kind_of(t: int) -> str:
    """Event.kind as the proto defines it from Event.type."""
    return pb.EventKind.Name(t).removeprefix("EVENT_KIND_").lower()


def reflection(channel: grpc.Channel) -> dict:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    asks = [reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE)]
    listed, found = list(stub.ServerReflectionInfo(iter(asks), timeout=DEADLINE))
    services = sorted(s.name for s in listed.list_services_response.service)
    assert {SERVICE, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= set(services), services
    files = [descriptor_pb2.FileDescriptorProto.FromString(b)
             for b in found.file_descriptor_response.file_descriptor_proto]
    mine = next(f for f in files if f.package == "pipeguard.v1")
    assert mine.SerializeToString() == pb.DESCRIPTOR.serialized_pb, "reflection serves another schema than ours"
    methods = {m.name for s in mine.service if s.name == "Coordinator" for m in s.method}
    assert {"Status", "Watch"} <= methods
    assert "EventKind" in {e.name for e in mine.enum_type}
    return {"services": services}


def health(channel: grpc.Channel) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    for name in ("", SERVICE):
        reply = stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=DEADLINE)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, (name, reply)


def status(stub: pb_grpc.CoordinatorStub) -> pb.StatusReply:
    deadline = time.monotonic() + DEADLINE
    while True:  # "coordinator_started", then "waiting" once its step clock runs
        s = stub.Status(pb.StatusRequest(), timeout=DEADLINE)  # history 0: the documented default
        if len(s.events) >= 2 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert s.phase == pb.RUN_PHASE_WAITING and s.step == 0
    assert len(s.coordinator_key) == 32 and s.coordinator_key.hex() == s.coordinator_key_hex
    assert hashlib.sha256(s.coordinator_key).hexdigest()[:32] == COORDINATOR_ID, "node id derivation"
    assert 0 < len(s.events) <= 50, "history 0 means 50"
    for e in s.events:
        assert e.type != pb.EVENT_KIND_UNSPECIFIED and e.kind == kind_of(e.type), e
    started = next(e for e in s.events if e.type == pb.EVENT_KIND_COORDINATOR_STARTED)
    assert started.HasField("step") and started.step == 0 and not started.node_id, "step 0 is present, no node"
    assert not started.HasField("loss") and not started.HasField("tokens_per_s")
    return s


def watch(stub: pb_grpc.CoordinatorStub, address: str, token: str, s: pb.StatusReply) -> dict:
    # Resume rule, the simple case: after_seq k starts at the event after k.
    assert len(s.events) >= 2, s.events
    call = stub.Watch(pb.WatchRequest(after_seq=s.events[0].seq), timeout=DEADLINE)
    assert next(call).seq == s.events[1].seq == s.events[0].seq + 1
    call.cancel()

    # A watcher that reads nothing, with a small flow-control window so the coordinator's writes
    # block (gRPC would otherwise buffer for it), while an operator changes the audit rate FLOOD times.
    slow = grpc.insecure_channel(address, options=[("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 1024)])
    call = pb_grpc.CoordinatorStub(slow).Watch(pb.WatchRequest(after_seq=0), timeout=4 * DEADLINE)
    seqs = [next(call).seq]
    metadata = (("authorization", f"Bearer {token}"),)
    pending = []
    for i in range(FLOOD):
        pending.append(stub.SetAuditRate.future(pb.SetAuditRateRequest(rate=(i % 10) / 10, operator="status_client"),
                                                metadata=metadata, timeout=DEADLINE))
        if len(pending) >= 32:
            for f in pending:
                f.result()
            pending = []
    for f in pending:
        f.result()
    try:
        for ev in call:
            seqs.append(ev.seq)
        raise AssertionError("a watcher that fell behind saw its stream end OK")
    except grpc.RpcError as err:
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err
        trailer = dict(err.trailing_metadata() or ())
        cut = int(trailer["pipeguard-after-seq"])
        assert f"after_seq={cut}" in err.details(), err.details()
    slow.close()
    assert seqs == list(range(seqs[0], cut + 1)), "events up to the cut arrive in order, without a gap"

    # Resume after the cut: the rest, from cut + 1, to the newest event.
    newest = stub.Status(pb.StatusRequest(history=1), timeout=DEADLINE).events[-1].seq
    assert newest >= FLOOD > cut, (newest, cut)
    call = stub.Watch(pb.WatchRequest(after_seq=cut), timeout=DEADLINE)
    resumed = []
    for ev in call:
        assert ev.type == pb.EVENT_KIND_AUDIT_RATE and ev.HasField("step") and not ev.node_id
        resumed.append(ev.seq)
        if ev.seq == newest:
            break
    call.cancel()
    assert resumed == list(range(cut + 1, newest + 1)), "the resumed stream continues where the cut one stopped"
    return {"cut_after": cut, "resumed": len(resumed), "newest": newest}


def main() -> int:
    token = open(TOKEN_FILE).read().strip()
    with grpc.insecure_channel(ADDRESS) as channel:
        seen = reflection(channel)
        health(channel)
        stub = pb_grpc.CoordinatorStub(channel)
        s = status(stub)
        seen.update(watch(stub, ADDRESS, token, s))
    extra = sorted(m for m in sys.modules if m.split(".")[0] in {"torch", "coordinator", "node"}
                   or (m.split(".")[0] == "pipeguard" and m not in {"pipeguard", "pipeguard.v1"}
                       and not m.startswith("pipeguard.v1.")))
    assert not extra, f"the client loaded more than the generated code: {extra}"
    print(json.dumps(seen))
    return 0


if __name__ == "__main__":
    sys.exit(main())
