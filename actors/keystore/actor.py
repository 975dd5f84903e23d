"""KeyStoreActor: runs the key store's background work under the supervisor.

The store itself is opened by `open_keystore` before the actor starts, so that a corrupt keys file or
an unreachable Redis stops the gateway at once with a clear message instead of a restart loop. The
store outlives actor restarts: handles given to the web layer stay valid. Its flush at exit is bounded
by `SHUTDOWN_FLUSH_S` and by the caller's deadline (the gateway's: its stop's bound), whichever is nearer.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from actors.keystore.filestore import FileKeyStore
from actors.keystore.records import KeyStore, KeyStoreError
from config.settings import Settings

log = logging.getLogger("sn1_gateway.keys")

SHUTDOWN_FLUSH_S = 5.0  # the longest the flush at exit may take, whatever time the caller's deadline leaves


class KeyStoreActor:
    name = "keys"

    def __init__(self, store: KeyStore) -> None:
        self.store = store

    async def run(self, *, task_status: trio.TaskStatus[KeyStoreActor] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started(self)
        await self.store.maintain()

    def health(self) -> dict[str, Any]:
        return self.store.health()


def shutdown_scope(deadline: Callable[[], float] | None) -> trio.CancelScope:
    """A shielded scope for the flush at exit, ending `SHUTDOWN_FLUSH_S` from now or at `deadline()` (a
    trio time, read now: the stop fixes it), whichever is nearer."""
    end = trio.current_time() + SHUTDOWN_FLUSH_S
    if deadline is not None:
        end = min(end, deadline())
    return trio.CancelScope(deadline=end, shield=True)


async def flush_at_exit(store: KeyStore, deadline: Callable[[], float] | None) -> None:
    """Persist the usage still in memory, within `shutdown_scope`; a failure or no time is logged."""
    with shutdown_scope(deadline) as scope:
        try:
            await store.flush()
        except KeyStoreError as exc:
            log.error("key store: usage not saved at shutdown: %s", exc)
    if scope.cancelled_caught:
        log.error("key store: usage not saved at shutdown: no time left before the stop's deadline")


@asynccontextmanager
async def open_keystore(settings: Settings, *, deadline: Callable[[], float] | None = None
                        ) -> AsyncIterator[KeyStore]:
    """The configured store, loaded and checked; on exit, usage still in memory is persisted, by
    `deadline()` (a trio time) at the latest."""
    if settings.auth.store == "redis":
        from actors.keystore.redisstore import RedisKeyStore

        async with RedisKeyStore.connect(
            settings.auth.redis_url, failed_auth_per_minute=settings.auth.failed_auth_per_minute,
            exit_deadline=deadline,
        ) as redis_store:
            yield redis_store
        return
    store = await FileKeyStore.open(Path(settings.resolve(settings.auth.keys_file)),
                                    failed_auth_per_minute=settings.auth.failed_auth_per_minute)
    try:
        yield store
    finally:
        await flush_at_exit(store, deadline)
