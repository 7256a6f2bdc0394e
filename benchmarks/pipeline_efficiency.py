"""Tokens/s of a 2-stage pipeline (two node processes, one torch thread each) vs. one process with two.

    python benchmarks/pipeline_efficiency.py [--micro-batches 8] [--micro-batch-size 8] [--steps 7]
                                             [--rounds 3] [--one-thread] [--json PATH]

Pipeline: ``pipeguard.app.testnet.LocalTestnet`` — a coordinator and two node daemons as local
processes on loopback, signatures on, nodes at their default of one torch thread. Its tokens/s
per step come from the coordinator's status (``StatusReply.losses[i].tokens_per_s``: one
RunStep + ApplyUpdate round, as the coordinator times it). Audits are off unless asked for
(``--audit-rate``, ``--screen``): this measures the pipeline itself; audits cost what their
rate says on top.

Single process: ``pipeguard.reference.train_reference`` after ``torch.set_num_threads(2)``,
same model, seed, data, micro-batches and micro-batch size. It is called one step at a time
(``steps=1, start_step=s``) so that it too gives one figure per step; building the model is
outside its timer, and a fresh optimizer costs well under 1% of a step here.

The first ``--warmup`` steps of every pipeline run are skipped (connections, allocations); the
single process runs step 0 once, up front, to warm up. Pipeline runs alternate with single-process
blocks of the same measured steps (S P S P S ...), and each pipeline run is compared with the
mean of the blocks just before and after it, so that load from other processes on a shared
machine falls on both sides; the headline ratio is the median of those round ratios. The GPipe
bound M/(M+S-1) is printed for context. Everything stops at ``--max-seconds`` (blocks are cut
short, keeping what they measured). This is a benchmark, not a test: it prints figures and
asserts nothing about them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

GOAL_RATIO = 0.85
STAGES = 2

RUN = {"model.preset": "small", "train.warmup_steps": 2, "pipeline.stages": STAGES}
"""The run's fixed settings (pipeguard.app.runconfig keys); the flags give the rest."""


