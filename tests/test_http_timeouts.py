"""The overdue rule, as a table; and the parser's phase, which feeds it."""

from __future__ import annotations

import pytest

from supervisor.http._timeouts import Phase, Timeouts, Verdict, overdue, verdict
from supervisor.http.errors import RemoteProtocolError
from supervisor.http.request import RequestParser

T = Timeouts(read=30, idle=75)

K, T4, C = Verdict.KEEP, Verdict.TIMED_OUT, Verdict.CLOSE


@pytest.mark.parametrize(
    ("phase", "waited", "expected"),
    [
        (Phase.IDLE, 0, K),
        (Phase.IDLE, 74.9, K),
        (Phase.IDLE, 75, C),
        (Phase.IDLE, 1000, C),
        (Phase.HEAD, 29.9, K),
        (Phase.HEAD, 30, T4),
        (Phase.BODY, 0, K),
        (Phase.BODY, 31, T4),
        (Phase.CLOSING, 29.9, K),
        (Phase.CLOSING, 30, C),
        (Phase.BUSY, 0, K),
        (Phase.BUSY, 10_000, K),
    ],
)
def test_verdict_table(phase: Phase, waited: float, expected: Verdict) -> None:
    assert verdict(phase, 100.0, 100.0 + waited, T) is expected


def test_overdue_names_only_the_connections_to_act_on() -> None:
    connections = [
        ("fresh", Phase.IDLE, 90.0),
        ("idle", Phase.IDLE, 20.0),
        ("stalled", Phase.HEAD, 60.0),
        ("trickling", Phase.BODY, 80.0),
        ("forwarded", Phase.BUSY, 0.0),
        ("not reading its 400", Phase.CLOSING, 0.0),
    ]
    assert overdue(connections, 100.0, T) == [
        ("idle", C),
        ("stalled", T4),
        ("not reading its 400", C),
    ]


@pytest.mark.parametrize(
    ("timeouts", "sweep"),
    [(Timeouts(), 1.0), (Timeouts(read=0.2, idle=60), 0.05), (Timeouts(read=9, idle=2), 0.5)],
)
def test_sweep_interval(timeouts: Timeouts, sweep: float) -> None:
    assert timeouts.sweep == sweep


@pytest.mark.parametrize("field", ["read", "idle"])
@pytest.mark.parametrize("value", [0, -1.0])
def test_timeouts_must_be_positive(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=f"`{field}` > 0"):
        Timeouts(**{field: value})


def test_parser_phase_follows_the_request() -> None:
    parser = RequestParser()
    assert parser.phase is Phase.IDLE
    steps = [
        (b"POST / HTTP/1.1\r\nHo", Phase.HEAD),
        (b"st: x\r\nContent-Length: 4\r\n\r\n", Phase.BODY),
        (b"ab", Phase.BODY),
        (b"cd", Phase.IDLE),  # whole: read, and nothing of the next one yet
        (b"P", Phase.HEAD),
        (b"OST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n", Phase.BODY),
        (b"ab\r\n0\r\n\r\n", Phase.IDLE),
        (b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", Phase.CLOSING),
    ]
    for data, phase in steps:
        parser.receive_data(data)
        while parser.next_request() is not None:
            pass
        assert parser.phase is phase, data
    broken = RequestParser()
    broken.receive_data(b"\x00garbage\r\n\r\n")
    with pytest.raises(RemoteProtocolError):
        broken.next_request()
    assert broken.phase is Phase.CLOSING
