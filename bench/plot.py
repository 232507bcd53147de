"""``--plot out.png``: dispatch batches/s vs batch size, one panel per worker, one line per
concurrency; solid = supervisor run, dashed = wrk straight at the worker (same run)."""

from __future__ import annotations

from pathlib import Path

from bench.product import WORKERS
from bench.table import Row


def plot(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = [r for r in rows if r.scenario == "dispatch" and r.unit == "batches/s"]
    workers = sorted({r.params["worker"] for r in cases})
    if not workers:
        raise RuntimeError("no dispatch figures to plot (run the dispatch scenario)")
    fig, axes = plt.subplots(1, len(workers), figsize=(4.2 * len(workers), 3.8), squeeze=False)
    for ax, worker in zip(axes[0], workers, strict=True):
        mine = [r for r in cases if r.params["worker"] == worker]
        for k, c in enumerate(sorted({r.params["concurrency"] for r in mine})):
            line = sorted(
                (r for r in mine if r.params["concurrency"] == c),
                key=lambda r: r.params["batch_size"],
            )
            color = f"C{k}"
            for label, style, pick in (("supervisor", "-o", 0), ("wrk", "--x", 1)):
                pts = [
                    (r.params["batch_size"], s.median)
                    for r in line
                    for s in [r.ours if pick == 0 else r.baselines[0]]
                    if s.median is not None
                ]
                if pts:
                    xs, ys = zip(*pts, strict=True)
                    ax.plot(xs, ys, style, color=color, label=f"{label} c={c}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("batch size (items)")
        ax.set_ylabel("batches/s")
        ax.set_title(WORKERS[worker][1], fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
