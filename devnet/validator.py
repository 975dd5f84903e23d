"""A simulated validator: receives organic scoring payloads and answers miner availabilities.

`POST /scoring` behaves as the deployed validator's (docs/protocol.md, "The validator's answers"), so
that tests through it catch what a real one would do with the gateway's payloads:
- it must be Epistula-signed for the validator's own hotkey by its `API_HOTKEY` (`api_hotkey`, by
  default the gateway's hotkey); any other signer gets 401;
- a body whose `sampling_parameters` holds anything but numbers and booleans is a 500 (upstream's model
  is `dict[str, float]`), for an InferenceTask;
- a body naming a model other than the one it serves (`model`; the mistral-small model is always
  accepted), whose messages have non-string content or more than one system message, or with no uids
  or chunks, is answered 200 `null` and not kept (counted in `ignored`);
- every other payload is kept in `scored` and answered 200 `null`; one whose `chunk_dicts_raw` is not
  index-aligned with `chunks` and `timings` (as upstream's logprob check reads them) is kept too (upstream
  penalises the miner, it does not refuse the payload) and counted in `misaligned`, the first mismatch
  in `first_misalignment`.
`POST /miner_availabilities/miner_availabilities` answers from the validator's own periodic poll of the
miners' `/availability` (a miner that did not answer is `null`). Fault modes: "down" (really not
listening; `go_down` / `come_up` keep the port), "http_500", "slow" (waits `slow_s` before answering),
"refuse_signer" (401 to every scoring post, as a validator whose API_HOTKEY names someone else).
"""

from __future__ import annotations

import collections
import enum
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import httpx
import trio
from bittensor_core import Keypair
from quart import Response, request
from quart_trio import QuartTrio

from config.loading import ConfigError
from devnet.listener import Listener
from devnet.miner import DEFAULT_MODELS
from devnet.receiving import Inbox, Received, error_response, json_response
from wire.epistula import Signer
from wire.metagraph import Neuron

log = logging.getLogger("sn1_gateway.devnet")

ASKED_TASKS = ("InferenceTask", "WebRetrievalTask", "MultiStepReasoningTask", "ProgrammingTask",
               "WebQuestionAnsweringTask")
MISTRAL_SMALL = "mrfakename/mistral-small-3.1-24b-instruct-2503-hf"  # scored by every v2.19 validator
ASKED_MODELS = ("hugging-quants/Meta-Llama-3.1-70B-Instruct-AWQ-INT4", MISTRAL_SMALL)
MAX_BODY_BYTES = 64 * 1024 * 1024
_MISSING = object()  # a chunk without `choices[0].delta.content`


class ValidatorFault(enum.StrEnum):
    HEALTHY = ""
    DOWN = "down"  # nobody listens on its axon
    HTTP_500 = "http_500"  # answers every request with 500
    SLOW = "slow"  # waits `slow_s` before answering
    REFUSE_SIGNER = "refuse_signer"  # 401 to every scoring post: its API_HOTKEY names someone else


def parse_validator_fault(value: str, *, key: str = "devnet.validator_fault") -> ValidatorFault:
    """A validator fault name from the config file or the command line; an unknown one is a ConfigError."""
    try:
        return ValidatorFault(value.strip())
    except ValueError:
        choices = ", ".join(repr(f.value) for f in ValidatorFault)
        raise ConfigError(f"{key}: expected one of {choices}, found {value!r}") from None


def _delta_content(chunk: Any) -> Any:
    """`chunk["choices"][0]["delta"]["content"]`, as upstream reads it; a sentinel when it is not there."""
    try:
        return chunk["choices"][0]["delta"]["content"]
    except (KeyError, IndexError, TypeError):
        return _MISSING


