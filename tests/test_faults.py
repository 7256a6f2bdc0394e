"""Faults, named and injected one at a time into a real testnet, and what the run did about them.

Every fault in ``FAULTS`` runs a real coordinator and four real node processes (three stages
and a standby) training the tiny model for a few steps with random audits on, injects one
fault, lets the run finish and then checks what a user would check:

- every step is recorded exactly once and the losses and final parameters equal clean
  single-process training of the same model, seed and batches (nothing was lost or corrupted);
- no honest node was banned (the lying auditor of the coordinator fault is the one ban);
- steps lost: completed steps that had to be run again (rollback distances read from the
  coordinator's events, plus what a coordinator restart skipped) stay within what the
  checkpoint policy promises. The runs checkpoint every step (``checkpoint_every = 1``), so
  the goal is none beyond the step (or the checkpoint) in flight.

Each test prints its row of the table (``pytest -s tests/test_faults.py``, lines "FAULT |").

The points of injection are real: processes get SIGKILL / SIGSTOP, links go down in network
namespaces, the state directory's file system fills up. "Mid-forward", "mid-backward" and
"mid-audit" are made exact with ``tests/fault_hooks/pause.py``, an honest attack plug-in that
holds the node still right after it computed an activation / gradient / verdict, before it
sends it; the test then SIGKILLs the real process. Clock skew uses
``tests/fault_hooks/skew/sitecustomize.py``. docs/reliability.md keeps the table of results.
"""

from __future__ import annotations

import functools
import json
import os
import re
import signal
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from coordinator.config import CoordinatorConfig
from pipeguard.app.runconfig import node_config, to_toml
from pipeguard.app.testnet import Daemon, LocalTestnet, wait_for
from pipeguard.data import stdlib_corpus
from pipeguard.evidence import verify_bundle
from pipeguard.model import GPTConfig, OptimSettings
from pipeguard.reference import train_reference
from pipeguard.v1 import pipeguard_pb2 as pb
from tests.conftest import tiny_run
from tests.test_multihost import COORDINATOR_PORT, NODE_PORT, Lan, free_subnet, start_in, why_no_netns

pytestmark = pytest.mark.multiprocess

HOOKS = Path(__file__).parent / "fault_hooks"
SEED = 7
GPT = GPTConfig(block_size=32, n_layer=3, n_head=2, n_embd=32)
STAGES = 3
CHECKPOINT_EVERY = 1

# Short timeouts, so that a fault costs seconds: a silent node is offline after 2 s, a step
# that cannot finish is given up after 10 s, a call to a dead peer after 3 s.
TIMEOUTS = {"step": 10.0, "request": 3.0, "connect": 3.0, "heartbeat_interval": 0.2, "heartbeat_timeout": 2.0,
            "retry_max": 1.0}
TIMEOUTS_ENV = {f"PIPEGUARD_TIMEOUTS_{k.upper()}": str(v) for k, v in TIMEOUTS.items()}


@functools.lru_cache(maxsize=None)
def clean(steps: int):
    """Clean single-process training of the run every fault test starts."""
    torch.set_num_threads(1)
    optim = OptimSettings(lr=3e-3, warmup_steps=2, total_steps=steps)
    return train_reference(GPT, optim, stdlib_corpus(262144), seed=SEED, steps=steps, micro_batches=4,
                           micro_batch_size=4)


def fault_run(steps: int, rate: float) -> CoordinatorConfig:
    """Three stages; the first step waits for the standby too, so it can audit from step 0."""
    return tiny_run({"pipeline.stages": STAGES, "pipeline.min_nodes": STAGES + 1, "train.steps": steps,
                     "train.seed": SEED, "audit.rate": rate, "audit.checkpoint_every": CHECKPOINT_EVERY,
                     "audit.retention": 4})


# -- what the coordinator said -------------------------------------------------------------------

ROLLED_BACK = re.compile(r"rolled back from step (\d+) to checkpoint (\d+)")


def banned(status: pb.StatusReply) -> set[str]:
    return {n.node_id for n in status.nodes if n.role == pb.ROLE_BANNED}


def holders(status: pb.StatusReply) -> dict[int, str]:
    return {n.stage: n.node_id for n in status.nodes if n.role == pb.ROLE_STAGE}


def role_of(status: pb.StatusReply, node_id: str) -> int:
    return next(n.role for n in status.nodes if n.node_id == node_id)


