"""Run state on disk and the event log.

``state.json`` (run id, step, epoch, nodes, bans, losses) is rewritten atomically (temp file,
fsync, rename) after every change that matters, so a coordinator killed at any instant
restarts from the last completed step. ``events.jsonl`` is append-only and holds every event, so
event ``seq`` numbers keep increasing across restarts. Writes that fail (disk full, unwritable
directory) raise ``StateError`` with the path and the reason; the previous state file is never
truncated. The state directory holds the coordinator's private key and is kept ``0700``.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import stat
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from pipeguard.errors import PipeguardError
from pipeguard.v1 import pipeguard_pb2 as pb

if TYPE_CHECKING:
    from coordinator.registry import Registry

log = logging.getLogger(__name__)

EVENTS_KEPT = 2000
EVENTS_COMPACT_AT = 10 * EVENTS_KEPT
"""events.jsonl is cut down to its last EVENTS_KEPT lines at start once it holds more than this."""
LOSSES_KEPT = 100_000
WATCH_BACKLOG = 1000
"""Events a live watcher may leave unread; one more and its stream ends RESOURCE_EXHAUSTED (it resumes
with ``after_seq``, see WatchRequest in the proto)."""
EVENT_FIELDS = ("loss", "tokens_per_s", "grad_norm", "lr")
"""Structured figures an event may carry (Event fields with presence, see EventKind)."""


def event_type(kind: str) -> int:
    """The EventKind value of ``kind`` (an Event.kind string); UNSPECIFIED for a kind the schema lacks."""
    try:
        return pb.EventKind.Value("EVENT_KIND_" + kind.upper())
    except ValueError:
        return pb.EVENT_KIND_UNSPECIFIED


def event_kinds() -> list[str]:
    """Every kind the coordinator may emit: the EventKind names as Event.kind spells them."""
    return [name.removeprefix("EVENT_KIND_").lower() for name in pb.EventKind.keys()
            if name != "EVENT_KIND_UNSPECIFIED"]


class StateError(PipeguardError):
    """The state directory cannot be written."""


@dataclass
class RunState:
    run_id: str
    step: int = 0
    epoch: int = 0
    phase: int = pb.RUN_PHASE_WAITING
    nodes: list[dict] = field(default_factory=list)
    losses: list[tuple[int, float, float]] = field(default_factory=list)
    """(step, loss, tokens/s) for every completed step."""
    commitments: dict[str, str] = field(default_factory=dict)
    """stage index -> hex digest of its state after the last applied step."""
    skipped: list[int] = field(default_factory=list)
    """Stages bypassed for lack of a standby (skip-layer mode)."""
    evidence: list[str] = field(default_factory=list)
    """Evidence bundles written, one per ban."""
    audit_rate: float | None = None
    """Audit rate set by an operator (SetAuditRate); overrides audit.rate when the run resumes."""
    distrusted: dict[str, str] = field(default_factory=dict)
    """node id -> why: nodes taken out of the pipeline for messages their neighbours kept
    refusing (not a ban: they stay members, but are never given a stage again in this run)."""
    set_aside: dict[str, str] = field(default_factory=dict)
    """node id -> why, oldest first: nodes routed around after failed steps on one accuser's word or
    on nobody's (not a demotion: they get a stage again when no other node can take it)."""


