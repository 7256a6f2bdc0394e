"""``pipeguard``: the user's command line.

    pipeguard status  --coordinator HOST:PORT [--json] [--watch]
    pipeguard testnet [--nodes 4] [--stages 3] [--steps 100] [--attack forward:reverse] ...
    pipeguard export  --coordinator HOST:PORT --out model.pt
    pipeguard verify  BUNDLE.pgev ...
    pipeguard keygen  PATH
"""

from __future__ import annotations

import argparse
import json
import sys

import grpc

from pipeguard.errors import from_rpc_error


def _status_cmd(args: argparse.Namespace) -> int:
    from google.protobuf.json_format import MessageToDict

    from pipeguard import status as status_view
    from pipeguard.v1 import pipeguard_pb2 as pb
    from pipeguard.v1 import pipeguard_pb2_grpc as pb_grpc

    with grpc.insecure_channel(args.coordinator) as ch:
        stub = pb_grpc.CoordinatorStub(ch)
        try:
            reply = stub.Status(pb.StatusRequest(history=args.history), timeout=args.timeout)
            if args.json and not args.watch:
                print(json.dumps(MessageToDict(reply, preserving_proto_field_name=True, always_print_fields_with_no_presence=True), indent=2))
                return 0
            if not args.json:
                print(status_view.render(reply))
            if not args.watch:
                return 0
            last = reply.events[-1].seq if reply.events else 0
            for ev in stub.Watch(pb.WatchRequest(after_seq=last)):
                if args.json:
                    print(json.dumps(MessageToDict(ev, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)), flush=True)
                else:
                    print(status_view.render_event(ev), flush=True)
        except grpc.RpcError as err:
            print(f"pipeguard status: {args.coordinator}: {from_rpc_error(err)}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            return 0
    return 0


def _export_cmd(args: argparse.Namespace) -> int:
    import torch

    from pipeguard.tensors import StateAssembler
    from pipeguard.v1 import pipeguard_pb2 as pb
    from pipeguard.v1 import pipeguard_pb2_grpc as pb_grpc

    asm = StateAssembler(max_tensor_bytes=1 << 36)
    with grpc.insecure_channel(args.coordinator, options=[("grpc.max_receive_message_length", 64 << 20)]) as ch:
        try:
            for chunk in pb_grpc.CoordinatorStub(ch).ExportState(pb.ExportRequest(), timeout=args.timeout):
                asm.add(chunk)
        except grpc.RpcError as err:
            print(f"pipeguard export: {args.coordinator}: {from_rpc_error(err)}", file=sys.stderr)
            return 1
    state = asm.finish()
    torch.save({k: v.clone() for k, v in state.items()}, args.out)
    print(f"wrote {len(state)} tensors ({sum(v.numel() for v in state.values()):,} parameters) to {args.out}")
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

    pinned = bytes.fromhex(args.coordinator_key) if args.coordinator_key else None
    status = 0
    for path in args.bundles:
        if not Path(path).is_file():
            print(f"{path}: INVALID: no such file")
            status = 1
            continue
        result = verify_bundle(Path(path), pinned)
        word = "VALID" if result.valid else "INVALID"
        print(f"{path}: {word} ({result.kind}): {result.summary}")
        status |= 0 if result.valid else 1
    return status


def _testnet_cmd(args: argparse.Namespace) -> int:
    from pipeguard.demo import run_testnet

    return run_testnet(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pipeguard", description="pipeguard: verifiable pipeline-parallel training.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("status", help="show a run's status (gRPC)")
    s.add_argument("--coordinator", default="127.0.0.1:7000", help="coordinator HOST:PORT")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.add_argument("--watch", action="store_true", help="then follow events live (Ctrl-C to stop)")
    s.add_argument("--history", type=int, default=20, help="recent losses and events to show")
    s.add_argument("--timeout", type=float, default=10.0, help="RPC deadline in seconds")
    s.set_defaults(func=_status_cmd)

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
    t.set_defaults(func=_testnet_cmd)

    e = sub.add_parser("export", help="write the trained model as one torch state dict")
    e.add_argument("--coordinator", default="127.0.0.1:7000", help="coordinator HOST:PORT")
    e.add_argument("--out", required=True, help="output file (torch.save format)")
    e.add_argument("--timeout", type=float, default=300.0, help="RPC deadline in seconds")
    e.set_defaults(func=_export_cmd)

    v = sub.add_parser("verify", help="re-check evidence bundles offline (exit 0 only if all are VALID)")
    v.add_argument("bundles", nargs="+", help="evidence bundle files (.pgev)")
    v.add_argument("--coordinator-key", help="require audit orders signed by this coordinator key (hex)")
    v.set_defaults(func=_verify_cmd)

    k = sub.add_parser("keygen", help="create (or show) an Ed25519 key file")
    k.add_argument("path", help="key file path (created 0600 if missing)")
    k.set_defaults(func=_keygen_cmd)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
