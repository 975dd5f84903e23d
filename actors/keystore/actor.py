"""KeyStoreActor: runs the key store's background work under the supervisor.

The store itself is opened by `open_keystore` before the actor starts, so that a corrupt keys file or
an unreachable Redis stops the gateway at once with a clear message instead of a restart loop. The
store outlives actor restarts: handles given to the web layer stay valid.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from actors.keystore.filestore import FileKeyStore
from actors.keystore.records import KeyStore, KeyStoreError
from config.settings import Settings

log = logging.getLogger("sn1_gateway.keys")

SHUTDOWN_FLUSH_S = 5.0


class KeyStoreActor:
    name = "keys"

    def __init__(self, store: KeyStore) -> None:
        self.store = store

    async def run(self, *, task_status: trio.TaskStatus[KeyStoreActor] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started(self)
        await self.store.maintain()

    def health(self) -> dict[str, Any]:
        return self.store.health()


@asynccontextmanager
async def open_keystore(settings: Settings) -> AsyncIterator[KeyStore]:
    """The configured store, loaded and checked; on exit, usage still in memory is persisted."""
    if settings.auth.store == "redis":
        from actors.keystore.redisstore import RedisKeyStore

        async with RedisKeyStore.connect(
            settings.auth.redis_url, failed_auth_per_minute=settings.auth.failed_auth_per_minute
        ) as redis_store:
            yield redis_store
        return
    store = await FileKeyStore.open(Path(settings.resolve(settings.auth.keys_file)),
                                    failed_auth_per_minute=settings.auth.failed_auth_per_minute)
    try:
        yield store
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(SHUTDOWN_FLUSH_S):
            try:
                await store.flush()
            except KeyStoreError as exc:
                log.error("key store: usage not saved at shutdown: %s", exc)
