"""nginx as the reference reverse proxy: keep-alive upstream, one worker, all files in a temp dir.

:func:`start_nginx` writes the config under ``workdir`` (prefix, pid, error log and temp paths
all there) and runs ``nginx -g 'daemon off;'`` as a child of :class:`~bench.procs.Procs`, pinned
to the load CPU like the supervisor it is compared with.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from bench.procs import LOAD_CPU, Procs, wait_port

CONF = """\
{user}
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    client_max_body_size 1m;
    client_body_buffer_size 512k;
    keepalive_requests 1000000;
    upstream worker {{
        server 127.0.0.1:{upstream};
        keepalive 64;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{listen};
        location / {{
            proxy_pass http://worker;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"""


def nginx_path() -> str | None:
    return shutil.which("nginx") or (
        "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None
    )


def start_nginx(
    procs: Procs, *, listen: int, upstream: int, workdir: Path
) -> subprocess.Popen[bytes]:
    exe = nginx_path()
    if exe is None:
        raise RuntimeError("nginx is not installed (apt-get install -y nginx-light)")
    workdir.mkdir(parents=True, exist_ok=True)
    user = "user root;" if os.geteuid() == 0 else ""
    conf = workdir / "nginx.conf"
    conf.write_text(CONF.format(user=user, dir=workdir, upstream=upstream, listen=listen))
    argv = [
        exe,
        "-p",
        str(workdir),
        "-c",
        str(conf),
        "-e",
        str(workdir / "error.log"),
        "-g",
        "daemon off;",
    ]
    proc = procs.start(argv, cpu=LOAD_CPU)
    try:
        wait_port(listen, 10.0, proc)
    except (RuntimeError, TimeoutError) as e:
        log = (workdir / "error.log").read_text()[-300:] if (workdir / "error.log").exists() else ""
        procs.stop(proc)
        raise RuntimeError(f"nginx did not start: {e}; {log.strip()}") from None
    return proc
