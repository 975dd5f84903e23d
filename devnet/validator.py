"""A simulated validator: receives organic scoring payloads and answers miner availabilities.

`POST /scoring` must be Epistula-signed by the gateway's hotkey for the validator's own; the payload is
kept in `scored` and answered with 200 `null`. `POST /miner_availabilities/miner_availabilities` answers
from the validator's own periodic poll of the miners' `/availability` (a miner that did not answer is
`null`). Fault modes: "down" (really not listening; `go_down` / `come_up` keep the port), "http_500",
"slow" (waits `slow_s` before answering).
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
from quart import Response
from quart_trio import QuartTrio

from devnet.listener import Listener
from devnet.receiving import Inbox, Received, error_response, json_response
from engine.epistula import Signer
from engine.subnet import Neuron

log = logging.getLogger("sn1_gateway.devnet")

ASKED_TASKS = ("InferenceTask", "WebRetrievalTask", "MultiStepReasoningTask", "ProgrammingTask",
               "WebQuestionAnsweringTask")
ASKED_MODELS = ("hugging-quants/Meta-Llama-3.1-70B-Instruct-AWQ-INT4",
                "mrfakename/mistral-small-3.1-24b-instruct-2503-hf")
MAX_BODY_BYTES = 64 * 1024 * 1024


class ValidatorFault(enum.StrEnum):
    HEALTHY = ""
    DOWN = "down"  # nobody listens on its axon
    HTTP_500 = "http_500"  # answers every request with 500
    SLOW = "slow"  # waits `slow_s` before answering


class Validator:
    def __init__(
        self,
        *,
        gateway_hotkey: str,
        miners: Callable[[], Sequence[Neuron]],
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
        self.inbox = Inbox(self.hotkey, [gateway_hotkey], keep=keep)
        self.scored: collections.deque[Any] = collections.deque(maxlen=keep)  # payloads, oldest first
        self.scored_total = 0
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
        raw, payload, rejection = await self._accept()
        if rejection is not None:
            return rejection
        if not isinstance(payload, dict) or not isinstance(payload.get("uids"), list):
            self.inbox.record(raw, 400)
            return error_response(400, "a scoring payload is an object with body, uids, chunks, timings",
                                  "invalid_body")
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
