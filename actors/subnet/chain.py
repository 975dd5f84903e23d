"""The `chain` metagraph source: bittensor 11's `Subtensor(network).subnets.metagraph(netuid)`.

The chain client blocks, so `fetch()` runs in a worker thread (SubnetActor does that). The client is
made by an injected factory, so tests hand in a fake; the real one is `bittensor.Subtensor`, built
cold (no socket until the first read) and kept between reads. Every chain or connection failure
becomes `SubnetUnavailable`, and the client is dropped so the next read reconnects.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from actors.subnet.actor import SubnetUnavailable
from config.loading import ConfigError
from wire.metagraph import Neuron, SubnetSnapshot

log = logging.getLogger("sn1_gateway.subnet")


class ChainClient(Protocol):
    """What the source uses of `bittensor.Subtensor`: `subnets.metagraph(netuid, ...)` and `close()`."""

    @property
    def subnets(self) -> Any: ...

    def close(self) -> None: ...


ChainClientFactory = Callable[[str], ChainClient]


def subtensor(network: str) -> ChainClient:
    """The real chain client (blocking mode). Raises ValueError for an unknown network name."""
    import bittensor as bt

    client: ChainClient = bt.Subtensor(network)
    return client


def _chain_errors() -> tuple[type[BaseException], ...]:
    """The errors that mean "the chain cannot be read right now" (connection, RPC, timeouts)."""
    from bittensor.result import BittensorError
    from websockets.exceptions import WebSocketException

    errors: tuple[type[BaseException], ...] = (BittensorError, WebSocketException, OSError, TimeoutError)
    try:
        from bittensor._transport.errors import SubstrateRequestException
    except ImportError:  # a private module; the public errors above still cover the usual cases
        return errors
    return (*errors, SubstrateRequestException)


def axon_address(axon: str | None) -> str | None:
    """A neuron's axon as "host:port", or None when it serves nothing (no axon, address 0, port 0)."""
    if not axon:
        return None
    host, sep, port_text = axon.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        return None
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return axon  # a host name; whether the gateway may ask it is judged later (wire.metagraph.refused_axon)
    return None if address.is_unspecified else axon


def neuron_from_chain(row: Any) -> Neuron:
    """A bittensor `MetagraphNeuron` as the gateway's `Neuron`.

    Stake is the neuron's total stake in the subnet's own unit (alpha on a subnet, TAO on the root
    network): `Balance.tao` refuses alpha balances, `amount` is the number in either unit.
    """
    return Neuron(
        uid=int(row.uid),
        hotkey=str(row.hotkey),
        axon=axon_address(row.axon),
        incentive=float(row.incentive),
        stake=float(row.total_stake.amount),
        validator_permit=bool(row.validator_permit),
    )


class ChainSource:
    """Reads the metagraph from the chain; one read at a time."""

    name = "chain"

    def __init__(
        self,
        netuid: int,
        network: str,
        *,
        client_factory: ChainClientFactory = subtensor,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.netuid = netuid
        self.network = network
        self._factory = client_factory
        self._wall_clock = wall_clock
        self._lock = threading.Lock()
        self._errors = _chain_errors()
        try:
            # Building the client is cold (no I/O) and checks the network name up front.
            self._client: ChainClient | None = client_factory(network)
        except ValueError as exc:
            raise ConfigError(f"subnet.network: {exc}") from exc

    def fetch(self) -> SubnetSnapshot:
        if not self._lock.acquire(blocking=False):
            raise SubnetUnavailable(f"{self.network}: the previous metagraph read has not finished")
        try:
            return self._fetch()
        finally:
            self._lock.release()

    def _fetch(self) -> SubnetSnapshot:
        try:
            client = self._client = self._client or self._factory(self.network)
            metagraph = client.subnets.metagraph(self.netuid, commitments=False)
            if metagraph is None:
                raise SubnetUnavailable(f"{self.network}: subnet {self.netuid} does not exist")
            neurons = [neuron_from_chain(row) for row in metagraph.neurons]
            block = int(metagraph.block)
        except SubnetUnavailable:
            raise
        except self._errors as exc:
            self._drop_client()
            raise SubnetUnavailable(f"{self.network}: {type(exc).__name__}: {exc}") from exc
        except (AttributeError, TypeError, ValueError) as exc:  # a reply we cannot read
            raise SubnetUnavailable(f"{self.network}: unexpected metagraph ({type(exc).__name__}: {exc})") from exc
        return SubnetSnapshot.of(
            self.netuid, neurons, block=block, fetched_at=self._wall_clock(), source=self.name
        )

    def _drop_client(self) -> None:
        client, self._client = self._client, None
        if client is None:
            return
        try:
            client.close()
        except self._errors as exc:  # closing a broken connection may fail the same way
            log.debug("closing the chain client failed: %s", exc)
