"""The gateway's hotkey: from a bittensor wallet, or from a development keypair URI."""

from __future__ import annotations

import os
import sys

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
        hotkey_file = bt.Wallet(wallet.name, wallet.hotkey, path).hotkey_file
        if hotkey_file.is_encrypted() and not sys.stdin.isatty() and not os.environ.get(hotkey_file.env_var_name()):
            # bittensor would ask for the password on a terminal there is none of, or read stdin
            raise HotkeyError(
                f"the hotkey at {keyfile} is encrypted and there is no terminal to ask for its password; "
                f"use an unencrypted hotkey (as validators usually do) or set {hotkey_file.env_var_name()}"
            )
        return hotkey_file.get_keypair()
    except FileNotFoundError as exc:
        raise HotkeyError(
            f"no hotkey at {keyfile} (wallet.name = {wallet.name!r}, wallet.hotkey = {wallet.hotkey!r}, "
            f"wallet.path = {wallet.path!r}); create one with btcli, or set wallet.uri for development"
        ) from exc
    except HotkeyError:
        raise
    except Exception as exc:  # unreadable, a bad password, corrupt: the binding raises assorted errors
        raise HotkeyError(f"cannot load the hotkey at {keyfile}: {exc}") from exc
