#!/usr/bin/env python3
"""A TCP relay that adds a fixed one-way delay, for the bench's WAN scenario and soak.

    relay.py [--delay-ms MS] [--listen HOST] PORT=HOST:PORT [PORT=HOST:PORT ...]

Every chunk read on one side is written to the other side MS milliseconds after it
was read, in order, in both directions: a connection through it has 2*MS more
round-trip time at the application level. The TCP connections on either side end
at the relay, so their own kernels see the short local round trip (loss on them is
repaired at that pace); the delay is what the bytes and everything above TCP see.
What waits in the delay line is bounded per direction (reading pauses beyond it),
well above 100 Mbit/s x the delay. Prints "ready" once every port listens; exits on
SIGTERM/SIGINT, and with it every relayed connection drops (the soak's forced
reconnects). Standard library only.
"""
from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time

CHUNK = 256 * 1024
# Per direction: 64 chunks = 16 MiB at most in flight, against the ~125 KB that
# 100 Mbit/s x 10 ms needs; the line is never what limits the rate.
LINE_CHUNKS = 64


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    # (due time, chunk): b"" is the reader's EOF, None a reader that failed (reset).
    line: asyncio.Queue[tuple[float, bytes | None]] = asyncio.Queue(LINE_CHUNKS)

    async def feed() -> None:
        try:
            while data := await reader.read(CHUNK):
                await line.put((time.monotonic() + delay, data))
        except OSError:
            await line.put((time.monotonic() + delay, None))
            return
        await line.put((time.monotonic() + delay, b""))

    feeder = asyncio.ensure_future(feed())
    try:
        while True:
            due, data = await line.get()
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            if data is None:
                raise ConnectionResetError("the other side reset")
            if not data:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            writer.write(data)
            await writer.drain()
    finally:
        feeder.cancel()


async def _serve(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter, target: tuple[str, int],
                 delay: float) -> None:
    try:
        up_r, up_w = await asyncio.open_connection(*target)
    except OSError:
        client_w.close()
        return
    pipes = [asyncio.ensure_future(_pipe(client_r, up_w, delay)), asyncio.ensure_future(_pipe(up_r, client_w, delay))]
    try:
        # Both directions end normally (half-closes passed on); a failure in one ends both.
        done, _ = await asyncio.wait(pipes, return_when=asyncio.FIRST_EXCEPTION)
        for t in done:
            t.exception()  # seen: a reset is how relayed connections often end
    finally:
        for t in pipes:
            t.cancel()
        for w in (client_w, up_w):
            w.close()


async def _main(args: argparse.Namespace) -> int:
    delay = args.delay_ms / 1000
    servers = []
    for spec in args.forward:
        port, _, dest = spec.partition("=")
        host, _, dport = dest.rpartition(":")
        target = (host, int(dport))

        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter, target: tuple[str, int] = target) -> None:
            await _serve(r, w, target, delay)
        servers.append(await asyncio.start_server(handle, args.listen, int(port), reuse_address=True))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("ready", flush=True)
    await stop.wait()
    for s in servers:
        s.close()
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--delay-ms", type=float, default=10.0, help="one-way delay (default 10)")
    ap.add_argument("--listen", default="0.0.0.0")
    ap.add_argument("forward", nargs="+", metavar="PORT=HOST:PORT")
    try:
        return asyncio.run(_main(ap.parse_args()))
    except OSError as e:
        print(f"relay: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
