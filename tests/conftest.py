"""Shared fixtures: a reaper for stray daemons and a factory for local testnets."""

from __future__ import annotations

import pytest

from pipeguard.app.testnet import STARTED, LocalTestnet

TINY_RUN = """
[model]
preset = "tiny"
n_layer = {n_layer}
n_embd = 32
n_head = 2
block_size = 32

[train]
steps = {steps}
micro_batches = {micro_batches}
micro_batch_size = 4
seed = {seed}
warmup_steps = 2

[pipeline]
stages = {stages}

[data]
max_bytes = 262144

[timeouts]
heartbeat_interval = 0.2
heartbeat_timeout = 3.0
step = 60.0
"""


def tiny_run_toml(*, stages: int = 3, steps: int = 4, micro_batches: int = 4, seed: int = 7, n_layer: int = 3,
                  extra: str = "") -> str:
    return TINY_RUN.format(stages=stages, steps=steps, micro_batches=micro_batches, seed=seed,
                           n_layer=n_layer) + extra


@pytest.fixture
def testnet(tmp_path):
    """A function building LocalTestnets under tmp_path; every daemon is killed afterwards."""
    nets: list[LocalTestnet] = []

    def make(toml: str) -> LocalTestnet:
        net = LocalTestnet(tmp_path / f"net{len(nets)}", toml)
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
