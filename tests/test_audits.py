"""Multi-process audit tests: detection, confirmation, bans, evidence, recovery.

Every run is a real coordinator with real node processes on loopback. The single-process
reference trainer is the clean run: the pipeline reproduces it exactly, so a defended run
that rolled back and replaced the attacker must end where clean training ends.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from coordinator.config import CoordinatorConfig
from pipeguard.app.testnet import wait_for
from pipeguard.computation import StageComputation, StageSetup
from pipeguard.data import stdlib_corpus
from pipeguard.evidence import verify_bundle
from pipeguard.model import GPTConfig, OptimSettings
from pipeguard.reference import train_reference
from pipeguard.v1 import pipeguard_pb2 as pb
from tests.conftest import tiny_run
from tests.test_operating import free_port, scrape

pytestmark = pytest.mark.multiprocess

SEED = 7
GPT = GPTConfig(block_size=32, n_layer=3, n_head=2, n_embd=32)


def clean_losses(steps: int) -> list[float]:
    torch.set_num_threads(1)
    optim = OptimSettings(lr=3e-3, warmup_steps=2, total_steps=steps)
    return train_reference(GPT, optim, stdlib_corpus(262144), seed=SEED, steps=steps, micro_batches=4,
                           micro_batch_size=4).losses


def audit_run(steps: int, rate: float, checkpoint_every: int = 5, screen: bool = True,
              nodes: int = 4) -> CoordinatorConfig:
    """Three stages; the first step waits for ``nodes`` nodes, so the standby audits from step 0."""
    return tiny_run({"pipeline.stages": 3, "pipeline.min_nodes": nodes, "train.steps": steps, "audit.rate": rate,
                     "audit.screen": screen, "audit.checkpoint_every": checkpoint_every, "audit.retention": 4})


def start(net, roles: dict[int, list[str]], count: int):
    """Start ``count`` nodes in order (node i serves stage i; extras stand by)."""
    net.start_coordinator()
    for i in range(count):
        net.start_node(*roles.get(i, []))
        net.wait_registered(i + 1)


def banned(status: pb.StatusReply) -> set[str]:
    return {n.node_id for n in status.nodes if n.role == pb.ROLE_BANNED}


def tail_mean(values: list[float], n: int = 3) -> float:
    return sum(values[-n:]) / n


@pytest.mark.timeout(180)
@pytest.mark.parametrize("attack", ["forward:reverse", "forward:random", "backward:noise"])
def test_lu_attacks_are_caught_banned_and_training_recovers(testnet, attack):
    steps = 16
    net = testnet(audit_run(steps, rate=0.05))
    start(net, {1: ["--attack", attack, "--attack-rate", "0.5"]}, count=4)
    attacker = net.nodes[1].node_id
    status = net.wait_finished(timeout=150)

    assert banned(status) == {attacker}, "exactly the attacker is banned"
    assert status.detections >= 1
    ban = next(e for e in status.events if e.kind == "banned")
    assert attacker[:8] in ban.message
    standby = net.nodes[3].node_id
    holder = {n.stage: n.node_id for n in status.nodes if n.role == pb.ROLE_STAGE}
    assert holder[1] == standby, "the standby took over the attacker's stage"
    assert any(e.kind == "rolled_back" for e in status.events)

    losses = [p.loss for p in status.losses]
    assert [p.step for p in status.losses] == list(range(steps))
    clean = clean_losses(steps)
    assert abs(tail_mean(losses) - tail_mean(clean)) / tail_mean(clean) < 0.03, (losses, clean)

    # The evidence stands on its own, offline.
    assert status.evidence
    for path in status.evidence:
        result = verify_bundle(Path(path))
        assert result.valid, result.summary
        assert result.accused == attacker


@pytest.mark.timeout(120)
def test_evidence_from_a_real_ban_verifies_and_a_flipped_byte_does_not(testnet, tmp_path):
    net = testnet(audit_run(8, rate=0.2))
    start(net, {1: ["--attack", "forward:reverse", "--attack-rate", "1"]}, count=4)
    status = net.wait_finished(timeout=100)
    bundle = Path(status.evidence[0])
    cli = [sys.executable, "-m", "pipeguard.app.cli", "verify"]
    ok = subprocess.run([*cli, str(bundle), "--coordinator-key", status.coordinator_key_hex], capture_output=True,
                        text=True, timeout=60)
    assert ok.returncode == 0 and "VALID" in ok.stdout, ok.stdout + ok.stderr

    raw = bytearray(bundle.read_bytes())
    # Flip one byte inside a stored tensor (the zip stores files uncompressed), and one in the manifest.
    for i, where in enumerate([len(raw) // 2, raw.index(b'"kind"') + 10]):
        bad = bytearray(raw)
        bad[where] ^= 0x01
        path = tmp_path / f"tampered{i}.pgev"
        path.write_bytes(bytes(bad))
        out = subprocess.run([*cli, str(path)], capture_output=True, text=True, timeout=60)
        assert out.returncode == 1 and "INVALID" in out.stdout, out.stdout + out.stderr

    other_key = "00" * 32
    pinned = subprocess.run([*cli, str(bundle), "--coordinator-key", other_key], capture_output=True, text=True,
                            timeout=60)
    assert pinned.returncode == 1 and "different coordinator" in pinned.stdout


@pytest.mark.timeout(180)
def test_honest_run_with_every_message_audited_bans_nobody(testnet):
    steps = 12
    net = testnet(audit_run(steps, rate=1.0))
    start(net, {i: ["--metrics-port", str(free_port())] for i in range(4)}, count=4)
    status = net.wait_finished(timeout=170)
    assert banned(status) == set()
    assert status.detections == 0
    # p = 1: every stage's update audit, every step; each replays the whole stage-step and
    # compares every activation and gradient the stage sent (the 2 forward + 2 backward senders
    # x 4 micro-batches' own audits are folded into them), plus any screen-flagged message.
    assert status.audits_total >= steps * 3
    assert sum(n.audits_passed for n in status.nodes) > 0
    torch.testing.assert_close([p.loss for p in status.losses], clean_losses(steps), rtol=1e-5, atol=1e-6)
    # Auditors follow stages: an update audit whose recomputed state hashes to the committed one
    # fetches neither state after the first, and the next audit of the stage starts from it.
    fetched = hits = 0
    for node in net.nodes:
        m = scrape(node.info["metrics"])
        fetched += m["pipeguard_node_audit_state_bytes_fetched_total"]
        hits += m["pipeguard_node_audit_replica_hits_total"]
    update_audits = steps * 3
    every_state = sum(stage_state_bytes(audit_run(steps, 1.0))) * steps * 2  # before and after each update
    assert hits >= steps, (hits, update_audits)
    assert fetched <= every_state / 2, (fetched, every_state)


def stage_state_bytes(cfg: CoordinatorConfig) -> list[int]:
    """Bytes of each stage's state (weights and both AdamW moments)."""
    out = []
    for stage in range(cfg.pipeline.stages):
        comp = StageComputation.build(StageSetup.from_specs(cfg.model_spec(), cfg.train_spec(), stage,
                                                            cfg.pipeline.stages))
        out.append(3 * sum(p.numel() * p.element_size() for p in comp.module.parameters()))
    return out