def _short(value: Any) -> str:
    text = "(missing)" if value is _MISSING else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def misalignment(payload: Mapping[str, Any]) -> str | None:
    """Where `chunk_dicts_raw` stops matching `chunks` and `timings` for upstream's logprob check (it looks
    at `chunk_dicts_raw[uid][i]` for `chunks[uid][i]`); None when every uid is aligned."""
    chunks, raw, timings = (payload.get(name) or {} for name in ("chunks", "chunk_dicts_raw", "timings"))
    if not all(isinstance(m, Mapping) for m in (chunks, raw, timings)):
        return "chunks, chunk_dicts_raw and timings must be objects keyed by uid"
    for uid in payload.get("uids") or []:
        key = str(uid)
        texts, dicts, times = chunks.get(key, []), raw.get(key, []), timings.get(key, [])
        if not all(isinstance(v, list) for v in (texts, dicts, times)):
            return f"uid {key}: chunks, chunk_dicts_raw and timings must be lists"
        if not len(texts) == len(dicts) == len(times):
            return f"uid {key}: {len(texts)} chunks, {len(dicts)} chunk_dicts_raw, {len(times)} timings"
        for i, (text, chunk) in enumerate(zip(texts, dicts, strict=True)):
            content = _delta_content(chunk)
            if content != text:
                return (f"uid {key} index {i}: chunk_dicts_raw content {_short(content)} "
                        f"is not the chunk {_short(text)}")
    return None


def _not_numbers(sampling: Any) -> str | None:
    """Why `sampling_parameters` would fail upstream's `dict[str, float]`; None when it would not."""
    if not isinstance(sampling, Mapping):
        return f"sampling_parameters must be an object, found {type(sampling).__name__}"
    bad = sorted(str(k) for k, v in sampling.items() if not isinstance(v, int | float))
    return f"sampling_parameters must hold numbers only, not {', '.join(bad)}" if bad else None


def _why_ignored(body: Mapping[str, Any], served: str) -> str | None:
    """Why upstream would take this organic without scoring it (a 200 `null`); None when it scores it."""
    model = body.get("model")
    if model and model not in (served, MISTRAL_SMALL):
        return "model"
    messages = body.get("messages")
    if not isinstance(messages, list):
        return None
    if any(not isinstance(m, Mapping) or not isinstance(m.get("content"), str) for m in messages):
        return "messages"
    if sum(1 for m in messages if m.get("role") == "system") > 1:
        return "messages"
    return None


