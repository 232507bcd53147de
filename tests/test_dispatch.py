"""The dispatch engine against a real (misbehaving on demand) HTTP server and a real queue.

The server is h11 on a real loopback socket; each test decides how it answers. The target is
a small stand-in for a Pod (port, serving, generation), the one thing dispatch asks of it.
"""

from __future__ import annotations

import io
import json
import socket
import struct
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import anyio
import anyio.abc
import h11
import pytest

from supervisor.dispatch import dispatch_pod
from supervisor.logs import Logger
from supervisor.queues.base import Progress
from supervisor.queues.embedded import EmbeddedQueue
from tests.helpers import FakePod, read_raw_request, serve_raw

pytestmark = pytest.mark.anyio

JOB = "7e5c6d1f000000aa"


@dataclass
class Seen:
    conn: int
    body: bytes
    headers: dict[bytes, bytes]


# An answer: (status, extra headers, body, close the connection afterwards).
Answer = tuple[int, list[tuple[bytes, bytes]], bytes, bool]
Handler = Callable[[Seen], Awaitable[Answer | None]]  # None: hang up without answering


async def ok(_: Seen) -> Answer:
    return 200, [], b"ok", False


@dataclass
class Server:
    handler: Handler
    seen: list[Seen] = field(default_factory=list)
    connections: int = 0
    port: int = 0
    read_size: int = 65536

    async def serve(self, listener: anyio.abc.SocketListener) -> None:
        await listener.serve(self._connection)

    async def _connection(self, stream: anyio.abc.SocketStream) -> None:
        self.connections += 1
        number = self.connections
        conn = h11.Connection(h11.SERVER)
        async with stream:
            while True:
                request: h11.Request | None = None
                body = bytearray()
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        try:
                            data = await stream.receive(self.read_size)
                        except (anyio.EndOfStream, anyio.BrokenResourceError):
                            return
                        conn.receive_data(data)
                    elif isinstance(event, h11.Request):
                        request = event
                    elif isinstance(event, h11.Data):
                        body += event.data
                    elif isinstance(event, h11.EndOfMessage):
                        break
                    else:
                        return
                assert request is not None
                seen = Seen(number, bytes(body), {k.lower(): v for k, v in request.headers})
                self.seen.append(seen)
                answer = await self.handler(seen)
                if answer is None:
                    return
                status, headers, payload, close = answer
                headers = [*headers, (b"Content-Length", str(len(payload)).encode())]
                data = conn.send(h11.Response(status_code=status, headers=headers))
                data += conn.send(h11.Data(data=payload)) + conn.send(h11.EndOfMessage())
                await stream.send(data)
                if close or conn.our_state is not h11.DONE:
                    return
                conn.start_next_cycle()


def bodies(n: int, size: int = 0) -> list[bytes]:
    pad = "x" * size
    return [json.dumps([{"i": i, "pad": pad}]).encode() for i in range(n)]


async def run_job(
    tmp_path: Path,
    handler: Handler,
    batches: Iterable[bytes],
    *,
    concurrency: int = 1,
    max_attempts: int = 3,
    batch_timeout: float | None = None,
    server: Server | None = None,
    pod: FakePod | None = None,
    during: Callable[[Server, FakePod], Awaitable[None]] | None = None,
    port: int | None = None,
) -> tuple[Server, Progress, Path]:
    """Dispatch ``batches`` to a server answering with ``handler``; returns the server, the
    final progress and the dead-letter directory."""
    server = server or Server(handler)
    queue = await EmbeddedQueue.open(tmp_path / "q.sqlite3", dead_letter_root=tmp_path / "dl")
    log = Logger(io.StringIO())
    async with queue:
        await queue.create_job(JOB, "api", "digest", b"{}", "t0")
        await queue.enqueue(JOB, iter(batches))
        with anyio.fail_after(30):
            async with (
                await anyio.create_tcp_listener(local_host="127.0.0.1") as listener,
                anyio.create_task_group() as tg,
            ):
                server.port = port or listener.extra(anyio.abc.SocketAttribute.local_port)
                pod = pod or FakePod(server.port)
                pod.port = server.port
                tg.start_soon(server.serve, listener)
                async with queue.open_feed(JOB, max_attempts=max_attempts) as feed:
                    async with anyio.create_task_group() as job:
                        job.start_soon(
                            lambda: dispatch_pod(
                                feed,
                                pod,
                                job_id=JOB,
                                concurrency=concurrency,
                                batch_timeout=batch_timeout,
                                log=log,
                            )
                        )
                        if during is not None:
                            await during(server, pod)
                    progress = feed.progress()
                tg.cancel_scope.cancel()
    return server, progress, queue.dead_letter_dir(JOB)


