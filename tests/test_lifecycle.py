"""The lifecycle decisions as tables of events: admission, outcome, exit code, worker counts."""

from __future__ import annotations

import msgspec
import pytest

from supervisor import jobs
from supervisor.lifecycle import (
    Admission,
    Cause,
    Outcome,
    PodState,
    admit,
    exit_code_for,
    heartbeat_counts,
    may_join,
    next_pod_state,
    worker_counts,
)
from supervisor.queues.base import Heartbeat, JobRecord


def record(status: str, total: int | None = 10) -> JobRecord:
    return JobRecord(
        job_id="7fff",
        api_name="api",
        digest="d",
        spec_json=b"{}",
        status=status,
        created_time="t",
        total_batches=total,
    )


@pytest.mark.parametrize(
    ("latest", "fresh", "expected"),
    [
        (None, False, Admission.NEW),
        (None, True, Admission.NEW),
        (record(jobs.ENQUEUING, None), False, Admission.ENQUEUE),
        (record(jobs.RUNNING, None), False, Admission.ENQUEUE),  # enqueueing never finished
        (record(jobs.RUNNING), False, Admission.RESUME),
        (record(jobs.RUNNING), True, Admission.NEW),
        (record(jobs.SUCCEEDED), False, Admission.ENDED),
        (record(jobs.SUCCEEDED), True, Admission.NEW),
        (record(jobs.WORKER_ERROR), False, Admission.ENDED),
        (record(jobs.TIMED_OUT), False, Admission.ENDED),
        (record(jobs.STOPPED), False, Admission.ENDED),
        (record(jobs.COMPLETED_WITH_FAILURES), False, Admission.ENDED),
    ],
)
def test_admit(latest: JobRecord | None, fresh: bool, expected: Admission) -> None:
    assert admit(latest, fresh=fresh) is expected


# Each row: the causes that arrive, in order; the batches dead at the end; then what follows:
# (final status, recorded as an end state?, exit code, sends /on-job-complete?)
OUTCOMES: list[
    tuple[list[tuple[Cause, str | None, int | None]], int, tuple[str | None, bool, int, bool]]
] = [
    ([], 0, (jobs.SUCCEEDED, True, 0, True)),
    ([], 3, (jobs.COMPLETED_WITH_FAILURES, True, 1, True)),
    ([(Cause.TIMEOUT, None, None)], 0, (jobs.TIMED_OUT, True, 1, False)),
    ([(Cause.SIGNAL, None, 15)], 0, (jobs.STOPPED, False, 128 + 15, False)),
    ([(Cause.SIGNAL, None, 2), (Cause.SIGNAL, None, 2)], 0, (jobs.STOPPED, False, 130, False)),
    ([(Cause.POD_FAILED, jobs.WORKER_OOM, None)], 0, (jobs.WORKER_OOM, True, 1, False)),
    ([(Cause.POD_FAILED, None, None)], 0, (jobs.WORKER_ERROR, True, 1, False)),
    ([(Cause.START_FAILED, None, None)], 0, (None, False, 1, False)),
    # the first cause wins
    ([(Cause.TIMEOUT, None, None), (Cause.SIGNAL, None, 15)], 0, (jobs.TIMED_OUT, True, 1, False)),
    (
        [(Cause.SIGNAL, None, 15), (Cause.POD_FAILED, jobs.WORKER_ERROR, None)],
        0,
        (jobs.STOPPED, False, 143, False),
    ),
    ([(Cause.START_FAILED, None, None), (Cause.TIMEOUT, None, None)], 0, (None, False, 1, False)),
    ([(Cause.STOPPED, None, None)], 2, (jobs.STOPPED, True, 1, False)),
]


@pytest.mark.parametrize(("events", "dead", "expected"), OUTCOMES)
def test_outcome(
    events: list[tuple[Cause, str | None, int | None]],
    dead: int,
    expected: tuple[str | None, bool, int, bool],
) -> None:
    outcome = Outcome()
    firsts = [outcome.record(c, "why", status=st, signal=sig) for c, st, sig in events]
    assert firsts == [True] + [False] * (len(events) - 1) if events else firsts == []
    status, recorded, code, completes = expected
    assert outcome.final_status(dead) == status
    assert (status is not None and not outcome.resumable) == recorded
    assert outcome.exit_code(dead) == code
    assert outcome.sends_job_complete == completes


def test_exit_code_for() -> None:
    assert exit_code_for(jobs.SUCCEEDED) == 0
    for status in jobs.END_STATES - {jobs.SUCCEEDED}:
        assert exit_code_for(status) == 1


F, OOM, R, N, C, S = (
    PodState.FAILED,
    PodState.KILLED_OOM,
    PodState.READY,
    PodState.NOT_READY,
    PodState.CREATING,
    PodState.STOPPED,
)


