"""Assembly of the running gateway: actors in dependency order, then the HTTP server.

`run(settings)` owns one root nursery. Shutdown is graceful and has one deadline, fixed when it is
asked for (`Gateway.shutdown`, on SIGINT/SIGTERM): `server.drain_timeout_s` from then. Until it, the
server stops accepting and in-flight requests finish, then miners still answering finished requests
are heard out; every later phase gets what is left of it. Past it, state is persisted within a fixed
margin (`EXIT_MARGIN_S`): cut-short fan-outs hand their answers to scoring (`HANDOVER_S`), the scoring
queue goes to the spool (at least `SCORING_FLUSH_MIN_S`), and the key store saves usage (the rest of the
margin but `PROCESS_END_S`, at most its own `SHUTDOWN_FLUSH_S`). `serve_until_signalled` enforces the whole bound, a hung disk included: at
`drain deadline + EXIT_MARGIN_S` the process exits with status 1, whatever is still running.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, assert_never

import httpx
import trio

from actors.availability import AvailabilityActor
from actors.fanout.breaker import MinerHealth
from actors.fanout.selection import Selector
from actors.jobs import JobsActor, JobStore, JobStoreError, open_job_store
from actors.keystore import KeyStoreActor, open_keystore
from actors.peers import WorkerPeers
from actors.scoring.forwarder import ScoringForwarder
from actors.subnet.actor import MetagraphSource, StaticSource, SubnetActor
from config.settings import Settings
from devnet.network import Devnet
from engine.supervisor import EXIT_MARGIN_S, StartupError, Supervisor
from engine.workers import stop_when_orphaned
from web import inbound
from web.app import create_app
from web.asgi import observe_requests
from web.peer_report import worker_report
from web.research.running import ResearchRuns
from web.server import serve
from web.services import Services
from web.telemetry import RequestFanoutPool
from wire.epistula import Signer
from wire.hotkey import load_hotkey
from wire.metagraph import SubnetSnapshot
from wire.pool import KeepAliveTransport
from wire.signals import SIGNAL_ECHO_S, absorb_signal_echoes
from wire.snapshot import SnapshotCell

if TYPE_CHECKING:
    from quart_trio import QuartTrio

log = logging.getLogger("sn1_gateway")

# After the drain deadline, the stop takes at most EXIT_MARGIN_S more: the parts below, and slack for
# the process to end. Past it `serve_until_signalled` exits at once with EXIT_STUCK.
PROCESS_END_S = 0.25  # of the margin, kept for the process to end after the key store's flush
HANDOVER_S = 0.5  # cut-short fan-outs hand their answers to the scoring forwarder
SCORING_FLUSH_MIN_S = 1.0  # the scoring queue's flush to the spool, when the drain left less
# The key store's flush gets the rest, less PROCESS_END_S: EXIT_MARGIN_S - HANDOVER_S - SCORING_FLUSH_MIN_S
# - PROCESS_END_S at least, when the drain left the scoring flush no more than its minimum.
EXIT_STUCK = 1


@dataclass
class StopPlan:
    """The one deadline of a stop, fixed when the stop is asked for, and the phase it is in."""

    drain_s: float
    requested: trio.Event = field(default_factory=trio.Event)
    drain_deadline: float = math.inf  # trio time
    phase: str = "serving"

    def request(self, deadline: float | None = None) -> None:
        if not self.requested.is_set():
            self.drain_deadline = trio.current_time() + self.drain_s if deadline is None else deadline
            self.phase = "draining requests"
            self.requested.set()

    @property
    def exit_deadline(self) -> float:
        return self.drain_deadline + EXIT_MARGIN_S

    def left_s(self) -> float:
        """What is left of the drain deadline."""
        return max(0.0, self.drain_deadline - trio.current_time())


@dataclass
class Gateway:
    """A running gateway, as handed back by `run` through `task_status`."""

    urls: list[str]
    services: Services
    plan: StopPlan
    _stopped: trio.Event = field(default_factory=trio.Event, repr=False)

    @property
    def url(self) -> str:
        return self.urls[0]

    @property
    def stopping(self) -> bool:
        return self.plan.requested.is_set()

    @property
    def phase(self) -> str:
        """What the gateway is doing: "serving", then each phase of the stop, then "stopped"."""
        return self.plan.phase

    def shutdown(self, *, deadline: float | None = None) -> None:
        """Stop accepting; in-flight requests, then miners' answers, go on until the drain deadline
        (`deadline`, a trio time; by default `server.drain_timeout_s` from now), state is saved after it."""
        self.services.draining = True
        self.plan.request(deadline)

    async def wait_stopped(self) -> None:
        await self._stopped.wait()


def outbound_transport(settings: Settings) -> KeepAliveTransport:
    """The one outbound connection pool, towards miners and validators (keep-alive, O(1) per request)."""
    return KeepAliveTransport(keepalive_expiry_s=60.0, max_connections=settings.fanout.max_connections)


def make_http_client(settings: Settings, transport: httpx.AsyncBaseTransport | None = None) -> httpx.AsyncClient:
    """The one outbound client, over `transport` (by default the gateway's pool)."""
    return httpx.AsyncClient(
        transport=transport or outbound_transport(settings),
        timeout=httpx.Timeout(60.0, connect=settings.fanout.connect_timeout_s),
        follow_redirects=False,
        trust_env=False,
    )


def metagraph_source(settings: Settings) -> MetagraphSource:
    if settings.subnet.source == "static":
        return StaticSource(settings)
    if settings.subnet.source == "chain":
        from actors.subnet.chain import ChainSource  # imports bittensor's chain client only when used

        return ChainSource(settings.subnet.netuid, settings.subnet.network)
    if settings.subnet.source == "devnet":
        from config.loading import ConfigError

        raise ConfigError("subnet.source = \"devnet\": the devnet runs inside this process only with "
                          "`sn1-gateway serve --devnet`; for a devnet in another process use the [subnet] "
                          "that `sn1-gateway devnet` prints (source = \"static\")")
    assert_never(settings.subnet.source)


async def run(
    settings: Settings,
    *,
    source: MetagraphSource | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
    supervisor: Supervisor | None = None,
    app_hook: Callable[[QuartTrio], None] | None = None,
    task_status: trio.TaskStatus[Gateway] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the gateway until `Gateway.shutdown()` is called (or the caller cancels).

    `app_hook`, when given, is called with the application before it serves: the extension point
    for tests and embedders to add routes or middleware (it gets the app with every route in place).
    """
    supervisor = supervisor or Supervisor()
    signer = Signer(await trio.to_thread.run_sync(load_hotkey, settings.wallet))
    subnet_cell: SnapshotCell[SubnetSnapshot] = SnapshotCell(SubnetSnapshot(netuid=settings.subnet.netuid))
    plan, stopped = StopPlan(settings.server.drain_timeout_s), trio.Event()
    chain = settings.subnet.source == "chain"
    outbound = transport or outbound_transport(settings)
    async with (
        _set_on_exit(stopped, plan),  # exits last: wait_stopped() returns once every actor has persisted its state
        # a corrupt keys file or unreachable Redis stops us here; its flush at exit ends before the stop's bound
        open_keystore(settings, deadline=lambda: plan.exit_deadline - PROCESS_END_S) as keys,
        _open_jobs(settings) as job_store,  # so does an unusable jobs file
        _phase_on_exit(plan, "saving key usage"),
        make_http_client(settings, outbound) as http,
        trio.open_nursery() as actors,
    ):
        await supervisor.start(actors, KeyStoreActor(keys))
        subnet_actor = await supervisor.start(actors, SubnetActor(
            source or metagraph_source(settings),
            subnet_cell,
            interval_s=settings.subnet.sync_interval_s,
            cache_path=settings.resolve(settings.subnet.cache_file) if chain else None,
            screen_axons=chain and not settings.subnet.allow_private_axons,
            hotkey=signer.ss58,
        ))
        availability = await supervisor.start(actors, AvailabilityActor(settings, subnet_actor.cell, http, signer))
        miner_health = MinerHealth(
            failure_threshold=settings.fanout.failure_threshold, cooldown_s=settings.fanout.breaker_cooldown_s
        )
        selector = Selector(
            subnet_cell, availability.cell, miner_health,
            validator_stake_limit=settings.fanout.validator_stake_limit, top_pool=settings.fanout.top_pool,
            selection=settings.fanout.selection, explore_share=settings.fanout.explore_share,
        )
        scoring = await supervisor.start(actors, ScoringForwarder(
            settings, http=http, signer=signer, subnet=subnet_cell,
        ))
        fanout = await supervisor.start(actors, RequestFanoutPool(  # each fan-out noted on its request
            http, signer, miner_health, submit=scoring.submit_nowait,
            max_serving=settings.fanout.max_inflight, max_jobs=settings.fanout.max_background,
            stall_s=settings.fanout.stall_timeout_s, answers_max_bytes=settings.fanout.answers_max_bytes,
        ))
        jobs = await supervisor.start(actors, JobsActor(job_store, settings.jobs))
        connections = inbound.Connections(settings.server.max_connections,
                                          busy_idle_s=settings.server.keep_alive_busy_s,
                                          head_timeout_s=settings.server.request_head_timeout_s)
        registry = supervisor.registry
        registry.add(connections)
        if isinstance(outbound, KeepAliveTransport):
            registry.add(outbound)
        research = ResearchRuns()  # deep-research runs under way, within research.max_running(_per_key)
        registry.add(research)
        services = Services(
            settings=settings, actors=registry, subnet=subnet_cell, signer=signer, http=http,
            availability=availability.cell, miner_health=miner_health, selector=selector, fanout=fanout,
            keys=keys, scoring=scoring, jobs=jobs, research=research,
        )
        if settings.worker is not None and settings.server.workers > 1:  # one of several: report for all
            services.peers = await supervisor.start(actors, WorkerPeers(
                settings.auth.redis_url, group=f"{settings.server.host}:{settings.server.port}",
                index=settings.worker, count=settings.server.workers, snapshot=worker_report(services)))

        app = create_app(services)
        if app_hook is not None:
            app_hook(app)
        served = observe_requests(app, services.telemetry)  # request ids, figures, access lines
        try:
            async with trio.open_nursery() as server:
                try:
                    urls = await server.start(partial(
                        serve, served, settings, connections, shutdown_trigger=plan.requested.wait,
                        drain_deadline=lambda: plan.drain_deadline,
                    ))
                except* OSError as group:  # hypercorn binds inside nested nurseries
                    exc: BaseException = group
                    while isinstance(exc, BaseExceptionGroup):
                        exc = exc.exceptions[0]
                    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                    raise StartupError(f"cannot listen on {settings.server.host}:{settings.server.port} "
                                       f"(server.host, server.port): {reason}") from None
                task_status.started(Gateway(list(urls), services, plan, stopped))
            # Miners still answering finished requests are heard out, so their answers get scored;
            # past the deadline what they said so far is scored. Either way every fan-out reaches the
            # forwarder before it stops, and the forwarder spools what it cannot deliver.
            plan.phase = "waiting for miners"
            if interrupted := jobs.interrupt_all():
                log.info("stopping: %d running jobs end as failed (interrupted)", interrupted)
            with trio.move_on_at(plan.drain_deadline):
                await fanout.wait_idle()
            plan.phase = "handing answers to scoring"
            if cut := fanout.cut_short("collection cut short: the gateway was stopping"):
                log.info("stopping: %d fan-outs cut short, their answers so far go to scoring", cut)
            with trio.move_on_after(HANDOVER_S):
                await fanout.wait_idle()
            log.info("HTTP server stopped; stopping actors")
        finally:
            if plan.requested.is_set():
                plan.phase = "saving the scoring queue"
                # The forwarder reads its flush budget when it flushes, i.e. right after this cancel.
                scoring.flush_deadline_s = max(SCORING_FLUSH_MIN_S, plan.left_s())
            actors.cancel_scope.cancel()


@asynccontextmanager
async def _open_jobs(settings: Settings) -> AsyncIterator[JobStore]:
    """The job store; one that cannot be used stops the start with a message for the operator."""
    opened = False
    try:
        async with open_job_store(settings) as store:
            opened = True
            yield store
    except JobStoreError as exc:
        if opened:
            raise
        raise StartupError(str(exc)) from None


@asynccontextmanager
async def _set_on_exit(event: trio.Event, plan: StopPlan) -> AsyncIterator[None]:
    try:
        yield
    finally:
        plan.phase = "stopped"
        event.set()


@asynccontextmanager
async def _phase_on_exit(plan: StopPlan, phase: str) -> AsyncIterator[None]:
    """Names the phase of a stop that begins when this context is left."""
    try:
        yield
    finally:
        if plan.requested.is_set():
            plan.phase = phase


class ExitWatchdog:
    """Ends the process with EXIT_STUCK at a deadline, from a thread of its own.

    The last resort of the stop's bound: a worker thread on a hung disk cannot be cancelled, and
    a lock it holds can block the event loop itself, so this does not rely on the loop.
    """

    def __init__(self, plan: StopPlan) -> None:
        self._plan = plan
        delay_s = plan.exit_deadline - trio.current_time()
        self._cancelled = threading.Event()
        self._thread = threading.Thread(target=self._watch, args=(delay_s,), name="exit-watchdog", daemon=True)
        self._thread.start()

    def cancel(self) -> None:
        self._cancelled.set()

    def _watch(self, delay_s: float) -> None:
        if self._cancelled.wait(max(0.0, delay_s)):
            return
        line = (f"error: the stop did not finish within server.drain_timeout_s + {EXIT_MARGIN_S:g}s "
                f"(still {self._plan.phase}); exiting now, what was not saved yet is lost\n")
        # Written from yet another thread: a blocked stderr must not hold the exit either.
        threading.Thread(target=_write_stderr, args=(line.encode(),), daemon=True).start()
        time.sleep(0.05)
        os._exit(EXIT_STUCK)


def _write_stderr(data: bytes) -> None:
    with suppress(OSError):
        os.write(2, data)


async def serve_until_signalled(
    settings: Settings, *, on_ready: Callable[[Gateway], None] | None = None, **run_kw: object
) -> None:
    """Run the gateway; the first SIGINT/SIGTERM drains and stops it, a second one exits at once
    (the same signal within `SIGNAL_ECHO_S` of the first is that one delivered twice, and ignored).

    A signal while it is still starting stops the start-up (nothing is being served yet to drain).
    """
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            running: list[Gateway] = []
            first: dict[int, float] = {}  # signal number: when it first asked for the drain

            async def watch() -> None:
                async for signum in signals:
                    name = signal.Signals(signum).name
                    if not running:
                        log.info("%s while starting: stopping", name)
                        first.setdefault(signum, trio.current_time())
                        nursery.cancel_scope.cancel()
                    elif running[0].stopping:
                        if trio.current_time() - first.get(signum, -math.inf) < SIGNAL_ECHO_S:
                            continue
                        log.warning("second %s: exiting now", name)
                        os._exit(130)
                    else:
                        log.info("%s: draining (up to %gs, exit within %gs); send it again to exit now",
                                 name, settings.server.drain_timeout_s, settings.server.drain_timeout_s + EXIT_MARGIN_S)
                        first[signum] = trio.current_time()
                        stopping = running[0]
                        stopping.shutdown()
                        watchdogs.append(ExitWatchdog(stopping.plan))

            watchdogs: list[ExitWatchdog] = []
            nursery.start_soon(watch)
            if settings.worker is not None:
                nursery.start_soon(stop_when_orphaned, os.getppid())
            try:
                gateway: Gateway = await nursery.start(partial(run, settings, **run_kw))  # type: ignore[arg-type]
                running.append(gateway)
                if on_ready is not None:
                    on_ready(gateway)
                await gateway.wait_stopped()
                nursery.cancel_scope.cancel()
            finally:
                for watchdog in watchdogs:
                    watchdog.cancel()
        await absorb_signal_echoes(signals, min(first.values(), default=None))


async def serve_with_devnet(settings: Settings, *, on_ready: Callable[[Gateway], None] | None = None,
                            devnet: Devnet | None = None) -> None:
    """`serve --devnet`: a devnet (by default the one of `settings.devnet`) and, pointed at it, the gateway,
    in one trio run, until SIGINT/SIGTERM or `Gateway.shutdown()`.

    The gateway signs with `wallet.uri` when set, else with the devnet's development key, so this works
    with no wallet and no chain.
    """
    devnet = devnet or Devnet.from_settings(settings)
    async with trio.open_nursery() as nursery:
        await nursery.start(devnet.run)
        await serve_until_signalled(devnet.configure(settings), on_ready=on_ready, source=devnet.source)
        nursery.cancel_scope.cancel()