def steps_rolled_back(events) -> int:
    """Completed steps that had to be run again, summed over every rollback."""
    total = 0
    for e in events:
        m = ROLLED_BACK.search(e.message) if e.kind == "rolled_back" else None
        if m:
            total += int(m.group(1)) - int(m.group(2))
    return total


def what_happened(events) -> str:
    """The run's reaction, as the sequence of notable event kinds (repeats counted)."""
    notable = {"node_offline", "node_back", "node_registered", "stage_assigned", "rolled_back", "step_failed",
               "assign_failed", "audit_error", "audit_incomplete", "audit_failed", "banned", "run_failed",
               "coordinator_started", "checkpoint_failed", "commitment_mismatch", "stage_skipped", "waiting"}
    out: list[list] = []
    for e in events:
        if e.kind in notable:
            if out and out[-1][0] == e.kind:
                out[-1][1] += 1
            else:
                out.append([e.kind, 1])
    return " > ".join(k if n == 1 else f"{k} x{n}" for k, n in out)


def event_text(status: pb.StatusReply) -> str:
    return "\n".join(f"  {e.seq} {e.kind}: {e.message}" for e in status.events)


@dataclass
class Outcome:
    """One row of docs/reliability.md."""

    fault: str
    did: str
    steps_lost: int
    honest_bans: int
    matches_clean: bool

    def row(self) -> str:
        return (f"| {self.fault} | {self.did} | {self.steps_lost} | {self.honest_bans} | "
                f"{'yes' if self.matches_clean else 'NO'} |")


def finish(net: LocalTestnet, steps: int, fault: str, after_seq: int, timeout: float = 120.0,
           attackers: frozenset[str] = frozenset(), lost: int | None = None) -> tuple[Outcome, pb.StatusReply]:
    """Wait for the run to finish and check what must hold after any fault. Steps lost: every
    rollback after ``after_seq``, plus ``lost`` (what a coordinator restart cost)."""
    status = net.wait_finished(timeout)
    events = event_text(status)
    assert [p.step for p in status.losses] == list(range(steps)), f"every step recorded once:\n{events}"
    honest_bans = banned(status) - attackers
    assert not honest_bans, f"honest nodes banned: {honest_bans}\n{events}"
    assert banned(status) == set(attackers), events
    ref = clean(steps)
    torch.testing.assert_close([p.loss for p in status.losses], ref.losses, rtol=1e-5, atol=1e-6)
    state = net.export_state()
    assert set(state) == set(ref.state_dict)
    for name, want in ref.state_dict.items():
        torch.testing.assert_close(state[name], want, rtol=1e-5, atol=1e-6, msg=f"parameter {name}")
    after = [e for e in status.events if e.seq > after_seq]
    lost = (lost or 0) + steps_rolled_back(after)
    outcome = Outcome(fault, what_happened(after), lost, len(honest_bans), True)
    print(f"\nFAULT {outcome.row()}")
    return outcome, status


# -- starting a testnet ----------------------------------------------------------------------------

