"""The learned miner choice: draws weighted by health, an exploration floor, O(k) per request.

Deterministic: a seeded rng and synthetic health (MinerHealth fed by hand on a fake clock).
"""

from __future__ import annotations

import random
from collections import Counter

import pytest

from actors.availability import AvailabilitySnapshot
from actors.fanout.breaker import MinerHealth
from actors.fanout.selection import REWEIGH_S, Selector, health_weight
from wire.metagraph import Neuron, SubnetSnapshot
from wire.snapshot import SnapshotCell

TASK = "InferenceTask"


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def neurons(n: int) -> list[Neuron]:
    return [Neuron(uid=uid, hotkey=f"hk{uid}", axon=f"127.0.0.1:{9000 + uid}", incentive=(n - uid) / n)
            for uid in range(n)]


def make(n: int, *, selection: str = "learned", explore_share: float = 0.2, top_pool: int = 300,
         seed: int = 1) -> tuple[Selector, MinerHealth, Clock]:
    clock = Clock()
    health = MinerHealth(failure_threshold=1000, cooldown_s=60, clock=clock)
    sel = Selector(SnapshotCell(SubnetSnapshot.of(1, neurons(n))), SnapshotCell(AvailabilitySnapshot(source="none")),
                   health, validator_stake_limit=1000.0, top_pool=top_pool, selection=selection,  # type: ignore[arg-type]
                   explore_share=explore_share, rng=random.Random(seed))
    return sel, health, clock


def teach(health: MinerHealth, uid: int, *, ttft_s: float, failures: int = 0, successes: int = 10) -> None:
    for _ in range(successes):
        health.succeeded(uid, ttft_s)
    for _ in range(failures):
        health.failed(uid, "HTTP 500")


def picks(sel: Selector, requests: int, k: int = 5) -> Counter[int]:
    counts: Counter[int] = Counter()
    for _ in range(requests):
        chosen = sel.pick(TASK, None, k)
        assert len({n.uid for n in chosen}) == len(chosen) == k  # k distinct miners
        counts.update(n.uid for n in chosen)
    return counts


def test_fast_and_reliable_miners_are_drawn_most_and_every_miner_keeps_a_floor() -> None:
    sel, health, _ = make(50)
    for uid in range(50):
        teach(health, uid, ttft_s=2.0)
    for uid in (0, 1, 2):
        teach(health, uid, ttft_s=0.2)  # ten times faster
    for uid in (10, 11):
        teach(health, uid, ttft_s=0.2, failures=10)  # fast but failing nearly always now
    counts = picks(sel, 2000)
    fast = [counts[uid] for uid in (0, 1, 2)]
    ordinary = [counts[uid] for uid in range(20, 50)]
    assert min(fast) > 1200  # in most requests (their EWMA, 0.39 s, is five times faster)
    assert max(ordinary) < min(fast) / 5
    assert counts[10] + counts[11] < min(fast) / 5  # failing miners lose their speed's favour
    # the floor: 20% of draws uniform over 50 miners, 5 draws a request, 2,000 requests: 40 each
    assert min(counts[uid] for uid in range(50)) >= 20


def test_uniform_selection_ignores_health() -> None:
    sel, health, _ = make(20, selection="uniform")
    teach(health, 0, ttft_s=0.01)
    teach(health, 1, ttft_s=30.0, failures=5)
    counts = picks(sel, 2000)
    assert all(400 < counts[uid] < 600 for uid in range(20)), counts  # 500 each expected


def test_a_recovered_miner_comes_back_once_weights_are_recomputed() -> None:
    sel, health, clock = make(10)
    for uid in range(10):
        teach(health, uid, ttft_s=1.0)
    teach(health, 3, ttft_s=20.0, successes=30)  # slow for a while
    before = picks(sel, 500)
    assert before[3] < 150  # about its floor: 500 x 5 x 0.2 / 10 = 50, plus a little weight
    teach(health, 3, ttft_s=0.25, successes=30)  # healthy and fast again
    unchanged = picks(sel, 200)  # within the same second the old weights still hold
    assert unchanged[3] < 80
    clock.now += REWEIGH_S
    after = picks(sel, 500)
    assert after[3] > 450  # in nearly every request now


