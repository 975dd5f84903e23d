"""AvailabilityActor: what each miner says it can do (tasks, models), published as a snapshot.

Sources (`availability.source`): "validator" asks the validator's availability endpoint for all uids;
"miners" asks each miner's `/availability` with bounded concurrency, spread over the interval; "none"
takes every serving miner as available. After a failed poll the last known answers are kept and aged,
never replaced by "everyone is available". Only when nothing was ever known does selection fall back to
every serving miner, and `/health/ready` says so.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx
import trio

from config.settings import Settings
from engine.epistula import Signer
from engine.snapshot import SnapshotCell
from engine.subnet import Neuron, SubnetSnapshot

log = logging.getLogger("sn1_gateway.availability")

KNOWN_TASKS = (
    "InferenceTask",
    "WebRetrievalTask",
    "MultiStepReasoningTask",
    "ProgrammingTask",
    "WebQuestionAnsweringTask",
    "QuestionAnsweringTask",
    "WikiQuestionAnsweringTask",
    "MultiChoiceTask",
)
KNOWN_MODELS = (
    "hugging-quants/Meta-Llama-3.1-70B-Instruct-AWQ-INT4",
    "mrfakename/mistral-small-3.1-24b-instruct-2503-hf",
)


class AvailabilityUnavailable(Exception):
    """A poll that produced no answer."""


@dataclass(frozen=True, slots=True)
class MinerAvailability:
    tasks: frozenset[str]
    models: frozenset[str]
    seen_at: float  # wall clock of the answer

    @classmethod
    def parse(cls, answer: Any, seen_at: float) -> MinerAvailability | None:
        """The wire shape `{"task_availabilities": {...}, "llm_model_availabilities": {...}}`."""
        if not isinstance(answer, Mapping):
            return None
        tasks, models = answer.get("task_availabilities"), answer.get("llm_model_availabilities")
        if not isinstance(tasks, Mapping) or not isinstance(models, Mapping):
            return None
        return cls(
            tasks=frozenset(str(t) for t, ok in tasks.items() if ok is True),
            models=frozenset(str(m) for m, ok in models.items() if ok is True),
            seen_at=seen_at,
        )

    def as_wire(self) -> dict[str, Any]:
        known_tasks = sorted(set(KNOWN_TASKS) | self.tasks)
        known_models = sorted(set(KNOWN_MODELS) | self.models)
        return {
            "task_availabilities": {t: t in self.tasks for t in known_tasks},
            "llm_model_availabilities": {m: m in self.models for m in known_models},
        }


@dataclass(frozen=True)
class AvailabilitySnapshot:
    """The last known availability of each miner. `None` for a uid means "asked, not available"."""

    source: str
    miners: Mapping[int, MinerAvailability | None] = field(default_factory=dict)
    polled_at: float | None = None  # wall clock of the last successful poll
    ever_known: bool = False

    @property
    def everyone(self) -> bool:
        """Selection takes every serving miner: by configuration, or because nothing was ever known."""
        return self.source == "none" or not self.ever_known

    def serves(self, uid: int, task: str, model: str | None) -> bool:
        if self.everyone:
            return True
        found = self.miners.get(uid)
        if found is None or task not in found.tasks:
            return False
        return model is None or model in found.models

    def models(self) -> list[str]:
        names: set[str] = set()
        for found in self.miners.values():
            if found is not None:
                names |= found.models
        return sorted(names)


def validator_for(settings: Settings, subnet: SubnetSnapshot) -> tuple[str, str] | None:
    """(axon, hotkey) of the validator to ask: the configured one (`scoring.validator`, with
    `scoring.validator_hotkey` or the hotkey the metagraph lists at that axon), else the best-staked
    serving one. None when there is none, or the configured one's hotkey is unknown."""
    if settings.scoring.validator:
        hotkey = settings.scoring.validator_hotkey or subnet.hotkey_at(settings.scoring.validator)
        return (settings.scoring.validator, hotkey) if hotkey else None
    candidates = [
        n for n in subnet.neurons
        if n.validator_permit and n.axon and n.stake >= settings.scoring.min_validator_stake
    ]
    if not candidates:
        return None
    best = max(candidates, key=lambda n: (n.stake, -n.uid))
    assert best.axon is not None
    return best.axon, best.hotkey


