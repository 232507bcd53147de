"""The benchmark of `supervisor` (docs/benchmarks.md): ``python -m bench`` from the repository root.

Every figure of ours is printed beside a baseline measured in the same run, on the same
machine, against the same worker program, and the table shows the ratio. See bench/README.md.
"""

from __future__ import annotations
