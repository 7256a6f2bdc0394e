"""pipeguard over internet-like links: step time and tokens/s against the ideal for the link.

    sudo python benchmarks/wan.py --out docs/          # RTT 0/20/50/100 ms x 100 Mbit/s, 1 Gbit/s; tiny, small
    sudo python benchmarks/wan.py --quick              # tiny only; RTT 0 and 50 ms at 100 Mbit/s (< 5 min)
    sudo python benchmarks/wan.py --wire fp32,fp16,bf16,int8 --out docs/   # compression: 100 Mbit/s, RTT 0 and 50 ms

Every daemon (the coordinator, three stage nodes and a standby) runs in a network namespace of its
own, joined to the others by a Linux bridge (tests/test_multihost.py's ``Lan``). Each namespace's
link is shaped in both directions with ``tc qdisc ... tbf`` at the link's rate (on the veth end in
the namespace and on its port on the bridge), and latency comes from a ``DelayRelay``
(tests/links.py) in each namespace: the daemon binds loopback and advertises the relay, which
holds every byte RTT/2 in each direction, so every connection to it (from the coordinator or a
neighbour) has the link's round trip. The unshaped row ("direct") has no tbf and no relay.

Each link runs one testnet for ``2 x (warmup + steps)`` steps: the first half at audit rate p = 0,
the second at p = 0.05 (set through the admin API mid-run, ``pipeguard admin audit-rate``); the
first ``warmup`` steps of each half are not counted. Per half it reports:

- ``step_s``: wall seconds per step (between the coordinator's ``step`` events: everything the run
  waited for, audits it drained included); ``tokens_per_s`` from it;
- ``ideal_step_s``: the direct row's step time at the same p (compute, with loopback transfers),
  plus the busiest link's bytes per step at the link's rate (each boundary carries every
  micro-batch's activation forward and its gradient back: 2 x M x B x T x C x 4 bytes each way),
  plus ``HOPS`` round trips (RunStep and ApplyUpdate from the coordinator, and the pipeline's fill
  and drain through the stage boundaries: stages - 1 round trips); ``efficiency`` = ideal / measured;
- ``max_audit_lag_steps``, ``audits``, honest bans and demotions (every node is honest: both 0),
  step failures and nodes marked offline.

``--wire`` (compression mode) runs one testnet per wire dtype (``train.wire_dtype``) and link
(``--links``, default 100 Mbit/s at RTT 0 and 50 ms; same seed each), at p = 0 only, for
``WIRE_STEPS`` steps (the first ``warmup`` not counted), and reports per run: the payload bytes the
middle stage sends per step (its activations and input gradients in the wire layout), the bytes its
link carried out of and into its namespace per counted step (the bridge port's counters:
everything, gRPC/TCP/IP framing, heartbeats and reports included), step time, tokens/s, and the
loss of the last step next to fp32's. ``--loss-steps N`` also trains N steps per wire dtype in one
process (the staged reference with the same compression, which the pipeline equals) for the loss
of a longer run. Writes ``wan-wire.json`` under ``--out``.

Writes ``wan.json`` (and ``wan.png``, tokens/s against RTT per bandwidth, when matplotlib is
installed) under ``--out``. Needs root (namespaces, tc). Sends nothing anywhere but our own
namespaces' addresses; removes every namespace, bridge and process it made, whatever happens.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

STAGES = 3
COORDINATOR_PORT, NODE_PORT, RELAY_OFFSET = 7000, 7001, 100
AUDIT_RATES = (0.0, 0.05)
HOPS = 2 + (STAGES - 1)
PRESETS = {
    # preset -> (run config, steps counted per half, warm-up steps per half)
    "tiny": ({"model.preset": "tiny", "train.micro_batches": 8, "train.micro_batch_size": 8}, 6, 2),
    "small": ({"model.preset": "small", "train.micro_batches": 4, "train.micro_batch_size": 2}, 3, 1),
}
COMMON = {"train.seed": 1234, "pipeline.stages": STAGES, "pipeline.min_nodes": STAGES + 1,
          "audit.checkpoint_every": 10_000, "audit.screen": True,
          "timeouts.heartbeat_interval": 0.5, "timeouts.heartbeat_timeout": 15.0}
FULL_LINKS = [(None, 0.0)] + [(rate, rtt) for rate in (100.0, 1000.0) for rtt in (0.0, 20.0, 50.0, 100.0)]
QUICK_LINKS = [(None, 0.0), (100.0, 0.0), (100.0, 50.0)]
WIRE_LINKS = [(100.0, 0.0), (100.0, 50.0)]
WIRE_STEPS = 16
"""Steps of each compression-mode run (at p = 0); the preset's warm-up steps are not counted."""
RUN_LIMIT_S = 900.0
"""Most seconds one link's testnet may take, start to finish."""


