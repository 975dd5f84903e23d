"""How the app is served: Hypercorn's settings from ours, the capped listener (`web/inbound.py`), the
ASGI wrapper (`web/asgi.py`), and the heap settled once listening. The gateway and the stack floor of
the benchmark are served by the same code, so the floor measures what the gateway stands on."""

from __future__ import annotations

import gc
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.typing import ASGIFramework

from config.settings import Settings
from web import inbound
from web.asgi import shield_response_end


def hypercorn_config(settings: Settings) -> HypercornConfig:
    config = HypercornConfig()
    host = settings.server.host
    config.bind = [f"[{host}]:{settings.server.port}" if ":" in host else f"{host}:{settings.server.port}"]
    config.graceful_timeout = settings.server.drain_timeout_s
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.keep_alive_timeout = settings.server.keep_alive_timeout_s
    config.workers = settings.server.workers  # more than one: the socket is bound with SO_REUSEPORT
    # HTTP/2 (prior knowledge, or an h2c upgrade) is served by Hypercorn as it is: one request at a time
    # on it, as on an HTTP/1.1 connection, so that `server.max_connections` bounds requests too.
    config.h2_max_concurrent_streams = 1
    return config


async def serve(app: ASGIFramework, settings: Settings, connections: inbound.Connections, *,
                shutdown_trigger: Callable[[], Awaitable[object]], drain_deadline: Callable[[], float],
                task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve `app` (inside the ASGI wrapper) until `shutdown_trigger` returns; hands back the bound URLs."""
    await inbound.serve(shield_response_end(app, settings.server.drain_timeout_s), hypercorn_config(settings),
                        connections, shutdown_trigger=shutdown_trigger, drain_deadline=drain_deadline,
                        task_status=task_status)


# The collector's young generation is scanned every this many new container objects (Python's default
# is 700). A request makes thousands (parsed chunks, tasks, cancel scopes), nearly all freed by reference
# counting before a larger threshold comes round; with 700 the collector ran dozens of times a second
# under load and cost a sixth of the process's CPU (`sn1-gateway bench`, fanout 5: 16% of CPU in
# collections; 3% with this and `gc.freeze`).
GC_YOUNG_THRESHOLD = 20_000


def settle_heap() -> None:
    """Once serving: what start-up built (modules, the metagraph, the app) is kept out of every later
    collection (`gc.freeze`), and the young generation is collected less often (`GC_YOUNG_THRESHOLD`).
    Memory stays bounded: the gateway makes few reference cycles, and those are still collected."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)
