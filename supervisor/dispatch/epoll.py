"""The dispatch engine: every slot of a pod on one edge-triggered epoll set, one task.

Theory of operation
-------------------
One task owns the pod's ``--concurrency`` non-blocking connections, registered once
(``EPOLLIN | EPOLLOUT | EPOLLRDHUP``, edge-triggered) in a private epoll set, and waits for
*the epoll fd itself* to become readable: :func:`anyio.wait_readable` works on it with asyncio,
uvloop and trio alike. One wake handles every connection that has news -- read, hand the bytes
to the connection's sans-IO :class:`~supervisor.http.connection.ClientConnection`, ack, take
the next batch with :meth:`Feed.receive_nowait` and send it -- so a busy pod costs one loop
round trip per *wake*, not per batch, and nothing is spawned per batch. Bodies over 16 KiB go
out with ``sendmsg([head, body])``, never copied into one buffer.

The connection rules are :class:`ClientConnection`'s, this loop only carries them out: one
keep-alive connection per slot; a connection that sat idle across a wait is checked
(:func:`~supervisor.http.connection.idle_socket_alive`) before reuse, and one the server
closes while idle is dropped when epoll reports it; a request is retried once on a fresh
connection only when ``send_failed()`` says so; a connection that is not ``reusable`` after
its exchange (not keep-alive, stray bytes, the server closed, an error, a timeout) is closed.

Waiting for anything but sockets is rare (start, the job's tail, retries, a pod that stopped
serving, a failed attempt being settled): only then the epoll fd is raced, in a small task
group, against the feed, the pod's readiness or the settling failure. A failed attempt is
settled (:mod:`supervisor.dispatch.settle`) in a task of its own while its slot sits out.

A pod that is not serving does not ask the feed for batches (a feed that is not asked reads
nothing ahead, see :class:`~supervisor.queues.base.Feed`): a wait for the feed ends when the
pod stops serving, and a batch such a wait took is released at once, for another pod or for
this one when it serves again.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import time
from collections.abc import Callable, Coroutine
from functools import partial
from typing import Any

import anyio
import anyio.abc

from supervisor.dispatch.settle import Fate, Target, attempt_fate, settle_failure
from supervisor.http.client import post_head_prefix
from supervisor.http.connection import ClientConnection, idle_socket_alive
from supervisor.http.errors import RemoteProtocolError
from supervisor.http.response import KEEP_BODY, Response
from supervisor.logs import Logger
from supervisor.queues.base import Delivery, Feed

__all__ = ["dispatch_epoll"]

_HOST = "127.0.0.1"
_MASK = select.EPOLLIN | select.EPOLLOUT | select.EPOLLRDHUP | select.EPOLLET
_IN = select.EPOLLIN | select.EPOLLERR | select.EPOLLHUP | select.EPOLLRDHUP
_OUT = select.EPOLLOUT | select.EPOLLERR | select.EPOLLHUP
# The peer closed (or broke) its side: the bytes already queued are all that will come.
_ENDED = select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR
_RECV = 65536


class _Slot:
    """One slot: its socket, the connection's protocol state, and the batch it carries."""

    __slots__ = (
        "conn",
        "connecting",
        "deadline",
        "delivery",
        "fd",
        "generation",
        "log",
        "out",
        "sock",
        "t0",
    )

    def __init__(self, log: Logger) -> None:
        self.log = log
        self.sock: socket.socket | None = None
        self.fd = -1
        self.conn: ClientConnection | None = None  # with sock: None when there is no connection
        self.connecting = False  # the TCP handshake is under way (a socket matter, not HTTP)
        self.delivery: Delivery | None = None
        self.out: list[bytes | memoryview] = []
        self.generation = 0
        self.t0 = 0.0
        self.deadline = 0.0


async def dispatch_epoll(
    feed: Feed,
    target: Target,
    *,
    headers: list[tuple[str, str]],
    concurrency: int,
    batch_timeout: float | None,
    log: Logger,
) -> None:
    """Send batches to ``target`` over ``concurrency`` connections until the feed has no
    more work (see the module docstring)."""
    engine = _Engine(feed, target, headers, concurrency, batch_timeout, log)
    await engine.run()


