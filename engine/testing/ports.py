"""A free loopback port, for a test's or a load benchmark's own server, and such a server for a test."""

from __future__ import annotations

import contextlib
import socket
import threading
import time


def free_port() -> int:
    """A loopback port nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(app, ready_s: float = 30):
    """The service `app` (engine.serve.http.create_app) under uvicorn on a free loopback port, in a thread; yields
    its base URL ("http://127.0.0.1:PORT") once the service is ready (or `ready_s` has passed), stops it after."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + ready_s
        while not app.state.service.ready.is_set() and time.monotonic() < deadline:
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