@pytest.mark.parametrize("selection", ["learned", "uniform"])
def test_a_request_reads_no_health_between_reweighs(selection: str) -> None:
    sel, health, clock = make(300, selection=selection)
    calls = Counter[str]()
    figures = health.figures

    def counted(uid: int) -> tuple[float | None, float]:
        calls["figures"] += 1
        return figures(uid)

    health.figures = counted  # type: ignore[method-assign]
    allows = health.allows
    asked: list[int] = []

    def allows_counted(uid: int) -> bool:
        asked.append(uid)
        return allows(uid)

    health.allows = allows_counted  # type: ignore[method-assign]
    sel.pick(TASK, None, 5)
    assert calls["figures"] == 300  # the weighing: once per pooled miner
    asked.clear()
    for _ in range(1000):
        sel.pick(TASK, None, 5)
    assert calls["figures"] == 300  # no request read health again, nor sorted the pool
    assert len(asked) < 1000 * 8  # only the drawn miners' breakers are checked, not the pool's 300
    clock.now += REWEIGH_S
    sel.pick(TASK, None, 5)
    assert calls["figures"] == 600


def test_draws_skip_excluded_miners_and_open_breakers_even_when_they_dominate() -> None:
    clock = Clock()
    health = MinerHealth(failure_threshold=1, cooldown_s=60, clock=clock)
    sel = Selector(SnapshotCell(SubnetSnapshot.of(1, neurons(8))), SnapshotCell(AvailabilitySnapshot(source="none")),
                   health, validator_stake_limit=1000.0, top_pool=300, explore_share=0.0, rng=random.Random(3))
    for uid in range(8):
        teach(health, uid, ttft_s=5.0)
    teach(health, 0, ttft_s=0.01, successes=50)  # all but the whole weight
    teach(health, 1, ttft_s=0.01, successes=50)
    sel.pick(TASK, None, 3)  # weighed while every breaker is closed
    health.failed(1, "HTTP 500")  # its breaker opens (threshold 1) after the weighing
    for _ in range(50):
        chosen = {n.uid for n in sel.pick(TASK, None, 3, exclude=[0])}
        assert len(chosen) == 3 and not chosen & {0, 1}


def test_the_pool_is_the_top_by_incentive() -> None:
    sel, health, _ = make(20, top_pool=5)
    teach(health, 15, ttft_s=0.01)  # fast, but outside the pool
    assert set(picks(sel, 200, k=3)) == {0, 1, 2, 3, 4}


def test_weight_formula() -> None:
    assert health_weight(0.5, 0.0, 1.0) == pytest.approx(4 * health_weight(1.0, 0.0, 1.0))
    assert health_weight(None, 0.0, 2.0) == health_weight(2.0, 0.0, 2.0)  # untimed: the pool's median
    assert health_weight(1.0, 1.0, 1.0) == 0.0
    assert health_weight(0.0, 0.0, 1.0) == health_weight(0.01, 0.0, 1.0)  # bounded


def test_selection_settings_are_read_and_checked() -> None:
    from config.loading import ConfigError, parse_settings

    assert parse_settings("").fanout.selection == "learned"
    settings = parse_settings('[fanout]\nselection = "uniform"\nexplore_share = 0.1\n')
    assert settings.fanout.selection == "uniform" and settings.fanout.explore_share == 0.1
    with pytest.raises(ConfigError, match=r"fanout\.selection"):
        parse_settings('[fanout]\nselection = "best"\n')
    with pytest.raises(ConfigError, match=r"fanout\.explore_share"):
        parse_settings("[fanout]\nexplore_share = 1.5\n")
