"""nginx as a test or benchmark server: one process, every file in a directory of its own.

Where a real HTTP server that is not ours matters (the pod's server, a front proxy, the local
program): tests/test_steal_clients.py, tests/test_mirror_slow.py, scripts/bench_httpsteal.py,
scripts/bench_mirror.py. Nothing is written outside `directory`, so a test's cleanup is its
directory's.
"""
from __future__ import annotations

import os

_CONF = """daemon off;
master_process off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
{main}
events {{ worker_connections {connections}; }}
http {{
    access_log {access};
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    {http}
    server {{
        listen {listen};
        location / {{ {location} }}
    }}
}}
"""
ACCESS_LOG = "access.log"


def configure(directory: str, listen: str, location: str, *, connections: int = 256,
              access_log: bool = False, main: str = "", http: str = "") -> list[str]:
    """Write `directory`/nginx.conf for one server (`listen` and the `location /` block's body,
    with `main` and `http` lines added to those contexts) and return the argv that runs it
    in the foreground. With `access_log`, requests are logged to `directory`/ACCESS_LOG."""
    conf = os.path.join(directory, "nginx.conf")
    with open(conf, "w") as f:
        f.write(_CONF.format(dir=directory, main=main, connections=connections, http=http, listen=listen,
                             location=location,
                             access=os.path.join(directory, ACCESS_LOG) if access_log else "off"))
    # -e: the error log from the start, before nginx reads its configuration (else /var/log/nginx).
    return ["nginx", "-p", directory, "-c", conf, "-e", os.path.join(directory, "error.log")]
