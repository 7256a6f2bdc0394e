"""Multi-process tests: real coordinator and node daemons on loopback."""

from __future__ import annotations

import json
import math
import socket
import subprocess
import sys

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from pipeguard.app.testnet import wait_for
from pipeguard.data import stdlib_corpus
from pipeguard.model import GPTConfig, OptimSettings
from pipeguard.reference import train_reference
from pipeguard.v1 import pipeguard_pb2 as pb
from tests.conftest import tiny_run

pytestmark = pytest.mark.multiprocess

NO_AUDITS = {"audit.rate": 0.0, "audit.screen": False}
GPT_TINY = GPTConfig(block_size=32, n_layer=3, n_head=2, n_embd=32)
SEED = 7


def reference_losses(steps: int, micro_batches: int = 4) -> list[float]:
    torch.set_num_threads(1)
    optim = OptimSettings(lr=3e-3, warmup_steps=2, total_steps=steps)
    return train_reference(GPT_TINY, optim, stdlib_corpus(262144), seed=SEED, steps=steps,
                           micro_batches=micro_batches, micro_batch_size=4).losses


def cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeguard.app.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_status_cli_and_health(testnet):
    net = testnet(tiny_run({"pipeline.stages": 2, "train.steps": 3, "model.n_layer": 2}))
    net.start_coordinator()
    a = net.start_node()
    b = net.start_node()
    standby = net.start_node()
    net.wait_finished(timeout=60)

    out = cli("status", "--coordinator", net.coordinator.address, "--json")
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout)
    assert status["phase"] == "RUN_PHASE_FINISHED"
    assert status["step"] == 3  # uint64 prints as a JSON number (pipeguard.app.status.to_json)
    roles = {n["node_id"]: n["role"] for n in status["nodes"]}
    assert roles == {a.node_id: "ROLE_STAGE", b.node_id: "ROLE_STAGE", standby.node_id: "ROLE_STANDBY"}
    assert [int(p["step"]) for p in status["losses"]] == [0, 1, 2]
    assert "[train]" in status["config_toml"]

    table = cli("status", "--coordinator", net.coordinator.address)
    assert table.returncode == 0, table.stderr
    assert f"[0] {a.node_id[:8]} ──▶ [1] {b.node_id[:8]}" in table.stdout
    assert "phase finished" in table.stdout and "standby" in table.stdout

    for daemon, service in [(net.coordinator, "pipeguard.v1.Coordinator"), (a, "pipeguard.v1.Node")]:
        with grpc.insecure_channel(daemon.address) as ch:
            reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            ask = reflection_pb2.ServerReflectionRequest(list_services="")  # server reflection, on both daemons
            listed = next(reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(iter([ask]), timeout=5))
            assert service in {s.name for s in listed.list_services_response.service}

    unreachable = cli("status", "--coordinator", "127.0.0.1:1", "--timeout", "2")
    assert unreachable.returncode == 1 and "UNAVAILABLE" in unreachable.stderr


def test_watch_streams_events_live(testnet):
    net = testnet(tiny_run({"pipeline.stages": 2, "train.steps": 30, "model.n_layer": 2}))
    net.start_coordinator()
    watcher = subprocess.Popen([sys.executable, "-m", "pipeguard.app.cli", "status", "--coordinator",
                                net.coordinator.address, "--watch", "--json"], stdout=subprocess.PIPE, text=True)
    try:
        net.start_node()
        net.start_node()
        kinds, steps = [], []
        for line in watcher.stdout:  # ends when the run finishes (we kill the watcher then)
            ev = json.loads(line)
            kinds.append(ev["kind"])
            if ev["kind"] == "step":
                steps.append(ev)
            if ev["kind"] == "finished":
                break
    finally:
        watcher.kill()
        watcher.wait()
    assert kinds.count("stage_assigned") == 2
    assert kinds.count("step") == 30
    assert kinds[-1] == "finished"
    # A script reads a step's figures from fields, not from the text (Event in pipeguard.proto).
    assert [e["step"] for e in steps] == list(range(30)) and all(e["type"] == "EVENT_KIND_STEP" for e in steps)
    for e in steps:
        assert all(isinstance(e[f], float) for f in ("loss", "tokens_per_s", "grad_norm", "lr")), e
        assert e["tokens_per_s"] > 0 and f"loss {e['loss']:.4f}" in e["message"], e


