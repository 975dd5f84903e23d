"""Supervision: start order, restart with exponential back-off, what the state report says."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio

from engine.supervisor import StartupError, Supervisor, describe_error
from wire.snapshot import SnapshotCell


@dataclass
class Flaky:
    """Serves after `setup_s`, then crashes after `crash_after_s` for its first `crashes` runs."""

    name: str = "a"
    crashes: int = 0
    crash_after_s: float = 0.0
    setup_s: float = 0.0
    crash_in_setup: bool = False
    starts: list[float] = field(default_factory=list)
    handle: object = field(default_factory=object)

    async def run(self, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        self.starts.append(trio.current_time())
        await trio.sleep(self.setup_s)
        failing = len(self.starts) <= self.crashes
        if failing and self.crash_in_setup:
            raise OSError(f"setup failed (run {len(self.starts)})")
        task_status.started(self.handle)
        if failing:
            await trio.sleep(self.crash_after_s)
            raise RuntimeError(f"crash {len(self.starts)}")
        await trio.sleep_forever()

    def health(self) -> dict[str, Any]:
        return {"starts": len(self.starts)}


def gaps(times: list[float]) -> list[float]:
    return [round(b - a, 6) for a, b in itertools.pairwise(times)]


async def test_crashes_are_restarted_with_doubling_back_off_up_to_the_cap(autojump_clock: Any) -> None:
    supervisor = Supervisor(base_backoff_s=0.5, max_backoff_s=4.0, stable_after_s=60.0)
    actor = Flaky(name="flaky", crashes=6)
    async with trio.open_nursery() as nursery:
        await supervisor.start(nursery, actor)
        await trio.sleep(100)
        assert gaps(actor.starts) == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
        state = supervisor.report()["flaky"]
        assert state["status"] == "running"
        assert state["restarts"] == 6
        assert state["last_error"] == "RuntimeError: crash 6"
        nursery.cancel_scope.cancel()


async def test_a_run_that_was_stable_resets_the_back_off(autojump_clock: Any) -> None:
    supervisor = Supervisor(base_backoff_s=1.0, max_backoff_s=30.0, stable_after_s=10.0)
    actor = Flaky(crashes=4, crash_after_s=0.0)
    async with trio.open_nursery() as nursery:
        await supervisor.start(nursery, actor)
        await trio.sleep(5)  # crashes at 0, 1, 3: back-off 1, 2, 4
        actor.crash_after_s = 20.0  # the fourth run lives long enough to count as stable
        await trio.sleep(60)
        assert gaps(actor.starts) == [1.0, 2.0, 4.0, 21.0]  # 20 s of running, then the base back-off again
        nursery.cancel_scope.cancel()


async def test_start_returns_the_handle_once_the_actor_serves_and_keeps_it_across_restarts(
    autojump_clock: Any,
) -> None:
    supervisor = Supervisor(base_backoff_s=0.5)
    actor = Flaky(crashes=1, setup_s=3.0, crash_after_s=1.0)
    async with trio.open_nursery() as nursery:
        handle = await supervisor.start(nursery, actor)
        assert handle is actor.handle
        assert trio.current_time() == pytest.approx(3.0)  # not before its setup finished
        assert supervisor.ready()
        nursery.cancel_scope.cancel()


async def test_report_while_restarting_names_the_error_and_the_next_attempt(autojump_clock: Any) -> None:
    supervisor = Supervisor(base_backoff_s=8.0)
    ok, flaky = Flaky(name="ok"), Flaky(name="flaky", crashes=1, crash_after_s=1.0)
    async with trio.open_nursery() as nursery:
        await supervisor.start(nursery, ok)
        await supervisor.start(nursery, flaky)
        assert supervisor.ready()
        await trio.sleep(3)  # crashed at t=1, next attempt at t=9
        assert not supervisor.ready()
        report = supervisor.report()
        assert report["ok"]["status"] == "running"
        assert report["flaky"] == {
            "status": "restarting", "restarts": 1, "last_error": "RuntimeError: crash 1",
            "for_s": 2.0, "next_attempt_in_s": 6.0,
        }
        await trio.sleep(7)
        assert supervisor.ready()
        assert supervisor.report()["flaky"]["status"] == "running"
        assert "next_attempt_in_s" not in supervisor.report()["flaky"]
        nursery.cancel_scope.cancel()


async def test_a_crash_during_setup_is_retried_until_the_actor_serves(autojump_clock: Any) -> None:
    supervisor = Supervisor(base_backoff_s=1.0)
    actor = Flaky(crashes=2, crash_in_setup=True)
    async with trio.open_nursery() as nursery:
        handle = await supervisor.start(nursery, actor)
        assert handle is actor.handle
        assert gaps(actor.starts) == [1.0, 2.0]
        assert supervisor.report()["a"]["last_error"] == "OSError: setup failed (run 2)"
        nursery.cancel_scope.cancel()


async def test_after_max_restarts_an_actor_is_failed_and_stays_down(autojump_clock: Any) -> None:
    supervisor = Supervisor(base_backoff_s=1.0, max_restarts=2)
    actor = Flaky(name="doomed", crashes=100, crash_after_s=1.0)
    other = Flaky(name="other")
    async with trio.open_nursery() as nursery:
        await supervisor.start(nursery, actor)
        await supervisor.start(nursery, other)
        await trio.sleep(1000)
        assert len(actor.starts) == 3
        report = supervisor.report()
        assert report["doomed"]["status"] == "failed"
        assert report["doomed"]["restarts"] == 3
        assert report["other"]["status"] == "running"  # one actor's crashes take nothing else down
        assert not supervisor.ready()
        nursery.cancel_scope.cancel()


async def test_an_actor_that_never_serves_within_max_restarts_fails_its_start(autojump_clock: Any) -> None:
    supervisor = Supervisor(base_backoff_s=1.0, max_restarts=1)
    with pytest.RaisesGroup(pytest.RaisesExc(StartupError, match="a could not start: OSError: setup failed"),
                            flatten_subgroups=True):
        async with trio.open_nursery() as nursery:
            await supervisor.start(nursery, Flaky(crashes=5, crash_in_setup=True))
    assert supervisor.report()["a"]["status"] == "failed"


async def test_an_actor_that_cannot_start_is_a_startup_error_not_an_endless_retry(autojump_clock: Any) -> None:
    supervisor = Supervisor(base_backoff_s=1.0)
    actor = Flaky(crashes=100, crash_in_setup=True)
    with pytest.RaisesGroup(pytest.RaisesExc(StartupError, match=r"^a could not start \(3 attempts\): OSError"),
                            flatten_subgroups=True):
        async with trio.open_nursery() as nursery:
            await supervisor.start(nursery, actor)
    assert gaps(actor.starts) == [1.0, 2.0]
    assert supervisor.report()["a"]["status"] == "failed"


async def test_an_actor_that_returns_is_stopped_not_restarted(autojump_clock: Any) -> None:
    class Once:
        name = "once"
        runs = 0

        def health(self) -> dict[str, Any]:
            return {}

        async def run(self, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
            self.runs += 1
            task_status.started()

    supervisor = Supervisor()
    once = Once()
    async with trio.open_nursery() as nursery:
        await supervisor.start(nursery, once)
    assert once.runs == 1
    assert supervisor.report()["once"]["status"] == "stopped"


async def test_cancellation_stops_a_restarting_actor_without_another_attempt(autojump_clock: Any) -> None:
    supervisor = Supervisor(base_backoff_s=10.0)
    actor = Flaky(crashes=1, crash_after_s=1.0)
    with trio.move_on_after(5):
        async with trio.open_nursery() as nursery:
            await supervisor.start(nursery, actor)
    assert len(actor.starts) == 1
    assert supervisor.report()["a"]["status"] == "restarting"


async def test_names_are_unique(autojump_clock: Any) -> None:
    supervisor = Supervisor()
    async with trio.open_nursery() as nursery:
        await supervisor.start(nursery, Flaky())
        with pytest.raises(ValueError, match="already registered"):
            await supervisor.start(nursery, Flaky())
        nursery.cancel_scope.cancel()


def test_describe_error_looks_inside_single_exception_groups() -> None:
    assert describe_error(ExceptionGroup("x", [ExceptionGroup("y", [KeyError("k")])])) == "KeyError: 'k'"
    assert describe_error(RuntimeError()) == "RuntimeError"
    both = ExceptionGroup("two", [ValueError("a"), ValueError("b")])
    assert describe_error(both).startswith("ExceptionGroup: two")


async def test_snapshot_cell_readers_see_the_latest_and_watchers_wake_on_publish(autojump_clock: Any) -> None:
    cell: SnapshotCell[str] = SnapshotCell("empty")
    assert (cell.get(), cell.version) == ("empty", 0)
    seen: list[tuple[str, int]] = []

    async def watch() -> None:
        seen.append(await cell.wait_newer(0))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch)
        await trio.sleep(1)
        assert seen == []
        cell.publish("one")
        cell.publish("two")  # a watcher gets the newest value, not each one
    assert seen == [("two", 2)]
    assert await cell.wait_newer(1) == ("two", 2)  # already newer: no wait
