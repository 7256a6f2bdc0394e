"""What audits cost: tokens/s, CPU, audit lag and bytes fetched against the audit rate p.

    python benchmarks/audit_cost.py --out docs/            # p = 0, 0.01, 0.05, 0.2, 0.5, 1; 2 rounds
    python benchmarks/audit_cost.py --quick                # p = 0, 0.05, 1; 1 round, 12 steps (< 5 min)
    python benchmarks/audit_cost.py --rates 0,1 --rounds 3 --steps 20

Every run is a ``pipeguard.app.testnet.LocalTestnet`` on loopback: a coordinator and four node
daemons (three stages of the ``tiny`` GPT, registered in order, and one standby), signatures
on, one torch thread per daemon, honest, screen on, audits at rate p. The rates run in
interleaved rounds (every rate once per round, in turn), so load from other processes falls on
all alike, and each run is compared with the p = 0 run of its own round. A first p = 0 run of 10
steps is discarded (``--no-settle-run`` skips it): started on an idle machine, a run costs up to
a third fewer CPU-seconds per step than under sustained load, which made round 0's baseline light.

Per rate (means over rounds of the per-round ratios):

- ``tokens_per_s_ratio``: median per-step tokens/s after ``--warmup`` steps (the coordinator times
  RunStep + ApplyUpdate) over p = 0's;
- ``wall_tokens_per_s_ratio``: the same end to end (first to last ``step`` event after warm-up);
- ``cpu_ratio``: CPU seconds of all five daemons per step (``/proc/PID/stat``) over p = 0's;
- ``max_audit_lag_steps``: the coordinator's ``StatusReply.max_audit_lag_steps`` (the most steps
  the run completed after an audited step while its audit still ran; the clock waits only when
  it reaches ``audit.retention``);
- ``audit_wait_s_per_step``: seconds per step the step clock spent waiting for audits
  (``StatusReply.audit_wait_s`` over the steps run): the pipeline waiting on audits, not working;
- ``audits`` (dispatched), ``audits_per_step``, ``honest_bans`` (every node is honest: must be 0);
- ``peak_rss_mb``: each daemon's peak resident memory (``VmHWM``);
- ``bytes_per_audited_step_ratio``: state bytes the auditors fetched (their
  ``pipeguard_node_audit_state_bytes_fetched`` metric) over (audited stage-steps x the stage's
  state bytes: weights and both AdamW moments), audited stage-steps counted from the auditors'
  logs. Auditors fetch whole states, so this ratio does not depend on the model's size: it is
  reported as ``bytes_per_audited_step_ratio_gpt2`` too (tensor fetches, a few activations per
  audit, are left out: at the ``gpt2`` preset they are under 1% of a stage's state).

Writes ``audit-cost.json`` (and ``audit-cost.png``, the curve against the ideal 1 + p, when
matplotlib is installed: ``pip install -e '.[experiment]'``) under ``--out``; prints one summary
line per rate. Asserts nothing; an honest ban is printed loudly.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import socket
import statistics
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT, ROOT / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from experiment import cpu_seconds  # noqa: E402

STAGES = 3
MICRO_BATCHES = 8
MICRO_BATCH_SIZE = 8
RUN = {
    "model.preset": "tiny", "train.seed": 1234,
    "train.micro_batches": MICRO_BATCHES, "train.micro_batch_size": MICRO_BATCH_SIZE,
    "pipeline.stages": STAGES, "pipeline.min_nodes": STAGES + 1,
    "timeouts.heartbeat_interval": 0.5, "timeouts.heartbeat_timeout": 15.0,
    "audit.screen": True,
}
"""Every run's config (pipeguard.app.runconfig keys); each run adds its steps and audit rate."""
FULL_RATES = [0.0, 0.01, 0.05, 0.2, 0.5, 1.0]
QUICK_RATES = [0.0, 0.05, 1.0]
AUDIT_LINE = re.compile(r"audit \d+ \((forward|backward|update) step (\d+) stage (\d+) mb")


