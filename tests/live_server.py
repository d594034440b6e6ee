"""An ASGI app served by a real uvicorn on 127.0.0.1 in a thread, for tests that need real HTTP."""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator

import uvicorn

START_DEADLINE_S = 10.0


@contextmanager
def serve_in_thread(app, graceful_timeout: int | None = 1,
                    before_stop: Callable[[], None] | None = None) -> Iterator[str]:
    """Yield the base URL while uvicorn serves `app`; stop it (bounded) afterwards."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                           lifespan="off", timeout_graceful_shutdown=graceful_timeout))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + START_DEADLINE_S
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        if before_stop is not None:
            before_stop()
        server.should_exit = True
        thread.join(START_DEADLINE_S)
