"""The step clock: form the pipeline, drive every step, audit it, recover from faults.

A step has two phases. ``RunStep``: every stage runs forward and backward for all
micro-batches, exchanging signed tensors with its neighbours, and returns a signed StepReport
committing to the state it started from. Only then are the step's audits drawn (commit, then
challenge). ``ApplyUpdate``: the coordinator sums the stages' squared gradient norms into the
global norm and orders every stage to clip and step; each returns a signed commitment to its
new state. Before step t applies its update, every audit of step t - retention has finished,
so a conviction can always roll back to a state the nodes still hold.

Forming the pipeline (at start, after a ban, after a lost node): every live node that holds a
stage keeps it. If a stage lost its holder, or a node was convicted, the whole run rolls back
to the newest verified checkpoint at or before the first suspect step; a standby takes the
vacant stage from that checkpoint (it checks the state against the committed digest). With
no standby, a middle stage is skipped (its blocks are bypassed, Lu et al.'s skip-layer mode);
the first and last stage cannot be skipped, so the run waits for a node.

A step that fails MAX_STEP_ATTEMPTS times in a row is attributed, if it can be, from what the
receivers reported in their heartbeats: the pipeline node whose messages its pipeline
neighbours refused most during those attempts (bytes that do not match their signature, a
replayed stream) is *distrusted*: taken out of the pipeline and never given a stage again in
this run, without a ban (a refused stream proves nothing to a third party). Re-formation then
treats it as a lost node. A receiver that lies to frame a neighbour gets at most one node
distrusted that way: when its reports would cost a second one, the reporter itself is
distrusted instead (``_attribute``).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from pathlib import Path

import grpc

from pipeguard.errors import DataLoss, FailedPrecondition, PipeguardError, Unauthenticated, from_rpc_error
from pipeguard.identity import Identity
from pipeguard.model import lr_at
from pipeguard.rpc import channel
from pipeguard.signing import sign, verify
from pipeguard.tensors import StateAssembler
from pipeguard.v1 import pipeguard_pb2 as pb
from pipeguard.v1 import pipeguard_pb2_grpc as pb_grpc
from coordinator.audits import AuditScheduler, StepRecord
from coordinator.checkpoints import CheckpointStore
from coordinator.config import CoordinatorConfig
from coordinator.registry import NodeRecord, Registry
from coordinator.state import EventLog, RunState, RunStore, StateError

log = logging.getLogger(__name__)

MAX_STEP_ATTEMPTS = 3


class StepFailed(PipeguardError):
    """A step could not complete; it was aborted and may be retried."""


class Reform(PipeguardError):
    """The pipeline must be formed again before the next step (a ban or a lost stage)."""


class StepClock:
    def __init__(self, cfg: CoordinatorConfig, identity: Identity, registry: Registry, state: RunState,
                 store: RunStore, events: EventLog, data_digest: bytes):
        self.cfg = cfg
        self.identity = identity
        self.registry = registry
        self.state = state
        self.store = store
        self.events = events
        self.data_digest = data_digest
        self.gpt = cfg.model.gpt()
        self.optim = cfg.train.optim()
        self.stage_nodes: list[NodeRecord] = []
        """Active pipeline, in order."""
        self.slots: list[int] = []
        """Partition slot (stage index) of each active node; a skipped slot is missing."""
        self.skipped: set[int] = set(state.skipped)
        self.membership_changed = asyncio.Event()
        self.stage_lost = asyncio.Event()
        """Set when a node of the active pipeline goes silent: the step in flight is given up."""
        self.step_lock = asyncio.Lock()
        """Held while a step runs; exports take it so they see one consistent step."""
        self.suspect_step: int | None = None
        """Set by a conviction: roll back to a checkpoint at or before this step."""
        self.reform_needed = False
        self._channels: dict[str, tuple[grpc.aio.Channel, pb_grpc.NodeStub]] = {}
        self.checkpoints = CheckpointStore(store.dir / "checkpoints", keep=cfg.audit.keep_checkpoints)
        self.evidence: list[str] = list(state.evidence)
        self.auditor: AuditScheduler | None = None
        self.task: asyncio.Task | None = None
        """The task running ``run``, for ``stop``."""
        self.stopping = False
        self.started = time.monotonic()
        self.first_back: float | None = None
        """When the first node heartbeated again after this (re)start."""
        self.framed_by: dict[str, str] = {}
        """reporter id -> the node its refusal reports got distrusted (one each, see ``_attribute``)."""

    # -- plumbing ------------------------------------------------------------------------------

    def stub_for(self, address: str) -> pb_grpc.NodeStub:
        if address not in self._channels:
            ch = channel(address, self.cfg.net, self.cfg.timeouts)
            self._channels[address] = (ch, pb_grpc.NodeStub(ch))
        return self._channels[address][1]

    async def _call(self, rec: NodeRecord, method: str, request, timeout: float):
        try:
            return await getattr(self.stub_for(rec.address), method)(sign(request, self.identity), timeout=timeout)
        except grpc.aio.AioRpcError as err:
            raise from_rpc_error(err) from None

    def persist(self) -> None:
        self.state.nodes = [r.to_json() for r in self.registry.nodes.values()]
        self.state.skipped = sorted(self.skipped)
        self.state.evidence = list(self.evidence)
        self.store.save(self.state)

    def model_spec(self) -> pb.ModelSpec:
        g = self.gpt
        return pb.ModelSpec(block_size=g.block_size, vocab_size=g.vocab_size, n_layer=g.n_layer, n_head=g.n_head,
                            n_embd=g.n_embd, dropout=g.dropout)

    def train_spec(self) -> pb.TrainSpec:
        t = self.cfg.train
        return pb.TrainSpec(seed=t.seed, micro_batches=t.micro_batches, micro_batch_size=t.micro_batch_size, lr=t.lr,
                            warmup_steps=t.warmup_steps, total_steps=t.steps, min_lr_ratio=t.min_lr_ratio,
                            weight_decay=t.weight_decay, beta1=t.beta1, beta2=t.beta2, grad_clip=t.grad_clip,
                            max_in_flight=t.max_in_flight, retention_steps=self.cfg.audit.retention)

    # -- faults reported from elsewhere ----------------------------------------------------------

    def convict(self, node_id: str, step: int, reason: str, bundle: Path | None) -> None:
        """Ban ``node_id``: by the audit judge with evidence already on disk, or by an operator
        (``bundle`` None, the reason says who)."""
        rec = self.registry.nodes.get(node_id)
        if rec is None or rec.role == pb.ROLE_BANNED:
            return
        self.registry.ban(rec, reason)
        if bundle is not None:
            self.evidence.append(str(bundle))
        was_stage = rec in self.stage_nodes
        if was_stage:
            # Roll back to before the first step the convicted node's output may have touched.
            first = step if step >= 0 else self.state.step
            self.suspect_step = first if self.suspect_step is None else min(self.suspect_step, first)
        self.reform_needed = True
        self.persist()
        self.events.emit("banned", f"node {node_id[:8]} banned: {reason}" + (f"; evidence {bundle}" if bundle else ""),
                         node_id=node_id, step=max(step, 0))

    def node_back(self, rec: NodeRecord) -> None:
        """A node marked offline heartbeats again (after a partition, or after our own restart)."""
        if self.first_back is None:
            self.first_back = time.monotonic()
        self.membership_changed.set()

    def node_lost(self, rec: NodeRecord) -> None:
        """The monitor saw a node go silent."""
        if rec in self.stage_nodes:
            self.reform_needed = True
            self.stage_lost.set()
        self.membership_changed.set()

    # -- forming the pipeline ----------------------------------------------------------------------

    async def wait_for_change(self) -> None:
        self.membership_changed.clear()
        try:
            await asyncio.wait_for(self.membership_changed.wait(), self.cfg.timeouts.heartbeat_interval)
        except asyncio.TimeoutError:
            pass

    def _plan(self) -> tuple[dict[int, NodeRecord], set[int]] | None:
        """Holders per slot, and slots to skip; None when the pipeline cannot be formed yet."""
        n = self.cfg.pipeline.stages
        alive = sorted((r for r in self.registry.nodes.values()
                        if r.role in (pb.ROLE_STAGE, pb.ROLE_STANDBY) and self.registry.is_alive(r)
                        and r.node_id not in self.state.distrusted),
                       key=lambda r: r.registered_at)
        if self.state.step == 0 and not self.stage_nodes and len(alive) < self.cfg.pipeline.min_nodes:
            return None  # the operator asked for standbys to be ready before the first step
        holders: dict[int, NodeRecord] = {}
        for r in alive:
            if 0 <= r.stage < n and r.stage not in holders and r.stage not in self.skipped:
                holders[r.stage] = r
        spares = [r for r in alive if r not in holders.values()]
        skipped = set(self.skipped)
        # Nodes come back after a restart of ours within a heartbeat timeout of each other
        # (their reconnect backoffs are alike), counted from the first one back.
        since = self.first_back if self.first_back is not None else self.started
        just_started = time.monotonic() - since <= self.cfg.timeouts.heartbeat_timeout
        for slot in range(n):
            if slot in holders or slot in skipped:
                continue
            if just_started and any(r.stage == slot and r.role == pb.ROLE_OFFLINE for r in self.registry.nodes.values()):
                return None  # its holder has not heartbeated yet: handing its stage away would cost a rollback
            if spares:
                holders[slot] = spares.pop(0)
            elif self.state.step > 0 and 0 < slot < n - 1 and not just_started:
                skipped.add(slot)
            else:
                return None
        return holders, skipped

    async def form_pipeline(self) -> None:
        self.state.phase = pb.RUN_PHASE_WAITING
        self.persist()
        self.events.emit("waiting", f"forming the pipeline ({self.cfg.pipeline.stages} stages)", step=self.state.step)
        while True:
            plan = self._plan()
            if plan is None:
                await self.wait_for_change()
                continue
            try:
                await self._assign(*plan)
                break
            except StateError:
                raise  # the run cannot be recorded: stop (the daemon reports it), never retry blind
            except PipeguardError as exc:
                self.events.emit("assign_failed", f"stage assignment failed: {exc}", step=self.state.step)
                await asyncio.sleep(self.cfg.timeouts.retry_backoff)
        self.state.phase = pb.RUN_PHASE_TRAINING
        self.persist()
        self.events.emit("training", f"training from step {self.state.step} to {self.cfg.train.steps - 1}",
                         step=self.state.step)

    async def _assign(self, holders: dict[int, NodeRecord], skipped: set[int]) -> None:
        n = self.cfg.pipeline.stages
        # A slot with history whose new holder did not hold it before has lost its state.
        lost = [s for s in range(n) if s not in skipped and holders[s].stage != s and str(s) in self.state.commitments]
        newly_skipped = skipped - self.skipped
        start = self.state.step
        digests = {int(k): bytes.fromhex(v) for k, v in self.state.commitments.items()}
        if lost or newly_skipped or self.suspect_step is not None:
            limit = min(self.state.step, self.suspect_step if self.suspect_step is not None else self.state.step)
            target = self.checkpoints.latest(at_or_before=limit)
            if target is None:
                raise DataLoss(f"no checkpoint at or before step {limit} to roll back to")
            start, digests = target, self.checkpoints.digests(target)
        slots = [s for s in range(n) if s not in skipped]
        nodes = [holders[s] for s in slots]
        self.state.epoch += 1
        requests = []
        for i, (slot, rec) in enumerate(zip(slots, nodes)):
            req = pb.AssignRequest(run_id=self.state.run_id, epoch=self.state.epoch, stage=slot, num_stages=n,
                                   model=self.model_spec(), train=self.train_spec(), node_id=rec.node_id,
                                   data_digest=self.data_digest, start_step=start,
                                   state_digest=digests.get(slot, b""))
            if i > 0:
                req.prev.CopyFrom(_peer(nodes[i - 1], slots[i - 1]))
            if i < len(nodes) - 1:
                req.next.CopyFrom(_peer(nodes[i + 1], slots[i + 1]))
            requests.append(req)
        replies = await asyncio.gather(
            *(self._call(rec, "Assign", req, self.cfg.timeouts.step) for rec, req in zip(nodes, requests)))
        for slot, rec, reply in zip(slots, nodes, replies):
            if start > 0 and reply.state_digest != digests.get(slot):
                raise DataLoss(f"stage {slot} on {rec.node_id[:8]} reports a state other than the committed one")
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
        for slot in sorted(newly_skipped):
            self.events.emit("stage_skipped", f"no standby for stage {slot}: its blocks are bypassed "
                             "(skip-layer mode)", step=start)
        if start != self.state.step:
            if self.auditor is not None:
                self.auditor.cancel_from(start)
            self.events.emit("rolled_back", f"rolled back from step {self.state.step} to checkpoint {start}",
                             step=start)
            self.state.losses = [x for x in self.state.losses if x[0] < start]
            self.state.step = start
        self.stage_nodes, self.slots, self.skipped = nodes, slots, skipped
        self.suspect_step = None
        self.reform_needed = False
        self.stage_lost.clear()  # the new pipeline was formed of nodes alive now
        self.persist()
        if start not in self.checkpoints.steps():
            await self.checkpoint(start)

    # -- checkpoints ----------------------------------------------------------------------------

    async def checkpoint(self, step: int) -> None:
        """Fetch every active stage's state at ``step`` and keep it if it matches its commitment."""
        states = {}
        for slot, rec in zip(self.slots, self.stage_nodes):
            req = sign(pb.FetchStateRequest(run_id=self.state.run_id, node_id=rec.node_id, include_optimizer=True,
                                            step=step, stage=slot), self.identity)
            asm = StateAssembler(self.cfg.net.max_tensor_bytes)
            attestation = None
            try:
                async for chunk in self.stub_for(rec.address).FetchState(req, timeout=self.cfg.timeouts.step):
                    if chunk.HasField("attestation"):
                        attestation = chunk.attestation
                    elif chunk.name or chunk.data:
                        asm.add(chunk)
            except grpc.aio.AioRpcError as err:
                raise from_rpc_error(err) from None
            committed = bytes.fromhex(self.state.commitments[str(slot)])
            if attestation is None or attestation.state_digest != committed:
                raise DataLoss(f"stage {slot} served a state other than the one it committed to for step {step}")
            verify(attestation, rec.identity, what="state attestation")
            states[slot] = (asm.finish(), committed)
        loop = asyncio.get_running_loop()
        # Audits of steps after step - retention may still convict someone and roll back there.
        saving = loop.run_in_executor(None, self.checkpoints.save, step, states, step - self.cfg.audit.retention)
        try:
            await asyncio.shield(saving)
        except asyncio.CancelledError:
            await asyncio.wait([saving])  # a checkpoint on disk is written whole before we go
            raise
        self.events.emit("checkpoint", f"verified checkpoint of {len(states)} stages at step {step}", step=step,
                         persist=False)

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
            if self.auditor is not None:
                await self.auditor.drain(total)
            if not self.reform_needed:  # a late conviction rolls back and trains on
                break
            need_formation = True
        self.state.phase = pb.RUN_PHASE_FINISHED
        self.persist()
        last = self.state.losses[-1][1] if self.state.losses else float("nan")
        self.events.emit("finished", f"run finished after {total} steps, final loss {last:.4f}", step=total)

    async def _train_until(self, total: int, need_formation: bool) -> None:
        failures = 0
        refused_before: dict[str, dict[str, int]] = {}
        if need_formation or self.reform_needed:
            await self.form_pipeline()  # waits (never spins) until a pipeline can be formed
            need_formation = False
        while self.state.step < total and not self.stopping:
            if need_formation or self.reform_needed:
                await self.form_pipeline()
                need_formation = False
            step = self.state.step
            if failures == 0:  # the first attempt of this step: what neighbours had refused so far
                refused_before = {k: dict(v) for k, v in self.registry.rejected_by_peers.items()}
            try:
                async with self.step_lock:
                    if self.stopping:
                        return
                    await self._unless_stage_lost(self.run_step(step))
                failures = 0
            except Reform:
                await self.abort_step(step)
                need_formation = True
            except StateError:
                raise  # a step that cannot be recorded must not be followed by more
            except PipeguardError as exc:
                failures += 1
                self.events.emit("step_failed", f"step {step} attempt {failures} failed: {exc}", step=step)
                await self.abort_step(step)
                if failures >= MAX_STEP_ATTEMPTS or self.reform_needed:
                    if failures >= MAX_STEP_ATTEMPTS:
                        await self._distrust_refused(step, refused_before)
                    failures = 0
                    need_formation = True
                else:
                    await asyncio.sleep(self.cfg.timeouts.retry_backoff * failures)

    async def _distrust_refused(self, step: int, before: dict[str, dict[str, int]]) -> None:
        """After MAX_STEP_ATTEMPTS failures of ``step``: take the node its neighbours refused out
        of the pipeline, if the receivers' reports single one out; otherwise change nothing."""
        # The refusals of the last attempt reach us with the receivers' next heartbeat: wait for
        # one from every live pipeline node (at most two heartbeat intervals).
        failed_at = time.monotonic()
        deadline = failed_at + 2 * self.cfg.timeouts.heartbeat_interval
        while time.monotonic() < deadline and any(
                self.registry.is_alive(r) and r.last_heartbeat < failed_at for r in self.stage_nodes):
            await asyncio.sleep(0.05)
        found = self._attribute(before)
        if found is None:
            return
        culprit, reporter, count = found
        if reporter in self.framed_by and self.framed_by[reporter] != culprit:
            # This reporter's refusals already cost one node its stage: now the common factor is
            # the reporter (a liar framing each new neighbour), so it is the one taken out.
            reason = (f"its refusals of node {culprit[:8]}'s messages would take out a second neighbour "
                      f"(after {self.framed_by[reporter][:8]})")
            culprit = reporter
        else:
            self.framed_by[reporter] = culprit
            reason = (f"{count} of its messages were refused by pipeline neighbour {reporter[:8]} during "
                      f"{MAX_STEP_ATTEMPTS} failed attempts of step {step}")
        self.distrust(culprit, step, reason)

    def _attribute(self, before: dict[str, dict[str, int]]) -> tuple[str, str, int] | None:
        """(sender, its main reporter, refusals) for the pipeline node whose messages its pipeline
        neighbours refused most since ``before``; None when nobody's were refused.

        Only reports by the sender's neighbours in the current pipeline count: those are the only
        nodes it sends to, and a node elsewhere cannot frame it."""
        ids = [r.node_id for r in self.stage_nodes]
        growth: dict[str, tuple[int, str, int]] = {}  # sender -> (total, top reporter, its count)
        for i, sender in enumerate(ids):
            neighbours = set(ids[max(i - 1, 0):i]) | set(ids[i + 1:i + 2])
            now = self.registry.rejected_by_peers.get(sender, {})
            was = before.get(sender, {})
            by = {rep: now[rep] - was.get(rep, 0) for rep in neighbours if now.get(rep, 0) > was.get(rep, 0)}
            if by:
                top = max(sorted(by), key=lambda rep: by[rep])
                growth[sender] = (sum(by.values()), top, by[top])
        if not growth:
            return None
        # On a tie the earlier stage is taken (sorted is stable): otherwise a liar could keep the
        # run stalled by reporting its honest neighbour exactly as often as it is refused; the
        # one-per-reporter rule (``_distrust_refused``) makes either choice converge.
        sender, (total, reporter, _) = sorted(growth.items(), key=lambda kv: -kv[1][0])[0]
        return sender, reporter, total

    def distrust(self, node_id: str, step: int, reason: str) -> None:
        """Never give ``node_id`` a stage again in this run; not a ban (it stays a member)."""
        if node_id in self.state.distrusted:
            return
        self.state.distrusted[node_id] = reason
        if any(r.node_id == node_id for r in self.stage_nodes):
            self.reform_needed = True
        self.persist()
        self.events.emit("node_demoted", f"node {node_id[:8]} taken out of the pipeline (not banned): {reason}",
                         node_id=node_id, step=step)

    async def _unless_stage_lost(self, work) -> None:
        """Run ``work`` (a step), but give it up as soon as a node of the pipeline goes silent.

        A node that stops answering without closing its connections (stopped, frozen, cut off
        by the network) would otherwise hold the step until the step timeout; the heartbeat
        timeout is what decides that a node is gone.
        """
        task = asyncio.ensure_future(work)
        lost = asyncio.ensure_future(self.stage_lost.wait())
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

    async def run_step(self, step: int) -> None:
        t0 = time.perf_counter()
        nodes, slots = self.stage_nodes, self.slots
        orders = [pb.RunStepRequest(run_id=self.state.run_id, epoch=self.state.epoch, step=step, node_id=r.node_id)
                  for r in nodes]
        reports = await self._gather(nodes, "RunStep", orders, self.cfg.timeouts.step)
        for slot, rec, rep in zip(slots, nodes, reports):
            verify(rep, rec.identity, what=f"step report from stage {slot}")
            if (rep.run_id, rep.step, rep.stage, rep.node_id) != (self.state.run_id, step, slot, rec.node_id):
                raise Unauthenticated(f"stage {slot} report is for a different step/stage/node")
            if rep.state_digest.hex() != self.state.commitments.get(str(slot)):
                self.events.emit("commitment_mismatch",
                                 f"stage {slot} started step {step} from a state it did not commit to",
                                 node_id=rec.node_id, step=step)
            if not math.isfinite(rep.grad_sq_norm) or not math.isfinite(rep.loss):
                raise StepFailed(f"stage {slot} reported a non-finite loss or gradient norm")
        record = StepRecord(step=step, epoch=self.state.epoch, nodes=list(nodes), slots=list(slots),
                            reports=list(reports))
        # Every tensor of the step is committed: now draw the forward/backward audits.
        if self.auditor is not None:
            self.auditor.launch(self.auditor.select(record))
            # Nodes keep `retention` steps; applying this update drops step - retention.
            await self.auditor.drain(step - self.cfg.audit.retention)
        if self.reform_needed:
            raise Reform("a node was convicted or lost")
        global_norm = math.sqrt(sum(r.grad_sq_norm for r in reports))
        lr = lr_at(step, self.optim)
        updates = [sign(pb.ApplyUpdateRequest(run_id=self.state.run_id, epoch=self.state.epoch, step=step,
                                              node_id=r.node_id, global_grad_norm=global_norm, lr=lr), self.identity)
                   for r in nodes]
        done = await self._gather(nodes, "ApplyUpdate", updates, self.cfg.timeouts.step)
        for slot, rec, up in zip(slots, nodes, done):
            verify(up, rec.identity, what=f"update report from stage {slot}")
            if (up.run_id, up.step, up.stage, up.node_id) != (self.state.run_id, step, slot, rec.node_id):
                raise Unauthenticated(f"stage {slot} update report is for a different step/stage/node")
        for slot, up in zip(slots, done):
            self.state.commitments[str(slot)] = up.state_digest.hex()
        record.update_orders, record.update_reports = updates, list(done)
        if self.auditor is not None:
            self.auditor.launch(self.auditor.select_updates(record))
        elapsed = time.perf_counter() - t0
        t = self.cfg.train
        tokens = t.micro_batches * t.micro_batch_size * self.gpt.block_size
        loss = reports[-1].loss
        self.state.losses.append((step, loss, tokens / elapsed))
        self.state.step = step + 1
        self.persist()
        self.events.emit("step", f"step {step} loss {loss:.4f} |g| {global_norm:.3f} lr {lr:.2e} "
                         f"{tokens / elapsed:,.0f} tok/s", step=step, persist=False)
        if self.state.step % self.cfg.audit.checkpoint_every == 0 and self.state.step < t.steps:
            await self.checkpoint(self.state.step)

    async def checkpoint_now(self, timeout: float) -> int | None:
        """Make sure a verified checkpoint of the current step exists (at a stop or a shutdown).

        Returns its step, or None when none could be made within ``timeout`` (stages gone): then
        a resumed run starts from the last checkpoint before it.
        """
        step = self.state.step
        if step in self.checkpoints.steps():
            return step
        if not self.stage_nodes or self.state.phase != pb.RUN_PHASE_TRAINING:
            return None
        try:
            await asyncio.wait_for(self.checkpoint(step), timeout)
            return step
        except (PipeguardError, asyncio.TimeoutError) as exc:
            self.events.emit("checkpoint_failed", f"no checkpoint at step {step}: {exc or 'timed out'}; a resumed run "
                             f"starts from step {self.checkpoints.latest(step)}", step=step)
            return None

    async def stop(self, who: str) -> int | None:
        """Stop the run for an operator: let the step in flight finish, stop stepping, checkpoint,
        mark the run stopped. Returns the checkpointed step (None if none could be made)."""
        self.stopping = True
        async with self.step_lock:  # the step in flight (and its periodic checkpoint) finishes first
            if self.task is not None and not self.task.done():
                self.task.cancel()  # waiting for the lock, forming the pipeline, or draining audits
                await asyncio.wait([self.task])
            saved = await self.checkpoint_now(self.cfg.timeouts.step)
            self.state.phase = pb.RUN_PHASE_STOPPED
            self.persist()
        self.events.emit("stopped", f"run stopped at step {self.state.step} (by {who}); "
                         f"resume with `pipeguard-coordinator --resume`", step=self.state.step)
        return saved

    async def _gather(self, nodes: list[NodeRecord], method: str, requests: list, timeout: float) -> list:
        tasks = [asyncio.create_task(self._call(rec, method, req, timeout)) for rec, req in zip(nodes, requests)]
        try:
            return await asyncio.gather(*tasks)
        except PipeguardError as exc:
            for t in tasks:
                t.cancel()
            raise StepFailed(f"{method}: {exc}") from None

    async def abort_step(self, step: int) -> None:
        alive = [r for r in self.stage_nodes if self.registry.is_alive(r)]  # the silent are replaced anyway
        orders = [pb.AbortStepRequest(run_id=self.state.run_id, epoch=self.state.epoch, step=step, node_id=r.node_id)
                  for r in alive]
        results = await asyncio.gather(
            *(self._call(r, "AbortStep", o, self.cfg.timeouts.request) for r, o in zip(alive, orders)),
            return_exceptions=True)
        for rec, res in zip(alive, results):
            if isinstance(res, Exception):
                log.warning("abort of step %d on %s failed: %s", step, rec.node_id[:8], res)

    async def export_state(self, include_optimizer: bool):
        """Yield every stage's state chunks, stage by stage (between steps, so all agree)."""
        if not self.stage_nodes:
            raise FailedPrecondition("no stages are assigned yet")
        async with self.step_lock:
            for slot, rec in zip(self.slots, list(self.stage_nodes)):
                req = sign(pb.FetchStateRequest(run_id=self.state.run_id, node_id=rec.node_id, step=self.state.step,
                                                include_optimizer=include_optimizer, stage=slot), self.identity)
                try:
                    async for chunk in self.stub_for(rec.address).FetchState(req, timeout=self.cfg.timeouts.step):
                        if chunk.HasField("attestation"):
                            continue
                        if chunk.name.startswith("param/"):
                            chunk.name = chunk.name.removeprefix("param/")
                        yield chunk
                except grpc.aio.AioRpcError as err:
                    raise from_rpc_error(err) from None

    async def close(self) -> None:
        if self.auditor is not None:
            await self.auditor.close()
        for ch, _ in self._channels.values():
            await ch.close()


def _peer(rec: NodeRecord, slot: int) -> pb.PeerInfo:
    return pb.PeerInfo(node_id=rec.node_id, address=rec.address, public_key=rec.public_key, stage=slot)
