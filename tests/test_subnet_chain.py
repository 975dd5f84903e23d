"""The `chain` metagraph source and SubnetActor around it, with a fake chain client (no network here).

The fake hands back bittensor's own `Metagraph` / `MetagraphNeuron` / `Balance` objects, so the
mapping is checked against the real library types.
"""

from __future__ import annotations

import dataclasses
import json
import socket
import stat
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from bittensor.balance import Balance
from bittensor.metagraph import Metagraph, MetagraphNeuron
from bittensor.result import RpcConnectionError
from trio.testing import MockClock

from actors.subnet.actor import SubnetActor, SubnetUnavailable
from actors.subnet.chain import ChainSource, axon_address, subtensor
from config.loading import ConfigError
from config.settings import NeuronSettings, Settings, SubnetSettings
from engine.gateway import Gateway, run
from tests.metrics_support import scrape
from wire.metagraph import Neuron, SubnetSnapshot, refused_axon
from wire.snapshot import SnapshotCell

NETUID = 1
EPOCH = 1_760_000_000.0  # the fake wall clock starts here


def chain_neuron(uid: int, *, axon: str | None = None, incentive: float = 0.0, stake_alpha: float = 0.0,
                 validator_permit: bool = False) -> MetagraphNeuron:
    stake = Balance.from_alpha(stake_alpha, NETUID)  # on a subnet, stake is in its alpha, not TAO
    return MetagraphNeuron(
        uid=uid, hotkey=f"5Hot{uid}", coldkey=f"5Cold{uid}", active=True, validator_permit=validator_permit,
        last_update=0, block_at_registration=0, rank=0.0, trust=0.0, consensus=0.0, incentive=incentive,
        dividends=0.0, pruning_score=0.0, emission=Balance.from_rao(0, NETUID), alpha_stake=stake,
        tao_stake=Balance.from_rao(0), total_stake=stake, axon=axon, identity=None, commitment=None,
    )


def chain_metagraph(block: int, neurons: list[MetagraphNeuron]) -> Metagraph:
    return Metagraph(
        netuid=NETUID, mechid=0, name="apex", symbol="ALPHA", block=block, tempo=360, last_step=0,
        blocks_since_last_step=0, owner_hotkey="", owner_coldkey="", network_registered_at=0,
        num_uids=len(neurons), max_uids=256, price=None, moving_price=None, identity=None, neurons=neurons,
        commitments={}, unregistered_commitments={}, raw={},
    )


GRAPH_A = chain_metagraph(100, [
    chain_neuron(0, axon=None, stake_alpha=5_000.0, validator_permit=True),
    chain_neuron(1, axon="23.94.0.1:8091", incentive=0.6),
    chain_neuron(2, axon="23.94.0.2:8091", incentive=0.4, stake_alpha=12.5),
])
GRAPH_B = chain_metagraph(460, [*GRAPH_A.neurons, chain_neuron(3, axon="23.94.0.3:8091", incentive=0.1)])


class FakeChain:
    """What `bittensor.Subtensor(network)` offers the source; `answer` is the next reply or error."""

    def __init__(self, network: str, world: World) -> None:
        self.network = network
        self.world = world
        self.closed = False
        self.subnets = self

    def metagraph(self, netuid: int, block: int | None = None, *, commitments: bool = True) -> Metagraph | None:
        self.world.calls.append((self.network, netuid, commitments))
        if self.world.hold is not None:
            self.world.hold.wait(30)
        answer = self.world.answer
        if isinstance(answer, BaseException):
            raise answer
        return answer

    def close(self) -> None:
        self.closed = True


@dataclasses.dataclass
class World:
    """The fake chain all clients talk to."""

    answer: Metagraph | BaseException | None = dataclasses.field(default_factory=lambda: GRAPH_A)
    clients: list[FakeChain] = dataclasses.field(default_factory=list)
    calls: list[tuple[str, int, bool]] = dataclasses.field(default_factory=list)
    hold: threading.Event | None = None

    def client(self, network: str) -> FakeChain:
        made = FakeChain(network, self)
        self.clients.append(made)
        return made


@pytest.fixture
def world() -> World:
    return World()


@pytest.fixture
def thread_clock() -> MockClock:
    """Autojump, but only after trio has been idle for a while: the chain is read in a worker thread,
    and with an immediate jump virtual time would run on while the thread works."""
    return MockClock(autojump_threshold=0.1)


def trio_wall_clock() -> float:
    """Wall-clock time that follows trio's (autojump) clock, from the event loop or a worker thread."""
    try:
        return EPOCH + trio.current_time()
    except RuntimeError:  # in the worker thread running fetch()
        return EPOCH + trio.from_thread.run_sync(trio.current_time)


