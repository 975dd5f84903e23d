"""The subnet's metagraph as the gateway sees it: immutable snapshots with precomputed indexes."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any


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
