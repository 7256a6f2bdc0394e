"""Operating a run, multi-process: TLS end to end, operator orders, metrics, stop and resume,
SIGTERM of everything then --resume, export then sample."""

from __future__ import annotations

import enum
import json
import socket
import subprocess
import sys
import urllib.request

import grpc
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from pipeguard.app.testnet import LocalTestnet, TestnetError, wait_for
from pipeguard.data import stdlib_corpus
from pipeguard.model import GPT, GPTConfig, OptimSettings
from pipeguard.reference import train_reference
from pipeguard.v1 import pipeguard_pb2 as pb
from pipeguard.v1 import pipeguard_pb2_grpc as pb_grpc
from tests.conftest import tiny_run
from tests.pki import CA

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(180)]

SEED = 7
CHECKPOINTS = {"audit.rate": 0.0, "audit.screen": False, "audit.checkpoint_every": 5}
GPT2 = GPTConfig(block_size=32, n_layer=2, n_head=2, n_embd=32)


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeguard.app.cli", *args], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def reference_losses(steps: int) -> list[float]:
    torch.set_num_threads(1)
    optim = OptimSettings(lr=3e-3, warmup_steps=2, total_steps=steps)
    return train_reference(GPT2, optim, stdlib_corpus(262144), seed=SEED, steps=steps, micro_batches=4,
                           micro_batch_size=4).losses