def source_for(world: World) -> ChainSource:
    return ChainSource(NETUID, "finney", client_factory=world.client, wall_clock=trio_wall_clock)


# --- the source -----------------------------------------------------------------------------------


async def test_the_metagraph_maps_to_neurons(world: World) -> None:
    snapshot = source_for(world).fetch()
    assert world.calls == [("finney", NETUID, False)]  # commitments are not needed, and cost a lot
    assert snapshot.netuid == NETUID and snapshot.block == 100 and snapshot.source == "chain"
    assert snapshot.fetched_at == pytest.approx(trio_wall_clock())
    assert snapshot.neurons == (
        Neuron(uid=0, hotkey="5Hot0", axon=None, incentive=0.0, stake=5_000.0, validator_permit=True),
        Neuron(uid=1, hotkey="5Hot1", axon="23.94.0.1:8091", incentive=0.6, stake=0.0),
        Neuron(uid=2, hotkey="5Hot2", axon="23.94.0.2:8091", incentive=0.4, stake=12.5),
    )
    assert [n.uid for n in snapshot.serving_by_incentive] == [1, 2]


@pytest.mark.parametrize(
    ("axon", "expected"),
    [
        (None, None), ("", None), ("0.0.0.0:0", None), ("0.0.0.0:8091", None), ("23.94.0.1:0", None),
        ("[::]:8091", None), ("23.94.0.1", None), ("23.94.0.1:99999", None),
        ("23.94.0.1:8091", "23.94.0.1:8091"), ("[2001:db8::1]:8091", "[2001:db8::1]:8091"),
        ("10.0.0.1:8091", "10.0.0.1:8091"),  # what the chain says; whether to ask it is judged later
        ("miner.example:8091", "miner.example:8091"),
    ],
)
def test_axons_that_serve_nothing_become_none(axon: str | None, expected: str | None) -> None:
    assert axon_address(axon) == expected


async def test_a_chain_error_is_subnet_unavailable_and_the_client_is_replaced(world: World) -> None:
    source = source_for(world)
    source.fetch()
    failure = RpcConnectionError("could not connect to any endpoint")
    world.answer = failure
    with pytest.raises(SubnetUnavailable, match="finney: RpcConnectionError: could not connect") as caught:
        source.fetch()
    assert caught.value.__cause__ is failure
    assert world.clients[0].closed
    world.answer = GRAPH_B
    assert len(source.fetch().neurons) == 4
    assert len(world.clients) == 2  # reconnected with a fresh client


@pytest.mark.parametrize("error", [ConnectionResetError("reset"), TimeoutError(), OSError("unreachable")])
async def test_connection_errors_are_subnet_unavailable(world: World, error: BaseException) -> None:
    world.answer = error
    with pytest.raises(SubnetUnavailable):
        source_for(world).fetch()


async def test_a_subnet_that_does_not_exist_is_unavailable(world: World) -> None:
    world.answer = None
    with pytest.raises(SubnetUnavailable, match="subnet 1 does not exist"):
        source_for(world).fetch()


async def test_an_unexpected_reply_is_unavailable_not_a_crash(world: World) -> None:
    world.answer = dataclasses.replace(GRAPH_A, neurons=[object()])  # type: ignore[list-item]
    with pytest.raises(SubnetUnavailable, match="unexpected metagraph"):
        source_for(world).fetch()


def test_an_unknown_network_name_is_a_config_error_at_start() -> None:
    with pytest.raises(ConfigError, match=r"subnet\.network: Unknown network 'fineny'"):
        ChainSource(NETUID, "fineny")


def test_the_real_client_against_a_closed_port_is_unavailable() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    source = ChainSource(NETUID, f"ws://127.0.0.1:{port}", client_factory=subtensor)
    with pytest.raises(SubnetUnavailable, match="could not connect"):
        source.fetch()


# --- the actor ------------------------------------------------------------------------------------


def actor_for(world: World, tmp_path: Path, cell: SnapshotCell[SubnetSnapshot] | None = None, **kw: Any
              ) -> SubnetActor:
    return SubnetActor(
        source_for(world), cell or SnapshotCell(SubnetSnapshot(netuid=NETUID)),
        interval_s=600.0, cache_path=str(tmp_path / "metagraph.json"), wall_clock=trio_wall_clock, **kw,
    )


