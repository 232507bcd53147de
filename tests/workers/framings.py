"""A test worker with one port per way of framing an HTTP response (tests/test_framing.py).

Once every port listens it prints one JSON line, ``{"<framing>": port, ...}``, then serves
until its stdin closes. Every answer to ``POST`` and ``GET`` is framed the port's way; its
status is the ``"status"`` of the first item of a JSON list body (``200`` otherwise).
``GET /stats`` (always ``Content-Length``, then close) answers ``{"posts": n, "connections":
c}`` -- the POSTs since the last ``/stats`` and how many connections carried them -- and
resets both.

The framings (see ``answer``):

  length              HTTP/1.1, Content-Length, keep-alive
  chunked             HTTP/1.1, chunked in two chunks with extensions, then trailers
  interim             ``100 Continue`` (sent on its own), then a Content-Length answer
  no_content          HTTP/1.1 204, no body, keep-alive (whatever status was asked for)
  close_delimited     HTTP/1.1, no length: the body ends when the connection closes
  http10_stdlib       ``http.server`` with its default protocol_version: HTTP/1.0, no length
  http10_length       HTTP/1.0 with Content-Length and no keep-alive, then close
  connection_close    HTTP/1.1, Content-Length and ``Connection: close``, then close
  length_then_close   HTTP/1.1, Content-Length, keep-alive announced, then close anyway

The raw framings that close send their last bytes and the FIN in one segment (``TCP_CORK``
then ``shutdown``), so the client reads them in one wake-up, every time.
"""

from __future__ import annotations

import json
import socket
import socketserver
import sys
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_CLOSE = {"close_delimited", "http10_length", "connection_close", "length_then_close"}
RAW = ("length", "chunked", "interim", "no_content", *sorted(_CLOSE))


class Counts:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.posts = 0
        self.connections = 0

    def post(self, first_on_connection: bool) -> None:
        with self.lock:
            self.posts += 1
            self.connections += first_on_connection

    def take(self) -> bytes:
        with self.lock:
            out = {"posts": self.posts, "connections": self.connections}
            self.posts = self.connections = 0
        return json.dumps(out).encode()


def status_of(body: bytes) -> int:
    try:
        items = json.loads(body)
        return int(items[0].get("status", 200))
    except (ValueError, TypeError, IndexError, AttributeError, KeyError):
        return 200


def answer(framing: str, status: int, body: bytes) -> list[bytes]:
    """The pieces of the answer, each sent with its own ``send``."""
    if framing == "no_content":
        return [b"HTTP/1.1 204 No Content\r\nServer: framings\r\n\r\n"]
    reason = HTTPStatus(status).phrase.encode()
    line = b"HTTP/1.1 %d %b\r\n" % (status, reason)
    length = b"Content-Length: %d\r\n" % len(body)
    if framing == "length":
        return [line + length + b"\r\n" + body]
    if framing == "chunked":
        half = len(body) // 2
        return [
            line + b"Transfer-Encoding: chunked\r\n\r\n",
            b"%x;name=value\r\n%b\r\n" % (half, body[:half]),
            b'%x; quoted="a;b"\r\n%b\r\n' % (len(body) - half, body[half:]),
            b"0\r\nX-Checksum: 1234\r\nX-Other: two\r\n\r\n",
        ]
    if framing == "interim":
        return [b"HTTP/1.1 100 Continue\r\n\r\n", line + length + b"\r\n" + body]
    if framing == "close_delimited":
        return [line + b"Content-Type: application/json\r\n\r\n" + body]
    if framing == "http10_length":
        return [b"HTTP/1.0 %d %b\r\n" % (status, reason) + length + b"\r\n" + body]
    if framing == "connection_close":
        return [line + b"Connection: close\r\n" + length + b"\r\n" + body]
    assert framing == "length_then_close", framing
    return [line + length + b"\r\n" + body]


def read_request(reader: Any) -> tuple[bytes, bytes, bytes] | None:
    """``(method, target, body)`` of the next request, or ``None`` at end of stream."""
    line = reader.readline()
    if not line:
        return None
    method, target, _ = line.split(b" ", 2)
    length = 0
    while True:
        field = reader.readline()
        if field in (b"\r\n", b"\n", b""):
            break
        name, _, value = field.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return method, target, reader.read(length)


class RawHandler(socketserver.BaseRequestHandler):
    framing = ""
    counts = Counts()

    def handle(self) -> None:
        sock: socket.socket = self.request
        reader = sock.makefile("rb")
        first = True
        while True:
            got = read_request(reader)
            if got is None:
                return
            method, target, body = got
            if method == b"GET" and target == b"/stats":
                stats = self.counts.take()
                sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(stats) + stats)
                return
            if method == b"POST":
                self.counts.post(first)
                first = False
            status = status_of(body) if method == b"POST" else 200
            reply = b'{"echo": %d}' % len(body)
            pieces = answer(self.framing, status, reply)
            closing = self.framing in _CLOSE
            if closing:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
            for piece in pieces:
                sock.sendall(piece)
            if closing:
                sock.shutdown(socket.SHUT_WR)  # the FIN leaves with the corked answer
                return


class StdlibHandler(BaseHTTPRequestHandler):
    """What a worker written with ``http.server`` answers (protocol_version left HTTP/1.0)."""

    counts = Counts()

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.counts.post(True)  # HTTP/1.0 without keep-alive: one request per connection
        self.send_response(status_of(body))
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"echo": %d}' % len(body))

    def do_GET(self) -> None:
        payload = self.counts.take() if self.path == "/stats" else b"ok"
        self.send_response(200)
        if self.path == "/stats":
            self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class RawServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


def main() -> None:
    servers: dict[str, socketserver.TCPServer] = {}
    for framing in RAW:
        handler = type(f"Raw_{framing}", (RawHandler,), {"framing": framing, "counts": Counts()})
        servers[framing] = RawServer(("127.0.0.1", 0), handler)
    stdlib = type("Stdlib", (StdlibHandler,), {"counts": Counts()})
    servers["http10_stdlib"] = ThreadingHTTPServer(("127.0.0.1", 0), stdlib)
    for server in servers.values():
        threading.Thread(target=server.serve_forever, daemon=True).start()
    ports = {name: server.server_address[1] for name, server in servers.items()}
    print(json.dumps(ports), flush=True)
    sys.stdin.read()  # until the test closes our stdin (or dies)


if __name__ == "__main__":
    main()
