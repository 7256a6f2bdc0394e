"""``pipeguard-node``: parse config, set up logging, build, serve, shut down in ``finally``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeguard import config as pgconfig
from pipeguard import device as devices
from pipeguard.computation import Determinism
from pipeguard.identity import Identity
from pipeguard.metrics import serve_metrics
from pipeguard.model import warm_up_optimizer
from pipeguard.rpc import run_daemon, set_log_prefix, setup_logging, start_server, write_ready_file
from pipeguard.v1 import pipeguard_pb2_grpc as pb_grpc
from node import attacks
from node.config import NodeConfig
from node.auditor import NodeAuditor, VerdictSigner
from node.membership import Membership
from node.metrics import NodeMetrics
from node.peers import PeerPool
from node.seams import Seams
from node.service import NodeService
from node.stage import StageRuntime

log = logging.getLogger("node")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="pipeguard-node", description="Serve one pipeline stage of a pipeguard run.")
    p.add_argument("--config", help="node TOML file (flags override it)")
    p.add_argument("--coordinator", help="coordinator HOST:PORT")
    p.add_argument("--coordinator-key", help="pin the coordinator's public key (hex)")
    p.add_argument("--bind", help="HOST:PORT to listen on (default 127.0.0.1:0)")
    p.add_argument("--advertise", help="HOST:PORT other daemons use to reach this node")
    p.add_argument("--home", help="directory for the key and dataset cache (default ~/.pipeguard/node)")
    p.add_argument("--threads", type=int, help="torch threads for compute (default 1)")
    p.add_argument("--device", help="cpu, cuda, cuda:N or auto (default auto: cuda:0 when available)")
    p.add_argument("--attack", action="append", help="misbehave: a built-in such as forward:reverse, repeatable "
                   "(see node/attacks.py and the README's attack table)")
    p.add_argument("--attack-rate", type=float, help="probability per message or event an attack fires (default 1)")
    p.add_argument("--attack-start", type=int, help="first step attacks fire (default 0)")
    p.add_argument("--attack-stop", type=int, help="attacks fire before this step only (default -1: never stop)")
    p.add_argument("--attack-micro-batches", help="micro-batches to attack, e.g. 0,2 (default all)")
    p.add_argument("--attack-noise-std", type=float, help="absolute std of forward/backward:noise (default 1)")
    p.add_argument("--attack-noise-scale", type=float, help="noise std relative to the tensor's std (default 0: "
                   "use --attack-noise-std)")
    p.add_argument("--attack-scale", type=float, help="factor k of forward/backward:scale (default 10)")
    p.add_argument("--attack-fraction", type=float, help="fraction of elements sign-flip flips (default 0.1)")
    p.add_argument("--attack-ride", type=float, help="share of the audit allowance forward/backward/update:ride "
                   "spend (default 0.9; above 1 exceeds it)")
    p.add_argument("--attack-delay", type=float, help="seconds node:slow waits before each send (default 2)")
    p.add_argument("--attack-accomplice", action="append", help="node id audit:clear shields, repeatable "
                   "(default: everybody)")
    p.add_argument("--attack-seed", type=int, help="seed of the attack's coin flips (default: from the node id)")
    p.add_argument("--attack-plugin", help="user behaviour PATH.py:ClassName")
    p.add_argument("--log-level", help="DEBUG, INFO, WARNING, ERROR")
    p.add_argument("--ready-file", help="write {address, node_id} JSON here once serving")
    p.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this HTTP port (0 = off)")
    pgconfig.add_tls_flags(p)
    return p.parse_args(argv)


def load_config(args: argparse.Namespace) -> NodeConfig:
    return pgconfig.load(NodeConfig, path=args.config, cli={
        "coordinator": args.coordinator,
        "coordinator_key": args.coordinator_key,
        "net.bind": args.bind,
        "net.advertise": args.advertise,
        "home": args.home,
        "threads": args.threads,
        "device": args.device,
        "attack.behaviours": args.attack,
        "attack.rate": args.attack_rate,
        "attack.start_step": args.attack_start,
        "attack.stop_step": args.attack_stop,
        "attack.micro_batches": args.attack_micro_batches,
        "attack.noise_std": args.attack_noise_std,
        "attack.noise_scale": args.attack_noise_scale,
        "attack.scale": args.attack_scale,
        "attack.fraction": args.attack_fraction,
        "attack.ride": args.attack_ride,
        "attack.delay": args.attack_delay,
        "attack.accomplices": args.attack_accomplice,
        "attack.seed": args.attack_seed,
        "attack.plugin": args.attack_plugin,
        "log_level": args.log_level,
        "ready_file": args.ready_file,
        "net.metrics_port": args.metrics_port,
        **pgconfig.tls_flag_values(args),
    })


@dataclass
class Node:
    """The daemon's parts, built and wired, not yet serving."""

    peers: PeerPool
    runtime: StageRuntime
    membership: Membership
    service: NodeService
    seams: Seams | None
    """How the node misbehaves (None: honest, every part a plain object)."""