async def test_first_sync_publishes_and_writes_the_disk_cache(
    world: World, tmp_path: Path, thread_clock: MockClock, nursery: trio.Nursery
) -> None:
    actor = actor_for(world, tmp_path)
    cell = (await nursery.start(actor.run)).cell
    assert [n.uid for n in cell.get().neurons] == [0, 1, 2]
    assert actor.health() == {
        "source": "chain", "snapshot_source": "chain", "neurons": 3, "block": 100, "age_s": 0.0,
        "stale": False, "last_error": None, "failures": 0, "axons_refused": None, "axons_refused_examples": [],
    }
    cache = tmp_path / "metagraph.json"
    cached = json.loads(cache.read_text())
    assert cached["block"] == 100 and [n["uid"] for n in cached["neurons"]] == [0, 1, 2]
    assert stat.S_IMODE(cache.stat().st_mode) == 0o600


async def test_the_disk_cache_is_private_also_when_the_file_was_not(
    world: World, tmp_path: Path, thread_clock: MockClock, nursery: trio.Nursery
) -> None:
    cache = tmp_path / "metagraph.json"
    cache.write_text("{}")
    cache.chmod(0o644)
    await nursery.start(actor_for(world, tmp_path).run)
    assert json.loads(cache.read_text())["block"] == 100
    assert stat.S_IMODE(cache.stat().st_mode) == 0o600


async def test_the_metagraph_is_resynced_every_interval(
    world: World, tmp_path: Path, thread_clock: MockClock, nursery: trio.Nursery
) -> None:
    actor = actor_for(world, tmp_path)
    cell = (await nursery.start(actor.run)).cell
    world.answer = GRAPH_B
    await trio.sleep(599)
    assert cell.get().block == 100 and len(world.calls) == 1
    await trio.sleep(2)
    assert cell.get().block == 460 and len(cell.get().neurons) == 4
    assert json.loads((tmp_path / "metagraph.json").read_text())["block"] == 460
    await trio.sleep(600)
    assert len(world.calls) == 3


async def test_an_outage_keeps_the_last_snapshot_reports_its_age_and_retries_sooner(
    world: World, tmp_path: Path, thread_clock: MockClock, nursery: trio.Nursery
) -> None:
    actor = actor_for(world, tmp_path, retry_s=10.0)
    cell = (await nursery.start(actor.run)).cell
    good = cell.get()
    world.answer = RpcConnectionError("could not connect to any endpoint: [Errno 111]")
    await trio.sleep(601)  # the resync at 600 fails
    assert cell.get() is good
    health = actor.health()
    assert health["stale"] is True and health["failures"] == 1
    assert health["age_s"] == 601.0
    assert "could not connect" in health["last_error"]
    await trio.sleep(40)  # retries at 610, 630 (10 s, then doubling), not only every 600 s
    assert len(world.calls) == 4
    assert cell.get() is good
    world.answer = GRAPH_B
    await trio.sleep(40)  # the retry at 670 succeeds
    assert cell.get().block == 460
    assert actor.health()["stale"] is False and actor.health()["last_error"] is None


async def test_a_read_that_hangs_times_out_and_does_not_pile_up(
    world: World, tmp_path: Path, thread_clock: MockClock, nursery: trio.Nursery
) -> None:
    actor = actor_for(world, tmp_path, fetch_timeout_s=30.0, retry_s=10.0)
    cell = (await nursery.start(actor.run)).cell
    world.hold = threading.Event()  # the next read blocks in its thread until released
    try:
        await trio.sleep(600 + 31)
        assert actor.health()["last_error"] == "no answer within 30s"
        assert cell.get().block == 100
        await trio.sleep(10)  # the retry finds the hung read still running and does not start another
        assert "previous metagraph read has not finished" in actor.health()["last_error"]
        assert len(world.calls) == 2
    finally:
        world.hold.set()


async def test_a_restart_without_the_chain_serves_the_disk_cache(
    world: World, tmp_path: Path, thread_clock: MockClock
) -> None:
    async with trio.open_nursery() as first_run:
        await first_run.start(actor_for(world, tmp_path).run)
        first_run.cancel_scope.cancel()
    world.answer = RpcConnectionError("could not connect to any endpoint")
    await trio.sleep(3600)
    actor = actor_for(world, tmp_path)
    async with trio.open_nursery() as nursery:
        cell = (await nursery.start(actor.run)).cell
        assert [n.uid for n in cell.get().neurons] == [0, 1, 2]
        assert [n.axon for n in cell.get().serving_by_incentive] == ["23.94.0.1:8091", "23.94.0.2:8091"]
        health = actor.health()
        assert health["snapshot_source"] == "cache" and health["stale"] is True
        assert health["age_s"] == 3600.0 and health["block"] == 100
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("content", ["{broken", '{"netuid": 1}', '{"netuid": 1, "neurons": [{"uid": 0}]}', "[]"])
async def test_an_unreadable_cache_is_ignored(
    world: World, tmp_path: Path, thread_clock: MockClock, content: str, nursery: trio.Nursery
) -> None:
    (tmp_path / "metagraph.json").write_text(content)
    world.answer = RpcConnectionError("down")
    actor = actor_for(world, tmp_path)
    cell = (await nursery.start(actor.run)).cell
    assert cell.get().neurons == () and cell.get().fetched_at is None
    assert actor.health()["stale"] is True and actor.health()["age_s"] is None