class CpuMeter:
    """How much of the machine other processes used while a block ran (Linux /proc/stat).

    Two torch threads in one process lose far more than their share when a third busy
    process takes a core (each parallel region waits for the descheduled thread), so a
    single-process figure measured under foreign load is not comparable; this says when.
    """

    def __init__(self) -> None:
        self.tick = os.sysconf("SC_CLK_TCK")
        self.start = self._sample()

    def _sample(self) -> tuple[float, float, float]:
        try:
            with open("/proc/stat") as fh:
                v = [int(x) for x in fh.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
        except OSError:
            v = [0] * 8
        busy = (sum(v) - v[3] - v[4]) / self.tick
        t = os.times()  # this process and its reaped children (the daemons, once stopped)
        return time.perf_counter(), busy, t.user + t.system + t.children_user + t.children_system

    def foreign_share(self) -> float:
        """Share of all CPUs' time since the start that went to processes other than ours."""
        now = self._sample()
        wall, busy, ours = (now[i] - self.start[i] for i in range(3))
        return max(0.0, (busy - ours) / (wall * (os.cpu_count() or 1))) if wall > 0 else 0.0


def wait_quiet(max_wait: float, threshold: float = 0.1) -> float:
    """Wait (at most ~``max_wait`` s) for a 1 s window in which other processes use < ``threshold`` of the CPUs."""
    share = 0.0
    for _ in range(max(0, int(max_wait))):
        meter = CpuMeter()
        time.sleep(1.0)
        share = meter.foreign_share()
        if share < threshold:
            break
    return share


def median(values: list[float]) -> float:
    """The median, or NaN for no values (a run cut short before its first measured step)."""
    return statistics.median(values) if values else float("nan")


def key_value(text: str) -> tuple[str, str]:
    """``--set``'s argument: a run config key and its value (checked when the run is built)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. net.chunk_bytes=2097152), got {text!r}")
    return key, value


def pipeline_run(opts: argparse.Namespace, workdir: Path, deadline: float) -> dict:
    """One testnet run; per-step tokens/s and losses from the coordinator's status.

    Stops at ``deadline`` (monotonic) once the warm-up and one measured step are done, or at
    ``--run-timeout``, keeping the steps completed so far.
    """
    from pipeguard.app.runconfig import run_config
    from pipeguard.app.testnet import LocalTestnet, TestnetError
    from pipeguard.v1 import pipeguard_pb2 as pb

    run = run_config(RUN, {
        "model.n_layer": opts.n_layer, "model.n_head": opts.n_head, "model.n_embd": opts.n_embd,
        "model.block_size": opts.block_size, "train.steps": opts.steps, "train.micro_batches": opts.micro_batches,
        "train.micro_batch_size": opts.micro_batch_size, "train.seed": opts.seed, "data.max_bytes": opts.data_bytes,
        "timeouts.step": opts.step_timeout, "audit.rate": opts.audit_rate, "audit.screen": opts.screen},
        dict(opts.set))
    net = LocalTestnet(workdir, run)
    t0 = time.monotonic()
    give_up = t0 + opts.run_timeout
    try:
        net.start_coordinator()
        for i in range(STAGES):
            net.start_node()
            net.wait_registered(i + 1)
        for _ in range(int(opts.run_timeout / 0.2) + 1):
            status = net.status()
            if status.phase == pb.RUN_PHASE_FAILED:
                raise TestnetError("run failed: " + "; ".join(e.message for e in status.events[-5:]))
            done = len(status.losses)
            if status.phase == pb.RUN_PHASE_FINISHED or time.monotonic() > give_up or (
                    time.monotonic() > deadline and done > opts.warmup):
                break
            time.sleep(0.2)
    except Exception:
        for d in [net.coordinator, *net.nodes]:
            if d is not None:
                print(f"--- {d.name} log tail:\n{d.log_tail(15)}", file=sys.stderr)
        raise
    finally:
        net.stop()
        net.kill()
    points = sorted(status.losses, key=lambda p: p.step)
    return {
        "steps": [p.step for p in points],
        "tokens_per_s": [p.tokens_per_s for p in points],
        "losses": [p.loss for p in points],
        "wall_s": time.monotonic() - t0,
    }


def reference_run(opts: argparse.Namespace, threads: int, steps: range, deadline: float = float("inf")) -> dict:
    """``train_reference`` one step at a time for each of ``steps`` (at least one; none after ``deadline``)."""
    import torch

    from pipeguard.data import stdlib_corpus
    from pipeguard.model import GPTConfig, OptimSettings
    from pipeguard.reference import train_reference

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        dataset = stdlib_corpus(opts.data_bytes)
        gpt = GPTConfig(block_size=opts.block_size, n_layer=opts.n_layer, n_head=opts.n_head, n_embd=opts.n_embd)
        optim = OptimSettings(lr=3e-3, warmup_steps=2, total_steps=opts.steps)  # the run's [train] values
        done, tps, losses = [], [], []
        t0 = time.monotonic()
        for step in steps:
            if done and time.monotonic() > deadline:
                break
            r = train_reference(gpt, optim, dataset, seed=opts.seed, steps=1, start_step=step,
                                micro_batches=opts.micro_batches, micro_batch_size=opts.micro_batch_size)
            done.append(step)
            tps.append(r.tokens_per_s)
            losses.append(r.losses[0])
        return {"steps": done, "tokens_per_s": tps, "losses": losses, "wall_s": time.monotonic() - t0,
                "threads": threads}
    finally:
        torch.set_num_threads(previous)


def report(r: dict) -> None:
    o = r["config"]
    print(f"pipeline efficiency: GPT {o['n_layer']} layers x {o['n_embd']} wide, {o['n_head']} heads, "
          f"block {o['block_size']}; batch {o['micro_batches']} micro-batches x {o['micro_batch_size']} sequences "
          f"= {r['tokens_per_step']} tokens/step; audits {'at rate ' + str(o['audit_rate']) if o['audit_rate'] else 'off'}"
          f", screen {'on' if o['screen'] else 'off'}; {len(r['pipeline_runs'])} pipeline runs (first {o['warmup']} "
          f"steps skipped) between {len(r['reference_runs'])} single-process blocks of the same measured steps "
          f"({r['cpus']} CPUs, 1-min load {r['load_average_1min']['before']:.1f} before, "
          f"{r['load_average_1min']['after']:.1f} after, {r['wall_s']:.0f}s in all)")
    for i, (p, ratio) in enumerate(zip(r["pipeline_runs"], r["round_ratios"])):
        before, after = r["reference_runs"][i], r["reference_runs"][i + 1]
        print(f"  round {i + 1}: pipeline {median(p['tokens_per_s'][o['warmup']:]):6.0f} tok/s "
              f"({max(0, len(p['tokens_per_s']) - o['warmup'])} steps); single process before/after "
              f"{median(before['tokens_per_s']):6.0f} / {median(after['tokens_per_s']):6.0f} "
              f"tok/s; ratio {ratio:.2f}; other processes' CPU share during pipeline/before/after "
              f"{p['foreign_cpu_share']:.0%} / {before['foreign_cpu_share']:.0%} / {after['foreign_cpu_share']:.0%}")
    print(f"  pipeline, 2 stages x 1 thread (signed gRPC):  {r['pipeline_tokens_per_s']:7.0f} tok/s  (median of steps)")
    print(f"  single process, 2 threads:                    {r['reference_tokens_per_s']:7.0f} tok/s  (median of steps)")
    if "reference_1thread_tokens_per_s" in r:
        print(f"  single process, 1 thread:                     {r['reference_1thread_tokens_per_s']:7.0f} tok/s  "
              f"(2 threads are {r['thread_scaling']:.2f}x one)")
    print(f"  best steps: pipeline {r['pipeline_best_tokens_per_s']:.0f}, single process "
          f"{r['reference_best_tokens_per_s']:.0f} tok/s, ratio "
          f"{r['pipeline_best_tokens_per_s'] / r['reference_best_tokens_per_s']:.2f} (less sensitive to other load)")
    worst = max(b["foreign_cpu_share"] for b in [*r["pipeline_runs"], *r["reference_runs"]])
    if worst > 0.1:
        print(f"  WARNING: other processes used up to {worst:.0%} of the CPUs during a block; figures from such "
              "blocks (the single process most) are not representative: rerun on an idle machine")
    verdict = ("not judged: machine busy" if worst > 0.1 else
               "meets goal" if r["ratio"] >= r["goal_ratio"] else "BELOW goal")
    print(f"  ratio pipeline/single process: {r['ratio']:.2f} (median of rounds; ratio of medians "
          f"{r['ratio_of_medians']:.2f}); goal >= {r['goal_ratio']} -> {verdict}")
    print(f"  GPipe bubble bound M/(M+S-1) = {o['micro_batches']}/({o['micro_batches']}+{STAGES}-1) "
          f"= {r['bubble_bound']:.3f}")
    same = r["step0_loss_pipeline"] - r["step0_loss_reference"]
    print(f"  step-0 loss: pipeline {r['step0_loss_pipeline']:.6f}, single process {r['step0_loss_reference']:.6f} "
          f"(difference {same:+.1e})")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--micro-batches", type=int, default=8, help="micro-batches per step, M (default 8)")
    p.add_argument("--micro-batch-size", type=int, default=8, help="sequences per micro-batch (default 8)")
    p.add_argument("--n-layer", type=int, default=4, help="transformer blocks (default 4)")
    p.add_argument("--n-embd", type=int, default=256, help="width (default 256)")
    p.add_argument("--n-head", type=int, default=4, help="attention heads (default 4)")
    p.add_argument("--block-size", type=int, default=128, help="sequence length (default 128)")
    p.add_argument("--steps", type=int, default=7, help="steps per pipeline run, warm-up included (default 7)")
    p.add_argument("--warmup", type=int, default=2, help="steps skipped at the start of each run (default 2)")
    p.add_argument("--rounds", type=int, default=3, help="pipeline runs, each between two single-process blocks "
                   "(default 3)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--data-bytes", type=int, default=1 << 20, help="standard-library corpus size (default 1 MiB)")
    p.add_argument("--one-thread", action="store_true", help="also time the single process with one thread")
    p.add_argument("--audit-rate", type=float, default=0.0, help="[audit] rate of the run (default 0: the "
                   "pipeline alone; the project default is 0.05)")
    p.add_argument("--screen", action="store_true", help="let the statistical screen force audits ([audit] screen)")
    p.add_argument("--set", action="append", default=[], type=key_value, metavar="KEY=VALUE",
                   help="change one more setting of the run (repeatable), e.g. --set net.chunk_bytes=2097152")
    p.add_argument("--quiet-wait", type=float, default=3.0, help="before each block, wait up to this many seconds "
                   "for other processes to leave the CPUs idle (default 3)")
    p.add_argument("--max-seconds", type=float, default=140.0, help="wrap up after this long (default 140)")
    p.add_argument("--step-timeout", type=float, default=120.0, help="[timeouts] step of the run, seconds")
    p.add_argument("--run-timeout", type=float, default=150.0, help="stop a pipeline run after this long")
    p.add_argument("--keep", metavar="DIR", help="keep the testnets' logs and state under DIR")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    opts = p.parse_args(argv)
    if not (1 <= opts.micro_batches <= 1024 and 1 <= opts.micro_batch_size and 1 <= opts.rounds <= 20
            and 0 <= opts.warmup < opts.steps <= 1000 and opts.n_layer >= STAGES and opts.max_seconds > 0):
        p.error("need 1 <= micro-batches <= 1024, micro-batch-size >= 1, 1 <= rounds <= 20, "
                f"0 <= warmup < steps <= 1000, n-layer >= {STAGES}, max-seconds > 0")
    return opts


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    # `timeout` and Ctrl-C unwind through the finally blocks that stop the daemons
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    start = time.monotonic()
    deadline = start + opts.max_seconds
    load_before = os.getloadavg()[0]
    measured_steps = range(opts.warmup, opts.steps)

    def block(label: str, fn, *args, **kwargs) -> dict:
        quiet = wait_quiet(opts.quiet_wait if time.monotonic() < deadline else 0)
        meter = CpuMeter()
        out = fn(*args, **kwargs)
        out["foreign_cpu_share_before"] = quiet
        out["foreign_cpu_share"] = meter.foreign_share()
        tps = out["tokens_per_s"][opts.warmup:] if label == "pipeline" else out["tokens_per_s"]
        print(f"  [{time.monotonic() - start:4.0f}s] {label}: {median(tps):6.0f} "
              f"tok/s over {len(tps)} steps, other processes' CPU share {out['foreign_cpu_share']:.0%}", flush=True)
        return out

    # Warm-up of the single process (step 0); also gives the step-0 loss to check the pipeline against.
    warm = reference_run(opts, threads=2, steps=range(0, 1))
    reference_runs = [block("single process", reference_run, opts, 2, measured_steps, deadline)]
    pipeline_runs = []
    with tempfile.TemporaryDirectory(prefix="pipeguard-bench-") as tmp:
        root = Path(opts.keep) if opts.keep else Path(tmp)
        for i in range(opts.rounds):
            if i > 0 and time.monotonic() > deadline:
                print(f"  (time budget of {opts.max_seconds:.0f}s spent after {i} rounds)")
                break
            pipeline_runs.append(block("pipeline", pipeline_run, opts, root / f"round{i + 1}", deadline))
            reference_runs.append(block("single process", reference_run, opts, 2, measured_steps, deadline))
    one_thread = None
    if opts.one_thread:
        one_thread = block("single process, 1 thread", reference_run, opts, 1, measured_steps, deadline)

    warmup = opts.warmup
    pipe_rounds = [median(p["tokens_per_s"][warmup:]) for p in pipeline_runs]
    ref_blocks = [median(r["tokens_per_s"]) for r in reference_runs]
    round_ratios = [p / ((ref_blocks[i] + ref_blocks[i + 1]) / 2) for i, p in enumerate(pipe_rounds)]
    pipe = median([v for p in pipeline_runs for v in p["tokens_per_s"][warmup:]])
    ref = median([v for r in reference_runs for v in r["tokens_per_s"]])
    result = {
        "benchmark": "pipeline_efficiency",
        "config": {k: getattr(opts, k) for k in ("n_layer", "n_embd", "n_head", "block_size", "micro_batches",
                                                  "micro_batch_size", "steps", "warmup", "rounds", "seed",
                                                  "data_bytes", "audit_rate", "screen", "set")},
        "stages": STAGES,
        "tokens_per_step": opts.micro_batches * opts.micro_batch_size * opts.block_size,
        "pipeline_runs": pipeline_runs,
        "reference_runs": reference_runs,
        "reference_warmup_run": warm,
        "pipeline_tokens_per_s": pipe,
        "reference_tokens_per_s": ref,
        "round_ratios": round_ratios,
        "ratio": median([x for x in round_ratios if x == x]),
        "ratio_of_medians": pipe / ref,
        "pipeline_best_tokens_per_s": max([v for p in pipeline_runs for v in p["tokens_per_s"][warmup:]], default=0.0),
        "reference_best_tokens_per_s": max(v for r in reference_runs for v in r["tokens_per_s"]),
        "goal_ratio": GOAL_RATIO,
        "bubble_bound": opts.micro_batches / (opts.micro_batches + STAGES - 1),
        "step0_loss_pipeline": pipeline_runs[0]["losses"][0],
        "step0_loss_reference": warm["losses"][0],
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]},
        "wall_s": time.monotonic() - start,
    }
    if one_thread is not None:
        result["reference_1thread_tokens_per_s"] = median(one_thread["tokens_per_s"])
        result["thread_scaling"] = ref / result["reference_1thread_tokens_per_s"]
        result["reference_1thread_run"] = one_thread
    report(result)
    if opts.json:
        Path(opts.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"  wrote {opts.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