@dataclass
class Run:
    p: float
    round: int
    steps: int = 0
    tokens_per_s: float = math.nan
    wall_tokens_per_s: float = math.nan
    cpu_s: dict[str, float] = field(default_factory=dict)
    """CPU-seconds per daemon from the first step after the warm-up to the end (no start-up)."""
    cpu_steps: int = 0
    """Steps ``cpu_s`` covers."""
    peak_rss_mb: dict[str, float] = field(default_factory=dict)
    audits: int = 0
    max_audit_lag_steps: int = 0
    audit_wait_s: float = 0.0
    """Seconds the coordinator's step clock waited for audits (``StatusReply.audit_wait_s``)."""
    honest_bans: int = 0
    state_bytes_fetched: int = 0
    audited_stage_steps: int = 0
    audits_by_kind: dict[str, int] = field(default_factory=dict)
    wall_s: float = 0.0
    load_before: float = 0.0
    """1-minute load average when the run started."""

    @property
    def cpu_per_step(self) -> float:
        return sum(self.cpu_s.values()) / max(self.cpu_steps, 1)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def proc_peak_rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return math.nan


def scrape(address: str, name: str) -> float:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return 0.0


def stage_state_bytes() -> list[int]:
    """Bytes of each stage's state (weights and both AdamW moments), as auditors fetch it."""
    from pipeguard.app.runconfig import run_config
    from pipeguard.computation import StageComputation, StageSetup

    cfg = run_config(RUN, {"train.steps": 1})
    out = []
    for stage in range(STAGES):
        setup = StageSetup.from_specs(cfg.model_spec(), cfg.train_spec(), stage, STAGES)
        comp = StageComputation.build(setup)
        # AdamW's moments exist once it has stepped: count them as the weights' size, twice
        params = sum(p.numel() * p.element_size() for p in comp.module.parameters())
        out.append(3 * params)
    return out


def run_once(p: float, rnd: int, steps: int, warmup: int, workdir: Path, timeout: float) -> Run:
    from pipeguard.app.runconfig import run_config
    from pipeguard.app.testnet import LocalTestnet
    from pipeguard.v1 import pipeguard_pb2 as pb

    shutil.rmtree(workdir, ignore_errors=True)
    res = Run(p=p, round=rnd, load_before=os.getloadavg()[0])
    net = LocalTestnet(workdir, run_config(RUN, {"train.steps": steps, "audit.rate": p}))
    t0 = time.perf_counter()
    try:
        net.start_coordinator()
        for i in range(STAGES + 1):
            cfg = workdir / f"node{i}.toml"
            cfg.write_text(f"[net]\nmetrics_port = {free_port()}\n")
            net.start_node("--config", str(cfg))
            net.wait_registered(i + 1)
        daemons = {"coordinator": net.coordinator, **{f"node{i}" + (" (standby)" if i == STAGES else f" (stage {i})"): n
                                                      for i, n in enumerate(net.nodes)}}
        # CPU from the warm-up on: start-up (imports, the first step's set-up) is not audit cost
        deadline = time.monotonic() + timeout
        while (first := net.status(history=1).step) < warmup and time.monotonic() < deadline:
            time.sleep(0.05)
        cpu0 = {role: cpu_seconds(d.proc.pid) for role, d in daemons.items()}
        net.wait_finished(timeout=timeout)
        status = net.status(history=5000)
        res.cpu_steps = status.step - first
        for role, d in daemons.items():
            res.cpu_s[role] = cpu_seconds(d.proc.pid) - cpu0[role]
            res.peak_rss_mb[role] = proc_peak_rss_mb(d.proc.pid)
        for node in net.nodes:
            res.state_bytes_fetched += int(scrape(node.info["metrics"], "pipeguard_node_audit_state_bytes_fetched_total"))
    finally:
        net.stop()
        net.kill()
    res.wall_s = time.perf_counter() - t0
    res.steps = status.step
    hist = sorted(status.losses, key=lambda q: q.step)
    res.tokens_per_s = statistics.median(q.tokens_per_s for q in hist if q.step >= warmup)
    times = sorted(e.time for e in status.events if e.kind == "step" and e.step >= warmup - 1)
    tokens = MICRO_BATCHES * MICRO_BATCH_SIZE * 64  # the tiny preset's context
    if len(times) > 1:
        res.wall_tokens_per_s = tokens * (len(times) - 1) / (times[-1] - times[0])
    res.audits = status.audits_total
    res.max_audit_lag_steps = status.max_audit_lag_steps
    res.audit_wait_s = status.audit_wait_s
    res.honest_bans = sum(1 for n in status.nodes if n.role == pb.ROLE_BANNED)
    audited: set[tuple[int, int]] = set()
    for node in net.nodes:
        for line in node.log_path.read_text(errors="replace").splitlines():
            m = AUDIT_LINE.search(line)
            if m:
                audited.add((int(m.group(2)), int(m.group(3))))
                res.audits_by_kind[m.group(1)] = res.audits_by_kind.get(m.group(1), 0) + 1
    res.audited_stage_steps = len(audited)
    return res


