"""Audit scheduling: commit, then challenge; every verdict goes to the judge.

After every stage has returned its signed StepReport for a step (so every tensor of the step
is committed), ``select`` draws audit targets from the operating system's CSPRNG: each
stage's output for each micro-batch, forward and backward, with probability ``audit.rate``,
each stage's optimizer update with the same probability, plus every message a receiver's
screen flagged. A stage-step whose update audit is drawn replays once: its forward/backward
audits are folded into the update audit, which compares them all. Each audit goes to a node
other than the audited one, preferring standbys, then stages that are not its neighbours; within
a tier one at random of those with fewer than ``SPILL_AT`` audits waiting (busy standbys spill
to non-neighbour stages; with both busy, the least loaded of the first; neighbours only when
there is nobody else). With nobody available, or when the auditor fails to answer (crashed,
silent, refused), the coordinator audits itself; an auditor the liveness monitor finds silent has
the audits it holds abandoned at once (``auditor_lost``), not waited out to their deadlines, and an
Audit call's deadline is sized to what it moves and recomputes (``CoordinatorConfig.audit_timeout``).
The auditor drawn for a stage follows it for a run of audits of random length (mean
``audit.follow``) while it keeps up, so it starts each audit from the state its last one verified
(``audit.Replicas``) instead of fetching it again. What a verdict leads to (re-checks,
convictions) is the judge's (``coordinator/judge.py``).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Callable

from pipeguard import audit, claims
from pipeguard.data import Dataset
from pipeguard.errors import PipeguardError
from pipeguard.identity import Identity
from pipeguard.signing import sign
from pipeguard.v1 import pipeguard_pb2 as pb
from coordinator.channels import NodeChannels
from coordinator.config import CoordinatorConfig
from coordinator.judge import AuditStats, Judge
from coordinator.registry import NodeRecord, Registry
from coordinator.state import EventLog

log = logging.getLogger(__name__)

SPILL_AT = 2
"""Audits waiting at every auditor of a tier before the next tier's (less loaded) nodes share
them: standbys first, while they keep up; then stages that are not the target's neighbours."""


FOLLOWER_EXTRA = 1
"""Audits a stage's follower may have waiting beyond ``SPILL_AT`` and still be ordered the stage's
next one (its run continues; the run's length, not its speed, decides how long it keeps the stage)."""


@dataclass
class StepRecord:
    """What the coordinator knows of one step, for building audit orders."""

    step: int
    epoch: int
    nodes: list[NodeRecord]
    slots: list[int]
    reports: list[pb.StepReport]
    update_orders: list[pb.ApplyUpdateRequest] = field(default_factory=list)
    update_reports: list[pb.UpdateReport] = field(default_factory=list)
    attempt: int = 0
    """The attempt of the step that succeeded (every audited tensor and report carries it)."""
    update_drawn: set[int] = field(default_factory=set)
    """Pipeline positions whose update audit ``select`` drew (revealed by ``select_updates``)."""
    folded: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    """Position -> (kind, micro-batch) of the forward/backward audits drawn for it that its update
    audit answers (orders are built only if they must run on their own)."""


