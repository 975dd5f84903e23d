"""The devnet: N simulated miners and one simulated validator, each a real server on loopback.

`await nursery.start(devnet.run)` starts them all. The gateway then needs `devnet.source` (its
metagraph) and `devnet.configure(settings)` (the settings that point it at the devnet); or, for a
gateway in another process, `devnet.config_toml()`.
"""

from __future__ import annotations

import dataclasses
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType

import tomlkit
import trio
from bittensor_core import Keypair

from config.loading import ConfigError
from config.settings import Settings
from devnet.miner import Miner, MinerFault, MinerTiming, parse_faults
from devnet.validator import Validator, ValidatorFault, parse_validator_fault
from wire.metagraph import Neuron, SubnetSnapshot
from wire.signals import absorb_signal_echoes

DEFAULT_GATEWAY_URI = "//devnet/gateway"
# The gateway's own neuron holds more than the 10,000 stake that miners verifying signers ask of it
# (docs/protocol.md, "What receivers check"), so a gateway on the devnet gets no warning about its hotkey.
GATEWAY_STAKE = 20_000.0


class DevnetSource:
    """The devnet's metagraph, as a MetagraphSource for the gateway's SubnetActor."""

    name = "devnet"

    def __init__(self, netuid: int, neurons: Sequence[Neuron]) -> None:
        self.netuid = netuid
        self.neurons = tuple(neurons)

    def fetch(self) -> SubnetSnapshot:
        return SubnetSnapshot.of(self.netuid, self.neurons, source="devnet", fetched_at=time.time())


CONFIG_NAMES: Mapping[str, str] = MappingProxyType(
    {"miners": "devnet.miners", "faults": "devnet.faults", "gateway_uri": "wallet.uri",
     "validator_fault": "devnet.validator_fault"})


