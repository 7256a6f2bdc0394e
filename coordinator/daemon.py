"""``pipeguard-coordinator``: parse config, set up logging, build, serve, shut down in ``finally``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from pipeguard import config as pgconfig
from pipeguard import device as devices
from pipeguard.computation import REFEREE_THREADS, Determinism, node_build
from pipeguard.data import Dataset, load_dataset
from pipeguard.identity import Identity
from pipeguard.rpc import run_daemon, set_log_prefix, setup_logging, start_server, write_ready_file
from pipeguard.metrics import serve_metrics
from pipeguard.model import warm_up_optimizer
from pipeguard.v1 import pipeguard_pb2 as pb
from pipeguard.v1 import pipeguard_pb2_grpc as pb_grpc
from coordinator.admin import Admin, load_or_create_token, token_path
from coordinator.audits import AuditScheduler
from coordinator.channels import NodeChannels
from coordinator.clock import StepClock
from coordinator.config import CoordinatorConfig
from coordinator.convictions import Convictions
from coordinator.judge import Judge
from coordinator.metrics import CoordinatorMetrics
from coordinator.pipeline import Pipeline
from coordinator.registry import NodeRecord, Registry
from coordinator.service import CoordinatorService
from coordinator.state import EventLog, RunState, RunStore, StateError

log = logging.getLogger("coordinator")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="pipeguard-coordinator", description="Coordinate a pipeguard training run.")
    p.add_argument("--config", help="run TOML file (flags override it)")
    p.add_argument("--bind", help="HOST:PORT to listen on (default 127.0.0.1:7000)")
    p.add_argument("--advertise", help="HOST:PORT nodes use to reach the coordinator")
    p.add_argument("--state-dir", help="directory for key, run state and events")
    p.add_argument("--run-id", help="run identifier (default: generated)")
    p.add_argument("--stages", type=int, help="pipeline stages")
    p.add_argument("--steps", type=int, help="optimizer steps")
    p.add_argument("--model", help="model preset: tiny, small, gpt2")
    p.add_argument("--data", help="text file to train on (default: Python standard library sources)")
    p.add_argument("--log-level", help="DEBUG, INFO, WARNING, ERROR")
    p.add_argument("--ready-file", help="write {address, node_id} JSON here once serving")
    p.add_argument("--resume", action="store_true", default=None,
                   help="continue the run held in --state-dir (required when it holds one)")
    p.add_argument("--admin-token-file", help="admin token for ban/unban/stop/audit-rate "
                   "(default STATE_DIR/admin.token, created if missing)")
    p.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this HTTP port (0 = off)")
    pgconfig.add_tls_flags(p)
    return p.parse_args(argv)


def load_config(args: argparse.Namespace) -> CoordinatorConfig:
    return pgconfig.load(CoordinatorConfig, path=args.config, cli={
        "net.bind": args.bind,
        "net.advertise": args.advertise,
        "state_dir": args.state_dir,
        "run_id": args.run_id,
        "pipeline.stages": args.stages,
        "train.steps": args.steps,
        "model.preset": args.model,
        "data.path": args.data,
        "log_level": args.log_level,
        "ready_file": args.ready_file,
        "resume": args.resume,
        "admin_token_file": args.admin_token_file,
        "net.metrics_port": args.metrics_port,
        **pgconfig.tls_flag_values(args),
    })


def build_clock(cfg: CoordinatorConfig, identity: Identity, registry: Registry, state: RunState, store: RunStore,
                events: EventLog, dataset: Dataset) -> StepClock:
    """The step clock with its judge and audit scheduler. They share the node channels and one
    ``Convictions`` (over the clock's ``Pipeline``): the judge convicts through it, the clock reads
    what convictions ask of the pipeline; the clock hands committed steps to the scheduler."""
    channels = NodeChannels(identity, cfg.net, cfg.timeouts)
    convictions = Convictions(registry, state, store, events, Pipeline(state.skipped))
    judge = Judge(identity=identity, registry=registry, events=events, dataset=dataset,
                  evidence_dir=store.dir / "evidence", timeout=cfg.audit_timeout,
                  net=cfg.net, channels=channels, convictions=convictions,
                  recheck_rate=cfg.audit.recheck_rate, device=devices.resolve(cfg.audit.device))
    audits = AuditScheduler(cfg=cfg, run_id=state.run_id, data_digest=dataset.digest, identity=identity,
                            registry=registry, events=events, dataset=dataset, judge=judge, channels=channels)
    return StepClock(cfg, identity, registry, state, store, events, dataset.digest, channels=channels,
                     convictions=convictions, audits=audits)


async def serve(cfg: CoordinatorConfig, stop: asyncio.Event) -> None:
    store = RunStore(cfg.state_dir)
    identity = Identity.load_or_create(store.key_path)
    set_log_prefix(f"coordinator {identity.node_id[:8]}")
    state, resumed = store.load_or_create(cfg.run_id, resume=cfg.resume)
    if state.audit_rate is not None and state.audit_rate != cfg.audit.rate:
        log.warning("audit rate %g set by an operator overrides the config's %g", state.audit_rate, cfg.audit.rate)
        cfg.audit.rate = state.audit_rate
    token = load_or_create_token(token_path(cfg.admin_token_file, cfg.state_dir))
    events = EventLog(store)
    # Exact mode compares recomputations bit for bit: only the judge's own build is comparable.
    required = node_build(threads=REFEREE_THREADS, device=devices.resolve(cfg.audit.device)) \
        if cfg.audit.tolerance == 0 else None
    registry = Registry(cfg.timeouts.heartbeat_timeout, challenge_ttl=cfg.timeouts.request, limits=cfg.registry,
                        required_build=required)
    for d in state.nodes:
        rec = NodeRecord.from_json(d)
        registry.nodes[rec.node_id] = rec
    dataset = await asyncio.get_running_loop().run_in_executor(None, load_dataset, cfg.data.path, cfg.data.max_bytes)
    clock = build_clock(cfg, identity, registry, state, store, events, dataset)
    service = CoordinatorService(cfg, identity, registry, clock, events, dataset, Admin(token, clock))
    server, address, _ = await start_server(
        cfg.net, lambda s: pb_grpc.add_CoordinatorServicer_to_server(service, s), ["pipeguard.v1.Coordinator"],
        cfg.timeouts)
    metrics = serve_metrics(cfg.net, CoordinatorMetrics(clock, events))
    events.emit("coordinator_started", f"coordinator {identity.node_id[:8]} serving run {state.run_id} on {address}"
                + (f", resumed at step {state.step}" if resumed else ""), step=state.step)
    log.info("coordinator key %s; dataset %s… (%d train + %d validation bytes)", identity.public_key.hex(),
             dataset.digest.hex()[:16], dataset.train_bytes, dataset.val_bytes)
    write_ready_file(cfg.ready_file, address=address, node_id=identity.node_id, public_key=identity.public_key.hex(),
                     run_id=state.run_id, metrics=metrics.address if metrics else "")

    async def monitor() -> None:
        while True:
            await asyncio.sleep(cfg.timeouts.heartbeat_interval)
            for rec in registry.expire():
                events.emit("node_offline", f"node {rec.node_id[:8]} missed heartbeats for "
                            f"{cfg.timeouts.heartbeat_timeout:.0f}s", node_id=rec.node_id, step=state.step)
                clock.node_lost(rec)

    async def drive() -> None:
        try:
            await clock.run()
        except StateError as exc:
            state.phase = pb.RUN_PHASE_FAILED
            log.error("run state cannot be saved, training stopped: %s", exc)
            events.emit("run_failed", f"run state cannot be saved, training stopped: {exc}. The state directory "
                        f"keeps the last step saved whole; make room (or make it writable) and restart the "
                        f"coordinator with --resume", step=state.step)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a bug must show up in status, not vanish with the task
            log.exception("step clock crashed")
            state.phase = pb.RUN_PHASE_FAILED
            events.emit("run_failed", f"step clock crashed: {exc!r}", step=state.step)

    if state.phase == pb.RUN_PHASE_FINISHED and state.step >= cfg.train.steps:
        log.info("run %s finished at step %d: serving its status only", state.run_id, state.step)
        clock_task = asyncio.create_task(asyncio.sleep(0))
    else:
        clock_task = asyncio.create_task(drive())
    monitor_task = asyncio.create_task(monitor())
    try:
        await stop.wait()
    finally:
        log.info("shutting down")
        clock_task.cancel()
        monitor_task.cancel()
        await asyncio.wait([clock_task])
        if state.phase == pb.RUN_PHASE_TRAINING:
            # Keep what the stages hold now, so that --resume loses nothing (if they are still up).
            await clock.checkpointer.take_now(cfg.audit.shutdown_checkpoint)
            clock.persist()
        if metrics is not None:
            metrics.close()
        await server.stop(grace=1.0)
        await clock.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.log_level or "INFO", "coordinator")
    try:
        cfg = load_config(args)
    except pgconfig.ConfigError as exc:
        print(f"pipeguard-coordinator: {exc}", file=sys.stderr)
        return 2
    setup_logging(cfg.log_level, "coordinator")
    log.info("resolved config:\n%s", pgconfig.to_toml(cfg))
    # The judge's recomputations use one thread, like nodes by default: identical thread
    # counts give bit-identical results (benchmarks/audit_tolerance.py).
    try:
        judge_device = devices.resolve(cfg.audit.device, "audit.device")
    except ValueError as exc:
        print(f"pipeguard-coordinator: {exc}", file=sys.stderr)
        return 2
    Determinism.for_device(REFEREE_THREADS, judge_device).apply()

    warm_up_optimizer()
    return run_daemon("pipeguard-coordinator", lambda stop: serve(cfg, stop))


if __name__ == "__main__":
    sys.exit(main())
