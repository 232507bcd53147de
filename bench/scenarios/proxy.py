"""Proxy: wrk through ``supervisor proxy`` vs wrk through nginx vs wrk straight at worker (a).

Each repeat starts worker (a) alone with nginx in front (keep-alive upstream) and measures
direct and nginx at every concurrency, then ``supervisor proxy`` with its own worker (a) and
measures through it. The bodies are batches of 10 items. Added latency = the proxied p50 (p99)
minus the direct p50 (p99) at the same concurrency in the same repeat.
"""

from __future__ import annotations

from pathlib import Path

from bench import data
from bench.nginx import start_nginx
from bench.procs import free_port
from bench.product import proxy, start_worker, write_api
from bench.scenarios import Context
from bench.table import Row, Series
from bench.wrk import WrkResult, run_wrk

PROXY = "supervisor proxy"


def run(ctx: Context) -> list[Row]:
    levels = [4] if ctx.quick else [1, 4, 16]
    work = ctx.fresh_dir("proxy")
    bodies = data.write_bodies(work / "bodies.txt", data.items(10_000), 10)
    rows: dict[tuple[int, str], Row] = {}
    for c in levels:
        rows[c, "rps"] = Row(
            "proxy", f"(a) c={c}", "req/s", Series(PROXY), [Series("nginx"), Series("direct")]
        )
        for pct in ("p50", "p99"):
            rows[c, pct] = Row(
                "proxy",
                f"(a) c={c} added {pct}",
                "us",
                Series(PROXY),
                [Series("nginx")],
                lower_is_better=True,
            )
    if "wrk" in ctx.missing:
        for row in rows.values():
            for s in (row.ours, *row.baselines):
                s.fail(ctx.missing["wrk"])
        return list(rows.values())
    for rep in range(ctx.repeats):
        ctx.say(f"proxy repeat {rep + 1}/{ctx.repeats}: direct and nginx")
        direct: dict[int, WrkResult | None] = {}
        port = free_port()
        worker = start_worker(ctx.procs, "a", port)
        try:
            for c in levels:
                direct[c] = _measure(ctx, rows, c, "direct", port, bodies, work, None)
            try:
                listen = free_port()
                nginx = start_nginx(
                    ctx.procs, listen=listen, upstream=port, workdir=work / f"nginx-{rep}"
                )
            except Exception as e:
                for c in levels:
                    _fail(rows, c, "nginx", e)
            else:
                try:
                    for c in levels:
                        _measure(ctx, rows, c, "nginx", listen, bodies, work, direct.get(c))
                finally:
                    ctx.procs.stop(nginx)
        finally:
            ctx.procs.stop(worker)
        ctx.say(f"proxy repeat {rep + 1}/{ctx.repeats}: supervisor proxy")
        root = ctx.fresh_dir("proxy-root")
        try:
            listen = free_port()
            api = write_api(root / "api.yaml", "a", free_port())
            with proxy(ctx.procs, api, root, listen):
                for c in levels:
                    _measure(ctx, rows, c, PROXY, listen, bodies, work, direct.get(c))
        except Exception as e:
            ctx.say(f"  supervisor proxy: {e}")
            for c in levels:
                _fail(rows, c, PROXY, e)
    return list(rows.values())


def _series(row: Row, label: str) -> Series:
    return next(s for s in (row.ours, *row.baselines) if s.label == label)


def _fail(rows: dict[tuple[int, str], Row], c: int, label: str, error: BaseException) -> None:
    for kind in ("rps", "p50", "p99"):
        if label != "direct" or kind == "rps":
            _series(rows[c, kind], label).fail(error)


def _measure(
    ctx: Context,
    rows: dict[tuple[int, str], Row],
    c: int,
    label: str,
    port: int,
    bodies: Path,
    work: Path,
    direct: WrkResult | None,
) -> WrkResult | None:
    try:
        result = run_wrk(ctx.procs, port, bodies, connections=c, seconds=ctx.seconds, workdir=work)
    except Exception as e:
        _fail(rows, c, label, e)
        return None
    _series(rows[c, "rps"], label).add(result.rps)
    if direct is not None:
        _series(rows[c, "p50"], label).add(result.p50_us - direct.p50_us)
        _series(rows[c, "p99"], label).add(result.p99_us - direct.p99_us)
    return result
