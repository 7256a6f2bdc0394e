"""``pipeguard``: the user's command line.

    pipeguard status  --coordinator HOST:PORT [--json] [--watch]
    pipeguard admin   ban|unban|stop|audit-rate ... --coordinator HOST:PORT --token-file PATH
    pipeguard testnet [--nodes 4] [--stages 3] [--steps 100] [--attack forward:reverse] [--device auto] ...
    pipeguard export  --coordinator HOST:PORT --out model.pt
    pipeguard sample  --model model.pt [--prompt TEXT] [--tokens N]
    pipeguard verify  BUNDLE.pgev ... [--device cpu]
    pipeguard keygen  PATH

Commands that talk to a coordinator take ``--tls-ca/--tls-cert/--tls-key`` (or the daemons'
environment variables ``PIPEGUARD_NET_TLS_CA`` ...) to call it over TLS.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from pipeguard import config as pgconfig
from pipeguard.errors import PipeguardError

EXPORT_MESSAGE_BYTES = 64 << 20


def _client_net(args: argparse.Namespace, **overrides):
    """The NetConfig of a client command: TLS from flags, else from PIPEGUARD_NET_* (as the daemons)."""
    from pipeguard.config import NetConfig

    return pgconfig.load(NetConfig, cli={**pgconfig.tls_flag_values(args, prefix=""), **overrides},
                         env_prefix="PIPEGUARD_NET_")


def _status_cmd(args: argparse.Namespace) -> int:
    # Imports the generated code, grpc and the renderer only: a status client loads no torch
    # (tests/test_status_contract.py and test_status_api.py check).
    from pipeguard.app import status as status_view
    from pipeguard.v1 import pipeguard_pb2 as pb
    from pipeguard.v1 import pipeguard_pb2_grpc as pb_grpc

    from pipeguard.rpc import blocking_channel

    with blocking_channel(args.coordinator, _client_net(args)) as ch:
        stub = pb_grpc.CoordinatorStub(ch)
        try:
            reply = stub.Status(pb.StatusRequest(history=args.history), timeout=args.timeout)
            if args.json and not args.watch:
                print(json.dumps(status_view.to_json(reply), indent=2))
                return 0
            if not args.json:
                print(status_view.render(reply))
            if not args.watch:
                return 0

            def resumed(details: str, last: int) -> None:
                print(f"pipeguard status: {details}; resuming after event {last}", file=sys.stderr, flush=True)

            for ev in status_view.follow(stub, reply.events[-1].seq if reply.events else 0, resumed):
                if args.json:
                    print(json.dumps(status_view.to_json(ev)), flush=True)
                else:
                    print(status_view.render_event(ev), flush=True)
        except PipeguardError as err:  # blocking_channel raises typed errors
            print(f"pipeguard status: {args.coordinator}: {err}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            return 0
    return 0


def _export_cmd(args: argparse.Namespace) -> int:
    from pipeguard.app import export
    from pipeguard.computation import gpt_config
    from pipeguard.rpc import blocking_channel
    from pipeguard.tensors import StateAssembler
    from pipeguard.v1 import pipeguard_pb2 as pb
    from pipeguard.v1 import pipeguard_pb2_grpc as pb_grpc

    asm = StateAssembler(max_tensor_bytes=1 << 36)
    with blocking_channel(args.coordinator, _client_net(args, max_message_bytes=EXPORT_MESSAGE_BYTES)) as ch:
        stub = pb_grpc.CoordinatorStub(ch)
        try:
            status = stub.Status(pb.StatusRequest(history=1), timeout=args.timeout)
            for chunk in stub.ExportState(pb.ExportRequest(), timeout=args.timeout):
                asm.add(chunk)
        except PipeguardError as err:
            print(f"pipeguard export: {args.coordinator}: {err}", file=sys.stderr)
            return 1
    state = asm.finish()
    m = status.model
    gpt = gpt_config(m) if status.HasField("model") else None
    export.save(args.out, {k: v.clone() for k, v in state.items()}, gpt, run_id=status.run_id, step=status.step)
    print(f"wrote {len(state)} tensors ({sum(v.numel() for v in state.values()):,} parameters) of run "
          f"{status.run_id} at step {status.step} to {args.out}")
    return 0


def _sample_cmd(args: argparse.Namespace) -> int:
    import torch

    from pipeguard.app import export

    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    try:
        model, gpt, notes = export.load(args.model, args.preset, args.n_head)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        print(f"pipeguard sample: {args.model}: {exc}", file=sys.stderr)
        return 1
    for note in notes:
        print(f"pipeguard sample: {note}", file=sys.stderr)
    prompt = args.prompt.encode()
    for i in range(args.samples):
        text = export.sample(model, prompt, args.tokens, args.temperature, args.top_k or None, args.seed + i)
        if i:
            print("\n" + "-" * 40)
        print(text.decode(errors="replace"), flush=True)
    return 0


def _admin_cmd(args: argparse.Namespace) -> int:
    import getpass
    import socket

    from pipeguard.rpc import blocking_channel
    from pipeguard.v1 import pipeguard_pb2 as pb
    from pipeguard.v1 import pipeguard_pb2_grpc as pb_grpc

    if not args.token_file:
        print("pipeguard admin: --token-file is required (or PIPEGUARD_ADMIN_TOKEN_FILE); the coordinator keeps "
              "its token in STATE_DIR/admin.token unless admin_token_file says otherwise", file=sys.stderr)
        return 2
    try:
        with open(os.path.expanduser(args.token_file)) as fh:
            token = fh.read().strip()
    except OSError as exc:
        print(f"pipeguard admin: cannot read the token file {args.token_file}: {exc.strerror}", file=sys.stderr)
        return 2
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (a container's arbitrary uid)
        user = str(os.getuid())
    operator = args.operator or f"{user}@{socket.gethostname()}"
    with blocking_channel(args.coordinator, _client_net(args)) as ch:
        stub = pb_grpc.CoordinatorStub(ch)
        if args.order == "ban":
            call, req = stub.Ban, pb.BanRequest(node_id=args.node_id, reason=args.reason, operator=operator)
        elif args.order == "unban":
            call, req = stub.Unban, pb.UnbanRequest(node_id=args.node_id, operator=operator)
        elif args.order == "stop":
            call, req = stub.StopRun, pb.StopRunRequest(operator=operator)
        else:
            call, req = stub.SetAuditRate, pb.SetAuditRateRequest(rate=args.rate, operator=operator)
        try:
            reply = call(req, timeout=args.timeout, metadata=(("authorization", f"Bearer {token}"),))
        except PipeguardError as err:
            print(f"pipeguard admin {args.order}: {args.coordinator}: {err}", file=sys.stderr)
            return 1
    print(reply.detail)
    return 0


def _keygen_cmd(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pipeguard.identity import Identity

    path = Path(args.path).expanduser()
    existed = path.exists()
    ident = Identity.load_or_create(path)
    print(f"{'existing' if existed else 'new'} key {path}")
    print(f"node id    {ident.node_id}")
    print(f"public key {ident.public_key.hex()}")
    return 0


def _verify_cmd(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pipeguard.evidence import verify_bundle

    from pipeguard import device as devices

    pinned = bytes.fromhex(args.coordinator_key) if args.coordinator_key else None
    try:
        device = devices.resolve(args.device)
    except ValueError as exc:
        print(f"pipeguard verify: {exc}", file=sys.stderr)
        return 2
    status = 0
    for path in args.bundles:
        if not Path(path).is_file():
            print(f"{path}: INVALID: no such file")
            status = 1
            continue
        result = verify_bundle(Path(path), pinned, device)
        word = "VALID" if result.valid else "INVALID"
        print(f"{path}: {word} ({result.kind}): {result.summary}")
        status |= 0 if result.valid else 1
    return status


def _testnet_cmd(args: argparse.Namespace) -> int:
    from pipeguard.app.demo import run_testnet

    return run_testnet(args)


def _experiment_cmd(args: argparse.Namespace) -> int:
    """Run a benchmark script of the source tree (they are not installed with the package)."""
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "attack_matrix.py"
    if not script.is_file():
        print(f"pipeguard experiment: {script} not found (run from a source checkout)", file=sys.stderr)
        return 2
    spec = importlib.util.spec_from_file_location("pipeguard_attack_matrix", script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module.main(args.args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pipeguard", description="pipeguard: verifiable pipeline-parallel training.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("status", help="show a run's status (gRPC)")
    s.add_argument("--coordinator", default="127.0.0.1:7000", help="coordinator HOST:PORT")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.add_argument("--watch", action="store_true", help="then follow events live (Ctrl-C to stop)")
    s.add_argument("--history", type=int, default=20, help="recent losses and events to show")
    s.add_argument("--timeout", type=float, default=10.0, help="RPC deadline in seconds")
    pgconfig.add_tls_flags(s, server=False)
    s.set_defaults(func=_status_cmd)

    a = sub.add_parser("admin", help="operator orders: ban, unban, stop the run, change the audit rate")
    orders = a.add_subparsers(dest="order", required=True)
    ban = orders.add_parser("ban", help="ban a node (as after a failed audit, without evidence)")
    ban.add_argument("node_id", help="node id, or its first 8+ characters")
    ban.add_argument("--reason", default="", help="why (kept as the node's ban reason)")
    unban = orders.add_parser("unban", help="lift a ban; the node rejoins as a standby")
    unban.add_argument("node_id", help="node id, or its first 8+ characters")
    orders.add_parser("stop", help="finish the step in flight, checkpoint and stop (resume with --resume)")
    rate = orders.add_parser("audit-rate", help="change audit.rate of the running run")
    rate.add_argument("rate", type=float, help="probability in [0, 1]")
    for o in orders.choices.values():
        o.add_argument("--coordinator", default="127.0.0.1:7000", help="coordinator HOST:PORT")
        o.add_argument("--token-file", default=os.environ.get("PIPEGUARD_ADMIN_TOKEN_FILE"),
                       help="file holding the admin token (the coordinator's STATE_DIR/admin.token)")
        o.add_argument("--operator", help="your name for the run's events (default USER@HOST)")
        o.add_argument("--timeout", type=float, default=60.0, help="RPC deadline in seconds")
        pgconfig.add_tls_flags(o, server=False)
    a.set_defaults(func=_admin_cmd)

    t = sub.add_parser("testnet", help="run a local coordinator + nodes (one malicious) and train")
    t.add_argument("--nodes", type=int, default=4, help="node processes (extra ones beyond --stages stand by)")
    t.add_argument("--stages", type=int, default=3, help="pipeline stages")
    t.add_argument("--steps", type=int, default=100, help="training steps")
    t.add_argument("--model", default="tiny", help="model preset: tiny, small, gpt2")
    t.add_argument("--micro-batches", type=int, default=8, help="micro-batches per step")
    t.add_argument("--attack", action="append", default=None,
                   help="behaviour of the malicious node (default forward:reverse); 'none' for an honest net")
    t.add_argument("--attack-rate", type=float, default=0.5, help="probability per micro-batch (default 0.5)")
    t.add_argument("--malicious-stage", type=int, default=1, help="stage the malicious node serves (default 1)")
    t.add_argument("--seed", type=int, default=1234, help="run seed")
    t.add_argument("--workdir", help="keep keys, state and logs here (default: a temporary directory)")
    t.add_argument("--no-compare", action="store_true", help="skip the clean single-process comparison")
    t.add_argument("--device", default="auto", help="where the nodes compute: cpu, cuda, cuda:N or auto (default: "
                   "cuda:0 when available, else cpu); nodes on one GPU share it")
    t.add_argument("--auditor-device", help="device of the standby nodes (beyond --stages), e.g. cpu for a CPU "
                   "auditor of GPU nodes (default: --device)")
    t.set_defaults(func=_testnet_cmd)

    x = sub.add_parser("experiment", help="run an experiment from benchmarks/ against local testnets")
    xs = x.add_subparsers(dest="experiment", required=True)
    xm = xs.add_parser("matrix", help="the attack matrix (benchmarks/attack_matrix.py; --help lists its flags)",
                       add_help=False)
    xm.set_defaults(func=_experiment_cmd)

    e = sub.add_parser("export", help="write the trained model as one torch state dict")
    e.add_argument("--coordinator", default="127.0.0.1:7000", help="coordinator HOST:PORT")
    e.add_argument("--out", required=True, help="output file (torch.save format)")
    e.add_argument("--timeout", type=float, default=300.0, help="RPC deadline in seconds")
    pgconfig.add_tls_flags(e, server=False)
    e.set_defaults(func=_export_cmd)

    m = sub.add_parser("sample", help="print text generated by an exported model")
    m.add_argument("--model", required=True, help="file written by `pipeguard export`")
    m.add_argument("--preset", help="model preset, for files that record no shape (older exports)")
    m.add_argument("--n-head", type=int, help="attention heads, for files that record no shape")
    m.add_argument("--prompt", default="", help="text to continue (default: start of a line)")
    m.add_argument("--tokens", type=int, default=200, help="bytes to generate")
    m.add_argument("--samples", type=int, default=1, help="how many samples")
    m.add_argument("--temperature", type=float, default=0.8, help="sampling temperature")
    m.add_argument("--top-k", type=int, default=0, help="sample from the k likeliest bytes (0 = all)")
    m.add_argument("--seed", type=int, default=0, help="sampling seed")
    m.set_defaults(func=_sample_cmd)

    v = sub.add_parser("verify", help="re-check evidence bundles offline (exit 0 only if all are VALID)")
    v.add_argument("bundles", nargs="+", help="evidence bundle files (.pgev)")
    v.add_argument("--coordinator-key", help="require audit orders signed by this coordinator key (hex)")
    v.add_argument("--device", default="cpu", help="where to recompute: cpu (default), cuda, cuda:N or auto")
    v.set_defaults(func=_verify_cmd)

    k = sub.add_parser("keygen", help="create (or show) an Ed25519 key file")
    k.add_argument("path", help="key file path (created 0600 if missing)")
    k.set_defaults(func=_keygen_cmd)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "experiment":
        args.args = extra  # the benchmark script parses its own flags
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args)
    except pgconfig.ConfigError as exc:
        print(f"pipeguard {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
