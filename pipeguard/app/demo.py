"""``pipeguard testnet``: a whole run as local processes, with progress and a summary.

Starts a coordinator and ``--nodes`` nodes on loopback (the node serving
``--malicious-stage`` misbehaves), trains, prints progress, then a summary, and always
shuts every process down, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import math
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from pipeguard.app.runconfig import run_config
from pipeguard.app.testnet import LocalTestnet, TestnetError, wait_for
from pipeguard.config import ConfigError
from pipeguard.v1 import pipeguard_pb2 as pb

RUN = {"train.micro_batch_size": 8, "timeouts.heartbeat_interval": 0.5, "timeouts.heartbeat_timeout": 5.0}
"""The testnet's fixed settings (runconfig keys); the flags give the rest."""


def _progress(status: pb.StatusReply, t0: float, tty: bool) -> str:
    p = status.losses[-1]
    bar_w = 30
    done = int(bar_w * status.step / max(1, status.total_steps))
    bar = "█" * done + "·" * (bar_w - done)
    text = (f"step {status.step:>4}/{status.total_steps} {bar} loss {p.loss:.4f}  "
            f"{p.tokens_per_s:>8,.0f} tok/s  {time.monotonic() - t0:5.1f}s")
    return ("\r" + text) if tty else text


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def run_testnet(args: argparse.Namespace) -> int:
    attacks = [a for a in (args.attack or ["forward:reverse"]) if a != "none"]
    if args.nodes < args.stages:
        print(f"pipeguard testnet: --nodes ({args.nodes}) must be at least --stages ({args.stages})", file=sys.stderr)
        return 2
    if not 0 <= args.malicious_stage < args.stages:
        print(f"pipeguard testnet: --malicious-stage must be in 0..{args.stages - 1}", file=sys.stderr)
        return 2
    try:
        run = run_config(RUN, {"model.preset": args.model, "train.steps": args.steps, "train.seed": args.seed,
                               "train.micro_batches": args.micro_batches, "pipeline.stages": args.stages,
                               "pipeline.min_nodes": args.nodes})
    except ConfigError as exc:
        print(f"pipeguard testnet: {exc}", file=sys.stderr)
        return 2
    from pipeguard import device as devices

    try:
        for where in {args.device, args.auditor_device or args.device}:
            devices.resolve(where)
    except ValueError as exc:
        print(f"pipeguard testnet: {exc}", file=sys.stderr)
        return 2
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="pipeguard-testnet-"))
    net = LocalTestnet(workdir, run)
    tty = sys.stdout.isatty()
    # SIGTERM (e.g. `timeout`, a service manager) gets the same clean shutdown as Ctrl-C.
    signal.signal(signal.SIGTERM, _interrupt)
    status: pb.StatusReply | None = None
    malicious_id = ""
    interrupted = False
    try:
        print(f"pipeguard testnet: coordinator + {args.nodes} nodes, {args.stages} stages, "
              f"{args.steps} steps, model {args.model}; logs in {workdir}")
        net.start_coordinator()
        print(f"  coordinator   {net.coordinator.address}")
        for i in range(args.nodes):
            # Nodes register one at a time so stage i goes to node i and the malicious one lands
            # on --malicious-stage; nodes beyond --stages stand by.
            extra: list[str] = ["--device", (args.auditor_device or args.device) if i >= args.stages else args.device]
            malicious = bool(i == args.malicious_stage and attacks)
            if malicious:
                for a in attacks:
                    extra += ["--attack", a]
                extra += ["--attack-rate", str(args.attack_rate)]
            node = net.start_node(*extra)
            net.wait_registered(i + 1)
            role = f"stage {i}" if i < args.stages else "standby"
            note = f"  MALICIOUS: {'+'.join(attacks)} at rate {args.attack_rate}" if malicious else ""
            if malicious:
                malicious_id = node.node_id
            print(f"  node {node.node_id[:8]}  {node.address:<21} {role}{note}")
        t0 = time.monotonic()
        last_step = -1

        def progressed():
            nonlocal status, last_step
            status = net.status(history=1)
            if status.losses and status.step != last_step:
                crossed = status.step // 10 != last_step // 10 or status.step == status.total_steps
                last_step = status.step
                if tty or crossed:
                    print(_progress(status, t0, tty), end="" if tty else "\n", flush=True)
            if status.phase == pb.RUN_PHASE_FAILED:
                raise TestnetError("run failed; see the coordinator log in " + str(workdir))
            return status.phase == pb.RUN_PHASE_FINISHED

        wait_for(progressed, timeout=max(600.0, 10.0 * args.steps), what="training to finish", interval=0.25)
        if tty:
            print()
        status = net.status(history=args.steps + 10)
    except KeyboardInterrupt:
        interrupted = True
        print("\ninterrupted; shutting down")
    except TestnetError as exc:
        print(f"\npipeguard testnet: {exc}", file=sys.stderr)
        return 1
    finally:
        if status is None or not status.losses:
            try:
                status = net.status(history=args.steps + 10)
            except Exception:  # noqa: BLE001 - the coordinator may be gone already
                pass
        net.stop()
        net.kill()
    _summary(args, status, malicious_id, attacks, interrupted)
    if not args.workdir:
        if status is not None and status.evidence:
            print(f"\nkept {workdir} (it holds the evidence; remove it when done)")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 130 if interrupted else 0


