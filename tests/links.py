"""Links that behave like the internet's, for tests and benchmarks/wan.py: latency and freezes.

This machine's kernel has no ``netem`` qdisc, so latency comes from ``DelayRelay``: a TCP relay
that holds every byte it forwards for ``delay`` seconds in each direction before passing it on.
A daemon that advertises its relay's address instead of its own is reached only through it, so
every connection to that daemon sees a round trip of ``2 x delay`` more than the wire's. Rate is
the kernel's ``tc qdisc ... tbf`` (``shape``), on both ends of a namespace's veth pair.

How faithful it is (docs/wan.md says the same):

- Bytes, HTTP/2 frames, gRPC flow-control window updates and keepalive pings all cross the relay
  and are delayed alike, so request/response round trips, streaming and gRPC's own window
  (BDP probing) see the RTT.
- TCP itself does not: the relay terminates the connection, so the sender's TCP handshake,
  slow start and congestion window see the undelayed hop to the relay. The relay holds at most
  ``max_buffer`` bytes per direction (by default the bandwidth-delay product plus slack) and stops
  reading beyond it, which bounds the bytes in flight as a window of that size would; but slow
  start after idle and loss recovery over a long path are not modelled. No loss, no jitter.
- ``freeze`` stops a relay reading and writing without closing anything: to both ends the link
  went dead (no RST, no FIN), as a cut cable or a frozen peer looks.

Run as a process (``python -m tests.links relay LISTEN_HOST:PORT TARGET_HOST:PORT DELAY_S``) inside
a namespace; it prints ``ready`` once listening and runs until SIGTERM or ``--limit-s`` passes.
Every relay connects only to its one target (loopback or an address of our own namespaces).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import subprocess
import sys
from collections import deque

READ_BYTES = 64 * 1024
MIN_BUFFER = 256 * 1024
CMD_TIMEOUT_S = 20


class DelayRelay:
    """Forward TCP from ``listen`` to ``target``, holding bytes ``delay`` seconds each way."""

    def __init__(self, target: tuple[str, int], delay: float, *, max_buffer: int = 0, rate_bit_s: float = 0.0):
        self.target = target
        self.delay = delay
        self.max_buffer = max_buffer or max(MIN_BUFFER, int(2 * rate_bit_s / 8 * delay) + MIN_BUFFER)
        """Bytes held per direction at most: reading stops beyond it (a flow-control window)."""
        self.server: asyncio.base_events.Server | None = None
        self.thawed = asyncio.Event()
        self.thawed.set()
        self.connections = 0
        self._tasks: set[asyncio.Task] = set()

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        self.server = await asyncio.start_server(self._accept, host, port)
        return self.server.sockets[0].getsockname()[1]

    def freeze(self) -> None:
        """Stop moving bytes (connections stay open): the link is dead to both ends."""
        self.thawed.clear()

    def thaw(self) -> None:
        self.thawed.set()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            up_reader, up_writer = await asyncio.wait_for(asyncio.open_connection(*self.target), 10)
        except (OSError, asyncio.TimeoutError):
            writer.close()
            return
        pumps = [asyncio.create_task(self._pump(reader, up_writer)), asyncio.create_task(self._pump(up_reader, writer))]
        self._tasks.update(pumps)
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in pumps:
                task.cancel()
            await asyncio.wait(pumps)
            self._tasks.difference_update(pumps)
            for w in (writer, up_writer):
                w.close()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Read into a queue stamped with when each piece may leave; write each at its time."""
        held: deque[tuple[float, bytes]] = deque()
        room = asyncio.Condition()
        size = 0
        loop = asyncio.get_running_loop()
        done = False

        async def read() -> None:
            nonlocal size, done
            while True:
                await self.thawed.wait()
                async with room:
                    await room.wait_for(lambda: size < self.max_buffer)
                data = await reader.read(READ_BYTES)
                await self.thawed.wait()
                async with room:
                    if not data:
                        done = True
                        room.notify_all()
                        return
                    held.append((loop.time() + self.delay, data))
                    size += len(data)
                    room.notify_all()

        async def write() -> None:
            nonlocal size
            while True:
                async with room:
                    await room.wait_for(lambda: held or done)
                    if not held:
                        return
                    due, data = held[0]
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                await self.thawed.wait()
                writer.write(data)
                await writer.drain()
                async with room:
                    held.popleft()
                    size -= len(data)
                    room.notify_all()

        tasks = [asyncio.create_task(read()), asyncio.create_task(write())]
        try:
            await asyncio.gather(*tasks)
            if writer.can_write_eof():
                writer.write_eof()
        except (ConnectionError, OSError):
            pass
        finally:
            for t in tasks:
                t.cancel()


def shape(netns: str | None, dev: str, rate_mbit: float) -> None:
    """Limit ``dev``'s egress (in ``netns``, or this namespace) to ``rate_mbit`` with tbf: a bucket
    of 1 ms at the rate (at least 32 KiB) and a queue of 50 ms at it (at least 64 KiB)."""
    rate_bytes = rate_mbit * 1e6 / 8
    burst = max(32 * 1024, int(rate_bytes / 1000))
    limit = max(64 * 1024, int(rate_bytes * 0.05))
    argv = ["tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate", f"{rate_mbit}mbit",
            "burst", str(burst), "limit", str(limit)]
    if netns:
        argv = ["ip", "netns", "exec", netns, *argv]
    subprocess.run(argv, check=True, capture_output=True, text=True, timeout=CMD_TIMEOUT_S)


async def _serve(listen: str, target: str, delay: float, rate_mbit: float, limit_s: float) -> None:
    lhost, lport = listen.rsplit(":", 1)
    thost, tport = target.rsplit(":", 1)
    relay = DelayRelay((thost, int(tport)), delay, rate_bit_s=rate_mbit * 1e6)
    await relay.start(lhost, int(lport))
    print("ready", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await asyncio.wait_for(stop.wait(), limit_s)
    except asyncio.TimeoutError:
        pass
    await relay.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("relay", help="run a DelayRelay until SIGTERM")
    r.add_argument("listen")
    r.add_argument("target")
    r.add_argument("delay", type=float, help="seconds each byte is held, each way")
    r.add_argument("--rate-mbit", type=float, default=1000.0, help="the link's rate (sizes the relay's buffer)")
    r.add_argument("--limit-s", type=float, default=3600.0, help="exit after this long whatever happens")
    args = p.parse_args(argv)
    asyncio.run(_serve(args.listen, args.target, args.delay, args.rate_mbit, args.limit_s))
    return 0


if __name__ == "__main__":
    sys.exit(main())