class RunStore:
    def __init__(self, directory: Path):
        self.dir = Path(directory).expanduser()
        try:
            self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            mode = stat.S_IMODE(self.dir.stat().st_mode)
            if mode & 0o077:  # it holds the coordinator's private key and the run's evidence
                os.chmod(self.dir, mode & 0o700)
                log.warning("state directory %s was accessible by group or others (mode %o); changed to %o",
                            self.dir, mode, mode & 0o700)
        except OSError as exc:
            raise StateError(f"cannot create state directory {self.dir}: {exc.strerror}") from None
        self.state_path = self.dir / "state.json"
        self.events_path = self.dir / "events.jsonl"
        self.key_path = self.dir / "coordinator.key"

    def load_or_create(self, run_id: str, resume: bool = False) -> tuple[RunState, bool]:
        """Load the run (``resume``), or start a new one. Returns (state, resumed).

        A directory that holds a run is never reused for a new one by accident: without
        ``resume`` it is refused, and ``resume`` without a run is refused too.
        """
        if self.state_path.exists():
            raw = json.loads(self.state_path.read_text())
            st = RunState(
                run_id=raw["run_id"], step=raw["step"], epoch=raw["epoch"], phase=raw["phase"], nodes=raw["nodes"],
                losses=[tuple(x) for x in raw["losses"]], commitments=raw.get("commitments", {}),
                skipped=raw.get("skipped", []), evidence=raw.get("evidence", []), audit_rate=raw.get("audit_rate"),
                distrusted=raw.get("distrusted", {}), set_aside=raw.get("set_aside", {}),
            )
            if not resume:
                phase = pb.RunPhase.Name(st.phase).removeprefix("RUN_PHASE_").lower()
                raise StateError(
                    f"state directory {self.dir} already holds run {st.run_id!r} ({phase}, at step {st.step}); "
                    "pass --resume to continue it, or pick another --state-dir for a new run"
                )
            if run_id and run_id != st.run_id:
                raise StateError(
                    f"{self.state_path} holds run {st.run_id!r} but the config asks for {run_id!r}; "
                    "use another state_dir or the same run_id"
                )
            return st, True
        if resume:
            raise StateError(f"nothing to resume: {self.dir} holds no run ({self.state_path.name} is missing); "
                             "point --state-dir at the run's directory, or start without --resume for a new run")
        st = RunState(run_id=run_id or f"run-{uuid.uuid4().hex[:12]}")
        self.save(st)
        return st, False

    def save(self, st: RunState) -> None:
        data = json.dumps({
            "run_id": st.run_id, "step": st.step, "epoch": st.epoch, "phase": st.phase, "nodes": st.nodes,
            "losses": st.losses[-LOSSES_KEPT:], "commitments": st.commitments, "skipped": st.skipped,
            "evidence": st.evidence, "audit_rate": st.audit_rate, "distrusted": st.distrusted,
            "set_aside": st.set_aside, "saved_at": time.time(),
        })
        tmp = self.state_path.with_suffix(".json.tmp")
        try:
            with open(tmp, "w") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.state_path)
        except OSError as exc:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
            raise StateError(f"cannot write {self.state_path}: {exc.strerror or exc}") from None

    def save_run(self, st: RunState, registry: "Registry") -> None:
        """Save the run with the registry's node records as they are now (after any change to either)."""
        st.nodes = [r.to_json() for r in registry.nodes.values()]
        self.save(st)

    def append_event(self, ev: pb.Event) -> None:
        record = {"seq": ev.seq, "time": ev.time, "kind": ev.kind, "message": ev.message, "node_id": ev.node_id}
        for name in ("step", *EVENT_FIELDS):  # absent stays absent
            if ev.HasField(name):
                record[name] = getattr(ev, name)
        line = json.dumps(record)
        try:
            with open(self.events_path, "a") as fh:
                fh.write(line + "\n")
        except OSError as exc:
            log.error("cannot append to %s: %s", self.events_path, exc.strerror or exc)

    def load_events(self) -> list[pb.Event]:
        """The last ``EVENTS_KEPT`` events; a file grown far past that is cut down to them."""
        if not self.events_path.exists():
            return []
        lines = self.events_path.read_text().splitlines()
        if len(lines) > EVENTS_COMPACT_AT:
            self._compact(lines[-EVENTS_KEPT:])
        out = []
        for line in lines[-EVENTS_KEPT:]:
            try:
                d = json.loads(line)
                ev = pb.Event(**{k: v for k, v in d.items() if k in pb.Event.DESCRIPTOR.fields_by_name})
            except (json.JSONDecodeError, TypeError, ValueError):
                continue  # a line cut short by a crash
            ev.type = event_type(ev.kind)  # lines written before Event.type existed
            out.append(ev)
        return out

    def _compact(self, lines: list[str]) -> None:
        tmp = self.events_path.with_suffix(".jsonl.tmp")
        try:
            with open(tmp, "w") as fh:
                fh.write("".join(line + "\n" for line in lines))
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.events_path)
        except OSError as exc:
            log.error("cannot compact %s: %s", self.events_path, exc.strerror or exc)


class EventLog:
    """Recent events in memory, on disk, and pushed to live watchers (bounded queues)."""

    def __init__(self, store: RunStore):
        self.store = store
        self.recent: collections.deque[pb.Event] = collections.deque(store.load_events(), maxlen=EVENTS_KEPT)
        self.seq = self.recent[-1].seq if self.recent else 0
        self.watchers: set[asyncio.Queue] = set()
        self.listeners: list[Callable[[pb.Event], None]] = []
        """Called with every event as it is emitted (metrics count steps and bans this way)."""

    def emit(self, kind: str, message: str, node_id: str = "", step: int | None = None, persist: bool = True,
             **figures: float) -> pb.Event:
        """Record an event and push it to watchers.

        ``kind`` must be one of the proto's EventKind (``event_kinds()``): that enum is the one list
        of kinds, documented for clients. ``step`` None: the event concerns no step (Event.step is
        absent). ``figures``: the structured fields of EVENT_FIELDS the kind carries.

        Every event is written to events.jsonl, so a restarted coordinator goes on numbering after
        the last one and a watcher resuming with ``after_seq`` misses nothing. ``persist`` is
        ignored (it used to keep per-step events in memory only, which made ``seq`` numbers repeat
        after a restart); it is accepted so that existing callers keep working.
        """
        kind_type = event_type(kind)
        if kind_type == pb.EVENT_KIND_UNSPECIFIED:
            raise ValueError(f"event kind {kind!r} is not an EventKind of pipeguard.proto; add it there first")
        unknown = set(figures) - set(EVENT_FIELDS)
        if unknown:
            raise ValueError(f"events carry no field {sorted(unknown)} (Event has {EVENT_FIELDS})")
        self.seq += 1
        ev = pb.Event(seq=self.seq, time=time.time(), kind=kind, type=kind_type, message=message, node_id=node_id,
                      step=step, **figures)
        self.recent.append(ev)
        self.store.append_event(ev)
        log.info("event %s: %s", kind, message)
        for listener in self.listeners:
            listener(ev)
        for q in list(self.watchers):
            if q.qsize() >= WATCH_BACKLOG:  # a watcher that doesn't read is cut off, never waited on
                self.watchers.discard(q)
                q.put_nowait(None)  # after what it has queued: its stream ends RESOURCE_EXHAUSTED
            else:
                q.put_nowait(ev)
        return ev

    def subscribe(self) -> asyncio.Queue:
        """A queue of live events for one watcher: at most WATCH_BACKLOG of them, in order and without a
        gap, then None once the watcher has fallen behind (it resumes after the last one it took)."""
        q: asyncio.Queue = asyncio.Queue()  # bounded by emit: WATCH_BACKLOG events + the None
        self.watchers.add(q)
        return q

    def unsubscribe(self, q: asyncio.Queue) -> None:
        self.watchers.discard(q)
