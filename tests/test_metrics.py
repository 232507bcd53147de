"""The metrics, read back through prometheus_client's own text parser."""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from supervisor.jobs import WorkerCounts
from supervisor.metrics import BATCH_BUCKETS, Metrics
from supervisor.queues.base import Progress

Labels = tuple[tuple[str, str], ...]


class Clock:
    """A clock that moves only when a test moves it."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def samples(text: bytes) -> dict[tuple[str, Labels], float]:
    """Every sample of the exposition, keyed by sample name and sorted labels."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text.decode())
        for sample in family.samples
    }


def families(text: bytes) -> dict[str, str]:
    """Family name -> type."""
    return {family.name: family.type for family in text_string_to_metric_families(text.decode())}


def job(api: str, job_id: str, **extra: str) -> Labels:
    return tuple(sorted({"api_name": api, "job_id": job_id, **extra}.items()))


def test_counts_after_a_sequence_of_calls() -> None:
    metrics = Metrics()
    metrics.job_started("api", "j1")
    for seconds in (0.02, 0.3, 4.0):
        metrics.batch_succeeded("api", "j1", seconds)
    metrics.batch_failed("api", "j1")
    metrics.batch_failed("api", "j1")
    metrics.in_flight("api", "j1", 3)
    metrics.batch_succeeded("api", "j2", 400.0)  # beyond the last bucket
    metrics.in_flight("api", "j2", 1)
    metrics.in_flight("api", "j2", 0)

    text = metrics.render()
    got = samples(text)
    assert got["cortex_batch_succeeded_total", job("api", "j1")] == 3
    assert got["cortex_batch_failed_total", job("api", "j1")] == 2
    assert got["cortex_time_per_batch_seconds_count", job("api", "j1")] == 3
    assert got["cortex_time_per_batch_seconds_sum", job("api", "j1")] == pytest.approx(4.32)
    assert got["cortex_time_per_batch_seconds_bucket", job("api", "j1", le="0.025")] == 1
    assert got["cortex_time_per_batch_seconds_bucket", job("api", "j1", le="0.5")] == 2
    assert got["cortex_time_per_batch_seconds_bucket", job("api", "j1", le="5.0")] == 3
    assert got["cortex_time_per_batch_seconds_bucket", job("api", "j2", le="300.0")] == 0
    assert got["cortex_time_per_batch_seconds_bucket", job("api", "j2", le="+Inf")] == 1
    assert got["supervisor_batches_in_flight", job("api", "j1")] == 3
    assert got["supervisor_batches_in_flight", job("api", "j2")] == 0
    assert got["cortex_batch_succeeded_total", job("api", "j2")] == 1
    assert ("cortex_batch_failed_total", job("api", "j2")) not in got  # never failed, never started

    les = {
        float(dict(labels)["le"])
        for name, labels in got
        if name == "cortex_time_per_batch_seconds_bucket" and dict(labels)["job_id"] == "j1"
    }
    assert les == {*BATCH_BUCKETS, float("inf")}
    assert families(text)["cortex_time_per_batch_seconds"] == "histogram"
    assert families(text)["cortex_batch_succeeded"] == "counter"


def test_job_started_exports_zeros() -> None:
    metrics = Metrics()
    metrics.job_started("api", "j")
    got = samples(metrics.render())
    assert got["cortex_batch_succeeded_total", job("api", "j")] == 0
    assert got["cortex_batch_failed_total", job("api", "j")] == 0
    assert got["cortex_time_per_batch_seconds_count", job("api", "j")] == 0
    assert got["supervisor_batches_in_flight", job("api", "j")] == 0


def test_container_readiness_and_restarts() -> None:
    metrics = Metrics()
    metrics.container_ready("api", 0, "worker", True)
    metrics.container_ready("api", 0, "sidecar", False)
    metrics.container_ready("api", "1", "worker", True)
    metrics.container_ready("api", 1, "worker", False)
    metrics.container_restarts("api", 0, "worker", 1)
    metrics.container_restarts("api", 0, "worker", 3)

    text = metrics.render()
    got = samples(text)

    def key(pod: str, container: str) -> Labels:
        return tuple(sorted({"api_name": "api", "pod": pod, "container": container}.items()))

    assert got["supervisor_container_ready", key("0", "worker")] == 1
    assert got["supervisor_container_ready", key("0", "sidecar")] == 0
    assert got["supervisor_container_ready", key("1", "worker")] == 0
    assert got["supervisor_container_restarts_total", key("0", "worker")] == 3
    assert families(text)["supervisor_container_restarts"] == "counter"

    metrics.container_removed("api", 0, "worker")
    metrics.container_removed("api", 7, "never-seen")  # harmless
    got = samples(metrics.render())
    assert ("supervisor_container_ready", key("0", "worker")) not in got
    assert ("supervisor_container_restarts_total", key("0", "worker")) not in got
    assert got["supervisor_container_ready", key("0", "sidecar")] == 0


