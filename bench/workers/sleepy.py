"""Worker (d): worker (a) answering each batch after 10 ms (a "real model"; concurrency matters).

``python sleepy.py [PORT] [--delay SECONDS]``; everything else as fast.py.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

if __name__ == "__main__":
    if "--delay" not in sys.argv:
        sys.argv += ["--delay", "0.01"]
    runpy.run_path(str(Path(__file__).with_name("fast.py")), run_name="__main__")
