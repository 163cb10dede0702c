"""Run the proxy on a free port inside the current process, for tests and embedding (`pilotfleet serve`)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import uvicorn
import uvloop

from pilotfleet_proxy.app import create_app
from pilotfleet_proxy.settings import ProxySettings


class ProxyServer:
    """A real uvicorn server running the proxy app on 127.0.0.1, a port of its own, in a background thread."""

    def __init__(self, settings: ProxySettings) -> None:
        self.settings = settings
        self.app = create_app(settings)
        # IPPROTO_TCP spelled out: asyncio only sets TCP_NODELAY on sockets whose proto says TCP, and
        # without it small responses wait 40 ms for delayed ACKs.
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        # Binding here (port 0) and handing uvicorn the socket leaves no window for another process.
        self._sock.bind((settings.host, settings.port))
        self.port = int(self._sock.getsockname()[1])
        config = uvicorn.Config(self.app, log_config=None, access_log=False, lifespan="on")
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._serve, name=f"proxy-{self.port}", daemon=True)
        self._error: BaseException | None = None

    @classmethod
    def start(cls, routes_file: Path, timeout: float = 30.0, **settings: Any) -> ProxyServer:
        """Start a proxy watching `routes_file` (other ProxySettings as keywords); return once it serves."""
        server = cls(ProxySettings(routes_file=routes_file, host="127.0.0.1", port=0, **settings))
        server._thread.start()
        deadline = time.monotonic() + timeout
        while not server.server.started:
            if not server._thread.is_alive() or time.monotonic() > deadline:
                server.stop()
                raise RuntimeError(f"proxy did not start within {timeout:.0f}s: {server._error!r}")
            time.sleep(0.01)
        return server

    def _serve(self) -> None:
        try:
            # uvloop, as `uvicorn.run` picks it in production: tests see the same event loop.
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                runner.run(self.server.serve(sockets=[self._sock]))
        except BaseException as exc:
            self._error = exc
            raise

    @property
    def url(self) -> str:
        """Base URL, e.g. http://127.0.0.1:PORT."""
        return f"http://127.0.0.1:{self.port}"

    def stop(self, timeout: float = 30.0) -> None:
        """Shut the server down (its lifespan closes the Triton clients) and close the socket."""
        self.server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout)
        self._sock.close()

    def __enter__(self) -> ProxyServer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
