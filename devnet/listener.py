"""A Hypercorn server on loopback that can stop listening and later come back on the same port.

The port is held by a bound, non-listening socket for the listener's whole life, so while the server is
down a connection is refused (nobody listens) and nobody else can take the port; the serving socket
shares the port through SO_REUSEPORT.
"""

from __future__ import annotations

import logging
import socket
from functools import partial

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve
from quart_trio import QuartTrio

log = logging.getLogger("sn1_gateway.devnet")


def _bound_socket(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


class Listener:
    """Serves `app` on `host:port` (0 picks a free port) until cancelled; `go_down` / `come_up` at run time."""

    def __init__(self, app: QuartTrio, *, host: str = "127.0.0.1", port: int = 0, name: str = "devnet") -> None:
        self.app = app
        self.host = host
        self.port = port
        self.name = name
        self.listening = False
        self._want_up = True
        self._want_changed = trio.Event()
        self._state_changed = trio.Event()

    @property
    def address(self) -> str:
        """ "host:port", as an axon is written."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    async def run(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        holder = _bound_socket(self.host, self.port)
        self.port = holder.getsockname()[1]
        started = False
        try:
            while True:
                if self._want_up:
                    async with trio.open_nursery() as nursery:
                        await nursery.start(partial(serve, self.app, self._config()))
                        self._set_listening(True)
                        if not started:
                            started = True
                            task_status.started(self.address)
                        await self._wait_want(False)
                        nursery.cancel_scope.cancel()  # drops the listener and every open connection
                    self._set_listening(False)
                    log.info("%s: stopped listening on %s", self.name, self.address)
                else:
                    if not started:
                        started = True
                        task_status.started(self.address)
                    await self._wait_want(True)
        finally:
            self._set_listening(False)
            holder.close()

    def go_down_nowait(self) -> None:
        self._set_want(False)

    def come_up_nowait(self) -> None:
        self._set_want(True)

    async def go_down(self) -> None:
        """Stop listening (open connections are dropped); returns once connections are refused."""
        self.go_down_nowait()
        await self.wait_listening(False)

    async def come_up(self) -> None:
        """Listen again on the same port; returns once connections are accepted."""
        self.come_up_nowait()
        await self.wait_listening(True)

    async def wait_listening(self, listening: bool) -> None:
        while self.listening != listening:
            await self._state_changed.wait()

    def _config(self) -> HypercornConfig:
        sock = _bound_socket(self.host, self.port)
        config = HypercornConfig()
        config.bind = [f"fd://{sock.detach()}"]  # Hypercorn owns (listens on, closes) this socket
        config.backlog = 1024
        config.accesslog = None
        config.errorlog = logging.getLogger("sn1_gateway.devnet.http")
        config.graceful_timeout = 0.0
        config.keep_alive_timeout = 75
        return config

    def _set_want(self, up: bool) -> None:
        if up != self._want_up:
            self._want_up = up
            self._want_changed.set()
            self._want_changed = trio.Event()

    async def _wait_want(self, up: bool) -> None:
        while self._want_up != up:
            await self._want_changed.wait()

    def _set_listening(self, listening: bool) -> None:
        if listening != self.listening:
            self.listening = listening
            self._state_changed.set()
            self._state_changed = trio.Event()
