"""Assembly of the running gateway: actors in dependency order, then the HTTP server.

`run(settings)` owns one root nursery. Shutdown is graceful: the server stops accepting, in-flight
requests get up to `server.drain_timeout_s`, then the actors are cancelled and persist what they hold.
"""

from __future__ import annotations

import logging
import math
import os
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING

import httpx
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve
from hypercorn.typing import ASGIFramework, ASGIReceiveCallable, ASGISendCallable, ASGISendEvent, Scope

from actors.availability import AvailabilityActor
from actors.breaker import MinerHealth
from actors.fanout import FanoutPool
from actors.keystore import KeyStoreActor, open_keystore
from actors.scoring import ScoringForwarder
from actors.selection import Selector
from actors.subnet import MetagraphSource, StaticSource, SubnetActor
from config.settings import Settings
from engine.epistula import Signer
from engine.hotkey import load_hotkey
from engine.keepalive import KeepAliveTransport
from engine.services import Services
from engine.snapshot import SnapshotCell
from engine.subnet import SubnetSnapshot
from engine.supervisor import StartupError, Supervisor

if TYPE_CHECKING:
    from quart_trio import QuartTrio

log = logging.getLogger("sn1_gateway")

FANOUT_STOP_S = 2.0  # how long cut-short fan-outs get to hand their results to the forwarder
# The same signal again this soon after the first is one signal delivered twice, not an operator asking
# again: the one-file binary's launcher passes on to its child the Ctrl-C the child had from the
# terminal already, and systemd signals every process of a unit, the launcher included.
SIGNAL_ECHO_S = 0.2


@dataclass
class Gateway:
    """A running gateway, as handed back by `run` through `task_status`."""

    urls: list[str]
    services: Services
    _shutdown: trio.Event = field(default_factory=trio.Event)
    _stopped: trio.Event = field(default_factory=trio.Event, repr=False)

    @property
    def url(self) -> str:
        return self.urls[0]

    @property
    def stopping(self) -> bool:
        return self._shutdown.is_set()

    def shutdown(self) -> None:
        """Stop accepting; in-flight requests finish up to the drain deadline."""
        self.services.draining = True
        self._shutdown.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()


def hypercorn_config(settings: Settings) -> HypercornConfig:
    config = HypercornConfig()
    host = settings.server.host
    config.bind = [f"[{host}]:{settings.server.port}" if ":" in host else f"{host}:{settings.server.port}"]
    config.graceful_timeout = settings.server.drain_timeout_s
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.keep_alive_timeout = 75
    return config


CLOSE_CALLBACKS = "sn1_gateway.close_callbacks"  # ASGI scope key: see `shield_response_end`


