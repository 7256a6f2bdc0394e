"""Test hook: hold a node still at a named point of its work, so a test can SIGKILL it there.

Loaded through the attack plug-in interface (``--attack-plugin tests/fault_hooks/pause.py:PauseAt``),
which calls ``on_forward`` / ``on_backward`` on the compute thread right after the node computed
a micro-batch's activation / input gradient and before it signs and sends it, and ``on_verdict``
after an audit's recomputation, before the verdict is signed and returned. The hook never
changes a tensor or a verdict: a node running it is honest, only stopped for a while.

Configured by environment variables (test-only, read once when the node starts):

``PIPEGUARD_TEST_PAUSE``      ``PHASE:STAGE:STEP:MB``: PHASE is ``forward``, ``backward`` or
                              ``verdict``; ``*`` matches any stage or micro-batch. The first
                              matching call at that step or later pauses.
``PIPEGUARD_TEST_PAUSE_DIR``  Directory shared by the test and every node. Nothing pauses
                              until the test creates ``armed`` there. The pausing node then
                              creates ``paused.json`` (exclusively: one pause per testnet,
                              whichever node gets there first; a node that takes the stage over
                              later does not pause again) and waits until ``release`` appears,
                              or ``PAUSE_LIMIT_S`` passes.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from node.attacks import Behaviour

PAUSE_LIMIT_S = 120.0


class PauseAt(Behaviour):
    name = "pause-at (test hook, honest)"

    def __init__(self) -> None:
        phase, stage, step, mb = os.environ["PIPEGUARD_TEST_PAUSE"].split(":")
        self.phase, self.stage, self.step, self.mb = phase, stage, int(step), mb
        self.dir = Path(os.environ["PIPEGUARD_TEST_PAUSE_DIR"])

    def _matches(self, phase: str, ctx) -> bool:
        return (phase == self.phase and ctx.step >= self.step and self.stage in ("*", str(ctx.stage))
                and self.mb in ("*", str(ctx.micro_batch)))

    def _pause(self, phase: str, ctx) -> None:
        if not self._matches(phase, ctx) or not (self.dir / "armed").exists():
            return
        try:
            fd = os.open(self.dir / "paused.json", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return  # somebody paused already
        with os.fdopen(fd, "w") as fh:
            json.dump({"node_id": ctx.node_id, "pid": os.getpid(), "phase": phase, "stage": ctx.stage,
                       "step": ctx.step, "micro_batch": ctx.micro_batch}, fh)
        deadline = time.monotonic() + PAUSE_LIMIT_S
        while not (self.dir / "release").exists() and time.monotonic() < deadline:
            time.sleep(0.02)

    def on_forward(self, ctx, activation):
        self._pause("forward", ctx)
        return activation

    def on_backward(self, ctx, grad):
        self._pause("backward", ctx)
        return grad

    def on_verdict(self, ctx, verdict):
        self._pause("verdict", ctx)
        return verdict