class Devnet:
    def __init__(
        self,
        *,
        miners: int = 5,
        faults: Sequence[MinerFault | str] = (),
        validator_fault: ValidatorFault | str = ValidatorFault.HEALTHY,
        gateway_uri: str = DEFAULT_GATEWAY_URI,
        netuid: int = 1,
        timing: MinerTiming | None = None,
        validator_poll_s: float = 5.0,
        host: str = "127.0.0.1",
        names: Mapping[str, str] = CONFIG_NAMES,
    ) -> None:
        """`names`: what errors call `miners`, `faults`, `validator_fault` and `gateway_uri` (config keys,
        or CLI options)."""
        if miners < 1:
            raise ConfigError(f"{names['miners']}: a devnet needs at least one miner, found {miners}")
        if len(faults) > miners:
            raise ConfigError(f"{names['faults']}: {len(faults)} fault modes for {miners} miners")
        fault_modes = parse_faults(faults, key=names["faults"])
        validator_mode = parse_validator_fault(str(validator_fault), key=names.get("validator_fault", "validator_fault"))
        self.netuid = netuid
        self.gateway_uri = gateway_uri
        try:
            self.gateway_hotkey: str = Keypair.create_from_uri(gateway_uri).ss58_address
        except Exception as exc:  # the binding raises plain errors for a malformed URI
            raise ConfigError(f"{names['gateway_uri']}: not a usable keypair URI ({exc})") from exc
        weight_total = miners * (miners + 1) / 2
        self.validator = Validator(gateway_hotkey=self.gateway_hotkey, miners=self._miner_neurons, uid=miners,
                                   poll_interval_s=validator_poll_s, host=host, fault=validator_mode)
        self.miners = [
            Miner(
                uid,
                signers=(self.gateway_hotkey, self.validator.hotkey),
                spared=(self.validator.hotkey,),  # its availability poll is not a target of gzip_bomb
                fault=fault_modes[uid] if uid < len(fault_modes) else MinerFault.HEALTHY,
                timing=timing,
                incentive=round((miners - uid) / weight_total, 6),  # uid 0 earns most; they sum to 1
                stake=10.0 + uid,
                host=host,
            )
            for uid in range(miners)
        ]
        self._source: DevnetSource | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> Devnet:
        """The devnet of `settings.devnet`, trusting `wallet.uri` (or the devnet's development key)."""
        return cls(miners=settings.devnet.miners, faults=settings.devnet.faults,
                   validator_fault=settings.devnet.validator_fault,
                   gateway_uri=settings.wallet.uri or DEFAULT_GATEWAY_URI, netuid=settings.subnet.netuid)

    async def run(self, *, task_status: trio.TaskStatus[Devnet] = trio.TASK_STATUS_IGNORED) -> None:
        """Start the miners, then the validator (which polls them first); hand back the devnet."""
        async with trio.open_nursery() as nursery:
            for miner in self.miners:
                await nursery.start(miner.run)
            await nursery.start(self.validator.run)
            self._source = DevnetSource(self.netuid, self.neurons())
            task_status.started(self)

    def _miner_neurons(self) -> list[Neuron]:
        return [m.neuron() for m in self.miners]

    def neurons(self) -> list[Neuron]:
        """Every neuron: the miners (uids 0..N-1), the validator, then the gateway (no axon: it serves
        nothing; a validator permit, as the validator's API hotkey it stands for has)."""
        gateway = Neuron(uid=self.validator.uid + 1, hotkey=self.gateway_hotkey, axon=None, stake=GATEWAY_STAKE,
                         validator_permit=True)
        return [*self._miner_neurons(), self.validator.neuron(), gateway]

    def miner(self, uid: int) -> Miner:
        return self.miners[uid]

    @property
    def source(self) -> DevnetSource:
        if self._source is None:
            raise RuntimeError("the devnet is not running yet")
        return self._source

    def configure(self, settings: Settings) -> Settings:
        """`settings` pointed at this devnet: its metagraph, its validator, and the hotkey it trusts."""
        return dataclasses.replace(
            settings,
            wallet=dataclasses.replace(settings.wallet, uri=self.gateway_uri),
            subnet=dataclasses.replace(settings.subnet, source="devnet", netuid=self.netuid, neurons=()),
            availability=dataclasses.replace(settings.availability, source="validator"),
            scoring=dataclasses.replace(settings.scoring, validator=self.validator.address,
                                        validator_hotkey=self.validator.hotkey),
        )

    def config_toml(self) -> str:
        """The config sections a gateway in another process needs to use this devnet."""
        doc = tomlkit.document()
        doc.add(tomlkit.comment("sn1-gateway settings for the local devnet (hotkeys are development keys)"))
        wallet = tomlkit.table()
        wallet.add("uri", self.gateway_uri)
        doc.add("wallet", wallet)
        subnet = tomlkit.table()
        subnet.add("source", "static")
        subnet.add("netuid", self.netuid)
        neurons = tomlkit.aot()
        for neuron in self.neurons():
            entry = tomlkit.table()
            entry.add("uid", neuron.uid)
            entry.add("hotkey", neuron.hotkey)
            entry.add("axon", neuron.axon or "")
            entry.add("incentive", neuron.incentive)
            entry.add("stake", neuron.stake)
            entry.add("validator_permit", neuron.validator_permit)
            neurons.append(entry)
        subnet.add("neurons", neurons)
        doc.add("subnet", subnet)
        availability = tomlkit.table()
        availability.add("source", "validator")
        doc.add("availability", availability)
        scoring = tomlkit.table()
        scoring.add("validator", self.validator.address)
        scoring.add("validator_hotkey", self.validator.hotkey)
        doc.add("scoring", scoring)
        return tomlkit.dumps(doc)


async def run_until_signalled(devnet: Devnet, *, on_ready: Callable[[Devnet], None] | None = None) -> None:
    """Run the devnet alone until SIGINT or SIGTERM (`sn1-gateway devnet`).

    Copies of the signal arriving within `SIGNAL_ECHO_S` of it (the one-file binary's launcher passes a
    terminal's Ctrl-C on) are taken here: leaving the receiver would deliver them again, to Python's
    default handler, and a clean stop would end with a KeyboardInterrupt traceback.
    """
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(devnet.run)
            if on_ready is not None:
                on_ready(devnet)
            async for _ in signals:
                break
            since = trio.current_time()
            nursery.cancel_scope.cancel()
        await absorb_signal_echoes(signals, since)
