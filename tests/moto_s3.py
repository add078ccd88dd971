"""An S3-compatible server on loopback for the tests: moto's S3 in a child process, torn down after.

It serves one request at a time (werkzeug's server without threads): moto checks ``If-None-Match`` / ``If-Match``
and then writes without a lock of its own, so under concurrent requests two conditional writes could both pass its
check. Serialised, each conditional write is atomic as it is on S3, and the tests exercise the registry's protocol
(what decides between publishers), not moto's thread safety. See docs/deploy.md for what this does not prove.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import subprocess
import sys
import time
from collections.abc import Iterator

_SERVER = """
from werkzeug.serving import make_server
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app

server = make_server(
    "127.0.0.1", 0, DomainDispatcherApplication(create_backend_app), threaded=False, request_handler=MotoRequestHandler
)
print(server.server_address[1], flush=True)
server.serve_forever()
"""

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@contextlib.contextmanager
def moto_s3_server(start_timeout_s: float = 30.0) -> Iterator[str]:
    """Start moto's S3 on 127.0.0.1 on a free port and yield its endpoint URL; stop it on exit."""
    env = {**os.environ, **CREDENTIALS}
    process = subprocess.Popen(
        [sys.executable, "-c", _SERVER], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env
    )
    try:
        assert process.stdout is not None
        selector = selectors.DefaultSelector()
        selector.register(process.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + start_timeout_s
        line = ""
        while not line:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or process.poll() is not None:
                raise RuntimeError(f"moto's S3 server did not start within {start_timeout_s:g}s")
            if selector.select(timeout=remaining):
                line = process.stdout.readline()
        yield f"http://127.0.0.1:{int(line)}"
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
