"""The GPU check: nodes sharing one GPU, a CPU auditor, audits at p = 1 (issue 13).

    python benchmarks/gpu_check.py [--out docs/gpu-check.json]      # a machine with one GPU, < 8 min
    python benchmarks/gpu_check.py --cpu-dry-run [--out PATH]       # the same code on CPU, ~2 min idle

Two parts, one JSON:

1. Hardware pairs (``benchmarks/hardware_tolerance.py``): claims of the ``small`` preset made on
   the GPU and on the CPU, recomputed by ``pipeguard.audit.check`` on the same GPU, on the CPU
   and the other way round, fp32 and bf16: the largest honest deviation per audit kind and pair,
   the margin to the tolerance the pair applies, and the smallest attack still caught.
2. Testnets (``pipeguard.app.testnet.LocalTestnet``): for each of the ``small`` and ``gpt2``
   presets, a coordinator whose judge recomputes on the GPU, two stage nodes on the GPU (they
   share it) and one standby on the CPU, which is the auditor of every audit (a standby is picked
   first) and so applies ``audit.cross_device_tolerance``; a few steps at audit rate p = 1.
   Per preset: tokens/s (the coordinator's per-step figure, median, and end to end), audits
   dispatched and passed, honest deviations per audit kind and (target, auditor) device class
   from the auditor's log, bans (must be 0), and the peak GPU memory in use on the device while it
   ran (``torch.cuda.mem_get_info``, all processes, less what was in use before the nodes started).

Without a GPU it exits with status 2 and says so, unless ``--cpu-dry-run``: then the "GPU" party
is the CPU (tiny and small presets, fewer steps), which exercises every code path here -- the
device flags, registration of the device class, the audits, the log parsing, the JSON -- but
measures no GPU. Exit status 1 if any node was banned or an honest audit failed.
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
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

AUDIT_LINE = re.compile(r"audit \d+ \((forward|backward|update) step (\d+) stage (\d+) mb \d+ of \w+, "
                        r"target on (.*?), audited on (.*?)\): VERDICT_(\w+) — .*?max deviation ([-+0-9.eE]+|inf|nan)")
JUDGE_FAIL = re.compile(r"audit_failed|convicted|banned", re.I)
PRESETS = {  # preset: (micro-batches, sequences per micro-batch, steps)
    "small": (4, 4, 4),
    "gpt2": (2, 2, 3),
}
DRY_PRESETS = {"tiny": (4, 4, 3), "small": (2, 2, 2)}


class GpuMemory:
    """Peak device memory in use (all processes), polled in a thread, less a baseline."""

    def __init__(self, device: torch.device | None):
        self.device = device
        self.baseline = self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def used(self) -> int:
        free, total = torch.cuda.mem_get_info(self.device)
        return total - free

    def __enter__(self) -> "GpuMemory":
        if self.device is not None:
            self.baseline = self.peak = self.used()
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(0.2):
            self.peak = max(self.peak, self.used())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)

    @property
    def peak_bytes(self) -> int:
        return max(0, self.peak - self.baseline)


def testnet(preset: str, shape: tuple[int, int, int], gpu: str, cpu_threads: int, workdir: Path,
            timeout: float) -> dict:
    """One testnet run: 2 stages on ``gpu``, a standby (the auditor) on the CPU, p = 1."""
    from pipeguard.app.runconfig import run_config
    from pipeguard.app.testnet import LocalTestnet
    from pipeguard.model import preset as gpt_preset
    from pipeguard.v1 import pipeguard_pb2 as pb

    micro_batches, batch, steps = shape
    shutil.rmtree(workdir, ignore_errors=True)
    run = run_config({"model.preset": preset, "train.steps": steps, "train.seed": 1234,
                      "train.micro_batches": micro_batches, "train.micro_batch_size": batch,
                      "pipeline.stages": 2, "pipeline.min_nodes": 3, "audit.rate": 1.0, "audit.device": gpu,
                      "audit.checkpoint_every": 100, "timeouts.heartbeat_interval": 0.5,
                      "timeouts.heartbeat_timeout": 30.0})
    net = LocalTestnet(workdir, run)
    t0 = time.perf_counter()
    dev = torch.device("cuda", 0) if gpu.startswith("cuda") else None
    status = None
    try:
        with GpuMemory(dev) as mem:
            net.start_coordinator()
            for i, (where, threads) in enumerate([(gpu, 1), (gpu, 1), ("cpu", cpu_threads)]):
                net.start_node("--device", where, "--threads", str(threads), timeout=120.0)
                net.wait_registered(i + 1)
            status = net.wait_finished(timeout=timeout)
            # audits of the last steps may still be running when the last step completes
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                status = net.status(history=5000)
                if status.audits_pending == 0:
                    break
                time.sleep(0.5)
    finally:
        net.stop()
        net.kill()
    wall = time.perf_counter() - t0
    assert status is not None
    tokens = micro_batches * batch * gpt_preset(preset).block_size
    hist = sorted(status.losses, key=lambda q: q.step)
    times = sorted(e.time for e in status.events if e.kind == "step")
    deviations: dict[str, dict] = {}
    failed_honest = 0
    for node in net.nodes:
        for line in node.log_path.read_text(errors="replace").splitlines():
            m = AUDIT_LINE.search(line)
            if not m:
                continue
            kind, target, auditor, verdict, dev_s = m.group(1), m.group(4), m.group(5), m.group(6), m.group(7)
            key = f"{kind}: {target} -> {auditor}"
            row = deviations.setdefault(key, {"audits": 0, "max_deviation": 0.0, "verdicts": {}})
            row["audits"] += 1
            row["max_deviation"] = max(row["max_deviation"], float(dev_s))
            row["verdicts"][verdict] = row["verdicts"].get(verdict, 0) + 1
            failed_honest += verdict == "FAIL"
    builds = sorted({n.build for n in status.nodes})
    return {
        "preset": preset, "stages": 2, "micro_batches": micro_batches, "micro_batch_size": batch,
        "steps": status.step, "total_steps": status.total_steps, "tokens_per_step": tokens,
        "tokens_per_s_median": statistics.median(q.tokens_per_s for q in hist) if hist else math.nan,
        "tokens_per_s_end_to_end": tokens * (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else math.nan,
        "audits_dispatched": status.audits_total,
        "audits_passed": sum(n.audits_passed for n in status.nodes),
        "audits_failed": sum(n.audits_failed for n in status.nodes),
        "audits_pending_at_end": status.audits_pending,
        "honest_audit_fails_in_logs": failed_honest,
        "bans": sum(1 for n in status.nodes if n.role == pb.ROLE_BANNED),
        "detections": status.detections,
        "honest_deviations": deviations,
        "node_builds": builds,
        "peak_gpu_memory_bytes": mem.peak_bytes if dev is not None else 0,
        "gpu_memory_baseline_bytes": mem.baseline if dev is not None else 0,
        "wall_s": wall,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", "--json", dest="out", help="write the JSON here (default: print the summary only)")
    ap.add_argument("--cpu-dry-run", action="store_true", help="no GPU: run the same code with the CPU as the 'GPU'")
    ap.add_argument("--presets", help="comma-separated presets (default small,gpt2; dry run tiny,small)")
    ap.add_argument("--cpu-threads", type=int, default=0, help="threads of the CPU auditor (default: min(8, CPUs))")
    ap.add_argument("--timeout", type=float, default=240.0, help="limit of each testnet's training (s)")
    args = ap.parse_args()
    if not args.cpu_dry_run and not torch.cuda.is_available():
        print(f"gpu_check: torch {torch.__version__} sees no CUDA device on this machine (torch.version.cuda = "
              f"{torch.version.cuda}); run it on a machine with a GPU and a CUDA build of torch, or pass "
              f"--cpu-dry-run to exercise the same code on the CPU", file=sys.stderr)
        return 2
    from benchmarks import hardware_tolerance as hw
    from coordinator.config import AuditConfig
    from pipeguard import device as devices

    t_start = time.perf_counter()
    gpu = "cpu" if args.cpu_dry_run else "cuda"
    cpu_threads = args.cpu_threads or (1 if args.cpu_dry_run else min(8, os.cpu_count() or 1))
    presets = DRY_PRESETS if args.cpu_dry_run else PRESETS
    if args.presets:
        presets = {p: {**PRESETS, **DRY_PRESETS}[p] for p in args.presets.split(",")}
    cfg = AuditConfig()
    result: dict = {
        "dry_run": args.cpu_dry_run, "torch": torch.__version__, "cuda": torch.version.cuda,
        "gpu": devices.device_class(devices.resolve(gpu)), "cpus": os.cpu_count(), "machine": platform.machine(),
        "tolerance": cfg.tolerance, "cross_device_tolerance": cfg.cross_device_tolerance,
    }
    print(f"gpu_check: {'DRY RUN on the CPU' if args.cpu_dry_run else result['gpu']}, torch {torch.__version__}",
          flush=True)
    pair_models = ["tiny"] if args.cpu_dry_run else ["small"]
    result["pairs"] = hw.run(pair_models, gpu=not args.cpu_dry_run, tolerance=cfg.tolerance,
                             cross=cfg.cross_device_tolerance, log=lambda s: print(s, flush=True))
    result["testnets"] = {}
    with tempfile.TemporaryDirectory(prefix="pipeguard-gpu-check-") as tmp:
        for preset, shape in presets.items():
            r = testnet(preset, shape, gpu, cpu_threads, Path(tmp) / preset, args.timeout)
            result["testnets"][preset] = r
            print(f"{preset}: {r['steps']}/{r['total_steps']} steps, {r['tokens_per_s_median']:,.0f} tokens/s "
                  f"(end to end {r['tokens_per_s_end_to_end']:,.0f}), audits {r['audits_passed']} passed / "
                  f"{r['audits_dispatched']} dispatched, bans {r['bans']}, peak GPU memory "
                  f"{r['peak_gpu_memory_bytes'] / 2**30:.2f} GiB, {r['wall_s']:.0f}s", flush=True)
            for key, row in sorted(r["honest_deviations"].items()):
                print(f"  {key:<60} {row['audits']:>3} audits, max deviation {row['max_deviation']:.3g} "
                      f"{row['verdicts']}", flush=True)
    result["bans"] = sum(r["bans"] for r in result["testnets"].values())
    result["honest_audit_fails"] = sum(r["honest_audit_fails_in_logs"] for r in result["testnets"].values())
    result["pairs_failing_honest"] = [f"{p['model']} {p['dtype']}->{p['replayed_as']} {p['claimant']} -> {p['auditor']}"
                                      for p in result["pairs"] if not p["honest_passes"] and p["dtype"] == p["replayed_as"]]
    result["wall_s"] = time.perf_counter() - t_start
    text = json.dumps(result, indent=1, default=str)
    if args.out:
        Path(args.out).write_text(text)
        print(f"wrote {args.out}")
    print(f"bans {result['bans']} (must be 0), honest audit fails {result['honest_audit_fails']}, honest pairs over "
          f"their tolerance: {result['pairs_failing_honest'] or 'none'}; {result['wall_s']:.0f}s total")
    return 1 if result["bans"] or result["honest_audit_fails"] else 0


if __name__ == "__main__":
    sys.exit(main())