def scrape(address: str) -> dict[str, float]:
    """name{label=value,...} -> value, from a /metrics endpoint."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def events_after(status: pb.StatusReply, kind: str, message_part: str) -> list[pb.Event]:
    """Events after the last one of ``kind`` whose message contains ``message_part``."""
    marks = [i for i, e in enumerate(status.events) if e.kind == kind and message_part in e.message]
    assert marks, f"no {kind} event with {message_part!r}"
    return list(status.events[marks[-1] + 1:])


def test_tls_testnet_trains_audits_exports_and_samples_and_refuses_plaintext(tmp_path):
    tls = CA().write(tmp_path / "pki", "daemon", mutual=True)
    tls_flags = ["--tls-ca", str(tls.ca), "--tls-cert", str(tls.cert), "--tls-key", str(tls.key)]
    run = tiny_run({"pipeline.stages": 2, "train.steps": 6, "model.n_layer": 2, "audit.rate": 0.25})
    with LocalTestnet(tmp_path / "net", run, tls=tls) as net:
        net.start_coordinator()
        for node in [net.start_node(wait=False) for _ in range(3)]:  # two stages and a standby
            node.wait_ready()
        status = net.wait_finished(timeout=120)
        assert [p.step for p in status.losses] == list(range(6))
        assert status.audits_total > 0 and sum(n.audits_passed for n in status.nodes) > 0
        assert not any(n.role == pb.ROLE_BANNED for n in status.nodes)
        assert "serving gRPC over TLS (client certificates required)" in net.coordinator.log_tail(400)

        with grpc.insecure_channel(net.coordinator.address) as ch:  # a plaintext client is refused
            with pytest.raises(grpc.RpcError) as err:
                pb_grpc.CoordinatorStub(ch).Status(pb.StatusRequest(), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        plain = cli("status", "--coordinator", net.coordinator.address, "--timeout", "5")
        assert plain.returncode == 1 and "UNAVAILABLE" in plain.stderr
        over_tls = cli("status", "--coordinator", net.coordinator.address, "--json", *tls_flags)
        assert over_tls.returncode == 0, over_tls.stderr
        assert json.loads(over_tls.stdout)["phase"] == "RUN_PHASE_FINISHED"

        model_file = tmp_path / "model.pt"
        out = cli("export", "--coordinator", net.coordinator.address, "--out", str(model_file), *tls_flags)
        assert out.returncode == 0, out.stderr
        served = net.export_state()

    saved = torch.load(model_file, weights_only=True)
    assert saved["config"] == {"block_size": 32, "vocab_size": 256, "n_layer": 2, "n_head": 2, "n_embd": 32,
                               "dropout": 0.0}
    assert saved["step"] == 6 and saved["run_id"] == status.run_id
    assert saved["state_dict"].keys() == served.keys()
    assert all(torch.equal(saved["state_dict"][k], served[k]) for k in served)
    GPT(GPTConfig(**saved["config"]), seed=0).load_state_dict(saved["state_dict"], strict=True)

    sample = cli("sample", "--model", str(model_file), "--prompt", "def ", "--tokens", "40", "--seed", "3")
    assert sample.returncode == 0, sample.stderr
    text = sample.stdout.rstrip("\n")
    assert text.startswith("def ") and 4 < len(text.encode()) <= 4 + 40 * 3  # replacement chars are 3 bytes


def test_manual_ban_hands_the_stage_to_the_standby_and_metrics_show_it(testnet):
    # The standby is there before the first step (min_nodes), and the run is long enough that the
    # ban (a CLI process, a second or two) lands long before the end even when steps are fast.
    steps = 200
    net = testnet(tiny_run(CHECKPOINTS, {"pipeline.stages": 2, "pipeline.min_nodes": 3, "train.steps": steps,
                                         "model.n_layer": 2}))
    net.start_coordinator("--metrics-port", str(free_port()))
    stage0 = net.start_node("--metrics-port", str(free_port()))
    net.wait_registered(1)
    stage1 = net.start_node()
    net.wait_registered(2)
    standby = net.start_node()
    net.wait_registered(3)
    wait_for(lambda: net.status().step >= 6, 60, "6 steps")

    token = ["--coordinator", net.coordinator.address, "--token-file", str(net.admin_token_file)]
    banned = cli("admin", "ban", stage1.node_id[:8], "--reason", "operator test", "--operator", "tester", *token)
    assert banned.returncode == 0, banned.stderr
    assert banned.stdout.strip() == f"banned node {stage1.node_id}"
    missing = cli("admin", "ban", standby.node_id[:8], "--coordinator", net.coordinator.address)
    assert missing.returncode == 2 and "--token-file" in missing.stderr
    wrong = net.workdir / "wrong.token"
    wrong.write_text("not-the-admin-token-at-all\n")
    refused = cli("admin", "ban", standby.node_id[:8], "--coordinator", net.coordinator.address,
                  "--token-file", str(wrong))
    assert refused.returncode == 1 and "UNAUTHENTICATED" in refused.stderr

    status = net.wait_finished(timeout=120)
    nodes = {n.node_id: n for n in status.nodes}
    assert nodes[stage1.node_id].role == pb.ROLE_BANNED
    assert nodes[stage1.node_id].ban_reason.startswith("manual: operator test (by tester from ")
    assert (nodes[standby.node_id].role, nodes[standby.node_id].stage) == (pb.ROLE_STAGE, 1)
    assert list(status.evidence) == [], "a manual ban writes no evidence bundle"
    after_ban = events_after(status, "banned", "manual: operator test")
    assert any(e.kind == "stage_assigned" and e.node_id == standby.node_id for e in after_ban)
    # The banned stage's work since the last checkpoint was rolled back and redone: every step
    # is in the history once, and the run equals clean training.
    assert [p.step for p in status.losses] == list(range(steps))
    torch.testing.assert_close([p.loss for p in status.losses], reference_losses(steps), rtol=1e-4, atol=1e-5)

    c = scrape(net.coordinator.info["metrics"])
    assert c["pipeguard_bans_total{cause=manual}"] == 1 and c["pipeguard_bans_total{cause=audit}"] == 0
    assert c["pipeguard_nodes{role=banned}"] == 1 and c["pipeguard_nodes{role=stage}"] == 2
    assert c["pipeguard_run_phase{phase=finished}"] == 1 and c["pipeguard_step"] == steps
    assert c["pipeguard_steps_total"] >= steps and c["pipeguard_loss"] == pytest.approx(status.losses[-1].loss)
    assert c["pipeguard_tokens_per_second"] > 0 and c["pipeguard_audit_rate"] == 0.0
    assert c["pipeguard_audits_total{result=passed}"] == 0 and c["pipeguard_audits_dispatched_total"] == 0
    n = scrape(stage0.info["metrics"])
    assert n["pipeguard_node_tensors_sent_total"] >= steps * 4 and n["pipeguard_node_bytes_sent_total"] > 0
    assert n["pipeguard_node_tensors_received_total"] >= steps * 4  # gradients from stage 1
    assert n["pipeguard_node_step_compute_seconds_count"] >= steps
    assert n["pipeguard_node_step_compute_seconds_sum"] > 0
    assert n["pipeguard_node_stage"] == 0 and n["pipeguard_node_audits_performed_total"] == 0
    assert n["pipeguard_node_audit_state_bytes_fetched_total"] == 0
    # Tensors the banned node pushed after its ban were refused: counted by reason.
    rejected = {k: v for k, v in n.items() if k.startswith("pipeguard_node_tensors_rejected_total")}
    assert all(v >= 0 for v in rejected.values())


def test_stop_then_resume_continues_from_the_stop_and_refuses_a_reused_state_dir(testnet):
    steps = 40
    net = testnet(tiny_run(CHECKPOINTS, {"pipeline.stages": 2, "train.steps": steps, "model.n_layer": 2}))
    port = free_port()
    net.start_coordinator("--bind", f"127.0.0.1:{port}")
    net.start_node()
    net.wait_registered(1)
    net.start_node()
    wait_for(lambda: net.status().step >= 6, 60, "6 steps")
    metadata = (("authorization", "Bearer " + net.admin_token_file.read_text().strip()),)
    with net.channel() as ch:  # straight from here: the stop lands long before the last step
        stop = pb_grpc.CoordinatorStub(ch).StopRun(pb.StopRunRequest(operator="test"), timeout=60,
                                                   metadata=metadata)
    at = stop.step
    assert stop.phase == pb.RUN_PHASE_STOPPED and 6 <= at < steps
    assert f"run stopped at step {at}, checkpoint at step {at}" in stop.detail
    assert (net.workdir / "coordinator" / "state" / "checkpoints" / f"step-{at:08d}").is_dir()
    stopped = net.status()
    assert (stopped.phase, stopped.step) == (pb.RUN_PHASE_STOPPED, at)
    assert [e.kind for e in stopped.events if e.kind in ("step", "stopped")][-1] == "stopped"
    token = ["--coordinator", net.coordinator.address, "--token-file", str(net.admin_token_file)]
    again = cli("admin", "stop", *token)
    assert again.returncode == 1 and "already stopped" in again.stderr
    rate = cli("admin", "audit-rate", "0.02", *token)
    assert rate.returncode == 0 and "0 -> 0.02" in rate.stdout, rate.stderr
    net.coordinator.stop()
    assert net.coordinator.proc.returncode == 0

    # A state dir that holds a run is not reused by accident...
    with pytest.raises(TestnetError, match="pass --resume to continue it, or pick another --state-dir"):
        net.start_coordinator("--bind", f"127.0.0.1:{port}", timeout=60)
    # ... and --resume picks up at the stop, the nodes still holding their stages.
    net.start_coordinator("--bind", f"127.0.0.1:{port}", "--resume")
    status = net.wait_finished(timeout=120)
    resumed = events_after(status, "coordinator_started", "resumed")
    assert [e.message for e in resumed if e.kind == "training"][0].startswith(f"training from step {at} ")
    assert "rolled_back" not in [e.kind for e in resumed]
    assert [p.step for p in status.losses] == list(range(steps))
    assert status.audit_rate == 0.02, "the operator's audit rate survives the restart"
    torch.testing.assert_close([p.loss for p in status.losses], reference_losses(steps), rtol=1e-4, atol=1e-5)


class Order(enum.Enum):
    """Which daemons get SIGTERM first."""

    COORDINATOR_FIRST = "coordinator-first"
    NODES_FIRST = "nodes-first"


@pytest.mark.parametrize("order", list(Order), ids=lambda o: o.value)
def test_sigterm_everything_then_resume_loses_at_most_the_steps_since_the_last_checkpoint(testnet, order):
    steps = 30
    net = testnet(tiny_run(CHECKPOINTS, {"pipeline.stages": 2, "train.steps": steps, "model.n_layer": 2}))
    port = free_port()
    net.start_coordinator("--bind", f"127.0.0.1:{port}")
    nodes = [net.start_node(), net.start_node()]
    wait_for(lambda: net.status().step >= 12, 90, "12 steps")

    first, second = ([net.coordinator], nodes) if order is Order.COORDINATOR_FIRST else (nodes, [net.coordinator])
    for d in [*first, *second]:
        d.stop()
        assert d.proc.returncode == 0, f"{d.name} did not shut down cleanly:\n{d.log_tail()}"
    state_dir = net.workdir / "coordinator" / "state"
    at_stop = json.loads((state_dir / "state.json").read_text())["step"]
    kept = sorted(int(p.name.split("-")[1]) for p in (state_dir / "checkpoints").glob("step-*")
                  if p.suffix != ".tmp")
    if order is Order.COORDINATOR_FIRST:
        assert kept[-1] == at_stop, "with the stages still up, the coordinator checkpoints on its way out"

    net.start_coordinator("--bind", f"127.0.0.1:{port}", "--resume")
    for node in nodes:  # the same homes: same keys, no stage state
        node.start()
        node.wait_ready()
    status = net.wait_finished(timeout=120)

    resumed = events_after(status, "coordinator_started", "resumed")
    start = int([e.message for e in resumed if e.kind == "training"][0].split()[3])
    assert start == kept[-1] >= at_stop - 5, "at most the steps since the last checkpoint are lost"
    assert [p.step for p in status.losses] == list(range(steps)), "every step recorded once"
    torch.testing.assert_close([p.loss for p in status.losses], reference_losses(steps), rtol=1e-4, atol=1e-5)
    assert all("loaded checkpoint for stage" in n.log_tail(400) for n in nodes)