@pytest.mark.parametrize("attack,stage,start", [
    ("forward:reverse", 0, 2),
    ("forward:random", 1, 2),
    ("backward:noise", 2, 2),
])
def test_attacks_change_what_downstream_receives(testnet, attack, stage, start):
    """Honest before ``start``, poisoned after: the last stage's loss (computed from what it
    received) matches clean training exactly until then and departs from it afterwards."""
    steps = 5
    net = testnet(tiny_run(NO_AUDITS, {"pipeline.stages": 3, "train.steps": steps}))
    net.start_coordinator()
    for i in range(3):
        extra = ["--attack", attack, "--attack-rate", "1", "--attack-start", str(start)] if i == stage else []
        net.start_node(*extra)
        net.wait_registered(i + 1)
    losses = [p.loss for p in net.wait_finished(timeout=90).losses]
    clean = reference_losses(steps)
    # Before the attack starts the pipeline is honest and exact.
    torch.testing.assert_close(losses[:start], clean[:start], rtol=1e-5, atol=1e-6)
    # A forward attack poisons the very step it starts; a backward attack shows from the next one.
    first_hit = start if attack.startswith("forward") else start + 1
    for got, want in zip(losses[first_hit:], clean[first_hit:]):
        assert abs(got - want) > 1e-3, f"{attack} did not change the loss: {losses} vs clean {clean}"


def test_attack_plugin_is_loaded_and_used(testnet, tmp_path):
    plugin = tmp_path / "zero_attack.py"
    plugin.write_text(
        "from node.attacks import Behaviour\n"
        "class Zero(Behaviour):\n"
        "    def on_forward(self, ctx, activation):\n"
        "        return activation * 0\n"
    )
    net = testnet(tiny_run(NO_AUDITS, {"pipeline.stages": 2, "train.steps": 2, "model.n_layer": 2}))
    net.start_coordinator()
    net.start_node("--attack-plugin", f"{plugin}:Zero")
    net.wait_registered(1)
    net.start_node()
    losses = [p.loss for p in net.wait_finished(timeout=60).losses]
    # Stage 1 receives zeros: its blocks see constant input and at initialisation the loss is
    # exactly that of uniform logits, ln(256) = 5.5452; honest training starts elsewhere.
    assert abs(losses[0] - math.log(256)) < 1e-3, losses
    assert abs(reference_losses(1)[0] - math.log(256)) > 1e-3
    assert "MALICIOUS" in net.nodes[0].log_tail(200)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_coordinator_killed_mid_run_resumes_without_losing_a_step(testnet):
    steps = 150
    net = testnet(tiny_run({"pipeline.stages": 2, "train.steps": steps, "model.n_layer": 2}))
    port = free_port()
    net.start_coordinator("--bind", f"127.0.0.1:{port}")
    net.start_node()
    net.start_node()
    wait_for(lambda: net.status().step >= 10, 60, "10 steps")
    net.coordinator.kill()  # SIGKILL, possibly between two stages' updates
    net.start_coordinator("--bind", f"127.0.0.1:{port}", "--resume")
    status = net.wait_finished(timeout=120)

    assert [p.step for p in status.losses] == list(range(steps)), "every step recorded exactly once"
    kinds = [e.kind for e in status.events]
    assert "coordinator_started" in kinds and "commitment_mismatch" not in kinds
    # Nodes kept their state across the restart: the whole run equals clean training.
    torch.set_num_threads(1)
    optim = OptimSettings(lr=3e-3, warmup_steps=2, total_steps=steps)
    gpt = GPTConfig(block_size=32, n_layer=2, n_head=2, n_embd=32)
    ref = train_reference(gpt, optim, stdlib_corpus(262144), seed=SEED, steps=steps, micro_batches=4,
                          micro_batch_size=4)
    torch.testing.assert_close([p.loss for p in status.losses], ref.losses, rtol=1e-4, atol=1e-5)
