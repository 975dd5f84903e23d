"""SubnetActor: keeps the metagraph snapshot fresh from its source.

A source is a blocking `fetch()` that returns a full snapshot (the chain client blocks, so it runs in
a worker thread). When a fetch fails the last good snapshot keeps being served and its age is
reported; the last good snapshot is also kept on disk so a restart without chain access still serves.

Each snapshot is judged once, as it is published: axons the gateway must not ask are taken out
(`screen_axons`, for the chain), and the gateway's own hotkey is looked up (what miners that verify
signers will make of it). Nothing of this happens per request.
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
from wire.files import atomic_write_bytes
from wire.hotkey import HotkeyStanding, hotkey_standing
from wire.metagraph import Neuron, RefusedAxon, SubnetSnapshot, without_private_axons
from wire.snapshot import SnapshotCell

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


REFUSED_EXAMPLES = 5  # refused axons named on /health/ready


class SubnetActor:
    """Reads the metagraph every `interval_s`; after a failure it retries sooner (`retry_s`, doubling).

    A read that takes longer than `fetch_timeout_s` counts as a failure; its worker thread is
    abandoned (the source refuses to start another read while one is still running).

    `screen_axons`: neurons whose axon is not a public address (`wire.metagraph.refused_axon`) are
    published as not serving, counted; the disk cache keeps the metagraph as read, so a cache is
    screened again when loaded. `hotkey`: the gateway's own, looked up in every new snapshot.
    """

    name = "subnet"

    def __init__(
        self,
        source: MetagraphSource,
        cell: SnapshotCell[SubnetSnapshot],
        *,
        interval_s: float,
        cache_path: str | None = None,
        wall_clock: Callable[[], float] = time.time,
        retry_s: float = 10.0,
        fetch_timeout_s: float = 120.0,
        screen_axons: bool = False,
        hotkey: str | None = None,
    ) -> None:
        self.source = source
        self.cell = cell
        self.interval_s = interval_s
        self.retry_s = retry_s
        self.fetch_timeout_s = fetch_timeout_s
        self.cache_path = Path(cache_path) if cache_path else None
        self.wall_clock = wall_clock
        self.last_error: str | None = None
        self.failures = 0
        self.syncs = 0
        self.screen_axons = screen_axons
        self.hotkey = hotkey
        self.refused: tuple[RefusedAxon, ...] = ()
        self.standing: HotkeyStanding | None = None
        if hotkey is not None:
            self._judge_hotkey(cell.get())

    async def run(self, *, task_status: trio.TaskStatus[SubnetActor] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        if self.cell.get().fetched_at is None and self.cache_path is not None:
            await self._load_cache()
        ok = await self.sync_once()
        task_status.started(self)
        retry = self.retry_s
        while True:
            if ok:
                retry = self.retry_s
                await trio.sleep(self.interval_s)
            else:
                await trio.sleep(min(retry, self.interval_s))
                retry = min(retry * 2, self.interval_s)
            ok = await self.sync_once()

    async def sync_once(self) -> bool:
        """Fetch once; on failure keep the last good snapshot. Returns whether it succeeded."""
        try:
            with trio.fail_after(self.fetch_timeout_s):
                snapshot = await trio.to_thread.run_sync(self.source.fetch, abandon_on_cancel=True)
        except (SubnetUnavailable, trio.TooSlowError) as exc:
            self.failures += 1
            self.last_error = (
                str(exc) if isinstance(exc, SubnetUnavailable) else f"no answer within {self.fetch_timeout_s:g}s"
            )
            log.warning("metagraph from %s unavailable (%s); serving the last good one",
                        self.source.name, self.last_error)
            return False
        self._publish(snapshot)
        self.syncs += 1
        self.last_error = None
        if self.cache_path is not None:
            await self._save_cache(snapshot)
        return True

    def _publish(self, snapshot: SubnetSnapshot) -> None:
        """Screen `snapshot`'s axons and judge the gateway's hotkey in it, then publish it."""
        if self.screen_axons:
            snapshot, refused = without_private_axons(snapshot)
            if len(refused) != len(self.refused):
                log.warning("metagraph: %d axons are not public addresses and count as not serving "
                            "(subnet.allow_private_axons = false), e.g. %s", len(refused),
                            ", ".join(f"uid {r.uid} at {r.axon} ({r.reason})" for r in refused[:3]))
            self.refused = refused
        self.cell.publish(snapshot)
        if self.hotkey is not None:
            self._judge_hotkey(snapshot)

    def _judge_hotkey(self, snapshot: SubnetSnapshot) -> None:
        assert self.hotkey is not None
        standing = hotkey_standing(snapshot, self.hotkey)
        if self.standing is None or standing.warnings != self.standing.warnings:
            for warning in standing.warnings:
                log.warning("%s", warning)
        self.standing = standing

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
            cached = SubnetSnapshot.from_dict(json.loads(text))
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("ignoring the unreadable metagraph cache %s: %s", path, exc)
            return
        if cached.netuid != self.cell.get().netuid:
            log.warning("ignoring the metagraph cache %s: it holds netuid %d, not %d",
                        path, cached.netuid, self.cell.get().netuid)
            return
        # Marked as coming from the cache, so /health/ready shows what is being served.
        snapshot = SubnetSnapshot.of(
            cached.netuid, cached.neurons, block=cached.block, fetched_at=cached.fetched_at, source="cache"
        )
        self._publish(snapshot)
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
            "axons_refused": len(self.refused) if self.screen_axons else None,
            "axons_refused_examples": [r.as_dict() for r in self.refused[:REFUSED_EXAMPLES]],
            **(self.standing.as_dict() if self.standing is not None else {}),
        }
