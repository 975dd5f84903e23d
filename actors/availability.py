"""AvailabilityActor: what each miner says it can do (tasks, models), published as a snapshot.

Sources (`availability.source`): "validator" asks the validator's availability endpoint for all uids;
"miners" asks each serving miner's `/availability` (never a validator's) with bounded concurrency,
spread over the interval; "none"
takes every serving miner as available. After a failed poll the last known answers are kept and aged,
never replaced by "everyone is available". Only when nothing was ever known does selection fall back to
every serving miner, and `/health/ready` says so.

Validators and miners are untrusted: each answer is read through the pool with a byte cap (the
validator's, `availability.validator_max_bytes`, covers every uid; a miner's is `MINER_ANSWER_MAX_BYTES`),
never decoded, parsed with a depth limit, and bounded in what is kept (`MAX_NAMES` names of at most
`MAX_NAME_CHARS` characters per map). Anything else is that peer's bad answer, counted
(`bad_answers`): that miner is taken as not available, and every other answer is kept.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx
import trio

from actors.scoring.validators import eligible_validators
from config.settings import Settings
from wire import jsonio
from wire.epistula import Signer
from wire.http1 import AnswerRefused
from wire.metagraph import Neuron, SubnetSnapshot
from wire.pool import post_streaming
from wire.snapshot import SnapshotCell

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


MINER_ANSWER_MAX_BYTES = 64 * 1024  # a miner's own answer: two maps of at most MAX_NAMES names
MAX_NAMES = 64  # names in one map (tasks, or models) of one miner's answer
MAX_NAME_CHARS = 128
ANSWER_DEPTH = 4  # the validator's answer nests 3 deep ({uid: {map: {name: bool}}}), a miner's 2
CONTAINERS_PER_ANSWER = 8  # one miner's answer holds 3 objects; the validator's, 3 per uid asked and itself


class AvailabilityUnavailable(Exception):
    """A poll that produced no answer."""


class BadAnswer(ValueError):
    """An availability answer not in the wire shape, or beyond the bounds kept: that peer's failure."""


def _names(given: Any, key: str) -> frozenset[str]:
    """The names marked `true` in one map of an answer, within the bounds."""
    if not isinstance(given, dict):
        raise BadAnswer(f"{key} is not an object")
    if len(given) > MAX_NAMES:
        raise BadAnswer(f"{key} holds {len(given)} names, more than {MAX_NAMES}")
    if any(len(name) > MAX_NAME_CHARS for name in given):
        raise BadAnswer(f"{key} holds a name longer than {MAX_NAME_CHARS} characters")
    return frozenset(name for name, ok in given.items() if ok is True)


