"""Coordinator load: many simulated nodes registering and heartbeating at 1 Hz against one coordinator.

    python benchmarks/coordinator_load.py [--nodes 1000] [--duration 60] [--workers 2]
                                          [--channels 8] [--json PATH]

A real coordinator process (``pipeguard.app.testnet.LocalTestnet``, loopback, port 0) serves a run
whose ``pipeline.min_nodes`` is out of reach, so it never starts training: what it does is
exactly registration and heartbeats. ``--workers`` client processes each simulate
``nodes / workers`` nodes, every one a real ``node.membership.Membership`` with its own Ed25519
identity: the Hello / signed Register challenge-response, signed heartbeats with strictly
increasing sequence numbers, and verification of every signed reply (including the member
list it carries), as a node daemon does. What the simulation shares is transport: a worker's
nodes spread over ``--channels`` gRPC channels (HTTP/2 connections) instead of one each.

Phases:
  1. registration: every worker registers its nodes, at most ``--concurrency`` at a time
     (RESOURCE_EXHAUSTED / UNAVAILABLE are retried with backoff and counted);
  2. heartbeats: once all are registered, each node heartbeats at absolute 1 Hz ticks (phases
     spread uniformly over the second): ``--warmup`` seconds first, not measured (a node's first
     heartbeat carries the whole member list, see below), then ``--duration`` seconds measured.
     A heartbeat still in flight at its next tick makes the node skip that tick (counted).
     When the measured window opens, each client process freezes its heap (``gc.freeze``): it
     holds one member list per simulated node, and the cyclic GC scanning them would stall all
     of them at once, which a real node (one list) never sees.

Replies carry the member list only when the node's copy is stale (``members_version``), so the
steady state is O(1) per heartbeat; the replies that did carry it (every node's first, and the
next one after any join) are counted and timed separately.

Reported: registration wall time and per-registration latency; heartbeat RPC latency (the
awaited ``Heartbeat`` call alone, as the node's stub sees it) p50/p99/max, and the lag of ticks
behind their schedule (a sign that the client processes, not the coordinator, were saturated);
CPU of the coordinator and of the client processes over the heartbeat window (from
/proc/PID/stat, in cores), their RSS, and the 1-minute load average. With ``--check-max-nodes``
a second, small coordinator with ``registry.max_nodes = 4`` is started and five nodes try to
register: what the fifth gets (RESOURCE_EXHAUSTED) is printed.

This is a benchmark, not a test: it prints figures and asserts nothing about them. Every loop
is bounded in count and time (``--max-seconds`` caps the whole run).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GOAL_P99_MS = 50.0

RUN = {"model.preset": "tiny", "pipeline.stages": 2, "data.max_bytes": 262144, "timeouts.heartbeat_interval": 1.0}
"""The coordinator's run (pipeguard.app.runconfig keys); each use adds min_nodes, max_nodes and the heartbeat timeout."""

TICK = os.sysconf("SC_CLK_TCK")


# -- /proc figures ---------------------------------------------------------------------------------

def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (all its threads), in seconds; NaN if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICK  # fields 14 and 15 of proc(5)
    except (OSError, IndexError, ValueError):
        return float("nan")