def summarise(runs: list[Run], state_bytes: list[int]) -> list[dict]:
    base = {r.round: r for r in runs if r.p == 0}
    out = []
    mean_state = statistics.fmean(state_bytes)
    for p in sorted({r.p for r in runs}):
        mine = [r for r in runs if r.p == p]
        ratio = lambda f: statistics.fmean(f(r) / f(base[r.round]) for r in mine)  # noqa: E731
        audited = sum(r.audited_stage_steps for r in mine)
        fetched = sum(r.state_bytes_fetched for r in mine)
        out.append({
            "p": p,
            "tokens_per_s_ratio": ratio(lambda r: r.tokens_per_s),
            "wall_tokens_per_s_ratio": ratio(lambda r: r.wall_tokens_per_s),
            "cpu_ratio": ratio(lambda r: r.cpu_per_step),
            "ideal_cpu_ratio": 1 + p,
            "tokens_per_s": statistics.fmean(r.tokens_per_s for r in mine),
            "cpu_s_per_step": statistics.fmean(r.cpu_per_step for r in mine),
            "max_audit_lag_steps": max(r.max_audit_lag_steps for r in mine),
            "audit_wait_s_per_step": statistics.fmean(r.audit_wait_s / max(r.steps, 1) for r in mine),
            "audits": sum(r.audits for r in mine),
            "audits_per_step": statistics.fmean(r.audits / max(r.steps, 1) for r in mine),
            "audits_by_kind": {k: sum(r.audits_by_kind.get(k, 0) for r in mine) for k in ("forward", "backward", "update")},
            "honest_bans": sum(r.honest_bans for r in mine),
            "peak_rss_mb": {role: max(r.peak_rss_mb[role] for r in mine) for role in mine[0].peak_rss_mb},
            "bytes_per_audited_step_ratio": fetched / (audited * mean_state) if audited else None,
            "load_before": [r.load_before for r in mine],
        })
    return out


