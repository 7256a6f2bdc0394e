"""Step time against the number of stages and the micro-batches in flight, next to the bubble formula.

    pip install -e '.[experiment]'     # matplotlib, for the plot
    python benchmarks/stage_scaling.py --out docs/ [--stages 2,4,8,16] [--micro-batches 1,2,4,8,16]

Every point is a real testnet (``pipeguard.app.testnet.LocalTestnet``: coordinator + S node daemons
on loopback, signatures on, one torch thread per node, audits and the screen off so that the
pipeline itself is measured) training the same model (``--n-layer`` blocks, split evenly over
the stages) on the same global batch of ``--batch`` sequences per step:

* stage sweep: S in ``--stages`` with M = ``--sweep-m`` micro-batches of batch/M sequences;
* micro-batch sweep: M in ``--micro-batches`` (batch/M sequences each) at S = ``--sweep-s``.

The step time of a point is the median over its measured steps (the first ``--warmup`` are left
out) of one RunStep + ApplyUpdate round as the coordinator times it (``StatusReply.losses``).

The yardstick T1(M) is the same model, batch and micro-batching trained in this process by
``pipeguard.reference.train_reference`` with ONE torch thread: the whole step's compute, done
serially, with no network, signatures or processes. It is taken as CPU time (``process_time``),
which other processes on a shared machine barely change, so the ideal line is what an idle
machine would give. Each point also records the CPU seconds all its daemons (coordinator and
nodes, from /proc/PID/stat) used per measured step: ``CPU/T1`` is the pipeline's total CPU cost
against the bare compute (the overhead of processes, gRPC, signatures, hashing), a figure that
load from others does not skew the way wall-clock time is skewed.

Ideal line. Our schedule is GPipe with eager backwards (node/stage.py): a stage forwards
micro-batches as their inputs arrive and runs each backward as soon as its gradient is in.
With S equal stages and M micro-batches, one micro-batch's forward+backward on one stage
takes T1/(S*M), and fill plus drain leave the pipeline S-1 such slots short of full, so with a
core per stage the step takes (M + S - 1) * T1/(S*M) (the GPipe bubble; 1F1B has the same).
This machine has c cores (``os.cpu_count()``), and S processes cannot compute faster than
min(S, c) cores do: the step also takes at least T1/min(S, c). The ideal we plot is therefore

    ideal(S, M) = T1(M) * max( (M + S - 1) / (S * M),  1 / min(S, c) )

and, for reference, the unlimited-core GPipe line T1 * (M + S - 1)/(S * M). On 2 cores the
first term only dominates for small M (few micro-batches in flight), so for S > 2 the ideal is
flat at T1/2: adding stages cannot make a 2-core box faster, only the overhead per stage and
per message shows. ``measured / ideal`` is the efficiency figure.

This is a benchmark, not a test: it prints figures and asserts nothing about them. Every
testnet is cut at ``--run-timeout`` and the whole run at ``--max-seconds``. Load from other
processes skews every figure: the 1-minute load average is recorded with each point.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

RUN = {
    "model.preset": "tiny",
    "train.seed": 5, "train.warmup_steps": 2,
    "data.max_bytes": 262144,
    "audit.rate": 0.0, "audit.screen": False, "audit.checkpoint_every": 1000,
    "timeouts.heartbeat_interval": 1.0, "timeouts.heartbeat_timeout": 60.0, "timeouts.request": 60.0,
}
"""Every point's fixed settings (pipeguard.app.runconfig keys): no audits; the flags and the point give the rest."""


def ideal(t1: float, s: int, m: int, cores: int) -> float:
    return t1 * max((m + s - 1) / (s * m), 1 / min(s, cores))


def gpipe(t1: float, s: int, m: int) -> float:
    return t1 * (m + s - 1) / (s * m)