@dataclass
class Pause:
    """The pause hook (tests/fault_hooks/pause.py) for every node given ``args`` and ``env``."""

    dir: Path
    spec: str
    armed: bool = True

    def __post_init__(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        if self.armed:
            self.arm()

    def arm(self) -> None:
        (self.dir / "armed").touch()

    @property
    def args(self) -> list[str]:
        return ["--attack-plugin", f"{HOOKS / 'pause.py'}:PauseAt"]

    @property
    def env(self) -> dict[str, str]:
        return {"PIPEGUARD_TEST_PAUSE": self.spec, "PIPEGUARD_TEST_PAUSE_DIR": str(self.dir)}

    def wait(self, net: LocalTestnet, timeout: float = 60.0) -> dict:
        path = self.dir / "paused.json"

        def paused():
            net._check_alive()
            return path.exists() and path.read_text().endswith("}") and json.loads(path.read_text())

        return wait_for(paused, timeout, f"a node to pause at {self.spec}")

    def release(self) -> None:
        (self.dir / "release").touch()


NodeSpec = tuple[list[str], dict]
"""A node's extra command-line arguments and environment."""


def start_net(testnet, steps: int, rate: float, *, nodes: list[NodeSpec] | None = None,
              standby: NodeSpec | None = None, coordinator_args: tuple[str, ...] = (),
              coordinator_env: dict | None = None) -> tuple[LocalTestnet, dict[int, Daemon], Daemon]:
    """A coordinator and four nodes, started together: the first three to register serve the
    stages, in that order, and the last stands by. With ``standby`` given, ``nodes`` (three)
    register first and the standby after them. Returns (net, stage -> node, standby) once the
    pipeline is formed."""
    net = testnet(fault_run(steps, rate))
    net.start_coordinator(*coordinator_args, env={**TIMEOUTS_ENV, **(coordinator_env or {})})
    nodes = nodes or [([], {})] * (STAGES + (standby is None))
    started = [net.start_node(*args, wait=False, env={**TIMEOUTS_ENV, **env}) for args, env in nodes]
    for node in started:
        node.wait_ready()
    if standby is not None:
        net.wait_registered(STAGES)
        net.start_node(*standby[0], env={**TIMEOUTS_ENV, **standby[1]})
    net.wait_registered(STAGES + 1)
    by_id = {n.node_id: n for n in net.nodes}
    s = wait_for(lambda: (lambda s: s if len(holders(s)) == STAGES else None)(net.status()), 60, "the pipeline")
    spare = next(n for n in net.nodes if n.node_id not in holders(s).values())
    return net, {stage: by_id[node_id] for stage, node_id in holders(s).items()}, spare


def last_seq(net: LocalTestnet) -> int:
    events = net.status().events
    return events[-1].seq if events else 0


def wait_offline(net: LocalTestnet, node: Daemon, after_seq: int) -> None:
    wait_for(lambda: any(e.kind == "node_offline" and e.node_id == node.node_id and e.seq > after_seq
                         for e in net.status().events), 30, f"{node.name} to be marked offline")


def restart(net: LocalTestnet, *args: str) -> int:
    """Start the coordinator again on the same state (``--resume``); returns the step it resumed at."""
    net.start_coordinator(*args, "--resume", env=TIMEOUTS_ENV)
    # Its first event (events written while the disk was full may be missing, so not by seq).
    started = wait_for(lambda: [e for e in net.status().events if e.kind == "coordinator_started"][-1:], 30,
                       "the restarted coordinator")
    return int(re.search(r"resumed at step (\d+)", started[0].message).group(1))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- the faults ------------------------------------------------------------------------------------

def stage_killed_mid(phase: str):
    def fault(testnet, tmp_path) -> Outcome:
        steps, at = 6, 3
        pause = Pause(tmp_path / "pause", f"{phase}:1:{at}:1")
        net, stages, standby = start_net(testnet, steps, rate=0.1, nodes=[(pause.args, pause.env)] * (STAGES + 1))
        where = pause.wait(net)
        victim = stages[1]
        assert (where["node_id"], where["phase"], where["step"]) == (victim.node_id, phase, at)
        assert net.status().step == at, "the paused step is the one in flight"
        seq = last_seq(net)
        victim.kill()  # SIGKILL, inside the forward / backward of micro-batch 1
        outcome, s = finish(net, steps, f"stage node SIGKILLed mid-{phase}", seq)
        # The crash is routed around as soon as the step fails (the victim is silent); the
        # liveness monitor reports it offline once its heartbeat timeout passes, run over or not.
        wait_for(lambda: any(e.kind == "node_offline" and e.node_id == victim.node_id for e in net.status().events),
                 10, "the killed node reported offline")
        assert holders(s)[1] == standby.node_id, "the standby took stage 1"
        return outcome
    return fault


def standby_killed(testnet, tmp_path) -> Outcome:
    steps = 6
    net, _, standby = start_net(testnet, steps, rate=0.1)
    wait_for(lambda: net.status().step >= 2, 60, "step 2")
    seq = last_seq(net)
    standby.kill()
    wait_offline(net, standby, seq)
    outcome, s = finish(net, steps, "standby SIGKILLed", seq)
    assert outcome.steps_lost == 0 and not any(e.kind == "rolled_back" for e in s.events if e.seq > seq)
    return outcome


def auditor_killed_mid_audit(testnet, tmp_path) -> Outcome:
    steps = 6
    pause = Pause(tmp_path / "pause", "verdict:*:1:*")
    # Auditors are chosen among standbys first: the standby does the audits, and pauses in one
    # (while it is stuck, the audits it cannot take spill to the stage holders, which answer).
    net, _, standby = start_net(testnet, steps, rate=0.3, nodes=[([], {})] * STAGES,
                                standby=(pause.args, pause.env))
    where = pause.wait(net)
    assert where["node_id"] == standby.node_id
    seq = last_seq(net)
    standby.kill()  # SIGKILL after its recomputation, before it answers
    wait_offline(net, standby, seq)
    outcome, s = finish(net, steps, "auditor SIGKILLed mid-audit", seq)
    assert s.detections == 0
    # The audits it held (the one it was in and those queued behind it) were not dropped:
    # the coordinator ran each itself.
    failed = [e for e in s.events if e.kind == "audit_error" and e.seq > seq]
    assert failed and all("the coordinator audits it itself" in e.message for e in failed), event_text(s)
    assert not [e for e in s.events if e.kind == "audit_incomplete"], event_text(s)
    assert sum(n.audits_passed for n in s.nodes) == s.audits_total, "every audit drawn was done, and passed"
    return outcome


def auditor_frozen(kind: str):
    """The auditor (the standby) goes dead inside an audit and comes back several steps later.
    ``kind`` "stop": SIGSTOP, then SIGCONT (to its peers a frozen process is a cut link: its
    connections stay open and nothing answers). "partition": every daemon in its own network
    namespace, the auditor's bridge port goes down, then up (packets vanish: no RST, no FIN).

    The audits it held are abandoned as soon as it is marked offline, not held to their deadline
    (set to 300 s here), so the clock runs past the step whose evidence it must settle while the
    auditor is still gone; back, it is a standby again (its stale connections replaced, thanks to
    keepalives, not waited out), and nobody is banned or demoted."""

    def fault(testnet, tmp_path) -> Outcome:
        steps = 10
        pause = Pause(tmp_path / "pause", "verdict:*:1:*")
        env = {"PIPEGUARD_TIMEOUTS_AUDIT": "300"}
        if kind == "stop":
            net, _, standby = start_net(testnet, steps, rate=0.3, nodes=[([], {})] * STAGES,
                                        standby=(pause.args, pause.env), coordinator_env=env)
            return run(net, steps, standby, pause, lambda: os.kill(standby.proc.pid, signal.SIGSTOP),
                       lambda: os.kill(standby.proc.pid, signal.SIGCONT),
                       "auditor SIGSTOPped mid-audit, SIGCONT steps later")
        reason = why_no_netns()
        if reason:
            pytest.skip(reason)
        lan = Lan(tag=f"pgf{uuid.uuid4().hex[:5]}", prefix=free_subnet())
        daemons: list[Daemon] = []
        try:
            lan.setup()
            net, _, standby, cut, heal = start_lan(lan, testnet, tmp_path, steps, daemons, rate=0.3,
                                                   standby=(pause.args, {**pause.env, **env}), coordinator_env=env)
            return run(net, steps, standby, pause, cut, heal, "partition of the auditor mid-audit (netns), healed")
        finally:
            for d in daemons:  # before their namespaces go
                d.kill()
            problems = lan.teardown()
            assert not problems, problems

    def run(net, steps, standby, pause, cut, heal, name) -> Outcome:
        retention = fault_run(steps, 0.3).audit.retention
        where = pause.wait(net)
        assert where["node_id"] == standby.node_id
        seq = last_seq(net)
        cut()
        try:
            wait_offline(net, standby, seq)
            # The audit it went dead in is of step where["step"]: the clock must settle it before step
            # where["step"] + retention applies its update. Stepping past that while the auditor is
            # still gone is the proof that nothing waited for it.
            past = min(steps, where["step"] + retention + 1)
            wait_for(lambda: net.status().step >= past, 90, f"step {past} with the auditor gone")
            gone = net.status()
        finally:
            heal()
            pause.release()
        abandoned = [e for e in gone.events if e.kind == "audit_error" and e.seq > seq and "abandoned" in e.message]
        assert abandoned and all(e.node_id == standby.node_id and "the coordinator audits it itself" in e.message
                                 for e in abandoned), event_text(gone)
        wait_for(lambda: any(e.kind == "node_back" and e.node_id == standby.node_id and e.seq > seq
                             for e in net.status().events), 30, "the auditor to come back")
        outcome, s = finish(net, steps, name, seq)
        assert s.detections == 0
        assert role_of(s, standby.node_id) == pb.ROLE_STANDBY, "not demoted"
        assert not [e for e in s.events if e.seq > seq and e.kind in ("audit_incomplete", "step_failed")], \
            event_text(s)
        assert sum(n.audits_passed for n in s.nodes) == s.audits_total, "every audit drawn was done, and passed"
        return outcome

    return fault


def coordinator_killed_mid_step(testnet, tmp_path) -> Outcome:
    steps = 10
    port = free_port()
    pause = Pause(tmp_path / "pause", "forward:1:0:*", armed=False)
    honest = (pause.args, pause.env)
    # The standby audits first and accuses falsely: the judge refutes it and bans it, with a
    # bundle proving the lie. (Its ban leaves training untouched, so the run must still equal
    # clean training; an attacker at a stage would leave the poison of its unaudited steps
    # before the rollback point, see docs/threat-model.md.)
    liar = (["--attack", "audit:accuse"], {})
    net, _, spare = start_net(testnet, steps, rate=0.2, nodes=[honest] * STAGES, standby=liar,
                              coordinator_args=("--bind", f"127.0.0.1:{port}"))
    bad = spare.node_id
    wait_for(lambda: banned(net.status()) == {bad}, 90, "the attacker's ban")
    pause.arm()
    at = pause.wait(net)["step"]  # stage 1 is inside step `at`'s forward: the coordinator is mid-step
    before = net.status()
    assert banned(before) == {bad} and before.evidence
    assert before.step == at and at < steps
    seq = last_seq(net)
    net.coordinator.kill()  # SIGKILL
    pause.release()
    resumed_at = restart(net, "--bind", f"127.0.0.1:{port}")
    outcome, s = finish(net, steps, "coordinator SIGKILLed mid-step, restarted with --resume", seq,
                        attackers=frozenset({bad}), lost=before.step - resumed_at)
    assert resumed_at == at, "resumed from the last committed step"
    assert list(s.evidence) == list(before.evidence), "the same evidence"
    for path in s.evidence:
        result = verify_bundle(Path(path))
        assert result.valid and result.accused == bad, result.summary
    assert next(n for n in s.nodes if n.node_id == bad).ban_reason
    # Nobody restarted a node: the three honest ones came back by themselves and trained on.
    assert all(n.alive() for n in net.nodes[:STAGES])
    assert {holders(s)[i] for i in range(STAGES)} == {n.node_id for n in net.nodes[:STAGES]}
    return outcome


def silent_node(kind: str):
    """``kind`` "stop": SIGSTOP the stage-1 node, SIGCONT it once replaced (a node too slow to
    answer). "partition": cut its link in a network namespace and restore it."""

    def fault(testnet, tmp_path) -> Outcome:
        steps = 8
        if kind == "partition":
            reason = why_no_netns()
            if reason:
                pytest.skip(reason)
            lan = Lan(tag=f"pgf{uuid.uuid4().hex[:5]}", prefix=free_subnet())
            daemons: list[Daemon] = []
            try:
                lan.setup()
                net, victim, standby, cut, heal = start_lan(lan, testnet, tmp_path, steps, daemons)
                return run(net, steps, victim, standby, cut, heal, "partition of a stage node (netns), healed")
            finally:
                for d in daemons:  # before their namespaces go
                    d.kill()
                problems = lan.teardown()
                assert not problems, problems
        net, stages, standby = start_net(testnet, steps, rate=0.1)
        victim = stages[1]
        return run(net, steps, victim, standby, lambda: os.kill(victim.proc.pid, signal.SIGSTOP),
                   lambda: os.kill(victim.proc.pid, signal.SIGCONT), "stage node SIGSTOPped, SIGCONT once replaced")

    def run(net, steps, victim, standby, cut, heal, name) -> Outcome:
        wait_for(lambda: net.status().step >= 2, 60, "step 2")
        seq = last_seq(net)
        cut()
        try:
            replaced = wait_for(lambda: (lambda s: s if holders(s).get(1) == standby.node_id else None)(net.status()),
                                60, "the standby to take stage 1")
        finally:
            heal()
        assert any(e.kind == "node_offline" and e.node_id == victim.node_id for e in replaced.events)
        wait_for(lambda: any(e.kind == "node_back" and e.node_id == victim.node_id and e.seq > seq
                             for e in net.status().events), 30, "the node to come back")
        outcome, s = finish(net, steps, name, seq)
        assert role_of(s, victim.node_id) == pb.ROLE_STANDBY, "back, as a standby"
        assert victim.alive()
        # The step in flight was given up when the node went offline, not after the step
        # timeout (no step_failed: nothing timed out).
        after = [e for e in s.events if e.seq > seq]
        assert not [e for e in after if e.kind == "step_failed"], event_text(s)
        return outcome

    return fault


def start_lan(lan: Lan, testnet, tmp_path: Path, steps: int, daemons: list[Daemon], rate: float = 0.1,
              standby: NodeSpec | None = None, coordinator_env: dict | None = None):
    """The coordinator and four nodes, each in its own network namespace (added to ``daemons``).
    Returns (net, the stage-1 node, the standby, cut, heal); with ``standby`` (its arguments and
    environment) the standby registers last and cut/heal act on its link, else on stage 1's."""
    net = testnet(fault_run(steps, rate=rate))
    (tmp_path / "node.toml").write_text(to_toml(node_config({f"timeouts.{k}": v for k, v in TIMEOUTS.items()})))
    coord = lan.add("c", 1)
    coord_addr = f"{coord.address}:{COORDINATOR_PORT}"
    net.coordinator = start_in(coord, "coordinator", [
        "-m", "coordinator.daemon", "--config", str(net.config_path), "--bind", coord_addr, "--advertise", coord_addr,
        "--state-dir", str(tmp_path / "coordinator" / "state")], tmp_path, {**TIMEOUTS_ENV, **(coordinator_env or {})})
    daemons.append(net.coordinator)
    key = net.coordinator.wait_ready(60)["public_key"]
    hosts = {}
    for i in range(STAGES + 1):
        args, env = standby if standby is not None and i == STAGES else ([], {})
        if standby is not None and i == STAGES:
            net.wait_registered(STAGES)  # the stages first: this one stands by
        host = lan.add(f"n{i}", 10 + i)
        node = start_in(host, f"node{i}", [
            "-m", "node.daemon", "--config", str(tmp_path / "node.toml"), "--coordinator", coord_addr,
            "--coordinator-key", key, "--bind", f"0.0.0.0:{NODE_PORT}", "--advertise", f"{host.address}:{NODE_PORT}",
            "--home", str(tmp_path / f"node{i}" / "home"), *args], tmp_path, env)
        net.nodes.append(node)
        daemons.append(node)
        hosts[node] = host
        if standby is not None:
            node.wait_ready(60)
    for node in net.nodes:
        node.wait_ready(60)
    net.wait_registered(STAGES + 1)
    by_id = {n.node_id: n for n in net.nodes}
    s = wait_for(lambda: (lambda s: s if len(holders(s)) == STAGES else None)(net.status()), 60, "the pipeline")
    stage1 = by_id[holders(s)[1]]
    spare = next(n for n in net.nodes if n.node_id not in holders(s).values())
    victim = spare if standby is not None else stage1
    port = hosts[victim].port_if
    return (net, stage1, spare, lambda: lan.cut(hosts[victim].name),
            lambda: subprocess.run(["ip", "link", "set", port, "up"], check=True, timeout=20))


def clock_skew(testnet, tmp_path) -> Outcome:
    steps = 6
    year, day = 365 * 86400, 86400

    def skewed(seconds: float) -> dict[str, str]:
        path = os.pathsep.join(filter(None, [str(HOOKS / "skew"), os.environ.get("PYTHONPATH")]))
        return {"PYTHONPATH": path, "PIPEGUARD_TEST_CLOCK_SKEW_S": str(seconds)}

    # Every daemon on its own clock: a year ahead, a day behind, right, a month behind; the
    # coordinator an hour ahead. The standby audits (signed verdicts from a skewed clock).
    net, _, _ = start_net(testnet, steps, rate=0.3, coordinator_env=skewed(3600),
                          nodes=[([], skewed(year)), ([], skewed(-day)), ([], {}), ([], skewed(-30 * day))])
    seq = 0
    outcome, s = finish(net, steps, "wall clocks skewed (+1 year, -1 day, -30 days; coordinator +1 hour)", seq)
    assert s.detections == 0 and s.audits_total > 0
    # The skew was real: the node's log lines carry next year's date, the coordinator's events
    # are an hour ahead.
    ahead = time.localtime(time.time() + year).tm_year
    assert re.search(rf"^{ahead}-", net.nodes[0].log_path.read_text(), re.M), "the skew hook was not in effect"
    assert abs(s.events[-1].time - time.time() - 3600) < 600
    assert not any(e.kind in ("node_offline", "rolled_back", "step_failed") for e in s.events), event_text(s)
    return outcome


def state_disk_full(testnet, tmp_path) -> Outcome:
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs for the coordinator's state directory")
    fs = tmp_path / "statefs"
    fs.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m,mode=0700", "tmpfs", str(fs)],
                             capture_output=True, text=True, timeout=20)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        return disk_full_on(fs, testnet)
    finally:
        # Lazily: the daemons, killed by the testnet fixture afterwards, may still hold files.
        subprocess.run(["umount", "-l", str(fs)], capture_output=True, timeout=20)


