"""Worker (b): uvicorn (uvloop + httptools) serving a raw ASGI app.

``python asgi_raw.py [PORT]`` (PORT defaults to $CORTEX_PORT); same routes and $BENCH_STAMPS
as fast.py.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import uvicorn

STAMPS = os.environ.get("BENCH_STAMPS")
HEADERS = [(b"content-type", b"application/json"), (b"content-length", b"2")]
first = True


def stamp(what: str) -> None:
    if STAMPS:
        with open(STAMPS, "a") as f:
            f.write(f"{what} {time.time():.6f}\n")


async def app(
    scope: dict[str, Any],
    receive: Callable[[], Awaitable[dict[str, Any]]],
    send: Callable[[dict[str, Any]], Awaitable[None]],
) -> None:
    global first
    if scope["type"] != "http":
        return
    more = True
    while more:
        message = await receive()
        more = message.get("more_body", False)
    path, method = scope["path"], scope["method"]
    status = 200
    if path == "/" and method == "POST":
        if first:
            first = False
            stamp("first_batch")
    elif path == "/on-job-complete":
        stamp("job_complete")
    elif path != "/healthz":
        status = 404
    await send({"type": "http.response.start", "status": status, "headers": HEADERS})
    await send({"type": "http.response.body", "body": b"{}"})


if __name__ == "__main__":
    port = int(sys.argv[1]) if len(sys.argv) > 1 else int(os.environ["CORTEX_PORT"])
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=port,
        loop="uvloop",
        http="httptools",
        lifespan="off",
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=1,
    )
