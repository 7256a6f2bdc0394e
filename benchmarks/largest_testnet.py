"""The largest real testnet this machine carries: S stages plus standbys, training with audits on.

    python benchmarks/largest_testnet.py [--stages 16] [--standbys 2] [--steps 8] [--audit-rate 0.1]
                                         [--json PATH]

A coordinator and ``stages + standbys`` node daemons as local processes
(``pipeguard.app.testnet.LocalTestnet``: real subprocesses, real gRPC on loopback, signatures on,
one torch thread per node). The model is the tiny preset made ``--n-layer`` blocks deep (one
block or more per stage) and narrow, so that what is measured is the cost of the processes and
the protocol, not of the model. ``pipeline.min_nodes`` = stages + standbys, so the standbys are
registered (and audit) from the first step. Audits are on at ``--audit-rate`` with the
statistical screen; every FAIL would be judged by the coordinator, and a ban would show in the
figures (an honest run must have none).

Reported: per-node RSS (each node's peak, VmHWM, read just before it is stopped; median and
max over nodes) and the coordinator's, their sum (which counts torch's shared library pages
once per process), and each daemon's PSS at the end (shared pages split among their users; the
sum is what the testnet really occupies), next to the machine's MemAvailable before and after; the median step time (one RunStep +
ApplyUpdate round as the coordinator times it, from ``StatusReply.losses``), skipping the first
``--warmup`` steps, and the median wall-clock time between consecutive ``step`` events (which
adds the audits' and checkpoints' share); audits dispatched / passed / failed, detections and bans; the first and last
loss; start-up time (all daemons up and registered); and the load average.

This is a benchmark, not a test: it prints figures and asserts nothing about them. The run is
cut at ``--max-seconds``, keeping the steps done so far.
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

from coordinator_load import rss_mib  # this folder is on sys.path when a benchmark runs as a script

RUN = {
    "model.preset": "tiny",
    "train.seed": 11, "train.warmup_steps": 2,
    "data.max_bytes": 262144,
    "audit.screen": True,
    "timeouts.heartbeat_interval": 1.0, "timeouts.heartbeat_timeout": 60.0, "timeouts.request": 60.0,
}
"""The run's fixed settings (pipeguard.app.runconfig keys); the flags give the rest."""


