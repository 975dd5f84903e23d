"""Choosing miners for a request from the metagraph, their availability and their health.

Eligible: a serving axon, not a validator (permit and stake at or above the limit), and available for
the task (and the model, when one is named). Indexes of eligible miners per (task, model), best
incentive first, are built once per new pair of snapshots; a request then samples in O(k).
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from actors.availability import AvailabilitySnapshot
from actors.fanout.breaker import MinerHealth
from wire.metagraph import Neuron, SubnetSnapshot
from wire.snapshot import SnapshotCell


class SelectionError(Exception):
    """No usable miner; `status` tells the client why (400 bad uids, 404 unknown model, 503 none now)."""

    def __init__(self, status: int, message: str, *, code: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.param = param


@dataclass
class SelectionIndex:
    subnet: SubnetSnapshot
    availability: AvailabilitySnapshot
    validator_stake_limit: float
    _memo: dict[tuple[str, str | None], tuple[Neuron, ...]] = field(default_factory=dict)
    _advertised: frozenset[str] | None = None

    def miners(self) -> tuple[Neuron, ...]:
        """Serving neurons that are not validators, best incentive first."""
        key = ("", None)
        found = self._memo.get(key)
        if found is None:
            limit = self.validator_stake_limit
            found = self._memo[key] = tuple(
                n for n in self.subnet.serving_by_incentive
                if not (n.validator_permit and n.stake >= limit)
            )
        return found

    def serves_model(self, model: str) -> bool:
        """Whether any miner advertises `model` (every model counts while nothing is known)."""
        if self.availability.everyone:
            return True
        advertised = self._advertised
        if advertised is None:
            advertised = self._advertised = frozenset(self.availability.models())
        return model in advertised

    def eligible(self, task: str, model: str | None) -> tuple[Neuron, ...]:
        if self.availability.everyone:
            model = None  # nothing to filter models on
        key = (task, model)
        found = self._memo.get(key)
        if found is None:
            serves = self.availability.serves
            found = tuple(n for n in self.miners() if serves(n.uid, task, model))
            if found:  # only names some miner serves: a client's made-up model names must not grow it
                self._memo[key] = found
        return found


class Selector:
    def __init__(
        self,
        subnet: SnapshotCell[SubnetSnapshot],
        availability: SnapshotCell[AvailabilitySnapshot],
        health: MinerHealth,
        *,
        validator_stake_limit: float,
        top_pool: int,
        rng: random.Random | None = None,
    ) -> None:
        self.subnet = subnet
        self.availability = availability
        self.health = health
        self.validator_stake_limit = validator_stake_limit
        self.top_pool = top_pool
        self.rng = rng or random.Random()
        self._versions = (-1, -1)
        self._index: SelectionIndex | None = None

    def index(self) -> SelectionIndex:
        versions = (self.subnet.version, self.availability.version)
        if self._index is None or versions != self._versions:
            self._index = SelectionIndex(self.subnet.get(), self.availability.get(), self.validator_stake_limit)
            self._versions = versions
        return self._index

    def pick(self, task: str, model: str | None, k: int, *, exclude: Iterable[int] = (),
             fallback: bool = False) -> list[Neuron]:
        """Up to k miners sampled from the top of the eligible pool, skipping open circuit breakers.

        `fallback`, as upstream: when no miner is available for the task with that model, miners
        available for the task, and when none is, any serving miner."""
        index = self.index()
        eligible = index.eligible(task, model)
        if not eligible and fallback:
            eligible = index.eligible(task, None) or index.miners()
        if not eligible:
            raise self._none_error(index, task, model)
        skip = set(exclude)
        allows = self.health.allows
        pool: list[Neuron] = []
        for neuron in eligible:
            if neuron.uid not in skip and allows(neuron.uid):
                pool.append(neuron)
                if len(pool) >= self.top_pool:
                    break
        if not pool:
            raise SelectionError(503, f"All {len(eligible)} miners eligible for {task} are failing right now; "
                                 "retry shortly.", code="miners_unhealthy")
        return self.rng.sample(pool, min(k, len(pool)))

    def extra(self, k: int, *, exclude: Iterable[int] = ()) -> list[Neuron]:
        """Up to k serving miners drawn at random from the whole subnet (not only the top by incentive),
        skipping `exclude` and open breakers: asked only so that organic traffic scores every miner."""
        skip = set(exclude)
        allows = self.health.allows
        pool = [n for n in self.index().miners() if n.uid not in skip and allows(n.uid)]
        return self.rng.sample(pool, min(k, len(pool)))

    def best(self, task: str, model: str | None, *, exclude: Sequence[int] = ()) -> Neuron:
        """One healthy miner with the highest incentive (a mixture's final answer), preferring one
        not in `exclude`."""
        index = self.index()
        eligible = index.eligible(task, model) or index.miners()
        healthy = [n for n in eligible if self.health.allows(n.uid)]
        if not healthy:
            raise self._none_error(index, task, model)
        skip = set(exclude)
        return next((n for n in healthy if n.uid not in skip), healthy[0])

    def explicit(self, uids: Sequence[int]) -> list[Neuron]:
        """The miners a client named; a uid not in the metagraph, or not serving, is a 400."""
        by_uid = self.subnet.get().by_uid
        unknown = [u for u in uids if u not in by_uid]
        if unknown:
            raise SelectionError(400, f"uids not in the metagraph: {unknown}", code="unknown_uid", param="uids")
        silent = [u for u in uids if not by_uid[u].axon]
        if silent:
            raise SelectionError(400, f"uids that serve no axon: {silent}", code="uid_not_serving", param="uids")
        return [by_uid[u] for u in dict.fromkeys(uids)]

    def _none_error(self, index: SelectionIndex, task: str, model: str | None) -> SelectionError:
        if not index.miners():
            return SelectionError(503, "No miner is serving on the subnet right now.", code="no_miners")
        served = index.availability.models()
        if model is not None and index.eligible(task, None) and model not in served:
            known = ", ".join(served) or "none"
            return SelectionError(404, f"No miner serves the model {model!r}; models served: {known}.",
                                  code="model_not_found", param="model")
        return SelectionError(503, f"No miner is available for {task}" + (f" with {model}" if model else "")
                              + " right now.", code="no_available_miners")
