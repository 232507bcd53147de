"""HTTP/1.1 over anyio: sans-IO parsing apart from the I/O loops.

* ``response`` -- the fast sans-IO response parser (``ResponseParser``, ``Response``);
* ``connection`` -- ``ClientConnection``, one client connection's protocol state (sans-IO);
* ``client`` -- ``exchange()`` (the anyio loop driving it) and ``request()``;
* ``request`` -- the fast sans-IO request parser (``RequestParser``, ``Request``);
* ``server`` -- the server (``serve``, ``start_server``, ``Request``, ``Response``);
* ``_timeouts`` -- when a client connection waited too long (``Timeouts``, ``overdue``);
* ``_rawsock`` -- non-blocking sockets driven with ``anyio.wait_readable``/``wait_writable``;
* ``proxy`` -- ``ProxyApp``, the front of ``supervisor proxy``: what is forwarded, where;
* ``relay`` -- the proxy's forwarding core (``serve_relay``, ``start_relay``; Linux epoll);
* ``_forward`` -- the proxy's header rules (the upstream head, the re-framed answer);
* ``errors`` -- the exception family (``HTTPError`` and its subclasses).

Import from the modules: ``response.Response`` (what a client reads) and ``server.Response``
(what a handler returns) are different types.
"""

from __future__ import annotations