@pytest.mark.timeout(150)
def test_lying_auditor_is_the_one_penalised(testnet):
    steps = 10
    net = testnet(audit_run(steps, rate=0.3))
    # The standby audits first (auditors prefer standbys) and accuses everyone it audits.
    start(net, {3: ["--attack", "audit:accuse", "--attack-rate", "1"]}, count=4)
    liar = net.nodes[3].node_id
    status = net.wait_finished(timeout=140)
    assert banned(status) == {liar}
    liar_status = next(n for n in status.nodes if n.node_id == liar)
    assert "false accusation" in liar_status.ban_reason
    results = [verify_bundle(Path(p)) for p in status.evidence]
    assert results and all(r.valid and r.kind == "false-accusation" and r.accused == liar for r in results)
    torch.testing.assert_close([p.loss for p in status.losses], clean_losses(steps), rtol=1e-5, atol=1e-6)


@pytest.mark.timeout(180)
def test_stage_node_killed_mid_run_is_replaced_by_a_standby(testnet):
    steps = 40
    net = testnet(audit_run(steps, rate=0.0, screen=False, checkpoint_every=5))
    start(net, {}, count=4)
    victim, standby = net.nodes[1], net.nodes[3]
    wait_for(lambda: net.status().step >= 7, 60, "7 steps")
    victim.kill()  # SIGKILL mid-run
    status = net.wait_finished(timeout=150)
    assert banned(status) == set(), "a crash is not misbehaviour"
    holder = {n.stage: n.node_id for n in status.nodes if n.role == pb.ROLE_STAGE}
    assert holder[1] == standby.node_id
    wait_for(lambda: any(e.kind == "node_offline" and e.node_id == victim.node_id for e in net.status().events),
             10, "the killed node reported offline")
    assert not any(e.kind == "node_demoted" for e in status.events), "a crash is not misbehaviour"
    # Rolled back to a verified checkpoint and re-ran honestly: identical to clean training.
    torch.testing.assert_close([p.loss for p in status.losses], clean_losses(steps), rtol=1e-5, atol=1e-6)


@pytest.mark.timeout(150)
def test_without_a_standby_the_attacked_stage_is_skipped(testnet):
    steps = 12
    net = testnet(audit_run(steps, rate=0.3, nodes=3))
    start(net, {1: ["--attack", "forward:reverse", "--attack-rate", "1", "--attack-start", "1"]}, count=3)
    attacker = net.nodes[1].node_id
    status = net.wait_finished(timeout=140)
    assert banned(status) == {attacker}
    assert any(e.kind == "stage_skipped" for e in status.events)
    stages = sorted(n.stage for n in status.nodes if n.role == pb.ROLE_STAGE)
    assert stages == [0, 2]
    losses = [p.loss for p in status.losses]
    assert len(losses) == steps and losses[-1] < losses[0]