def pss_mib(pid: int) -> float:
    """Proportional set size: RSS with each shared page (torch's libraries) split among its users."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def loadavg() -> tuple[float, float, float]:
    return tuple(round(x, 2) for x in os.getloadavg())  # type: ignore[return-value]


def mem_available_mib() -> float:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def run(opts: argparse.Namespace) -> dict:
    from pipeguard.app.runconfig import run_config
    from pipeguard.app.testnet import LocalTestnet, TestnetError, wait_for
    from pipeguard.v1 import pipeguard_pb2 as pb

    t_start = time.monotonic()
    deadline = t_start + opts.max_seconds
    n_nodes = opts.stages + opts.standbys
    run_cfg = run_config(RUN, {
        "model.n_layer": opts.n_layer, "model.n_head": opts.n_head, "model.n_embd": opts.n_embd,
        "model.block_size": opts.block_size, "train.steps": opts.steps, "train.micro_batches": opts.micro_batches,
        "train.micro_batch_size": opts.micro_batch_size, "pipeline.stages": opts.stages, "pipeline.min_nodes": n_nodes,
        "audit.rate": opts.audit_rate, "audit.checkpoint_every": opts.checkpoint_every,
        "timeouts.step": opts.step_timeout})
    workdir = Path(tempfile.mkdtemp(prefix="pipeguard-largest-"))
    res: dict = {"stages": opts.stages, "standbys": opts.standbys, "n_layer": opts.n_layer, "n_embd": opts.n_embd,
                 "micro_batches": opts.micro_batches, "micro_batch_size": opts.micro_batch_size,
                 "block_size": opts.block_size, "audit_rate": opts.audit_rate, "steps_asked": opts.steps,
                 "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
                 "mem_available_start_mib": round(mem_available_mib()),
                 "load_avg_start": loadavg()}
    print(f"largest testnet: {opts.stages} stages + {opts.standbys} standbys, {opts.n_layer} blocks of width "
          f"{opts.n_embd}, audit rate {opts.audit_rate}; load average {res['load_avg_start']}, "
          f"{res['mem_available_start_mib']} MiB available", flush=True)
    with LocalTestnet(workdir, run_cfg) as net:
        try:
            coord = net.start_coordinator(timeout=120)
            for i in range(n_nodes):  # started together; torch imports overlap
                net.start_node("--log-level", "WARNING", wait=False)
            for node in net.nodes:
                node.wait_ready(timeout=max(60.0, deadline - time.monotonic()))
            net.wait_registered(n_nodes, timeout=max(60.0, deadline - time.monotonic()))
            res["startup_s"] = time.monotonic() - t_start
            print(f"  {n_nodes} nodes up and registered in {res['startup_s']:.0f} s", flush=True)
            status = None
            for _ in range(int(opts.max_seconds) + 1):  # one poll a second at most
                status = net.status(timeout=60)
                if status.phase in (pb.RUN_PHASE_FINISHED, pb.RUN_PHASE_FAILED) or time.monotonic() > deadline:
                    break
                time.sleep(1.0)
            assert status is not None
            res["wall_s"] = time.monotonic() - t_start
            res["phase"] = pb.RunPhase.Name(status.phase)
            res["node_rss_peak_mib"] = [round(rss_mib(n.proc.pid, "VmHWM"), 1) for n in net.nodes]
            res["node_rss_mib"] = [round(rss_mib(n.proc.pid), 1) for n in net.nodes]
            res["node_pss_mib"] = [round(pss_mib(n.proc.pid), 1) for n in net.nodes]
            res["coordinator_pss_mib"] = round(pss_mib(coord.proc.pid), 1)
            res["coordinator_rss_peak_mib"] = round(rss_mib(coord.proc.pid, "VmHWM"), 1)
            res["coordinator_rss_mib"] = round(rss_mib(coord.proc.pid), 1)
            res["mem_available_end_mib"] = round(mem_available_mib())
            res["load_avg_end"] = loadavg()
        except TestnetError as exc:
            res["error"] = str(exc)
            print(f"  failed: {exc}", flush=True)
            return res
    tokens = opts.micro_batches * opts.micro_batch_size * opts.block_size
    points = sorted(status.losses, key=lambda p: p.step)
    step_s = [tokens / p.tokens_per_s for p in points if p.tokens_per_s > 0]
    measured = step_s[opts.warmup:] or step_s
    roles = [n.role for n in status.nodes]
    ticks = [e.time for e in sorted(status.events, key=lambda e: e.seq) if e.kind == "step"]
    gaps = [b - a for a, b in zip(ticks, ticks[1:])][opts.warmup:]
    res.update({
        "steps_done": len(points),
        "step_time_s": step_s,
        "step_time_median_s": statistics.median(measured) if measured else float("nan"),
        "losses": [p.loss for p in points],
        "step_wall_median_s": statistics.median(gaps) if gaps else float("nan"),
        "audits_dispatched": status.audits_total,
        "audits_passed": sum(n.audits_passed for n in status.nodes),
        "audits_failed": sum(n.audits_failed for n in status.nodes),
        "detections": status.detections,
        "bans": sum(r == pb.ROLE_BANNED for r in roles),
        "stage_holders": sum(r == pb.ROLE_STAGE for r in roles),
        "standbys_live": sum(r == pb.ROLE_STANDBY for r in roles),
        "rollbacks": sum(e.kind == "rolled_back" for e in status.events),
        "events_tail": [f"{e.kind}: {e.message}" for e in status.events[-5:]],
    })
    peaks = res["node_rss_peak_mib"]
    res["node_rss_peak_median_mib"] = statistics.median(peaks)
    res["node_rss_peak_max_mib"] = max(peaks)
    res["total_rss_peak_mib"] = round(sum(peaks) + res["coordinator_rss_peak_mib"], 1)
    res["node_pss_median_mib"] = statistics.median(res["node_pss_mib"])
    res["total_pss_mib"] = round(sum(res["node_pss_mib"]) + res["coordinator_pss_mib"], 1)
    return res


def report(res: dict) -> None:
    if "error" in res:
        print(f"did not run to the end: {res['error']}")
        return
    print(f"phase {res['phase']}: {res['steps_done']}/{res['steps_asked']} steps in {res['wall_s']:.0f} s "
          f"(start-up {res['startup_s']:.0f} s)")
    print(f"step time:    median {res['step_time_median_s']:.2f} s (all: "
          f"{', '.join(f'{s:.1f}' for s in res['step_time_s'])}); wall clock between steps (audits, "
          f"checkpoints included) median {res['step_wall_median_s']:.2f} s")
    if res["losses"]:
        print(f"loss:         {res['losses'][0]:.3f} -> {res['losses'][-1]:.3f}")
    print(f"audits:       {res['audits_dispatched']} dispatched, {res['audits_passed']} passed, "
          f"{res['audits_failed']} failed; detections {res['detections']}; bans {res['bans']}; "
          f"rollbacks {res['rollbacks']}")
    print(f"nodes:        {res['stage_holders']} holding stages, {res['standbys_live']} standing by")
    print(f"memory:       node peak RSS median {res['node_rss_peak_median_mib']:.0f} MiB, max "
          f"{res['node_rss_peak_max_mib']:.0f} MiB; coordinator {res['coordinator_rss_peak_mib']:.0f} MiB; "
          f"sum {res['total_rss_peak_mib'] / 1024:.2f} GiB (shared pages counted in every process)")
    print(f"              PSS at the end (shared pages split): node median {res['node_pss_median_mib']:.0f} MiB, "
          f"all daemons {res['total_pss_mib'] / 1024:.2f} GiB; MemAvailable {res['mem_available_start_mib']} MiB "
          f"before, {res['mem_available_end_mib']} MiB at the end")
    print(f"load average: {res['load_avg_start']} at start, {res['load_avg_end']} at end")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--stages", type=int, default=16)
    p.add_argument("--standbys", type=int, default=2)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=1, help="first steps left out of the median step time")
    p.add_argument("--n-layer", type=int, default=16)
    p.add_argument("--n-embd", type=int, default=32)
    p.add_argument("--n-head", type=int, default=2)
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--micro-batches", type=int, default=4)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--audit-rate", type=float, default=0.1)
    p.add_argument("--checkpoint-every", type=int, default=4)
    p.add_argument("--step-timeout", type=float, default=300.0)
    p.add_argument("--max-seconds", type=float, default=900.0, help="cap on the whole run")
    p.add_argument("--json", help="also write the results here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    opts = parse_args(argv)
    res = run(opts)
    report(res)
    if opts.json:
        Path(opts.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
