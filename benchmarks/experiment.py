"""Lu et al.'s central result on pipeguard's small GPT, as real multi-process testnets.

    pip install -e '.[experiment]'     # matplotlib, for the plot
    python benchmarks/experiment.py --out docs/ [--steps 200] [--throughput-steps 50] [--rounds 2]

Every run is a ``pipeguard.app.testnet.LocalTestnet``: a coordinator and four node daemons on
loopback (three stages, registered in order so that node 1 serves stage 1, and a standby),
signatures on, one torch thread per node, all with the same model, seed, data and batches:

======================  ==============================================  =======================
run                     stage 1's node                                  defence
======================  ==============================================  =======================
clean                   honest                                          audits p=0.05, screen
reverse r=0.3           ``--attack forward:reverse --attack-rate 0.3``  none (p=0, screen off)
reverse r=0.7           the same at rate 0.7                            none
reverse r=0.3, pg       as above                                        audits p=0.05, screen
reverse r=0.7, pg       as above                                        audits p=0.05, screen
reverse r=0.x, audits   as above (not in the issue: what random audits  audits p=0.05, no screen
                        alone take to catch the attacker)
======================  ==============================================  =======================

The attack starts at ``--attack-start`` (default 10: the end of the lr warm-up, and a
checkpoint); its coin flips use a fixed seed (``PIPEGUARD_ATTACK_SEED``), so every attacked
run poisons the same micro-batches. Which messages are audited is drawn by the coordinator's
CSPRNG and differs from run to run. Recorded per run: the training loss of every executed
step (from the coordinator's ``step`` events, so steps later undone by a rollback are kept and
plotted), the run's final history (``StatusReply.losses``), validation loss
(``pipeguard.model.GPT`` on ``Dataset.batch(split="val")`` batches, averaged over the final
weights from ``LocalTestnet.export_state`` and the coordinator's last three verified
checkpoints), audits dispatched, bans (and whether the banned node was the attacker),
``pipeguard.evidence.verify_bundle`` on every evidence bundle listed in the status, the
deviation of every passed audit (from the auditors' logs) and the CPU time of every daemon.

Throughput: honest runs at audit rate p = 0 (screen off), 0.05 (screen off), 0.05 (screen
on) and 1, same topology (three stages + the standby, which is the preferred auditor), in
``--rounds`` interleaved rounds so that load from other processes falls on all alike;
tokens/s is the median of per-step figures after ``--warmup`` steps (the coordinator times
RunStep + ApplyUpdate) and, separately, end to end from the ``step`` events' times (includes
checkpoints and the coordinator's work between steps). Because wall-clock figures on a shared
2-core machine swing with other processes' load, it also reports CPU milliseconds per step of
every daemon (``/proc/PID/stat``), which do not, and times the pieces of one audit in this
process (state hashing and streaming, recomputation) to say where the time goes.

Writes ``experiment.png``, ``experiment.json`` and ``experiment-table.md`` under ``--out``;
prints the table. Asserts nothing; an honest node's ban is printed loudly with its events.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

SEED = 1234
STAGES = 3
ATTACKED_STAGE = 1
MODEL = "tiny"
MICRO_BATCHES = 8
MICRO_BATCH_SIZE = 8
DATA_BYTES = 4 * 1024 * 1024  # the coordinator's default data.max_bytes
VAL_BATCHES = 16
ATTACK_SEED = 1

RUN = {
    "model.preset": MODEL,
    "train.seed": SEED, "train.micro_batches": MICRO_BATCHES, "train.micro_batch_size": MICRO_BATCH_SIZE,
    "pipeline.stages": STAGES,
    "timeouts.heartbeat_interval": 0.5, "timeouts.heartbeat_timeout": 15.0,
}
"""Every run's config (pipeguard.app.runconfig keys); each run adds its steps, audit rate and screen."""


@dataclass(frozen=True)
class RunSpec:
    name: str
    label: str
    audit_rate: float
    screen: bool
    attack_rate: float = 0.0
    """0 = honest."""

    @property
    def defended(self) -> bool:
        return self.audit_rate > 0 or self.screen


