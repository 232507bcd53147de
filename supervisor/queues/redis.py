"""The Redis job queue: jobs and their batches in Redis Streams, shared by many pods
(``redis://[:password@]host:port/db`` or ``rediss://``; the user's view: docs/operations.md,
"The Redis queue").

Theory of operation
-------------------
Keys (``_redis_scripts.py``): per job a hash (the :class:`JobRecord`), a stream of its
batches (entry id ``0-<seq + 1>``, field ``body``) with one consumer group, a hash of failed
attempts' records, a dead-letter stream and a completion key; a set lists the job ids, and a hash indexes the
running ones (with their API), kept by the script that sets a status, so an idle worker
reads those only (:meth:`RedisQueue.running_jobs`).

Waking idle workers: the script that sets a status, when a job starts running, and the one
that lets a pod leave a running job, add an entry (its API and job) to one small capped
stream, in the same atomic step; an idle worker blocks on it (:class:`RedisJobWatch`, in
``redis_watch.py``, which says why a stream and why the wait has a timeout).

Enqueueing deletes whatever the job had, then adds the batches in pipelined chunks, one
chunk in flight at a time (Redis's replies pace the producer: backpressure), then creates the
consumer group and sets ``total_batches``, which lets feeds open. If the iterator raises, the
job is deleted; so it is if Redis, at its ``maxmemory``, refuses a write, and then
:class:`QueueFullError` says so in one sentence. At-least-once with leases:

* A :class:`RedisFeed` is one consumer. It reads ``XREADGROUP COUNT n`` into a buffer, only
  while its consumer asks and only about what it will send soon (``redis_feed.py``); every
  entry read is *pending* for it, with an idle time and a delivery count kept by Redis.
* Its lease on everything it holds is renewed every third of the lease time
  (``XCLAIM ... JUSTID``: idle time reset, delivery not counted), so a batch that takes
  longer than the lease is never handed to another pod while this one is alive.
* A batch idle for longer than the lease (its consumer died, or lost Redis for that long) is
  claimed by another feed (``XAUTOCLAIM``, in the CLAIM script). The lost delivery is
  recorded and decided as :func:`~supervisor.queues.base.after_lost_delivery` says: with a
  dead-letter setting (``count_lost``) it is a failed attempt, and a batch whose deliveries
  reached ``max_attempts`` (``max_receive_count``) is dead-lettered there and then; without
  one it is delivered again as the same attempt, until its lost deliveries reach
  ``LOST_DELIVERY_CAP`` (a per-job hash counts them): then it is dead-lettered, with each
  lost delivery's record.
* Acks and failures are buffered and sent in one script call per group (COMMIT): acked
  entries are acknowledged, deleted (a long job does not grow Redis) and counted once even
  if two pods acked the same batch; a failure records its attempt and either raises the
  delivery count for the next attempt or, on the last, moves the batch to the dead-letter
  stream with each attempt's record, acks and counts it, all in one step.
* Leaving a feed commits what is buffered and gives back what it held unresolved: claimable
  at once by any feed, with its delivery count unchanged.

The stream holds exactly the batches not resolved yet, so the job is finished when it is
empty; then one pod claims the ``/on-job-complete`` (:meth:`RedisQueue.completion`,
``SET ... NX`` with a lease renewed while the call runs).

Redis away: every loop retries with capped backoff and keeps what it holds; nothing is lost
that Redis acknowledged (with ``appendonly yes``). At start-up, an unreachable Redis or a
wrong password is a :class:`QueueConnectError` (``_redis_client.py``: connecting, and
coredis's log records forwarded into the pod's).
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import anyio
import anyio.lowlevel
import coredis
import coredis.exceptions
import msgspec

from supervisor.errors import raise_single
from supervisor.lifecycle import GONE_AFTER
from supervisor.logs import Logger
from supervisor.queues import _redis_scripts as S
from supervisor.queues._redis_client import CONNECT_TIMEOUT, connect, is_oom, redacted
from supervisor.queues.base import (
    RUNNING,
    AttemptRecord,
    DeadLetter,
    Heartbeat,
    JobRecord,
    Progress,
    QueueError,
    QueueFullError,
    progress_of,
)
from supervisor.queues.redis_feed import TRANSIENT, RedisFeed, consumer_name, retrying
from supervisor.queues.redis_watch import RedisJobWatch

__all__ = ["RedisFeed", "RedisQueue"]

LEASE = 30.0  # seconds a batch stays with a consumer that stopped renewing it
COMPLETION_LEASE = 30.0  # seconds the /on-job-complete claim outlives a dead claimer
CHUNK = 512  # batches per pipelined XADD round trip
ENQUEUE_LEASE = 30.0  # seconds an enqueuer that stopped (killed) still counts as enqueuing

_record_decoder = msgspec.json.Decoder(AttemptRecord)


def _job_from_hash(job_id: str, h: dict[bytes, bytes]) -> JobRecord:
    def s(name: str) -> str | None:
        v = h.get(name.encode())
        return None if v is None else v.decode()

    total = h.get(b"total_batches")
    return JobRecord(
        job_id=job_id,
        api_name=s("api_name") or "",
        digest=s("digest") or "",
        spec_json=h.get(b"spec_json", b""),
        status=s("status") or "",
        created_time=s("created_time") or "",
        start_time=s("start_time"),
        end_time=s("end_time"),
        total_batches=None if total is None else int(total),
        succeeded=int(h.get(b"succeeded", 0)),
        dead=int(h.get(b"dead", 0)),
        failed_attempts=int(h.get(b"failed_attempts", 0)),
        time_per_batch_sum=float(h.get(b"time_per_batch_sum", 0.0)),
        worker_counts=h.get(b"worker_counts"),
    )


class RedisQueue:
    """The :class:`~supervisor.queues.base.JobQueue` in Redis (see the module docstring).

    Open it with ``async with RedisQueue.open(url) as queue:``.
    """

    def __init__(self, client: coredis.Redis[bytes], url: str, lease: float, log: Logger) -> None:
        self._client = client
        self._url = redacted(url)
        self._lease = lease
        self._log = log
        self._feeds: dict[str, RedisFeed | None] = {}
        self._create = client.register_script(S.CREATE)
        self._set_status = client.register_script(S.SET_STATUS)
        self._claim_completion = client.register_script(S.COMPLETE_CLAIM)
        self._renew_completion = client.register_script(S.COMPLETE_RENEW)
        self._done_completion = client.register_script(S.COMPLETE_DONE)
        self._release_completion = client.register_script(S.COMPLETE_RELEASE)
        self._heartbeat = client.register_script(S.HEARTBEAT)
        self._join = client.register_script(S.JOIN)
        self._pods = client.register_script(S.PODS)
        self._leave = client.register_script(S.LEAVE)

    @classmethod
    @asynccontextmanager
    async def open(
        cls, url: str, *, lease: float = LEASE, log: Logger | None = None
    ) -> AsyncIterator[RedisQueue]:
        """Connect to ``url`` and check it answers (a :class:`QueueConnectError` says why
        not, in one sentence); coredis's own log records go to ``log``."""
        if lease <= 0:
            raise ValueError("lease must be positive")
        log = log if log is not None else Logger()
        async with connect(url, log) as client:
            yield cls(client, url, lease, log)

    @property
    def url(self) -> str:
        """Where the queue is (the password left out)."""
        return self._url

    async def aclose(self) -> None:
        """Nothing to do: the connection closes when :meth:`open`'s block is left."""
        await anyio.lowlevel.checkpoint()

    # -- plumbing -------------------------------------------------------------------------

    async def _do(self, what: str, call: Any) -> Any:
        return await retrying(self._log, what, call)

    def _not_feeding(self, job_id: str, doing: str) -> None:
        if job_id in self._feeds:
            raise QueueError(f"cannot {doing} job {job_id} while its feed is open.")

    # -- jobs -----------------------------------------------------------------------------

    async def create_job(
        self, job_id: str, api_name: str, digest: str, spec_json: bytes, created_time: str
    ) -> None:
        """Store a new job with status ``enqueuing`` and no batches."""
        k = S.job_keys(job_id)
        try:
            created: int = await self._create(
                keys=[k.job, S.JOBS, k.enqueuer],
                args=[
                    job_id,
                    api_name,
                    digest,
                    spec_json,
                    created_time,
                    int(ENQUEUE_LEASE * 1000),
                ],
            )
        except coredis.exceptions.ResponseError as e:
            if is_oom(e):
                raise self._full(job_id) from None
            raise
        if not created:
            raise QueueError(f"job {job_id} already exists.")

    async def enqueue_in_progress(self, job_id: str) -> bool:
        """Whether a process is enqueuing the job now (its lease renewed within
        :data:`ENQUEUE_LEASE`): another ``serve`` on the same Redis, say."""
        k = S.job_keys(job_id)
        return bool(await self._do("reading a job", partial(self._client.exists, [k.enqueuer])))

    async def enqueue(self, job_id: str, batches: Iterator[bytes], *, chunk: int = CHUNK) -> int:
        """Store ``batches`` as seq 0, 1, ... and return how many; all or nothing."""
        if chunk < 1:
            raise ValueError("chunk must be at least 1")
        self._not_feeding(job_id, "enqueue")
        k = S.job_keys(job_id)
        client = self._client
        if not await client.exists([k.job]):
            raise QueueError(f"there is no job {job_id}.")
        count = 0
        try:
            await client.delete([k.stream, k.attempts, k.complete, k.returned, k.lost])
            await client.hset(
                k.job, {"succeeded": 0, "dead": 0, "failed_attempts": 0, "time_per_batch_sum": 0}
            )
            await client.hdel(k.job, ["total_batches"])
            done = False
            while not done:
                bodies: list[bytes] = []
                for body in batches:
                    bodies.append(body)
                    if len(bodies) >= chunk:
                        break
                else:
                    done = True
                if bodies:
                    async with client.pipeline(transaction=False) as pipe:
                        for i, body in enumerate(bodies):
                            pipe.xadd(k.stream, {b"body": body}, identifier=S.entry_id(count + i))
                        pipe.set(k.enqueuer, b"1", px=int(ENQUEUE_LEASE * 1000))
                    count += len(bodies)
                    await anyio.lowlevel.checkpoint()
            await client.xgroup_create(k.stream, S.GROUP, b"0", mkstream=True)
            await client.hset(k.job, {"total_batches": count})
        except BaseException as e:
            with anyio.CancelScope(shield=True):
                await self._delete(job_id)
            # coredis's message quotes the refused command, batch body and all: not that.
            if isinstance(e, coredis.exceptions.ResponseError) and is_oom(e):
                raise self._full(job_id, count) from None
            raise
        return count

    def _full(self, job_id: str, stored: int = 0) -> QueueFullError:
        return QueueFullError(
            f"Redis at {self._url} is at its memory limit (maxmemory, policy noeviction) and "
            f"refused job {job_id} after {stored} batch(es): the job was not stored; free "
            "memory in Redis or raise its maxmemory, then submit again."
        )

    async def _delete(self, job_id: str) -> None:
        k = S.job_keys(job_id)
        await self._client.delete(
            [k.job, k.stream, k.attempts, k.complete, k.returned, k.pods, k.lost, k.enqueuer]
        )
        await self._client.srem(S.JOBS, [job_id])
        await self._client.hdel(S.RUNNING, [job_id])

    async def set_status(
        self,
        job_id: str,
        status: str,
        *,
        start_time: str | None = None,
        end_time: str | None = None,
        worker_counts: bytes | None = None,
    ) -> bool:
        """Set the job's status, and its end time and final worker counts when given; the
        start time only if none is stored (the first pod to start the job sets it). False,
        and nothing changed, if the job has ended already."""
        k = S.job_keys(job_id)
        args: list[str | bytes] = [status, start_time or "", end_time or "", worker_counts or b""]
        args += [job_id, RUNNING]
        found = await self._do(
            "setting a job's status",
            lambda: self._set_status(keys=[k.job, S.RUNNING, S.JOINABLE], args=args),
        )
        if not found:
            raise QueueError(f"there is no job {job_id}.")
        return int(found) > 0

    async def get_job(self, job_id: str) -> JobRecord | None:
        """The job (counters as Redis has them), or ``None``."""
        key = S.job_keys(job_id).job
        h = await self._do("reading a job", lambda: self._client.hgetall(key))
        return _job_from_hash(job_id, dict(h)) if h else None

    async def list_jobs(self, api_name: str | None = None) -> list[JobRecord]:
        """Jobs of ``api_name`` (or all), in the embedded queue's order (by job id)."""
        members = await self._do("listing jobs", lambda: self._client.smembers(S.JOBS))
        ids = sorted(m.decode() for m in members)
        jobs = await self._do("reading jobs", lambda: self._read_jobs(ids))
        return [j for j in jobs if api_name is None or j.api_name == api_name]

    async def _read_jobs(self, ids: list[str]) -> list[JobRecord]:
        """The jobs ``ids`` that exist, in one pipelined round trip."""
        if not ids:
            return []
        async with self._client.pipeline(transaction=False) as pipe:
            replies = [pipe.hgetall(S.job_keys(i).job) for i in ids]
        jobs = []
        for job_id, reply in zip(ids, replies, strict=True):
            h = await reply
            if h:
                jobs.append(_job_from_hash(job_id, dict(h)))
        return jobs

    async def running_jobs(self, api_name: str) -> list[JobRecord]:
        """The running jobs of ``api_name``, from the running index (the other jobs are not
        read), in :meth:`list_jobs`'s order (Redis away: retried, as an idle worker asks)."""
        index = await self._do("looking for running jobs", lambda: self._client.hgetall(S.RUNNING))
        ids = sorted(k.decode() for k, v in index.items() if v.decode() == api_name)
        jobs = await self._do("reading running jobs", lambda: self._read_jobs(ids))
        return [j for j in jobs if j.api_name == api_name and j.status == RUNNING]

    async def find_latest(self, api_name: str, digest: str) -> JobRecord | None:
        """The newest job of ``api_name`` with ``digest``, in any state."""
        for job in await self.list_jobs(api_name):
            if job.digest == digest:
                return job
        return None

    async def delete_job(self, job_id: str) -> None:
        """Forget the job and its batches; its dead letters stay."""
        self._not_feeding(job_id, "delete")
        await self._delete(job_id)

    async def progress(self, job_id: str) -> Progress:
        """The job's counters: live while this queue has its feed open, else as stored."""
        feed = self._feeds.get(job_id)
        if feed is not None:
            await anyio.lowlevel.checkpoint()
            return feed.progress()
        job = await self.get_job(job_id)
        if job is None:
            raise QueueError(f"there is no job {job_id}.")
        k = S.job_keys(job_id)
        in_flight = 0
        if job.total_batches:
            pending = await self._do(
                "reading a job's batches in flight",
                lambda: self._client.xpending(k.stream, S.GROUP),
            )
            in_flight = getattr(pending, "pending", 0)
        return progress_of(job, in_flight)

    async def dead_letters(self, job_id: str) -> list[DeadLetter]:
        """The job's dead letters, by batch number."""
        key = S.job_keys(job_id).dead
        entries = await self._do("reading dead letters", lambda: self._client.xrange(key))
        letters = []
        for e in entries:
            f = e.field_values
            records = S.as_bytes(f.get(b"attempts", b""))
            letters.append(
                DeadLetter(
                    job_id=job_id,
                    batch=int(f[b"seq"]),
                    body=msgspec.Raw(f.get(b"body", b"")),
                    attempts=[_record_decoder.decode(r) for r in records.split(b"\n") if r],
                )
            )
        return sorted(letters, key=lambda d: d.batch)

    # -- dispatch -------------------------------------------------------------------------

    @asynccontextmanager
    async def open_feed(
        self, job_id: str, *, max_attempts: int, count_lost: bool = True, buffer: int = 1024
    ) -> AsyncIterator[RedisFeed]:
        """Consume the job's batches as one consumer among any number of pods.

        Leaving the block commits every ack and failure and gives back what is held.
        ``count_lost``: whether a delivery lost with its consumer is a failed attempt
        (:func:`~supervisor.queues.base.after_lost_delivery`).
        """
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if buffer < 1:
            raise ValueError("buffer must be at least 1")
        if job_id in self._feeds:
            raise QueueError(f"job {job_id} already has an open feed.")
        self._feeds[job_id] = None
        try:
            job = await self.get_job(job_id)
            if job is None:
                raise QueueError(f"there is no job {job_id}.")
            if job.total_batches is None:
                raise QueueError(f"job {job_id} has not finished enqueueing.")
            feed = RedisFeed(
                self._client,
                job,
                max_attempts=max_attempts,
                count_lost=count_lost,
                buffer=buffer,
                lease=self._lease,
                log=self._log.bind(job_id=job_id),
            )
            self._feeds[job_id] = feed
            try:
                async with feed.running():
                    yield feed
            except BaseExceptionGroup as group:
                raise_single(group)
        finally:
            del self._feeds[job_id]

    # -- pods sharing a job ---------------------------------------------------------------

    async def try_join(self, job_id: str, pod_id: str, workers: int, lease: float) -> bool:
        """Admit ``pod_id`` while fewer than ``workers`` other pods are live (one script:
        two pods racing for the last place cannot both get it)."""
        key = S.job_keys(job_id).pods
        args: list[str | int] = [pod_id, workers, int(lease * 1000), GONE_AFTER]
        joined = await self._do("joining a job", lambda: self._join(keys=[key], args=args))
        return bool(joined)

    async def heartbeat(self, job_id: str, pod_id: str, state: str, lease: float) -> None:
        """Note ``pod_id``'s state, by Redis's clock."""
        key = S.job_keys(job_id).pods
        args: list[str | int] = [pod_id, state, int(lease * 1000), GONE_AFTER]
        await self._do("sending a heartbeat", lambda: self._heartbeat(keys=[key], args=args))

    async def leave(self, job_id: str, pod_id: str) -> None:
        """Forget ``pod_id``'s heartbeat: its place is free at once, and idle workers of the
        API are woken if the job runs."""
        k = S.job_keys(job_id)
        keys = [k.pods, k.job, S.JOINABLE]
        args = [pod_id, job_id, RUNNING]
        await self._do("leaving a job", lambda: self._leave(keys=keys, args=args))

    async def watch_jobs(self, api_name: str) -> RedisJobWatch:
        """Watch the joinable stream for jobs of ``api_name``, from its newest entry."""
        newest: Any = await self._do(
            "watching for jobs", lambda: self._client.xrevrange(S.JOINABLE, count=1)
        )
        last = S.as_bytes(newest[0].identifier) if newest else b"0-0"
        return RedisJobWatch(self._client, api_name, last, self._log)

    async def pods(self, job_id: str) -> list[Heartbeat]:
        """The last heartbeat of each pod of the job (ages by Redis's clock)."""
        key = S.job_keys(job_id).pods
        out: list[Any] = await self._do("reading heartbeats", lambda: self._pods(keys=[key]))
        return [
            Heartbeat(
                S.as_bytes(out[i]).decode(),
                S.as_bytes(out[i + 1]).decode(),
                int(out[i + 2]) / 1000,
                int(out[i + 3]) / 1000,
            )
            for i in range(0, len(out), 4)
        ]

    # -- the one /on-job-complete ---------------------------------------------------------

    @asynccontextmanager
    async def completion(
        self, job_id: str, *, lease: float = COMPLETION_LEASE
    ) -> AsyncIterator[bool]:
        """Claim the job's one ``/on-job-complete`` among all pods: yields ``True`` to the
        one claimer (the job enqueued, nothing pending or in flight, nobody claimed it
        before), ``False`` to everyone else. The claim is renewed while the block runs;
        leaving it normally marks the job completed for good, leaving it with an error
        releases the claim for another pod. A claimer that dies mid-block keeps the claim
        until ``lease`` runs out; then another pod may claim it and call again."""
        k = S.job_keys(job_id)
        owner = consumer_name() + "-" + secrets.token_hex(4)
        ms = int(lease * 1000)
        claimed = await self._do(
            "claiming /on-job-complete",
            lambda: self._claim_completion(keys=[k.job, k.stream, k.complete], args=[owner, ms]),
        )
        if not claimed:
            yield False
            return
        ok = False
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._keep_completion, k.complete, owner, lease)
                try:
                    yield True
                    ok = True
                finally:
                    tg.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            raise_single(group)
        finally:
            script = self._done_completion if ok else self._release_completion
            with anyio.CancelScope(shield=True), anyio.move_on_after(CONNECT_TIMEOUT * 2):
                await self._do(
                    "finishing /on-job-complete",
                    lambda: script(keys=[k.complete], args=[owner]),
                )

    async def _keep_completion(self, key: str, owner: str, lease: float) -> None:
        ms = int(lease * 1000)
        while True:
            await anyio.sleep(lease / 3)
            try:
                mine: int = await self._renew_completion(keys=[key], args=[owner, ms])
            except TRANSIENT as e:
                self._log.warning(
                    "redis_unavailable", doing="renewing the completion", error=str(e)
                )
                continue
            if not mine:
                self._log.warning("completion_claim_lost", key=key)
                return
