"""`sn1-gateway doctor`: each check passing and failing, on real files, sockets, Redis and a devnet."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from bittensor.balance import Balance
from bittensor.metagraph import Metagraph, MetagraphNeuron
from bittensor.result import RpcConnectionError
from bittensor_core import Keypair
from trio.testing import MockClock

from actors.keystore.keyfile import render
from actors.keystore.records import KeyInfo
from actors.subnet.actor import MetagraphSource
from actors.subnet.chain import ChainSource
from config.loading import load_settings
from config.settings import Settings
from devnet.network import Devnet
from engine import doctor
from engine.cli import main
from engine.doctor import CheckResult, Mark, run_checks
from tests.redis_server import RedisServer, free_port
from wire.metagraph import Neuron, SubnetSnapshot

ALICE = Keypair.create_from_uri("//Alice").ss58_address
BOB = Keypair.create_from_uri("//Bob").ss58_address
LONG_ADMIN_KEY = "k" * 40


def settings_of(tmp_path: Path, text: str, name: str = "gw.toml") -> Settings:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return load_settings(path, environ={})


def by_check(results: list[CheckResult]) -> dict[str, CheckResult]:
    return {r.check: r for r in results}


# -- config and hotkey ---------------------------------------------------------------------------


async def test_a_config_the_loader_refuses_fails_with_its_one_line_and_nothing_else_runs(tmp_path: Path) -> None:
    path = tmp_path / "gw.toml"
    path.write_text("[server]\nport = -1\n", encoding="utf-8")
    results = await run_checks(str(path), environ={})
    assert [r.line() for r in results] == [
        f"FAIL  config: {path}: server.port: expected an integer between 0 and 65535, found an integer -1; "
        "fix: edit the file as the message says (`sn1-gateway init NEW.toml` writes one with every key documented)"]


async def test_the_hotkey_loads_from_a_uri_or_fails_naming_the_wallet_path(tmp_path: Path) -> None:
    good = settings_of(tmp_path, '[wallet]\nuri = "//Alice"\n[subnet]\nsource = "static"\n')
    result, keypair = await doctor.check_hotkey(good)
    assert result.mark is Mark.OK and result.detail == f"signs as {ALICE} (wallet.uri, a development key)"
    assert keypair is not None and keypair.ss58_address == ALICE

    on_chain = settings_of(tmp_path, '[wallet]\nuri = "//Alice"\n')
    result, _ = await doctor.check_hotkey(on_chain)
    assert result.mark is Mark.WARN and "a development key, on a real chain" in result.detail

    wallets = tmp_path / "wallets"
    missing = settings_of(tmp_path, f'[wallet]\nname = "vali"\nhotkey = "hk"\npath = "{wallets}"\n')
    result, keypair = await doctor.check_hotkey(missing)
    assert keypair is None and result.mark is Mark.FAIL
    assert result.detail.startswith(f"no hotkey at {wallets}/vali/hotkeys/hk")


# -- the metagraph: chain and static -------------------------------------------------------------


def chain_neuron(uid: int, hotkey: str, *, axon: str | None = None, stake: float = 0.0,
                 validator_permit: bool = False) -> MetagraphNeuron:
    balance = Balance.from_alpha(stake, 1)
    return MetagraphNeuron(
        uid=uid, hotkey=hotkey, coldkey=f"5Cold{uid}", active=True, validator_permit=validator_permit,
        last_update=0, block_at_registration=0, rank=0.0, trust=0.0, consensus=0.0, incentive=0.5,
        dividends=0.0, pruning_score=0.0, emission=Balance.from_rao(0, 1), alpha_stake=balance,
        tao_stake=Balance.from_rao(0), total_stake=balance, axon=axon, identity=None, commitment=None,
    )


def chain_metagraph(neurons: list[MetagraphNeuron]) -> Metagraph:
    return Metagraph(
        netuid=1, mechid=0, name="apex", symbol="ALPHA", block=4321, tempo=360, last_step=0,
        blocks_since_last_step=0, owner_hotkey="", owner_coldkey="", network_registered_at=0,
        num_uids=len(neurons), max_uids=256, price=None, moving_price=None, identity=None, neurons=neurons,
        commitments={}, unregistered_commitments={}, raw={},
    )


class FakeChain:
    """`bittensor.Subtensor` as ChainSource uses it; `answer` gives the metagraph or raises."""

    def __init__(self, answer: Callable[[], Metagraph]) -> None:
        self.answer = answer

    @property
    def subnets(self) -> FakeChain:
        return self

    def metagraph(self, netuid: int, **kw: Any) -> Metagraph:
        return self.answer()

    def close(self) -> None:
        pass


def chain_of(answer: Callable[[], Metagraph]) -> Callable[[Settings], MetagraphSource]:
    return lambda s: ChainSource(s.subnet.netuid, s.subnet.network, client_factory=lambda network: FakeChain(answer))


@pytest.fixture
def released() -> Iterator[threading.Event]:
    """Set at the end of the test: a chain read that hangs until then ends with it."""
    event = threading.Event()
    yield event
    event.set()


@pytest.fixture
def thread_clock() -> MockClock:
    """Autojump once trio has been idle a while (a worker thread is reading the chain meanwhile)."""
    return MockClock(autojump_threshold=0.1)


async def test_a_chain_that_does_not_answer_within_60_s_is_unreachable(
    tmp_path: Path, released: threading.Event, thread_clock: MockClock
) -> None:
    def hang() -> Metagraph:
        released.wait(30)
        raise RpcConnectionError("released")

    settings = settings_of(tmp_path, "")
    result, snapshot = await doctor.check_metagraph(settings, source_factory=chain_of(hang))
    assert snapshot is None
    assert result.line() == (
        "FAIL  metagraph: the chain is unreachable: finney did not answer within 60 s; fix: check this "
        "machine's access to finney, or set subnet.network to a reachable endpoint")


async def test_a_chain_read_that_fails_says_the_chain_is_unreachable_and_why(tmp_path: Path) -> None:
    def refuse() -> Metagraph:
        raise RpcConnectionError("could not connect to any endpoint")

    result, _ = await doctor.check_metagraph(settings_of(tmp_path, ""), source_factory=chain_of(refuse))
    assert result.mark is Mark.FAIL
    assert result.detail == "the chain is unreachable: finney: RpcConnectionError: could not connect to any endpoint"


async def test_an_unknown_network_fails_as_serve_would_refuse_it(tmp_path: Path) -> None:
    settings = settings_of(tmp_path, '[subnet]\nnetwork = "no-such-net"\n')
    result, _ = await doctor.check_metagraph(settings)  # the real chain client, built cold: no I/O
    assert result.mark is Mark.FAIL and result.detail.startswith("subnet.network: ")


async def test_the_chain_lists_our_hotkey_and_its_stake(tmp_path: Path) -> None:
    graph = chain_metagraph([
        chain_neuron(0, ALICE, stake=25_000.0, validator_permit=True, axon="10.0.0.1:8091"),
        chain_neuron(1, BOB, stake=500.0),
        chain_neuron(2, "5Miner", axon="10.0.0.2:8091"),
    ])
    settings = settings_of(tmp_path, "")
    result, snapshot = await doctor.check_metagraph(settings, source_factory=chain_of(lambda: graph))
    assert result.mark is Mark.OK
    assert result.detail.startswith("finney subnet 1: 3 neurons, 1 serving miners at block 4321, read in ")
    assert snapshot is not None
    assert doctor.check_registration(settings, snapshot, ALICE).line() == (
        "ok    our hotkey: uid 0, stake 25,000 (miners that verify Epistula ask for 10,000)")
    assert doctor.check_registration(settings, snapshot, BOB).line() == (
        "WARN  our hotkey: uid 1, stake 500: miners that verify Epistula refuse a signer under 10,000 stake (401); "
        "fix: stake at least 10,000 on this hotkey (`btcli stake add`), or sign with a hotkey that has it")
    unknown = doctor.check_registration(settings, snapshot, "5Nobody")
    assert unknown.line() == (
        "FAIL  our hotkey: 5Nobody is not in the metagraph of finney subnet 1: miners that verify Epistula refuse "
        "a signer they do not know (401); fix: register it (`btcli subnets register --netuid 1`), or sign with "
        "the registered validator hotkey (wallet.*)")


STATIC = f"""
[subnet]
source = "static"

