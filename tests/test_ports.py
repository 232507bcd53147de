"""supervisor.ports: who owns a port, read from /proc, with real listeners."""

from __future__ import annotations

import os
import signal
import socket
import sys
import textwrap
from collections.abc import Callable

import anyio
import pytest

from supervisor.errors import PortOwnerError
from supervisor.ports import PortOwner, find_port_owner, listening_inodes, pids_with_socket
from supervisor.process import open_child
from supervisor.proctable import describe_pid, process_tree, read_stat

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(not os.path.exists("/proc/net/tcp"), reason="needs Linux /proc"),
]

ENV = dict(os.environ)

# A listener: binds 127.0.0.1 (port from argv, 0 = any), prints the port, waits to be killed.
LISTEN = """
    import socket, sys, time
    s = socket.socket()
    if len(sys.argv) > 2:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("127.0.0.1", int(sys.argv[1])))
    s.listen()
    print(s.getsockname()[1])
    time.sleep(60)
"""


def listener(port: int = 0, *, reuse: bool = False) -> list[str]:
    argv = [sys.executable, "-u", "-c", textwrap.dedent(LISTEN), str(port)]
    return [*argv, "reuse"] if reuse else argv


class FirstLine:
    """``on_line`` callback: the first stdout line, awaitable."""

    def __init__(self) -> None:
        self.line: str | None = None
        self._event: anyio.Event | None = None

    def __call__(self, stream: str, line: str) -> None:
        if stream == "stdout" and self.line is None:
            self.line = line
            if self._event is not None:
                self._event.set()

    async def get(self) -> str:
        with anyio.fail_after(10):
            if self.line is None:
                self._event = anyio.Event()
                await self._event.wait()
        assert self.line is not None
        return self.line


async def poll(cond: Callable[[], bool]) -> None:
    with anyio.fail_after(10):
        while not cond():  # noqa: ASYNC110 -- /proc offers nothing to await
            await anyio.sleep(0.01)


@pytest.mark.anyio
async def test_a_listening_container_is_the_owner() -> None:
    first = FirstLine()
    async with (
        open_child("sidecar", [sys.executable, "-c", "import time; time.sleep(60)"], ENV) as side,
        open_child("api", listener(), ENV, on_line=first) as api,
    ):
        port = int(await first.get())
        assert listening_inodes(port)
        assert pids_with_socket(listening_inodes(port)) == {api.pid}
        owner = find_port_owner(port, {"sidecar": side.pid, "api": api.pid})
        assert owner == PortOwner(container="api", pid=api.pid, cmdline=describe_pid(api.pid))
        assert owner.cmdline.startswith(sys.executable)
        assert "socket.socket()" in owner.cmdline


@pytest.mark.anyio
async def test_nothing_listening_is_none() -> None:
    with socket.socket() as s:  # bound but not listening: holds the port, no listener
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        assert listening_inodes(port) == set()
        assert find_port_owner(port, {"api": os.getpid()}) is None


@pytest.mark.anyio
async def test_port_held_by_the_supervisor_itself() -> None:
    first = FirstLine()
    code = "print('up'); import time; time.sleep(60)"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        async with open_child("api", [sys.executable, "-u", "-c", code], ENV, on_line=first) as c:
            await first.get()
            with pytest.raises(PortOwnerError, match=rf"^port {port} is held by this supervisor"):
                find_port_owner(port, {"api": c.pid})


@pytest.mark.anyio
async def test_port_held_by_a_stranger() -> None:
    first = FirstLine()
    async with (
        open_child("api", [sys.executable, "-c", "import time; time.sleep(60)"], ENV) as api,
        open_child("not-a-container", listener(), ENV, on_line=first) as stranger,
    ):
        port = int(await first.get())
        with pytest.raises(PortOwnerError) as info:
            find_port_owner(port, {"api": api.pid})
        message = str(info.value)
        assert message.startswith(f"port {port} is held by pid {stranger.pid} (`{sys.executable}")
        assert message.endswith("), which is not a container of this pod")
        assert info.value.status == "worker_error"


@pytest.mark.anyio
async def test_two_containers_on_one_port() -> None:
    first_a, first_b = FirstLine(), FirstLine()
    async with open_child("a", listener(reuse=True), ENV, on_line=first_a) as a:
        port = int(await first_a.get())
        async with open_child("b", listener(port, reuse=True), ENV, on_line=first_b) as b:
            assert int(await first_b.get()) == port
            assert len(listening_inodes(port)) == 2
            with pytest.raises(PortOwnerError, match=rf"^port {port} is claimed by 2 containers"):
                find_port_owner(port, {"a": a.pid, "b": b.pid})
            # Each alone would be fine; the other one is then a stranger.
            with pytest.raises(PortOwnerError, match=f"held by pid {b.pid} "):
                find_port_owner(port, {"a": a.pid})


@pytest.mark.anyio
@pytest.mark.usefixtures("subreaper")
async def test_workers_of_a_preforking_server_share_the_socket() -> None:
    # The master listens, then forks two workers that inherit the socket: one owner, the master.
    code = """
        import os, socket, time
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen()
        for _ in range(2):
            if os.fork() == 0:
                time.sleep(60)
                os._exit(0)
        print(s.getsockname()[1])
        time.sleep(60)
    """
    first = FirstLine()
    async with open_child(
        "api", [sys.executable, "-u", "-c", textwrap.dedent(code)], ENV, on_line=first
    ) as api:
        port = int(await first.get())
        await poll(lambda: len(pids_with_socket(listening_inodes(port))) == 3)
        assert process_tree(api.pid) == pids_with_socket(listening_inodes(port))
        owner = find_port_owner(port, {"api": api.pid})
        assert owner is not None
        assert (owner.container, owner.pid) == ("api", api.pid)


@pytest.mark.anyio
@pytest.mark.usefixtures("subreaper")
async def test_a_daemonised_listener_still_counts() -> None:
    # The container's main process forks a listener and exits: the listener is reparented
    # away, but it is still in the container's session.
    code = """
        import os, socket, time
        r, w = os.pipe()
        if os.fork() == 0:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            s.listen()
            print(os.getpid(), s.getsockname()[1], flush=True)
            os.write(w, b"x")
            time.sleep(60)
            os._exit(0)
        os.read(r, 1)
    """
    first = FirstLine()
    daemon = 0
    try:
        async with open_child(
            "api", [sys.executable, "-u", "-c", textwrap.dedent(code)], ENV, on_line=first
        ) as api:
            daemon, port = map(int, (await first.get()).split())

            def leader_gone() -> bool:
                st = read_stat(api.pid)
                return st is None or st.state == "Z"

            await poll(leader_gone)
            daemon_stat = read_stat(daemon)
            assert daemon_stat is not None
            assert daemon_stat.ppid != api.pid  # reparented
            assert daemon_stat.session == api.pid
            owner = find_port_owner(port, {"api": api.pid})
            assert owner is not None
            assert (owner.container, owner.pid) == ("api", daemon)
        # the leader is gone, but leaving the context killed the rest of its process group
        await poll(lambda: (st := read_stat(daemon)) is None or st.state == "Z")
        daemon = 0
    finally:
        if daemon:
            os.kill(daemon, signal.SIGKILL)


def test_no_inodes_no_holders() -> None:
    assert pids_with_socket(set()) == set()
