"""Shared fixtures: a reaper for stray daemons and a factory for local testnets."""

from __future__ import annotations

import pytest

from coordinator.config import CoordinatorConfig
from pipeguard.app.runconfig import run_config
from pipeguard.app.testnet import STARTED, LocalTestnet

TINY = {
    "model.preset": "tiny", "model.n_layer": 3, "model.n_embd": 32, "model.n_head": 2, "model.block_size": 32,
    "train.steps": 4, "train.micro_batches": 4, "train.micro_batch_size": 4, "train.seed": 7, "train.warmup_steps": 2,
    "pipeline.stages": 3,
    "data.max_bytes": 262144,
    "timeouts.heartbeat_interval": 0.2, "timeouts.heartbeat_timeout": 3.0, "timeouts.step": 60.0,
}
"""The tests' run: the tiny model, 3 blocks over 3 stages, 4 steps of 4 micro-batches, fast heartbeats."""


def tiny_run(*layers: dict, **overrides) -> CoordinatorConfig:
    """``TINY`` with dotted keys changed, e.g. ``tiny_run({"pipeline.stages": 2, "audit.rate": 0.0})``."""
    return run_config(TINY, *layers, **overrides)


@pytest.fixture
def testnet(tmp_path):
    """A function building LocalTestnets under tmp_path; every daemon is killed afterwards."""
    nets: list[LocalTestnet] = []

    def make(run: CoordinatorConfig) -> LocalTestnet:
        net = LocalTestnet(tmp_path / f"net{len(nets)}", run)
        nets.append(net)
        return net

    yield make
    for net in nets:
        net.stop()
        net.kill()


@pytest.fixture(scope="session", autouse=True)
def reap_children():
    """Kill any daemon process group a failed test left behind."""
    yield
    for daemon in list(STARTED):
        daemon.kill()
