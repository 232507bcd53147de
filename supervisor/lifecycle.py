"""The job's lifecycle decisions, as pure functions and one small state machine (no I/O).

The command loops (``run`` today, ``serve`` and ``worker`` next) carry these out; they are
tested here with tables of events, without sockets or processes.

* :func:`admit` -- what to do with a job file given what the queue already holds for it:
  start a new job, finish enqueueing one, resume one, or report one that already ended.
* :class:`Outcome` -- how the run ends. Causes arrive as events (a signal, the job timeout,
  a pod that failed, a pod that could not start, the feed running dry); the first cause wins.
  It knows the job's final status, whether that status is recorded (a signal or a failure to
  start leaves the job resumable), and the process exit code.
* :class:`PodState` and :func:`worker_counts` -- a pod's state, and the ``worker_counts`` of
  the status as Cortex's code reports them.
* :func:`may_join` and :func:`heartbeat_counts` -- for a job shared by pods on many machines
  (``supervisor worker``): whether one more pod may join it, and its ``worker_counts`` from
  the pods' heartbeats (a pod silent for longer than its lease is ``unknown``, then gone).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass

from supervisor import jobs
from supervisor.jobs import WorkerCounts
from supervisor.queues.base import Heartbeat, JobRecord

__all__ = [
    "EXIT_BAD_INPUT",
    "EXIT_FAILED",
    "EXIT_OK",
    "GONE_AFTER",
    "Admission",
    "Cause",
    "Outcome",
    "PodState",
    "admit",
    "exit_code_for",
    "heartbeat_counts",
    "may_join",
    "next_pod_state",
    "worker_counts",
]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2


class Admission(enum.Enum):
    """What ``run`` does with its job file."""

    NEW = "new"  # nothing to resume (or --fresh): split, enqueue, run
    ENQUEUE = "enqueue"  # a crash while enqueueing: enqueue again from the start, then run
    RESUME = "resume"  # enqueued and unfinished: run what is left
    ENDED = "ended"  # reached an end state: report it, send nothing


def admit(latest: JobRecord | None, *, fresh: bool) -> Admission:
    """``latest`` is the newest job stored for the same command (same API and job file)."""
    if fresh or latest is None:
        return Admission.NEW
    if latest.status in jobs.END_STATES:
        return Admission.ENDED
    if latest.status == jobs.ENQUEUING or latest.total_batches is None:
        return Admission.ENQUEUE
    return Admission.RESUME


def exit_code_for(status: str) -> int:
    """The exit code of a job that ended in ``status``."""
    return EXIT_OK if status == jobs.SUCCEEDED else EXIT_FAILED


class Cause(enum.Enum):
    """Why a run ends early."""

    SIGNAL = "signal"  # SIGTERM/SIGINT/SIGHUP: the job stays resumable
    TIMEOUT = "timeout"  # the job's `timeout` expired: timed_out
    POD_FAILED = "pod_failed"  # a container died mid-job: worker_error / worker_oom
    START_FAILED = "start_failed"  # a pod could not start: the job stays resumable
    STOPPED = "stopped"  # stopped on request (the job API): stopped
    ENDED_ELSEWHERE = "ended_elsewhere"  # another pod or the job API ended the shared job


@dataclass(slots=True)
class Outcome:
    """How the run ends: the first cause wins; ``None`` until one arrives."""

    cause: Cause | None = None
    status: str | None = None  # the job status the cause implies
    reason: str | None = None
    signal: int | None = None

    def record(
        self, cause: Cause, reason: str, *, status: str | None = None, signal: int | None = None
    ) -> bool:
        """Note ``cause``; returns False (and changes nothing) when another came first."""
        if self.cause is not None:
            return False
        self.cause = cause
        self.reason = reason
        self.signal = signal
        if status is not None:
            self.status = status
        elif cause is Cause.TIMEOUT:
            self.status = jobs.TIMED_OUT
        elif cause in (Cause.SIGNAL, Cause.STOPPED):
            self.status = jobs.STOPPED
        elif cause is Cause.POD_FAILED:
            self.status = jobs.WORKER_ERROR
        else:
            self.status = None  # START_FAILED: the job has not ended
        return True

    @property
    def ended_early(self) -> bool:
        return self.cause is not None

    @property
    def sends_job_complete(self) -> bool:
        """``/on-job-complete`` follows only a job whose every batch was settled."""
        return self.cause is None

    @property
    def resumable(self) -> bool:
        """The job is left as it is (not given an end state), to be resumed by the next run."""
        return self.cause in (Cause.SIGNAL, Cause.START_FAILED)

    @property
    def records_status(self) -> bool:
        """This run records the job's end state (not when resumable, nor when it only
        follows an end recorded elsewhere)."""
        return not self.resumable and self.cause is not Cause.ENDED_ELSEWHERE

    def final_status(self, dead: int) -> str | None:
        """The job's status at the end of the run (``None``: not ended, see ``resumable``)."""
        if self.cause is None:
            return jobs.COMPLETED_WITH_FAILURES if dead else jobs.SUCCEEDED
        return self.status

    def exit_code(self, dead: int) -> int:
        if self.signal is not None:
            return 128 + self.signal
        status = self.final_status(dead)
        return EXIT_FAILED if status is None else exit_code_for(status)


