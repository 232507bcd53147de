from __future__ import annotations

import io

from supervisor.logs import Logger
from supervisor.progress import ProgressReporter, format_bar, format_duration
from supervisor.queues.base import Progress


def progress(**kw: int) -> Progress:
    base = {
        "total": 100,
        "succeeded": 0,
        "dead": 0,
        "failed_attempts": 0,
        "in_flight": 0,
        "in_queue": 100,
    }
    base.update(kw)
    return Progress(**base, average_time_per_batch=None)


def test_format_duration() -> None:
    assert format_duration(None) == "--:--"
    assert format_duration(float("inf")) == "--:--"
    assert format_duration(65) == "01:05"
    assert format_duration(3725) == "1:02:05"


def test_bar_counts_done_failed_rate_eta() -> None:
    line = format_bar(progress(succeeded=40, dead=10), rate=10.0, width=10)
    assert line.startswith("[#####.....]")
    assert "40/100 done" in line
    assert "10 failed" in line
    assert "10.0/s" in line
    assert "ETA 00:05" in line
    assert "ETA --:--" in format_bar(progress(), rate=0.0)


def test_json_lines_when_not_a_tty() -> None:
    out = io.StringIO()
    r = ProgressReporter(lambda: progress(succeeded=3), stream=out, tty=False, log=Logger(out))
    r.final()
    assert '"event":"progress"' in out.getvalue()
    assert '"succeeded":3' in out.getvalue()


def test_bar_on_a_tty() -> None:
    out = io.StringIO()
    r = ProgressReporter(
        lambda: progress(succeeded=3), stream=out, tty=True, log=Logger(io.StringIO())
    )
    r.final()
    assert out.getvalue().startswith("\r\x1b[K[")
    assert out.getvalue().endswith("\n")
