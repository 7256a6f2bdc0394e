"""Refusal attribution: which node to take out of the pipeline after a step failed every attempt.

A step that fails ``pipeline.max_step_attempts`` times in a row is attributed, if it can be,
from what the receivers reported in their heartbeats: the pipeline node whose messages its
pipeline neighbours refused most during those attempts (bytes that do not match their
signature, a replayed stream) is *distrusted*: taken out of the pipeline and never given a stage
again in this run, without a ban (a refused stream proves nothing to a third party).
Re-formation then treats it as a lost node. A receiver that lies to frame a neighbour gets at
most one node distrusted that way: when its reports would cost a second one, the reporter itself
is distrusted instead.
"""

from __future__ import annotations

import asyncio
import time

from coordinator.pipeline import Pipeline
from coordinator.registry import Registry
from coordinator.state import EventLog, RunState, RunStore

Refusals = dict[str, dict[str, int]]
"""sender id -> reporter id -> messages of the sender the reporter refused (``Registry.rejected_by_peers``)."""


def attribute(pipeline_ids: list[str], now: Refusals, before: Refusals) -> tuple[str, str, int] | None:
    """(sender, its main reporter, refusals) for the pipeline node whose messages its pipeline
    neighbours refused most between ``before`` and ``now``; None when nobody's were refused.

    Only reports by the sender's neighbours in the current pipeline count: those are the only
    nodes it sends to, and a node elsewhere cannot frame it."""
    ids = pipeline_ids
    growth: dict[str, tuple[int, str, int]] = {}  # sender -> (total, top reporter, its count)
    for i, sender in enumerate(ids):
        neighbours = set(ids[max(i - 1, 0):i]) | set(ids[i + 1:i + 2])
        got, was = now.get(sender, {}), before.get(sender, {})
        by = {rep: got[rep] - was.get(rep, 0) for rep in neighbours if got.get(rep, 0) > was.get(rep, 0)}
        if by:
            top = max(sorted(by), key=lambda rep: by[rep])
            growth[sender] = (sum(by.values()), top, by[top])
    if not growth:
        return None
    # On a tie the earlier stage is taken (sorted is stable): otherwise a liar could keep the
    # run stalled by reporting its honest neighbour exactly as often as it is refused; the
    # one-per-reporter rule (``RefusalAttribution.after_failures``) makes either choice converge.
    sender, (total, reporter, _) = sorted(growth.items(), key=lambda kv: -kv[1][0])[0]
    return sender, reporter, total


class RefusalAttribution:
    def __init__(self, registry: Registry, state: RunState, store: RunStore, events: EventLog, pipeline: Pipeline,
                 *, attempts: int, heartbeat_interval: float):
        self.registry = registry
        self.state = state
        self.store = store
        self.events = events
        self.pipeline = pipeline
        self.attempts = attempts
        self.heartbeat_interval = heartbeat_interval
        self.framed_by: dict[str, str] = {}
        """reporter id -> the node its refusal reports got distrusted (one each)."""

    def snapshot(self) -> Refusals:
        """What neighbours have refused so far: taken at a step's first attempt."""
        return {k: dict(v) for k, v in self.registry.rejected_by_peers.items()}

    async def after_failures(self, step: int, before: Refusals) -> None:
        """After every attempt of ``step`` failed: take the node its neighbours refused out of the
        pipeline, if the receivers' reports since ``before`` single one out; otherwise change nothing."""
        # The refusals of the last attempt reach us with the receivers' next heartbeat: wait for
        # one from every live pipeline node (at most two heartbeat intervals).
        failed_at = time.monotonic()
        deadline = failed_at + 2 * self.heartbeat_interval
        while time.monotonic() < deadline and any(
                self.registry.is_alive(r) and r.last_heartbeat < failed_at for r in self.pipeline.nodes):
            await asyncio.sleep(0.05)
        found = attribute(self.pipeline.ids(), self.registry.rejected_by_peers, before)
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
                      f"{self.attempts} failed attempts of step {step}")
        self.distrust(culprit, step, reason)

    def distrust(self, node_id: str, step: int, reason: str) -> None:
        """Never give ``node_id`` a stage again in this run; not a ban (it stays a member)."""
        if node_id in self.state.distrusted:
            return
        self.state.distrusted[node_id] = reason
        if node_id in self.pipeline.ids():
            self.pipeline.reform()
        self.store.save_run(self.state, self.registry)
        self.events.emit("node_demoted", f"node {node_id[:8]} taken out of the pipeline (not banned): {reason}",
                         node_id=node_id, step=step)