def fill(path: Path) -> int:
    """Write ``path`` until its file system is full; returns the bytes written."""
    written, block = 0, b"\0" * (1 << 16)
    with open(path, "wb", buffering=0) as fh:
        for _ in range(1 << 16):  # 4 GiB at most
            try:
                written += fh.write(block)
            except OSError:
                break
    return written


def disk_full_on(fs: Path, testnet) -> Outcome:
    """Fill the state directory's file system, free it, restart; later remount it read-only,
    make it writable again, restart. Each time the run must stop cleanly and resume whole."""
    steps = 10
    port = free_port()
    state_dir = fs / "state"
    where = ("--bind", f"127.0.0.1:{port}", "--state-dir", str(state_dir))
    net, _, _ = start_net(testnet, steps, rate=0.1, coordinator_args=where)
    seq = last_seq(net)
    lost = 0

    def remount(mode: str) -> None:
        subprocess.run(["mount", "-o", f"remount,{mode}", str(fs)], check=True, capture_output=True, timeout=20)

    faults = [
        (3, "No space left on device", lambda: fill(fs / "filler") > 0, lambda: (fs / "filler").unlink()),
        (6, "Read-only file system", lambda: remount("ro"), lambda: remount("rw")),
    ]
    for at, error, inject, heal in faults:
        wait_for(lambda: net.status().step >= at, 60, f"step {at}")
        inject()
        s = net.wait_phase({pb.RUN_PHASE_FAILED}, 60)
        failed = [e for e in s.events if e.kind == "run_failed"][-1]
        assert error in failed.message and str(state_dir) in failed.message, event_text(s)
        assert error in net.coordinator.log_path.read_text()
        # Nothing half-written: the state file is the last one saved whole, and stepping stopped.
        saved = json.loads((state_dir / "state.json").read_text())
        assert saved["phase"] == pb.RUN_PHASE_TRAINING and saved["step"] <= s.step
        time.sleep(1.0)
        assert not [e for e in net.status().events if e.kind == "step" and e.seq > failed.seq], "stepping stopped"
        # The operator makes room and restarts the coordinator; nodes are not touched.
        heal()
        net.coordinator.stop()
        resumed_at = restart(net, *where)
        assert resumed_at == saved["step"]
        lost += max(0, s.step - 1 - resumed_at)  # the step whose record failed was the one in flight
    outcome, _ = finish(net, steps, "state directory's file system full, then read-only (tmpfs); fixed, "
                        "coordinator restarted", seq, lost=lost)
    return outcome


FAULTS = {
    "stage-killed-mid-forward": stage_killed_mid("forward"),
    "stage-killed-mid-backward": stage_killed_mid("backward"),
    "standby-killed": standby_killed,
    "auditor-killed-mid-audit": auditor_killed_mid_audit,
    "auditor-frozen-mid-audit": auditor_frozen("stop"),
    "auditor-partitioned-mid-audit": auditor_frozen("partition"),
    "coordinator-killed-mid-step": coordinator_killed_mid_step,
    "partition-healed": silent_node("partition"),
    "node-stopped-then-continued": silent_node("stop"),
    "clock-skew": clock_skew,
    "state-disk-full": state_disk_full,
}


@pytest.mark.timeout(180)
@pytest.mark.parametrize("fault", list(FAULTS))
def test_fault(testnet, tmp_path, fault):
    outcome = FAULTS[fault](testnet, tmp_path)
    assert outcome.honest_bans == 0 and outcome.matches_clean
    # With a checkpoint after every step, a node lost mid-step costs the step in flight only; a
    # node lost while the coordinator fetches the checkpoint of step s costs step s - 1 too (its
    # new state of that stage is gone with the node).
    assert outcome.steps_lost <= CHECKPOINT_EVERY