def plot(rows: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    ps = [r["p"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(ps, [r["cpu_ratio"] for r in rows], "o-", label="measured")
    a.plot(ps, [1 + p for p in ps], "--", label="ideal 1 + p")
    a.set_xlabel("audit rate p")
    a.set_ylabel("CPU per step / p = 0")
    a.legend()
    b.plot(ps, [r["tokens_per_s_ratio"] for r in rows], "o-", label="measured (per step)")
    b.plot(ps, [r["wall_tokens_per_s_ratio"] for r in rows], "s:", label="measured (end to end)")
    b.plot(ps, [1 / (1 + p) for p in ps], "--", label="ideal, CPU-bound: 1 / (1 + p)")
    b.set_xlabel("audit rate p")
    b.set_ylabel("tokens/s / p = 0")
    b.legend()
    fig.suptitle("pipeguard: audit cost against the audit rate (tiny model, 3 stages + standby, 2 cores)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, default=None, help="write audit-cost.json (and .png) here")
    ap.add_argument("--json", type=Path, default=None, help="also write the JSON report to this file")
    ap.add_argument("--quick", action="store_true", help="p = 0, 0.05, 1; one round of 12 steps")
    ap.add_argument("--rates", default=None, help="comma-separated audit rates (0 is always added)")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 2; --quick 1)")
    ap.add_argument("--steps", type=int, default=None, help="steps per run (default 30; --quick 12)")
    ap.add_argument("--warmup", type=int, default=2, help="steps left out of the tokens/s figures (default 2)")
    ap.add_argument("--run-timeout", type=float, default=300.0, help="wall-time bound per run, seconds")
    ap.add_argument("--no-settle-run", dest="settle_run", action="store_false",
                    help="skip the discarded p = 0 run that puts the machine under load before round 0")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    import torch

    args = parse(argv)
    torch.set_num_threads(1)
    rates = [float(x) for x in args.rates.split(",")] if args.rates else QUICK_RATES if args.quick else FULL_RATES
    rates = sorted(set([0.0, *rates]))
    rounds = args.rounds or (1 if args.quick else 2)
    steps = args.steps or (12 if args.quick else 30)
    state_bytes = stage_state_bytes()
    tmp = Path(tempfile.mkdtemp(prefix="pipeguard-audit-cost-"))
    runs: list[Run] = []
    t0 = time.monotonic()
    total = rounds * len(rates)
    try:
        if args.settle_run:
            # Discarded: on this shared machine the first run after an idle spell costs up to a third
            # fewer CPU-seconds per step than the same run under sustained load (CPU clocks settle),
            # which would make its round's p = 0 baseline light and every ratio of that round high.
            r = run_once(0.0, -1, min(steps, 10), args.warmup, tmp / "settle", args.run_timeout)
            print(f"[settle] p=0 run discarded: {r.cpu_per_step:.2f} CPU-s/step (load {r.load_before:.1f})", flush=True)
        for rnd in range(rounds):
            for p in rates:
                r = run_once(p, rnd, steps, args.warmup, tmp / f"r{rnd}-p{p}", args.run_timeout)
                runs.append(r)
                print(f"[{len(runs)}/{total}] round {rnd} p={p:g}: {r.tokens_per_s:,.0f} tok/s, "
                      f"{r.cpu_per_step:.2f} CPU-s/step, {r.audits} audits, lag {r.max_audit_lag_steps}, "
                      f"clock waited {r.audit_wait_s:.1f} s, "
                      f"{r.wall_s:.0f} s (load {r.load_before:.1f})", flush=True)
                if r.honest_bans:
                    print(f"!!! HONEST NODE BANNED at p={p:g} round {rnd}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rows = summarise(runs, state_bytes)
    gpt2 = next((r["bytes_per_audited_step_ratio"] for r in reversed(rows) if r["bytes_per_audited_step_ratio"]), None)
    report = {
        "meta": {"command": "python benchmarks/audit_cost.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                 "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                 "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
                 "rounds": rounds, "steps": steps, "warmup": args.warmup, "stage_state_bytes": state_bytes,
                 "wall_min": (time.monotonic() - t0) / 60},
        "rates": rows,
        "bytes_per_audited_step_ratio_gpt2": gpt2,
        "runs": [asdict(r) for r in runs],
    }
    for r in rows:
        b = r["bytes_per_audited_step_ratio"]
        print(f"p={r['p']:<5g} tokens/s {r['tokens_per_s_ratio']:.2f}x (end to end {r['wall_tokens_per_s_ratio']:.2f}x)"
              f"  CPU {r['cpu_ratio']:.2f}x (ideal {1 + r['p']:.2f}x)  audits {r['audits_per_step']:.1f}/step"
              f"  max lag {r['max_audit_lag_steps']} steps"
              f"  clock waited {1e3 * r['audit_wait_s_per_step']:.0f} ms/step  honest bans {r['honest_bans']}"
              f"  bytes/audited stage-step {'-' if b is None else f'{b:.2f}'}x state", flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=1))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "audit-cost.json").write_text(json.dumps(report, indent=1))
        drawn = plot(rows, args.out / "audit-cost.png")
        print(f"wrote {args.out / 'audit-cost.json'}" + (f" and {args.out / 'audit-cost.png'}" if drawn else
                                                          " (no plot: matplotlib is not installed)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
