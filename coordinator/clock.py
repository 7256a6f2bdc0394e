"""The step clock: assign stages, then drive every step through its two phases.

Phase 1 (RunStep): every stage runs forward and backward for all micro-batches, exchanging
tensors directly with its neighbours, and returns a signed StepReport committing to the
state it started from. Phase 2 (ApplyUpdate): the coordinator sums the stages' squared
gradient norms into the global norm and orders every stage to clip and step; each returns a
signed commitment to its new state. A step that fails in phase 1 is aborted everywhere and
run again from the same state, so no stage ever moves ahead of the others.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time

import grpc

from pipeguard.errors import FailedPrecondition, PipeguardError, Unauthenticated, from_rpc_error
from pipeguard.identity import Identity
from pipeguard.model import lr_at
from pipeguard.rpc import channel
from pipeguard.signing import sign, verify
from pipeguard.v1 import pipeguard_pb2 as pb
from pipeguard.v1 import pipeguard_pb2_grpc as pb_grpc
from coordinator.config import CoordinatorConfig
from coordinator.registry import NodeRecord, Registry
from coordinator.state import EventLog, RunState, RunStore

log = logging.getLogger(__name__)

MAX_STEP_ATTEMPTS = 3


class StepFailed(PipeguardError):
    """A step could not complete; it was aborted and may be retried."""


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
        self.membership_changed = asyncio.Event()
        self.step_lock = asyncio.Lock()
        """Held while a step runs; exports take it so they see one consistent step."""
        self._channels: dict[str, tuple[grpc.aio.Channel, pb_grpc.NodeStub]] = {}

    # -- plumbing ------------------------------------------------------------------------------

    def _stub(self, rec: NodeRecord) -> pb_grpc.NodeStub:
        """A stub per node address (a node that re-registers elsewhere gets a new channel)."""
        key = f"{rec.node_id}@{rec.address}"
        if key not in self._channels:
            ch = channel(rec.address, self.cfg.net)
            self._channels[key] = (ch, pb_grpc.NodeStub(ch))
        return self._channels[key][1]

    async def _call(self, rec: NodeRecord, method: str, request, timeout: float):
        try:
            return await getattr(self._stub(rec), method)(sign(request, self.identity), timeout=timeout)
        except grpc.aio.AioRpcError as err:
            raise from_rpc_error(err) from None

    def persist(self) -> None:
        self.state.nodes = [r.to_json() for r in self.registry.nodes.values()]
        self.store.save(self.state)

    # -- assignment ----------------------------------------------------------------------------

    async def wait_for_nodes(self) -> None:
        n = self.cfg.pipeline.stages
        while True:
            live = self.registry.live_standbys()
            if len(live) >= n:
                return
            self.membership_changed.clear()
            try:
                await asyncio.wait_for(self.membership_changed.wait(), self.cfg.timeouts.heartbeat_interval)
            except asyncio.TimeoutError:
                pass

    async def assign(self) -> None:
        """Give stages to the longest-registered live nodes; the rest stand by."""
        n = self.cfg.pipeline.stages
        live = self.registry.live_standbys()
        # A node that served stage i before (e.g. across a coordinator restart) keeps it.
        slots: list[NodeRecord | None] = [next((r for r in live if r.stage == i), None) for i in range(n)]
        rest = iter(r for r in live if r not in slots)
        chosen = [r if r is not None else next(rest) for r in slots]
        self.state.epoch += 1
        epoch = self.state.epoch
        t = self.cfg.train
        model = pb.ModelSpec(block_size=self.gpt.block_size, vocab_size=self.gpt.vocab_size, n_layer=self.gpt.n_layer,
                             n_head=self.gpt.n_head, n_embd=self.gpt.n_embd, dropout=self.gpt.dropout)
        train = pb.TrainSpec(seed=t.seed, micro_batches=t.micro_batches, micro_batch_size=t.micro_batch_size, lr=t.lr,
                             warmup_steps=t.warmup_steps, total_steps=t.steps, min_lr_ratio=t.min_lr_ratio,
                             weight_decay=t.weight_decay, beta1=t.beta1, beta2=t.beta2, grad_clip=t.grad_clip,
                             max_in_flight=t.max_in_flight)
        requests = []
        for i, rec in enumerate(chosen):
            req = pb.AssignRequest(run_id=self.state.run_id, epoch=epoch, stage=i, num_stages=n, model=model,
                                   train=train, node_id=rec.node_id, data_digest=self.data_digest,
                                   start_step=self.state.step)
            if i > 0:
                req.prev.CopyFrom(chosen[i - 1].peer_info())
            if i < n - 1:
                req.next.CopyFrom(chosen[i + 1].peer_info())
            requests.append(req)
        replies = await asyncio.gather(
            *(self._call(rec, "Assign", req, self.cfg.timeouts.step) for rec, req in zip(chosen, requests)))
        for i, (rec, reply) in enumerate(zip(chosen, replies)):
            rec.role, rec.stage = pb.ROLE_STAGE, i
            committed = self.state.commitments.get(str(i))
            if self.state.step > 0 and committed != reply.state_digest.hex():
                self.events.emit("commitment_mismatch", f"stage {i} on node {rec.node_id[:8]} holds a state it did "
                                 f"not commit to at step {self.state.step}", node_id=rec.node_id, step=self.state.step)
            self.state.commitments[str(i)] = reply.state_digest.hex()
            self.events.emit("stage_assigned", f"stage {i} -> node {rec.node_id[:8]} at {rec.address} "
                             f"({reply.num_params} params)", node_id=rec.node_id, step=self.state.step)
        self.stage_nodes = list(chosen)
        self.persist()

    # -- steps ---------------------------------------------------------------------------------

    async def run(self) -> None:
        """Train until the configured step count; never give up on the run.

        When a step fails ``MAX_STEP_ATTEMPTS`` times in a row, the pipeline is formed again
        from the live nodes (stage holders keep their stages and state) and training goes on.
        """
        total = self.cfg.train.steps
        failures = 0
        need_assignment = True
        while self.state.step < total:
            if need_assignment:
                await self._form_pipeline()
                need_assignment = False
            step = self.state.step
            try:
                async with self.step_lock:
                    await self.run_step(step)
                failures = 0
            except PipeguardError as exc:
                failures += 1
                self.events.emit("step_failed", f"step {step} attempt {failures} failed: {exc}", step=step)
                await self.abort_step(step)
                if failures >= MAX_STEP_ATTEMPTS:
                    failures = 0
                    need_assignment = True
                else:
                    await asyncio.sleep(self.cfg.timeouts.retry_backoff * failures)
        self.state.phase = pb.RUN_PHASE_FINISHED
        self.persist()
        last = self.state.losses[-1][1] if self.state.losses else float("nan")
        self.events.emit("finished", f"run finished after {total} steps, final loss {last:.4f}", step=total)

    async def _form_pipeline(self) -> None:
        self.state.phase = pb.RUN_PHASE_WAITING
        self.persist()
        self.events.emit("waiting", f"waiting for {self.cfg.pipeline.stages} live nodes to form the pipeline",
                         step=self.state.step)
        while True:
            await self.wait_for_nodes()
            try:
                await self.assign()
                break
            except PipeguardError as exc:
                self.events.emit("assign_failed", f"stage assignment failed: {exc}", step=self.state.step)
                await asyncio.sleep(self.cfg.timeouts.retry_max)
        self.state.phase = pb.RUN_PHASE_TRAINING
        self.persist()
        self.events.emit("training", f"training from step {self.state.step} to {self.cfg.train.steps - 1}",
                         step=self.state.step)

    async def run_step(self, step: int) -> None:
        t0 = time.perf_counter()
        nodes = self.stage_nodes
        orders = [pb.RunStepRequest(run_id=self.state.run_id, epoch=self.state.epoch, step=step, node_id=r.node_id)
                  for r in nodes]
        reports = await self._gather(nodes, "RunStep", orders, self.cfg.timeouts.step)
        for i, (rec, rep) in enumerate(zip(nodes, reports)):
            verify(rep, rec.identity, what=f"step report from stage {i}")
            if (rep.run_id, rep.step, rep.stage, rep.node_id) != (self.state.run_id, step, i, rec.node_id):
                raise Unauthenticated(f"stage {i} report is for a different step/stage/node")
            if rep.state_digest.hex() != self.state.commitments.get(str(i)):
                self.events.emit("commitment_mismatch",
                                 f"stage {i} started step {step} from a state it did not commit to",
                                 node_id=rec.node_id, step=step)
            if not math.isfinite(rep.grad_sq_norm) or not math.isfinite(rep.loss):
                raise StepFailed(f"stage {i} reported a non-finite loss or gradient norm")
        global_norm = math.sqrt(sum(r.grad_sq_norm for r in reports))
        lr = lr_at(step, self.optim)
        updates = [pb.ApplyUpdateRequest(run_id=self.state.run_id, epoch=self.state.epoch, step=step,
                                         node_id=r.node_id, global_grad_norm=global_norm, lr=lr) for r in nodes]
        done = await self._gather(nodes, "ApplyUpdate", updates, self.cfg.timeouts.step)
        for i, (rec, up) in enumerate(zip(nodes, done)):
            verify(up, rec.identity, what=f"update report from stage {i}")
            self.state.commitments[str(i)] = up.state_digest.hex()
        elapsed = time.perf_counter() - t0
        t = self.cfg.train
        tokens = t.micro_batches * t.micro_batch_size * self.gpt.block_size
        loss = reports[-1].loss
        self.state.losses.append((step, loss, tokens / elapsed))
        self.state.step = step + 1
        self.persist()
        self.events.emit("step", f"step {step} loss {loss:.4f} |g| {global_norm:.3f} lr {lr:.2e} "
                         f"{tokens / elapsed:,.0f} tok/s", step=step, persist=False)

    async def _gather(self, nodes: list[NodeRecord], method: str, requests: list, timeout: float) -> list:
        tasks = [asyncio.create_task(self._call(rec, method, req, timeout)) for rec, req in zip(nodes, requests)]
        try:
            return await asyncio.gather(*tasks)
        except PipeguardError as exc:
            for t in tasks:
                t.cancel()
            raise StepFailed(f"{method}: {exc}") from None

    async def abort_step(self, step: int) -> None:
        orders = [pb.AbortStepRequest(run_id=self.state.run_id, step=step, node_id=r.node_id)
                  for r in self.stage_nodes]
        results = await asyncio.gather(
            *(self._call(r, "AbortStep", o, self.cfg.timeouts.request) for r, o in zip(self.stage_nodes, orders)),
            return_exceptions=True)
        for rec, res in zip(self.stage_nodes, results):
            if isinstance(res, Exception):
                log.warning("abort of step %d on %s failed: %s", step, rec.node_id[:8], res)

    async def export_state(self, include_optimizer: bool):
        """Yield every stage's state chunks, stage by stage (between steps, so all agree)."""
        if not self.stage_nodes:
            raise FailedPrecondition("no stages are assigned yet")
        async with self.step_lock:
            for rec in list(self.stage_nodes):
                req = sign(pb.FetchStateRequest(run_id=self.state.run_id, node_id=rec.node_id,
                                                include_optimizer=include_optimizer), self.identity)
                try:
                    async for chunk in self._stub(rec).FetchState(req, timeout=self.cfg.timeouts.step):
                        yield chunk
                except grpc.aio.AioRpcError as err:
                    raise from_rpc_error(err) from None

    async def close(self) -> None:
        for ch, _ in self._channels.values():
            await ch.close()

