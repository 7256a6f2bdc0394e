"""Verified checkpoints of every stage, kept by the coordinator.

Every ``audit.checkpoint_every`` steps (and whenever a pipeline is formed) the coordinator
fetches each stage's full state (weights + optimizer) and keeps it only if it hashes to the
digest that stage committed to. Checkpoints are where a run rolls back to after a ban or a
lost node, and what a standby taking over a stage starts from.

On disk: ``checkpoints/step-00000040/stage-1.pgstate``: length-prefixed ``StateChunk``
messages (the wire format itself), written to a temporary file and renamed into place, plus
``manifest.json`` with each stage's digest. The newest ``keep`` complete checkpoints stay, and
so does any older one that a rollback may still need: audits of a step may finish up to
``audit.retention`` steps later, and a conviction rolls back to the newest checkpoint at or
before the convicted step.

``Checkpointer`` takes them: it fetches each stage's state with the node's signed attestation
(``fetch_stage_state``, which exports use too) and keeps it only if the attestation is the
stage's and names the digest the stage committed to (``claims.committed_state``) and the bytes
hash to it. Bytes off their holder's own signed attestation are the holder's fault, provably
(``claims.off_attestation``): ``on_off_attestation`` hears of it (the clock counts it with the
judge and takes the holder out of the pipeline) and ``StateOffAttestation`` is raised, so that one holder
cannot stop the run by failing every checkpoint of its stage.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import struct
from pathlib import Path
from typing import Awaitable, Callable

import torch

from pipeguard import claims
from pipeguard.errors import DataLoss, NotFound, PipeguardError
from pipeguard.tensors import StateAssembler, receive_state, state_chunks, state_digest
from pipeguard.v1 import pipeguard_pb2 as pb
from coordinator.channels import NodeChannels
from coordinator.config import CoordinatorConfig
from coordinator.pipeline import Pipeline
from coordinator.registry import NodeRecord
from coordinator.state import EventLog, RunState, StateError

log = logging.getLogger(__name__)


class StateOffAttestation(DataLoss):
    """A holder served the coordinator a state whose bytes do not hash to its own signed attestation."""

    def __init__(self, node_id: str, stage: int, step: int):
        super().__init__(f"node {node_id[:8]} served stage {stage}'s state of step {step} off its own signed "
                         "attestation")
        self.node_id, self.stage, self.step = node_id, stage, step


class CheckpointStore:
    def __init__(self, directory: Path, keep: int = 3):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.keep = keep

    def _step_dir(self, step: int) -> Path:
        return self.dir / f"step-{step:08d}"

    def save(self, step: int, stages: dict[int, tuple[dict[str, torch.Tensor], bytes]],
             needed_from: int | None = None) -> None:
        """Write one checkpoint: stage -> (named tensors, digest). Digests are re-checked here.

        Older checkpoints beyond the newest ``keep`` are deleted, except the newest one at or
        before ``needed_from`` and those after it: a conviction may still roll back that far.
        """
        for stage, (named, digest) in stages.items():
            if state_digest(iter(named.items())) != digest:
                raise DataLoss(f"stage {stage} state does not hash to its committed digest")
        d = self._step_dir(step)
        tmp = d.with_name(d.name + ".tmp")
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            manifest = {}
            for stage, (named, digest) in stages.items():
                with open(tmp / f"stage-{stage}.pgstate", "wb") as fh:
                    for chunk in state_chunks(list(named.items()), stage, step, 1 << 20):
                        raw = chunk.SerializeToString()
                        fh.write(struct.pack(">I", len(raw)) + raw)
                    fh.flush()
                    os.fsync(fh.fileno())
                manifest[str(stage)] = digest.hex()
            (tmp / "manifest.json").write_text(json.dumps({"step": step, "digests": manifest}))
            shutil.rmtree(d, ignore_errors=True)
            os.replace(tmp, d)
        except OSError as exc:  # disk full, unwritable: no partial checkpoint is left behind
            shutil.rmtree(tmp, ignore_errors=True)
            raise StateError(f"cannot write checkpoint {d}: {exc.strerror or exc}") from None
        floor = self.latest(max(needed_from, 0)) if needed_from is not None else None
        for old in self.steps()[:-self.keep]:
            if floor is None or old < floor:
                shutil.rmtree(self._step_dir(old), ignore_errors=True)

    def steps(self) -> list[int]:
        out = []
        for p in self.dir.glob("step-*"):
            if p.suffix != ".tmp" and (p / "manifest.json").exists():
                out.append(int(p.name.split("-")[1]))
        return sorted(out)

    def latest(self, at_or_before: int) -> int | None:
        eligible = [s for s in self.steps() if s <= at_or_before]
        return eligible[-1] if eligible else None

    def digests(self, step: int) -> dict[int, bytes]:
        manifest = json.loads((self._step_dir(step) / "manifest.json").read_text())
        return {int(k): bytes.fromhex(v) for k, v in manifest["digests"].items()}

    def chunks(self, step: int, stage: int):
        path = self._step_dir(step) / f"stage-{stage}.pgstate"
        if not path.exists():
            raise NotFound(f"no checkpoint of stage {stage} at step {step}")
        with open(path, "rb") as fh:
            while header := fh.read(4):
                (n,) = struct.unpack(">I", header)
                yield pb.StateChunk.FromString(fh.read(n))

    def load(self, step: int, stage: int) -> dict[str, torch.Tensor]:
        asm = StateAssembler(1 << 40)
        for chunk in self.chunks(step, stage):
            asm.add(chunk)
        return asm.finish()


def fetch_stage_state(channels: NodeChannels, run_id: str, rec: NodeRecord, slot: int, step: int,
                      include_optimizer: bool, timeout: float):
    """The state chunks ``rec`` serves for stage ``slot`` at ``step``, its attestation among them."""
    req = pb.FetchStateRequest(run_id=run_id, node_id=rec.node_id, include_optimizer=include_optimizer, step=step,
                               stage=slot)
    return channels.stream(rec, "FetchState", req, timeout)


class Checkpointer:
    """Takes verified checkpoints of the active pipeline into ``store``."""

    def __init__(self, store: CheckpointStore, channels: NodeChannels, cfg: CoordinatorConfig, state: RunState,
                 pipeline: Pipeline, events: EventLog):
        self.store = store
        self.channels = channels
        self.cfg = cfg
        self.state = state
        self.pipeline = pipeline
        self.events = events
        self.on_off_attestation: Callable[[NodeRecord, int, int, pb.StateAttestation, dict], Awaitable[None]] | None \
            = None
        """Awaited with (holder, stage, step, attestation, state) before ``StateOffAttestation`` is raised."""

    async def verified_state(self, rec: NodeRecord, slot: int, step: int) -> tuple[dict[str, torch.Tensor], bytes]:
        net = self.cfg.net
        named, attestation = await receive_state(
            fetch_stage_state(self.channels, self.state.run_id, rec, slot, step, True, self.cfg.timeouts.step),
            net.max_tensor_bytes, max_tensors=net.max_state_tensors, max_total_bytes=net.state_bytes_limit)
        committed = bytes.fromhex(self.state.commitments[str(slot)])
        claims.committed_state(attestation, rec.identity, committed, stage=slot, step=step)
        off = await asyncio.get_running_loop().run_in_executor(None, claims.off_attestation, attestation,
                                                               rec.public_key, named)
        if off:
            if self.on_off_attestation is not None:
                await self.on_off_attestation(rec, slot, step, attestation, named)
            raise StateOffAttestation(rec.node_id, slot, step)
        return named, committed

    async def take(self, step: int) -> None:
        """Fetch every active stage's state at ``step`` and keep it if it matches its commitment."""
        states = {}
        for slot, rec in zip(self.pipeline.slots, self.pipeline.nodes):
            states[slot] = await self.verified_state(rec, slot, step)
        loop = asyncio.get_running_loop()
        # Audits of steps after step - retention may still convict someone and roll back there.
        saving = loop.run_in_executor(None, self.store.save, step, states, step - self.cfg.audit.retention)
        try:
            await asyncio.shield(saving)
        except asyncio.CancelledError:
            await asyncio.wait([saving])  # a checkpoint on disk is written whole before we go
            raise
        self.events.emit("checkpoint", f"verified checkpoint of {len(states)} stages at step {step}", step=step,
                         persist=False)

    async def take_now(self, timeout: float) -> int | None:
        """Make sure a verified checkpoint of the current step exists (at a stop or a shutdown).

        Returns its step, or None when none could be made within ``timeout`` (stages gone): then
        a resumed run starts from the last checkpoint before it.
        """
        step = self.state.step
        if step in self.store.steps():
            return step
        if not self.pipeline.nodes or self.state.phase != pb.RUN_PHASE_TRAINING:
            return None
        try:
            await asyncio.wait_for(self.take(step), timeout)
            return step
        except (PipeguardError, asyncio.TimeoutError) as exc:
            self.events.emit("checkpoint_failed", f"no checkpoint at step {step}: {exc or 'timed out'}; a resumed run "
                             f"starts from step {self.store.latest(step)}", step=step)
            return None
