"""Prometheus metrics of one supervisor process, on a registry of its own.

Theory of operation
-------------------
:class:`Metrics` owns a private :class:`~prometheus_client.CollectorRegistry` (never the
library's global one, so two supervisors in one process, or tests, never see each other's
series) with the process collector on it. The pod and dispatch code call its plain methods as
things happen; :meth:`Metrics.render` turns the registry into the text exposition format for
``GET /metrics``.

Per-job series (batches succeeded and failed, time per batch, batches in flight) are labelled
``api_name`` and ``job_id``. A finished job's series must outlive the job long enough for
Prometheus to scrape their final values, and then go, or a long-running ``serve`` would
export every job it ever ran. :meth:`Metrics.job_ended` notes a deadline ``retention``
seconds ahead on the injected ``now()`` clock; every :meth:`Metrics.render` first removes the
label sets whose deadline has passed. No background task is involved, and tests move the
clock by hand.

Besides, each job's figures as a scrape finds them (:meth:`Metrics.job_figures`): batches in
all, batches failed for good, and its pods by state as ``worker_counts`` counts them. ``serve
--queue redis://...`` runs no pod, so it counts no batch itself: it sets each job's batch
counters to the queue's counts, summed over every pod (:meth:`Metrics.job_counted`).

Per-container series (readiness, restarts) are labelled ``api_name``, ``pod`` (the pod's
index) and ``container``. Restarts are exported as a counter (``..._restarts_total``): the
count only grows, so ``rate()`` and ``increase()`` are the queries that make sense on it. The
pod code knows the count itself, so :meth:`Metrics.container_restarts` sets it rather than
incrementing, and a small collector exports what was set.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from supervisor.jobs import WorkerCounts
from supervisor.queues.base import AttemptRecord, Delivery, Feed, Progress

__all__ = ["BATCH_BUCKETS", "CONTENT_TYPE", "DEFAULT_RETENTION", "Metrics", "ObservedFeed"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
"""The ``Content-Type`` of :meth:`Metrics.render`'s output (Prometheus text format 0.0.4)."""

DEFAULT_RETENTION = 120.0
"""Seconds an ended job's series stay exported (two scrapes at Prometheus's 1 minute default)."""

BATCH_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
)
"""Upper bounds (seconds) of the time-per-batch histogram; ``+Inf`` is added by the library."""

_JOB_LABELS = ("api_name", "job_id")
_WORKER_STATES = tuple(WorkerCounts.__struct_fields__)
_CONTAINER_LABELS = ("api_name", "pod", "container")
_RESTARTS_NAME = "supervisor_container_restarts"
_RESTARTS_HELP = "Restarts of each container of each pod since the supervisor started it."


