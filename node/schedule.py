"""The schedule of one step on a stage: GPipe with an in-flight bound.

A stage forwards micro-batches as their inputs arrive (stage i works on m while stage i+1
works on m-1), runs a backward as soon as its gradient is in, and never holds more than
``max_in_flight`` forward graphs. Forwards and backwards each run in micro-batch order, so
gradients accumulate in the same order as in a single process and every result can be
replayed bit for bit. Backwards take priority; outputs are pushed by asyncio tasks while the
next micro-batch computes; the loop waits for an arrival or a finished send, up to the step
deadline.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import torch

from pipeguard.errors import DeadlineExceeded
from pipeguard.tensors import ReceivedTensor
from pipeguard.v1 import pipeguard_pb2 as pb

FORWARD, BACKWARD = pb.DIRECTION_FORWARD, pb.DIRECTION_BACKWARD


@dataclass
class StepWork:
    """What one step's schedule runs, each on the stage's compute thread (``compute``)."""

    compute: Callable[..., Awaitable[Any]]
    """``await compute(fn, *args)``: run ``fn`` on the compute thread."""
    forward: Callable[[int, int, torch.Tensor | None], tuple[Any, torch.Tensor | None]]
    """(step, micro-batch, received activation or None on the first stage) -> (the pass, kept for
    its backward; the activation to send, None on the last stage)."""
    backward: Callable[[Any, torch.Tensor | None], tuple[float, torch.Tensor | None]]
    """(the pass, received gradient or None on the last stage) -> (loss, 0.0 except on the last
    stage; the input gradient to send, None on the first stage)."""
    send: Callable[[int, int, torch.Tensor], Awaitable[None]]
    """(direction, micro-batch, tensor) -> the push of one output."""


@dataclass
class Schedule:
    """The shape of a stage's step: its position, micro-batches and in-flight bound."""

    micro_batches: int
    max_in_flight: int
    first: bool
    last: bool

    async def run(self, step: int, work: StepWork, inbox: dict[tuple[int, int, int], ReceivedTensor],
                  arrived: asyncio.Event, deadline: float) -> tuple[float, float]:
        """Run every forward and backward of ``step`` and wait for every send; returns (the sum of
        the micro-batches' losses, the seconds spent computing). ``inbox`` fills as tensors are
        delivered, setting ``arrived``; ``deadline`` is on the ``time.monotonic`` clock."""
        M = self.micro_batches
        saved: dict[int, Any] = {}
        sends: list[asyncio.Task] = []
        fwd = bwd = 0
        loss_sum = 0.0
        compute = 0.0

        def launch_send(direction: int, mb: int, tensor: torch.Tensor) -> None:
            task = asyncio.create_task(work.send(direction, mb, tensor))
            task.add_done_callback(lambda _t: arrived.set())
            sends.append(task)

        while bwd < M:
            for t in sends:
                if t.done() and t.exception() is not None:
                    raise t.exception()
            arrived.clear()
            t0 = time.perf_counter()
            if bwd < fwd and (self.last or (step, BACKWARD, bwd) in inbox):
                grad_in = None if self.last else inbox.pop((step, BACKWARD, bwd)).tensor
                loss, grad_out = await work.compute(work.backward, saved.pop(bwd), grad_in)
                loss_sum += loss
                if grad_out is not None:
                    launch_send(BACKWARD, bwd, grad_out)
                bwd += 1
            elif fwd < M and fwd - bwd < self.max_in_flight and (self.first or (step, FORWARD, fwd) in inbox):
                x_in = None if self.first else inbox.pop((step, FORWARD, fwd)).tensor
                saved[fwd], out = await work.compute(work.forward, step, fwd, x_in)
                if out is not None:
                    launch_send(FORWARD, fwd, out)
                fwd += 1
            else:
                try:
                    await asyncio.wait_for(arrived.wait(), max(0.0, deadline - time.monotonic()))
                except asyncio.TimeoutError:
                    raise DeadlineExceeded(
                        f"step {step} timed out waiting for micro-batch inputs (fwd {fwd}/{M}, bwd {bwd}/{M})"
                    ) from None
                continue
            compute += time.perf_counter() - t0
        await asyncio.gather(*sends)
        return loss_sum, compute