@dataclass
class Half:
    p: float
    steps: int = 0
    step_s: float = math.nan
    tokens_per_s: float = math.nan
    coordinator_step_s: float = math.nan
    """Median of the coordinator's own per-step time (RunStep + ApplyUpdate; no audit drain)."""
    ideal_step_s: float = math.nan
    efficiency: float = math.nan
    audits: int = 0
    max_audit_lag_steps: int = 0


@dataclass
class LinkRun:
    preset: str
    rate_mbit: float | None
    rtt_ms: float
    halves: list[Half] = field(default_factory=list)
    honest_bans: int = 0
    demotions: int = 0
    step_failures: int = 0
    offline: int = 0
    transfer_s: float = 0.0
    wall_s: float = 0.0
    load: str = ""
    error: str = ""
    wire_dtype: str = "fp32"
    payload_bytes_per_step: int = 0
    """Payload bytes the middle stage sends per step (M activations forward, M gradients back)."""
    link_out_bytes_per_step: float = math.nan
    link_in_bytes_per_step: float = math.nan
    """Bytes the middle stage's link carried out of / into its namespace per counted step (its
    bridge port's rx / tx counters between the first counted step and the end)."""
    final_loss: float = math.nan
    """The loss of the run's last step."""


def tokens_per_step(preset: str) -> int:
    from pipeguard.app.runconfig import run_config
    cfg = run_config(COMMON, PRESETS[preset][0])
    return cfg.train.micro_batches * cfg.train.micro_batch_size * cfg.model.gpt().block_size


def boundary_bytes(preset: str, wire: str = "fp32") -> int:
    """Payload bytes a middle stage sends per step: M activations forward and M gradients back, in
    the layout of ``wire`` (4 bytes an element for fp32)."""
    from pipeguard import compression
    from pipeguard.app.runconfig import run_config
    from pipeguard.tensors import payload_nbytes
    cfg = run_config(COMMON, PRESETS[preset][0])
    t, gpt = cfg.train, cfg.model.gpt()
    shape = [t.micro_batch_size, gpt.block_size, gpt.n_embd]
    return 2 * t.micro_batches * payload_nbytes(compression.WIRE_DTYPES[wire], shape)


def port_bytes(port_if: str) -> tuple[int, int]:
    """(bytes out of, bytes into) a namespace, from its bridge port's counters (rx: what the
    namespace sent)."""
    stats = Path("/sys/class/net") / port_if / "statistics"
    return int((stats / "rx_bytes").read_text()), int((stats / "tx_bytes").read_text())