async def test_every_batch_once_in_order_over_reused_connections(tmp_path: Path) -> None:
    sent = bodies(300)
    server, p, _ = await run_job(tmp_path, ok, sent, concurrency=4)
    assert p.succeeded == 300 and p.failed_attempts == 0 and p.dead == 0
    assert sorted(s.body for s in server.seen) == sorted(sent)
    assert len(server.seen) == 300  # each exactly once
    assert server.connections <= 4  # keep-alive: one connection per slot
    first = server.seen[0].headers
    assert first[b"content-type"] == b"application/json"
    assert first[b"x-cortex-job-id"] == JOB.encode()
    assert first[b"host"] == f"127.0.0.1:{server.port}".encode()


async def test_connection_close_answers_open_new_connections(tmp_path: Path) -> None:
    async def close(_: Seen) -> Answer:
        return 200, [(b"Connection", b"close")], b"ok", True

    server, p, _ = await run_job(tmp_path, close, bodies(20), concurrency=2)
    assert p.succeeded == 20 and p.failed_attempts == 0
    assert server.connections == 20


async def test_big_bodies_to_a_slow_reader_arrive_whole(tmp_path: Path) -> None:
    sent = bodies(6, size=256 * 1024 - 64)
    server = Server(ok, read_size=4096)  # the sender must wait for room again and again
    server, p, _ = await run_job(tmp_path, ok, sent, concurrency=2, server=server)
    assert p.succeeded == 6
    assert sorted(s.body for s in server.seen) == sorted(sent)


async def test_non_200_is_a_failed_attempt_with_evidence_then_dead(tmp_path: Path) -> None:
    async def picky(seen: Seen) -> Answer:
        if b'"i": 3' in seen.body:
            return 500, [], b"no thanks: " + b"z" * 5000, False
        return 200, [], b"ok", False

    server, p, dead = await run_job(tmp_path, picky, bodies(10), max_attempts=2)
    assert p.succeeded == 9 and p.dead == 1 and p.failed_attempts == 2
    assert sum(b'"i": 3' in s.body for s in server.seen) == 2
    letter = json.loads((dead / "batch-3.json").read_bytes())
    assert [a["status"] for a in letter["attempts"]] == [500, 500]
    head = letter["attempts"][0]["response_head"]
    assert head.startswith("no thanks: ") and len(head) == 1024
    assert letter["attempts"][0]["stderr_tail"] == "worker said: boom\n"


async def test_hang_up_mid_exchange_is_a_failed_attempt(tmp_path: Path) -> None:
    calls = 0

    async def rude(seen: Seen) -> Answer | None:
        nonlocal calls
        calls += 1
        return None if calls == 1 else (200, [], b"ok", False)

    server, p, _ = await run_job(tmp_path, rude, bodies(3))
    assert p.succeeded == 3 and p.failed_attempts == 1 and p.dead == 0
    assert server.connections == 2


async def test_refused_connections_dead_letter_with_the_reason(tmp_path: Path) -> None:
    with anyio.fail_after(10):
        async with await anyio.create_tcp_listener(local_host="127.0.0.1") as closed:
            port = closed.extra(anyio.abc.SocketAttribute.local_port)
    # Nothing listens on `port` now; the server below listens elsewhere and sees nothing.
    _, p, dead = await run_job(tmp_path, ok, bodies(2), max_attempts=2, port=port)
    assert p.succeeded == 0 and p.dead == 2 and p.failed_attempts == 4
    letter = json.loads((dead / "batch-0.json").read_bytes())
    error = letter["attempts"][0]["error"]
    assert error == f"Could not connect to 127.0.0.1:{port}: Connection refused."