async def test_the_cache_of_another_subnet_is_ignored(
    world: World, tmp_path: Path, thread_clock: MockClock, nursery: trio.Nursery
) -> None:
    other = SubnetSnapshot.of(7, [Neuron(uid=0, hotkey="5X", axon="23.94.9.9:1")], fetched_at=EPOCH, source="chain")
    (tmp_path / "metagraph.json").write_text(json.dumps(other.as_dict()))
    world.answer = RpcConnectionError("down")
    cell = (await nursery.start(actor_for(world, tmp_path).run)).cell
    assert cell.get().neurons == ()


# --- through the gateway --------------------------------------------------------------------------


@pytest.fixture
def chain_settings(gateway_settings: Settings) -> Settings:
    return dataclasses.replace(gateway_settings, subnet=SubnetSettings(source="chain", netuid=NETUID))


async def start_gateway(nursery: trio.Nursery, settings: Settings, world: World) -> Gateway:
    source = ChainSource(NETUID, "finney", client_factory=world.client)
    gateway: Gateway = await nursery.start(lambda task_status: run(settings, source=source, task_status=task_status))
    return gateway


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=10) as client:
        yield client


async def test_a_gateway_restarted_without_chain_access_serves_and_reports_the_cached_metagraph(
    world: World, chain_settings: Settings, tmp_path: Path, http: httpx.AsyncClient
) -> None:
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            gateway = await start_gateway(nursery, chain_settings, world)
            ready = (await http.get(f"{gateway.url}/health/ready")).json()
            assert ready["subnet"]["snapshot_source"] == "chain" and ready["subnet"]["neurons"] == 3
            gateway.shutdown()
        cache = tmp_path / "metagraph.json"  # `subnet.cache_file`, next to the config file
        saved = json.loads(cache.read_text())
        saved["fetched_at"] -= 3600  # as if the chain had been unreachable for an hour since
        cache.write_text(json.dumps(saved))

        world.answer = RpcConnectionError("could not connect to any endpoint")
        async with trio.open_nursery() as nursery:
            gateway = await start_gateway(nursery, chain_settings, world)
            response = await http.get(f"{gateway.url}/health/ready")
            assert response.status_code == 200
            subnet = response.json()["subnet"]
            assert subnet["source"] == "chain" and subnet["snapshot_source"] == "cache"
            assert subnet["neurons"] == 3 and subnet["block"] == 100
            assert subnet["stale"] is True and 3600 <= subnet["age_s"] < 3700
            assert "could not connect" in subnet["last_error"]
            assert [n.uid for n in gateway.services.subnet.get().serving_by_incentive] == [1, 2]
            gateway.shutdown()


# --- axons the gateway must not ask (subnet.allow_private_axons) ---------------------------------


@pytest.mark.parametrize(("axon", "reason"), [
    ("23.94.0.1:8091", None), ("[2606:4700::1]:8091", None), ("[::ffff:23.94.0.1]:8091", None),
    ("127.0.0.1:8091", "loopback"), ("10.1.2.3:8091", "private"), ("192.168.1.20:8091", "private"),
    ("172.16.0.5:8091", "private"), ("169.254.169.254:80", "link-local"), ("0.0.0.0:8091", "unspecified"),
    ("224.0.0.1:8091", "multicast"), ("100.64.0.1:8091", "not globally routable"),
    ("[::1]:8091", "loopback"), ("[::]:8091", "unspecified"), ("[fe80::1]:8091", "link-local"),
    ("[fe80::1%eth0]:8091", "link-local"), ("[fd00::1]:8091", "private"), ("[ff02::1]:8091", "multicast"),
    ("[::ffff:127.0.0.1]:8091", "loopback"), ("[::ffff:169.254.169.254]:80", "link-local"),
    ("[2002:a00:1::1]:8091", "private"),  # 6to4 of 10.0.0.1
    ("[64:ff9b::7f00:1]:8091", "loopback"),  # NAT64 of 127.0.0.1
    ("miner.example:8091", "a host name, not an address"), ("localhost:8091", "a host name, not an address"),
    ("010.0.0.1:8091", "a host name, not an address"),  # not an address Python reads: never resolved
])
def test_which_axons_are_refused(axon: str, reason: str | None) -> None:
    assert refused_axon(axon) == reason


