"""Refusal attribution: whom to route around after a step failed every attempt, and whom to demote.

A step that fails ``pipeline.max_step_attempts`` times in a row is attributed from what the
receivers reported in their signed heartbeats. What a receiver counts against a sender
(``PeerCounters.rejected``) is only ever a stream the sender signed the header of, refused for
something an honest sender never sends (node/service.py): no outsider, forger or slow link adds to
it. But a receiver's report is still only its own word, so one accuser never costs an honest node
more than its place in the current pipeline:

- The pipeline node whose messages its pipeline neighbours refused most is **set aside**: taken out
  of the pipeline, a standby takes its stage, and it gets a stage again only when no other node can
  take one (``planning.plan``). That is routing around, not a demotion.
- A node refused by two different reporters (over the run) is **distrusted**: never given a stage
  again in this run (still no ban: a refused stream proves nothing to a third party). With a single
  adversary at least one of two accusers is honest, so an honest node is never distrusted.
- A reporter whose refusals single out a second, different node is distrusted itself: an honest
  receiver is never the neighbour of two misbehaving nodes. The nodes set aside on its word alone
  are cleared.
- When nobody's messages were refused (a silent or stale sender, a lost link, streams flooded by an
  outsider), nobody is accused: one pipeline node is set aside in turn, the one whose signed streams
  were refused most for stale or replayed content (``PeerCounters.unattributed``, a hint only) or
  else the next one round the pipeline, so that with one standby some pipeline of honest nodes is
  found within ``stages + 1`` such rounds, and nobody is demoted for it.
"""

from __future__ import annotations

import asyncio
import time

from coordinator.pipeline import Pipeline
from coordinator.registry import Registry
from coordinator.state import EventLog, RunState, RunStore

Refusals = dict[str, dict[str, int]]
"""sender id -> reporter id -> messages of the sender the reporter refused (``Registry.rejected_by_peers``)."""


def growth_by_reporter(pipeline_ids: list[str], now: Refusals, before: Refusals) -> dict[str, dict[str, int]]:
    """sender -> {reporter -> refusals between ``before`` and ``now``}, counting only reports by the
    sender's neighbours in the current pipeline: those are the only nodes it sends to, and a node
    elsewhere cannot frame it."""
    out: dict[str, dict[str, int]] = {}
    for i, sender in enumerate(pipeline_ids):
        neighbours = set(pipeline_ids[max(i - 1, 0):i]) | set(pipeline_ids[i + 1:i + 2])
        got, was = now.get(sender, {}), before.get(sender, {})
        by = {rep: got[rep] - was.get(rep, 0) for rep in neighbours if got.get(rep, 0) > was.get(rep, 0)}
        if by:
            out[sender] = by
    return out


