"""The gateway's hotkey: loading it from a bittensor wallet or a development URI, and what miners that verify
signers will make of it in the metagraph."""

from __future__ import annotations

import dataclasses
import logging
from functools import partial
from pathlib import Path

import bittensor as bt
import httpx
import pytest
import trio
from bittensor_core import Keypair
from trio.testing import MockClock

from actors.subnet.actor import SubnetActor
from config.settings import DevnetSettings, NeuronSettings, Settings, SubnetSettings, WalletSettings
from devnet.network import DEFAULT_GATEWAY_URI
from engine.gateway import Gateway, run, serve_with_devnet
from tests.metrics_support import scrape
from wire.hotkey import HotkeyError, HotkeyStanding, hotkey_standing, load_hotkey
from wire.metagraph import Neuron, SubnetSnapshot
from wire.snapshot import SnapshotCell


def make_wallet(path: Path, name: str = "validator", hotkey: str = "hot") -> bt.Wallet:
    wallet = bt.Wallet(name, hotkey, str(path))
    wallet.create_new_hotkey(overwrite=True, suppress=True)
    return wallet


def test_a_uri_gives_the_well_known_development_key() -> None:
    keypair = load_hotkey(WalletSettings(uri="//Alice", path="/nonexistent"))
    assert keypair.ss58_address == Keypair.create_from_uri("//Alice").ss58_address


def test_a_malformed_uri_is_a_clear_error() -> None:
    with pytest.raises(HotkeyError, match=r"wallet\.uri: not a usable keypair URI"):
        load_hotkey(WalletSettings(uri="not a uri at all //"))


def test_a_real_wallet_hotkey_is_loaded_and_signs(tmp_path: Path) -> None:
    wallet = make_wallet(tmp_path)
    expected = wallet.hotkey.ss58_address
    keypair = load_hotkey(WalletSettings(name="validator", hotkey="hot", path=str(tmp_path)))
    assert keypair.ss58_address == expected
    signature = keypair.sign(b"message")
    assert Keypair(ss58_address=expected).verify(b"message", signature)


