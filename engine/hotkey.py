"""The gateway's hotkey: from a bittensor wallet, or from a development keypair URI."""

from __future__ import annotations

import os

from bittensor_core import Keypair

from config.settings import WalletSettings


class HotkeyError(Exception):
    """The hotkey cannot be loaded; the message names the path and the cause."""


def load_hotkey(wallet: WalletSettings) -> Keypair:
    """Load the signing keypair (blocking: reads a file). `wallet.uri` wins when set."""
    if wallet.uri:
        try:
            return Keypair.create_from_uri(wallet.uri)
        except Exception as exc:  # the binding raises plain errors for a malformed URI
            raise HotkeyError(f"wallet.uri: not a usable keypair URI ({exc})") from exc
    import bittensor as bt

    path = os.path.expanduser(wallet.path)
    keyfile = os.path.join(path, wallet.name, "hotkeys", wallet.hotkey)
    try:
        return bt.Wallet(wallet.name, wallet.hotkey, path).hotkey
    except FileNotFoundError as exc:
        raise HotkeyError(
            f"no hotkey at {keyfile} (wallet.name = {wallet.name!r}, wallet.hotkey = {wallet.hotkey!r}, "
            f"wallet.path = {wallet.path!r}); create one with btcli, or set wallet.uri for development"
        ) from exc
    except Exception as exc:  # unreadable, encrypted without a password, corrupt
        raise HotkeyError(f"cannot load the hotkey at {keyfile}: {exc}") from exc
