"""Choosing miners for a request from the metagraph, their availability and their health.

Eligible: a serving axon, not a validator (permit and stake at or above the limit), and available for
the task (and the model, when one is named). Indexes of eligible miners per (task, model), best
incentive first, are built once per new pair of snapshots.

Two ways to draw from the top `top_pool` of them (`fanout.selection`):
- "uniform", as upstream: every miner of the pool equally likely (`top_pool` counts miners whose breaker
  lets them be asked).
- "learned": weighted by each miner's recent health (`MinerHealth`: EWMAs of time to first token and
  of failures), so that the first answer, which is what the client waits for, tends to come sooner and
  from a miner that finishes. A share `explore_share` of the draws stays uniform: every serving miner
  keeps a floor of organic traffic (scoring covers the whole subnet, and a miner that was slow and has
  recovered is seen to be fast again).
The pool and its weights are recomputed at most once a second (`Weighing`, O(pool)); a request then
draws k miners in O(k log pool), with no sort and no pass over the pool (either choice).
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from actors.availability import AvailabilitySnapshot
from actors.fanout.breaker import MinerHealth
from wire.metagraph import Neuron, SubnetSnapshot
from wire.snapshot import SnapshotCell

MAX_EXPLICIT_UIDS = 64  # the most miners one request may name (web retrieval's n_miners bound)
NAMED_IN_ERRORS = 3  # uids an error message lists; the rest are counted


def some_uids(uids: Sequence[int]) -> str:
    """A few of `uids` for an error message, the rest counted: a client naming thousands of unknown
    uids gets a short answer, not its list echoed back."""
    shown = ", ".join(map(str, uids[:NAMED_IN_ERRORS]))
    return shown if len(uids) <= NAMED_IN_ERRORS else f"{shown} and {len(uids) - NAMED_IN_ERRORS} more"


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


SelectionMode = Literal["learned", "uniform"]
REWEIGH_S = 1.0  # the longest a pool's weights are kept before health is read again
TTFT_POWER = 2.0  # a miner twice as fast to its first token is drawn four times as often
FAILURE_POWER = 4.0  # ... and one failing a fifth of the time (EWMA 0.2) about 0.41 times as often
MIN_TTFT_S = 0.01  # faster than this counts as this (no weight blows up on a tiny figure)
DEFAULT_TTFT_S = 1.0  # the prior of a miner never timed, when no miner of the pool has been timed yet


def health_weight(ttft_s: float | None, failure_ewma: float, prior_ttft_s: float) -> float:
    """How likely a miner is to be drawn, before the exploration share: 1 / ttft^2 x (1 - failures)^4.

    Drawing k miners and taking the first to answer, the client's wait is the least of their times:
    favouring the fast ones shortens it, favouring those that finish avoids the wait for a successor.
    A miner never timed counts as the pool's median (`prior_ttft_s`): neither favoured nor avoided."""
    ttft = max(prior_ttft_s if ttft_s is None else ttft_s, MIN_TTFT_S)
    return (1.0 - min(max(failure_ewma, 0.0), 1.0)) ** FAILURE_POWER / ttft**TTFT_POWER


