"""Separate hosts: the coordinator and every node in its own network namespace.

Each daemon runs under ``ip netns exec`` in a namespace of its own, with one interface and one
address in a private /24 that exists only inside this test: veth pairs join the namespaces to
a Linux bridge, which also holds one address of the /24 so that this process can ask the
coordinator for its status. No daemon is reached over loopback. Nodes bind 0.0.0.0 and advertise
their namespace's address, so the run only works if the coordinator hands out the advertised
addresses (a node's own bound address would be unreachable from the others).

One run trains end to end; mid-run the link of the node serving stage 1 is cut (its bridge
port goes down: no RST, no FIN, packets just vanish), and the run must recover as from a
crash: the node is marked offline, the standby takes its stage from a verified checkpoint,
nobody is banned, and the run finishes with exactly the losses of clean training.

Needs root and ``ip netns``; skipped with the reason otherwise. The namespaces, the bridge and
the iptables rule are removed by the fixture's finalizer whatever happens.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from pipeguard.app.runconfig import node_config, to_toml
from pipeguard.app.testnet import Daemon, wait_for
from pipeguard.v1 import pipeguard_pb2 as pb
from tests.conftest import tiny_run
from tests.test_audits import clean_losses

pytestmark = pytest.mark.multiprocess

COORDINATOR_PORT = 7000
NODE_PORT = 7001
CMD_TIMEOUT_S = 20

# Short timeouts, so that a cut link costs seconds: the coordinator's RunStep deadline ends the
# step that was in flight, and the node is declared offline after heartbeat_timeout.
TIMEOUTS = {"connect": 5.0, "request": 5.0, "step": 15.0, "heartbeat_interval": 0.2, "heartbeat_timeout": 3.0}
NODE_TOML = to_toml(node_config({f"timeouts.{k}": v for k, v in TIMEOUTS.items()}))
COORDINATOR_ENV = {"PIPEGUARD_TIMEOUTS_STEP": str(TIMEOUTS["step"]),
                   "PIPEGUARD_TIMEOUTS_REQUEST": str(TIMEOUTS["request"]),
                   "PIPEGUARD_TIMEOUTS_CONNECT": str(TIMEOUTS["connect"])}


def run(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=CMD_TIMEOUT_S, check=check)


def why_no_netns() -> str | None:
    """None when this process may create namespaces, veths and bridges; else the reason."""
    if sys.platform != "linux":
        return "network namespaces are Linux-only"
    if os.geteuid() != 0:
        return "needs root to create network namespaces (ip netns add)"
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is not installed"
    probe = f"pgprobe{uuid.uuid4().hex[:6]}"
    try:
        made = run("ip", "netns", "add", probe, check=False)
        if made.returncode != 0:
            return f"ip netns add fails here: {made.stderr.strip()}"
        veth = run("ip", "link", "add", f"{probe}a", "type", "veth", "peer", "name", f"{probe}b", check=False)
        if veth.returncode != 0:
            return f"cannot create veth pairs: {veth.stderr.strip()}"
        bridge = run("ip", "link", "add", f"{probe}c", "type", "bridge", check=False)
        if bridge.returncode != 0:
            return f"cannot create a bridge: {bridge.stderr.strip()}"
    finally:
        run("ip", "link", "del", f"{probe}a", check=False)
        run("ip", "link", "del", f"{probe}c", check=False)
        run("ip", "netns", "del", probe, check=False)
    return None


def free_subnet() -> str:
    """A 10.x.y.0/24 prefix ("10.x.y") that no interface or route of this machine uses."""
    taken = run("ip", "-4", "route", "show").stdout + run("ip", "-4", "addr", "show").stdout
    for y in range(200, 250):
        prefix = f"10.231.{y}"
        if f"{prefix}." not in taken:
            return prefix
    raise RuntimeError("no free 10.231.y.0/24 subnet for the test network")


@dataclass
class Host:
    name: str
    netns: str
    address: str
    port_if: str
    """This host's port on the bridge (the root-namespace end of its veth pair)."""


@dataclass
class Lan:
    """Namespaces joined by one bridge; ``teardown`` undoes everything ``add`` did."""

    tag: str
    prefix: str
    bridge: str = ""
    hosts: dict[str, Host] = field(default_factory=dict)
    undo: list[tuple[str, ...]] = field(default_factory=list)

    def setup(self) -> None:
        self.bridge = f"{self.tag}br"
        self._do(("ip", "link", "add", self.bridge, "type", "bridge"), ("ip", "link", "del", self.bridge))
        run("ip", "addr", "add", f"{self.prefix}.254/24", "dev", self.bridge)
        run("ip", "link", "set", self.bridge, "up")
        # A Docker engine sets the FORWARD policy to DROP, and with br_netfilter loaded that drops
        # frames crossing a bridge too. Let this bridge's own traffic through while the test runs.
        if shutil.which("iptables"):
            rule = ("FORWARD", "-i", self.bridge, "-o", self.bridge, "-j", "ACCEPT")
            self._do(("iptables", "-I", *rule), ("iptables", "-D", *rule))

    def add(self, name: str, index: int) -> Host:
        netns, port_if, inner = f"{self.tag}{name}", f"{self.tag}{name}", f"{self.tag}{name}i"
        address = f"{self.prefix}.{index}"
        self._do(("ip", "netns", "add", netns), ("ip", "netns", "del", netns))
        # Deleting the root-namespace end deletes the pair, wherever the other end is.
        self._do(("ip", "link", "add", port_if, "type", "veth", "peer", "name", inner), ("ip", "link", "del", port_if))
        run("ip", "link", "set", port_if, "master", self.bridge)
        run("ip", "link", "set", port_if, "up")
        run("ip", "link", "set", inner, "netns", netns)
        ns = ("ip", "netns", "exec", netns)
        run(*ns, "ip", "link", "set", inner, "name", "eth0")
        run(*ns, "ip", "addr", "add", f"{address}/24", "dev", "eth0")
        run(*ns, "ip", "link", "set", "eth0", "up")
        run(*ns, "ip", "link", "set", "lo", "up")
        host = Host(name, netns, address, port_if)
        self.hosts[name] = host
        return host

    def cut(self, name: str) -> None:
        """Take the host's bridge port down: its packets are dropped without a word."""
        run("ip", "link", "set", self.hosts[name].port_if, "down")

    def _do(self, argv: tuple[str, ...], undo: tuple[str, ...]) -> None:
        run(*argv)
        self.undo.append(undo)

    def teardown(self) -> list[str]:
        problems = []
        for argv in reversed(self.undo):
            try:
                done = run(*argv, check=False)
                if done.returncode != 0 and "Cannot find device" not in done.stderr:
                    problems.append(f"{' '.join(argv)}: {done.stderr.strip()}")
            except subprocess.TimeoutExpired:
                problems.append(f"{' '.join(argv)}: timed out")
        self.undo.clear()
        return problems


