"""Rendering a StatusReply for people: the pipeline, the nodes, the loss trend, events."""

from __future__ import annotations

import time
from typing import Any, Callable, Iterator

import grpc
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

from pipeguard.v1 import pipeguard_pb2 as pb

SPARK = "▁▂▃▄▅▆▇█"
INT64_TYPES = {FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_SINT64,
               FieldDescriptor.TYPE_FIXED64, FieldDescriptor.TYPE_SFIXED64}


def to_json(msg: Message) -> dict[str, Any]:
    """``msg`` as ``status --json`` prints it: the proto3 JSON mapping with proto field names and every
    field without presence shown (an absent `optional` field is left out), except that 64-bit
    integers are JSON numbers, not strings (Python's json reads them back exactly)."""
    out = MessageToDict(msg, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    _numbers(out, msg.DESCRIPTOR)
    return out


def follow(stub, after_seq: int, on_resume: Callable[[str, int], None] | None = None) -> Iterator[pb.Event]:
    """Every event after ``after_seq``, then live ones, by the resume rule of WatchRequest: a stream
    that ends RESOURCE_EXHAUSTED (the watcher fell behind) is opened again after the last event
    seen, ``on_resume(details, last_seq)`` told. Ends when a stream ends OK having sent nothing
    (an older coordinator ending it without a word is resumed too); raises any other error."""
    last = after_seq
    while True:
        before = last
        try:
            for ev in stub.Watch(pb.WatchRequest(after_seq=last)):
                last = ev.seq
                yield ev
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or last == before:
                raise
            if on_resume is not None:
                on_resume(err.details(), last)
            continue
        if last == before:
            return


def _repeated(f: FieldDescriptor) -> bool:
    if hasattr(f, "is_repeated"):  # protobuf >= 6.31; `label` is gone in 7
        return f.is_repeated
    return f.label == FieldDescriptor.LABEL_REPEATED


def _numbers(d: dict[str, Any], desc: Descriptor) -> None:
    for f in desc.fields:
        if f.name not in d:
            continue
        if f.type in INT64_TYPES:
            d[f.name] = [int(v) for v in d[f.name]] if _repeated(f) else int(d[f.name])
        elif f.type == FieldDescriptor.TYPE_MESSAGE and not f.message_type.GetOptions().map_entry:
            for sub in d[f.name] if _repeated(f) else [d[f.name]]:
                _numbers(sub, f.message_type)


def _role(r: int) -> str:
    return pb.Role.Name(r).removeprefix("ROLE_").lower()


def _phase(p: int) -> str:
    return pb.RunPhase.Name(p).removeprefix("RUN_PHASE_").lower()


def sparkline(values: list[float], width: int = 40) -> str:
    if not values:
        return ""
    if len(values) > width:  # average into `width` buckets
        step = len(values) / width
        values = [sum(values[int(i * step):int((i + 1) * step)]) / max(1, int((i + 1) * step) - int(i * step))
                  for i in range(width)]
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0
    return "".join(SPARK[min(len(SPARK) - 1, int((v - lo) / span * (len(SPARK) - 1)))] for v in values)


def render(s: pb.StatusReply) -> str:
    lines = [f"run {s.run_id}   phase {_phase(s.phase)}   step {s.step}/{s.total_steps}   "
             f"stages {s.num_stages}   coordinator key {s.coordinator_key.hex()[:16]}…"]
    stages = sorted((n for n in s.nodes if n.role == pb.ROLE_STAGE), key=lambda n: n.stage)
    if stages:
        lines.append("pipeline  " + " ──▶ ".join(f"[{n.stage}] {n.node_id[:8]}" for n in stages))
    lines.append("")
    header = f"{'NODE':<10} {'ROLE':<8} {'STAGE':>5} {'ADDRESS':<22} {'HEARTBEAT':>10} {'SENT':>6} {'RECV':>6} " \
             f"{'REJ':>4} {'REJ BY PEERS':>12} {'AUDITS OK/FAIL':>14} {'AUDITED':>7}  NOTE"
    lines.append(header)
    for n in s.nodes:
        hb = f"{n.heartbeat_age_s:.1f}s ago" if n.heartbeat_age_s >= 0 else "never"
        stage = str(n.stage) if n.role == pb.ROLE_STAGE and n.HasField("stage") else "-"
        lines.append(f"{n.node_id[:8]:<10} {_role(n.role):<8} {stage:>5} {n.address:<22} {hb:>10} "
                     f"{n.tensors_sent:>6} {n.tensors_received:>6} {n.tensors_rejected:>4} "
                     f"{n.rejected_by_peers:>12} {f'{n.audits_passed}/{n.audits_failed}':>14} {n.audits_done:>7}  "
                     f"{n.ban_reason or (f'no stage: {n.distrusted}' if n.distrusted else '')}")
    builds: dict[str, int] = {}
    for n in s.nodes:
        if n.build:
            builds[n.build] = builds.get(n.build, 0) + 1
    for build, count in sorted(builds.items()):
        lines.append(f"build     {build}: {count} node{'s' if count != 1 else ''}")
    lines.append("")
    lines.append(f"audits    {s.audits_total} dispatched, {s.detections} confirmed detections, "
                 f"{sum(1 for n in s.nodes if n.role == pb.ROLE_BANNED)} banned; {s.audits_pending} running, "
                 f"at most {s.max_audit_lag_steps} step{'s' if s.max_audit_lag_steps != 1 else ''} behind; "
                 f"the clock waited {s.audit_wait_s:.1f} s for them")
    for path in s.evidence:
        lines.append(f"evidence  {path}")
    if s.losses:
        losses = [p.loss for p in s.losses]
        tps = sorted(p.tokens_per_s for p in s.losses)[len(s.losses) // 2]
        lines += ["", f"loss      {losses[-1]:.4f} (step {s.losses[-1].step})   first shown {losses[0]:.4f}   "
                      f"median {tps:,.0f} tokens/s",
                  f"trend     {sparkline(losses)}"]
    if s.events:
        lines += ["", "recent events"]
        lines += ["  " + render_event(e) for e in s.events[-10:]]
    return "\n".join(lines)


def render_event(e: pb.Event) -> str:
    when = time.strftime("%H:%M:%S", time.localtime(e.time))
    return f"{when} {e.kind:<18} {e.message}"
