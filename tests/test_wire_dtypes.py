"""A compressed wire between real daemons: the pipeline equals single-process training with the
same compression at its stage boundaries, exact audits of an honest int8 run pass, and an
attacker who poisons what it sends under int8 is caught and its evidence verifies."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeguard.data import stdlib_corpus
from pipeguard.evidence import verify_bundle
from pipeguard.model import GPTConfig, OptimSettings
from pipeguard.reference import train_reference
from pipeguard.v1 import pipeguard_pb2 as pb
from tests.conftest import tiny_run
from tests.test_audits import banned, start

pytestmark = pytest.mark.multiprocess

SEED = 7
GPT = GPTConfig(block_size=32, n_layer=3, n_head=2, n_embd=32)


def staged_reference(steps: int, wire_dtype: str):
    torch.set_num_threads(1)
    optim = OptimSettings(lr=3e-3, warmup_steps=2, total_steps=steps)
    return train_reference(GPT, optim, stdlib_corpus(262144), seed=SEED, steps=steps, micro_batches=4,
                           micro_batch_size=4, wire_dtype=wire_dtype, num_stages=3)


@pytest.mark.timeout(150)
def test_int8_pipeline_matches_single_process_training_with_the_same_compression(testnet):
    steps = 5
    net = testnet(tiny_run({"pipeline.stages": 3, "train.steps": steps, "train.micro_batches": 4,
                            "train.seed": SEED, "model.n_layer": 3, "train.wire_dtype": "int8"}))
    net.start_coordinator()
    for _ in range(3):
        net.start_node()
    status = net.wait_finished(timeout=120)
    state = net.export_state()

    ref = staged_reference(steps, "int8")
    fp32 = staged_reference(steps, "fp32")
    losses = [p.loss for p in status.losses]
    torch.testing.assert_close(losses, ref.losses, rtol=1e-5, atol=1e-6)
    assert set(state) == set(ref.state_dict)
    for name, expected in ref.state_dict.items():
        torch.testing.assert_close(state[name], expected, rtol=1e-5, atol=1e-6, msg=f"parameter {name}")
    assert losses != fp32.losses, "the compression really applied: int8 training is not fp32 training"
    assert losses[-1] < losses[0]


@pytest.mark.timeout(180)
def test_honest_int8_run_with_every_message_audited_exactly_bans_nobody(testnet):
    steps = 6
    net = testnet(tiny_run({"pipeline.stages": 3, "pipeline.min_nodes": 4, "train.steps": steps, "audit.rate": 1.0,
                            "audit.tolerance": 0.0, "audit.retention": 4, "train.wire_dtype": "int8"}))
    start(net, {}, count=4)
    status = net.wait_finished(timeout=170)
    assert banned(status) == set()
    assert status.detections == 0
    assert status.audits_total >= steps * 3
    assert sum(n.audits_passed for n in status.nodes) > 0
    torch.testing.assert_close([p.loss for p in status.losses], staged_reference(steps, "int8").losses,
                               rtol=1e-5, atol=1e-6)


@pytest.mark.timeout(150)
def test_forward_reverse_under_int8_is_caught_and_its_evidence_verifies(testnet):
    net = testnet(tiny_run({"pipeline.stages": 3, "pipeline.min_nodes": 4, "train.steps": 8, "audit.rate": 0.2,
                            "audit.checkpoint_every": 5, "audit.retention": 4, "train.wire_dtype": "int8"}))
    start(net, {1: ["--attack", "forward:reverse", "--attack-rate", "1"]}, count=4)
    attacker = net.nodes[1].node_id
    status = net.wait_finished(timeout=130)
    assert banned(status) == {attacker}
    assert status.detections >= 1
    holder = {n.stage: n.node_id for n in status.nodes if n.role == pb.ROLE_STAGE}
    assert holder[1] == net.nodes[3].node_id, "the standby took over"
    assert status.evidence
    for path in status.evidence:  # the bundles hold the int8 payloads as signed
        result = verify_bundle(Path(path))
        assert result.valid, result.summary
        assert result.accused == attacker