def job_series(text: bytes, job_id: str) -> set[str]:
    return {name for name, labels in samples(text) if dict(labels).get("job_id") == job_id}


def test_ended_jobs_series_go_after_the_retention() -> None:
    clock = Clock()
    metrics = Metrics(retention=120, now=clock)
    metrics.job_started("api", "done")
    metrics.batch_succeeded("api", "done", 0.1)
    metrics.batch_failed("api", "done")
    metrics.in_flight("api", "done", 2)
    metrics.batch_succeeded("api", "running", 0.1)

    metrics.job_ended("api", "done")
    clock.now += 60
    metrics.job_ended("api", "done")  # a second call does not push the deadline back
    metrics.batch_succeeded("api", "done", 0.2)  # a late answer still counts meanwhile
    got = samples(metrics.render())
    assert got["cortex_batch_succeeded_total", job("api", "done")] == 2
    assert got["supervisor_batches_in_flight", job("api", "done")] == 0  # ended: none in flight

    clock.now += 59.5
    assert "cortex_time_per_batch_seconds_count" in job_series(metrics.render(), "done")

    clock.now += 0.5
    text = metrics.render()
    assert job_series(text, "done") == set()
    assert job_series(text, "running") >= {
        "cortex_batch_succeeded_total",
        "cortex_time_per_batch_seconds_count",
    }

    # The same ids may come back (a new job reusing them) and count from zero.
    metrics.batch_failed("api", "done")
    got = samples(metrics.render())
    assert got["cortex_batch_failed_total", job("api", "done")] == 1
    assert ("cortex_batch_succeeded_total", job("api", "done")) not in got


def test_zero_retention_removes_on_the_next_render() -> None:
    clock = Clock()
    metrics = Metrics(retention=0, now=clock)
    metrics.batch_succeeded("api", "j", 1.0)
    metrics.job_ended("api", "j")
    assert job_series(metrics.render(), "j") == set()


def test_negative_retention_is_refused() -> None:
    with pytest.raises(ValueError, match="retention"):
        Metrics(retention=-1)


def test_process_collector_and_private_registry() -> None:
    first, second = Metrics(), Metrics()
    first.batch_succeeded("api", "only-first", 0.1)
    text = second.render()
    names = families(text)
    assert {"process_cpu_seconds", "process_resident_memory_bytes", "process_open_fds"} <= set(
        names
    )
    assert job_series(text, "only-first") == set()  # registries are not shared
    labels = {"api_name": "api", "job_id": "only-first"}
    assert REGISTRY.get_sample_value("cortex_batch_succeeded_total", labels) is None
    assert first.registry.get_sample_value("cortex_batch_succeeded_total", labels) == 1


def test_job_figures_and_counts_kept_elsewhere_expire_with_the_job() -> None:
    clock = Clock()
    metrics = Metrics(retention=120, now=clock)
    progress = Progress(
        total=10,
        succeeded=6,
        dead=1,
        failed_attempts=3,
        in_flight=2,
        in_queue=1,
        average_time_per_batch=0.5,
    )
    metrics.job_figures("api", "j", progress, WorkerCounts(ready=2, failed=1))
    metrics.job_counted("api", "j", 6, 3)
    metrics.job_counted("api", "j", 5, 3)  # a count read before a later one: never back
    got = samples(metrics.render())
    assert got["cortex_batch_succeeded_total", job("api", "j")] == 6
    assert got["cortex_batch_failed_total", job("api", "j")] == 3
    assert got["supervisor_job_batches", job("api", "j")] == 10
    assert got["supervisor_job_dead_batches", job("api", "j")] == 1
    assert got["supervisor_job_workers", job("api", "j", state="ready")] == 2
    assert got["supervisor_job_workers", job("api", "j", state="failed")] == 1
    assert got["supervisor_job_workers", job("api", "j", state="pending")] == 0
    metrics.job_counted("api", "j", 9, 4)
    got = samples(metrics.render())
    assert got["cortex_batch_succeeded_total", job("api", "j")] == 9
    assert got["cortex_batch_failed_total", job("api", "j")] == 4

    metrics.job_ended("api", "j")
    clock.now += 120
    assert job_series(metrics.render(), "j") == set()
    metrics.job_counted("api", "j", 1, 0)  # the same ids again count from zero
    assert samples(metrics.render())["cortex_batch_succeeded_total", job("api", "j")] == 1
