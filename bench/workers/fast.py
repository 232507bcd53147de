"""Worker (a): the fastest Python worker we could write -- uvloop, an asyncio Protocol, httptools.

``python fast.py [PORT] [--delay SECONDS]`` (PORT defaults to $CORTEX_PORT). Answers
``POST /`` and ``POST /on-job-complete`` with 200 ``{}``, ``GET /healthz`` with 200, anything
else with 404. ``--delay`` holds each ``POST /`` answer back that long (worker (d)). With
$BENCH_STAMPS set, appends ``first_batch <time.time()>`` on the first batch and
``job_complete <time.time()>`` on /on-job-complete, so the bench can time dispatch exactly.
With $BENCH_GATE set, every ``POST /`` is held unanswered until ``POST /bench-gate`` arrives
(then they are answered, ``--delay`` after it), so that several pods start together: the
bench opens the gates once every pod has its first batches (the redis scenario).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from typing import Any

import httptools

OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
OK_CLOSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}"
NOT_FOUND = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"
BAD = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
STAMPS = os.environ.get("BENCH_STAMPS")
GATED = bool(os.environ.get("BENCH_GATE"))


def stamp(what: str) -> None:
    if STAMPS:
        with open(STAMPS, "a") as f:
            f.write(f"{what} {time.time():.6f}\n")


class Worker(asyncio.Protocol):
    first = True
    gate_open = not GATED
    held: list[Worker] = []  # POSTs waiting for the gate

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.loop = asyncio.get_running_loop()
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.write(BAD)
            self.transport.close()

    def on_message_begin(self) -> None:
        self.url = b""

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_message_complete(self) -> None:
        path = self.url.split(b"?", 1)[0]
        method = self.parser.get_method()
        if path == b"/" and method == b"POST":
            if Worker.first:
                Worker.first = False
                stamp("first_batch")
            if Worker.gate_open:
                self.answer_batch()
            else:
                Worker.held.append(self)
            return
        elif path == b"/healthz":
            answer = OK
        elif path == b"/bench-gate":
            Worker.gate_open = True
            held, Worker.held = Worker.held, []
            for w in held:
                w.answer_batch()
            answer = OK
        elif path == b"/on-job-complete":
            stamp("job_complete")
            answer = OK
        else:
            answer = NOT_FOUND
        self.reply(answer)

    def answer_batch(self) -> None:
        if self.delay:
            self.loop.call_later(self.delay, self.reply, OK)
        else:
            self.reply(OK)

    def reply(self, answer: bytes) -> None:
        if self.transport.is_closing():
            return
        if self.parser.should_keep_alive():
            self.transport.write(answer)
        else:
            self.transport.write(OK_CLOSE if answer is OK else answer)
            self.transport.close()


async def serve(port: int, delay: float) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: Worker(delay), "127.0.0.1", port, backlog=2048, reuse_address=True
    )
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("port", nargs="?", type=int, default=None)
    parser.add_argument("--delay", type=float, default=0.0)
    args = parser.parse_args()
    port = args.port if args.port is not None else int(os.environ["CORTEX_PORT"])
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(port, args.delay))
    else:
        uvloop.run(serve(port, args.delay))


if __name__ == "__main__":
    main()