def shield_response_end(app: ASGIFramework, limit_s: float) -> ASGIFramework:
    """Let the last body message of each response finish even when the app's task is cancelled, and
    run the request's close callbacks however the exchange ends.

    Quart-Trio cancels its request task as soon as hypercorn reports the response complete, and
    hypercorn does that from inside this very send, before it re-arms the connection's keep-alive
    watch. Cancelled there, an idle keep-alive connection is never closed: neither after
    `keep_alive_timeout` nor at shutdown, which then waits the whole drain deadline. The shield is
    bounded by `limit_s`, so a client that stops reading cannot hold it.

    Handlers append plain callables to `scope[CLOSE_CALLBACKS]`; they run once the app is done with
    the request, also when the client left before a streamed body was ever started (its generator's
    own `finally` then never runs).
    """

    async def app_with_shielded_end(scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return

        async def send_end_shielded(message: ASGISendEvent) -> None:
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                with trio.CancelScope(shield=True, deadline=trio.current_time() + limit_s):
                    await send(message)
            else:
                await send(message)

        callbacks: list[Callable[[], object]] = []
        scope[CLOSE_CALLBACKS] = callbacks  # type: ignore[literal-required]
        try:
            await app(scope, receive, send_end_shielded)
        finally:
            for callback in callbacks:
                callback()

    return app_with_shielded_end


def make_http_client(settings: Settings, transport: httpx.AsyncBaseTransport | None = None) -> httpx.AsyncClient:
    """The one pooled outbound client, towards miners and validators (keep-alive, O(1) per request)."""
    return httpx.AsyncClient(
        transport=transport or KeepAliveTransport(keepalive_expiry_s=60.0, max_connections=settings.fanout.max_connections),
        timeout=httpx.Timeout(60.0, connect=settings.fanout.connect_timeout_s),
        follow_redirects=False,
        trust_env=False,
    )


def metagraph_source(settings: Settings) -> MetagraphSource:
    if settings.subnet.source == "static":
        return StaticSource(settings)
    if settings.subnet.source == "chain":
        from actors.chain import ChainSource  # imports bittensor's chain client only when used

        return ChainSource(settings.subnet.netuid, settings.subnet.network)
    if settings.subnet.source == "devnet":
        from config.loading import ConfigError

        raise ConfigError("subnet.source = \"devnet\": the devnet runs inside this process only with "
                          "`sn1-gateway serve --devnet`; for a devnet in another process use the [subnet] "
                          "that `sn1-gateway devnet` prints (source = \"static\")")
    raise NotImplementedError(f"subnet.source = {settings.subnet.source!r} is not available yet")


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
    from web.app import create_app  # the web layer sits above the engine

    supervisor = supervisor or Supervisor()
    signer = Signer(await trio.to_thread.run_sync(load_hotkey, settings.wallet))
    subnet_cell: SnapshotCell[SubnetSnapshot] = SnapshotCell(SubnetSnapshot(netuid=settings.subnet.netuid))
    shutdown, stopped = trio.Event(), trio.Event()
    async with (
        _set_on_exit(stopped),  # exits last: wait_stopped() returns once every actor has persisted its state
        open_keystore(settings) as keys,  # a corrupt keys file or unreachable Redis stops us here
        make_http_client(settings, transport) as http,
        trio.open_nursery() as actors,
    ):
        await supervisor.start(actors, "keys", KeyStoreActor(keys))
        subnet_actor = SubnetActor(
            source or metagraph_source(settings),
            subnet_cell,
            interval_s=settings.subnet.sync_interval_s,
            cache_path=settings.resolve(settings.subnet.cache_file) if settings.subnet.source == "chain" else None,
        )
        await supervisor.start(actors, "subnet", subnet_actor)
        availability_actor = AvailabilityActor(settings, subnet_cell, http, signer)
        availability = await supervisor.start(actors, "availability", availability_actor)
        miner_health = MinerHealth(
            failure_threshold=settings.fanout.failure_threshold, cooldown_s=settings.fanout.breaker_cooldown_s
        )
        selector = Selector(
            subnet_cell, availability, miner_health,
            validator_stake_limit=settings.fanout.validator_stake_limit, top_pool=settings.fanout.top_pool,
        )
        scoring = await supervisor.start(actors, "scoring", ScoringForwarder(
            settings, http=http, signer=signer, subnet=subnet_cell,
        ))
        fanout = await supervisor.start(actors, "fanout", FanoutPool(
            http, signer, miner_health, submit=scoring.submit_nowait,
            max_serving=settings.fanout.max_inflight, max_jobs=settings.fanout.max_background,
            stall_s=settings.fanout.stall_timeout_s,
        ))
        services = Services(
            settings=settings, supervisor=supervisor, subnet=subnet_cell, signer=signer, http=http,
            availability=availability, miner_health=miner_health, selector=selector, fanout=fanout,
            keys=keys, scoring=scoring,
        )
        services.health["keys"] = keys.health
        services.health["subnet"] = subnet_actor.health
        services.health["availability"] = availability_actor.health
        services.health["fanout"] = fanout.statistics
        services.health["scoring"] = scoring.statistics

        app = create_app(services)
        if app_hook is not None:
            app_hook(app)
        try:
            async with trio.open_nursery() as server:
                try:
                    urls = await server.start(
                        partial(serve, shield_response_end(app, settings.server.drain_timeout_s),
                                hypercorn_config(settings), shutdown_trigger=shutdown.wait, mode="asgi")
                    )
                except* OSError as group:  # hypercorn binds inside nested nurseries
                    exc: BaseException = group
                    while isinstance(exc, BaseExceptionGroup):
                        exc = exc.exceptions[0]
                    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                    raise StartupError(f"cannot listen on {settings.server.host}:{settings.server.port} "
                                       f"(server.host, server.port): {reason}") from None
                task_status.started(Gateway(list(urls), services, shutdown, stopped))
            # Miners still answering finished requests are heard out, so their answers get scored;
            # past the deadline what they said so far is scored. Either way every fan-out reaches the
            # forwarder before it stops, and the forwarder spools what it cannot deliver.
            with trio.move_on_after(settings.server.drain_timeout_s):
                await fanout.wait_idle()
            if cut := fanout.cut_short("collection cut short: the gateway was stopping"):
                log.info("stopping: %d fan-outs cut short, their answers so far go to scoring", cut)
            with trio.move_on_after(FANOUT_STOP_S):
                await fanout.wait_idle()
            log.info("HTTP server stopped; stopping actors")
        finally:
            actors.cancel_scope.cancel()


@asynccontextmanager
async def _set_on_exit(event: trio.Event) -> AsyncIterator[None]:
    try:
        yield
    finally:
        event.set()


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
                        log.info("%s: draining (up to %.0fs); send it again to exit now",
                                 name, settings.server.drain_timeout_s)
                        first[signum] = trio.current_time()
                        running[0].shutdown()

            nursery.start_soon(watch)
            gateway: Gateway = await nursery.start(partial(run, settings, **run_kw))  # type: ignore[arg-type]
            running.append(gateway)
            if on_ready is not None:
                on_ready(gateway)
            await gateway.wait_stopped()
            nursery.cancel_scope.cancel()
        await absorb_signal_echoes(signals, min(first.values(), default=None))


async def absorb_signal_echoes(signals: AsyncIterator[int], since: float | None) -> None:
    """Take the copies of a signal still arriving until `SIGNAL_ECHO_S` after it came (at `since`, if it
    did). Leaving a signal receiver delivers what it holds again, to Python's default handler: an echo
    would end the program with a KeyboardInterrupt traceback after a clean stop."""
    if since is None:
        return
    with trio.move_on_at(since + SIGNAL_ECHO_S):
        async for _ in signals:
            pass