RUNS = [
    RunSpec("clean", "clean (audits p=0.05)", 0.05, True),
    RunSpec("reverse-0.3", "reverse r=0.3, no defence", 0.0, False, 0.3),
    RunSpec("reverse-0.7", "reverse r=0.7, no defence", 0.0, False, 0.7),
    RunSpec("reverse-0.3-pg", "reverse r=0.3, pipeguard", 0.05, True, 0.3),
    RunSpec("reverse-0.7-pg", "reverse r=0.7, pipeguard", 0.05, True, 0.7),
    # Not in the list: the same defence without the statistical screen, to see what the
    # random audits alone take to catch the attacker.
    RunSpec("reverse-0.3-audits", "reverse r=0.3, audits only", 0.05, False, 0.3),
    RunSpec("reverse-0.7-audits", "reverse r=0.7, audits only", 0.05, False, 0.7),
]
THROUGHPUT = [
    RunSpec("p0", "p=0 (screen off)", 0.0, False),
    RunSpec("p0.05-noscreen", "p=0.05 (screen off)", 0.05, False),
    RunSpec("p0.05", "p=0.05 (screen on)", 0.05, True),
    RunSpec("p1", "p=1 (screen on)", 1.0, True),
]

STEP_EVENT = re.compile(r"^step (\d+) loss ([-+0-9.eE]+|nan|inf) ")
DEVIATION = re.compile(r"VERDICT_PASS — .*max deviation ([-+0-9.eE]+|inf|nan)")
AUDIT_LINE = re.compile(r"audit \d+ \((forward|backward|update) step")


class CpuMeter:
    """Share of the machine's CPU time that went to processes other than ours (and our reaped children)."""

    def __init__(self) -> None:
        self.tick = os.sysconf("SC_CLK_TCK")
        self.start = self._sample()

    def _sample(self) -> tuple[float, float, float]:
        try:
            with open("/proc/stat") as fh:
                v = [int(x) for x in fh.readline().split()[1:9]]
        except OSError:
            v = [0] * 8
        t = os.times()
        return time.perf_counter(), (sum(v) - v[3] - v[4]) / self.tick, t.user + t.system + t.children_user + \
            t.children_system

    def foreign_share(self) -> float:
        now = self._sample()
        wall, busy, ours = (now[i] - self.start[i] for i in range(3))
        return max(0.0, (busy - ours) / (wall * (os.cpu_count() or 1))) if wall > 0 else 0.0