class Metrics:
    """The metrics one supervisor exports, and the calls that update them."""

    def __init__(
        self,
        *,
        retention: float = DEFAULT_RETENTION,
        now: Callable[[], float] = time.monotonic,
        buckets: Sequence[float] = BATCH_BUCKETS,
    ) -> None:
        if retention < 0:
            raise ValueError(f"retention must be >= 0 seconds, got {retention!r}")
        self._retention = retention
        self._now = now
        self._ending: dict[tuple[str, str], float] = {}
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        self._succeeded = Counter(
            "cortex_batch_succeeded",
            "Batches the worker answered with a 2xx, per job.",
            _JOB_LABELS,
            registry=self.registry,
        )
        self._failed = Counter(
            "cortex_batch_failed",
            "Failed batch attempts (error status, connection failure or timeout), per job.",
            _JOB_LABELS,
            registry=self.registry,
        )
        self._time = Histogram(
            "cortex_time_per_batch_seconds",
            "Seconds from sending a batch to the worker to its 2xx answer, per job.",
            _JOB_LABELS,
            buckets=tuple(buckets),
            registry=self.registry,
        )
        self._in_flight = Gauge(
            "supervisor_batches_in_flight",
            "Batches sent to a worker and not yet answered, per job.",
            _JOB_LABELS,
            registry=self.registry,
        )
        self._batches = Gauge(
            "supervisor_job_batches",
            "Batches the job was split into.",
            _JOB_LABELS,
            registry=self.registry,
        )
        self._dead = Gauge(
            "supervisor_job_dead_batches",
            "Batches of the job that failed for good (dead letters).",
            _JOB_LABELS,
            registry=self.registry,
        )
        self._workers = Gauge(
            "supervisor_job_workers",
            "The job's pods in each state, as its status's worker_counts counts them.",
            (*_JOB_LABELS, "state"),
            registry=self.registry,
        )
        self._counted: dict[tuple[str, str], tuple[int, int]] = {}
        self._ready = Gauge(
            "supervisor_container_ready",
            "1 when the container passes its readiness probe, else 0.",
            _CONTAINER_LABELS,
            registry=self.registry,
        )
        self._restarts = _SetCounter(_RESTARTS_NAME, _RESTARTS_HELP, _CONTAINER_LABELS)
        self.registry.register(self._restarts)

    # Jobs -----------------------------------------------------------------------------------

    def job_started(self, api_name: str, job_id: str) -> None:
        """Export the job's series at zero, so rates work from its first batch on."""
        self._succeeded.labels(api_name, job_id)
        self._failed.labels(api_name, job_id)
        self._time.labels(api_name, job_id)
        self._in_flight.labels(api_name, job_id).set(0)

    def batch_succeeded(self, api_name: str, job_id: str, seconds: float) -> None:
        """One batch answered with success after ``seconds``."""
        self._succeeded.labels(api_name, job_id).inc()
        self._time.labels(api_name, job_id).observe(seconds)

    def batch_series(self, api_name: str, job_id: str) -> tuple[Counter, Histogram, Counter]:
        """The job's succeeded, time and failed series, for a caller that counts every batch
        (:class:`ObservedFeed`): what :meth:`batch_succeeded` and :meth:`batch_failed` do."""
        return (
            self._succeeded.labels(api_name, job_id),
            self._time.labels(api_name, job_id),
            self._failed.labels(api_name, job_id),
        )

    def batch_failed(self, api_name: str, job_id: str) -> None:
        """One failed attempt at a batch (a batch retried twice and lost counts three)."""
        self._failed.labels(api_name, job_id).inc()

    def in_flight(self, api_name: str, job_id: str, n: int) -> None:
        """The job now has ``n`` batches sent and not yet answered."""
        self._in_flight.labels(api_name, job_id).set(n)

    def job_figures(
        self, api_name: str, job_id: str, progress: Progress, counts: WorkerCounts
    ) -> None:
        """The job's batches in all and failed for good, and its pods by state, now."""
        if progress.total is not None:
            self._batches.labels(api_name, job_id).set(progress.total)
        self._dead.labels(api_name, job_id).set(progress.dead)
        for state in _WORKER_STATES:
            self._workers.labels(api_name, job_id, state).set(getattr(counts, state))

    def job_counted(self, api_name: str, job_id: str, succeeded: int, failed: int) -> None:
        """The job's batch counters, set to counts kept elsewhere (a shared queue's, over
        every pod) instead of counted batch by batch; counts never go back."""
        key = (api_name, job_id)
        was_ok, was_failed = self._counted.get(key, (0, 0))
        self._succeeded.labels(*key).inc(max(0, succeeded - was_ok))
        self._failed.labels(*key).inc(max(0, failed - was_failed))
        self._counted[key] = (max(succeeded, was_ok), max(failed, was_failed))

    def job_ended(self, api_name: str, job_id: str) -> None:
        """The job is over: its series stay ``retention`` seconds more, then go.

        Nothing is in flight any more. Calls for the job before the deadline still count;
        a second call does not push the deadline back.
        """
        self._in_flight.labels(api_name, job_id).set(0)
        self._ending.setdefault((api_name, job_id), self._now() + self._retention)

    # Containers -----------------------------------------------------------------------------

    def container_ready(self, api_name: str, pod: int | str, container: str, ready: bool) -> None:
        """Container ``container`` of pod number ``pod`` became ready (or stopped being)."""
        self._ready.labels(api_name, str(pod), container).set(1 if ready else 0)

    def container_restarts(self, api_name: str, pod: int | str, container: str, n: int) -> None:
        """The container has been restarted ``n`` times in all (the count, not an increment)."""
        self._restarts.set((api_name, str(pod), container), n)

    def container_removed(self, api_name: str, pod: int | str, container: str) -> None:
        """The container is gone for good (its API was deleted): drop its series."""
        labels = (api_name, str(pod), container)
        _remove(self._ready, labels)
        self._restarts.remove(labels)

    # Exposition -----------------------------------------------------------------------------

    def render(self) -> bytes:
        """The registry in the Prometheus text format (see :data:`CONTENT_TYPE`), after
        dropping the series of jobs whose retention has run out."""
        self._expire(self._now())
        return generate_latest(self.registry)

    def _expire(self, now: float) -> None:
        due = [key for key, deadline in self._ending.items() if deadline <= now]
        for key in due:
            del self._ending[key]
            self._counted.pop(key, None)
            for metric in (
                self._succeeded,
                self._failed,
                self._time,
                self._in_flight,
                self._batches,
                self._dead,
            ):
                _remove(metric, key)
            for state in _WORKER_STATES:
                _remove(self._workers, (*key, state))


def _remove(metric: Counter | Gauge | Histogram, labels: tuple[str, ...]) -> None:
    try:
        metric.remove(*labels)
    except KeyError:
        pass  # never created (no batch of that kind), or already removed


class _SetCounter(Collector):
    """A labelled counter whose values are set from a count kept elsewhere."""

    def __init__(self, name: str, documentation: str, labels: Sequence[str]) -> None:
        self._name = name
        self._documentation = documentation
        self._labels = list(labels)
        self._values: dict[tuple[str, ...], float] = {}

    def set(self, labels: tuple[str, ...], value: float) -> None:
        self._values[labels] = value

    def remove(self, labels: tuple[str, ...]) -> None:
        self._values.pop(labels, None)

    def describe(self) -> Iterator[Metric]:
        yield CounterMetricFamily(self._name, self._documentation, labels=self._labels)

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self._name, self._documentation, labels=self._labels)
        for labels, value in self._values.items():
            family.add_metric(list(labels), value)
        yield family


class ObservedFeed:
    """A feed that also counts each ack and failed attempt in the metrics.

    The job's series are looked up once: ``labels()`` costs microseconds a call, which a fast
    worker's pod paid three times per batch."""

    def __init__(self, feed: Feed, metrics: Metrics, api_name: str, job_id: str) -> None:
        self._feed = feed
        self._succeeded, self._time, self._failed = metrics.batch_series(api_name, job_id)
        self.receive = feed.receive
        self.receive_nowait = feed.receive_nowait
        self.release = feed.release
        self.close = feed.close
        self.wait_closed = feed.wait_closed
        self.progress = feed.progress
        self.flush = feed.flush

    def ack(self, d: Delivery, elapsed: float) -> None:
        self._feed.ack(d, elapsed)
        self._succeeded.inc()  # as Metrics.batch_succeeded
        self._time.observe(elapsed)

    def fail(self, d: Delivery, record: AttemptRecord) -> None:
        self._feed.fail(d, record)
        self._failed.inc()  # as Metrics.batch_failed
