"""Local processes for a whole run on one machine: used by ``pipeguard testnet`` and the tests.

Every daemon is a real subprocess on loopback with port 0; its bound address is learned from
its ready file, and every wait polls a condition against a deadline. With ``tls`` every daemon
serves and calls over TLS, and so do the helpers that talk to the coordinator.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import grpc

from coordinator.config import CoordinatorConfig
from pipeguard.app.runconfig import to_toml
from pipeguard.config import NetConfig
from pipeguard.rpc import blocking_channel
from pipeguard.v1 import pipeguard_pb2 as pb
from pipeguard.v1 import pipeguard_pb2_grpc as pb_grpc


class TestnetError(RuntimeError):
    """A daemon failed to start or a wait ran out."""

    __test__ = False  # not a pytest test class


def wait_for(condition: Callable[[], object], timeout: float, what: str, interval: float = 0.05):
    """Poll ``condition`` until it returns something truthy, or raise after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TestnetError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


STARTED: "weakref.WeakSet[Daemon]" = weakref.WeakSet()
"""Every daemon started in this process, so a test session can reap what a failure left."""


@dataclass(eq=False)
class Daemon:
    name: str
    argv: list[str]
    ready_file: Path
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen | None = None
    info: dict = field(default_factory=dict)

    def start(self) -> "Daemon":
        self.ready_file.unlink(missing_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env={**os.environ, **self.env}, start_new_session=True)
        log.close()
        STARTED.add(self)
        return self

    def wait_ready(self, timeout: float = 60.0) -> dict:
        def ready():
            if self.proc is not None and self.proc.poll() is not None:
                raise TestnetError(f"{self.name} exited with code {self.proc.returncode}; log:\n{self.log_tail()}")
            if self.ready_file.exists():
                return json.loads(self.ready_file.read_text())
            return None

        self.info = wait_for(ready, timeout, f"{self.name} to start")
        return self.info

    @property
    def address(self) -> str:
        return self.info["address"]

    @property
    def node_id(self) -> str:
        return self.info["node_id"]

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def terminate(self) -> None:
        """Ask it to shut down (SIGTERM) without waiting."""
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 10.0) -> None:
        if not self.alive():
            return
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


@dataclass
class TlsFiles:
    """PEM files every daemon of a testnet uses: one CA, one certificate valid for 127.0.0.1."""

    ca: Path
    cert: Path
    key: Path
    mutual: bool = True
    """Servers require client certificates (signed by ``ca``)."""

    def daemon_args(self) -> list[str]:
        args = ["--tls-ca", str(self.ca), "--tls-cert", str(self.cert), "--tls-key", str(self.key)]
        return args + (["--tls-require-client-cert"] if self.mutual else [])

    def client_net(self, **overrides) -> NetConfig:
        return NetConfig(tls_ca=str(self.ca), tls_cert=str(self.cert), tls_key=str(self.key), **overrides)