class AuditScheduler:
    def __init__(self, *, cfg: CoordinatorConfig, run_id: str, data_digest: bytes, identity: Identity,
                 registry: Registry, events: EventLog, dataset: Dataset, judge: Judge, channels: NodeChannels):
        self.cfg = cfg
        self.identity = identity
        self.registry = registry
        self.events = events
        self.dataset = dataset
        self.judge = judge
        self.channels = channels
        self.stats = judge.stats if judge is not None else AuditStats()
        self.flagged_ids: set[int] = set()
        """Audits drawn because a receiver's screen flagged the message: a PASS is always re-checked."""
        self.rng = secrets.SystemRandom()
        self.next_id = 1
        self.session = secrets.token_bytes(16)
        """Drawn once per coordinator start and put in every order: ids restart at 1, orders never repeat."""
        self.pending: dict[int, tuple[int, asyncio.Task]] = {}
        self.run_id = run_id
        self.model_spec = cfg.model_spec()
        self.train_spec = cfg.train_spec()
        self.num_stages = cfg.pipeline.stages
        self.data_digest = data_digest
        self.folded_into: dict[int, tuple[StepRecord, int]] = {}
        """Update audit id -> (its step, position) whose folded forward/backward audits are dispatched on their own
        if it cannot be settled (its target refused the state after the update, say): refusing
        one fetch must not leave the stage-step's messages unchecked."""
        self.in_flight: dict[str, int] = {}
        """auditor -> audits ordered from it and not answered yet (it recomputes them one at a time)."""
        self.following: dict[int, tuple[str, int]] = {}
        """stage -> (the auditor following it, audits of the stage still ordered from it while it
        keeps up): the run's length is drawn from the CSPRNG when the auditor is, so no auditor can
        tell how long it keeps a stage or lengthen its turn (a busy one loses it)."""
        self.watching: dict[str, set[asyncio.Future]] = {}
        """auditor -> one future per audit ordered from it and not answered yet, set when the
        liveness monitor finds the auditor silent (``auditor_lost``)."""
        self.progress: Callable[[], int] = lambda: 0
        """Steps the run has completed (the clock sets it): how far an audit has fallen behind."""

    @property
    def rate(self) -> float:
        """The audit rate in force (an operator may change ``audit.rate`` while the run goes)."""
        return self.cfg.audit.rate

    # -- choosing -----------------------------------------------------------------------------

    def select(self, rec: StepRecord) -> list[pb.AuditRequest]:
        """Draw this step's audits and return its forward/backward ones. Call only once every
        report of the step is in.

        Each stage's update audit is drawn here too (kept in ``rec`` until the stage has committed
        to its update, then ordered by ``select_updates``). An update audit replays the whole
        stage-step and compares every activation and gradient the stage sent, so it answers every
        forward and backward audit drawn for the same stage and step: those are folded into it
        rather than replayed again (``AuditStats.folded``). The odds of any message being checked
        are unchanged; each stage-step is replayed at most once, plus screen-flagged messages,
        which are always audited on their own. The forward and backward audits drawn for one
        stage-step go out as one order (``AuditRequest.also``): one state fetch, one replay of the
        micro-batches they name, one verdict; each message's odds of being checked are unchanged."""
        out = []
        rec.update_drawn = {pos for pos in range(len(rec.nodes)) if self.rng.random() < self.rate}
        flagged: set[tuple[int, int, int]] = set()  # (sender position, direction, micro-batch)
        for pos, report in enumerate(rec.reports):
            for f in report.flags if self.cfg.audit.screen else []:
                sender = pos - 1 if f.direction == pb.DIRECTION_FORWARD else pos + 1
                if 0 <= sender < len(rec.nodes):
                    flagged.add((sender, f.direction, f.micro_batch))
        last = len(rec.nodes) - 1
        M = self.train_spec.micro_batches
        merged: dict[int, list[tuple[int, int]]] = {}  # position -> (kind, micro-batch) drawn, in one order
        for pos in range(len(rec.nodes)):
            for mb in range(M):
                for ok, direction, kind in ((pos < last, pb.DIRECTION_FORWARD, pb.AUDIT_KIND_FORWARD),
                                            (pos > 0, pb.DIRECTION_BACKWARD, pb.AUDIT_KIND_BACKWARD)):
                    if not ok:
                        continue
                    is_flagged = (pos, direction, mb) in flagged
                    drawn = self.rng.random() < self.rate
                    if is_flagged:
                        out.append(self._request(rec, pos, kind, mb))
                        self.flagged_ids.add(out[-1].audit_id)
                    elif drawn and pos in rec.update_drawn:
                        self.stats.folded += 1
                        rec.folded.setdefault(pos, []).append((kind, mb))
                    elif drawn:
                        merged.setdefault(pos, []).append((kind, mb))
        for pos, items in merged.items():
            out.append(self._request(rec, pos, *items[0], also=items[1:]))
        return out

    def select_updates(self, rec: StepRecord) -> list[pb.AuditRequest]:
        """The update audits ``select`` drew for this step, once every stage has committed to its new state."""
        out = []
        for pos in sorted(rec.update_drawn):
            out.append(self._request(rec, pos, pb.AUDIT_KIND_UPDATE, 0))
            if rec.folded.get(pos):
                self.folded_into[out[-1].audit_id] = (rec, pos)
        return out

    def _request(self, rec: StepRecord, pos: int, kind: int, mb: int,
                 also: list[tuple[int, int]] | tuple = ()) -> pb.AuditRequest:
        """The order to audit position ``pos``'s message (``kind``, ``mb``) of ``rec``'s step, and
        with it each of ``also`` (kind, micro-batch) of the same stage-step: one replay for all."""
        node = rec.nodes[pos]
        req = pb.AuditRequest(run_id=self.run_id, audit_id=self.next_id, kind=kind, step=rec.step,
                              stage=rec.slots[pos], micro_batch=mb, num_stages=self.num_stages,
                              model=self.model_spec, train=self.train_spec, data_digest=self.data_digest,
                              report=rec.reports[pos], tolerance=self.cfg.audit.tolerance, epoch=rec.epoch,
                              attempt=rec.attempt, session=self.session)
        req.also.extend(pb.AuditItem(kind=k, micro_batch=m) for k, m in also)
        self.stats.merged += len(also)
        self.next_id += 1
        req.target.CopyFrom(_peer(node, rec.slots[pos]))
        target = self.registry.nodes.get(node.node_id) if self.registry is not None else None
        req.target_device = target.build.device if target is not None else ""
        req.cross_device_tolerance = self.cfg.audit.cross_device_tolerance
        if pos > 0:
            req.prev.CopyFrom(_peer(rec.nodes[pos - 1], rec.slots[pos - 1]))
        if pos < len(rec.nodes) - 1:
            req.next.CopyFrom(_peer(rec.nodes[pos + 1], rec.slots[pos + 1]))
        if kind == pb.AUDIT_KIND_UPDATE:
            req.update.CopyFrom(rec.update_orders[pos])
            req.update_report.CopyFrom(rec.update_reports[pos])
        if pos == 0 or pos == len(rec.nodes) - 1:
            req.tokens_digest = audit.tokens_digest(audit.tokens_for(req, self.dataset))
        return req

    def _choose_auditor(self, req: pb.AuditRequest) -> NodeRecord | None:
        neighbours = {req.prev.node_id, req.next.node_id}
        alive = [r for r in self.registry.nodes.values()
                 if r.node_id != req.target.node_id and self.registry.is_alive(r)]
        tiers = [
            [r for r in alive if r.role == pb.ROLE_STANDBY],
            [r for r in alive if r.role == pb.ROLE_STAGE and r.node_id not in neighbours],
            [r for r in alive if r.role == pb.ROLE_STAGE],
        ]
        target = self.registry.nodes.get(req.target.node_id)
        device = target.build.device if target is not None else ""
        if tiers[0] or tiers[1]:
            tiers = tiers[:2]  # the target's neighbours audit it only when nobody else can
        # The stage's follower keeps it, whichever tier it is in, while its run lasts and it keeps
        # up (one audit deeper than a fresh draw would allow): it holds the state this audit starts
        # from, which any other auditor, a free standby included, would fetch again.
        who, left = self.following.get(req.stage, ("", 0))
        if left > 0 and self.in_flight.get(who, 0) < SPILL_AT + FOLLOWER_EXTRA:
            for r in (r for tier in tiers for r in tier):
                if r.node_id == who:
                    self.following[req.stage] = (who, left - 1)
                    return r
        busy: list[NodeRecord] = []
        for tier in tiers:
            # within a tier, an auditor on the target's device class first: its rounding compares
            pick = [r for r in tier if r.build.device == device] or tier
            # At random among those that keep up (so an auditor cannot draw more audits of a
            # partner by answering fast); a tier that does not keep up spills to the next.
            free = [r for r in pick if self.in_flight.get(r.node_id, 0) < SPILL_AT]
            if free:
                return self._new_follower(req.stage, free)
            busy = busy or pick
        if not busy:
            return None
        load = min(self.in_flight.get(r.node_id, 0) for r in busy)
        return self.rng.choice([r for r in busy if self.in_flight.get(r.node_id, 0) == load])

    def _new_follower(self, stage: int, free: list[NodeRecord]) -> NodeRecord:
        """One of ``free`` at random, which follows ``stage`` for a run of random length (geometric,
        mean ``audit.follow``; this audit is the run's first)."""
        r = self.rng.choice(free)
        runs = 1
        while self.rng.random() >= 1 / self.cfg.audit.follow and runs < 64 * self.cfg.audit.follow:
            runs += 1
        self.following[stage] = (r.node_id, runs - 1)
        return r

    def auditor_lost(self, node_id: str) -> None:
        """The liveness monitor found ``node_id`` silent: the audits ordered from it are abandoned
        at once and the coordinator does them itself, so one dead peer never holds the step clock
        (which waits for audits whose evidence is about to expire) past the heartbeat timeout."""
        for lost in self.watching.pop(node_id, set()):
            if not lost.done():
                lost.set_result(None)

    # -- running ------------------------------------------------------------------------------

    def launch(self, requests: list[pb.AuditRequest]) -> None:
        for req in requests:
            self.stats.dispatched += 1
            task = asyncio.create_task(self._run(req))
            self.pending[req.audit_id] = (req.step, task)
            task.add_done_callback(self._done(req.audit_id, req.step))

    def _done(self, audit_id: int, step: int) -> Callable[[asyncio.Task], None]:
        def forget(task: asyncio.Task) -> None:
            self.pending.pop(audit_id, None)
            self.flagged_ids.discard(audit_id)
            self.folded_into.pop(audit_id, None)
            if not task.cancelled():  # steps completed after the audited one while this audit ran
                self.stats.max_lag = max(self.stats.max_lag, self.progress() - (step + 1))
        return forget

    async def drain(self, upto_step: int, *, timed: bool = True) -> None:
        """Wait for every audit of a step <= ``upto_step`` (their evidence is about to expire).
        ``timed``: the wait holds up training and counts in ``AuditStats.waited_s`` (the run's last
        wait, for the audits still running when the last step is done, does not)."""
        began = None
        try:
            while waiting := [t for s, t in list(self.pending.values()) if s <= upto_step and not t.done()]:
                began = began or time.perf_counter()
                # (again after each wait: an update audit it could not settle launches its folded ones)
                await asyncio.wait(waiting)  # a step given up while waiting must not cancel its audits
        finally:
            if began is not None and timed:
                self.stats.waited_s += time.perf_counter() - began

    def cancel_from(self, step: int) -> None:
        """Forget audits of steps >= ``step`` (that history was rolled back)."""
        for s, task in list(self.pending.values()):
            if s >= step:
                task.cancel()

    async def close(self) -> None:
        for _, task in list(self.pending.values()):
            task.cancel()
        if self.judge is not None:
            self.judge.close()

    async def _run(self, req: pb.AuditRequest) -> None:
        settled = False
        try:
            settled = await self.judge.decide(req, await self._ask(req), flagged=req.audit_id in self.flagged_ids)
        except asyncio.CancelledError:
            raise
        except PipeguardError as exc:
            self.stats.incomplete += 1
            self.events.emit("audit_error", f"audit {req.audit_id}: {exc}", step=req.step, persist=False)
        except Exception:  # noqa: BLE001 - an audit bug must not take the coordinator down
            log.exception("audit %d crashed", req.audit_id)
        folded = self.folded_into.pop(req.audit_id, None)
        if folded is not None and not settled:
            rec, pos = folded
            self.events.emit("audit_unfolded", f"update audit {req.audit_id} of {req.target.node_id[:8]} could not "
                             f"be completed: its {len(rec.folded[pos])} folded forward/backward audits run on their "
                             "own", node_id=req.target.node_id, step=req.step, persist=False)
            items = rec.folded[pos]
            self.launch([self._request(rec, pos, *items[0], also=items[1:])])

    async def _ask(self, req: pb.AuditRequest) -> pb.AuditVerdict | None:
        """Order the audit from a node other than its target: its checked verdict, or None when the
        coordinator is to audit it itself (nobody else available, or the auditor failed to answer)."""
        auditor = self._choose_auditor(req)
        if auditor is None:  # nobody else: the coordinator audits (its order is signed all the same)
            sign(req, self.identity)
            return None
        req.auditor = auditor.node_id
        sign(req, self.identity)
        queued = self.in_flight.get(auditor.node_id, 0)
        self.in_flight[auditor.node_id] = queued + 1
        lost = asyncio.get_running_loop().create_future()
        self.watching.setdefault(auditor.node_id, set()).add(lost)
        call = asyncio.ensure_future(self.channels.stub_for(auditor.address).Audit(
            req, timeout=self.cfg.audit_timeout(req, queued)))
        try:
            await asyncio.wait({call, lost}, return_when=asyncio.FIRST_COMPLETED)
            if not call.done():
                # The auditor went silent (crashed, frozen, its link cut): its answer is not waited
                # for (the clock may need this audit settled before the step's evidence expires).
                call.cancel()
                await asyncio.wait([call])
                self.stats.abandoned += 1
                self.events.emit("audit_error", f"audit {req.audit_id} by {auditor.node_id[:8]} abandoned: the "
                                 "auditor went offline; the coordinator audits it itself",
                                 node_id=auditor.node_id, step=req.step, persist=False)
                return None
            verdict = call.result()
        except asyncio.CancelledError:
            call.cancel()
            raise
        except PipeguardError as exc:
            # The auditor crashed, went silent or refused: the audit is not dropped (that would
            # let a crash, or a well-timed one, leave a message unchecked); the coordinator
            # recomputes it itself.
            self.events.emit("audit_error", f"audit {req.audit_id} by {auditor.node_id[:8]} failed: "
                             f"{exc}; the coordinator audits it itself",
                             node_id=auditor.node_id, step=req.step, persist=False)
            return None
        finally:
            self.in_flight[auditor.node_id] -= 1
            self.watching.get(auditor.node_id, set()).discard(lost)
            lost.cancel()
        claims.audit_verdict(verdict, req, auditor.public_key)
        self.stats.performed[auditor.node_id] = self.stats.performed.get(auditor.node_id, 0) + 1
        return verdict


def _peer(rec: NodeRecord, slot: int) -> pb.PeerInfo:
    return pb.PeerInfo(node_id=rec.node_id, address=rec.address, public_key=rec.public_key, stage=slot)
