"""Signed tensor push vs. raw TCP: throughput of one large tensor between two processes.

    python benchmarks/transport.py [--size-mb 16] [--reps 10] [--warmup 2] [--chunk-bytes N] [--json PATH]

Two receiver processes are started on loopback (port 0):

* raw:  a TCP socket that ``recv_into``s a preallocated ``bytearray`` and acks with one byte;
* grpc: a grpc.aio server whose ``PushTensor`` runs ``pipeguard.tensors.receive_tensor`` on
  chunks parsed by ``parse_chunk``, as the node's does (size check, BLAKE3 of the payload,
  Ed25519 signature, torch tensor over the bytes). Both processes set up the allocator as the
  daemons do (``pipeguard.rpc.retain_freed_memory``).

This process is the sender for both: raw ``sendall`` of the tensor's bytes, and
``node.peers.PeerPool.push`` (chunking, hashing and signing in ``TensorSender``). Runs are
interleaved (raw, grpc, raw, grpc, ...) after warm-up; each run is timed from the first
byte sent to the receiver's answer. CPU time and minor page faults of both processes are
counted per transfer. Medians are reported; the figure of merit is the median
of the per-pair ratios grpc/raw. This is a benchmark, not a test: it prints figures and
asserts nothing about them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

GOAL_RATIO = 0.6
CHILD_LIFETIME_S = 300.0
"""A receiver exits on its own after this long, whatever the parent does."""
IO_TIMEOUT_S = 60.0
BARE_SERVICE = "pipeguard.bench.Bare"
"""A bytes-in, bytes-out streaming method next to PushTensor: gRPC's own cost, no protobuf, no crypto."""


# -- receivers (child processes) -----------------------------------------------------------------


def raw_receiver(size: int) -> None:
    """Accept one connection; per transfer read an 8-byte length, then the payload; ack b"k"."""
    buf = bytearray(size)
    view = memoryview(buf)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        srv.settimeout(IO_TIMEOUT_S)
        print(f"PORT {srv.getsockname()[1]}", flush=True)
        conn, _ = srv.accept()
    deadline = time.monotonic() + CHILD_LIFETIME_S
    with conn:
        conn.settimeout(IO_TIMEOUT_S)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(100_000):
            if time.monotonic() > deadline:
                return
            head = _recv_exact(conn, 8)
            if head is None:
                return  # sender closed
            (n,) = struct.unpack(">Q", head)
            if n > size:
                raise SystemExit(f"raw receiver: transfer of {n} bytes exceeds the buffer of {size}")
            got = 0
            while got < n:
                r = conn.recv_into(view[got:n])
                if r == 0:
                    raise SystemExit("raw receiver: sender closed mid-transfer")
                got += r
            conn.sendall(b"k")


def _recv_exact(conn: socket.socket, n: int) -> bytes | None:
    data = b""
    while len(data) < n:
        part = conn.recv(n - len(data))
        if not part:
            return None
        data += part
    return data


def grpc_receiver(size: int, chunk_bytes: int, sender_key_hex: str) -> None:
    import grpc

    from pipeguard.config import NetConfig
    from pipeguard.errors import abort_on_error
    from pipeguard.identity import PublicIdentity
    from pipeguard.rpc import install_event_loop_policy, parses_requests_with, retain_freed_memory, start_server
    from pipeguard.tensors import parse_chunk, receive_tensor
    from pipeguard.v1 import pipeguard_pb2 as pb
    from pipeguard.v1 import pipeguard_pb2_grpc as pb_grpc

    sender = PublicIdentity(bytes.fromhex(sender_key_hex))

    class Receiver(pb_grpc.NodeServicer):
        @abort_on_error
        @parses_requests_with(parse_chunk)  # as node/service.py's PushTensor
        async def PushTensor(self, request_iterator, context) -> pb.PushReply:
            rt = await receive_tensor(request_iterator, max_tensor_bytes=size, admit=lambda header: sender)
            return pb.PushReply(received_bytes=rt.tensor.numel() * rt.tensor.element_size())

    async def bare_push(request_iterator, context) -> bytes:
        n = 0
        async for message in request_iterator:
            n += len(message)
        return n.to_bytes(8, "big")

    bare = grpc.method_handlers_generic_handler(
        BARE_SERVICE, {"Push": grpc.stream_unary_rpc_method_handler(bare_push)})  # bytes in, bytes out

    def register(server: grpc.aio.Server) -> None:
        pb_grpc.add_NodeServicer_to_server(Receiver(), server)
        server.add_generic_rpc_handlers((bare,))

    async def serve() -> None:
        net = NetConfig(bind="127.0.0.1:0", chunk_bytes=chunk_bytes, max_message_bytes=chunk_bytes + 1024 * 1024,
                        max_tensor_bytes=size)
        server, address, _ = await start_server(net, register, ["pipeguard.v1.Node"])
        print(f"ADDRESS {address}", flush=True)
        loop = asyncio.get_running_loop()
        # exit when the parent closes our stdin, or after CHILD_LIFETIME_S
        eof = loop.run_in_executor(None, sys.stdin.read)
        try:
            await asyncio.wait_for(eof, CHILD_LIFETIME_S)
        except asyncio.TimeoutError:
            pass
        finally:
            await server.stop(grace=0.5)

    install_event_loop_policy()  # as the node daemon does (pipeguard.rpc.run_daemon)
    retain_freed_memory()
    asyncio.run(serve())
    os._exit(0)  # the stdin reader thread may still block


