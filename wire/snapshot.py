"""A cell holding the latest immutable snapshot of some state.

Writers publish a whole new value; readers on the hot path take the current one without awaiting,
and watchers wait for the next version.
"""

from __future__ import annotations

from typing import Generic, TypeVar

import trio

T = TypeVar("T")


class SnapshotCell(Generic[T]):
    def __init__(self, initial: T) -> None:
        self._value = initial
        self._version = 0
        self._changed = trio.Event()

    @property
    def version(self) -> int:
        return self._version

    def get(self) -> T:
        return self._value

    def publish(self, value: T) -> None:
        self._value = value
        self._version += 1
        changed, self._changed = self._changed, trio.Event()
        changed.set()

    async def wait_newer(self, version: int) -> tuple[T, int]:
        """Wait until the cell holds a version newer than `version`; return it and its version."""
        while self._version <= version:
            await self._changed.wait()
        return self._value, self._version