@dataclass(frozen=True, slots=True)
class MinerAvailability:
    tasks: frozenset[str]
    models: frozenset[str]
    seen_at: float  # wall clock of the answer

    @classmethod
    def parse(cls, answer: Any, seen_at: float) -> MinerAvailability:
        """The wire shape `{"task_availabilities": {...}, "llm_model_availabilities": {...}}`, as
        parsed JSON; anything else, or more than the bounds, raises `BadAnswer`."""
        if not isinstance(answer, dict):
            raise BadAnswer("not a JSON object")
        return cls(
            tasks=_names(answer.get("task_availabilities"), "task_availabilities"),
            models=_names(answer.get("llm_model_availabilities"), "llm_model_availabilities"),
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
    """(axon, hotkey) of the validator to ask: of those scoring may use (`eligible_validators`), the
    best-staked (the first in the metagraph's order on a tie). None when there is none."""
    found, _ = eligible_validators(settings.scoring, subnet)
    if not found:
        return None
    best = max(found, key=lambda v: v.stake)  # `max` keeps the first of equals
    return best.axon, best.hotkey


class AvailabilityActor:
    name = "availability"

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
        self.bad_answers = 0  # miners' answers, and the validator's entries, not taken

    async def run(self, *, task_status: trio.TaskStatus[AvailabilityActor] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        source = self.settings.availability.source
        task_status.started(self)
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
            uids = [n.uid for n in subnet.neurons]
            path = "/miner_availabilities/miner_availabilities"
            answer = await self._post(target, path, uids, self.settings.availability.validator_max_bytes,
                                      max_containers=CONTAINERS_PER_ANSWER * (len(uids) + 1))
            if not isinstance(answer, dict):
                raise BadAnswer("the validator's answer is not a JSON object")
        except BadAnswer as exc:
            self.bad_answers += 1
            self._failed(f"bad answer: {exc}")
            return False
        except AvailabilityUnavailable as exc:
            self._failed(str(exc))
            return False
        now = self.wall_clock()
        merged = dict(self.cell.get().miners)
        for uid in uids:  # only the uids asked for: whatever else the answer holds is not kept
            key = str(uid)
            if key not in answer:
                continue
            entry = answer[key]
            try:
                merged[uid] = None if entry is None else MinerAvailability.parse(entry, now)
            except BadAnswer as exc:
                self.bad_answers += 1
                merged[uid] = None
                log.debug("validator's availability of uid %d not taken: %s", uid, exc)
        self._publish(merged, now)
        return True

    # -- miners ------------------------------------------------------------------------------------

    async def poll_miners(self, *, spread_s: float) -> None:
        """Ask every serving miner once, starts spread evenly over `spread_s`, at most `concurrency` at once.
        Validators are not asked: they are never sent a request (the same rule as the fan-out's,
        `fanout.validator_stake_limit`), and a validator's `/availability` is not a miner's."""
        limit = self.settings.fanout.validator_stake_limit
        miners = [n for n in self.subnet.get().serving_by_incentive
                  if not (n.validator_permit and n.stake >= limit)]
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
            }, MINER_ANSWER_MAX_BYTES, max_containers=CONTAINERS_PER_ANSWER)
            answers[neuron.uid] = MinerAvailability.parse(answer, self.wall_clock())
        except AvailabilityUnavailable as exc:
            errors.append(f"uid {neuron.uid}: {exc}")
        except BadAnswer as exc:
            self.bad_answers += 1
            answers[neuron.uid] = None  # it answered, not in a way that says it serves anything
            errors.append(f"uid {neuron.uid}: bad answer: {exc}")
        finally:
            limiter.release_on_behalf_of(neuron.uid)

    # -- common ------------------------------------------------------------------------------------

    async def _post(self, target: tuple[str, str], path: str, payload: Any, max_bytes: int,
                    max_containers: int) -> Any:
        """The parsed JSON answer, read whole within the poll's timeout and `max_bytes`. No answer is
        `AvailabilityUnavailable`; an answer not taken (too large, encoded, not JSON, too deep, more
        objects and arrays than `max_containers`) is `BadAnswer`. The containers are counted before
        parsing: millions of empty objects fit in a few MB and would cost hundreds of MB parsed."""
        axon, hotkey = target
        body = jsonio.dumps(payload)
        headers = {"Content-Type": "application/json", **self.signer.headers(body, hotkey)}
        try:
            with trio.fail_after(self.settings.availability.timeout_s):
                async with post_streaming(self.http, httpx.URL(f"http://{axon}{path}"), body, headers,
                                          bounded=True) as response:
                    if response.status_code != 200:
                        raise AvailabilityUnavailable(f"{axon}{path} answered HTTP {response.status_code}")
                    raw = await response.aread(max_bytes)
        except trio.TooSlowError as exc:
            raise AvailabilityUnavailable(f"{axon}{path} timed out") from exc
        except AnswerRefused as exc:
            raise BadAnswer(f"{axon}{path}: {exc}") from exc
        except httpx.HTTPError as exc:
            raise AvailabilityUnavailable(f"{axon}{path}: {type(exc).__name__} {exc}".strip()) from exc
        containers = raw.count(b"{") + raw.count(b"[")
        if containers > max_containers:
            raise BadAnswer(f"{axon}{path} answered {containers} objects and arrays, more than the "
                            f"{max_containers} its shape holds")
        try:
            return jsonio.loads_bounded(raw, max_depth=ANSWER_DEPTH)
        except ValueError as exc:
            raise BadAnswer(f"{axon}{path} answered invalid JSON ({exc})"[:200]) from exc

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
            "bad_answers": self.bad_answers,
        }