@dataclass
class RunResult:
    spec: RunSpec
    steps: int
    executed: list[tuple[int, float]] = field(default_factory=list)
    """(step, loss) of every executed step in execution order (including steps a rollback discarded)."""
    history: list[tuple[int, float, float]] = field(default_factory=list)
    """(step, loss, tokens/s) of the run's final history."""
    step_times: list[tuple[int, float]] = field(default_factory=list)
    val_losses: dict[str, float] = field(default_factory=dict)
    audits_total: int = 0
    detections: int = 0
    audits_done: dict[str, int] = field(default_factory=dict)
    malicious: str = ""
    standby: str = ""
    bans: list[dict] = field(default_factory=list)
    evidence: list[dict] = field(default_factory=list)
    notable_events: list[str] = field(default_factory=list)
    event_counts: dict[str, int] = field(default_factory=dict)
    audit_deviations: list[float] = field(default_factory=list)
    """Deviation of every passed audit, from the auditors' logs."""
    audit_kinds: dict[str, int] = field(default_factory=dict)
    """Audits performed by kind, from the auditors' logs."""
    screen_flags: int = 0
    """Received tensors the nodes' screens flagged, from their logs."""
    cpu_s: dict[str, float] = field(default_factory=dict)
    """CPU seconds (user + system) each daemon used over the whole run, by role."""
    wall_s: float = 0.0
    foreign_cpu_share: float = 0.0
    workdir: str = ""

    # -- derived --------------------------------------------------------------------------------

    @property
    def final_train_loss(self) -> float:
        losses = [x[1] for x in self.history]
        tail = losses[-max(1, len(losses) // 10):]
        return sum(tail) / len(tail)

    @property
    def val_loss(self) -> float:
        return statistics.fmean(self.val_losses.values()) if self.val_losses else math.nan

    def median_tokens_per_s(self, warmup: int) -> float:
        return statistics.median(t for s, _, t in self.history if s >= warmup)

    def wall_tokens_per_s(self, warmup: int, tokens_per_step: int) -> float:
        """End to end: tokens over the time between the step events of ``warmup - 1`` and the last step."""
        times = sorted(t for s, t in self.step_times if s >= warmup - 1)
        return tokens_per_step * (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else math.nan

    def honest_bans(self) -> list[dict]:
        return [b for b in self.bans if not b["attacker"]]

    def to_json(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "spec"}
        d["spec"] = self.spec.__dict__
        d.update(final_train_loss=self.final_train_loss, val_loss=self.val_loss)
        return d


def run_config_for(spec: RunSpec, steps: int):
    """The coordinator's run config for ``spec`` (a CoordinatorConfig)."""
    from pipeguard.app.runconfig import run_config

    return run_config(RUN, {"train.steps": steps, "audit.rate": spec.audit_rate, "audit.screen": spec.screen})


def run_toml(spec: RunSpec, steps: int) -> str:
    """The coordinator's run.toml for ``spec`` (for the report)."""
    from pipeguard.app.runconfig import to_toml

    return to_toml(run_config_for(spec, steps))


def run_testnet(spec: RunSpec, steps: int, workdir: Path, attack_start: int, timeout: float,
                evaluate_models: bool, dataset=None) -> RunResult:
    from pipeguard.app.testnet import LocalTestnet
    from pipeguard.evidence import verify_bundle
    from pipeguard.v1 import pipeguard_pb2 as pb

    shutil.rmtree(workdir, ignore_errors=True)
    res = RunResult(spec=spec, steps=steps, workdir=str(workdir))
    net = LocalTestnet(workdir, run_config_for(spec, steps))
    meter = CpuMeter()
    t0 = time.perf_counter()
    try:
        net.start_coordinator()
        for i in range(STAGES + 1):  # in order: node i serves stage i; the last one stands by
            extra: list[str] = []
            if i == ATTACKED_STAGE and spec.attack_rate > 0:
                extra = ["--attack", "forward:reverse", "--attack-rate", str(spec.attack_rate),
                         "--attack-start", str(attack_start)]
            if extra:  # the attack's coin flips: the same in every run (default: derived from the fresh key)
                os.environ["PIPEGUARD_ATTACK_SEED"] = str(ATTACK_SEED)
            try:
                node = net.start_node(*extra)
            finally:
                os.environ.pop("PIPEGUARD_ATTACK_SEED", None)
            net.wait_registered(i + 1)
            if extra:
                res.malicious = node.node_id
            if i == STAGES:
                res.standby = node.node_id
        status = net.wait_finished(timeout=timeout)
        status = net.status(history=5000)
        res.cpu_s = {"coordinator": cpu_seconds(net.coordinator.proc.pid)}
        for i, node in enumerate(net.nodes):
            res.cpu_s[f"node{i} ({'stage ' + str(i) if i < STAGES else 'standby'})"] = cpu_seconds(node.proc.pid)
        if evaluate_models:
            final = {k: v for k, v in net.export_state(include_optimizer=False).items()}
            res.val_losses[f"final (step {status.step})"] = validation_loss(final, dataset)
    except Exception:
        for d in [net.coordinator, *net.nodes]:
            if d is not None:
                print(f"--- {d.name} log tail:\n{d.log_tail(25)}", file=sys.stderr)
        raise
    finally:
        net.stop()
        net.kill()
    res.wall_s = time.perf_counter() - t0
    res.foreign_cpu_share = meter.foreign_share()

    res.history = [(p.step, p.loss, p.tokens_per_s) for p in sorted(status.losses, key=lambda p: p.step)]
    res.audits_total, res.detections = status.audits_total, status.detections
    res.audits_done = {n.node_id[:8]: n.audits_done for n in status.nodes if n.audits_done}
    for ev in status.events:
        res.event_counts[ev.kind] = res.event_counts.get(ev.kind, 0) + 1
        if ev.kind == "step":
            m = STEP_EVENT.match(ev.message)
            if m:
                res.executed.append((int(m.group(1)), float(m.group(2))))
                res.step_times.append((int(m.group(1)), ev.time))
        elif ev.kind not in ("checkpoint", "node_registered", "heartbeat"):
            res.notable_events.append(f"[{ev.kind}] step {ev.step}: {ev.message}")
    for n in status.nodes:
        if n.role == pb.ROLE_BANNED:
            ev = next((e for e in status.events if e.kind == "banned" and e.node_id == n.node_id), None)
            res.bans.append({"node": n.node_id, "attacker": n.node_id == res.malicious, "reason": n.ban_reason,
                             "step": ev.step if ev else None, "time": ev.time if ev else None})
    for path in status.evidence:
        v = verify_bundle(Path(path))
        res.evidence.append({"path": path, "valid": v.valid, "kind": v.kind, "accused": v.accused,
                             "summary": v.summary})
    for node in net.nodes:  # what auditors measured on real honest recomputations
        for line in node.log_path.read_text(errors="replace").splitlines():
            m = DEVIATION.search(line)
            if m:
                res.audit_deviations.append(float(m.group(1)))
            m = AUDIT_LINE.search(line)
            if m:
                res.audit_kinds[m.group(1)] = res.audit_kinds.get(m.group(1), 0) + 1
            if "screen flagged" in line:
                res.screen_flags += 1
    if evaluate_models:
        from coordinator.checkpoints import CheckpointStore

        store = CheckpointStore(workdir / "coordinator" / "state" / "checkpoints", keep=1000)
        for step in store.steps()[-3:]:
            named = {}
            for stage in range(STAGES):
                named.update({k.removeprefix("param/"): v for k, v in store.load(step, stage).items()
                              if k.startswith("param/")})
            res.val_losses[f"checkpoint {step}"] = validation_loss(named, dataset)
    return res


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a live process so far (Linux /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return math.nan
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@torch.no_grad()
def validation_loss(state: dict[str, torch.Tensor], dataset) -> float:
    from pipeguard.model import GPT, preset

    model = GPT(preset(MODEL), SEED)
    model.load_state_dict(state)
    model.eval()
    total = 0.0
    for i in range(VAL_BATCHES):
        x, y = dataset.batch(SEED, i, 0, MICRO_BATCH_SIZE, model.cfg.block_size, split="val")  # (B, T) each
        total += float(GPT.loss(model(x), y))
    return total / VAL_BATCHES


def reference_losses(steps: int, dataset) -> list[float]:
    """Clean single-process training of the same model, seed and batches (the pipeline must match it)."""
    from coordinator.config import TrainConfig
    from pipeguard.model import preset
    from pipeguard.reference import train_reference

    train = TrainConfig(steps=steps, seed=SEED, micro_batches=MICRO_BATCHES, micro_batch_size=MICRO_BATCH_SIZE)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train_reference(preset(MODEL), train.optim(), dataset, seed=SEED, steps=steps,
                               micro_batches=MICRO_BATCHES, micro_batch_size=MICRO_BATCH_SIZE).losses
    finally:
        torch.set_num_threads(previous)


# -- where an audit's time goes (in this process) -----------------------------------------------------


def audit_costs(dataset, repeats: int = 5) -> dict[str, float]:
    """Milliseconds per piece of one audit of the middle stage, timed in this process with one thread."""
    sys.path.insert(0, str(Path(__file__).parent))
    import audit_tolerance as at
    from pipeguard.model import preset
    from pipeguard.tensors import StateAssembler, state_chunks, state_digest

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        case = at.Case(MODEL, preset(MODEL), MICRO_BATCHES, MICRO_BATCH_SIZE, (12,))
        rec = at.make_claims(case, dataset)[0]
        st = rec["stages"][ATTACKED_STAGE]
        named = list(st["state"].items())

        def timed(fn) -> float:
            fn()
            t0 = time.perf_counter()
            for _ in range(repeats):
                fn()
            return 1000 * (time.perf_counter() - t0) / repeats

        def stream_state():
            asm = StateAssembler(1 << 30)
            for chunk in state_chunks(named, ATTACKED_STAGE, 12, 1 << 20):
                asm.add(pb_roundtrip(chunk))
            asm.finish()

        costs = {
            "state digest (full stage state)": timed(lambda: state_digest(iter(named))),
            "state serialise + parse + assemble": timed(stream_state),
        }
        for kind in ("forward", "backward", "update"):
            costs[f"recompute: {kind} audit"] = timed(lambda k=kind: _check_one(at, case, rec, k, dataset))
        costs["state bytes"] = float(sum(t.numel() * t.element_size() for _, t in named))
        costs["stage step compute (8 micro-batches fwd+bwd, 3 stages)"] = timed(
            lambda: at.Pipeline(case, dataset).step(12, record=False))
        return costs
    finally:
        torch.set_num_threads(previous)


def pb_roundtrip(chunk):
    return type(chunk).FromString(chunk.SerializeToString())


def _check_one(at, case, rec, kind, dataset):
    from pipeguard import audit
    from pipeguard.v1 import pipeguard_pb2 as pb

    # audit_stage runs every kind; run just one by building its Artifacts the same way.
    kinds = {"forward": pb.AUDIT_KIND_FORWARD, "backward": pb.AUDIT_KIND_BACKWARD, "update": pb.AUDIT_KIND_UPDATE}
    st = rec["stages"][ATTACKED_STAGE]
    k = kinds[kind]
    mbs = list(range(case.micro_batches)) if k == pb.AUDIT_KIND_UPDATE else [0]
    art = audit.Artifacts(request=at._request(case, rec, ATTACKED_STAGE, k, mbs[0]),
                          attestation=pb.StateAttestation(state_digest=at.DIGEST), state=st["state"])
    for mb in mbs:
        art.inputs[mb] = at._rt(st["inputs"][mb])
        if k != pb.AUDIT_KIND_FORWARD:
            art.grads_in[mb] = at._rt(st["grads_in"][mb])
        for d in (pb.DIRECTION_FORWARD, pb.DIRECTION_BACKWARD):
            if k == pb.AUDIT_KIND_UPDATE or (d == pb.DIRECTION_FORWARD) == (k == pb.AUDIT_KIND_FORWARD):
                art.outputs[(d, mb)] = at._rt(st["outputs"][(d, mb)])
    if k == pb.AUDIT_KIND_UPDATE:
        art.next_state = st["next_state"]
        art.next_attestation = pb.StateAttestation(state_digest=at.NEXT_DIGEST)
    f = audit.check(art)
    assert f.verdict == pb.VERDICT_PASS, f.detail


# -- output -----------------------------------------------------------------------------------------


def smooth(values: list[float], k: int = 5) -> list[float]:
    out = []
    for i in range(len(values)):
        w = values[max(0, i - k + 1): i + 1]
        out.append(sum(w) / len(w))
    return out


COLOURS = {"clean": "black", "reverse-0.3": "tab:orange", "reverse-0.7": "tab:red", "reverse-0.3-pg": "tab:cyan",
           "reverse-0.7-pg": "tab:blue", "reverse-0.3-audits": "tab:olive", "reverse-0.7-audits": "tab:purple"}


def plot(results: list[RunResult], throughput: dict, attack_start: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [2.3, 1]})
    undone_labelled = False
    for r in results:
        c = COLOURS.get(r.spec.name, None)
        steps = [s for s, _, _ in r.history]
        losses = [l for _, l, _ in r.history]
        ls = "-" if not (r.spec.defended and r.spec.attack_rate) else "--" if r.spec.screen else ":"
        ax.plot(steps, smooth(losses), color=c, ls=ls, lw=1.6,
                label=f"{r.spec.label}: val ppl {math.exp(r.val_loss):.2f}")
        # Steps executed and later discarded by a rollback (poisoned, then undone). Step events
        # carry the loss to 4 decimals.
        final = {s: l for s, l, _ in r.history}
        gone = [(s, l) for s, l in r.executed if abs(final.get(s, math.inf) - l) > 6e-5]
        if gone:
            ax.plot([s for s, _ in gone], [l for _, l in gone], "x", color=c, ms=4,
                    label=None if undone_labelled else "x: raw loss of a step later undone by a rollback")
            undone_labelled = True
        for b in r.bans:
            if b["step"] is not None:
                ax.axvline(b["step"], color=c, ls=":", lw=1)
    ax.axvline(attack_start, color="grey", ls="-.", lw=1)
    ax.text(attack_start, ax.get_ylim()[0], " attack starts", color="grey", fontsize=8, va="bottom")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (5-step moving mean)")
    ax.set_title(f"{MODEL} GPT, {STAGES} stages, forward:reverse on stage {ATTACKED_STAGE}")
    ax.legend(fontsize=7.5, loc="upper right")
    ax.grid(alpha=0.3)

    names = list(throughput["median_tokens_per_s"])
    med = [throughput["median_tokens_per_s"][n] for n in names]
    wall = [throughput["wall_tokens_per_s"][n] for n in names]
    xs = range(len(names))
    bx.bar([x - 0.2 for x in xs], med, 0.4, label="median per step", color="tab:green")
    bx.bar([x + 0.2 for x in xs], wall, 0.4, label="end to end", color="tab:olive")
    base_m, base_w = med[0], wall[0]
    for x, m, w in zip(xs, med, wall):
        bx.text(x - 0.2, m, f"{m / base_m:.2f}x", ha="center", va="bottom", fontsize=8)
        bx.text(x + 0.2, w, f"{w / base_w:.2f}x", ha="center", va="bottom", fontsize=8)
    bx.set_xticks(list(xs), [THROUGHPUT_LABELS.get(n, n) for n in names], fontsize=8)
    bx.set_ylabel("tokens/s (honest run)")
    bx.set_title("audit overhead (ratio to p=0)")
    bx.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


THROUGHPUT_LABELS = {s.name: s.label.replace(" (", "\n(") for s in THROUGHPUT}


def table(results: list[RunResult], attack_start: int) -> str:
    clean = next(r for r in results if r.spec.name == "clean")
    lines = ["| run | final train loss (last 10%) | val loss | val ppl | ppl / clean | train loss / clean "
             "| detected (ban step − attack start) | audits dispatched | honest nodes banned | evidence verifies |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        bans = [b for b in r.bans if b["attacker"]]
        if r.spec.attack_rate == 0:
            det = "—"
        elif bans:
            det = ", ".join(f"step {b['step']} ({b['step'] - attack_start:+d})" for b in bans)
        else:
            det = "not detected" if r.spec.defended else "— (no defence)"
        ev = (", ".join("yes" if e["valid"] else "NO" for e in r.evidence)) if r.evidence else "—"
        lines.append(
            f"| {r.spec.label} | {r.final_train_loss:.4f} | {r.val_loss:.4f} | {math.exp(r.val_loss):.2f} | "
            f"{math.exp(r.val_loss) / math.exp(clean.val_loss):.3f}x | {r.final_train_loss / clean.final_train_loss:.3f}x "
            f"| {det} | {r.audits_total} | {len(r.honest_bans())} | {ev} |")
    return "\n".join(lines)


def throughput_table(tp: dict) -> str:
    lines = ["| audit rate | tokens/s, median per step | ratio to p=0 | tokens/s, end to end | ratio to p=0 "
             "| audits dispatched per step (fwd/bwd/update performed) | flags by the nodes' screens per step | rounds: ratio to p=0 |",
             "|---|---|---|---|---|---|---|---|"]
    base_m = tp["median_tokens_per_s"]["p0"]
    base_w = tp["wall_tokens_per_s"]["p0"]
    for s in THROUGHPUT:
        n = s.name
        rounds = ", ".join(f"{x:.3f}" for x in tp["round_ratios"][n])
        kinds = "/".join(f"{tp['kinds_per_step'][n].get(k, 0.0):.1f}" for k in ("forward", "backward", "update"))
        lines.append(f"| {s.label} | {tp['median_tokens_per_s'][n]:,.0f} | {tp['median_tokens_per_s'][n] / base_m:.3f} "
                     f"| {tp['wall_tokens_per_s'][n]:,.0f} | {tp['wall_tokens_per_s'][n] / base_w:.3f} "
                     f"| {tp['audits_per_step'][n]:.2f} ({kinds}) | {tp['flags_per_step'][n]:.1f} | {rounds} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="docs/", help="directory for experiment.png/.json/-table.md")
    ap.add_argument("--steps", type=int, default=200, help="training steps of the loss runs")
    ap.add_argument("--attack-start", type=int, default=10)
    ap.add_argument("--throughput-steps", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=10, help="throughput: steps skipped at the start of a run")
    ap.add_argument("--rounds", type=int, default=2, help="throughput: interleaved rounds of p=0, 0.05, 1")
    ap.add_argument("--run-timeout", type=float, default=900.0, help="limit for one testnet run (s)")
    ap.add_argument("--workdir", help="keep testnets here (default: a temporary directory, removed)")
    ap.add_argument("--only", choices=["loss", "throughput"], help="run one part only (for debugging)")
    args = ap.parse_args()

    from pipeguard.data import stdlib_corpus

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="pipeguard-experiment-"))
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    dataset = stdlib_corpus(DATA_BYTES)
    tokens_per_step = MICRO_BATCHES * MICRO_BATCH_SIZE * 64
    load_before = os.getloadavg()[0]
    report: dict = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                                "python": platform.python_version(), "load_1min_before": load_before},
                    "config": {"model": MODEL, "stages": STAGES, "attacked_stage": ATTACKED_STAGE, "seed": SEED,
                               "micro_batches": MICRO_BATCHES, "micro_batch_size": MICRO_BATCH_SIZE,
                               "steps": args.steps, "attack_start": args.attack_start,
                               "throughput_steps": args.throughput_steps, "warmup": args.warmup,
                               "rounds": args.rounds, "toml_example": run_toml(RUNS[3], args.steps)}}
    results: list[RunResult] = []
    try:
        if args.only != "throughput":
            for spec in RUNS:
                r = run_testnet(spec, args.steps, work / spec.name, args.attack_start, args.run_timeout, True, dataset)
                results.append(r)
                bans = "; ".join(f"{b['node'][:8]}{' (attacker)' if b['attacker'] else ' HONEST'} @ step {b['step']}"
                                 for b in r.bans) or "none"
                print(f"[{time.perf_counter() - t_start:5.0f}s] {spec.label:<28} train {r.final_train_loss:.4f} "
                      f"val {r.val_loss:.4f} audits {r.audits_total} bans: {bans} ({r.wall_s:.0f}s, other "
                      f"processes {r.foreign_cpu_share:.0%} CPU)", flush=True)
                for b in r.honest_bans():
                    print(f"!!! HONEST NODE BANNED in {spec.name}: {b}\n    config:\n{run_toml(spec, args.steps)}"
                          f"    events:\n      " + "\n      ".join(r.notable_events), flush=True)
            ref = reference_losses(args.steps, dataset)
            clean = results[0]
            report["reference"] = {"losses": ref, "max_abs_diff_vs_clean_pipeline": max(
                abs(a - l) for a, (_, l, _) in zip(ref, clean.history))}
        tp: dict = {"runs": {}, "median_tokens_per_s": {}, "wall_tokens_per_s": {}, "audits_per_step": {},
                    "flags_per_step": {}, "kinds_per_step": {}, "cpu_ms_per_step": {}, "round_ratios": {s.name: [] for s in THROUGHPUT}}
        if args.only != "loss":
            for rnd in range(args.rounds):
                order = THROUGHPUT if rnd % 2 == 0 else list(reversed(THROUGHPUT))
                this = {}
                for spec in order:
                    r = run_testnet(spec, args.throughput_steps, work / f"tp-{spec.name}-{rnd}", 0, args.run_timeout,
                                    False)
                    this[spec.name] = r
                    tp["runs"].setdefault(spec.name, []).append(r)
                    print(f"[{time.perf_counter() - t_start:5.0f}s] throughput round {rnd + 1} {spec.label:<20} "
                          f"{r.median_tokens_per_s(args.warmup):7,.0f} tok/s median, "
                          f"{r.wall_tokens_per_s(args.warmup, tokens_per_step):7,.0f} end to end; audits "
                          f"{r.audits_total}; bans {len(r.bans)}; other processes {r.foreign_cpu_share:.0%} CPU",
                          flush=True)
                    for b in r.honest_bans():
                        print(f"!!! HONEST NODE BANNED in throughput run {spec.name}: {b}\n      "
                              + "\n      ".join(r.notable_events), flush=True)
                base = this["p0"].median_tokens_per_s(args.warmup)
                for n, r in this.items():
                    tp["round_ratios"][n].append(r.median_tokens_per_s(args.warmup) / base)
            for s in THROUGHPUT:
                runs = tp["runs"][s.name]
                tp["median_tokens_per_s"][s.name] = statistics.median(
                    t for r in runs for st, _, t in r.history if st >= args.warmup)
                tp["wall_tokens_per_s"][s.name] = statistics.median(
                    r.wall_tokens_per_s(args.warmup, tokens_per_step) for r in runs)
                tp["audits_per_step"][s.name] = statistics.fmean(r.audits_total / r.steps for r in runs)
                tp["flags_per_step"][s.name] = statistics.fmean(r.screen_flags / r.steps for r in runs)
                tp["cpu_ms_per_step"][s.name] = {role: statistics.fmean(1000 * r.cpu_s[role] / r.steps for r in runs)
                                                 for role in runs[0].cpu_s}
                tp["kinds_per_step"][s.name] = {k: statistics.fmean(r.audit_kinds.get(k, 0) / r.steps for r in runs)
                                                for k in ("forward", "backward", "update")}
            try:
                tp["costs_ms"] = audit_costs(dataset)
            except Exception as exc:  # noqa: BLE001 - a side measurement must not cost the run's results
                print(f"timing the pieces of an audit failed: {exc!r}", file=sys.stderr)
                tp["costs_ms"] = {}
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)

    report["runs"] = [r.to_json() for r in results]
    if args.only != "loss":
        report["throughput"] = {k: v for k, v in tp.items() if k != "runs"}
        report["throughput"]["runs"] = {n: [r.to_json() for r in rs] for n, rs in tp["runs"].items()}
    report["machine"]["load_1min_after"] = os.getloadavg()[0]
    report["wall_s"] = time.perf_counter() - t_start
    deviations = [d for r in [*results, *(x for rs in tp["runs"].values() for x in rs)] for d in r.audit_deviations]
    report["honest_audit_deviation_max"] = max(deviations) if deviations else None
    report["honest_audit_count"] = len(deviations)
    (out / "experiment.json").write_text(json.dumps(report, indent=1, default=str))

    md = []
    if results:
        md += [table(results, args.attack_start), ""]
        if args.only == "loss":
            plot_losses_only(results, args.attack_start, out / "experiment.png")
        else:
            plot(results, report["throughput"], args.attack_start, out / "experiment.png")
    if args.only != "loss":
        md += [throughput_table(tp), ""]
        roles = list(tp["cpu_ms_per_step"]["p0"])
        md += ["| CPU ms per step (whole run incl. start-up) | " + " | ".join(roles) + " | total | total / p=0 "
               "| stage nodes / p=0 |", "|---|" + "---|" * (len(roles) + 3)]
        base = tp["cpu_ms_per_step"]["p0"]
        stage_roles = [r for r in roles if "stage" in r]
        for s in THROUGHPUT:
            c = tp["cpu_ms_per_step"][s.name]
            md.append(f"| {s.label} | " + " | ".join(f"{c[r]:.0f}" for r in roles) + f" | {sum(c.values()):.0f} | "
                      f"{sum(c.values()) / sum(base.values()):.2f} | "
                      f"{sum(c[r] for r in stage_roles) / sum(base[r] for r in stage_roles):.2f} |")
        md.append("")
        md += ["| piece of one audit (stage 1, in-process, 1 thread) | ms |", "|---|---|"]
        md += [f"| {k} | {v:,.2f} |" if k != "state bytes" else f"| {k} | {v:,.0f} B |"
               for k, v in tp["costs_ms"].items()]
    (out / "experiment-table.md").write_text("\n".join(md) + "\n")
    print("\n" + "\n".join(md))
    if results:
        print(f"clean pipeline vs single-process reference: max |loss difference| "
              f"{report['reference']['max_abs_diff_vs_clean_pipeline']:.2e}")
    print(f"honest audits in logs: {len(deviations)}, max deviation "
          f"{report['honest_audit_deviation_max'] if deviations else 'n/a'}")
    honest = [b for r in [*results, *(x for rs in tp['runs'].values() for x in rs)] for b in r.honest_bans()]
    print(f"honest nodes banned: {len(honest)}")
    print(f"total {report['wall_s']:.0f}s; load average {load_before:.1f} before, {report['machine']['load_1min_after']:.1f}"
          f" after; wrote {out / 'experiment.png'}, {out / 'experiment.json'}, {out / 'experiment-table.md'}")
    return 0


def plot_losses_only(results, attack_start, path):
    plot(results, {"median_tokens_per_s": {s.name: 1.0 for s in THROUGHPUT},
                   "wall_tokens_per_s": {s.name: 1.0 for s in THROUGHPUT}}, attack_start, path)


if __name__ == "__main__":
    sys.exit(main())
