"""The subnet's metagraph as the gateway sees it: immutable snapshots with precomputed indexes."""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

NAT64 = ipaddress.IPv6Network("64:ff9b::/96")  # IPv4 reached through a NAT64 gateway


@dataclass(frozen=True, slots=True)
class Neuron:
    uid: int
    hotkey: str
    axon: str | None  # "host:port", or None when the neuron serves nothing
    incentive: float = 0.0
    stake: float = 0.0
    validator_permit: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {
            "uid": self.uid,
            "hotkey": self.hotkey,
            "axon": self.axon,
            "incentive": self.incentive,
            "stake": self.stake,
            "validator_permit": self.validator_permit,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Neuron:
        return cls(
            uid=int(data["uid"]),
            hotkey=str(data["hotkey"]),
            axon=str(data["axon"]) if data.get("axon") else None,
            incentive=float(data.get("incentive", 0.0)),
            stake=float(data.get("stake", 0.0)),
            validator_permit=bool(data.get("validator_permit", False)),
        )


@dataclass(frozen=True)
class SubnetSnapshot:
    """One reading of the metagraph. `fetched_at` is wall-clock time (seconds since the epoch)."""

    netuid: int
    neurons: tuple[Neuron, ...] = ()
    block: int | None = None
    fetched_at: float | None = None
    source: str = "empty"
    by_uid: dict[int, Neuron] = field(init=False, repr=False, compare=False)
    by_hotkey: dict[str, Neuron] = field(init=False, repr=False, compare=False)
    serving_by_incentive: tuple[Neuron, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "by_uid", {n.uid: n for n in self.neurons})
        object.__setattr__(self, "by_hotkey", {n.hotkey: n for n in self.neurons})
        serving = sorted((n for n in self.neurons if n.axon), key=lambda n: (-n.incentive, n.uid))
        object.__setattr__(self, "serving_by_incentive", tuple(serving))

    def hotkey_at(self, axon: str) -> str | None:
        """The hotkey of the neuron serving `axon` ("host:port"), if one does."""
        return next((n.hotkey for n in self.neurons if n.axon == axon), None)

    @classmethod
    def of(cls, netuid: int, neurons: Iterable[Neuron], **kw: Any) -> SubnetSnapshot:
        return cls(netuid=netuid, neurons=tuple(sorted(neurons, key=lambda n: n.uid)), **kw)

    def as_dict(self) -> dict[str, Any]:
        return {
            "netuid": self.netuid,
            "block": self.block,
            "fetched_at": self.fetched_at,
            "source": self.source,
            "neurons": [n.as_dict() for n in self.neurons],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SubnetSnapshot:
        return cls.of(
            int(data["netuid"]),
            (Neuron.from_dict(n) for n in data["neurons"]),
            block=data.get("block"),
            fetched_at=data.get("fetched_at"),
            source=str(data.get("source", "cache")),
        )


def refused_axon(axon: str) -> str | None:
    """Why the gateway must not connect to `axon` ("host:port") taken from the chain, or None.

    Anyone can serve any address on the chain, so an axon inside the gateway's own network (loopback,
    private, link-local, unspecified, multicast, reserved: anything not globally routable) would make
    the gateway send signed requests to services next to it. IPv4 inside IPv6 (mapped, 6to4, NAT64)
    is judged as the IPv4 it reaches. A host name is refused too: the chain stores axons as numbers,
    so a name can only come from somewhere else, and what it resolves to could change per request.
    """
    host, sep, _ = axon.rpartition(":")
    if not sep:
        return "not host:port"
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        address: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(host)
    except ValueError:
        return "a host name, not an address"
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        elif address.sixtofour is not None:
            address = address.sixtofour
        elif address in NAT64:
            address = ipaddress.IPv4Address(int(address) & 0xFFFF_FFFF)
    for reason, hit in (
        ("unspecified", address.is_unspecified),
        ("loopback", address.is_loopback),
        ("link-local", address.is_link_local),
        ("multicast", address.is_multicast),
        ("private", address.is_private),
        ("reserved", address.is_reserved),
        ("not globally routable", not address.is_global),
    ):
        if hit:
            return reason
    return None


@dataclass(frozen=True, slots=True)
class RefusedAxon:
    uid: int
    axon: str
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return {"uid": self.uid, "axon": self.axon, "reason": self.reason}


def without_private_axons(snapshot: SubnetSnapshot) -> tuple[SubnetSnapshot, tuple[RefusedAxon, ...]]:
    """`snapshot` with every refused axon (`refused_axon`) replaced by None (not serving), and the
    refusals. Done once per metagraph read: the hot path then only sees axons it may ask."""
    refused: list[RefusedAxon] = []
    neurons: list[Neuron] = []
    for neuron in snapshot.neurons:
        reason = refused_axon(neuron.axon) if neuron.axon else None
        if reason is None:
            neurons.append(neuron)
            continue
        assert neuron.axon is not None
        refused.append(RefusedAxon(neuron.uid, neuron.axon, reason))
        neurons.append(dataclasses.replace(neuron, axon=None))
    if not refused:
        return snapshot, ()
    screened = SubnetSnapshot.of(snapshot.netuid, neurons, block=snapshot.block, fetched_at=snapshot.fetched_at,
                                 source=snapshot.source)
    return screened, tuple(refused)
