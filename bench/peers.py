"""The naive peers: what an engineer would write instead of the supervisor's dispatch loop.

``python -m bench.peers {h11,aiohttp} --port P --concurrency K --seconds T --bodies FILE``
posts the bodies of FILE (one per line) round-robin over K keep-alive connections for T seconds
on plain asyncio (the textbook default loop) and prints ``{"requests", "seconds", "errors",
"bytes"}`` as JSON. ``h11``: the textbook h11 client (asyncio streams, one task per
connection). ``aiohttp``: a ``ClientSession`` loop, K tasks.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any

HEADERS = {"Content-Type": "application/json", "X-Cortex-Job-ID": "bench"}


class Counter:
    def __init__(self) -> None:
        self.requests = 0
        self.errors = 0
        self.bytes = 0


async def h11_connection(
    port: int, bodies: list[bytes], start: int, stop_at: float, n: Counter
) -> None:
    import h11

    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    conn = h11.Connection(h11.CLIENT)
    i = start
    try:
        while time.monotonic() < stop_at:
            body = bodies[i % len(bodies)]
            i += 1
            headers = [("Host", f"127.0.0.1:{port}"), ("Content-Length", str(len(body)))]
            headers += list(HEADERS.items())
            data = conn.send(h11.Request(method="POST", target="/", headers=headers))
            data += conn.send(h11.Data(data=body))
            data += conn.send(h11.EndOfMessage())
            writer.write(data)
            await writer.drain()
            status = 0
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await reader.read(65536))
                elif isinstance(event, h11.Response):
                    status = event.status_code
                elif isinstance(event, h11.EndOfMessage):
                    break
                elif isinstance(event, h11.ConnectionClosed):
                    raise ConnectionError("the worker closed the connection")
            conn.start_next_cycle()
            n.requests += 1
            n.bytes += len(body)
            n.errors += status != 200
    finally:
        writer.close()


async def run_h11(port: int, bodies: list[bytes], k: int, seconds: float, n: Counter) -> None:
    stop_at = time.monotonic() + seconds
    await asyncio.gather(*(h11_connection(port, bodies, j, stop_at, n) for j in range(k)))


async def run_aiohttp(port: int, bodies: list[bytes], k: int, seconds: float, n: Counter) -> None:
    import aiohttp

    url = f"http://127.0.0.1:{port}/"
    stop_at = time.monotonic() + seconds

    async def loop(session: aiohttp.ClientSession, start: int) -> None:
        i = start
        while time.monotonic() < stop_at:
            body = bodies[i % len(bodies)]
            i += 1
            async with session.post(url, data=body, headers=HEADERS) as response:
                await response.read()
                n.requests += 1
                n.bytes += len(body)
                n.errors += response.status != 200

    connector = aiohttp.TCPConnector(limit=k)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(loop(session, j) for j in range(k)))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("peer", choices=("h11", "aiohttp"))
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--concurrency", type=int, required=True)
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--bodies", type=Path, required=True)
    args = parser.parse_args()
    bodies = args.bodies.read_bytes().splitlines()
    n = Counter()
    runner: Any = run_h11 if args.peer == "h11" else run_aiohttp
    __import__(args.peer)  # imported before the clock starts
    t0 = time.monotonic()
    asyncio.run(runner(args.port, bodies, args.concurrency, args.seconds, n))
    elapsed = time.monotonic() - t0
    print(
        json.dumps(
            {"requests": n.requests, "seconds": elapsed, "errors": n.errors, "bytes": n.bytes}
        )
    )


if __name__ == "__main__":
    main()
