"""Refusal framing through the real daemons: nothing a party without a neighbour's key does is
charged to that neighbour, and the run goes on (issue 11, item 3).

``refusal:frame`` runs on a registered node that holds no stage: after every heartbeat it floods
every other member's PushTensor with streams naming each of the others as their sender, signed
with its own key (forged complete streams, forged first chunks that then stall, streams that never
send a chunk), to fill the receivers' stream slots and have the refusals counted against the honest
nodes it names. At the same time the test itself plays an outsider with no registered key, running
the same flood (``node.attacks.frame_flood``) from its own process. A receiver checks the named
sender's signature over a stream's header before it reads on or gives the stream a slot, so every
such stream is refused at its first chunk or times out holding nothing, and is charged to nobody:
the run completes every step, no node is routed around, demoted or banned, and no honest node's
refusal count (what attribution reads) grows.
"""

from __future__ import annotations

import asyncio
import threading

import pytest

from node.attacks import frame_flood
from pipeguard.identity import Identity
from pipeguard.v1 import pipeguard_pb2 as pb
from tests.conftest import tiny_run

pytestmark = pytest.mark.multiprocess

STEPS = 6


class Outsider(threading.Thread):
    """Floods the members (as the coordinator lists them) with an unregistered key until stopped."""

    def __init__(self, net, floods: int = 40):
        super().__init__(daemon=True)
        self.net, self.floods = net, floods
        self.done = threading.Event()
        self.opened = self.refused = 0

    def run(self) -> None:
        key = Identity.generate()  # never registered anywhere
        for _ in range(self.floods):
            if self.done.is_set():
                return
            status = self.net.status(history=0)
            members = [pb.PeerInfo(node_id=n.node_id, address=n.address) for n in status.nodes if n.address]
            opened, refused = asyncio.run(frame_flood(members, key, step=status.step, streams=4, hold=2.0))
            self.opened += opened
            self.refused += refused


@pytest.mark.timeout(240)
def test_framing_streams_from_a_forger_and_an_outsider_charge_nobody_and_the_run_completes(testnet):
    net = testnet(tiny_run({"pipeline.stages": 3, "pipeline.min_nodes": 5, "train.steps": STEPS,
                            "train.micro_batches": 2, "timeouts.step": 30.0}))
    net.start_coordinator()
    for _ in range(4):  # three stages and an honest standby, registered first
        net.start_node()
        net.wait_registered(len(net.nodes))
    net.start_node("--attack", "refusal:frame")
    net.wait_registered(5)
    honest = [n.node_id for n in net.nodes[:4]]
    attacker = net.nodes[4].node_id
    outsider = Outsider(net)
    outsider.start()
    try:
        status = net.wait_finished(timeout=200)
    finally:
        outsider.done.set()
        outsider.join(timeout=30)

    assert [p.step for p in status.losses] == list(range(STEPS)), "the run finished every planned step"
    assert outsider.opened and outsider.refused, "the outsider's flood ran and was refused"
    by_id = {n.node_id: n for n in status.nodes}
    assert sum(by_id[i].tensors_rejected for i in honest) > 0, "the honest nodes refused the framing streams"
    for node_id in honest:
        n = by_id[node_id]
        assert n.rejected_by_peers == 0, f"{node_id[:8]} was charged with streams it never signed"
        assert n.role != pb.ROLE_BANNED and not n.distrusted and not n.ban_reason
    kinds = [e.kind for e in status.events]
    assert "node_demoted" not in kinds and "node_set_aside" not in kinds, \
        [e.message for e in status.events if e.kind in ("node_demoted", "node_set_aside")]
    assert "step_failed" not in kinds, [e.message for e in status.events if e.kind == "step_failed"]
    assert by_id[attacker].role == pb.ROLE_STANDBY, "the forger never got a stage"
    assert {n.stage for n in status.nodes if n.role == pb.ROLE_STAGE and n.node_id in honest} == {0, 1, 2}