class AvailabilityActor:
    def __init__(
        self,
        settings: Settings,
        subnet: SnapshotCell[SubnetSnapshot],
        http: httpx.AsyncClient,
        signer: Signer,
        *,
        wall_clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self.subnet = subnet
        self.http = http
        self.signer = signer
        self.wall_clock = wall_clock
        self.rng = rng or random.Random()
        self.cell: SnapshotCell[AvailabilitySnapshot] = SnapshotCell(
            AvailabilitySnapshot(source=settings.availability.source)
        )
        self.last_error: str | None = None
        self.polls = 0
        self.failures = 0

    async def run(self, *, task_status: trio.TaskStatus[SnapshotCell[AvailabilitySnapshot]] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        source = self.settings.availability.source
        task_status.started(self.cell)
        if source == "none":
            await trio.sleep_forever()
        interval = self.settings.availability.interval_s
        while True:
            if source == "validator":
                await self.poll_validator()
                await trio.sleep(interval)
            else:
                await self.poll_miners(spread_s=interval)

    # -- validator ---------------------------------------------------------------------------------

    async def poll_validator(self) -> bool:
        subnet = self.subnet.get()
        target = validator_for(self.settings, subnet)
        try:
            if target is None:
                raise AvailabilityUnavailable(
                    f"no validator to ask: scoring.validator {self.settings.scoring.validator} is not in the "
                    "metagraph and scoring.validator_hotkey is empty" if self.settings.scoring.validator
                    else "no validator to ask (none configured, none in the metagraph)")
            answer = await self._post(target, "/miner_availabilities/miner_availabilities",
                                      [n.uid for n in subnet.neurons])
            if not isinstance(answer, Mapping):
                raise AvailabilityUnavailable("the validator's answer is not a JSON object")
        except AvailabilityUnavailable as exc:
            self._failed(str(exc))
            return False
        now = self.wall_clock()
        merged = dict(self.cell.get().miners)
        for uid_text, entry in answer.items():
            try:
                uid = int(uid_text)
            except ValueError:
                continue
            merged[uid] = MinerAvailability.parse(entry, now)
        self._publish(merged, now)
        return True

    # -- miners ------------------------------------------------------------------------------------

    async def poll_miners(self, *, spread_s: float) -> None:
        """Ask every serving miner once, starts spread evenly over `spread_s`, at most `concurrency` at once."""
        miners = list(self.subnet.get().serving_by_incentive)
        self.rng.shuffle(miners)
        if not miners:
            self._failed("no serving miner in the metagraph")
            await trio.sleep(spread_s)
            return
        limiter = trio.CapacityLimiter(self.settings.availability.concurrency)
        answers: dict[int, MinerAvailability | None] = {}
        errors: list[str] = []
        step = spread_s / len(miners)
        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            for i, neuron in enumerate(miners):
                await trio.sleep_until(start + i * step)
                await limiter.acquire_on_behalf_of(neuron.uid)
                nursery.start_soon(self._ask_miner, neuron, limiter, answers, errors)
        await trio.sleep_until(start + spread_s)
        merged = dict(self.cell.get().miners)
        merged.update(answers)
        if answers:
            self._publish(merged, self.wall_clock())
        if errors:
            self._failed(f"{len(errors)} of {len(miners)} miners did not answer (e.g. {errors[0]})",
                         count=not answers)

    async def _ask_miner(self, neuron: Neuron, limiter: trio.CapacityLimiter,
                         answers: dict[int, MinerAvailability | None], errors: list[str]) -> None:
        try:
            assert neuron.axon is not None
            answer = await self._post((neuron.axon, neuron.hotkey), "/availability", {
                "task_availabilities": dict.fromkeys(KNOWN_TASKS, True),
                "llm_model_availabilities": dict.fromkeys(KNOWN_MODELS, True),
            })
            answers[neuron.uid] = MinerAvailability.parse(answer, self.wall_clock())
        except AvailabilityUnavailable as exc:
            errors.append(f"uid {neuron.uid}: {exc}")
        finally:
            limiter.release_on_behalf_of(neuron.uid)

    # -- common ------------------------------------------------------------------------------------

    async def _post(self, target: tuple[str, str], path: str, payload: Any) -> Any:
        axon, hotkey = target
        body = json.dumps(payload, separators=(",", ":")).encode()
        headers = {"Content-Type": "application/json", **self.signer.headers(body, hotkey)}
        try:
            with trio.fail_after(self.settings.availability.timeout_s):
                response = await self.http.post(f"http://{axon}{path}", content=body, headers=headers)
        except trio.TooSlowError as exc:
            raise AvailabilityUnavailable(f"{axon}{path} timed out") from exc
        except httpx.HTTPError as exc:
            raise AvailabilityUnavailable(f"{axon}{path}: {type(exc).__name__} {exc}".strip()) from exc
        if response.status_code != 200:
            raise AvailabilityUnavailable(f"{axon}{path} answered HTTP {response.status_code}")
        try:
            return response.json()
        except ValueError as exc:
            raise AvailabilityUnavailable(f"{axon}{path} answered invalid JSON") from exc

    def _publish(self, miners: dict[int, MinerAvailability | None], now: float) -> None:
        self.polls += 1
        self.last_error = None
        self.cell.publish(AvailabilitySnapshot(
            source=self.settings.availability.source, miners=miners, polled_at=now, ever_known=True
        ))

    def _failed(self, reason: str, *, count: bool = True) -> None:
        if count:
            self.failures += 1
        self.last_error = reason
        log.warning("availability poll: %s; keeping the last known answers", reason)

    def health(self) -> dict[str, Any]:
        snap = self.cell.get()
        age = None if snap.polled_at is None else round(max(0.0, self.wall_clock() - snap.polled_at), 1)
        return {
            "source": snap.source,
            "miners_known": sum(1 for a in snap.miners.values() if a is not None),
            "age_s": age,
            "stale": self.last_error is not None,
            "fallback_every_serving_miner": snap.source != "none" and not snap.ever_known,
            "last_error": self.last_error,
            "failures": self.failures,
        }
