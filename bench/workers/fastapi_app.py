"""Worker (c): uvicorn + FastAPI with ``def handle(batch: list)``, as most users write it.

(Spelled ``list[Any]``: this FastAPI reads a bare ``list`` parameter as form data.)

``python fastapi_app.py [PORT]`` (PORT defaults to $CORTEX_PORT); same routes and
$BENCH_STAMPS as fast.py.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import uvicorn
from fastapi import FastAPI

STAMPS = os.environ.get("BENCH_STAMPS")
app = FastAPI()
seen = {"first": True}


def stamp(what: str) -> None:
    if STAMPS:
        with open(STAMPS, "a") as f:
            f.write(f"{what} {time.time():.6f}\n")


@app.post("/")
def handle(batch: list[Any]) -> dict[str, str]:
    if seen["first"]:
        seen["first"] = False
        stamp("first_batch")
    return {}


@app.get("/healthz")
def healthz() -> dict[str, str]:
    return {}


@app.post("/on-job-complete")
def on_job_complete() -> dict[str, str]:
    stamp("job_complete")
    return {}


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