def test_the_wallet_path_may_start_with_a_tilde(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    wallet = make_wallet(tmp_path / ".bittensor" / "wallets")
    keypair = load_hotkey(WalletSettings(name="validator", hotkey="hot", path="~/.bittensor/wallets"))
    assert keypair.ss58_address == wallet.hotkey.ss58_address


def test_a_missing_wallet_names_the_path_and_the_settings(tmp_path: Path) -> None:
    with pytest.raises(HotkeyError) as caught:
        load_hotkey(WalletSettings(name="validator", hotkey="hot", path=str(tmp_path)))
    message = str(caught.value)
    assert message.startswith(f"no hotkey at {tmp_path / 'validator' / 'hotkeys' / 'hot'} ")
    assert "wallet.name = 'validator'" in message and "wallet.hotkey = 'hot'" in message
    assert "set wallet.uri for development" in message


def test_a_missing_hotkey_in_an_existing_wallet_names_its_path(tmp_path: Path) -> None:
    make_wallet(tmp_path, hotkey="other")
    with pytest.raises(HotkeyError, match=f"no hotkey at {tmp_path / 'validator' / 'hotkeys' / 'hot'}"):
        load_hotkey(WalletSettings(name="validator", hotkey="hot", path=str(tmp_path)))


@pytest.mark.parametrize("content", [b"", b"{not json", b'{"secretPhrase": 12}', b"\xff\xfe\x00"])
def test_a_corrupt_hotkey_file_is_an_error_naming_its_path(tmp_path: Path, content: bytes) -> None:
    keyfile = tmp_path / "validator" / "hotkeys" / "hot"
    keyfile.parent.mkdir(parents=True)
    keyfile.write_bytes(content)
    with pytest.raises(HotkeyError, match=f"^cannot load the hotkey at {keyfile}: "):
        load_hotkey(WalletSettings(name="validator", hotkey="hot", path=str(tmp_path)))


def test_an_unreadable_hotkey_is_an_error_naming_its_path(tmp_path: Path) -> None:
    keyfile = tmp_path / "validator" / "hotkeys" / "hot"
    keyfile.mkdir(parents=True)  # a folder where the file should be: unreadable even for root
    with pytest.raises(HotkeyError, match=f"^cannot load the hotkey at {keyfile}: "):
        load_hotkey(WalletSettings(name="validator", hotkey="hot", path=str(tmp_path)))


async def test_an_encrypted_hotkey_without_a_terminal_fails_fast_instead_of_prompting(tmp_path: Path) -> None:
    # What bittensor writes for a password-protected key starts with this marker; encrypting a real one
    # takes about ten seconds of key stretching, and only the marker matters here.
    keyfile = tmp_path / "validator" / "hotkeys" / "hot"
    keyfile.parent.mkdir(parents=True)
    keyfile.write_bytes(b"$NACL" + bytes(range(64)))
    settings = WalletSettings(name="validator", hotkey="hot", path=str(tmp_path))
    with trio.fail_after(10), pytest.raises(HotkeyError) as caught:
        # in a thread, as `run` does it; a prompt would block there and trip the deadline
        await trio.to_thread.run_sync(load_hotkey, settings, abandon_on_cancel=True)
    message = str(caught.value)
    assert message.startswith(f"the hotkey at {tmp_path / 'validator' / 'hotkeys' / 'hot'} is encrypted")
    assert "BT_PW_" in message


# --- what miners that verify signers will make of the hotkey (docs/protocol.md, "What receivers check")

ALICE = Keypair.create_from_uri("//Alice").ss58_address


def snapshot_with(*neurons: Neuron) -> SubnetSnapshot:
    return SubnetSnapshot.of(1, neurons, fetched_at=1.0, source="static")


def test_standing_in_a_metagraph() -> None:
    assert hotkey_standing(SubnetSnapshot(netuid=1), ALICE) == HotkeyStanding(ALICE, None, None)  # none read yet
    absent = hotkey_standing(snapshot_with(Neuron(0, "5Other", "23.94.0.1:1")), ALICE)
    assert (absent.registered, absent.stake) == (False, 0.0)
    (warning,) = absent.warnings
    assert f"hotkey {ALICE} is not in the metagraph of subnet 1" in warning and "401" in warning
    poor = hotkey_standing(snapshot_with(Neuron(7, ALICE, None, stake=9_999.5)), ALICE)
    assert (poor.registered, poor.stake) == (True, 9_999.5)
    (warning,) = poor.warnings
    assert f"hotkey {ALICE} (uid 7) holds 9,999.5 stake, under the 10,000" in warning and "401" in warning
    assert hotkey_standing(snapshot_with(Neuron(7, ALICE, None, stake=10_000.0)), ALICE).warnings == ()


def static_settings(settings: Settings, *neurons: NeuronSettings) -> Settings:
    return dataclasses.replace(settings, subnet=SubnetSettings(source="static", neurons=neurons))


async def test_the_gateway_warns_at_start_and_on_readiness_without_turning_unready(
    gateway_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    settings = static_settings(gateway_settings, NeuronSettings(uid=0, hotkey=ALICE, stake=500.0),
                               NeuronSettings(uid=1, hotkey="5Miner", axon="127.0.0.1:9", stake=1.0))
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery, httpx.AsyncClient() as http:
            gateway: Gateway = await nursery.start(lambda task_status: run(settings, task_status=task_status))
            response = await http.get(f"{gateway.url}/health/ready")
            metrics = (await http.get(f"{gateway.url}/metrics")).text
            gateway.shutdown()
    assert response.status_code == 200 and response.json()["ready"] is True  # advice, not unreadiness
    subnet = response.json()["subnet"]
    assert (subnet["hotkey"], subnet["hotkey_registered"], subnet["hotkey_stake"]) == (ALICE, True, 500.0)
    (warning,) = subnet["warnings"]
    assert "holds 500 stake, under the 10,000" in warning
    assert scrape(metrics).value("sn1_gateway_subnet_hotkey_registered") == 1
    assert scrape(metrics).value("sn1_gateway_subnet_hotkey_stake") == 500
    logged = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert logged.count(warning) == 1


@pytest.fixture
def thread_clock() -> MockClock:
    """Autojump once trio has been idle a while: the source is read in a worker thread."""
    return MockClock(autojump_threshold=0.1)


class Changing:
    """A metagraph source whose answer the test changes."""

    name = "chain"

    def __init__(self, snapshot: SubnetSnapshot) -> None:
        self.snapshot = snapshot
        self.reads = 0

    def fetch(self) -> SubnetSnapshot:
        self.reads += 1
        return self.snapshot


async def test_the_standing_is_judged_again_on_each_new_metagraph_only(
    thread_clock: MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    source = Changing(snapshot_with(Neuron(0, "5Other", "23.94.0.1:1")))
    cell: SnapshotCell[SubnetSnapshot] = SnapshotCell(SubnetSnapshot(netuid=1))
    actor = SubnetActor(source, cell, interval_s=60.0, hotkey=ALICE)
    async with trio.open_nursery() as nursery:
        await nursery.start(actor.run)
        assert actor.health()["hotkey_registered"] is False and len(actor.health()["warnings"]) == 1
        for _ in range(100):
            actor.health()  # reports read the judgement, they do not redo it
        source.snapshot = snapshot_with(Neuron(3, ALICE, None, stake=25_000.0))
        await trio.sleep(61)
        assert source.reads == 2
        health = actor.health()
        assert (health["hotkey_registered"], health["hotkey_stake"], health["warnings"]) == (True, 25_000.0, [])
        nursery.cancel_scope.cancel()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sum("is not in the metagraph" in w for w in warnings) == 1


async def test_a_gateway_on_the_devnet_has_a_registered_hotkey_with_enough_stake(
    gateway_settings: Settings, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    ready: list[Gateway] = []
    started = trio.Event()

    def on_ready(gateway: Gateway) -> None:
        ready.append(gateway)
        started.set()

    settings = dataclasses.replace(gateway_settings, wallet=WalletSettings(), devnet=DevnetSettings(miners=2))
    with trio.fail_after(30):
        nursery.start_soon(partial(serve_with_devnet, settings, on_ready=on_ready))
        await started.wait()
        subnet = ready[0].services.readiness()["subnet"]
        ready[0].shutdown()
        await ready[0].wait_stopped()
    assert subnet["hotkey"] == Keypair.create_from_uri(DEFAULT_GATEWAY_URI).ss58_address
    assert subnet["hotkey_registered"] is True and subnet["hotkey_stake"] >= 10_000
    assert subnet["warnings"] == []
    assert not any("hotkey" in r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