async def test_batch_timeout_fails_only_the_slow_batch(tmp_path: Path) -> None:
    slow_once = True

    async def sleepy(seen: Seen) -> Answer:
        nonlocal slow_once
        if b'"i": 1' in seen.body and slow_once:
            slow_once = False
            await anyio.sleep_forever()
        return 200, [], b"ok", False

    server, p, _ = await run_job(tmp_path, sleepy, bodies(5), concurrency=2, batch_timeout=0.5)
    assert p.succeeded == 5 and p.failed_attempts == 1
    assert sum(b'"i": 1' in s.body for s in server.seen) == 2


async def test_nothing_is_sent_until_the_pod_serves(tmp_path: Path) -> None:
    async def during(server: Server, pod: FakePod) -> None:
        await anyio.wait_all_tasks_blocked()
        assert server.seen == []
        pod.set_serving(True)

    server, p, _ = await run_job(
        tmp_path, ok, bodies(5), pod=FakePod(0, serving=False), during=during
    )
    assert p.succeeded == 5 and len(server.seen) == 5


async def test_restart_under_a_batch_releases_it_uncounted(tmp_path: Path) -> None:
    pod = FakePod(0)
    got_it = anyio.Event()
    restarted = anyio.Event()
    first = True

    async def handler(seen: Seen) -> Answer:
        nonlocal first
        if first:
            first = False
            got_it.set()
            await restarted.wait()
            return 503, [], b"restarting", True
        return 200, [], b"ok", False

    async def during(server: Server, pod: FakePod) -> None:
        await got_it.wait()
        pod.generation += 1
        restarted.set()

    server, p, _ = await run_job(tmp_path, handler, bodies(3), pod=pod, during=during)
    assert p.succeeded == 3 and p.failed_attempts == 0 and p.dead == 0
    assert len(server.seen) == 4


async def test_idle_connection_closed_by_the_server_is_replaced_uncounted(tmp_path: Path) -> None:
    pod = FakePod(0)
    got_first = anyio.Event()
    paused = anyio.Event()
    calls = 0

    async def handler(seen: Seen) -> Answer:
        nonlocal calls
        calls += 1
        if calls == 1:
            got_first.set()
            await paused.wait()
            # Keep-alive answer, then the server drops the idle connection anyway.
            return 200, [], b"ok", True
        return 200, [], b"ok", False

    async def during(server: Server, pod: FakePod) -> None:
        await got_first.wait()
        pod.set_serving(False)
        paused.set()
        await anyio.wait_all_tasks_blocked()  # answered, closed, and the close was seen
        pod.set_serving(True)

    server, p, _ = await run_job(tmp_path, handler, bodies(3), pod=pod, during=during)
    assert p.succeeded == 3 and p.failed_attempts == 0
    assert server.connections == 2


class ResettingServer(Server):
    """Answers each request with a keep-alive 200, then resets the connection at once.

    It runs on raw non-blocking sockets so that the answer and the reset leave with no
    checkpoint between them: the client can read the answer, and its next ``send`` on that
    connection fails (on loopback the reset has arrived by then).
    """

    async def serve(self, listener: anyio.abc.SocketListener) -> None:
        await serve_raw(listener, self._answer_then_reset)

    async def _answer_then_reset(self, sock: socket.socket) -> None:
        self.connections += 1
        number = self.connections
        try:
            got = await read_raw_request(sock)
            if got is not None:
                self.seen.append(Seen(number, got[2], got[1]))
                sock.send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        finally:
            sock.close()


async def test_reused_connection_reset_before_the_request_is_retried_uncounted(
    tmp_path: Path,
) -> None:
    """The connection was reset after its last answer: the next batch goes out again, once,
    on a fresh connection, and no attempt is counted (nothing of it reached the server)."""
    sent = bodies(5)
    server, p, _ = await run_job(tmp_path, ok, sent, server=ResettingServer(ok))
    assert p.succeeded == 5 and p.failed_attempts == 0 and p.dead == 0
    assert [s.body for s in server.seen] == sent
    assert server.connections == 5