[[subnet.neurons]]
uid = 0
hotkey = "{ALICE}"
stake = 20000.0

[[subnet.neurons]]
uid = 1
hotkey = "5Miner"
axon = "127.0.0.1:9001"
"""


async def test_a_static_subnet_is_checked_from_its_neurons(tmp_path: Path) -> None:
    settings = settings_of(tmp_path, STATIC)
    result, snapshot = await doctor.check_metagraph(settings)
    assert result.line() == "ok    metagraph: static subnet 1 (subnet.neurons): 2 neurons, 1 serving miners"
    assert snapshot is not None and doctor.check_registration(settings, snapshot, ALICE).mark is Mark.OK
    assert doctor.check_registration(settings, snapshot, BOB).fix == "list it in [[subnet.neurons]] as the chain lists it"

    empty = settings_of(tmp_path, '[subnet]\nsource = "static"\n', "empty.toml")
    result, _ = await doctor.check_metagraph(empty)
    assert result.mark is Mark.FAIL and "has no neurons: there are no miners to ask" in result.detail

    no_miner = settings_of(tmp_path, STATIC.split("[[subnet.neurons]]\nuid = 1")[0], "nominer.toml")
    result, _ = await doctor.check_metagraph(no_miner)
    assert result.mark is Mark.WARN and "every chat request would answer 503" in result.detail


# -- validators for scoring, and the probe -----------------------------------------------------------


def snapshot_of(*neurons: Neuron) -> SubnetSnapshot:
    return SubnetSnapshot.of(1, neurons)


VALIDATOR = Neuron(7, "5Vali", "10.0.0.7:8091", stake=50_000.0, validator_permit=True)
SMALL_VALIDATOR = Neuron(8, "5Small", "10.0.0.8:8091", stake=10.0, validator_permit=True)
SILENT_VALIDATOR = Neuron(9, "5Silent", None, stake=90_000.0, validator_permit=True)


def test_eligible_validators_follow_the_forwarders_rule(tmp_path: Path) -> None:
    settings = settings_of(tmp_path, "")
    result, found = doctor.scoring_validators(settings, snapshot_of(VALIDATOR, SMALL_VALIDATOR, SILENT_VALIDATOR))
    assert [v.hotkey for v in found] == ["5Vali"]
    assert result.line() == ("ok    validators: 1 eligible (validator permit, stake >= 1,000, serving axon): "
                             "5Vali at 10.0.0.7:8091 (stake 50,000)")

    result, found = doctor.scoring_validators(settings, snapshot_of(SMALL_VALIDATOR, SILENT_VALIDATOR))
    assert found == () and result.mark is Mark.FAIL
    assert result.detail == ("none eligible: no neuron in the metagraph has a validator permit, stake >= 1000 and a "
                             "serving axon (or set scoring.validator)")

    fixed = settings_of(tmp_path, '[scoring]\nvalidator = "10.9.9.9:8094"\n', "fixed.toml")
    result, _ = doctor.scoring_validators(fixed, snapshot_of(VALIDATOR))
    assert result.mark is Mark.FAIL
    assert result.fix == "set scoring.validator_hotkey to the hotkey of the validator at 10.9.9.9:8094"

    wrong = settings_of(tmp_path, '[scoring]\nvalidator = "10.0.0.7:8091"\nvalidator_hotkey = "5Other"\n', "w.toml")
    result, _ = doctor.scoring_validators(wrong, snapshot_of(VALIDATOR))
    assert result.mark is Mark.WARN and "the metagraph lists 5Vali at 10.0.0.7:8091" in result.detail

    off = settings_of(tmp_path, "[scoring]\nenabled = false\n", "off.toml")
    result, found = doctor.scoring_validators(off, snapshot_of(VALIDATOR))
    assert result.mark is Mark.NOTE and found == ()


async def devnet_config(nursery: trio.Nursery, tmp_path: Path, **kw: Any) -> tuple[Devnet, Path]:
    devnet: Devnet = await nursery.start(Devnet(miners=1, validator_poll_s=60.0, **kw).run)
    path = tmp_path / "gw.toml"
    path.write_text("[server]\nport = 0\n" + devnet.config_toml(), encoding="utf-8")
    return devnet, path


async def test_the_probe_passes_when_the_validator_takes_our_hotkey(tmp_path: Path, nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        devnet, path = await devnet_config(nursery, tmp_path)
        results = by_check(await run_checks(str(path), probe=True, environ={}))
    v = devnet.validator
    assert results["probe"].line() == (
        f"ok    probe: validator {v.hotkey} at {v.address} accepts our hotkey (HTTP 200 to an empty scoring payload)")
    assert [(r.path, r.status) for r in v.received] == [("/scoring", 200)]
    assert v.scored_total == 0  # it took the empty payload and scored nothing


async def test_the_probe_says_exactly_what_to_set_when_the_validator_refuses_our_hotkey(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    with trio.fail_after(10):
        devnet, path = await devnet_config(nursery, tmp_path)
        path.write_text(path.read_text().replace('uri = "//devnet/gateway"', 'uri = "//Alice"'), encoding="utf-8")
        results = by_check(await run_checks(str(path), probe=True, environ={}))
    v = devnet.validator
    assert results["probe"].line() == (
        f"FAIL  probe: validator {v.hotkey} at {v.address} refuses our hotkey {ALICE} (HTTP 401): its API_HOTKEY "
        f"does not name it; fix: set API_HOTKEY={ALICE} in that validator's environment (.env.validator) and "
        "restart it")
    assert [(r.path, r.status, r.headers["epistula-signed-by"]) for r in v.received] == [("/scoring", 401, ALICE)]


async def test_the_probe_fails_when_the_validator_does_not_answer(tmp_path: Path, nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        devnet, path = await devnet_config(nursery, tmp_path)
        await devnet.validator.go_down()
        results = by_check(await run_checks(str(path), probe=True, environ={}))
    probe = results["probe"]
    assert probe.mark is Mark.FAIL and probe.detail.startswith(f"validator {devnet.validator.hotkey} at "
                                                               f"{devnet.validator.address} did not answer: ")
    assert probe.fix == f"check that it runs and that this machine reaches {devnet.validator.address}"


async def test_without_probe_nothing_is_sent_to_the_validator(tmp_path: Path, nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        devnet, path = await devnet_config(nursery, tmp_path)
        results = by_check(await run_checks(str(path), environ={}))
    assert results["probe"].mark is Mark.SKIP and not devnet.validator.received


# -- Redis ---------------------------------------------------------------------------------------------


async def test_redis_answers_ping(tmp_path: Path, redis_server: RedisServer) -> None:
    settings = settings_of(tmp_path, f'[auth]\nstore = "redis"\nredis_url = "{redis_server.url}"\n')
    assert (await doctor.check_redis(settings)).line() == (
        f"ok    redis: answers PING at redis://127.0.0.1:{redis_server.port}/0")
    assert (await doctor.check_redis(settings_of(tmp_path, "", "file.toml"))).mark is Mark.SKIP


async def test_redis_that_does_not_answer_fails_within_seconds(tmp_path: Path) -> None:
    port = free_port()
    settings = settings_of(tmp_path, f'[auth]\nstore = "redis"\nredis_url = "redis://127.0.0.1:{port}/0"\n')
    with trio.fail_after(5):
        result = await doctor.check_redis(settings)
    assert result.mark is Mark.FAIL
    assert result.detail.startswith(f"auth.redis_url: cannot reach Redis at redis://127.0.0.1:{port}/0 (")
    assert result.fix == "start Redis there, or correct auth.redis_url"


# -- files: the keys file and the spool -------------------------------------------------------------------


def keys_file_with_one_key(path: Path, mode: int = 0o600) -> None:
    info = KeyInfo(id="a" * 64, prefix="sn1-abcd", rate_limit=60, created_at=1_760_000_000.0)
    path.write_bytes(render({info.id: info}))
    path.chmod(mode)


def test_the_keys_file_is_checked_without_creating_anything(tmp_path: Path) -> None:
    settings = settings_of(tmp_path, '[auth]\nkeys_file = "state/keys.toml"\n')
    before = sorted(tmp_path.iterdir())
    result = doctor.check_keys_file(settings)
    assert result.mark is Mark.WARN
    assert result.detail == (f"{tmp_path}/state/keys.toml does not exist yet: no API keys, every client request is "
                             f"refused (401); the first key creates it (0600) (its folder {tmp_path}/state is "
                             "created 0700)")
    assert sorted(tmp_path.iterdir()) == before  # nothing made, not even the folder

    (tmp_path / "state").mkdir()
    keys = tmp_path / "state" / "keys.toml"
    keys_file_with_one_key(keys, 0o644)
    assert doctor.check_keys_file(settings).line() == (
        f"FAIL  keys file: others may read {keys} (mode 0644); fix: chmod 600 {keys}")
    keys.chmod(0o600)
    assert doctor.check_keys_file(settings).line() == f"ok    keys file: {keys}: 1 API keys, mode 0600, writable"
    assert sorted(p.name for p in keys.parent.iterdir()) == ["keys.toml"]  # no lock file made either

    keys.write_text("[not really\n", encoding="utf-8")
    result = doctor.check_keys_file(settings)
    assert result.mark is Mark.FAIL and result.detail.startswith(f"{keys}: ")

    keys.unlink()
    keys.mkdir()
    assert doctor.check_keys_file(settings).detail == f"{keys} is not a file"


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_a_keys_folder_this_user_cannot_write_fails(tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    keys_file_with_one_key(folder / "keys.toml")
    folder.chmod(0o500)
    try:
        settings = settings_of(tmp_path, '[auth]\nkeys_file = "ro/keys.toml"\n')
        result = doctor.check_keys_file(settings)
    finally:
        folder.chmod(0o700)
    assert result.mark is Mark.FAIL and "is not writable by" in result.detail


def test_the_spool_folder_is_checked_without_creating_anything(tmp_path: Path) -> None:
    settings = settings_of(tmp_path, '[scoring]\nspool_dir = "spool"\n')
    spool = tmp_path / "spool"
    assert doctor.check_spool(settings).line() == (
        f"ok    spool: {spool} does not exist yet; the gateway creates it (0700) at start")
    assert not spool.exists()

    spool.mkdir(mode=0o755)
    spool.chmod(0o755)
    assert doctor.check_spool(settings).line() == (
        f"FAIL  spool: others may read the prompts in {spool} (mode 0755); fix: chmod 700 {spool}")
    spool.chmod(0o700)
    segment = spool / "00000000000000000001.seg"
    segment.write_bytes(b"x" * 10)
    segment.chmod(0o644)
    assert doctor.check_spool(settings).line() == (
        f"FAIL  spool: others may read 1 files in {spool} (e.g. {segment.name}, mode 0644); fix: chmod 600 {spool}/*")
    segment.chmod(0o600)
    assert doctor.check_spool(settings).line() == (
        f"ok    spool: {spool}: mode 0700, writable; 10 bytes of segments wait for a validator or replay")

    spool.rename(tmp_path / "moved")
    spool.write_text("a file", encoding="utf-8")
    assert doctor.check_spool(settings).detail == f"{spool} is not a folder"


# -- the port and the admin key ----------------------------------------------------------------------------


def test_the_port_is_free_or_held(tmp_path: Path) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        settings = settings_of(tmp_path, f'[server]\nhost = "127.0.0.1"\nport = {port}\n')
        assert doctor.check_port(settings).line() == (
            f"FAIL  port: 127.0.0.1:{port} is in use (a gateway, or the upstream API, still running?); "
            "fix: stop what listens there, or set server.port")
    assert doctor.check_port(settings).line() == f"ok    port: 127.0.0.1:{port} is free"
    assert doctor.check_port(settings_of(tmp_path, "[server]\nport = 0\n", "zero.toml")).mark is Mark.NOTE
    foreign = settings_of(tmp_path, '[server]\nhost = "192.0.2.1"\nport = 42170\n', "foreign.toml")
    assert doctor.check_port(foreign).detail == "192.0.2.1 is not an address of this machine"


def test_a_port_left_in_time_wait_by_a_stopped_server_counts_as_free(tmp_path: Path) -> None:
    """As servers bind (SO_REUSEADDR: hypercorn, uvicorn): a just-stopped API must not look as if it still ran."""
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        served, _ = listener.accept()
        served.close()  # the server's side closes first: its address waits in TIME_WAIT
        client.recv(1)
        client.close()
    deadline = time.monotonic() + 2
    while not time_wait_on(port) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert time_wait_on(port)
    settings = settings_of(tmp_path, f'[server]\nhost = "127.0.0.1"\nport = {port}\n')
    assert doctor.check_port(settings).line() == f"ok    port: 127.0.0.1:{port} is free"


def time_wait_on(port: int) -> bool:
    """Whether a TCP connection from local `port` is in TIME_WAIT (state 06 in /proc/net/tcp)."""
    lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    return any(f":{port:04X}" == fields[1][-5:] and fields[3] == "06" for fields in (line.split() for line in lines))


def test_the_admin_key_is_set_or_the_admin_endpoints_are_off(tmp_path: Path) -> None:
    assert doctor.check_admin_key(settings_of(tmp_path, ""), {}).line() == (
        "note  admin key: auth.admin_key is empty: the /api_management endpoints are off "
        "(manage keys with `sn1-gateway keys ...`)")
    short = settings_of(tmp_path, '[auth]\nadmin_key = "hunter2"\n', "short.toml")
    result = doctor.check_admin_key(short, {})
    assert result.mark is Mark.WARN and "only 7 characters" in result.detail and "hunter2" not in result.line()
    long = load_settings(tmp_path / "short.toml", environ={"SN1_GATEWAY_ADMIN_KEY": LONG_ADMIN_KEY})
    assert doctor.check_admin_key(long, {"SN1_GATEWAY_ADMIN_KEY": LONG_ADMIN_KEY}).line() == (
        "ok    admin key: set (from SN1_GATEWAY_ADMIN_KEY); the /api_management endpoints are on")


# -- the command and its exit status -------------------------------------------------------------------------


def all_good_config(tmp_path: Path, port: int) -> Path:
    path = tmp_path / "gw.toml"
    path.write_text(f"""
