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
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
from pathlib import Path

import torch

from pipeguard.errors import DataLoss, NotFound
from pipeguard.tensors import StateAssembler, state_chunks, state_digest
from pipeguard.v1 import pipeguard_pb2 as pb
from coordinator.state import StateError

log = logging.getLogger(__name__)


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