@pytest.mark.parametrize(
    ("states", "status", "expected"),
    [
        ([S], jobs.SUCCEEDED, {"succeeded": 1}),
        ([S, S, S], jobs.COMPLETED_WITH_FAILURES, {"succeeded": 3}),
        ([F], jobs.WORKER_ERROR, {"failed": 1}),  # a crash mid-job or at start-up alike
        ([F, S], jobs.WORKER_ERROR, {"failed": 1, "killed": 1}),
        ([OOM, S], jobs.WORKER_OOM, {"killed_oom": 1, "killed": 1}),
        ([S, S], jobs.STOPPED, {"killed": 2}),
        ([S], jobs.TIMED_OUT, {"killed": 1}),
        ([R, N, C, F], None, {"ready": 1, "not_ready": 1, "creating": 1, "failed": 1}),
        ([S], None, {"unknown": 1}),
    ],
)
def test_worker_counts(
    states: list[PodState], status: str | None, expected: dict[str, int]
) -> None:
    counts = worker_counts(states, status)
    assert {k: v for k, v in msgspec.structs.asdict(counts).items() if v} == expected


@pytest.mark.parametrize(
    ("history", "expected"),
    [
        ([R, N, R], R),
        ([R, F, N], F),  # the readiness watcher sees the crash after the pod failed
        ([R, F, S], F),  # stopping a failed pod does not hide the failure
        ([C, OOM, N, S], OOM),
        ([R, S, N], S),
        ([C, S, F], S),  # a container exiting while we stop it is not a failure
    ],
)
def test_pod_state_history(history: list[PodState], expected: PodState) -> None:
    state = PodState.CREATING
    for new in history:
        state = next_pod_state(state, new)
    assert state is expected


def beat(pod: str, state: str, age: float, lease: float = 2.0) -> Heartbeat:
    return Heartbeat(pod, state, age, lease)


@pytest.mark.parametrize(
    ("beats", "pod", "workers", "expected"),
    [
        ([], "a", 1, True),
        ([beat("b", "ready", 0.5)], "a", 1, False),  # the one place is taken
        ([beat("b", "ready", 0.5)], "a", 2, True),
        ([beat("b", "ready", 2.5)], "a", 1, True),  # b is silent past its lease: replaced
        ([beat("b", "stopped", 0.1)], "a", 1, True),  # b has left the job
        ([beat("b", "failed", 0.1)], "a", 1, True),
        ([beat("a", "ready", 0.1), beat("b", "ready", 0.1)], "a", 2, True),  # a comes back
        ([beat("b", "creating", 0.1), beat("c", "not_ready", 0.1)], "a", 2, False),
    ],
)
def test_may_join(beats: list[Heartbeat], pod: str, workers: int, expected: bool) -> None:
    assert may_join(beats, pod, workers) is expected


@pytest.mark.parametrize(
    ("beats", "workers", "status", "expected"),
    [
        ([], 3, None, {"pending": 3}),
        (
            [beat("a", "ready", 0.1), beat("b", "creating", 1)],
            3,
            None,
            {"ready": 1, "creating": 1, "pending": 1},
        ),
        ([beat("a", "ready", 2.5)], 2, None, {"unknown": 1, "pending": 1}),  # silent: unknown
        ([beat("a", "ready", 6.5)], 2, None, {"pending": 2}),  # silent for 3 leases: gone
        (
            [beat("a", "failed", 0.1), beat("b", "ready", 0.1)],
            2,
            None,
            {"failed": 1, "ready": 1, "pending": 1},
        ),
        ([beat("a", "ready", 0.1), beat("b", "stopped", 0.1)], 2, jobs.SUCCEEDED, {"succeeded": 2}),
        (
            [beat("a", "failed", 0.1), beat("b", "ready", 0.1)],
            2,
            jobs.WORKER_ERROR,
            {"failed": 1, "killed": 1},
        ),
        ([beat("a", "ready", 2.5)], 1, jobs.STOPPED, {"unknown": 1}),
        ([beat("a", "what", 0.1)], 1, None, {"unknown": 1}),
    ],
)
def test_heartbeat_counts(
    beats: list[Heartbeat], workers: int, status: str | None, expected: dict[str, int]
) -> None:
    counts = heartbeat_counts(beats, workers, status)
    assert {k: v for k, v in msgspec.structs.asdict(counts).items() if v} == expected


def test_an_end_seen_elsewhere_is_followed_not_recorded() -> None:
    outcome = Outcome()
    assert outcome.record(Cause.ENDED_ELSEWHERE, "stopped elsewhere", status=jobs.STOPPED)
    assert outcome.final_status(0) == jobs.STOPPED
    assert not outcome.records_status and not outcome.resumable
    assert not outcome.sends_job_complete
    assert outcome.exit_code(0) == 1
    for cause in (Cause.SIGNAL, Cause.START_FAILED):
        o = Outcome()
        o.record(cause, "x")
        assert not o.records_status
    for cause in (Cause.TIMEOUT, Cause.POD_FAILED, Cause.STOPPED):
        o = Outcome()
        o.record(cause, "x")
        assert o.records_status