def attribute(pipeline_ids: list[str], now: Refusals, before: Refusals) -> tuple[str, str, int] | None:
    """(sender, its main reporter, refusals) for the pipeline node whose messages its pipeline
    neighbours refused most between ``before`` and ``now``; None when nobody's were refused."""
    growth = growth_by_reporter(pipeline_ids, now, before)
    if not growth:
        return None
    # On a tie the earlier stage is taken (sorted is stable): otherwise a liar could keep the
    # run stalled by reporting its honest neighbour exactly as often as it is refused; the
    # one-per-reporter rule (``RefusalAttribution.after_failures``) makes either choice converge.
    order = {s: i for i, s in enumerate(pipeline_ids)}
    sender, by = sorted(growth.items(), key=lambda kv: (-sum(kv[1].values()), order[kv[0]]))[0]
    reporter = max(sorted(by), key=lambda rep: by[rep])
    return sender, reporter, sum(by.values())


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
        self.accusers: dict[str, set[str]] = {}
        """sender -> the reporters whose refusals singled it out after a failed step."""
        self.accused_by: dict[str, set[str]] = {}
        """reporter -> the senders its refusals singled out."""
        self.aside_by: dict[str, str] = {}
        """node set aside -> the reporter on whose word alone it was ("" = nobody's)."""
        self.rotation = 0
        """Failed steps nobody was accused of so far: the next pipeline position to set aside."""

    def snapshot(self) -> tuple[Refusals, Refusals]:
        """What neighbours have refused so far (charged, unattributed): taken at a step's first attempt."""
        return ({k: dict(v) for k, v in self.registry.rejected_by_peers.items()},
                {k: dict(v) for k, v in self.registry.unattributed_by_peers.items()})

    async def after_failures(self, step: int, before: tuple[Refusals, Refusals] | Refusals) -> None:
        """After every attempt of ``step`` failed: route around (or demote) whom the receivers'
        reports since ``before`` single out, or, when they single out nobody, the next node in turn."""
        # The refusals of the last attempt reach us with the receivers' next heartbeat: wait for
        # one from every live pipeline node (at most two heartbeat intervals).
        failed_at = time.monotonic()
        deadline = failed_at + 2 * self.heartbeat_interval
        while time.monotonic() < deadline and any(
                self.registry.is_alive(r) and r.last_heartbeat < failed_at for r in self.pipeline.nodes):
            await asyncio.sleep(0.05)
        charged_before, unattributed_before = before if isinstance(before, tuple) else (before, {})
        ids = self.pipeline.ids()
        found = attribute(ids, self.registry.rejected_by_peers, charged_before)
        if found is None:
            silent = [r.node_id for r in self.pipeline.nodes if r.last_heartbeat < failed_at]
            self._rotate(step, ids, unattributed_before, silent)
            return
        culprit, reporter, count = found
        for rep in growth_by_reporter(ids, self.registry.rejected_by_peers, charged_before)[culprit]:
            self.accusers.setdefault(culprit, set()).add(rep)
            self.accused_by.setdefault(rep, set()).add(culprit)
        framing = [rep for rep in sorted(self.accusers[culprit])
                   if len(self.accused_by[rep] - set(self.state.distrusted)) >= 2]
        if framing:
            reporter = framing[0]
        framed = self.accused_by[reporter] - set(self.state.distrusted)
        accusers = self.accusers[culprit] - set(self.state.distrusted)
        if len(framed) >= 2:
            # This reporter's refusals single out a second node: now the common factor is the
            # reporter (a liar framing each new neighbour), so it is the one taken out.
            others = sorted(n[:8] for n in framed if n != culprit)
            self.distrust(reporter, step, f"its refusals of node {culprit[:8]}'s messages single out a second "
                          f"neighbour (after {', '.join(others)})")
            for node, why in list(self.aside_by.items()):
                if why == reporter:  # set aside on the liar's word alone: a candidate like any other again
                    del self.aside_by[node]
                    self.state.set_aside.pop(node, None)
            self.store.save_run(self.state, self.registry)
        elif len(accusers) >= 2:
            self.distrust(culprit, step, f"its messages were refused by {len(accusers)} different pipeline "
                          f"neighbours ({', '.join(sorted(a[:8] for a in accusers))}), the last time {count} "
                          f"during {self.attempts} failed attempts of step {step}")
        else:
            self.set_aside(culprit, step, f"{count} of its messages were refused by pipeline neighbour "
                           f"{reporter[:8]} during {self.attempts} failed attempts of step {step} (one "
                           "accuser: routed around, not demoted)", reporter=reporter)

    def _rotate(self, step: int, ids: list[str], unattributed_before: Refusals, silent: list[str]) -> None:
        """Nobody's messages were refused: set aside the pipeline node that has fallen silent (a
        crash the liveness monitor has not timed out yet), else one in turn, charged to nobody."""
        if not ids:
            return
        if silent:  # never rotate an honest live node out for a dead one's failures
            node = silent[0]
            self.set_aside(node, step, f"silent since step {step} failed {self.attempts} times (no heartbeat; "
                           "attributed to nobody: not demoted)", reporter="")
            return
        hints = growth_by_reporter(ids, self.registry.unattributed_by_peers, unattributed_before)
        if hints:
            order = {s: i for i, s in enumerate(ids)}
            node = sorted(hints, key=lambda s: (-sum(hints[s].values()), order[s]))[0]
            why = (f"{sum(hints[node].values())} of its signed streams were refused as stale or replayed during "
                   f"{self.attempts} failed attempts of step {step}")
        else:
            node = ids[self.rotation % len(ids)]
            self.rotation += 1
            why = f"step {step} failed {self.attempts} times with no refusal charged to anyone; routed around in turn"
        self.set_aside(node, step, f"{why} (attributed to nobody: not demoted)", reporter="")

    def set_aside(self, node_id: str, step: int, reason: str, *, reporter: str) -> None:
        """Take ``node_id`` out of the pipeline for now: a standby takes its stage; it gets one again
        only when no other node can take it. Not a demotion."""
        self.state.set_aside.pop(node_id, None)  # the newest reason, and last in line
        self.state.set_aside[node_id] = reason
        self.aside_by[node_id] = reporter
        if node_id in self.pipeline.ids():
            self.pipeline.reform()
        self.store.save_run(self.state, self.registry)
        self.events.emit("node_set_aside", f"node {node_id[:8]} routed around (not demoted): {reason}",
                         node_id=node_id, step=step)

    def distrust(self, node_id: str, step: int, reason: str) -> None:
        """Never give ``node_id`` a stage again in this run; not a ban (it stays a member)."""
        if node_id in self.state.distrusted:
            return
        self.state.distrusted[node_id] = reason
        self.state.set_aside.pop(node_id, None)
        if node_id in self.pipeline.ids():
            self.pipeline.reform()
        self.store.save_run(self.state, self.registry)
        self.events.emit("node_demoted", f"node {node_id[:8]} taken out of the pipeline (not banned): {reason}",
                         node_id=node_id, step=step)