def reference_step_time(opts: argparse.Namespace, m: int) -> tuple[float, float]:
    """(CPU seconds, wall seconds) per step, single process, single thread, M micro-batches of batch/M."""
    import torch

    from pipeguard.data import stdlib_corpus
    from pipeguard.model import GPTConfig, OptimSettings
    from pipeguard.reference import train_reference

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        dataset = stdlib_corpus(262144)
        gpt = GPTConfig(block_size=opts.block_size, n_layer=opts.n_layer, n_head=opts.n_head, n_embd=opts.n_embd)
        optim = OptimSettings(lr=3e-3, warmup_steps=2, total_steps=opts.warmup + opts.steps)
        kw = dict(seed=5, micro_batches=m, micro_batch_size=opts.batch // m)
        train_reference(gpt, optim, dataset, steps=opts.warmup, **kw)  # warm-up
        c0, w0 = time.process_time(), time.perf_counter()
        train_reference(gpt, optim, dataset, steps=opts.steps, start_step=opts.warmup, **kw)
        return (time.process_time() - c0) / opts.steps, (time.perf_counter() - w0) / opts.steps
    finally:
        torch.set_num_threads(previous)


def cpu_seconds(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            f = fh.read().rsplit(")", 1)[1].split()
        return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def testnet_point(opts: argparse.Namespace, s: int, m: int, workdir: Path) -> dict:
    from pipeguard.app.runconfig import run_config
    from pipeguard.app.testnet import LocalTestnet, TestnetError
    from pipeguard.v1 import pipeguard_pb2 as pb

    run = run_config(RUN, {
        "model.n_layer": opts.n_layer, "model.n_head": opts.n_head, "model.n_embd": opts.n_embd,
        "model.block_size": opts.block_size, "train.steps": opts.warmup + opts.steps, "train.micro_batches": m,
        "train.micro_batch_size": opts.batch // m, "pipeline.stages": s, "timeouts.step": opts.run_timeout})
    t0 = time.monotonic()
    load0 = os.getloadavg()[0]
    out: dict = {"stages": s, "micro_batches": m, "micro_batch_size": opts.batch // m}
    with LocalTestnet(workdir / f"s{s}-m{m}", run) as net:
        try:
            net.start_coordinator(timeout=120)
            for _ in range(s):
                net.start_node("--log-level", "WARNING", wait=False)
            for node in net.nodes:
                node.wait_ready(timeout=180)
            pids = [net.coordinator.proc.pid] + [n.proc.pid for n in net.nodes]
            cpu0 = None
            give_up = time.monotonic() + opts.run_timeout
            for _ in range(int(opts.run_timeout / 0.2) + 1):  # poll; CPU is read when the warm-up is done
                status = net.status(timeout=60)
                if cpu0 is None and len(status.losses) >= opts.warmup:
                    cpu0, done0 = sum(cpu_seconds(p) for p in pids), len(status.losses)
                if status.phase in (pb.RUN_PHASE_FINISHED, pb.RUN_PHASE_FAILED) or time.monotonic() > give_up:
                    break
                time.sleep(0.2)
            if cpu0 is not None and len(status.losses) > done0:
                out["cpu_per_step_s"] = (sum(cpu_seconds(p) for p in pids) - cpu0) / (len(status.losses) - done0)
            if status.phase != pb.RUN_PHASE_FINISHED:
                out["error"] = f"phase {pb.RunPhase.Name(status.phase)}: " + "; ".join(
                    e.message for e in status.events[-3:])
        except TestnetError as exc:
            out["error"] = str(exc)[:500]
            status = net.status(timeout=30) if net.coordinator is not None and net.coordinator.alive() else None
    tokens = opts.batch * opts.block_size
    points = sorted(status.losses, key=lambda p: p.step) if status is not None else []
    step_s = [tokens / p.tokens_per_s for p in points if p.tokens_per_s > 0]
    measured = step_s[opts.warmup:]
    out.update({"step_times_s": step_s, "step_time_s": statistics.median(measured) if measured else float("nan"),
                "wall_s": time.monotonic() - t0, "load_avg": round((load0 + os.getloadavg()[0]) / 2, 2)})
    return out


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cores = res["cores"]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 5.4))
    for axis, key, xs_key, fixed in ((ax, "stage_sweep", "stages", f"M = {res['sweep_m']}"),
                                     (bx, "micro_batch_sweep", "micro_batches", f"S = {res['sweep_s']}")):
        pts = [p for p in res[key] if p["step_time_s"] == p["step_time_s"]]  # not NaN
        xs = [p[xs_key] for p in pts]
        axis.plot(xs, [p["step_time_s"] for p in pts], "o-", color="tab:blue", lw=2, label="measured (pipeguard)")
        axis.plot(xs, [p["ideal_s"] for p in pts], "s--", color="tab:green",
                  label=f"ideal on {cores} cores: T1·max((M+S−1)/(SM), 1/min(S,{cores}))")
        axis.plot(xs, [p["gpipe_s"] for p in pts], ":", color="tab:gray", label="GPipe, a core per stage: T1·(M+S−1)/(SM)")
        axis.plot(xs, [p["t1_s"] for p in pts], "-", color="tab:red", lw=0.8, label="T1: one process, one thread")
        axis.plot(xs, [p.get("cpu_per_step_s", float("nan")) / min(p["stages"], cores) for p in pts], "^-.",
                  color="tab:purple", lw=1, label=f"pipeguard's CPU per step / min(S,{cores}): its own floor")
        for p in pts:
            axis.annotate(f"load {p['load_avg']:.0f}", (p[xs_key], p["step_time_s"]), textcoords="offset points",
                          xytext=(0, 6), ha="center", fontsize=7, color="tab:blue")
        axis.set_xscale("log", base=2)
        axis.set_xticks(xs, [str(x) for x in xs])
        top = max([p["step_time_s"] for p in pts] + [p["t1_s"] for p in pts], default=1.0)
        axis.set_ylim(0, 1.15 * top)
        axis.set_ylabel("step time (s)")
        axis.grid(alpha=0.3)
        axis.set_title(f"step time vs {'stages S' if xs_key == 'stages' else 'micro-batches M'} ({fixed})")
        axis.set_xlabel("stages S" if xs_key == "stages" else "micro-batches in flight M")
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=3)
    fig.suptitle(f"pipeguard step time, {res['n_layer']}-block × {res['n_embd']}-wide GPT, {res['batch']} sequences "
                 f"of {res['block_size']} per step, {res['machine']} shared with other work (1-minute load average "
                 f"at each point)", fontsize=10)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", help="directory for scaling.json and scaling.png (e.g. docs/)")
    p.add_argument("--stages", default="2,4,8,16")
    p.add_argument("--micro-batches", default="1,2,4,8,16")
    p.add_argument("--sweep-m", type=int, default=8, help="micro-batches in the stage sweep")
    p.add_argument("--sweep-s", type=int, default=4, help="stages in the micro-batch sweep")
    p.add_argument("--batch", type=int, default=32, help="sequences per step (divisible by every M)")
    p.add_argument("--n-layer", type=int, default=16)
    p.add_argument("--n-embd", type=int, default=64)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=4, help="measured steps per point")
    p.add_argument("--warmup", type=int, default=2, help="steps left out at the start of each point")
    p.add_argument("--run-timeout", type=float, default=600.0, help="cap on one testnet")
    p.add_argument("--max-seconds", type=float, default=3000.0, help="cap on the whole run (later points skipped)")
    p.add_argument("--plot-only", metavar="JSON", help="redraw the plot from a scaling.json into --out, run nothing")
    opts = p.parse_args(argv)
    if opts.plot_only:
        plot(json.loads(Path(opts.plot_only).read_text()), Path(opts.out or ".") / "scaling.png")
        return 0
    stages = [int(x) for x in opts.stages.split(",")]
    mbs = [int(x) for x in opts.micro_batches.split(",")]
    for m in mbs + [opts.sweep_m]:
        if opts.batch % m:
            p.error(f"--batch {opts.batch} is not divisible by M = {m}")
    for s in stages + [opts.sweep_s]:
        if s > opts.n_layer:
            p.error(f"S = {s} exceeds --n-layer {opts.n_layer}")
    deadline = time.monotonic() + opts.max_seconds
    cores = os.cpu_count() or 1
    res: dict = {"machine": f"{platform.machine()}, {cores} CPUs", "cores": cores, "n_layer": opts.n_layer,
                 "n_embd": opts.n_embd, "n_head": opts.n_head, "block_size": opts.block_size, "batch": opts.batch,
                 "sweep_m": opts.sweep_m, "sweep_s": opts.sweep_s, "steps": opts.steps, "warmup": opts.warmup,
                 "formula": "ideal = T1(M) * max((M + S - 1) / (S * M), 1 / min(S, cores))",
                 "load_avg_start": [round(x, 2) for x in os.getloadavg()]}
    print(f"stage scaling: {opts.n_layer} blocks x {opts.n_embd} wide, {opts.batch} x {opts.block_size} tokens per "
          f"step, {cores} cores; load average {res['load_avg_start']}", flush=True)
    t1: dict[int, float] = {}
    t1_wall: dict[int, float] = {}
    for m in sorted(set(mbs + [opts.sweep_m])):
        t1[m], t1_wall[m] = reference_step_time(opts, m)
        print(f"  T1(M={m:>2}) = {t1[m]:.3f} CPU s per step (one process, one thread; wall {t1_wall[m]:.3f} s)",
              flush=True)
    res["t1_s"] = {str(m): v for m, v in t1.items()}
    res["t1_wall_s"] = {str(m): v for m, v in t1_wall.items()}
    workdir = Path(tempfile.mkdtemp(prefix="pipeguard-scaling-"))
    done: dict[tuple[int, int], dict] = {}
    plan = [("stage_sweep", s, opts.sweep_m) for s in stages] + \
           [("micro_batch_sweep", opts.sweep_s, m) for m in mbs]
    for key in ("stage_sweep", "micro_batch_sweep"):
        res[key] = []
    for key, s, m in plan:
        if (s, m) not in done:
            if time.monotonic() > deadline:
                print(f"  S={s:>2} M={m:>2}: skipped (--max-seconds reached)", flush=True)
                continue
            pt = testnet_point(opts, s, m, workdir)
            pt.update({"t1_s": t1[m], "ideal_s": ideal(t1[m], s, m, cores), "gpipe_s": gpipe(t1[m], s, m)})
            pt["efficiency"] = pt["ideal_s"] / pt["step_time_s"] if pt["step_time_s"] > 0 else float("nan")
            pt["cpu_overhead"] = pt.get("cpu_per_step_s", float("nan")) / t1[m]
            done[(s, m)] = pt
            print(f"  S={s:>2} M={m:>2}: step {pt['step_time_s']:.3f} s, ideal {pt['ideal_s']:.3f} s "
                  f"(ideal/measured {pt['efficiency']:.2f}), CPU {pt.get('cpu_per_step_s', float('nan')):.3f} s "
                  f"per step = {pt['cpu_overhead']:.2f} x T1, load {pt['load_avg']}"
                  + (f"  ERROR {pt['error'][:200]}" if "error" in pt else ""), flush=True)
        res[key].append(done[(s, m)])
    res["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]

    print()
    print(f"{'sweep':<18} {'S':>3} {'M':>3} {'T1 s':>7} {'GPipe s':>8} {'ideal s':>8} {'measured s':>10} "
          f"{'ideal/meas':>10} {'CPU/step':>8} {'CPU/T1':>6} {'load':>5}")
    for key in ("stage_sweep", "micro_batch_sweep"):
        for pt in res[key]:
            print(f"{key:<18} {pt['stages']:>3} {pt['micro_batches']:>3} {pt['t1_s']:>7.3f} {pt['gpipe_s']:>8.3f} "
                  f"{pt['ideal_s']:>8.3f} {pt['step_time_s']:>10.3f} {pt['efficiency']:>10.2f} "
                  f"{pt.get('cpu_per_step_s', float('nan')):>8.3f} {pt['cpu_overhead']:>6.2f} {pt['load_avg']:>5}")
    print(f"\n{res['formula']}; load average {res['load_avg_start']} at start, {res['load_avg_end']} at end")
    if opts.out:
        out = Path(opts.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "scaling.json").write_text(json.dumps(res, indent=2) + "\n")
        try:
            plot(res, out / "scaling.png")
        except ImportError:
            print("matplotlib is missing (pip install -e '.[experiment]'): no plot", file=sys.stderr)
        print(f"wrote {out / 'scaling.json'} and {out / 'scaling.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
