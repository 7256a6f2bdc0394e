"""The step clock: form the pipeline, drive every step, audit it, recover from faults.

A step has two phases. ``RunStep``: every stage runs forward and backward for all
micro-batches, exchanging signed tensors with its neighbours, and returns a signed StepReport
committing to the state it started from. Only then are the step's audits drawn (commit, then
challenge). ``ApplyUpdate``: the coordinator sums the stages' squared gradient norms into the
global norm and orders every stage to clip and step; each returns a signed commitment to its
new state. Before step t applies its update, every audit of step t - retention has finished,
so a conviction can always roll back to a state the nodes still hold.

Forming the pipeline (at start, after a ban, after a lost node) follows the plan
``coordinator/planning.py`` makes; a rollback goes to the newest verified checkpoint
(``coordinator/checkpoints.py``), and a standby taking over a stage checks the state it fetches
against the committed digest. A step that fails ``pipeline.max_step_attempts`` times in a row
re-forms the pipeline after ``coordinator/attribution.py`` has routed around (or, on two
accusers' word, demoted) the node whose messages its neighbours refused, or, when nobody's were,
one node in turn.

What the clock shares with the rest of the coordinator is narrow: it owns the active
``Pipeline`` (coordinator/pipeline.py), which convictions (coordinator/convictions.py, used by
the judge and by operators), distrust and the liveness monitor only mark for re-formation or
rollback; and it hands each committed step to the audit scheduler (``AuditScheduler``), waiting
for audits whose evidence is about to expire.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time

from pipeguard import claims
from pipeguard.computation import StageComputation, StageSetup
from pipeguard.errors import DataLoss, FailedPrecondition, PipeguardError
from pipeguard.identity import Identity
from pipeguard.model import lr_at
from pipeguard.rpc import backoff
from pipeguard.signing import sign
from pipeguard.tensors import state_chunks, state_digest
from pipeguard.v1 import pipeguard_pb2 as pb
from coordinator import planning
from coordinator.attribution import RefusalAttribution
from coordinator.audits import AuditScheduler, StepRecord
from coordinator.channels import NodeChannels
from coordinator.checkpoints import Checkpointer, CheckpointStore, StateOffAttestation, fetch_stage_state
from coordinator.config import CoordinatorConfig
from coordinator.convictions import Convictions
from coordinator.pipeline import Pipeline
from coordinator.registry import NodeRecord, Registry
from coordinator.state import EventLog, RunState, RunStore, StateError

log = logging.getLogger(__name__)

WITHHELD_LIMIT = 2
"""Audits of one epoch whose state a live holder would not serve the judge before it is routed
around and the run rolls back (``StepClock._state_withheld``)."""


class StepFailed(PipeguardError):
    """A step could not complete; it was aborted and may be retried."""


class Reform(PipeguardError):
    """The pipeline must be formed again before the next step (a ban or a lost stage)."""


class StepClock:
    def __init__(self, cfg: CoordinatorConfig, identity: Identity, registry: Registry, state: RunState,
                 store: RunStore, events: EventLog, data_digest: bytes, *, channels: NodeChannels | None = None,
                 convictions: Convictions | None = None, audits: AuditScheduler | None = None):
        """``convictions`` (and its pipeline), ``channels`` and ``audits`` are shared with the judge and
        the scheduler (coordinator/daemon.py builds them); without them the clock makes its own and
        draws no audits."""
        self.cfg = cfg
        self.identity = identity
        self.registry = registry
        self.state = state
        self.store = store
        self.events = events
        self.data_digest = data_digest
        self.channels = channels or NodeChannels(identity, cfg.net, cfg.timeouts)
        self.convictions = convictions or Convictions(registry, state, store, events, Pipeline(state.skipped))
        self.pipeline = self.convictions.pipeline
        self.audits = audits
        if audits is not None:
            audits.progress = lambda: self.state.step
        self.checkpoints = CheckpointStore(store.dir / "checkpoints", keep=cfg.audit.keep_checkpoints)
        self.checkpointer = Checkpointer(self.checkpoints, self.channels, cfg, state, self.pipeline, events)
        self.attribution = RefusalAttribution(registry, state, store, events, self.pipeline,
                                              attempts=cfg.pipeline.max_step_attempts,
                                              heartbeat_interval=cfg.timeouts.heartbeat_interval)
        self.checkpointer.on_off_attestation = self._state_off_attestation
        if audits is not None and audits.judge is not None:
            audits.judge.on_withheld = self._state_withheld
        self.withheld: dict[str, tuple[int, int]] = {}
        """node id -> (audits of the current epoch the judge could not settle because the node
        served it no state, the earliest audited step among them)."""
        self.membership_changed = asyncio.Event()
        self.step_lock = asyncio.Lock()
        """Held while a step runs; exports take it so they see one consistent step."""
        self.task: asyncio.Task | None = None
        """The task running ``run``, for ``stop``."""
        self.stopping = False
        self.started = time.monotonic()
        self.first_back: float | None = None
        """When the first node heartbeated again after this (re)start."""
        self.assign_orders: dict[str, pb.AssignRequest] = {}
        """node id -> the signed Assign order of its stage in the current epoch."""
        self.update_reports: dict[str, tuple[int, pb.UpdateReport]] = {}
        """node id -> (epoch, its latest signed update report): what its next step report must match."""
        self._seeded: dict[tuple[int, int], bytes] = {}
        """(stage, stages) -> digest of the stage at the run seed's initial weights."""

    def persist(self) -> None:
        self.store.save_run(self.state, self.registry)

    # -- faults reported from elsewhere ----------------------------------------------------------

    def node_back(self, rec: NodeRecord) -> None:
        """A node marked offline heartbeats again (after a partition, or after our own restart)."""
        if self.first_back is None:
            self.first_back = time.monotonic()
        self.membership_changed.set()

    def node_lost(self, rec: NodeRecord) -> None:
        """The monitor saw a node go silent: its stage is given up, and the audits it holds."""
        self.pipeline.node_lost(rec)
        if self.audits is not None:
            self.audits.auditor_lost(rec.node_id)
        self.membership_changed.set()

    async def _state_off_attestation(self, rec: NodeRecord, slot: int, step: int, attestation: pb.StateAttestation,
                                     named: dict) -> None:
        """A checkpoint (or export) fetch got ``rec``'s state of ``slot`` off its own signed
        attestation: the judge counts it (and convicts at its limit, with the bundle), and the
        holder is taken out of the pipeline at once (demoted: its own signature proves the fault), so it cannot stop the run by failing every checkpoint."""
        judge = self.audits.judge if self.audits is not None else None
        if judge is not None:
            await judge.served_off_attestation(rec.node_id, rec.public_key, step, attestation, named,
                                               f"checkpoint fetch of stage {slot}")
        if not self.convictions.banned(rec.node_id):
            self.attribution.distrust(rec.node_id, step, f"served the coordinator's fetch of stage {slot} at step "
                                      f"{step} a state off its own signed attestation")

    async def _state_withheld(self, req: pb.AuditRequest, why: str) -> None:
        """The judge could not get the state ``req`` audits from its holder, twice. A refusal proves
        nothing (no ban, no demotion), but it must not be cheaper than being audited: at
        ``WITHHELD_LIMIT`` such audits in one epoch the holder is routed around (set aside) and the
        run rolls back to before the earliest step it kept unchecked. Only a live holder of the
        current epoch counts: a crashed one is the liveness monitor's, and after a re-formation an
        honest node may no longer hold what an old audit asks for."""
        node_id = req.target.node_id
        rec = self.registry.nodes.get(node_id)
        if (req.epoch != self.state.epoch or rec is None or rec not in self.pipeline
                or not self.registry.is_alive(rec) or self.convictions.banned(node_id)):
            return
        count, first = self.withheld.get(node_id, (0, req.step))
        if count >= WITHHELD_LIMIT:
            return  # routed around already in this epoch
        count, first = count + 1, min(first, req.step)
        self.withheld[node_id] = (count, first)
        self.events.emit("state_withheld", f"{node_id[:8]} served the judge no state for audit {req.audit_id} of "
                         f"step {req.step} ({count} of {WITHHELD_LIMIT}): {why}", node_id=node_id, step=req.step)
        if count < WITHHELD_LIMIT:
            return
        self.pipeline.suspect(first)  # what it kept from being checked is undone
        self.attribution.set_aside(node_id, req.step, f"withheld its state from {count} audits of the judge "
                                   f"(from step {first}); the run rolls back to before step {first}", reporter="")

    # -- forming the pipeline ----------------------------------------------------------------------

    async def wait_for_change(self) -> None:
        self.membership_changed.clear()
        try:
            await asyncio.wait_for(self.membership_changed.wait(), self.cfg.timeouts.heartbeat_interval)
        except asyncio.TimeoutError:
            pass

    def plan(self) -> planning.Plan | None:
        """The pipeline to form now (``planning.plan`` of what the registry and the run hold)."""
        # Nodes come back after a restart of ours within a heartbeat timeout of each other
        # (their reconnect backoffs are alike), counted from the first one back.
        since = self.first_back if self.first_back is not None else self.started
        nodes = list(self.registry.nodes.values())
        return planning.plan(
            stages=self.cfg.pipeline.stages, nodes=nodes, alive={r.node_id for r in nodes if self.registry.is_alive(r)},
            distrusted=self.state.distrusted, skipped=self.pipeline.skipped, step=self.state.step,
            formed=bool(self.pipeline.nodes), min_nodes=self.cfg.pipeline.min_nodes,
            just_started=time.monotonic() - since <= self.cfg.timeouts.heartbeat_timeout,
            history={int(k) for k in self.state.commitments}, suspect_step=self.pipeline.suspect_step,
            set_aside=list(self.state.set_aside))

    async def form_pipeline(self) -> None:
        self.state.phase = pb.RUN_PHASE_WAITING
        self.persist()
        self.events.emit("waiting", f"forming the pipeline ({self.cfg.pipeline.stages} stages)", step=self.state.step)
        delays = backoff(self.cfg.timeouts)
        while True:
            plan = self.plan()
            if plan is None:
                await self.wait_for_change()
                continue
            try:
                await self._assign(plan)
                break
            except StateError:
                raise  # the run cannot be recorded: stop (the daemon reports it), never retry blind
            except PipeguardError as exc:
                self.events.emit("assign_failed", f"stage assignment failed: {exc}", step=self.state.step)
                await asyncio.sleep(next(delays))
        self.state.phase = pb.RUN_PHASE_TRAINING
        self.persist()
        self.events.emit("training", f"training from step {self.state.step} to {self.cfg.train.steps - 1}",
                         step=self.state.step)

    def _assign_requests(self, slots: list[int], nodes: list[NodeRecord], start: int,
                         digests: dict[int, bytes]) -> list[pb.AssignRequest]:
        """Each node's stage in the new epoch, its neighbours, and the step and state to start from."""
        requests = []
        for i, (slot, rec) in enumerate(zip(slots, nodes)):
            req = pb.AssignRequest(run_id=self.state.run_id, epoch=self.state.epoch, stage=slot,
                                   num_stages=self.cfg.pipeline.stages, model=self.cfg.model_spec(),
                                   train=self.cfg.train_spec(), node_id=rec.node_id, data_digest=self.data_digest,
                                   start_step=start, state_digest=digests.get(slot, b""),
                                   tolerance=self.cfg.audit.tolerance)
            if i > 0:
                req.prev.CopyFrom(_peer(nodes[i - 1], slots[i - 1]))
            if i < len(nodes) - 1:
                req.next.CopyFrom(_peer(nodes[i + 1], slots[i + 1]))
            requests.append(req)
        return requests

    async def _assign(self, plan: planning.Plan) -> None:
        start = self.state.step
        digests = {int(k): bytes.fromhex(v) for k, v in self.state.commitments.items()}
        if plan.rollback_to is not None:
            target = self.checkpoints.latest(at_or_before=plan.rollback_to)
            if target is None:  # none verified yet (step 0's failed): every stage starts from the seed again
                start, digests = 0, {}
            else:
                start, digests = target, self.checkpoints.digests(target)
        slots = plan.slots
        nodes = [plan.holders[s] for s in slots]
        self.state.epoch += 1
        self.withheld.clear()  # counted per epoch
        requests = self._assign_requests(slots, nodes, start, digests)
        replies = await asyncio.gather(
            *(self.channels.call(rec, "Assign", req, self.cfg.timeouts.step) for rec, req in zip(nodes, requests)))
        # A conviction that landed while Assign was in flight (the judge runs concurrently) must
        # not be overwritten by the role below: plan again without the banned node.
        convicted = [rec.node_id[:8] for rec in nodes if rec.role == pb.ROLE_BANNED]
        if convicted:
            raise FailedPrecondition(f"node(s) {', '.join(convicted)} were banned while their stages were assigned")
        for slot, rec, reply in zip(slots, nodes, replies):
            if start > 0 and reply.state_digest != digests.get(slot):
                raise DataLoss(f"stage {slot} on {rec.node_id[:8]} reports a state other than the committed one")
        if start == 0:
            await self._check_seeded(slots, nodes, requests, replies)
        for rec, req in zip(nodes, requests):
            self.assign_orders[rec.node_id] = req  # signed by the call
        # Committed: from here on the new pipeline is the run.
        for rec in self.registry.nodes.values():
            if rec not in nodes:
                if rec.role == pb.ROLE_STAGE:
                    rec.role = pb.ROLE_STANDBY
                # An offline node's stage is a hint for when it comes back: not once the stage has
                # a new holder (two claims to a stage would be resolved by registration order).
                rec.stage = -1
        for slot, rec, reply in zip(slots, nodes, replies):
            if rec.role != pb.ROLE_STAGE or rec.stage != slot:
                self.events.emit("stage_assigned", f"stage {slot} -> node {rec.node_id[:8]} at {rec.address} "
                                 f"({reply.num_params} params)", node_id=rec.node_id, step=start)
            rec.role, rec.stage = pb.ROLE_STAGE, slot
            self.state.commitments[str(slot)] = reply.state_digest.hex()
        for slot in sorted(plan.newly_skipped):
            self.events.emit("stage_skipped", f"no standby for stage {slot}: its blocks are bypassed "
                             "(skip-layer mode)", step=start)
        if start != self.state.step:
            if self.audits is not None:
                self.audits.cancel_from(start)
            self.events.emit("rolled_back", f"rolled back from step {self.state.step} to checkpoint {start}",
                             step=start)
            self.state.losses = [x for x in self.state.losses if x[0] < start]
            self.state.step = start
        self.pipeline.formed(nodes, slots, plan.skipped)  # of nodes alive now: nothing pending any more
        self.state.skipped = sorted(plan.skipped)
        self.persist()
        if start not in self.checkpoints.steps():
            await self.checkpointer.take(start)

    async def _seeded_digest(self, slot: int) -> bytes:
        key = (slot, self.cfg.pipeline.stages)
        if key not in self._seeded:
            setup = StageSetup.from_specs(self.cfg.model_spec(), self.cfg.train_spec(), slot, self.cfg.pipeline.stages)
            self._seeded[key] = await asyncio.get_running_loop().run_in_executor(
                None, StageComputation.seeded_digest, setup)
        return self._seeded[key]

    async def _check_seeded(self, slots: list[int], nodes: list[NodeRecord], requests: list[pb.AssignRequest],
                            replies: list[pb.AssignReply]) -> None:
        """At step 0 every stage starts from the run seed: a holder whose (unsigned) Assign reply
        names another state is asked for its signed word on it (the attestation of the state it
        serves for step 0). A signed claim of other weights convicts it (``Judge.initial_state``);
        a holder that will not sign what it replied is taken out of the pipeline (not banned: an
        unsigned reply proves nothing to a third party). Either way the assignment is planned again."""
        judge = self.audits.judge if self.audits is not None else None
        for slot, rec, req, reply in zip(slots, nodes, requests, replies):
            seeded = await self._seeded_digest(slot)
            if reply.state_digest == seeded:
                continue
            attestation = None
            try:
                async for chunk in fetch_stage_state(self.channels, self.state.run_id, rec, slot, 0, False,
                                                     self.cfg.timeouts.step):
                    if chunk.HasField("attestation"):
                        attestation = chunk.attestation
            except PipeguardError as exc:
                log.warning("stage %d on %s: no attestation of its state at step 0: %s", slot, rec.node_id[:8], exc)
            if attestation is not None and judge is not None and await judge.initial_state(req, attestation,
                                                                                           rec.public_key):
                raise FailedPrecondition(f"node {rec.node_id[:8]} started stage {slot} from other weights than the "
                                         "seeded initialisation and was convicted")
            self.attribution.distrust(rec.node_id, 0, f"its stage {slot} at step 0 is not the seeded initialisation "
                                      "and it signed nothing to say which state it holds")
            raise DataLoss(f"stage {slot} on {rec.node_id[:8]} reports a state other than the seeded initialisation")

    async def _state_contradicted(self, step: int, slot: int, rec: NodeRecord, rep: pb.StepReport) -> bool:
        """A step report whose digest is not the stage's commitment: when the holder's own signed
        claims prove it (a step-0 state other than the seed, a state other than its last update
        report's) it is convicted; whether it was."""
        judge = self.audits.judge if self.audits is not None else None
        if judge is None:
            return False
        if step == 0 and rec.node_id in self.assign_orders:
            return await judge.initial_state(self.assign_orders[rec.node_id], rep, rec.public_key)
        epoch, update = self.update_reports.get(rec.node_id, (-1, None))
        if update is not None and epoch == self.state.epoch:
            return await judge.contradiction(update, rep, rec.public_key)
        return False

    # -- steps ---------------------------------------------------------------------------------

    async def run(self) -> None:
        """Train until the configured step count; never give up on the run."""
        self.task = asyncio.current_task()
        total = self.cfg.train.steps
        need_formation = True
        while True:
            await self._train_until(total, need_formation)
            if self.stopping:  # an operator's StopRun takes it from here
                return
            if self.audits is not None:
                await self.audits.drain(total, timed=False)
            if not self.pipeline.reform_needed:  # a late conviction rolls back and trains on
                break
            need_formation = True
        self.state.phase = pb.RUN_PHASE_FINISHED
        self.persist()
        last = self.state.losses[-1][1] if self.state.losses else None
        self.events.emit("finished", f"run finished after {total} steps, final loss "
                         f"{'n/a' if last is None else f'{last:.4f}'}", step=total, loss=last)

    async def _train_until(self, total: int, need_formation: bool) -> None:
        failures = 0
        step_of_attempt, attempt = -1, 0  # the step at hand: signed into every order, tensor and report of the attempt
        delays = backoff(self.cfg.timeouts)  # between attempts of one step; starts over with the next
        attempts = self.cfg.pipeline.max_step_attempts
        refused_before = self.attribution.snapshot()
        if need_formation or self.pipeline.reform_needed:
            await self.form_pipeline()  # waits (never spins) until a pipeline can be formed
            need_formation = False
        while self.state.step < total and not self.stopping:
            if need_formation or self.pipeline.reform_needed:
                await self.form_pipeline()
                need_formation = False
            if step_of_attempt != self.state.step:  # a new step (or a rollback): its first attempt
                step_of_attempt, attempt = self.state.step, 0
            step = self.state.step
            if failures == 0:  # the first attempt of this step: what neighbours had refused so far
                refused_before = self.attribution.snapshot()
            try:
                async with self.step_lock:
                    if self.stopping:
                        return
                    await self._unless_stage_lost(self.run_step(step, attempt))
                failures, delays = 0, backoff(self.cfg.timeouts)
            except Reform:
                await self.abort_step(step, attempt)
                attempt += 1
                need_formation = True
            except StateError:
                raise  # a step that cannot be recorded must not be followed by more
            except PipeguardError as exc:
                failures += 1
                self.events.emit("step_failed", f"step {step} attempt {failures} failed: {exc}", step=step)
                await self.abort_step(step, attempt)
                attempt += 1
                if failures >= attempts or self.pipeline.reform_needed:
                    if failures >= attempts:
                        await self.attribution.after_failures(step, refused_before)
                    failures, delays = 0, backoff(self.cfg.timeouts)
                    need_formation = True
                else:
                    await asyncio.sleep(next(delays))

    async def _unless_stage_lost(self, work) -> None:
        """Run ``work`` (a step), but give it up as soon as a node of the pipeline goes silent.

        A node that stops answering without closing its connections (stopped, frozen, cut off
        by the network) would otherwise hold the step until the step timeout; the heartbeat
        timeout is what decides that a node is gone.
        """
        task = asyncio.ensure_future(work)
        lost = asyncio.ensure_future(self.pipeline.stage_lost.wait())
        try:
            await asyncio.wait({task, lost}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            task.cancel()
            await asyncio.wait([task])
            raise
        finally:
            lost.cancel()
        if not task.done():
            task.cancel()
            await asyncio.wait([task])
            raise Reform("a node of the pipeline went offline during the step")
        task.result()

    def assignment_digest(self, slot: int) -> bytes:
        """``claims.assignment_digest`` of what the holder of ``slot`` was assigned (``_assign_requests``)."""
        return claims.assignment_digest(pb.AssignRequest(
            run_id=self.state.run_id, stage=slot, num_stages=self.cfg.pipeline.stages, model=self.cfg.model_spec(),
            train=self.cfg.train_spec(), data_digest=self.data_digest, tolerance=self.cfg.audit.tolerance))

    def _check_report(self, kind: str, step: int, slot: int, rec: NodeRecord, rep, attempt: int = 0) -> None:
        """A stage's ``kind`` report ("step" or "update") is signed by its holder and answers this
        step, stage, node, epoch and attempt, under the assignment it was given."""
        claims.stage_report(rep, rec.identity, kind=kind, run_id=self.state.run_id, step=step, stage=slot,
                            node_id=rec.node_id, epoch=self.state.epoch, attempt=attempt,
                            assignment=self.assignment_digest(slot))

    async def run_step(self, step: int, attempt: int = 0) -> None:
        t0 = time.perf_counter()
        nodes, slots = self.pipeline.nodes, self.pipeline.slots
        orders = [pb.RunStepRequest(run_id=self.state.run_id, epoch=self.state.epoch, step=step, node_id=r.node_id,
                                    attempt=attempt)
                  for r in nodes]
        reports = await self._gather(nodes, "RunStep", orders, self.cfg.timeouts.step)
        for slot, rec, rep in zip(slots, nodes, reports):
            self._check_report("step", step, slot, rec, rep, attempt)
            if rep.state_digest.hex() != self.state.commitments.get(str(slot)):
                if await self._state_contradicted(step, slot, rec, rep):
                    raise Reform(f"stage {slot}'s holder was convicted on its own contradicting claims")
                self.events.emit("commitment_mismatch",
                                 f"stage {slot} started step {step} from a state it did not commit to",
                                 node_id=rec.node_id, step=step)
            if not math.isfinite(rep.grad_sq_norm) or not math.isfinite(rep.loss):
                raise StepFailed(f"stage {slot} reported a non-finite loss or gradient norm")
        record = StepRecord(step=step, epoch=self.state.epoch, nodes=list(nodes), slots=list(slots),
                            reports=list(reports), attempt=attempt)
        # Every tensor of the step is committed: now draw the forward/backward audits.
        if self.audits is not None:
            self.audits.launch(self.audits.select(record))
            # Nodes keep `retention` steps; applying this update drops step - retention.
            await self.audits.drain(step - self.cfg.audit.retention)
        if self.pipeline.reform_needed:
            raise Reform("a node was convicted or lost")
        global_norm = math.sqrt(sum(r.grad_sq_norm for r in reports))
        lr = lr_at(step, self.cfg.train.optim())
        updates = [sign(pb.ApplyUpdateRequest(run_id=self.state.run_id, epoch=self.state.epoch, step=step,
                                              node_id=r.node_id, global_grad_norm=global_norm, lr=lr,
                                              attempt=attempt), self.identity)
                   for r in nodes]
        done = await self._gather(nodes, "ApplyUpdate", updates, self.cfg.timeouts.step)
        for slot, rec, up in zip(slots, nodes, done):
            self._check_report("update", step, slot, rec, up, attempt)
        for slot, rec, up in zip(slots, nodes, done):
            self.state.commitments[str(slot)] = up.state_digest.hex()
            self.update_reports[rec.node_id] = (self.state.epoch, up)
        record.update_orders, record.update_reports = updates, list(done)
        if self.audits is not None:
            self.audits.launch(self.audits.select_updates(record))
        elapsed = time.perf_counter() - t0
        t = self.cfg.train
        tokens = t.micro_batches * t.micro_batch_size * self.cfg.model.gpt().block_size
        loss = reports[-1].loss
        self.state.losses.append((step, loss, tokens / elapsed))
        self.state.step = step + 1
        self.persist()
        self.events.emit("step", f"step {step} loss {loss:.4f} |g| {global_norm:.3f} lr {lr:.2e} "
                         f"{tokens / elapsed:,.0f} tok/s", step=step, loss=loss, tokens_per_s=tokens / elapsed,
                         grad_norm=global_norm, lr=lr)
        if self.state.step % self.cfg.audit.checkpoint_every == 0 and self.state.step < t.steps:
            try:
                await self.checkpointer.take(self.state.step)
            except StateOffAttestation as exc:  # its holder is demoted: the next step forms again
                self.events.emit("checkpoint_failed", f"no checkpoint at step {self.state.step}: {exc}",
                                 step=self.state.step)

    async def stop(self, who: str) -> int | None:
        """Stop the run for an operator: let the step in flight finish, stop stepping, checkpoint,
        mark the run stopped. Returns the checkpointed step (None if none could be made)."""
        self.stopping = True
        async with self.step_lock:  # the step in flight (and its periodic checkpoint) finishes first
            if self.task is not None and not self.task.done():
                self.task.cancel()  # waiting for the lock, forming the pipeline, or draining audits
                await asyncio.wait([self.task])
            saved = await self.checkpointer.take_now(self.cfg.timeouts.step)
            self.state.phase = pb.RUN_PHASE_STOPPED
            self.persist()
        self.events.emit("stopped", f"run stopped at step {self.state.step} (by {who}); "
                         f"resume with `pipeguard-coordinator --resume`", step=self.state.step)
        return saved

    async def _gather(self, nodes: list[NodeRecord], method: str, requests: list, timeout: float) -> list:
        tasks = [asyncio.create_task(self.channels.call(rec, method, req, timeout))
                 for rec, req in zip(nodes, requests)]
        try:
            return await asyncio.gather(*tasks)
        except PipeguardError as exc:
            for t in tasks:
                t.cancel()
            raise StepFailed(f"{method}: {exc}") from None

    async def abort_step(self, step: int, attempt: int = 0) -> None:
        alive = [r for r in self.pipeline.nodes if self.registry.is_alive(r)]  # the silent are replaced anyway
        orders = [pb.AbortStepRequest(run_id=self.state.run_id, epoch=self.state.epoch, step=step, node_id=r.node_id,
                                      attempt=attempt)
                  for r in alive]
        results = await asyncio.gather(
            *(self.channels.call(r, "AbortStep", o, self.cfg.timeouts.request) for r, o in zip(alive, orders)),
            return_exceptions=True)
        for rec, res in zip(alive, results):
            if isinstance(res, Exception):
                log.warning("abort of step %d on %s failed: %s", step, rec.node_id[:8], res)

    async def export_state(self, include_optimizer: bool):
        """Yield every stage's state chunks, stage by stage.

        The states are fetched between steps (under the step lock, so all stages agree) and each
        is checked against the digest its holder committed to and signed (the checkpoint rule,
        ``claims.committed_state``, and a re-hash), so an exported model rests on the holders'
        signed commitments. They are streamed after the lock is released: a client that reads
        slowly or never holds up no step. ``ExportState`` is unauthenticated, so the service runs
        one export at a time."""
        if not self.pipeline.nodes:
            raise FailedPrecondition("no stages are assigned yet")
        async with self.step_lock:
            step = self.state.step
            states = [(slot, await self.checkpointer.verified_state(rec, slot, step))
                      for slot, rec in zip(self.pipeline.slots, list(self.pipeline.nodes))]
        loop = asyncio.get_running_loop()
        for slot, (named, committed) in states:
            digest = await loop.run_in_executor(None, state_digest, iter(named.items()))
            if digest != committed:
                raise DataLoss(f"stage {slot}'s served state does not hash to the digest it committed to")
            items = [(name.removeprefix("param/"), t) for name, t in named.items()
                     if include_optimizer or name.startswith("param/")]
            for chunk in state_chunks(items, slot, step, self.cfg.net.chunk_bytes):
                yield chunk

    async def close(self) -> None:
        if self.audits is not None:
            await self.audits.close()
        await self.channels.close()


def _peer(rec: NodeRecord, slot: int) -> pb.PeerInfo:
    return pb.PeerInfo(node_id=rec.node_id, address=rec.address, public_key=rec.public_key, stage=slot)
