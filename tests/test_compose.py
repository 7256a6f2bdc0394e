"""The docker compose testnet, end to end: build the image, bring compose.yaml up, watch it work.

Opt-in: it builds an image and runs six containers for a few minutes, so it runs only with
PIPEGUARD_DOCKER_TESTS=1 and a reachable Docker engine (``docker info`` succeeds), and is
skipped with the reason otherwise. On a machine without Docker Hub, prepare one first:

    tests/docker/prepare-engine.sh            # engine + a debootstrapped Debian base image
    PIPEGUARD_DOCKER_TESTS=1 .venv/bin/python -m pytest tests/test_compose.py

Build arguments come from the environment as for ``docker compose build``:
PIPEGUARD_BASE_IMAGE (default: pipeguard-base:bookworm when that image exists, else the
Dockerfile's python:3.11-slim) and PIPEGUARD_EXTRA_CA_CERT (default: the machine's own extra
CA certificates in /usr/local/share/ca-certificates, so pip inside the build trusts what the
host trusts behind a TLS-intercepting proxy).

The test runs a short run (PIPEGUARD_TRAIN_STEPS=60) under its own compose project name and a
free published port, waits until the malicious node2 is banned and the run trains past the ban
with node5 on its stage, checks `pipeguard status` both from the host and inside the
coordinator container, and always ends with `down -v`.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from pipeguard.app.testnet import wait_for

ROOT = Path(__file__).resolve().parents[1]
STEPS = 60
BUILD_TIMEOUT_S = 1800
UP_TIMEOUT_S = 300
BAN_TIMEOUT_S = 300

pytestmark = [pytest.mark.multiprocess, pytest.mark.skipif(os.environ.get("PIPEGUARD_DOCKER_TESTS") != "1",
                                reason="docker compose testnet test is opt-in: set PIPEGUARD_DOCKER_TESTS=1 "
                                       "(and start an engine, e.g. tests/docker/prepare-engine.sh)")]


def compose_command() -> list[str] | None:
    if shutil.which("docker") is None:
        return None
    if subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30).returncode == 0:
        return ["docker", "compose"]
    return ["docker-compose"] if shutil.which("docker-compose") else None


def why_no_docker() -> str | None:
    if shutil.which("docker") is None:
        return "the docker CLI is not installed (tests/docker/prepare-engine.sh installs one)"
    try:
        info = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "docker info timed out: the engine is not answering"
    if info.returncode != 0:
        return f"no Docker engine reachable (docker info: {info.stderr.strip()[-200:]}); " \
               "tests/docker/prepare-engine.sh starts one"
    if compose_command() is None:
        return "neither `docker compose` nor docker-compose is installed"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_env(project: str, port: int) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("PIPEGUARD_IMAGE", "pipeguard:compose-test")
    if "PIPEGUARD_BASE_IMAGE" not in env:
        local_base = subprocess.run(["docker", "image", "inspect", "pipeguard-base:bookworm"], capture_output=True,
                                    timeout=30).returncode == 0
        if local_base:
            env["PIPEGUARD_BASE_IMAGE"] = "pipeguard-base:bookworm"
    if "PIPEGUARD_EXTRA_CA_CERT" not in env:
        certs = sorted(glob.glob("/usr/local/share/ca-certificates/**/*.crt", recursive=True))
        env["PIPEGUARD_EXTRA_CA_CERT"] = "".join(Path(c).read_text() for c in certs)
    env.update(COMPOSE_PROJECT_NAME=project, PIPEGUARD_COORDINATOR_PORT=str(port), PIPEGUARD_TRAIN_STEPS=str(STEPS),
               PIPEGUARD_AUDIT_RATE="0.1", PIPEGUARD_AUDIT_CHECKPOINT_EVERY="5")
    return env


class Testnet:
    __test__ = False

    def __init__(self, compose: list[str], project: str, port: int):
        self.compose = [*compose, "-f", str(ROOT / "compose.yaml"), "-p", project]
        self.port = port
        self.env = build_env(project, port)

    def run(self, *args: str, timeout: float, check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run([*self.compose, *args], cwd=ROOT, env=self.env, capture_output=True, text=True,
                              timeout=timeout)
        if check and done.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n"
                                 f"{done.stderr[-3000:]}")
        return done

    def status(self) -> dict | None:
        done = subprocess.run([sys.executable, "-m", "pipeguard.app.cli", "status", "--json", "--history", "1000",
                               "--coordinator", f"127.0.0.1:{self.port}", "--timeout", "5"],
                              capture_output=True, text=True, timeout=30)
        return json.loads(done.stdout) if done.returncode == 0 else None

    def logs(self) -> str:
        try:
            return self.run("logs", "--no-color", "--tail", "40", timeout=60, check=False).stdout
        except subprocess.TimeoutExpired:
            return "(docker compose logs timed out)"


@pytest.fixture
def compose_testnet():
    reason = why_no_docker()
    if reason:
        pytest.skip(reason)
    net = Testnet(compose_command(), f"pgtest{uuid.uuid4().hex[:8]}", free_port())
    try:
        yield net
    finally:
        print(net.logs())  # captured: shown when the test fails
        net.run("down", "-v", "--remove-orphans", "--timeout", "10", timeout=180, check=False)


def by_service(status: dict) -> dict[str, dict]:
    """Nodes keyed by the service name they advertise (node1..node5)."""
    return {n["address"].split(":")[0]: n for n in status["nodes"]}


@pytest.mark.timeout(BUILD_TIMEOUT_S + UP_TIMEOUT_S + BAN_TIMEOUT_S + 300)
def test_compose_testnet_bans_the_malicious_node_and_trains_on(compose_testnet):
    net = compose_testnet
    t0 = time.monotonic()
    net.run("build", "coordinator", timeout=BUILD_TIMEOUT_S)
    built = time.monotonic()
    net.run("up", "-d", timeout=UP_TIMEOUT_S)
    up = time.monotonic()

    def banned_and_past_it():
        """The status once node2 is banned and later steps have run, or a failed run's status."""
        s = net.status()
        if s is None or s["phase"] == "RUN_PHASE_FAILED":
            return s
        bans = [int(e["seq"]) for e in s["events"] if e["kind"] == "banned"]
        later_steps = [e for e in s["events"] if e["kind"] == "step" and bans and int(e["seq"]) > bans[0]]
        return s if len(later_steps) >= 3 or (bans and s["phase"] == "RUN_PHASE_FINISHED") else None

    s = wait_for(banned_and_past_it, BAN_TIMEOUT_S, "node2 to be banned and the run to train past the ban", 2.0)
    banned_at = time.monotonic()
    events = "\n".join(f"  {e['kind']}: {e['message']}" for e in s["events"])
    assert s["phase"] != "RUN_PHASE_FAILED", f"run failed:\n{events}"
    nodes = by_service(s)
    assert sorted(nodes) == ["node1", "node2", "node3", "node4", "node5"], nodes
    assert {name for name, n in nodes.items() if n["role"] == "ROLE_BANNED"} == {"node2"}, events
    assert nodes["node2"]["ban_reason"], "a ban carries its reason"
    assert nodes["node5"]["role"] == "ROLE_STAGE" and nodes["node5"]["stage"] == 1, f"node5 took stage 1:\n{events}"
    assert s["evidence"], "the ban left an evidence bundle"

    inside = net.run("exec", "-T", "coordinator", "pipeguard", "status", timeout=60)
    assert nodes["node2"]["node_id"][:8] in inside.stdout, inside.stdout
    assert "banned" in inside.stdout.lower(), inside.stdout
    print(f"\ncompose testnet: build {built - t0:.0f}s, up {up - built:.0f}s, "
          f"ban and {int(s['step'])} steps {banned_at - up:.0f}s\n{inside.stdout}")