class Validator:
    def __init__(
        self,
        *,
        gateway_hotkey: str,
        miners: Callable[[], Sequence[Neuron]],
        api_hotkey: str | None = None,
        model: str = DEFAULT_MODELS[0],
        uid: int = 0,
        stake: float = 100_000.0,
        fault: ValidatorFault | str = ValidatorFault.HEALTHY,
        slow_s: float = 5.0,
        poll_interval_s: float = 5.0,
        poll_timeout_s: float = 2.0,
        host: str = "127.0.0.1",
        port: int = 0,
        keep: int = 10_000,
    ) -> None:
        self.uid = uid
        self.keypair = Keypair.create_from_uri("//devnet/validator")
        self.hotkey: str = self.keypair.ss58_address
        self.signer = Signer(self.keypair)
        self.miners = miners
        self.stake = stake
        self.slow_s = slow_s
        self.poll_interval_s = poll_interval_s
        self.poll_timeout_s = poll_timeout_s
        self.api_hotkey = api_hotkey or gateway_hotkey  # the only signer /scoring accepts
        self.model = model  # the model it scores; organics naming another are ignored
        self.inbox = Inbox(self.hotkey, {gateway_hotkey, self.api_hotkey}, keep=keep)
        self.scored: collections.deque[Any] = collections.deque(maxlen=keep)  # payloads, oldest first
        self.scored_total = 0
        self.refused = 0  # scoring posts answered 401: signed by someone other than api_hotkey
        self.failed = 0  # scoring posts answered 500 for their sampling_parameters
        self.ignored: collections.Counter[str] = collections.Counter()  # 200 null, not kept, by reason
        self.misaligned = 0  # kept payloads whose chunk_dicts_raw is not aligned with chunks
        self.first_misalignment: str | None = None
        self.availabilities: dict[int, dict[str, Any] | None] = {}
        self.polls = 0
        self._polled = trio.Event()  # replaced after each poll and each scoring payload
        self._scored = trio.Event()
        self.fault = ValidatorFault.HEALTHY
        self.listener = Listener(self._app(), host=host, port=port, name="validator")
        self.set_fault_nowait(fault)

    @property
    def address(self) -> str:
        return self.listener.address

    @property
    def received(self) -> Sequence[Received]:
        return self.inbox.received

    def neuron(self) -> Neuron:
        return Neuron(uid=self.uid, hotkey=self.hotkey, axon=self.address, stake=self.stake,
                      validator_permit=True)

    async def run(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """Poll the miners once, start listening, then poll every `poll_interval_s`."""
        async with (
            # plain HTTP to loopback only: no certificates to load (that alone costs ~0.1 s)
            httpx.AsyncClient(trust_env=False, verify=False, timeout=httpx.Timeout(self.poll_timeout_s)) as http,
            trio.open_nursery() as nursery,
        ):
            await self.poll_once(http)
            address = await nursery.start(self.listener.run)
            nursery.start_soon(self._poll_forever, http)
            task_status.started(address)

    # -- faults --------------------------------------------------------------------------------------

    def set_fault_nowait(self, fault: ValidatorFault | str) -> None:
        self.fault = ValidatorFault(fault)
        if self.fault is ValidatorFault.DOWN:
            self.listener.go_down_nowait()
        else:
            self.listener.come_up_nowait()

    async def set_fault(self, fault: ValidatorFault | str) -> None:
        self.set_fault_nowait(fault)
        await self.listener.wait_listening(self.fault is not ValidatorFault.DOWN)

    async def go_down(self) -> None:
        """Stop listening (connections are refused) until `come_up`."""
        await self.set_fault(ValidatorFault.DOWN)

    async def come_up(self) -> None:
        """Listen again, on the same port, healthy."""
        await self.set_fault(ValidatorFault.HEALTHY)

    # -- availability poll ---------------------------------------------------------------------------

    async def _poll_forever(self, http: httpx.AsyncClient) -> None:
        while True:
            await trio.sleep(self.poll_interval_s)
            await self.poll_once(http)

    async def poll_once(self, http: httpx.AsyncClient) -> None:
        """Ask every serving miner at once; the answers replace the previous poll's."""
        found: dict[int, dict[str, Any] | None] = {}
        async with trio.open_nursery() as nursery:
            for neuron in self.miners():
                if neuron.axon:
                    nursery.start_soon(self._ask, http, neuron, found)
        self.availabilities = found
        self.polls += 1
        self._polled.set()
        self._polled = trio.Event()

    async def wait_next_poll(self) -> None:
        """Return once a poll that starts after this call has finished."""
        for _ in range(2):  # the first may have started before the call
            await self._polled.wait()

    async def wait_scored(self, total: int) -> None:
        """Return once `total` scoring payloads have been accepted since the start."""
        while self.scored_total < total:
            await self._scored.wait()

    async def _ask(self, http: httpx.AsyncClient, neuron: Neuron, found: dict[int, dict[str, Any] | None]) -> None:
        found[neuron.uid] = None
        body = json.dumps({
            "task_availabilities": dict.fromkeys(ASKED_TASKS, True),
            "llm_model_availabilities": dict.fromkeys(ASKED_MODELS, True),
        }).encode()
        headers = {"Content-Type": "application/json", **self.signer.headers(body, neuron.hotkey)}
        with trio.move_on_after(self.poll_timeout_s):
            try:
                response = await http.post(f"http://{neuron.axon}/availability", content=body, headers=headers)
                answer = response.json() if response.status_code == 200 else None
            except (httpx.HTTPError, ValueError) as exc:
                log.debug("validator: miner %d did not answer its availability: %s", neuron.uid, exc)
                return
            if _availability_shape(answer):
                found[neuron.uid] = answer

    # -- HTTP ----------------------------------------------------------------------------------------

    def _app(self) -> QuartTrio:
        app = QuartTrio("devnet_validator")
        app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
        app.add_url_rule("/scoring", "scoring", self._scoring, methods=["POST"])
        app.add_url_rule("/miner_availabilities/miner_availabilities", "availabilities",
                         self._availabilities, methods=["POST"])
        return app

    async def _accept(self) -> tuple[bytes, Any, Response | None]:
        """Apply the slow and 500 faults, verify and parse; the body, its JSON, or the rejection."""
        if self.fault is ValidatorFault.SLOW:
            await trio.sleep(self.slow_s)
        raw, rejection = await self.inbox.take()
        if rejection is not None:
            return raw, None, rejection
        if self.fault is ValidatorFault.HTTP_500:
            self.inbox.record(raw, 500)
            return raw, None, error_response(500, "validator failed (simulated)", "simulated_failure")
        payload, rejection = self.inbox.parse(raw)
        return raw, payload, rejection

    async def _scoring(self) -> Response:
        if self.fault is ValidatorFault.SLOW:
            await trio.sleep(self.slow_s)
        raw, rejection = await self.inbox.take()
        if rejection is not None:
            return rejection
        if self.fault is ValidatorFault.REFUSE_SIGNER or request.headers.get("Epistula-Signed-By") != self.api_hotkey:
            self.inbox.record(raw, 401)
            self.refused += 1
            return error_response(401, "Signer not the expected ss58 address (API_HOTKEY)", "signer_not_api_hotkey")
        if self.fault is ValidatorFault.HTTP_500:
            self.inbox.record(raw, 500)
            return error_response(500, "validator failed (simulated)", "simulated_failure")
        payload, rejection = self.inbox.parse(raw)
        if rejection is not None:
            return rejection
        if (not isinstance(payload, dict) or not isinstance(payload.get("uids"), list)
                or not isinstance(payload.get("body"), dict)):
            self.inbox.record(raw, 400)
            return error_response(400, "a scoring payload is an object with body, uids, chunks, timings",
                                  "invalid_body")
        body = payload["body"]
        why = "empty" if not payload["uids"] or not payload.get("chunks") else _why_ignored(body, self.model)
        if why is not None:
            self.inbox.record(raw, 200)
            self.ignored[why] += 1
            return json_response(None)
        if body.get("task") == "InferenceTask" and "sampling_parameters" in body:
            problem = _not_numbers(body["sampling_parameters"])
            if problem is not None:
                self.inbox.record(raw, 500)
                self.failed += 1
                return error_response(500, f"Internal Server Error ({problem})", "invalid_sampling_parameters")
        mismatch = misalignment(payload)
        if mismatch is not None:
            self.misaligned += 1
            if self.first_misalignment is None:
                self.first_misalignment = mismatch
            log.warning("validator: a misaligned scoring payload (%s)", mismatch)
        self.inbox.record(raw, 200)
        self.scored.append(payload)
        self.scored_total += 1
        self._scored.set()
        self._scored = trio.Event()
        return json_response(None)

    async def _availabilities(self) -> Response:
        raw, uids, rejection = await self._accept()
        if rejection is not None:
            return rejection
        if uids is None or uids == []:
            uids = sorted(self.availabilities)
        if not isinstance(uids, list) or not all(isinstance(u, int) and not isinstance(u, bool) for u in uids):
            self.inbox.record(raw, 400)
            return error_response(400, "the body is a JSON array of uids, or null for all", "invalid_body")
        self.inbox.record(raw, 200)
        return json_response({str(uid): self.availabilities.get(uid) for uid in uids})


def _availability_shape(answer: Any) -> bool:
    return (isinstance(answer, Mapping) and isinstance(answer.get("task_availabilities"), Mapping)
            and isinstance(answer.get("llm_model_availabilities"), Mapping))
