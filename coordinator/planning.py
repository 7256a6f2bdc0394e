"""Pipeline formation as a plan: who holds which stage, which stages are skipped, whether to roll back.

A pure function of what the coordinator knows (no network, no clock): ``plan`` is called at
start, after a ban and after a lost node, and the step loop carries the plan out (Assign).

- Every live node that holds a stage keeps it.
- A vacant stage goes to the longest-registered live standby (or a stage holder without a stage).
- With no standby, a middle stage is skipped (its blocks are bypassed, Lu et al.'s skip-layer
  mode) once the run has history; the first and last stage cannot be skipped: wait for a node.
- Banned and distrusted nodes never get a stage; neither does a silent one.
- A node set aside (routed around after failed steps, ``coordinator/attribution.py``) holds no
  stage while another candidate can take it: it keeps none, and is the last spare picked (the one
  set aside longest ago first).
- Right after a coordinator restart a stage whose holder has not heartbeated yet is not given
  away (that would cost a rollback): wait for it.
- A stage with history whose new holder did not hold it, a newly skipped stage, or a conviction
  (``suspect_step``) roll the run back to the newest checkpoint at or before ``rollback_to``.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass

from pipeguard.v1 import pipeguard_pb2 as pb
from coordinator.registry import NodeRecord


@dataclass(frozen=True)
class Plan:
    holders: dict[int, NodeRecord]
    """Slot -> the node that is to hold it, for every slot not skipped."""
    skipped: set[int]
    """Slots bypassed (skip-layer mode), the ones skipped before included."""
    newly_skipped: set[int]
    """Slots this plan skips that were not skipped before."""
    lost: list[int]
    """Slots with history whose new holder did not hold them: their state comes from a checkpoint."""
    rollback_to: int | None
    """Roll back to the newest checkpoint at or before this step; None continues from the current step."""

    @property
    def slots(self) -> list[int]:
        """Slots that run, in pipeline order."""
        return sorted(self.holders)


def plan(*, stages: int, nodes: Iterable[NodeRecord], alive: Collection[str], distrusted: Collection[str],
         skipped: Collection[int], step: int, formed: bool, min_nodes: int, just_started: bool,
         history: Collection[int], suspect_step: int | None, set_aside: Sequence[str] = ()) -> Plan | None:
    """The pipeline to form, or None when it cannot be formed yet (wait for a node).

    ``nodes``: every registered node (roles and stage hints as the registry holds them), in any
    order. ``alive``: ids of the nodes heartbeating now. ``skipped``: slots skipped so far.
    ``step``: the run's next step. ``formed``: a pipeline has been formed in this process.
    ``min_nodes``: live nodes to wait for before the first step. ``just_started``: within a
    heartbeat timeout of this coordinator's (re)start, when stage holders may not be back yet.
    ``history``: slots with a committed state. ``suspect_step``: the first step a convicted stage
    holder may have touched (None without a conviction). ``set_aside``: nodes routed around, oldest
    first.
    """
    nodes = list(nodes)
    candidates = sorted((r for r in nodes if r.role in (pb.ROLE_STAGE, pb.ROLE_STANDBY) and r.node_id in alive
                         and r.node_id not in distrusted), key=lambda r: r.registered_at)
    if step == 0 and not formed and len(candidates) < min_nodes:
        return None  # the operator asked for standbys to be ready before the first step
    aside = {node_id: i for i, node_id in enumerate(set_aside)}
    holders: dict[int, NodeRecord] = {}
    for r in candidates:
        if 0 <= r.stage < stages and r.stage not in holders and r.stage not in skipped and r.node_id not in aside:
            holders[r.stage] = r
    spares = sorted((r for r in candidates if r not in holders.values()), key=lambda r: aside.get(r.node_id, -1))
    now_skipped = set(skipped)
    for slot in range(stages):
        if slot in holders or slot in now_skipped:
            continue
        if just_started and any(r.stage == slot and r.role == pb.ROLE_OFFLINE for r in nodes):
            return None  # its holder has not heartbeated yet: handing its stage away would cost a rollback
        if spares:
            holders[slot] = spares.pop(0)
        elif step > 0 and 0 < slot < stages - 1 and not just_started:
            now_skipped.add(slot)
        else:
            return None
    lost = [s for s in sorted(holders) if holders[s].stage != s and s in history]
    newly_skipped = now_skipped - set(skipped)
    rollback_to = None
    if lost or newly_skipped or suspect_step is not None:
        rollback_to = min(step, suspect_step if suspect_step is not None else step)
    return Plan(holders=holders, skipped=now_skipped, newly_skipped=newly_skipped, lost=lost,
                rollback_to=rollback_to)