class LocalTestnet:
    """A coordinator and nodes as local processes under ``workdir``."""

    def __init__(self, workdir: Path, run: CoordinatorConfig | None = None, python: str = sys.executable,
                 tls: TlsFiles | None = None):
        """``run``: the coordinator's run config (``pipeguard.app.runconfig``; None: the defaults)."""
        self.tls = tls
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.python = python
        self.config_path = self.workdir / "run.toml"
        self.config_path.write_text(to_toml(run or CoordinatorConfig()))
        self.coordinator: Daemon | None = None
        self.nodes: list[Daemon] = []

    def start_coordinator(self, *extra: str, timeout: float = 60.0, env: dict[str, str] | None = None) -> Daemon:
        d = self.workdir / "coordinator"
        self.coordinator = Daemon(
            "coordinator",
            [self.python, "-m", "coordinator.daemon", "--config", str(self.config_path), "--bind", "127.0.0.1:0",
             "--state-dir", str(d / "state"), "--ready-file", str(d / "ready.json"), *self._tls_args(), *extra],
            ready_file=d / "ready.json", log_path=d / "coordinator.log", env=env or {},
        ).start()
        self.coordinator.wait_ready(timeout)
        return self.coordinator

    def start_node(self, *extra: str, name: str | None = None, wait: bool = True, timeout: float = 60.0,
                   env: dict[str, str] | None = None) -> Daemon:
        assert self.coordinator is not None, "start the coordinator first"
        name = name or f"node{len(self.nodes)}"
        d = self.workdir / name
        node = Daemon(
            name,
            [self.python, "-m", "node.daemon", "--coordinator", self.coordinator.address, "--bind", "127.0.0.1:0",
             "--coordinator-key", self.coordinator.info["public_key"], "--home", str(d / "home"),
             "--ready-file", str(d / "ready.json"), *self._tls_args(), *extra],
            ready_file=d / "ready.json", log_path=d / "node.log", env=env or {},
        ).start()
        self.nodes.append(node)
        if wait:
            node.wait_ready(timeout)
        return node

    def _tls_args(self) -> list[str]:
        return self.tls.daemon_args() if self.tls is not None else []

    @property
    def admin_token_file(self) -> Path:
        """The coordinator's admin token (its default place in the state directory)."""
        return self.workdir / "coordinator" / "state" / "admin.token"

    # -- talking to the coordinator --------------------------------------------------------------

    def channel(self) -> grpc.Channel:
        assert self.coordinator is not None
        limits = {"max_message_bytes": 64 * 1024 * 1024}
        net = self.tls.client_net(**limits) if self.tls is not None else NetConfig(**limits)
        return blocking_channel(self.coordinator.address, net)

    def status(self, history: int = 1000, timeout: float = 10.0) -> pb.StatusReply:
        with self.channel() as ch:
            return pb_grpc.CoordinatorStub(ch).Status(pb.StatusRequest(history=history), timeout=timeout)

    def wait_registered(self, count: int, timeout: float = 60.0) -> pb.StatusReply:
        def registered():
            self._check_alive()
            s = self.status()
            return s if len(s.nodes) >= count else None

        return wait_for(registered, timeout, f"{count} nodes to register")

    def wait_phase(self, phases: set[int], timeout: float) -> pb.StatusReply:
        def reached():
            self._check_alive()
            s = self.status()
            return s if s.phase in phases else None

        return wait_for(reached, timeout, f"run phase in {sorted(pb.RunPhase.Name(p) for p in phases)}", 0.2)

    def wait_finished(self, timeout: float) -> pb.StatusReply:
        s = self.wait_phase({pb.RUN_PHASE_FINISHED, pb.RUN_PHASE_FAILED}, timeout)
        if s.phase == pb.RUN_PHASE_FAILED:
            events = "\n".join(f"  {e.kind}: {e.message}" for e in s.events)
            raise TestnetError(f"run failed:\n{events}")
        return s

    def export_state(self, include_optimizer: bool = False, timeout: float = 60.0):
        from pipeguard.tensors import StateAssembler

        asm = StateAssembler(max_tensor_bytes=1 << 34)
        with self.channel() as ch:
            for chunk in pb_grpc.CoordinatorStub(ch).ExportState(
                    pb.ExportRequest(include_optimizer=include_optimizer), timeout=timeout):
                asm.add(chunk)
        return asm.finish()

    def _check_alive(self) -> None:
        if self.coordinator is not None and not self.coordinator.alive():
            raise TestnetError(f"coordinator died; log:\n{self.coordinator.log_tail()}")

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM every node at once and wait for them, then the coordinator (anything still
        running after ``timeout`` is killed)."""
        nodes = [d for d in self.nodes if d.alive()]
        for d in nodes:
            d.terminate()
        deadline = time.monotonic() + timeout
        for d in nodes:
            d.stop(max(0.1, deadline - time.monotonic()))
        if self.coordinator is not None:
            self.coordinator.stop(timeout)

    def kill(self) -> None:
        for d in [*self.nodes, self.coordinator]:
            if d is not None:
                d.kill()

    def __enter__(self) -> "LocalTestnet":
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.stop()
        finally:
            self.kill()