[server]
host = "127.0.0.1"
port = {port}

[auth]
admin_key = "{LONG_ADMIN_KEY}"

[wallet]
uri = "//Alice"

{STATIC}
[[subnet.neurons]]
uid = 2
hotkey = "5Vali"
axon = "127.0.0.1:9002"
stake = 50000.0
validator_permit = true
""", encoding="utf-8")
    keys_file_with_one_key(tmp_path / "keys.toml")
    return path


def test_doctor_exits_0_when_every_check_passes_and_1_when_one_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    port = free_port()
    path = all_good_config(tmp_path, port)
    assert main(["doctor", "--config", str(path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in out[:-1]] == [
        "ok    config", "ok    hotkey", "ok    metagraph", "ok    our hotkey", "ok    validators", "skip  probe",
        "skip  redis", "ok    keys file", "ok    spool", "ok    port", "ok    admin key"]
    assert out[-1] == "doctor: every check passed"

    (tmp_path / "keys.toml").unlink()  # a warning: still 0
    assert main(["doctor", "--config", str(path)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "doctor: every check passed, 1 warning"

    with socket.socket() as held:
        held.bind(("127.0.0.1", port))
        held.listen()
        assert main(["doctor", "--config", str(path)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert f"FAIL  port: 127.0.0.1:{port} is in use" in "\n".join(out)
    assert out[-1] == "doctor: 1 check failed, 1 warning; fix them and run doctor again"