@pytest.fixture
def lan():
    reason = why_no_netns()
    if reason:
        pytest.skip(reason)
    net = Lan(tag=f"pg{uuid.uuid4().hex[:5]}", prefix=free_subnet())
    try:
        net.setup()
        yield net
    finally:
        problems = net.teardown()
        assert not problems, f"cleaning up the test network: {problems}"


def start_in(host: Host, name: str, argv: list[str], workdir: Path, env: dict[str, str] | None = None) -> Daemon:
    """Start ``python argv...`` inside the host's namespace; it tells its address in a ready file."""
    d = workdir / name
    return Daemon(name, ["ip", "netns", "exec", host.netns, sys.executable, *argv, "--ready-file", str(d / "ready.json")],
                  ready_file=d / "ready.json", log_path=d / "daemon.log", env=env or {}).start()


@pytest.mark.timeout(180)
def test_separate_hosts_train_and_recover_from_a_cut_link(lan, testnet, tmp_path):
    steps = 40  # the cut after step 7 lands mid-run with room to spare
    # testnet() kills the daemons before lan's finalizer removes their namespaces.
    # min_nodes: the standby is registered before the first step, however slowly its process starts.
    net = testnet(tiny_run({"pipeline.stages": 3, "pipeline.min_nodes": 4, "train.steps": steps, "audit.rate": 0.0,
                            "audit.screen": False, "audit.checkpoint_every": 5}))
    (tmp_path / "node.toml").write_text(NODE_TOML)

    coord_host = lan.add("coord", 1)
    coord_addr = f"{coord_host.address}:{COORDINATOR_PORT}"
    net.coordinator = start_in(coord_host, "coordinator", [
        "-m", "coordinator.daemon", "--config", str(net.config_path), "--bind", coord_addr, "--advertise", coord_addr,
        "--state-dir", str(tmp_path / "coordinator" / "state")], tmp_path, COORDINATOR_ENV)
    key = net.coordinator.wait_ready(60)["public_key"]

    hosts: list[Host] = []
    for i in range(4):  # nodes 0..2 serve stages 0..2 in registration order; node 3 stands by
        host = lan.add(f"n{i}", 10 + i)
        hosts.append(host)
        net.nodes.append(start_in(host, f"node{i}", [
            "-m", "node.daemon", "--config", str(tmp_path / "node.toml"), "--coordinator", coord_addr,
            "--coordinator-key", key, "--bind", f"0.0.0.0:{NODE_PORT}", "--advertise", f"{host.address}:{NODE_PORT}",
            "--home", str(tmp_path / f"node{i}" / "home")], tmp_path))
        net.nodes[i].wait_ready(60)
        net.wait_registered(i + 1)

    wait_for(lambda: net.status().step >= 7, 90, "7 steps")
    s = net.status()
    advertised = {node.node_id: f"{host.address}:{NODE_PORT}" for host, node in zip(hosts, net.nodes)}
    assert {n.node_id: n.address for n in s.nodes} == advertised, "the coordinator knows nodes by advertised address"
    assert {n.stage: n.node_id for n in s.nodes if n.role == pb.ROLE_STAGE} == {i: net.nodes[i].node_id for i in range(3)}

    victim, standby = net.nodes[1], net.nodes[3]
    lan.cut(hosts[1].name)
    assert net.status().phase == pb.RUN_PHASE_TRAINING, "the link was cut mid-run"

    s = net.wait_finished(timeout=120)
    events = "\n".join(f"  {e.kind}: {e.message}" for e in s.events)
    assert not [n for n in s.nodes if n.role == pb.ROLE_BANNED], f"a cut link is not misbehaviour:\n{events}"
    assert any(e.kind == "node_offline" and e.node_id == victim.node_id for e in s.events), events
    holder = {n.stage: n.node_id for n in s.nodes if n.role == pb.ROLE_STAGE}
    assert holder[1] == standby.node_id, f"the standby took stage 1:\n{events}"
    assert victim.alive(), "the cut node is still running: only its link failed"
    # Rolled back to a verified checkpoint and re-ran: identical to clean single-process training.
    assert [p.step for p in s.losses] == list(range(steps))
    torch.testing.assert_close([p.loss for p in s.losses], clean_losses(steps), rtol=1e-5, atol=1e-6)