def uptime() -> str:
    """The load averages (1, 5, 15 minutes), as ``uptime`` shows them."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def run_link(preset: str, rate: float | None, rtt_ms: float, workdir: Path, wire: str = "fp32",
             rates: tuple[float, ...] = AUDIT_RATES, steps_per_run: int = 0) -> LinkRun:
    """One testnet on one link: ``rates`` (two: the halves described above; one: a single run of
    ``steps_per_run`` steps at that rate, compression mode) under wire dtype ``wire``."""
    from pipeguard.app.runconfig import node_config, run_config, to_toml
    from pipeguard.app.testnet import Daemon, LocalTestnet, wait_for
    from pipeguard.v1 import pipeguard_pb2 as pb
    from pipeguard.v1 import pipeguard_pb2_grpc as pb_grpc
    from tests.links import shape
    from tests.test_multihost import Lan, free_subnet, start_in, why_no_netns

    reason = why_no_netns()
    if reason:
        raise SystemExit(f"wan.py: {reason}")
    res = LinkRun(preset, rate, rtt_ms, load=uptime(), wire_dtype=wire, payload_bytes_per_step=boundary_bytes(preset, wire))
    extra, steps, warmup = PRESETS[preset]
    half = warmup + steps if len(rates) > 1 else steps_per_run
    total = half * len(rates)
    run = run_config(COMMON, extra, {"train.steps": total, "audit.rate": rates[0], "train.wire_dtype": wire})
    shutil.rmtree(workdir, ignore_errors=True)  # a fresh run each time (a state directory holding one is refused)
    workdir.mkdir(parents=True)
    net = LocalTestnet(workdir, run)
    lan = Lan(tag=f"pw{uuid.uuid4().hex[:5]}", prefix=free_subnet())
    relays: list[subprocess.Popen] = []
    daemons: list[Daemon] = []
    relayed = rate is not None
    t0 = time.monotonic()

    def host_up(name: str, index: int, port: int):
        """A namespace, shaped, with its relay; returns (host, address to bind, address to advertise)."""
        host = lan.add(name, index)
        if not relayed:
            return host, f"{host.address}:{port}", f"{host.address}:{port}"
        shape(host.netns, "eth0", rate)
        shape(None, host.port_if, rate)
        relay = subprocess.Popen(
            ["ip", "netns", "exec", host.netns, sys.executable, "-m", "tests.links", "relay",
             f"{host.address}:{port + RELAY_OFFSET}", f"127.0.0.1:{port}", str(rtt_ms / 2000), "--rate-mbit",
             str(rate), "--limit-s", str(RUN_LIMIT_S + 60)],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
        relays.append(relay)
        if relay.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the relay in {host.netns} did not start")
        return host, f"127.0.0.1:{port}", f"{host.address}:{port + RELAY_OFFSET}"

    try:
        lan.setup()
        (workdir / "node.toml").write_text(to_toml(node_config({"timeouts.heartbeat_interval": 0.5,
                                                                 "timeouts.heartbeat_timeout": 15.0})))
        chost, cbind, cadv = host_up("c", 1, COORDINATOR_PORT)
        net.coordinator = start_in(chost, "coordinator", [
            "-m", "coordinator.daemon", "--config", str(net.config_path), "--bind", cbind, "--advertise", cadv,
            "--state-dir", str(workdir / "coordinator" / "state")], workdir)
        daemons.append(net.coordinator)
        key = net.coordinator.wait_ready(120)["public_key"]
        for i in range(STAGES + 1):
            host, bind, adv = host_up(f"n{i}", 10 + i, NODE_PORT)
            node = start_in(host, f"node{i}", [
                "-m", "node.daemon", "--config", str(workdir / "node.toml"), "--coordinator", cadv,
                "--coordinator-key", key, "--bind", bind, "--advertise", adv,
                "--home", str(workdir / f"node{i}" / "home")], workdir)
            net.nodes.append(node)
            daemons.append(node)
            node.wait_ready(120)
            net.wait_registered(i + 1, 120)  # in order: nodes 0..2 serve stages 0..2, node 3 stands by
        deadline = t0 + RUN_LIMIT_S
        middle = lan.hosts["n1"].port_if
        wait_for(lambda: net.status().step >= warmup, max(1.0, deadline - time.monotonic()), "the warm-up")
        at_warmup, bytes_before = net.status().step, port_bytes(middle)
        counted = [range(warmup, half)]
        if len(rates) > 1:
            wait_for(lambda: net.status().step >= half, max(1.0, deadline - time.monotonic()), "the first half")
            token = net.admin_token_file.read_text().strip()
            with net.channel() as ch:
                pb_grpc.CoordinatorStub(ch).SetAuditRate(pb.SetAuditRateRequest(rate=rates[1], operator="wan.py"),
                                                         timeout=30, metadata=(("authorization", f"Bearer {token}"),))
            switched = net.status().step  # the first step drawn at the new rate is this one or the next
            counted.append(range(max(half, switched + 1) + warmup, 2 * half))
        status = net.wait_finished(max(1.0, deadline - time.monotonic()))
        bytes_after = port_bytes(middle)
        done = total - at_warmup
        if done > 0:
            res.link_out_bytes_per_step = (bytes_after[0] - bytes_before[0]) / done
            res.link_in_bytes_per_step = (bytes_after[1] - bytes_before[1]) / done
        if status.losses:
            res.final_loss = max(status.losses, key=lambda q: q.step).loss
        times = {e.step: e.time for e in status.events if e.kind == "step"}
        by_step = {q.step: q for q in status.losses}
        tokens = tokens_per_step(preset)
        for p, steps_of in zip(rates, counted):
            h = Half(p=p)
            stamps = [times[s] for s in steps_of if s in times]
            prev = times.get(steps_of.start - 1)
            if prev is not None:
                stamps = [prev] + stamps
            if len(stamps) > 1:
                h.steps = len(stamps) - 1
                h.step_s = (stamps[-1] - stamps[0]) / h.steps
                h.tokens_per_s = tokens / h.step_s
            own = [tokens / by_step[s].tokens_per_s for s in steps_of if s in by_step and by_step[s].tokens_per_s > 0]
            h.coordinator_step_s = statistics.median(own) if own else math.nan
            res.halves.append(h)
        res.halves[-1].audits = status.audits_total
        res.halves[-1].max_audit_lag_steps = status.max_audit_lag_steps
        res.honest_bans = sum(1 for n in status.nodes if n.role == pb.ROLE_BANNED)
        res.demotions = sum(1 for e in status.events if e.kind in ("node_demoted", "node_set_aside"))
        res.step_failures = sum(1 for e in status.events if e.kind == "step_failed")
        res.offline = sum(1 for e in status.events if e.kind == "node_offline")
    except Exception as exc:  # noqa: BLE001 - one link's failure is reported in its row; the rest run
        res.error = f"{type(exc).__name__}: {exc}"
        for d in daemons:
            if d.proc is not None and d.proc.poll() is not None:
                res.error += f"\n{d.name} exited:\n{d.log_tail(15)}"
    finally:
        for d in daemons:
            d.kill()
        for r in relays:
            try:
                os.killpg(r.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            r.wait(timeout=10)
        problems = lan.teardown()
        if problems:
            res.error += f" cleanup: {problems}"
    res.wall_s = time.monotonic() - t0
    if rate is not None:
        res.transfer_s = boundary_bytes(preset, wire) / 2 * 8 / (rate * 1e6) * 2  # out and back on the busiest link
    return res


def add_ideal(runs: list[LinkRun]) -> None:
    """Fill ideal_step_s and efficiency from the direct row of the same preset at p = 0: audits should
    cost the pipeline no waiting (the design's claim), so the ideal is the same at either rate."""
    for r in runs:
        direct = next((d for d in runs if d.preset == r.preset and d.rate_mbit is None and not d.error
                       and d.halves), None)
        if direct is None:
            continue
        for h in r.halves:
            h.ideal_step_s = direct.halves[0].step_s + r.transfer_s + HOPS * r.rtt_ms / 1000
            h.efficiency = h.ideal_step_s / h.step_s if h.step_s > 0 else math.nan


def table(runs: list[LinkRun]) -> str:
    rows = ["| preset | link | RTT ms | p | step s | ideal s | efficiency | tokens/s | coordinator step s | "
            "audit lag (steps) | bans / demotions / step failures |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        link = "direct" if r.rate_mbit is None else f"{r.rate_mbit:g} Mbit/s"
        if r.error:
            rows.append(f"| {r.preset} | {link} | {r.rtt_ms:g} | - | failed: {r.error.splitlines()[0][:80]} |"
                        " | | | | | |")
            continue
        for h in r.halves:
            lag = h.max_audit_lag_steps if h.p > 0 else "-"
            rows.append(f"| {r.preset} | {link} | {r.rtt_ms:g} | {h.p:g} | {h.step_s:.3f} | {h.ideal_step_s:.3f} | "
                        f"{h.efficiency:.2f} | {h.tokens_per_s:,.0f} | {h.coordinator_step_s:.3f} | {lag} | "
                        f"{r.honest_bans} / {r.demotions} / {r.step_failures} |")
    return "\n".join(rows)


def wire_table(runs: list[LinkRun]) -> str:
    """Compression mode: one row per (preset, link, wire dtype), losses next to fp32's on that link."""
    rows = ["| preset | link | RTT ms | wire | payload bytes/step | link out / in bytes/step | step s | tokens/s | "
            "loss, last step | vs fp32 |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        link = "direct" if r.rate_mbit is None else f"{r.rate_mbit:g} Mbit/s"
        if r.error:
            rows.append(f"| {r.preset} | {link} | {r.rtt_ms:g} | {r.wire_dtype} | failed: "
                        f"{r.error.splitlines()[0][:80]} | | | | | |")
            continue
        base = next((b for b in runs if (b.preset, b.rate_mbit, b.rtt_ms, b.wire_dtype) ==
                     (r.preset, r.rate_mbit, r.rtt_ms, "fp32") and not b.error), None)
        rel = f"{(r.final_loss - base.final_loss) / base.final_loss:+.1e}" if base is not None else "-"
        h = r.halves[0]
        rows.append(f"| {r.preset} | {link} | {r.rtt_ms:g} | {r.wire_dtype} | {r.payload_bytes_per_step:,} | "
                    f"{r.link_out_bytes_per_step:,.0f} / {r.link_in_bytes_per_step:,.0f} | {h.step_s:.3f} | "
                    f"{h.tokens_per_s:,.0f} | {r.final_loss:.4f} | {rel} |")
    return "\n".join(rows)


def reference_losses(preset: str, wire: str, steps: int) -> list[float]:
    """The training losses of ``steps`` steps of the preset's run, in one process, with the stages
    one after another and ``wire`` at their boundaries (``pipeguard.reference``: what the pipeline
    computes, bit for bit on one build; tests/test_wire_dtypes.py)."""
    import torch

    from pipeguard.app.runconfig import run_config
    from pipeguard.data import load_dataset
    from pipeguard.reference import train_reference
    cfg = run_config(COMMON, PRESETS[preset][0], {"train.steps": steps})
    torch.set_num_threads(1)
    t = cfg.train
    return train_reference(cfg.model.gpt(), t.optim(), load_dataset(cfg.data.path or None, cfg.data.max_bytes),
                           seed=t.seed, steps=steps, micro_batches=t.micro_batches,
                           micro_batch_size=t.micro_batch_size, wire_dtype=wire, num_stages=STAGES).losses


def wire_mode(args: argparse.Namespace) -> int:
    from pipeguard import compression
    wires = [compression.check(w) for w in args.wire.split(",") if w]
    links = [(float(rate), float(rtt)) for rate, rtt in (item.split(":") for item in args.links.split(",") if item)] \
        if args.links else WIRE_LINKS
    presets = [p for p in args.presets.split(",") if p] or ["tiny"]
    started, load_before = time.monotonic(), uptime()
    runs: list[LinkRun] = []

    def save() -> dict:
        out = {"runs": [asdict(r) for r in runs], "steps": WIRE_STEPS, "machine": {
            "cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
            "load_before": load_before, "load_after": uptime(), "wall_s": time.monotonic() - started,
            "table": wire_table(runs), "loss_steps": args.loss_steps, "reference_losses": longer}
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "wan-wire.json").write_text(json.dumps(out, indent=1) + "\n")
        return out

    longer: dict[str, dict] = {}
    for preset in presets:
        for wire in wires if args.loss_steps else []:
            losses = reference_losses(preset, wire, args.loss_steps)
            longer.setdefault(preset, {})[wire] = {"final": losses[-1], "last10": sum(losses[-10:]) / 10}
            print(f"{preset} {wire}: reference loss after {args.loss_steps} steps {losses[-1]:.4f} "
                  f"(last 10: {longer[preset][wire]['last10']:.4f})", flush=True)
        for i, (rate, rtt) in enumerate(links):
            for wire in wires:
                r = run_link(preset, rate, rtt, Path(args.workdir) / f"{preset}-{i}-{wire}", wire=wire, rates=(0.0,),
                             steps_per_run=WIRE_STEPS)
                runs.append(r)
                first = r.halves[0] if r.halves else Half(p=0)
                print(f"{preset} {rate:g}Mbit rtt {rtt:g}ms {wire}: step {first.step_s:.3f}s loss {r.final_loss:.4f} "
                      f"out {r.link_out_bytes_per_step:,.0f} B/step ({r.wall_s:.0f}s, load {r.load}) "
                      f"{r.error.splitlines()[0] if r.error else ''}", flush=True)
                save()
    out = save()
    print(out["table"])
    print(f"load before {out['load_before']}, after {out['load_after']}; {out['wall_s']:.0f} s")
    return 0


def plot(runs: list[LinkRun], path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    presets = sorted({r.preset for r in runs})
    fig, axes = plt.subplots(1, len(presets), figsize=(6 * len(presets), 4), squeeze=False)
    for ax, preset in zip(axes[0], presets):
        for rate in sorted({r.rate_mbit for r in runs if r.rate_mbit is not None}):
            for i, p in enumerate(AUDIT_RATES):
                pts = sorted((r.rtt_ms, r.halves[i].tokens_per_s) for r in runs
                             if r.preset == preset and r.rate_mbit == rate and not r.error)
                if pts:
                    ax.plot(*zip(*pts), marker="o", linestyle="-" if p == 0 else "--", label=f"{rate:g} Mbit/s, p={p:g}")
        ax.set_xlabel("RTT (ms)")
        ax.set_ylabel("tokens/s")
        ax.set_title(preset)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def write(runs: list[LinkRun], args: argparse.Namespace, load_before: str, started: float) -> dict:
    add_ideal(runs)
    out = {"runs": [asdict(r) for r in runs], "hops": HOPS, "audit_rates": list(AUDIT_RATES), "quick": args.quick,
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
           "load_before": load_before, "load_after": uptime(), "wall_s": time.monotonic() - started,
           "table": table(runs)}
    if args.out:
        d = Path(args.out)
        d.mkdir(parents=True, exist_ok=True)
        (d / "wan.json").write_text(json.dumps(out, indent=1) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny only, three links (< 5 min)")
    ap.add_argument("--presets", default="", help="comma-separated presets (default: tiny,small; --quick: tiny)")
    ap.add_argument("--out", default="", help="directory for wan.json and wan.png")
    ap.add_argument("--workdir", default="/tmp/pipeguard-wan")
    ap.add_argument("--wire", default="", help="compression mode: comma-separated wire dtypes (fp32,fp16,bf16,int8)")
    ap.add_argument("--links", default="", help="compression mode: RATE_MBIT:RTT_MS,... (default 100:0,100:50)")
    ap.add_argument("--loss-steps", type=int, default=0,
                    help="compression mode: also train this many steps per wire dtype in one process (the "
                         "staged reference, same seed) and report the loss against fp32")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("wan.py needs root (network namespaces, tc)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that the finally blocks clean up
    if args.wire:
        return wire_mode(args)
    presets = [p for p in args.presets.split(",") if p] or (["tiny"] if args.quick else ["tiny", "small"])
    links = QUICK_LINKS if args.quick else FULL_LINKS
    started = time.monotonic()
    load_before = uptime()
    runs = []
    for preset in presets:
        for i, (rate, rtt) in enumerate(links):
            r = run_link(preset, rate, rtt, Path(args.workdir) / f"{preset}-{i}")
            runs.append(r)
            first = r.halves[0] if r.halves else Half(p=0)
            print(f"{preset} {'direct' if rate is None else f'{rate:g}Mbit'} rtt {rtt:g}ms: step {first.step_s:.3f}s "
                  f"({r.wall_s:.0f}s, load {r.load}) {r.error.splitlines()[0] if r.error else ''}", flush=True)
            write(runs, args, load_before, started)  # after every link: a partial run keeps what it measured
    add_ideal(runs)
    print(table(runs))
    out = write(runs, args, load_before, started)
    if args.out:
        d = Path(args.out)
        if plot(runs, d / "wan.png"):
            print(f"wrote {d / 'wan.json'} and {d / 'wan.png'}")
        else:
            print(f"wrote {d / 'wan.json'} (no matplotlib: no plot)")
    else:
        print(json.dumps(out)[:2000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