def build(cfg: NodeConfig, identity: Identity, home: Path, device: torch.device | None = None) -> Node:
    """Build the node (computing on ``device``, cpu if None). Malicious behaviour is chosen here,
    once: a node with an ``[attack]`` gets the wrappers of node/seams.py around the parts whose
    hooks it overrides."""
    a = cfg.attack
    behaviour = attacks.from_config(a, a.seed or int(identity.node_id[:15], 16))
    seams = Seams.for_behaviour(behaviour, identity)
    if seams is not None:
        log.warning("MALICIOUS node: behaviour %s at rate %.2f from step %d%s%s", behaviour.name, a.rate,
                    a.start_step, f" to {a.stop_step}" if a.stop_step >= 0 else "",
                    f", micro-batches {a.micro_batches}" if a.micro_batches else "")
    peers = PeerPool(identity, cfg.net, cfg.timeouts)
    if seams is None:
        runtime = StageRuntime(identity, peers, cfg.timeouts, device=device)
    else:
        runtime = StageRuntime(identity, seams.peers(peers), cfg.timeouts, build=seams.computation(), device=device)
        seams.runtime = runtime
    service: NodeService | None = None
    membership = Membership(identity, cfg.coordinator, cfg.coordinator_key, home, cfg.net, cfg.timeouts,
                            stats=lambda: service.heartbeat_stats())
    membership.device = runtime.device
    args = (identity, runtime, membership, cfg.net.max_tensor_bytes, cfg.net.chunk_bytes)
    options = dict(max_inflight_streams=cfg.net.max_inflight_streams, stream_timeout=cfg.timeouts.request,
                   link_mbit=cfg.timeouts.link_mbit)
    service = NodeService(*args, **options) if seams is None else seams.service(*args, **options)
    membership.on_banned = lambda banned: setattr(runtime, "banned", set(banned))
    runtime.fetch_checkpoint = membership.fetch_checkpoint
    signer = VerdictSigner(identity)
    if seams is not None:
        membership.before_heartbeat = seams.heartbeat()
        membership.after_heartbeat = seams.heartbeat_reply()
        signer = seams.verdict_signer(signer)
    service.auditor = NodeAuditor(identity, runtime, peers, membership, cfg.net,
                                  cfg.timeouts.audit or cfg.timeouts.step,
                                  signer)
    return Node(peers, runtime, membership, service, seams)


async def serve(cfg: NodeConfig, stop: asyncio.Event, device: torch.device | None = None,
                warm_up: threading.Thread | None = None) -> None:
    home = Path(cfg.home).expanduser()
    identity = Identity.load_or_create(home / "node.key")
    set_log_prefix(f"node {identity.node_id[:8]}")
    device = devices.resolve(cfg.device) if device is None else device
    Determinism.for_device(cfg.threads, device, cfg.tf32).apply()
    log.info("computing on %s (%s)", device, devices.device_class(device))
    node = build(cfg, identity, home, device)
    peers, runtime, membership, service = node.peers, node.runtime, node.membership, node.service
    server, address, _ = await start_server(
        cfg.net, lambda s: pb_grpc.add_NodeServicer_to_server(service, s), ["pipeguard.v1.Node"], cfg.timeouts)
    membership.address = address
    metrics = serve_metrics(cfg.net, NodeMetrics(service))
    log.info("node %s serving on %s (bound %s)", identity.node_id, address, cfg.net.bind)
    if warm_up is not None:
        # ready (and registered right after) = ready to compute: torch's one-off import (about a
        # second of CPU) is not left to land on the first steps or audits, racing them for the cores
        await asyncio.to_thread(warm_up.join)
    write_ready_file(cfg.ready_file, address=address, node_id=identity.node_id,
                     metrics=metrics.address if metrics else "")
    member_task = asyncio.create_task(membership.run())
    try:
        await stop.wait()
    finally:
        log.info("shutting down")
        member_task.cancel()
        if metrics is not None:
            metrics.close()
        await server.stop(grace=1.0)
        runtime.close()
        service.auditor.close()
        await peers.close()
        await membership.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.log_level or "INFO", "node")
    try:
        cfg = load_config(args)
    except pgconfig.ConfigError as exc:
        print(f"pipeguard-node: {exc}", file=sys.stderr)
        return 2
    setup_logging(cfg.log_level, "node")
    log.info("resolved config:\n%s", pgconfig.to_toml(cfg))
    try:
        device = devices.resolve(cfg.device)
    except ValueError as exc:
        print(f"pipeguard-node: {exc}", file=sys.stderr)
        return 2
    warm_up = warm_up_optimizer()
    return run_daemon("pipeguard-node", lambda stop: serve(cfg, stop, device, warm_up))


if __name__ == "__main__":
    sys.exit(main())
