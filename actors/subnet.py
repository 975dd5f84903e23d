"""SubnetActor: keeps the metagraph snapshot fresh from its source.

A source is a blocking `fetch()` that returns a full snapshot (the chain client blocks, so it runs in
a worker thread). When a fetch fails the last good snapshot keeps being served and its age is
reported; the last good snapshot is also kept on disk so a restart without chain access still serves.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import trio

from config.settings import Settings
from engine.files import atomic_write_bytes
from engine.snapshot import SnapshotCell
from engine.subnet import Neuron, SubnetSnapshot

log = logging.getLogger("sn1_gateway.subnet")


class SubnetUnavailable(Exception):
    """The metagraph could not be read from its source."""


class MetagraphSource(Protocol):
    name: str

    def fetch(self) -> SubnetSnapshot:
        """Read the whole metagraph (blocking); raise SubnetUnavailable when it cannot."""
        ...


class StaticSource:
    """The neurons written in the config file."""

    name = "static"

    def __init__(self, settings: Settings) -> None:
        self._snapshot = SubnetSnapshot.of(
            settings.subnet.netuid,
            (
                Neuron(
                    uid=n.uid,
                    hotkey=n.hotkey,
                    axon=n.axon or None,
                    incentive=n.incentive,
                    stake=n.stake,
                    validator_permit=n.validator_permit,
                )
                for n in settings.subnet.neurons
            ),
            source="static",
        )

    def fetch(self) -> SubnetSnapshot:
        return SubnetSnapshot.of(
            self._snapshot.netuid, self._snapshot.neurons, source="static", fetched_at=time.time()
        )


class SubnetActor:
    def __init__(
        self,
        source: MetagraphSource,
        cell: SnapshotCell[SubnetSnapshot],
        *,
        interval_s: float,
        cache_path: str | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.source = source
        self.cell = cell
        self.interval_s = interval_s
        self.cache_path = Path(cache_path) if cache_path else None
        self.wall_clock = wall_clock
        self.last_error: str | None = None
        self.failures = 0
        self.syncs = 0

    async def run(self, *, task_status: trio.TaskStatus[SnapshotCell[SubnetSnapshot]] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        if self.cell.get().fetched_at is None and self.cache_path is not None:
            await self._load_cache()
        await self.sync_once()
        task_status.started(self.cell)
        while True:
            await trio.sleep(self.interval_s)
            await self.sync_once()

    async def sync_once(self) -> bool:
        """Fetch once; on failure keep the last good snapshot. Returns whether it succeeded."""
        try:
            snapshot = await trio.to_thread.run_sync(self.source.fetch, abandon_on_cancel=True)
        except SubnetUnavailable as exc:
            self.failures += 1
            self.last_error = str(exc)
            log.warning("metagraph from %s unavailable (%s); serving the last good one", self.source.name, exc)
            return False
        self.cell.publish(snapshot)
        self.syncs += 1
        self.last_error = None
        if self.cache_path is not None:
            await self._save_cache(snapshot)
        return True

    async def _save_cache(self, snapshot: SubnetSnapshot) -> None:
        assert self.cache_path is not None
        data = json.dumps(snapshot.as_dict()).encode()
        try:
            await trio.to_thread.run_sync(atomic_write_bytes, self.cache_path, data)
        except OSError as exc:
            log.warning("cannot write the metagraph cache %s: %s", self.cache_path, exc)

    async def _load_cache(self) -> None:
        assert self.cache_path is not None
        path = self.cache_path
        try:
            text = await trio.to_thread.run_sync(path.read_text)
            snapshot = SubnetSnapshot.from_dict(json.loads(text))
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring the unreadable metagraph cache %s: %s", path, exc)
            return
        self.cell.publish(snapshot)
        log.info("serving the cached metagraph from %s (%d neurons)", path, len(snapshot.neurons))

    def health(self) -> dict[str, Any]:
        snap = self.cell.get()
        age = None if snap.fetched_at is None else round(max(0.0, self.wall_clock() - snap.fetched_at), 1)
        return {
            "source": self.source.name,
            "snapshot_source": snap.source,
            "neurons": len(snap.neurons),
            "block": snap.block,
            "age_s": age,
            "stale": self.last_error is not None,
            "last_error": self.last_error,
            "failures": self.failures,
        }