# -- the sender (this process) -------------------------------------------------------------------


def start_child(args: list[str], tag: str, timeout: float = 60.0) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, __file__, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"receiver {args[1]} exited with code {proc.wait()}")
        if line.startswith(tag + " "):
            return proc, line.split()[1]
    proc.kill()
    raise RuntimeError(f"receiver {args[1]} did not start within {timeout:.0f}s")


def cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU time of a process (all its threads); this process when ``pid`` is None."""
    if pid is None:
        t = os.times()
        return t.user + t.system
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def page_faults(pid: int | None = None) -> int:
    """Minor page faults of a process so far (this process when ``pid`` is None): each first
    touch of fresh memory, a cost that copies into new buffers pay on top of the copy."""
    try:
        fields = Path(f"/proc/{pid or 'self'}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return int(fields[7])  # minflt


def stop_child(proc: subprocess.Popen) -> None:
    try:
        if proc.stdin is not None:
            proc.stdin.close()
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class RawSender:
    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT_S)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def send(self, payload: memoryview) -> float:
        t0 = time.perf_counter()
        self.sock.sendall(struct.pack(">Q", len(payload)))
        self.sock.sendall(payload)
        if self.sock.recv(1) != b"k":
            raise RuntimeError("raw receiver did not acknowledge")
        return time.perf_counter() - t0

    def close(self) -> None:
        self.sock.close()


async def measure(opts: argparse.Namespace) -> dict:
    import grpc
    import torch

    from node.peers import PeerPool
    from pipeguard.config import NetConfig, TimeoutConfig
    from pipeguard.identity import Identity
    from pipeguard.tensors import make_header, tensor_bytes
    from pipeguard.v1 import pipeguard_pb2 as pb

    size = int(opts.size_mb * 1024 * 1024) // 4 * 4
    torch.manual_seed(0)
    tensor = torch.randn(size // 4, dtype=torch.float32).view(-1, 1024) if size % 4096 == 0 else torch.randn(size // 4)
    payload = tensor_bytes(tensor)
    identity = Identity.generate()

    raw_proc, port = start_child(["--role", "raw", "--size", str(size)], "PORT")
    grpc_proc, address = start_child(["--role", "grpc", "--size", str(size), "--chunk-bytes", str(opts.chunk_bytes),
                                      "--sender-key", identity.public_key.hex()], "ADDRESS")
    load_before = os.getloadavg()[0]
    raw = RawSender(int(port))
    net = NetConfig(chunk_bytes=opts.chunk_bytes, max_message_bytes=opts.chunk_bytes + 1024 * 1024,
                    max_tensor_bytes=size)
    pool = PeerPool(identity, net, TimeoutConfig(request=IO_TIMEOUT_S))
    bare_channel = grpc.aio.insecure_channel(address, options=net.grpc_options())
    bare_call = bare_channel.stream_unary(f"/{BARE_SERVICE}/Push")
    bare_messages = [bytes(payload[i : i + opts.chunk_bytes]) for i in range(0, size, opts.chunk_bytes)]
    seq = 0

    async def signed() -> None:
        nonlocal seq
        header = make_header(run_id="bench", step=seq, micro_batch=0, stage=0, direction=pb.DIRECTION_FORWARD,
                             sender=identity.node_id, receiver="receiver", tensor=tensor)
        seq += 1
        await pool.push(address, header, tensor)

    async def bare() -> None:
        reply = await bare_call(iter(bare_messages), timeout=IO_TIMEOUT_S)
        if int.from_bytes(reply, "big") != size:
            raise RuntimeError("bare gRPC receiver counted the wrong number of bytes")

    async def rawsend() -> None:
        raw.send(payload)

    arms = {"raw": (rawsend, raw_proc), "bare_grpc": (bare, grpc_proc), "signed_grpc": (signed, grpc_proc)}
    seconds: dict[str, list[float]] = {k: [] for k in arms}
    cpu = {k: [0.0, 0.0] for k in arms}
    """CPU seconds over all measured runs: [sender, receiver]."""
    faults = {k: [0, 0] for k in arms}
    """Minor page faults over all measured runs: [sender, receiver]."""
    try:
        for _ in range(opts.warmup):
            for fn, _proc in arms.values():
                await fn()
        for _ in range(opts.reps):
            for name, (fn, proc) in arms.items():
                c0, f0 = (cpu_seconds(), cpu_seconds(proc.pid)), (page_faults(), page_faults(proc.pid))
                t0 = time.perf_counter()
                await fn()
                seconds[name].append(time.perf_counter() - t0)
                c1, f1 = (cpu_seconds(), cpu_seconds(proc.pid)), (page_faults(), page_faults(proc.pid))
                for side in (0, 1):
                    cpu[name][side] += c1[side] - c0[side]
                    faults[name][side] += f1[side] - f0[side]
    finally:
        raw.close()
        await bare_channel.close()
        await pool.close()
        stop_child(raw_proc)
        stop_child(grpc_proc)

    mb = size / 1e6
    mbps = {k: [mb / t for t in v] for k, v in seconds.items()}
    med = {k: statistics.median(v) for k, v in mbps.items()}

    def pair_ratio(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(mbps[a], mbps[b]))

    return {
        "benchmark": "transport",
        "tensor_bytes": size,
        "chunk_bytes": opts.chunk_bytes,
        "reps": opts.reps,
        "warmup": opts.warmup,
        "mb_per_s": mbps,
        "mb_per_s_median": med,
        "ratio_median": pair_ratio("signed_grpc", "raw"),
        "ratio_of_medians": med["signed_grpc"] / med["raw"],
        "bare_grpc_over_raw": pair_ratio("bare_grpc", "raw"),
        "ratio_of_best": max(mbps["signed_grpc"]) / max(mbps["raw"]),
        "signed_over_bare_grpc": pair_ratio("signed_grpc", "bare_grpc"),
        "goal_ratio": GOAL_RATIO,
        "cpu_ms_per_transfer": {k: {"sender": 1e3 * v[0] / opts.reps, "receiver": 1e3 * v[1] / opts.reps}
                                for k, v in cpu.items()},
        "page_faults_per_transfer": {k: {"sender": v[0] / opts.reps, "receiver": v[1] / opts.reps}
                                     for k, v in faults.items()},
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]},
    }


def local_costs(size: int, chunk_bytes: int, reps: int = 3) -> dict:
    """Single-process costs of the pieces of the signed path, for context (best of ``reps``)."""
    import hashlib

    import blake3
    import torch

    from pipeguard.identity import Identity
    from pipeguard.tensors import TensorSender, make_header, parse_chunk, tensor_bytes
    from pipeguard.v1 import pipeguard_pb2 as pb

    t = torch.randn(size // 4)
    view = tensor_bytes(t)
    ident = Identity.generate()
    header = make_header(run_id="bench", step=0, micro_batch=0, stage=0, direction=pb.DIRECTION_FORWARD,
                         sender=ident.node_id, receiver="r", tensor=t)
    messages = [c.SerializeToString() for c in TensorSender(header, t, ident, chunk_bytes).chunks()]

    def best(fn) -> float:
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    async def wire() -> None:
        async for _ in TensorSender(header, t, ident, chunk_bytes).wire_chunks():
            pass

    mb = size / 1e6
    return {
        "sha256_mb_per_s": mb / best(lambda: hashlib.sha256(view).digest()),
        "blake3_mb_per_s": mb / best(lambda: blake3.blake3(view).digest()),
        "receiver_parse_chunk_mb_per_s": mb / best(lambda: [parse_chunk(m).data for m in messages]),
        "sender_wire_chunks_mb_per_s": mb / best(lambda: asyncio.run(wire())),
        "receiver_parse_and_data_mb_per_s": mb / best(lambda: [pb.TensorChunk.FromString(m).data for m in messages]),
    }


def report(r: dict) -> None:
    print(f"transport: {r['tensor_bytes'] / 2**20:g} MiB float32 tensor, chunk {r['chunk_bytes'] / 2**20:g} MiB, "
          f"{r['reps']} interleaved runs each after {r['warmup']} warm-up ({r['cpus']} CPUs, 1-min load "
          f"{r['load_average_1min']['before']:.1f} before, {r['load_average_1min']['after']:.1f} after)")
    labels = {
        "raw": "raw TCP (recv_into preallocated)",
        "bare_grpc": "bare gRPC stream (bytes, no crypto)",
        "signed_grpc": "signed push (PeerPool.push)",
    }
    for key, label in labels.items():
        v = r["mb_per_s"][key]
        c = r["cpu_ms_per_transfer"][key]
        f = r["page_faults_per_transfer"][key]
        print(f"  {label:37s} median {r['mb_per_s_median'][key]:6.0f} MB/s  [{min(v):.0f} .. {max(v):.0f}]  "
              f"CPU ms/transfer sender {c['sender']:4.1f} receiver {c['receiver']:4.1f}  "
              f"page faults {f['sender']:4.0f} / {f['receiver']:4.0f}")
    ok = "meets" if r["ratio_median"] >= r["goal_ratio"] else "BELOW"
    print(f"  ratio signed/raw: {r['ratio_median']:.2f} (median of pairs; ratio of medians "
          f"{r['ratio_of_medians']:.2f}); goal >= {r['goal_ratio']} -> {ok} goal")
    print(f"  for context: bare gRPC/raw {r['bare_grpc_over_raw']:.2f}, signed/bare gRPC {r['signed_over_bare_grpc']:.2f}, "
          f"best signed/best raw {r['ratio_of_best']:.2f}")
    if "local" in r:
        c = r["local"]
        print("  single-process costs (best of 3), MB/s: "
              f"SHA-256 {c['sha256_mb_per_s']:.0f}; BLAKE3 {c['blake3_mb_per_s']:.0f} (the digest signed now: the "
              f"hashing limit); sender TensorSender.wire_chunks (hash, sign, one copy) "
              f"{c['sender_wire_chunks_mb_per_s']:.0f}; receiver parse_chunk (no copy) "
              f"{c['receiver_parse_chunk_mb_per_s']:.0f}, TensorChunk.FromString + .data (two copies) "
              f"{c['receiver_parse_and_data_mb_per_s']:.0f}")
    print("  (MB = 10^6 bytes; CPU time from /proc in ~10 ms clock ticks, averaged over the runs)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-mb", type=float, default=16.0, help="tensor size in MiB (default 16)")
    p.add_argument("--reps", type=int, default=10, help="measured runs of each transport (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured runs of each first (default 2)")
    p.add_argument("--chunk-bytes", type=int, default=None, help="payload bytes per chunk (default: NetConfig's)")
    p.add_argument("--no-local", action="store_true", help="skip the single-process cost breakdown")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    p.add_argument("--role", choices=["raw", "grpc"], help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, help=argparse.SUPPRESS)
    p.add_argument("--sender-key", help=argparse.SUPPRESS)
    opts = p.parse_args(argv)
    if opts.chunk_bytes is None:
        from pipeguard.config import NetConfig

        opts.chunk_bytes = NetConfig().chunk_bytes
    if opts.role == "raw":
        raw_receiver(opts.size)
        return 0
    if opts.role == "grpc":
        grpc_receiver(opts.size, opts.chunk_bytes, opts.sender_key)
        return 0
    if not 1 <= opts.reps <= 1000 or not 0 <= opts.warmup <= 100 or not 0 < opts.size_mb <= 1024:
        p.error("--reps must be 1..1000, --warmup 0..100, --size-mb in (0, 1024]")

    from pipeguard.rpc import install_event_loop_policy, retain_freed_memory

    install_event_loop_policy()  # as the node daemon does (pipeguard.rpc.run_daemon)
    retain_freed_memory()
    result = asyncio.run(measure(opts))
    if not opts.no_local:
        result["local"] = local_costs(result["tensor_bytes"], opts.chunk_bytes)
    report(result)
    if opts.json:
        Path(opts.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"  wrote {opts.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
