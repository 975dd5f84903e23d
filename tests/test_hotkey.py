"""Loading the gateway's hotkey from a bittensor wallet or a development URI."""

from __future__ import annotations

from pathlib import Path

import bittensor as bt
import pytest
import trio
from bittensor_core import Keypair

from config.settings import WalletSettings
from engine.hotkey import HotkeyError, load_hotkey


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