MIXED = chain_metagraph(200, [
    chain_neuron(0, axon="23.94.0.10:8091", incentive=0.3),
    chain_neuron(1, axon="127.0.0.1:8091", incentive=0.3),
    chain_neuron(2, axon="[::ffff:10.0.0.2]:8091", incentive=0.2),
    chain_neuron(3, axon="[2606:4700::3]:8091", incentive=0.1),
    chain_neuron(4, axon="169.254.169.254:80", stake_alpha=50_000.0, validator_permit=True),
])


async def test_private_axons_of_the_chain_count_as_not_serving_once_per_read(
    world: World, tmp_path: Path, thread_clock: MockClock, nursery: trio.Nursery
) -> None:
    world.answer = MIXED
    actor = actor_for(world, tmp_path, screen_axons=True)
    cell = (await nursery.start(actor.run)).cell
    snapshot = cell.get()
    assert [n.uid for n in snapshot.serving_by_incentive] == [0, 3]
    assert snapshot.by_uid[1].axon is None and snapshot.by_uid[4].axon is None  # nor is it a validator to post to
    health = actor.health()
    assert health["axons_refused"] == 3
    assert health["axons_refused_examples"] == [
        {"uid": 1, "axon": "127.0.0.1:8091", "reason": "loopback"},
        {"uid": 2, "axon": "[::ffff:10.0.0.2]:8091", "reason": "private"},
        {"uid": 4, "axon": "169.254.169.254:80", "reason": "link-local"},
    ]
    # The cache keeps what the chain said; a restart without the chain screens it again.
    cached = {n["uid"]: n["axon"] for n in json.loads((tmp_path / "metagraph.json").read_text())["neurons"]}
    assert cached[1] == "127.0.0.1:8091"
    world.answer = RpcConnectionError("down")
    again = actor_for(world, tmp_path, screen_axons=True)
    async with trio.open_nursery() as second:
        restarted = (await second.start(again.run)).cell
        assert restarted.get().source == "cache"
        assert [n.uid for n in restarted.get().serving_by_incentive] == [0, 3]
        assert again.health()["axons_refused"] == 3
        second.cancel_scope.cancel()


async def test_the_gateway_refuses_private_chain_axons_unless_allowed(
    world: World, chain_settings: Settings, http: httpx.AsyncClient
) -> None:
    world.answer = MIXED
    with trio.fail_after(30):
        for allowed, serving, refused in ((False, [0, 3], 3), (True, [0, 1, 2, 3, 4], None)):
            settings = dataclasses.replace(chain_settings, subnet=dataclasses.replace(
                chain_settings.subnet, allow_private_axons=allowed))
            async with trio.open_nursery() as nursery:
                gateway = await start_gateway(nursery, settings, world)
                assert [n.uid for n in gateway.services.subnet.get().serving_by_incentive] == serving
                response = await http.get(f"{gateway.url}/health/ready")
                assert response.status_code == 200
                subnet = response.json()["subnet"]
                assert subnet["axons_refused"] == refused
                assert len(subnet["axons_refused_examples"]) == (refused or 0)
                metrics = scrape((await http.get(f"{gateway.url}/metrics")).text)
                found = metrics.find("sn1_gateway_subnet_axons_refused")
                assert [s.value for s in found] == ([] if refused is None else [refused])
                gateway.shutdown()


async def test_a_static_metagraph_keeps_every_address(gateway_settings: Settings, http: httpx.AsyncClient) -> None:
    settings = dataclasses.replace(gateway_settings, subnet=SubnetSettings(source="static", neurons=(
        NeuronSettings(uid=0, hotkey="5Local", axon="127.0.0.1:9001"),
        NeuronSettings(uid=1, hotkey="5Lan", axon="10.0.0.7:9001"),
    )))
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            gateway: Gateway = await nursery.start(lambda task_status: run(settings, task_status=task_status))
            assert [n.uid for n in gateway.services.subnet.get().serving_by_incentive] == [0, 1]
            subnet = (await http.get(f"{gateway.url}/health/ready")).json()["subnet"]
            assert subnet["axons_refused"] is None and subnet["axons_refused_examples"] == []
            gateway.shutdown()