class _Engine:
    def __init__(
        self,
        feed: Feed,
        target: Target,
        headers: list[tuple[str, str]],
        concurrency: int,
        batch_timeout: float | None,
        log: Logger,
    ) -> None:
        self._feed = feed
        self._target = target
        self._port = target.port
        self._prefix = post_head_prefix(_HOST, target.port, "/", headers)
        self._timeout = batch_timeout
        self._slots = [_Slot(log.bind(slot=i)) for i in range(concurrency)]
        self._idle = list(reversed(self._slots))  # popped from the end: slot 0 first
        self._by_fd: dict[int, _Slot] = {}
        self._busy = 0
        self._settling = 0
        self._done = False  # the feed said there is no more work (or it was closed)
        self._stash: list[Delivery | None] = []  # taken by a wait that raced the feed
        self._tick = 0  # counts waits, to tell a connection that sat idle across one
        self._epoll = select.epoll()
        self._wakeup: anyio.Event | None = None  # set when a settled slot comes back
        self._settled = 0  # slots back from settling, so far ...
        self._settled_seen = 0  # ... as of the last wait (a slot back since then: no waiting)
        self._tg: anyio.abc.TaskGroup | None = None

    async def run(self) -> None:
        epoll = self._epoll
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                await self._loop()
        finally:
            for slot in self._slots:
                self._drop(slot)
            anyio.notify_closing(epoll.fileno())
            epoll.close()

    async def _loop(self) -> None:
        target = self._target
        while True:
            if self._stash and not target.serving:
                self._release_stash()
            if self._idle and not self._done and target.serving:
                self._fill()
            if not self._busy and not self._settling and self._done:
                return
            await self._wait()
            self._tick += 1
            if self._busy:
                self._handle_events()
                if self._timeout is not None:
                    self._expire()

    # -- waiting --------------------------------------------------------------------------

    async def _wait(self) -> None:
        self._settled_seen = self._settled  # no checkpoint since _fill looked at the slots
        wants_feed = bool(self._idle) and not self._done
        if self._timeout is None and self._busy and not wants_feed and not self._settling:
            await anyio.wait_readable(self._epoll.fileno())  # the hot path
            return
        waiters: list[Callable[[anyio.CancelScope | None], Coroutine[Any, Any, None]]] = []
        if self._busy:
            waiters.append(self._wait_sockets)
        if wants_feed:
            if self._target.serving:  # and stop asking if the pod stops serving
                waiters.append(self._wait_feed)
                waiters.append(self._wait_not_serving)
            else:  # a pod that is not ready: wait for it, or for the feed to be closed
                waiters.append(self._wait_serving)
                waiters.append(self._wait_closed)
        if self._settling:
            waiters.append(self._wait_settled)
        delay = float("inf")
        if self._timeout is not None and self._busy:
            now = anyio.current_time()
            delay = min((s.deadline for s in self._slots if s.delivery is not None), default=now)
            delay = max(0.0, delay - now)
        with anyio.move_on_after(delay):
            if len(waiters) == 1:
                await waiters[0](None)
            else:
                async with anyio.create_task_group() as tg:
                    for waiter in waiters:
                        tg.start_soon(waiter, tg.cancel_scope)

    # Each waiter returns when its thing happened; raced, it ends the race.

    async def _wait_sockets(self, race: anyio.CancelScope | None) -> None:
        await anyio.wait_readable(self._epoll.fileno())
        if race is not None:
            race.cancel()

    async def _wait_feed(self, race: anyio.CancelScope | None) -> None:
        d = await self._feed.receive()
        self._stash.append(d)  # no checkpoint between receiving and keeping it
        if race is not None:
            race.cancel()

    async def _wait_serving(self, race: anyio.CancelScope | None) -> None:
        await self._target.wait_serving()
        if race is not None:
            race.cancel()

    async def _wait_not_serving(self, race: anyio.CancelScope | None) -> None:
        await self._target.wait_serving(False)
        if race is not None:
            race.cancel()

    async def _wait_closed(self, race: anyio.CancelScope | None) -> None:
        await self._feed.wait_closed()
        self._done = True  # nothing more will be taken; what was taken goes back
        self._release_stash()
        if race is not None:
            race.cancel()

    def _release_stash(self) -> None:
        """Give back what a wait took from the feed and no slot sent (the pod stopped serving,
        or the feed closed): the feed hands it out again, here or to another pod."""
        feed = self._feed
        for d in self._stash:
            if d is None:
                self._done = True
            else:
                feed.release(d)
        self._stash.clear()

    async def _wait_settled(self, race: anyio.CancelScope | None) -> None:
        # A settle may end before this waiter first runs (the settling task was started
        # first): then its slot is back already and there is nothing to wait for.
        while self._settled == self._settled_seen:
            wakeup = self._wakeup
            if wakeup is None:
                wakeup = self._wakeup = anyio.Event()
            await wakeup.wait()
        if race is not None:
            race.cancel()

    # -- taking batches -------------------------------------------------------------------

    def _fill(self) -> None:
        idle = self._idle
        stash = self._stash
        receive = self._feed.receive_nowait
        while idle:
            if stash:
                d = stash.pop()
            else:
                try:
                    d = receive()
                except anyio.WouldBlock:
                    return
            if d is None:
                self._done = True
                return
            self._start(idle.pop(), d)

    def _start(self, slot: _Slot, d: Delivery) -> None:
        slot.delivery = d
        slot.generation = self._target.generation
        slot.t0 = time.perf_counter()
        if self._timeout is not None:
            slot.deadline = anyio.current_time() + self._timeout
        self._busy += 1
        conn = slot.conn
        if conn is not None and conn.needs_check(self._tick):
            assert slot.sock is not None
            if not idle_socket_alive(slot.sock):
                self._drop(slot)  # the server closed it (or sent stray bytes) while it was idle
        self._send(slot)

    def _send(self, slot: _Slot) -> None:
        """Put the slot's batch on its connection (a new one if it has none)."""
        if slot.conn is None and not self._connect(slot):
            return
        conn = slot.conn
        assert conn is not None and slot.delivery is not None
        slot.out = list(conn.start_post(self._prefix, slot.delivery.body))
        if not slot.connecting:
            self._write(slot)

    # -- connections ----------------------------------------------------------------------

    def _connect(self, slot: _Slot) -> bool:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        code = sock.connect_ex((_HOST, self._port))
        if code not in (0, errno.EINPROGRESS, errno.EAGAIN):
            sock.close()
            self._failed(slot, self._connect_error(code))
            return False
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        slot.sock = sock
        slot.fd = fd = sock.fileno()
        slot.connecting = code != 0
        slot.conn = ClientConnection(keep_body=KEEP_BODY)
        self._by_fd[fd] = slot
        self._epoll.register(fd, _MASK)
        return True

    def _connect_error(self, code: int) -> str:
        return f"Could not connect to {_HOST}:{self._port}: {os.strerror(code)}."

    def _drop(self, slot: _Slot) -> None:
        sock = slot.sock
        if sock is not None:
            slot.sock = None
            del self._by_fd[slot.fd]
            slot.fd = -1
            sock.close()  # also leaves the epoll set
        if slot.conn is not None:
            slot.conn.close()
            slot.conn = None
        slot.connecting = False

    # -- events ---------------------------------------------------------------------------

    def _handle_events(self) -> None:
        by_fd = self._by_fd
        for fd, events in self._epoll.poll(0):
            slot = by_fd.get(fd)
            if slot is None:
                continue
            if slot.delivery is None:  # idle: the server closed it (or sent stray bytes)
                if events & _IN:
                    self._drop(slot)
                continue
            sock = slot.sock
            if slot.connecting:
                if not events & _OUT:
                    continue
                assert sock is not None
                code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if code:
                    self._drop(slot)
                    self._failed(slot, self._connect_error(code))
                    continue
                slot.connecting = False
                self._write(slot)
            elif slot.out and events & _OUT:
                self._write(slot)
            # (A failed write may have moved the request to a new connection: these events
            # are the old one's.)
            if events & _IN and slot.delivery is not None and slot.sock is sock:
                self._read(slot, events & _ENDED)

    def _write(self, slot: _Slot) -> None:
        sock = slot.sock
        assert sock is not None
        out = slot.out
        try:
            sent = sock.send(out[0]) if len(out) == 1 else sock.sendmsg(out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            conn = slot.conn
            assert conn is not None
            retry = conn.send_failed()
            self._drop(slot)
            if retry:
                # The server closed the reused connection before the request arrived: once,
                # on a fresh connection (nothing of it was acted upon).
                self._send(slot)
                return
            self._failed(slot, "The connection broke while sending the request.")
            return
        while sent:
            first = out[0]
            if sent >= len(first):
                sent -= len(first)
                del out[0]
            else:
                out[0] = memoryview(first)[sent:]
                break
        if not out:
            conn = slot.conn
            assert conn is not None
            conn.request_sent()
        # Whatever is left goes out on the next EPOLLOUT edge.

    def _read(self, slot: _Slot, ended: int) -> None:
        """Read what the wake-up announced and parse it.

        Edge-triggered epoll reports news once: a short ``recv`` has emptied the socket, and
        bytes that arrive later raise a new edge -- but a close that came with (or before) the
        bytes of this wake-up raises none. So when the wake-up reports the peer's side ended
        (``ended``), read on to the end of the stream: that is what completes a close-delimited
        body (HTTP/1.0 without ``Content-Length``), and it keeps a connection the server
        closed from being reused. Otherwise a short read ends the loop, so a keep-alive
        answer costs one ``recv``.
        """
        sock = slot.sock
        conn = slot.conn
        assert sock is not None and conn is not None
        if ended:
            conn.peer_closing()
        while True:
            try:
                data = sock.recv(_RECV)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._drop(slot)
                self._failed(slot, "The connection broke while reading the response.")
                return
            try:
                response = conn.receive(data)
            except RemoteProtocolError as exc:
                self._drop(slot)
                self._failed(slot, str(exc))
                return
            if response is not None:
                self._complete(slot, response)
                return
            if not data or (len(data) < _RECV and not ended):
                return

    def _expire(self) -> None:
        now = anyio.current_time()
        for slot in self._slots:
            if slot.delivery is not None and slot.deadline <= now:
                self._drop(slot)  # an interrupted exchange leaves the connection unusable
                self._failed(slot, f"timed out after {self._timeout:g}s")

    # -- outcomes -------------------------------------------------------------------------

    def _complete(self, slot: _Slot, response: Response) -> None:
        """``response`` ended the exchange on ``slot``; its connection stays if reusable."""
        d = slot.delivery
        assert d is not None
        slot.delivery = None
        self._busy -= 1
        conn = slot.conn
        assert conn is not None
        if not conn.reusable:
            self._drop(slot)
        slot.out = []
        fate = attempt_fate(
            response.status, generation=slot.generation, generation_now=self._target.generation
        )
        if fate is Fate.ACK:
            self._feed.ack(d, time.perf_counter() - slot.t0)
            if slot.conn is not None:
                slot.conn.idle_since = self._tick
            self._idle.append(slot)
        else:
            self._settle(slot, d, response.status, None, response.body_head)

    def _failed(self, slot: _Slot, error: str) -> None:
        """The attempt on ``slot`` failed without a response (its connection is dropped)."""
        d = slot.delivery
        assert d is not None
        slot.delivery = None
        slot.out = []
        self._busy -= 1
        self._settle(slot, d, None, error, b"")

    def _settle(
        self, slot: _Slot, d: Delivery, status: int | None, error: str | None, head: bytes
    ) -> None:
        self._settling += 1
        assert self._tg is not None
        self._tg.start_soon(partial(self._settle_then_return, slot, d, status, error, head))

    async def _settle_then_return(
        self, slot: _Slot, d: Delivery, status: int | None, error: str | None, head: bytes
    ) -> None:
        try:
            await settle_failure(
                self._feed,
                self._target,
                d,
                generation=slot.generation,
                status=status,
                error=error,
                head=head,
                log=slot.log,
            )
        finally:
            self._settling -= 1
            if slot.conn is not None:
                slot.conn.idle_since = -1
            self._idle.append(slot)
            self._settled += 1
            wakeup, self._wakeup = self._wakeup, None
            if wakeup is not None:
                wakeup.set()