class PodState(enum.Enum):
    """A local pod's state, named as Cortex names a worker's."""

    CREATING = "creating"  # containers started, not ready yet
    READY = "ready"  # serving batches
    NOT_READY = "not_ready"  # was ready, lost readiness
    FAILED = "failed"  # a container exited on its own, or could not start
    KILLED_OOM = "killed_oom"  # a container was killed by the OOM killer
    STOPPED = "stopped"  # stopped by us


_FINAL_POD_STATES = frozenset({PodState.FAILED, PodState.KILLED_OOM, PodState.STOPPED})


def next_pod_state(current: PodState, new: PodState) -> PodState:
    """A pod's state after ``new`` is reported: failed, killed_oom and stopped are final (a
    readiness watcher noticing the crash a moment later must not turn ``failed`` into
    ``not_ready``)."""
    return current if current in _FINAL_POD_STATES else new


def worker_counts(states: Iterable[PodState], status: str | None) -> WorkerCounts:
    """``worker_counts`` for pods in ``states`` of a job in ``status`` (None: still running).

    A pod that failed counts as ``failed`` (``killed_oom`` for the OOM killer) whenever it
    failed, at start-up or mid-job, as Cortex counts it. The others count by the job's end:
    ``succeeded`` after a job that completed, ``killed`` after one that was stopped, timed
    out or ended by another pod's failure; while the job runs, by their own state.
    """
    counts = WorkerCounts()
    for state in states:
        if state is PodState.FAILED:
            counts.failed += 1
        elif state is PodState.KILLED_OOM:
            counts.killed_oom += 1
        elif status in (jobs.SUCCEEDED, jobs.COMPLETED_WITH_FAILURES):
            counts.succeeded += 1
        elif status is not None:
            counts.killed += 1
        elif state is PodState.READY:
            counts.ready += 1
        elif state is PodState.NOT_READY:
            counts.not_ready += 1
        elif state is PodState.CREATING:
            counts.creating += 1
        else:
            counts.unknown += 1
    return counts


GONE_AFTER = 3  # leases: a pod silent this long is gone (no longer counted at all)
_FINAL_STATE_NAMES = frozenset(s.value for s in _FINAL_POD_STATES)


def _live(beat: Heartbeat) -> bool:
    """Working on the job: heard from within its lease, and not in a final state."""
    return beat.age <= beat.lease and beat.state not in _FINAL_STATE_NAMES


def may_join(beats: Iterable[Heartbeat], pod_id: str, workers: int) -> bool:
    """May ``pod_id`` join a job of ``workers`` whose pods sent ``beats``? Yes while fewer
    than ``workers`` other pods are live (a pod already in may always come back). The Redis
    queue's JOIN script applies the same rule atomically."""
    others = sum(1 for b in beats if b.pod_id != pod_id and _live(b))
    return others < workers


def heartbeat_counts(beats: Iterable[Heartbeat], workers: int, status: str | None) -> WorkerCounts:
    """``worker_counts`` of a shared job in ``status`` (None: running) from its pods'
    heartbeats: each pod by its last state (as :func:`worker_counts`); a pod silent for
    longer than its lease is ``unknown``, for longer than ``GONE_AFTER`` leases not counted;
    while the job runs, the pods it still lacks are ``pending``."""
    states: list[PodState] = []
    unknown = 0
    for beat in beats:
        if beat.age > beat.lease * GONE_AFTER:
            continue
        if beat.age > beat.lease:
            unknown += 1
            continue
        try:
            states.append(PodState(beat.state))
        except ValueError:
            unknown += 1
    counts = worker_counts(states, status)
    counts.unknown += unknown
    if status is None:
        working = unknown + sum(1 for s in states if s not in _FINAL_POD_STATES)
        counts.pending = max(0, workers - working)
    return counts