@dataclass(frozen=True, slots=True)
class Weighing:
    """One pool's draw weights as of `at`: the miners and the running sums of their weights."""

    pool: tuple[Neuron, ...]
    cumulative: tuple[float, ...]
    at: float

    @classmethod
    def of(cls, pool: Sequence[Neuron], figures: Callable[[int], tuple[float | None, float]],
           at: float) -> Weighing:
        read = [figures(n.uid) for n in pool]
        timed = sorted(t for t, _ in read if t is not None)
        prior = timed[len(timed) // 2] if timed else DEFAULT_TTFT_S
        total, cumulative = 0.0, []
        for ttft, failures in read:
            total += health_weight(ttft, failures, prior)
            cumulative.append(total)
        return cls(tuple(pool), tuple(cumulative), at)

    def draw(self, rng: random.Random, explore_share: float) -> Neuron:
        """One miner: uniform with probability `explore_share`, else by weight."""
        total = self.cumulative[-1] if self.cumulative else 0.0
        if total <= 0.0 or rng.random() < explore_share:
            return self.pool[rng.randrange(len(self.pool))]
        i = bisect.bisect_right(self.cumulative, rng.random() * total)
        return self.pool[min(i, len(self.pool) - 1)]


class Selector:
    def __init__(
        self,
        subnet: SnapshotCell[SubnetSnapshot],
        availability: SnapshotCell[AvailabilitySnapshot],
        health: MinerHealth,
        *,
        validator_stake_limit: float,
        top_pool: int,
        selection: SelectionMode = "learned",
        explore_share: float = 0.2,
        rng: random.Random | None = None,
    ) -> None:
        self.subnet = subnet
        self.availability = availability
        self.health = health
        self.validator_stake_limit = validator_stake_limit
        self.top_pool = top_pool
        self.selection = selection
        self.explore_share = explore_share
        self.rng = rng or random.Random()
        self._versions = (-1, -1)
        self._index: SelectionIndex | None = None
        # per eligible tuple of the current index (the index keeps each alive, so its id is its own)
        self._weighings: dict[int, tuple[tuple[Neuron, ...], Weighing]] = {}

    def index(self) -> SelectionIndex:
        versions = (self.subnet.version, self.availability.version)
        if self._index is None or versions != self._versions:
            self._index = SelectionIndex(self.subnet.get(), self.availability.get(), self.validator_stake_limit)
            self._versions = versions
            self._weighings = {}
        return self._index

    def weighing(self, eligible: tuple[Neuron, ...], *, fresh: bool = False) -> Weighing:
        """The draw weights of the top of `eligible` (the `top_pool` first whose breaker lets them be
        asked), recomputed when older than `REWEIGH_S` (or `fresh`). Kept per tuple of the index: a
        handful per snapshot (one per task and model asked)."""
        now = self.health.clock()
        kept = self._weighings.get(id(eligible))
        found = kept[1] if kept is not None and kept[0] is eligible else None
        if found is None or fresh or now - found.at >= REWEIGH_S:
            allows = self.health.allows
            pool: list[Neuron] = []
            for neuron in eligible:
                if allows(neuron.uid):
                    pool.append(neuron)
                    if len(pool) >= self.top_pool:
                        break
            found = Weighing.of(pool, self.health.figures, now)
            self._weighings[id(eligible)] = (eligible, found)
        return found

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
        return self._draw(task, eligible, k, skip, self.explore_share if self.selection == "learned" else 1.0)

    def _draw(self, task: str, eligible: tuple[Neuron, ...], k: int, skip: set[int], share: float) -> list[Neuron]:
        """k distinct miners, a `share` of the draws uniform and the rest by weight (uniform choice is
        share 1). A draw that repeats a miner, hits `skip` or a breaker that opened since the weighing
        is drawn again; after a bounded number of tries (a pool dominated by a few miners, or mostly
        excluded) the rest is filled uniformly from what is left."""
        weighing = self.weighing(eligible)
        if not weighing.pool:  # every breaker was open a moment ago: one may be half-open by now
            weighing = self.weighing(eligible, fresh=True)
        if not weighing.pool:
            raise SelectionError(503, f"All {len(eligible)} miners eligible for {task} are failing right now; "
                                 "retry shortly.", code="miners_unhealthy")
        allows, rng = self.health.allows, self.rng
        chosen: dict[int, Neuron] = {}
        for _ in range(4 * k + 8):
            if len(chosen) >= k:
                break
            neuron = weighing.draw(rng, share)
            if neuron.uid not in chosen and neuron.uid not in skip and allows(neuron.uid):
                chosen[neuron.uid] = neuron
        if len(chosen) < k:
            rest = [n for n in weighing.pool if n.uid not in chosen and n.uid not in skip and allows(n.uid)]
            chosen.update((n.uid, n) for n in rng.sample(rest, min(k - len(chosen), len(rest))))
        if not chosen:
            raise SelectionError(503, f"All {len(eligible)} miners eligible for {task} are failing right now; "
                                 "retry shortly.", code="miners_unhealthy")
        return list(chosen.values())

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
        """The miners a client named (at most MAX_EXPLICIT_UIDS); a uid not in the metagraph, or not
        serving, is a 400 naming a few of them."""
        if len(uids) > MAX_EXPLICIT_UIDS:
            raise SelectionError(400, f"'uids' names {len(uids)} miners; at most {MAX_EXPLICIT_UIDS} may be named.",
                                 code="too_many_uids", param="uids")
        by_uid = self.subnet.get().by_uid
        unknown = list(dict.fromkeys(u for u in uids if u not in by_uid))
        if unknown:
            raise SelectionError(400, f"uids not in the metagraph: {some_uids(unknown)}.", code="unknown_uid",
                                 param="uids")
        silent = list(dict.fromkeys(u for u in uids if not by_uid[u].axon))
        if silent:
            raise SelectionError(400, f"uids that serve no axon: {some_uids(silent)}.", code="uid_not_serving",
                                 param="uids")
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
