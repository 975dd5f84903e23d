"""The gateway's hotkey: from a bittensor wallet, or from a development keypair URI."""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from typing import Any

from bittensor_core import Keypair

from config.settings import WalletSettings
from wire.metagraph import SubnetSnapshot

# docs/protocol.md, "What receivers check": the reference miner, when it verifies signers, refuses (401)
# one that is not in the metagraph or holds less than this stake.
MINER_SIGNER_MIN_STAKE = 10_000.0


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


@dataclass(frozen=True)
class HotkeyStanding:
    """What miners that verify signers will make of the gateway's hotkey, by one metagraph snapshot.

    Advice for the operator, not a reason to stop serving: miners that do not verify still answer.
    `registered` and `stake` are None while no metagraph is known yet.
    """

    hotkey: str
    registered: bool | None
    stake: float | None
    warnings: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {"hotkey": self.hotkey, "hotkey_registered": self.registered, "hotkey_stake": self.stake,
                "warnings": list(self.warnings)}


def hotkey_standing(snapshot: SubnetSnapshot, hotkey: str) -> HotkeyStanding:
    if snapshot.fetched_at is None and not snapshot.neurons:
        return HotkeyStanding(hotkey, None, None)
    neuron = snapshot.by_hotkey.get(hotkey)
    if neuron is None:
        return HotkeyStanding(hotkey, False, 0.0, (
            f"the gateway's hotkey {hotkey} is not in the metagraph of subnet {snapshot.netuid}: miners that "
            f"verify signers refuse its requests (401); register it (or sign with the validator's hotkey)",))
    if neuron.stake < MINER_SIGNER_MIN_STAKE:
        return HotkeyStanding(hotkey, True, neuron.stake, (
            f"the gateway's hotkey {hotkey} (uid {neuron.uid}) holds {_amount(neuron.stake)} stake, under the "
            f"{MINER_SIGNER_MIN_STAKE:,.0f} that miners verifying signers require: they refuse its requests (401)",))
    return HotkeyStanding(hotkey, True, neuron.stake)


def _amount(stake: float) -> str:
    """Rounded down, so that an amount under the minimum never reads as the minimum."""
    return f"{math.floor(stake * 100) / 100:,.2f}".rstrip("0").rstrip(".")
