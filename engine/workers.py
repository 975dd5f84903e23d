"""`server.workers = N`: N serving processes on one port, under one command.

Each worker is an ordinary `serve` process (`serve --worker I`), bound to the same host and port with
SO_REUSEPORT, so the kernel spreads new connections over them. What they must share lives in Redis
(keys, limits, usage, jobs), hence `auth.store = "redis"` for more than one; what each writes on its own
disk is kept apart (its scoring spool in `scoring.spool_dir/worker-I`). The parent only supervises: it
starts the workers, passes SIGINT/SIGTERM on (each drains within its own deadline), restarts a worker
that dies while serving (back-off doubling from 1 s to 30 s), and gives up when one fails at start
three times in a row (a port in use, say), stopping the others.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator

import trio

from config.loading import ConfigError
from config.settings import Settings
from engine.supervisor import EXIT_MARGIN_S
from wire.signals import SIGNAL_ECHO_S, absorb_signal_echoes

log = logging.getLogger("sn1_gateway.workers")

START_ATTEMPTS = 3  # a worker failing this many starts in a row stops the gateway
STARTED_AFTER_S = 10.0  # a worker that has run this long counts as started (its back-off resets)
RESTART_BASE_S, RESTART_MAX_S = 1.0, 30.0
STOP_GRACE_S = 5.0  # beyond each worker's own exit bound, before it is killed
PARENT_CHECK_S = 1.0  # how often a worker looks whether the process that started it is still there


def check_workers(settings: Settings) -> None:
    """More than one worker needs what workers must share to be shared, and one port to share."""
    count = settings.server.workers
    if count == 1:
        return
    if settings.auth.store != "redis":
        raise ConfigError(f"server.workers = {count} needs auth.store = \"redis\": keys, rate limits and usage "
                          "must be shared between the workers (found auth.store = \"file\")")
    if settings.server.port == 0:
        raise ConfigError(f"server.workers = {count} needs a fixed server.port: with 0 each worker would "
                          "listen on a port of its own")


def worker_settings(settings: Settings, index: int) -> Settings:
    """Worker `index`'s own settings: its spool folder apart from the others'."""
    spool = os.path.join(settings.scoring.spool_dir, f"worker-{index}")
    return dataclasses.replace(settings, worker=index,
                               scoring=dataclasses.replace(settings.scoring, spool_dir=spool))


async def stop_when_orphaned(parent_pid: int, *, interval_s: float = PARENT_CHECK_S) -> None:
    """In a worker: once the process that started it is gone (killed, say, with -9: it could not stop
    its workers), stop as SIGTERM stops it, draining, rather than serve on alone holding the port."""
    while True:  # no event says it: the kernel gives the orphan a new parent
        await trio.sleep(interval_s)
        if os.getppid() != parent_pid:
            break
    log.warning("the workers' parent (pid %d) is gone: stopping", parent_pid)
    os.kill(os.getpid(), signal.SIGTERM)


def worker_command(config_path: str, index: int) -> list[str]:
    """How to start worker `index` as this same program (the one-file binary is `sys.executable`)."""
    program = [sys.executable] if getattr(sys, "frozen", False) else [sys.executable, "-m", "engine.cli"]
    return [*program, "serve", "--config", config_path, "--worker", str(index)]


@dataclasses.dataclass
class Worker:
    index: int
    process: trio.Process | None = None
    started_at: float = 0.0
    failed_starts: int = 0
    restarts: int = 0


async def run_workers(settings: Settings, config_path: str) -> int:
    """Run `server.workers` workers until SIGINT/SIGTERM. The exit status: 0 after a clean stop, 1 when a
    worker could not start (or did not stop cleanly), 130 after a second signal (the workers killed)."""
    count = settings.server.workers
    workers = [Worker(i) for i in range(count)]
    stop_bound_s = settings.server.drain_timeout_s + EXIT_MARGIN_S + STOP_GRACE_S
    stopping, failed = trio.Event(), trio.Event()
    first_signal: list[float] = []
    killed = False
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        try:
            async with trio.open_nursery() as nursery:
                for worker in workers:
                    nursery.start_soon(_keep, worker, config_path, stopping, failed)
                print(f"sn1-gateway: {count} workers on {settings.server.host}:{settings.server.port}", flush=True)
                await _wait_for_stop(signals, failed, first_signal, count)
                stopping.set()
                killed = await _stop(workers, signals, stop_bound_s, first_signal[0] if first_signal else None)
                nursery.cancel_scope.cancel()
        finally:
            for worker in workers:  # however the parent ends, no worker outlives it
                if worker.process is not None and worker.process.returncode is None:
                    worker.process.kill()
        await absorb_signal_echoes(signals, first_signal[0] if first_signal else None)
    if killed:
        return 130
    unclean = any(w.process is not None and w.process.returncode != 0 for w in workers)
    return 1 if failed.is_set() or unclean else 0


async def _wait_for_stop(signals: AsyncIterator[int], failed: trio.Event, first_signal: list[float],
                         count: int) -> None:
    """Until SIGINT/SIGTERM (its time noted in `first_signal`) or a worker that cannot start."""
    async with trio.open_nursery() as waiting:
        async def on_signal() -> None:
            async for signum in signals:
                first_signal.append(trio.current_time())
                log.info("%s: stopping %d workers", signal.Signals(signum).name, count)
                break
            waiting.cancel_scope.cancel()

        async def on_failure() -> None:
            await failed.wait()
            waiting.cancel_scope.cancel()

        waiting.start_soon(on_signal)
        waiting.start_soon(on_failure)


async def _keep(worker: Worker, config_path: str, stopping: trio.Event, failed: trio.Event) -> None:
    """Run one worker, and again when it dies while serving; give up after `START_ATTEMPTS` failed starts."""
    backoff = RESTART_BASE_S
    while not stopping.is_set():
        worker.process = await trio.lowlevel.open_process(worker_command(config_path, worker.index))
        worker.started_at = trio.current_time()
        code = await worker.process.wait()
        if stopping.is_set():
            return
        ran_s = trio.current_time() - worker.started_at
        if ran_s >= STARTED_AFTER_S:
            worker.failed_starts, backoff = 0, RESTART_BASE_S
        else:
            worker.failed_starts += 1
        if worker.failed_starts >= START_ATTEMPTS:
            log.error("worker %d could not start (%d attempts, last exit status %d); stopping the gateway",
                      worker.index, worker.failed_starts, code)
            failed.set()
            return
        worker.restarts += 1
        log.warning("worker %d exited with status %d after %.1fs; restarting it in %.0fs",
                    worker.index, code, ran_s, backoff)
        with trio.move_on_after(backoff):
            await stopping.wait()
        backoff = min(backoff * 2, RESTART_MAX_S)


async def _stop(workers: list[Worker], signals: AsyncIterator[int], bound_s: float, since: float | None
                ) -> bool:
    """SIGTERM to every worker still running; each drains within its own deadline. A second signal (not
    an echo of the first) or the bound kills what is left. Returns whether a second signal came."""
    running = [w.process for w in workers if w.process is not None and w.process.returncode is None]
    for process in running:
        process.send_signal(signal.SIGTERM)
    second = False
    with trio.move_on_after(bound_s) as scope:
        async with trio.open_nursery() as nursery:
            async def again() -> None:
                nonlocal second
                async for _ in signals:
                    if since is None or trio.current_time() - since >= SIGNAL_ECHO_S:
                        second = True
                        log.warning("second signal: killing the workers")
                        nursery.cancel_scope.cancel()
                        return

            async def all_exited() -> None:
                for process in running:
                    await process.wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(again)
            nursery.start_soon(all_exited)
    for process in running:
        if process.returncode is None:
            process.kill()
            await process.wait()
    if scope.cancelled_caught:
        log.error("workers still running %.0fs after the stop were killed", bound_s)
    return second
