"""Retries cannot frame anyone (issue 11, "Framing" item 1), through a real testnet.

A malicious upstream (stage 1, ``forward:switch-attempt``) sends negated activations in the first
attempt of each step, keeps its honest successor's signed gradients of that attempt, fails the
attempt, sends the honest activations in the retry, and serves auditors the gradients of the
failed attempt as the ones it received. Before attempts were numbered the successor's two
gradients for one micro-batch had identical headers: the judge convicted the honest successor of
equivocation and ``pipeguard verify`` said VALID. Now every header, report and order names the
attempt, receivers refuse tensors of another attempt, auditors take only the audited attempt's
copies, and two gradients of different attempts are no contradiction.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from pipeguard.evidence import verify_bundle, write_equivocation_bundle
from pipeguard.identity import Identity, PublicIdentity
from pipeguard.signing import sign
from pipeguard.tensors import receive_tensor
from pipeguard.v1 import pipeguard_pb2 as pb
from pipeguard.v1 import pipeguard_pb2_grpc as pb_grpc
from tests.test_adversary import ATTACKER, STEPS, adversary_run, run_with_attacker

pytestmark = pytest.mark.multiprocess


def fetch_tensor(net, node, run_id: str, step: int, mb: int, sent: bool, signer_key: bytes) -> pb.TensorCommitment:
    """A retained BACKWARD tensor of ``node`` as it serves it to the coordinator (signed with the
    coordinator's key, as the judge asks)."""
    coordinator = Identity.load(net.workdir / "coordinator" / "state" / "coordinator.key")

    async def go():
        req = sign(pb.FetchTensorRequest(run_id=run_id, node_id=node.node_id, step=step, micro_batch=mb,
                                         direction=pb.DIRECTION_BACKWARD, sent=sent), coordinator)
        async with grpc.aio.insecure_channel(node.address) as ch:
            call = pb_grpc.NodeStub(ch).FetchTensor(req, timeout=30)
            rt = await receive_tensor(call, max_tensor_bytes=1 << 24,
                                      admit=lambda header: PublicIdentity(signer_key))
        return rt.commitment

    return asyncio.run(go())


@pytest.mark.timeout(200)
def test_an_upstream_that_switches_inputs_between_attempts_frames_nobody(testnet):
    net = testnet(adversary_run())
    status, ids = run_with_attacker(net, ["--attack", "forward:switch-attempt"])
    attacker = ids[ATTACKER]
    honest = set(ids) - {attacker}

    # The attack played: every step failed its first attempt and was retried.
    failed = {e.step for e in status.events if e.kind == "step_failed"}
    assert failed >= {0}, "the attacker failed the first attempt of its steps"
    assert [p.step for p in status.losses] == list(range(STEPS)), "the run finished every step"

    # No honest node was convicted or demoted; no bundle proves anything against one.
    for n in status.nodes:
        if n.node_id in honest:
            assert n.role != pb.ROLE_BANNED, f"honest {n.node_id[:8]} banned: {n.ban_reason}"
            assert not n.distrusted, f"honest {n.node_id[:8]} demoted: {n.distrusted}"
    for path in status.evidence:
        result = verify_bundle(Path(path))
        assert not (result.valid and result.accused in honest), result.summary

    # The attacker's best bundle against its successor: the successor's gradient of the failed
    # attempt (as the attacker serves it) and of the retry (as the successor serves it).
    successor = next(n for n in status.nodes if n.role == pb.ROLE_STAGE and n.stage == 2)
    daemon = {d.node_id: d for d in net.nodes}
    key = Identity.load(net.workdir / f"node{ids.index(successor.node_id)}" / "home" / "node.key").public_key
    step = min(failed)
    kept = fetch_tensor(net, daemon[attacker], status.run_id, step, 0, sent=False, signer_key=key)
    retry = fetch_tensor(net, daemon[successor.node_id], status.run_id, step, 0, sent=True, signer_key=key)
    assert kept.header.sender == retry.header.sender == successor.node_id
    assert kept.payload_digest != retry.payload_digest, "two signed gradients for one micro-batch of the step"
    assert kept.header.attempt < retry.header.attempt, "... of two attempts, and the headers say so"
    path = write_equivocation_bundle(net.workdir / "framed.pgev", kept, retry, key)
    result = verify_bundle(path)
    assert not result.valid and "not contradictory" in result.summary, result.summary