def _summary(args, status: pb.StatusReply | None, malicious_id: str, attacks: list[str], interrupted: bool) -> None:
    print("\nsummary")
    if status is None or not status.losses:
        print("  no steps completed")
        return
    losses = [p.loss for p in status.losses]
    tail = losses[-max(1, len(losses) // 10):]
    final = sum(tail) / len(tail)
    print(f"  steps completed   {status.step}/{status.total_steps}")
    print(f"  loss              {losses[0]:.4f} -> {final:.4f} (mean of the last {len(tail)} steps)")
    print(f"  audits            {status.audits_total} dispatched, {status.detections} confirmed detections")
    banned = [n for n in status.nodes if n.role == pb.ROLE_BANNED]
    if malicious_id:
        print(f"  malicious node    {malicious_id[:8]} ({'+'.join(attacks)}, rate {args.attack_rate})")
    for n in banned:
        ev = next((e for e in status.events if e.kind == "banned" and e.node_id == n.node_id), None)
        when = f" at step {ev.step}" if ev is not None and ev.HasField("step") else ""
        honest = "" if n.node_id == malicious_id else "  <-- an HONEST node was banned"
        print(f"  banned            {n.node_id[:8]}{when}: {n.ban_reason}{honest}")
    if malicious_id and not any(n.node_id == malicious_id for n in banned):
        print("  detection         the malicious node was not caught in this run")
    for kind in ("rolled_back", "stage_assigned", "stage_skipped"):
        for e in status.events:
            if e.kind == kind and e.step > 0:
                print(f"  recovery          {e.message}")
    for path in status.evidence:
        from pipeguard.evidence import verify_bundle

        result = verify_bundle(Path(path))
        print(f"  evidence          {path}\n                    pipeguard verify: {'VALID' if result.valid else 'INVALID'}"
              f" ({result.summary[:100]})")
    if not args.no_compare and not interrupted and status.step == status.total_steps:
        if sys.stdout.isatty():
            print("  clean reference   training the same model in this process…", end="\r", flush=True)
        clean = _clean_loss(args, status.step)
        ratio = final / clean
        print(f"  clean reference   {clean:.4f} (same model, seed and batches in one process)")
        print(f"  poisoned / clean  {ratio:.3f}x loss, {math.exp(final) / math.exp(clean):.2f}x perplexity")


def _clean_loss(args, steps: int) -> float:
    from coordinator.config import TrainConfig, ModelConfig
    from pipeguard.computation import REFEREE_THREADS, Determinism
    from pipeguard.data import stdlib_corpus
    from pipeguard.reference import train_reference

    gpt = ModelConfig(preset=args.model).gpt()
    train = TrainConfig(steps=steps, seed=args.seed, micro_batches=args.micro_batches, micro_batch_size=8)
    Determinism(REFEREE_THREADS).apply()  # as the judge recomputes; OpenMP threads crawl on a busy machine
    ref = train_reference(gpt, train.optim(), stdlib_corpus(4 * 1024 * 1024), seed=args.seed, steps=steps,
                          micro_batches=args.micro_batches, micro_batch_size=8)
    tail = ref.losses[-max(1, len(ref.losses) // 10):]
    return sum(tail) / len(tail)