async def test_a_slot_back_from_a_failed_attempt_sends_while_the_others_wait(
    tmp_path: Path,
) -> None:
    """The retry of a failed batch goes out at once, while the other slot's batch is still
    answered: a slot back from settling is not left idle until the next socket event."""
    b0, b1 = bodies(2)
    retried = anyio.Event()
    tries = 0

    async def handler(seen: Seen) -> Answer:
        nonlocal tries
        if seen.body == b1:
            await retried.wait()  # answered only once b0's retry arrived
            return 200, [], b"ok", False
        tries += 1
        if tries == 1:
            return 500, [], b"no", False
        retried.set()
        return 200, [], b"ok", False

    server, p, _ = await run_job(tmp_path, handler, [b0, b1], concurrency=2)
    assert (p.succeeded, p.failed_attempts, p.dead) == (2, 1, 0)
    assert sorted(s.body for s in server.seen) == [b0, b0, b1]


async def test_a_pod_that_stops_serving_stops_taking_batches(tmp_path: Path) -> None:
    """A pod that stops serving while its slots wait for the feed takes nothing more: a batch
    that comes in then (here another pod's retry) goes to a pod that serves."""
    b0, b1, b2 = bodies(3)
    failing = anyio.Event()
    finish = anyio.Event()
    retried = anyio.Event()

    async def second(seen: Seen) -> Answer:
        if seen.body == b0 and not failing.is_set():
            await failing.wait()
            return 500, [], b"no", False
        if seen.body == b0:
            retried.set()
        else:
            await finish.wait()
        return 200, [], b"ok", False

    one, two = Server(ok), Server(second)
    queue = await EmbeddedQueue.open(tmp_path / "q.sqlite3", dead_letter_root=tmp_path / "dl")
    log = Logger(io.StringIO())
    async with queue:
        await queue.create_job(JOB, "api", "digest", b"{}", "t0")
        await queue.enqueue(JOB, iter([b0, b1, b2]))
        with anyio.fail_after(20):
            async with (
                await anyio.create_tcp_listener(local_host="127.0.0.1") as l1,
                await anyio.create_tcp_listener(local_host="127.0.0.1") as l2,
                anyio.create_task_group() as tg,
            ):
                one.port = l1.extra(anyio.abc.SocketAttribute.local_port)
                two.port = l2.extra(anyio.abc.SocketAttribute.local_port)
                tg.start_soon(one.serve, l1)
                tg.start_soon(two.serve, l2)
                p1, p2 = FakePod(one.port), FakePod(two.port)
                async with queue.open_feed(JOB, max_attempts=3) as feed:
                    async with anyio.create_task_group() as job:
                        # pod 2 takes b0 (to fail) and b1 (held); pod 1 sends b2, then its
                        # two slots wait for the feed
                        job.start_soon(
                            partial(dispatch_pod, feed, p2, job_id=JOB, concurrency=2, log=log)
                        )
                        while len(two.seen) < 2:
                            await anyio.wait_all_tasks_blocked()
                        job.start_soon(
                            partial(dispatch_pod, feed, p1, job_id=JOB, concurrency=2, log=log)
                        )
                        while feed.progress().succeeded < 1:
                            await anyio.wait_all_tasks_blocked()
                        p1.set_serving(False)
                        await anyio.wait_all_tasks_blocked()
                        failing.set()  # b0's retry is ready while pod 1 is not serving
                        await retried.wait()  # pod 2 took it
                        finish.set()
                        p1.set_serving(True)  # to see that the job is done
                    progress = feed.progress()
                tg.cancel_scope.cancel()
    assert [s.body for s in one.seen] == [b2]
    assert sorted(s.body for s in two.seen) == [b0, b0, b1]
    assert (progress.succeeded, progress.failed_attempts, progress.dead) == (3, 1, 0)