def rss_mib(pid: int, key: str = "VmRSS") -> float:
    """Resident set size (``VmRSS``) or its peak (``VmHWM``) of ``pid`` in MiB; NaN if it is gone."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def loadavg() -> tuple[float, float, float]:
    a, b, c = os.getloadavg()
    return round(a, 2), round(b, 2), round(c, 2)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, int(round(q / 100 * (len(s) - 1)))))]


# -- the client side (one worker process) ------------------------------------------------------------

class TimedStub:
    """Wraps a Coordinator stub: times every awaited Heartbeat / Register call, nothing else."""

    def __init__(self, stub, hb_latencies: list[float], reg_latencies: list[float]):
        self._stub = stub
        self.hb = hb_latencies
        self.reg = reg_latencies
        self.Hello = stub.Hello
        self.FetchData = stub.FetchData

    async def Heartbeat(self, req, timeout=None):
        t0 = time.perf_counter()
        reply = await self._stub.Heartbeat(req, timeout=timeout)
        self.hb.append((time.monotonic(), time.perf_counter() - t0, len(reply.members)))
        return reply

    async def Register(self, req, timeout=None):
        t0 = time.perf_counter()
        reply = await self._stub.Register(req, timeout=timeout)
        self.reg.append(time.perf_counter() - t0)
        return reply


async def worker_main(opts: argparse.Namespace) -> None:
    import grpc

    from node.membership import Membership
    from pipeguard.config import NetConfig, TimeoutConfig
    from pipeguard.identity import Identity
    from pipeguard.rpc import channel
    from pipeguard.v1 import pipeguard_pb2 as pb
    from pipeguard.v1 import pipeguard_pb2_grpc as pb_grpc

    workdir = Path(opts.workdir)
    net = NetConfig(max_message_bytes=64 * 1024 * 1024)
    timeouts = TimeoutConfig(request=opts.request_timeout)
    channels = [channel(opts.address, net) for _ in range(opts.channels)]
    hb_lat: list[float] = []
    reg_lat: list[float] = []
    stubs = [TimedStub(pb_grpc.CoordinatorStub(ch), hb_lat, reg_lat) for ch in channels]
    nodes: list[Membership] = []
    for i in range(opts.count):
        m = Membership(Identity.generate(), opts.address, opts.coordinator_key, workdir / f"w{opts.worker}" / f"n{i}",
                       net, timeouts, stats=pb.HeartbeatRequest)
        await m._channel.close()  # the simulation shares channels; the membership's own is not used
        m.stub = stubs[i % len(stubs)]
        m.address = f"127.0.0.1:{20000 + opts.worker * opts.count + i}"  # nobody listens: it never trains
        nodes.append(m)

    # -- 1. registration ---------------------------------------------------------------------------
    retries: dict[str, int] = {}
    failed: dict[str, int] = {}
    sem = asyncio.Semaphore(opts.concurrency)
    reg_deadline = time.monotonic() + opts.register_timeout

    async def register(m: Membership) -> None:
        delay = 0.05
        for _ in range(50):  # bounded attempts
            async with sem:
                try:
                    await m.register()
                    return
                except grpc.aio.AioRpcError as err:
                    code = err.code().name
            if time.monotonic() > reg_deadline:
                break
            retries[code] = retries.get(code, 0) + 1
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay = min(2 * delay, 2.0)
        failed[code] = failed.get(code, 0) + 1

    t0 = time.time()
    await asyncio.gather(*(register(m) for m in nodes))
    reg_wall = time.time() - t0
    reg_lat_done = list(reg_lat)
    (workdir / f"registered-{opts.worker}.json").write_text(json.dumps({"t0": t0, "wall": reg_wall}))

    # -- 2. heartbeats at 1 Hz, from the parent's go time ---------------------------------------------
    go_file = workdir / "go.json"
    wait_until = time.monotonic() + opts.register_timeout + 60
    while not go_file.exists() and time.monotonic() < wait_until:
        await asyncio.sleep(0.05)
    go = json.loads(go_file.read_text()) if go_file.exists() else {"start": time.time(), "warmup": 0, "duration": 0}
    start_mono = time.monotonic() + (go["start"] - time.time())
    window = start_mono + go["warmup"]  # latencies count from here
    end_mono = window + go["duration"]
    hb_lat.clear()
    lags: list[float] = []
    hb_errors: dict[str, int] = {}
    beats = [0]

    missed = [0]

    async def beat(m: Membership, phase: float) -> None:
        if not m.registered.is_set():
            return
        k = 0
        for _ in range(int(go["warmup"] + go["duration"]) + 2):  # bounded: one beat per second
            due = start_mono + phase + k
            if due >= end_mono:
                return
            now = time.monotonic()
            if due > now:
                await asyncio.sleep(due - now)
            if due >= window:
                lags.append(time.monotonic() - due)
            try:
                await m.heartbeat()
                beats[0] += due >= window
            except grpc.aio.AioRpcError as err:
                hb_errors[err.code().name] = hb_errors.get(err.code().name, 0) + 1
            except Exception as exc:  # noqa: BLE001 - a typed pipeguard error (e.g. a bad signature)
                hb_errors[type(exc).__name__] = hb_errors.get(type(exc).__name__, 0) + 1
            # The next tick still ahead: a heartbeat that took longer than a second skips ticks.
            nxt = max(k + 1, int(time.monotonic() - start_mono - phase) + 1)
            missed[0] += (nxt - k - 1) if due >= window else 0
            k = nxt

    async def freeze_at_window() -> None:
        # 500 simulated nodes in one process hold 500 member lists (a real node holds one): at
        # 1,000 nodes that is 500k objects, and each full collection of the cyclic GC would stall
        # every simulated node of the process at once. Freeze what the warm-up built.
        await asyncio.sleep(max(0.0, window - time.monotonic()))
        gc.collect()
        gc.freeze()

    await asyncio.gather(freeze_at_window(), *(beat(m, random.random()) for m in nodes))
    result = {
        "worker": opts.worker, "nodes": len(nodes), "registered": sum(m.registered.is_set() for m in nodes),
        "register_wall_s": reg_wall, "register_latency_s": reg_lat_done, "register_retries": retries,
        "register_failed": failed, "heartbeats": beats[0], "ticks_missed": missed[0], "heartbeat_errors": hb_errors,
        "heartbeat_latency_s": [dt for t, dt, _ in hb_lat if t - dt >= window],
        "full_list_latency_s": [dt for t, dt, n in hb_lat if n > 1], "tick_lag_s": lags,
        "members_seen": statistics.median([len(m.members) for m in nodes]) if nodes else 0,
    }
    (workdir / f"result-{opts.worker}.json").write_text(json.dumps(result))
    for ch in channels:
        await ch.close()


# -- the parent ----------------------------------------------------------------------------------------

def check_max_nodes(workdir: Path, python: str) -> str:
    """A small coordinator with registry.max_nodes = 4: what does a fifth registration get?"""
    import grpc

    from node.membership import Membership
    from pipeguard.config import NetConfig, TimeoutConfig
    from pipeguard.app.runconfig import run_config
    from pipeguard.app.testnet import LocalTestnet
    from pipeguard.identity import Identity
    from pipeguard.v1 import pipeguard_pb2 as pb

    # It tries to train; no matter.
    run = run_config(RUN, {"pipeline.min_nodes": 4, "registry.max_nodes": 4, "timeouts.heartbeat_timeout": 60})
    with LocalTestnet(workdir / "maxnodes", run, python=python) as tn:
        c = tn.start_coordinator()

        async def go() -> str:
            ms = [Membership(Identity.generate(), c.address, c.info["public_key"], workdir / "maxnodes" / f"n{i}",
                             NetConfig(), TimeoutConfig(), stats=pb.HeartbeatRequest) for i in range(5)]
            outcome = []
            for i, m in enumerate(ms):
                m.address = f"127.0.0.1:{30000 + i}"
                try:
                    await m.register()
                    outcome.append("OK")
                except grpc.aio.AioRpcError as err:
                    outcome.append(f"{err.code().name}: {err.details()}")
            for m in ms:
                await m.close()
            return "; ".join(f"#{i + 1} {o}" for i, o in enumerate(outcome))

        return asyncio.run(go())


def handler_cost(nodes: int, calls: int = 2000) -> dict:
    """CPU time of the coordinator's Heartbeat handler alone, in this process, with ``nodes``
    registered: a figure that other load on the machine does not skew (it is CPU time, not wall
    time). Once for a node whose member list is current, once for one that needs the whole list."""
    from coordinator.clock import StepClock
    from coordinator.config import CoordinatorConfig, ModelConfig, PipelineConfig, RegistryConfig
    from coordinator.registry import NodeRecord, Registry
    from coordinator.service import CoordinatorService
    from coordinator.state import EventLog, RunStore
    from pipeguard.data import Dataset
    from pipeguard.identity import Identity
    from pipeguard.signing import sign
    from pipeguard.v1 import pipeguard_pb2 as pb

    async def go() -> dict:
        with tempfile.TemporaryDirectory(prefix="pipeguard-handler-") as d:
            cfg = CoordinatorConfig(run_id="handler", state_dir=d, model=ModelConfig(n_layer=2, n_embd=16, n_head=2),
                                    pipeline=PipelineConfig(stages=2),
                                    registry=RegistryConfig(max_nodes=nodes + 1))
            store = RunStore(d)
            coord = Identity.generate()
            state, _ = store.load_or_create(cfg.run_id)
            registry = Registry(cfg.timeouts.heartbeat_timeout, challenge_ttl=10.0, limits=cfg.registry)
            ids = [Identity.generate() for _ in range(nodes)]
            for i, ident in enumerate(ids):
                registry.nodes[ident.node_id] = NodeRecord(node_id=ident.node_id, public_key=ident.public_key,
                                                           address=f"127.0.0.1:{20000 + i}")
            data = Dataset(blob=bytes(range(256)) * 64, val_offset=8192)
            clock = StepClock(cfg, coord, registry, state, store, EventLog(store), data.digest)
            service = CoordinatorService(cfg, coord, registry, clock, EventLog(store), data)
            out = {}
            for label, current in (("list current", True), ("whole list", False)):
                for r in registry.nodes.values():
                    r.heartbeat_seq = 0
                version = (await service.Heartbeat(sign(pb.HeartbeatRequest(node_id=ids[0].node_id, seq=1), ids[0]),
                                                   None)).members_version
                reqs = [sign(pb.HeartbeatRequest(node_id=ids[k % nodes].node_id, seq=2 + k // nodes,
                                                 members_version=version if current else 0), ids[k % nodes])
                        for k in range(calls)]
                t0 = time.process_time()
                for r in reqs:
                    await service.Heartbeat(r, None)
                out[label] = 1e3 * (time.process_time() - t0) / calls
            await clock.close()
            return out

    return asyncio.run(go())


def main_parent(opts: argparse.Namespace) -> dict:
    from pipeguard.app.runconfig import run_config
    from pipeguard.app.testnet import LocalTestnet, wait_for

    deadline = time.monotonic() + opts.max_seconds
    python = sys.executable
    workdir = Path(tempfile.mkdtemp(prefix="pipeguard-load-"))
    # One node short of training: it never starts.
    run = run_config(RUN, {"pipeline.min_nodes": opts.nodes + 1, "registry.max_nodes": max(4096, opts.nodes + 1),
                           "timeouts.heartbeat_timeout": max(30, opts.duration)})
    per_worker = [opts.nodes // opts.workers + (1 if w < opts.nodes % opts.workers else 0) for w in range(opts.workers)]
    res: dict = {"nodes": opts.nodes, "workers": opts.workers, "channels_per_worker": opts.channels,
                 "duration_s": opts.duration, "warmup_s": opts.warmup, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
                 "load_avg_start": loadavg()}
    print(f"coordinator load: {opts.nodes} nodes in {opts.workers} client processes x {opts.channels} channels, "
          f"{opts.duration:.0f} s of 1 Hz heartbeats; load average {res['load_avg_start']}", flush=True)
    workers: list[subprocess.Popen] = []
    with LocalTestnet(workdir / "net", run, python=python) as tn:
        coord = tn.start_coordinator()
        cpid = coord.proc.pid
        res["coordinator_rss_idle_mib"] = rss_mib(cpid)
        t_reg = time.time()
        cpu_reg0 = cpu_seconds(cpid)
        for w, count in enumerate(per_worker):
            argv = [python, __file__, "--worker", str(w), "--count", str(count), "--address", coord.address,
                    "--coordinator-key", coord.info["public_key"], "--workdir", str(workdir),
                    "--channels", str(opts.channels), "--concurrency", str(opts.concurrency),
                    "--register-timeout", str(opts.register_timeout), "--request-timeout", str(opts.request_timeout)]
            workers.append(subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                            stdout=open(workdir / f"worker-{w}.log", "wb"), stderr=subprocess.STDOUT))
        try:
            def all_registered():
                for p in workers:
                    if p.poll() is not None:
                        raise RuntimeError(f"worker exited early: {(workdir / 'worker-0.log').read_text()[-2000:]}")
                return all((workdir / f"registered-{w}.json").exists() for w in range(opts.workers))

            wait_for(all_registered, min(opts.register_timeout + 120, deadline - time.monotonic()),
                     "every worker to finish registering", interval=0.1)
            reg = [json.loads((workdir / f"registered-{w}.json").read_text()) for w in range(opts.workers)]
            res["register_wall_s"] = max(r["t0"] + r["wall"] for r in reg) - t_reg
            res["coordinator_cpu_s_registration"] = cpu_seconds(cpid) - cpu_reg0
            res["registered_status"] = len(tn.status(history=1, timeout=60).nodes)
            res["coordinator_rss_registered_mib"] = rss_mib(cpid)

            duration = max(0.0, min(opts.duration, deadline - time.monotonic() - 30 - opts.warmup))
            start = time.time() + 1.0
            (workdir / "go.json").write_text(json.dumps({"start": start, "warmup": opts.warmup, "duration": duration}))
            time.sleep(max(0.0, start + opts.warmup - time.time()))
            pids = [cpid] + [p.pid for p in workers]
            cpu0 = [cpu_seconds(p) for p in pids]
            w0 = time.monotonic()
            rss_max = 0.0
            for _ in range(int(duration) + 1):  # one RSS sample a second
                rss_max = max(rss_max, rss_mib(cpid))
                left = w0 + duration - time.monotonic()
                if left <= 0:
                    break
                time.sleep(min(1.0, left))
            wall = time.monotonic() - w0
            cpu1 = [cpu_seconds(p) for p in pids]
            res["load_avg_end"] = loadavg()
            res["coordinator_cores"] = (cpu1[0] - cpu0[0]) / wall
            res["clients_cores"] = sum(b - a for a, b in zip(cpu0[1:], cpu1[1:])) / wall
            res["coordinator_rss_mib"] = rss_max
            res["coordinator_rss_peak_mib"] = rss_mib(cpid, "VmHWM")
            res["clients_rss_mib"] = [round(rss_mib(p.pid), 1) for p in workers]

            def all_done():
                return all((workdir / f"result-{w}.json").exists() for w in range(opts.workers))

            wait_for(all_done, max(60.0, deadline - time.monotonic()), "worker results", interval=0.2)
        finally:
            for p in workers:
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
    results = [json.loads((workdir / f"result-{w}.json").read_text()) for w in range(opts.workers)]
    hb = [x for r in results for x in r["heartbeat_latency_s"]]
    lag = [x for r in results for x in r["tick_lag_s"]]
    regl = [x for r in results for x in r["register_latency_s"]]
    full = [x for r in results for x in r["full_list_latency_s"]]
    merge = lambda key: {k: sum(r[key].get(k, 0) for r in results) for r in results for k in r[key]}  # noqa: E731
    res.update({
        "registered": sum(r["registered"] for r in results),
        "register_latency_ms": {"p50": 1e3 * percentile(regl, 50), "p99": 1e3 * percentile(regl, 99),
                                "max": 1e3 * max(regl, default=float("nan"))},
        "register_retries": merge("register_retries"), "register_failed": merge("register_failed"),
        "heartbeats": sum(r["heartbeats"] for r in results),
        "ticks_missed": sum(r["ticks_missed"] for r in results),
        "heartbeats_per_s": sum(r["heartbeats"] for r in results) / max(duration, 1e-9),
        "heartbeat_errors": merge("heartbeat_errors"),
        "heartbeat_latency_ms": {"p50": 1e3 * percentile(hb, 50), "p90": 1e3 * percentile(hb, 90),
                                 "p99": 1e3 * percentile(hb, 99), "max": 1e3 * max(hb, default=float("nan"))},
        "full_list_replies": len(full),
        "full_list_latency_ms": {"p50": 1e3 * percentile(full, 50), "p99": 1e3 * percentile(full, 99)},
        "tick_lag_ms": {"p50": 1e3 * percentile(lag, 50), "p99": 1e3 * percentile(lag, 99)},
        "members_per_reply_median": statistics.median([r["members_seen"] for r in results]),
    })
    if opts.check_max_nodes:
        res["max_nodes_check"] = check_max_nodes(workdir, python)
    res["handler_cpu_ms"] = handler_cost(opts.nodes)
    return res


def report(res: dict) -> None:
    h, r, lag = res["heartbeat_latency_ms"], res["register_latency_ms"], res["tick_lag_ms"]
    print(f"registration: {res['registered']}/{res['nodes']} nodes in {res['register_wall_s']:.1f} s "
          f"(per registration p50 {r['p50']:.1f} ms, p99 {r['p99']:.1f} ms, max {r['max']:.1f} ms; "
          f"retries {res['register_retries'] or 0}, failed {res['register_failed'] or 0}); "
          f"coordinator CPU {res['coordinator_cpu_s_registration']:.1f} s")
    print(f"heartbeats:   {res['heartbeats']} in {res['duration_s']:.0f} s ({res['heartbeats_per_s']:.0f}/s), "
          f"ticks skipped (a heartbeat still in flight) {res['ticks_missed']}, errors {res['heartbeat_errors'] or 0}, members per reply {res['members_per_reply_median']:.0f}")
    print(f"latency:      p50 {h['p50']:.2f} ms  p90 {h['p90']:.2f} ms  p99 {h['p99']:.2f} ms  max {h['max']:.1f} ms"
          f"   (goal p99 < {GOAL_P99_MS:.0f} ms: {'met' if h['p99'] < GOAL_P99_MS else 'MISSED'})")
    f = res["full_list_latency_ms"]
    print(f"full lists:   {res['full_list_replies']} replies carried the member list (first heartbeat after a "
          f"change; warm-up included): p50 {f['p50']:.1f} ms, p99 {f['p99']:.1f} ms")
    print(f"tick lag:     p50 {lag['p50']:.2f} ms  p99 {lag['p99']:.2f} ms (client-side scheduling delay)")
    print(f"CPU:          coordinator {res['coordinator_cores']:.2f} cores, clients {res['clients_cores']:.2f} cores "
          f"(of {os.cpu_count()})")
    print(f"RSS:          coordinator {res['coordinator_rss_idle_mib']:.0f} MiB idle, "
          f"{res['coordinator_rss_registered_mib']:.0f} MiB registered, max {res['coordinator_rss_mib']:.0f} MiB "
          f"during heartbeats (peak {res['coordinator_rss_peak_mib']:.0f}); clients {res['clients_rss_mib']} MiB")
    hc = res["handler_cpu_ms"]
    print(f"handler CPU:  {hc['list current']:.3f} ms per Heartbeat when the node's member list is current, "
          f"{hc['whole list']:.3f} ms when the reply carries all {res['nodes']} members (in-process, CPU time)")
    print(f"load average: {res['load_avg_start']} at start, {res['load_avg_end']} at end")
    if "max_nodes_check" in res:
        print(f"max_nodes=4:  {res['max_nodes_check']}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nodes", type=int, default=1000, help="simulated nodes")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of 1 Hz heartbeats measured")
    p.add_argument("--warmup", type=float, default=30.0,
                   help="seconds of heartbeats before the measured window (every node's first one carries the "
                        "whole member list)")
    p.add_argument("--workers", type=int, default=2, help="client processes")
    p.add_argument("--channels", type=int, default=8, help="gRPC channels per client process")
    p.add_argument("--concurrency", type=int, default=32, help="registrations in flight per client process")
    p.add_argument("--register-timeout", type=float, default=300.0, help="give up registering after this long")
    p.add_argument("--request-timeout", type=float, default=30.0, help="deadline of each RPC")
    p.add_argument("--check-max-nodes", action="store_true",
                   help="also start a coordinator with registry.max_nodes = 4 and register 5 nodes")
    p.add_argument("--max-seconds", type=float, default=900.0, help="cap on the whole run")
    p.add_argument("--json", help="also write the results here (without the raw samples)")
    # worker mode (started by the parent)
    p.add_argument("--worker", type=int, default=-1, help=argparse.SUPPRESS)
    p.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--address", default="", help=argparse.SUPPRESS)
    p.add_argument("--coordinator-key", default="", help=argparse.SUPPRESS)
    p.add_argument("--workdir", default="", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    opts = parse_args(argv)
    if opts.worker >= 0:
        from pipeguard.rpc import install_event_loop_policy

        install_event_loop_policy()
        asyncio.run(worker_main(opts))
        return 0
    res = main_parent(opts)
    report(res)
    if opts.json:
        Path(opts.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
