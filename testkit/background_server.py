"""The server in a background thread of the current process: what tests and benchmarks drive."""

from __future__ import annotations

import threading

from serve.app import create_app, server_config
from serve.settings import ServeSettings
from testkit.ports import free_port
from testkit.waiting import wait_for


class BackgroundServer:
    """uvicorn on a free 127.0.0.1 port; `with BackgroundServer(settings) as server: server.url`."""

    def __init__(self, settings: ServeSettings, *, start_timeout_s: float = 300):
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.start_timeout_s = start_timeout_s  # a real --model may take a while to load
        self.app = create_app(settings)
        local = settings.model_copy(update={"host": "127.0.0.1"})
        self.server = uvicorn.Server(server_config(local, self.app, log_level="warning", port=self.port))
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)

    def __enter__(self):
        self.thread.start()

        def started() -> bool:
            if self.server.started:
                return True
            assert self.thread.is_alive(), "the background server's thread ended before the server started"
            return False

        wait_for(started, what="the background server to start", timeout_s=self.start_timeout_s, interval_s=0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)

    @property
    def state(self):
        """The app's ServeState (engine, registry, bus, …)."""
        return self.app.state.serve
