"""The simulated miner over real loopback HTTP: its answers, and each fault mode as seen on the wire."""

from __future__ import annotations

import contextlib
import itertools
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import trio
from bittensor_core import Keypair

from config.loading import ConfigError
from devnet import text
from devnet.miner import Miner, MinerFault, MinerTiming, parse_faults
from engine.epistula import Signer

GATEWAY = Keypair.create_from_uri("//devnet/gateway")
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
TIMING = MinerTiming(first_token_s=0.0, token_s=0.0, slow_first_token_s=0.6, slow_token_s=0.15, bench_tokens=7)


class Client:
    """Signs as the gateway and talks to one miner."""

    def __init__(self, http: httpx.AsyncClient, miner: Miner) -> None:
        self.http = http
        self.miner = miner
        self.signer = Signer(GATEWAY)

    def request(self, path: str, payload: Any, **headers: str) -> httpx.Request:
        body = json.dumps(payload).encode()
        return self.http.build_request(
            "POST", f"http://{self.miner.address}{path}", content=body,
            headers={"Content-Type": "application/json", **headers,
                     **self.signer.headers(body, self.miner.hotkey)},
        )

    async def chat(self, payload: dict[str, Any] | None = None, **headers: str) -> httpx.Response:
        payload = payload or {"messages": MESSAGES, "seed": 7, "task": "InferenceTask"}
        return await self.http.send(self.request("/v1/chat/completions", payload, **headers))

    @contextlib.asynccontextmanager
    async def stream(self) -> AsyncIterator[httpx.Response]:
        """A four-token answer whose body the caller reads as it arrives."""
        payload = {"messages": MESSAGES, "seed": 7, "task": "InferenceTask",
                   "sampling_parameters": {"max_new_tokens": 4}}
        response = await self.http.send(self.request("/v1/chat/completions", payload), stream=True)
        try:
            yield response
        finally:
            await response.aclose()


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=10, verify=False) as client:
        yield client


async def start_miner(nursery: trio.Nursery, uid: int = 3, **kw: Any) -> Miner:
    miner = Miner(uid, signers=[GATEWAY.ss58_address], timing=kw.pop("timing", TIMING), **kw)
    await nursery.start(miner.run)
    return miner


@pytest.fixture
async def miner(nursery: trio.Nursery) -> Miner:
    return await start_miner(nursery)


@pytest.fixture
def client(http: httpx.AsyncClient, miner: Miner) -> Client:
    return Client(http, miner)


def events(body: str) -> list[Any]:
    """The `data` of each event: parsed JSON, "[DONE]", or the raw text when it is not JSON."""
    found: list[Any] = []
    for block in body.split("\n\n"):
        if not block.startswith("data: "):
            assert block == "", block
            continue
        data = block[len("data: "):]
        try:
            found.append(data if data == "[DONE]" else json.loads(data))
        except ValueError:
            found.append(("not json", data))
    return found


def contents(found: list[Any]) -> list[str]:
    return [e["choices"][0]["delta"]["content"] for e in found
            if isinstance(e, dict) and e["choices"][0]["delta"].get("content")]


# -- answers ---------------------------------------------------------------------------------------


async def test_a_healthy_answer_streams_one_token_per_chunk_with_logprobs(client: Client) -> None:
    response = await client.chat({"model": "m", "messages": MESSAGES, "seed": 7, "task": "InferenceTask",
                                  "sampling_parameters": {"max_new_tokens": 1000}})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    found = events(response.text)
    assert found[-1] == "[DONE]"
    chunks = found[:-1]
    expected = text.answer(7, MESSAGES, 1000)
    assert "".join(contents(chunks)) == expected.text and expected.text
    content_chunks = chunks[:-1]
    assert len(content_chunks) == len(expected.tokens)
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "finish_reason": "stop"}
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    for chunk, token in zip(content_chunks, expected.tokens, strict=True):
        assert chunk["object"] == "chat.completion.chunk" and chunk["model"] == "m"
        assert isinstance(chunk["created"], int) and chunk["id"] == chunks[0]["id"]
        choice = chunk["choices"][0]
        assert choice["finish_reason"] is None
        entry = choice["logprobs"]["content"][0]
        assert entry["token"] == choice["delta"]["content"] == token.text
        assert entry["logprob"] <= 0
        assert entry["top_logprobs"][0] == {"token": token.text, "logprob": entry["logprob"]}


async def test_the_text_depends_only_on_seed_and_messages(client: Client, http: httpx.AsyncClient,
                                                           nursery: trio.Nursery) -> None:
    other = Client(http, await start_miner(nursery, port=0))
    first = contents(events((await client.chat()).text))
    again = contents(events((await other.chat()).text))
    assert first == again and len(first) > 1
    other_seed = contents(events((await client.chat({"messages": MESSAGES, "seed": 8}) ).text))
    other_messages = contents(events((await client.chat({"messages": MESSAGES[1:], "seed": 7})).text))
    assert first != other_seed and first != other_messages


@pytest.mark.parametrize(("limits", "expected"), [
    ({"sampling_parameters": {"max_new_tokens": 3}, "max_tokens": 9}, 3),
    ({"max_tokens": 5}, 5),
    ({"max_completion_tokens": 2}, 2),
    ({}, text.DEFAULT_MAX_TOKENS),
])
async def test_the_token_limit_cuts_the_answer(client: Client, limits: dict[str, Any], expected: int) -> None:
    messages = [{"role": "user", "content": "a long answer please"}]
    seed = next(s for s in range(1000) if len(text.answer(s, messages, 10_000).tokens) > 40)
    found = events((await client.chat({"messages": messages, "seed": seed, **limits})).text)
    assert len(contents(found)) == expected
    assert found[-2]["choices"][0]["finish_reason"] == "length"
    assert found[-1] == "[DONE]"


async def test_web_retrieval_answers_one_chunk_of_results(client: Client, http: httpx.AsyncClient,
                                                          nursery: trio.Nursery) -> None:
    payload = {"seed": 1, "task": "WebRetrievalTask", "target_results": 4, "timeout": 10,
               "sampling_parameters": {}, "messages": [{"role": "user", "content": "trio nurseries"}]}
    found = events((await client.chat(payload)).text)
    assert found[-1] == "[DONE]" and found[-2]["choices"][0]["finish_reason"] == "stop"
    [content] = contents(found)
    results = json.loads(content)
    assert len(results) == 4
    assert all(set(r) == {"url", "content", "relevant"} for r in results)
    assert all(r["url"].startswith("https://") and "trio nurseries" in r["content"] for r in results)
    # Another miner overlaps on some URLs (so the gateway's de-duplication matters), not on all.
    other = await start_miner(nursery, uid=4)
    theirs = json.loads(contents(events((await Client(http, other).chat(payload)).text))[0])
    shared = {r["url"] for r in results} & {r["url"] for r in theirs}
    assert 0 < len(shared) < 4


async def test_web_retrieval_is_routed_by_the_task_header_too(client: Client) -> None:
    payload = {"seed": 1, "messages": [{"role": "user", "content": "q"}]}
    found = events((await client.chat(payload, task="WebRetrievalTask", target_results="2")).text)
    assert len(json.loads(contents(found)[0])) == 2


async def test_availability_answers_its_own_booleans(http: httpx.AsyncClient, nursery: trio.Nursery) -> None:
    miner = await start_miner(nursery, tasks=["InferenceTask"], models=["m1"])
    asked = {"task_availabilities": {"InferenceTask": True, "WebRetrievalTask": True},
             "llm_model_availabilities": {"m1": True, "m2": True}}
    response = await http.send(Client(http, miner).request("/availability", asked))
    assert response.status_code == 200
    assert response.json() == {"task_availabilities": {"InferenceTask": True, "WebRetrievalTask": False},
                               "llm_model_availabilities": {"m1": True, "m2": False}}


async def test_defaults_serve_inference_retrieval_and_one_model(client: Client, http: httpx.AsyncClient) -> None:
    answer = (await http.send(client.request("/availability", {}))).json()
    assert answer == {"task_availabilities": {"InferenceTask": True, "WebRetrievalTask": True},
                      "llm_model_availabilities": {"hugging-quants/Meta-Llama-3.1-70B-Instruct-AWQ-INT4": True}}


async def test_it_records_what_it_received(client: Client) -> None:
    await client.chat({"messages": MESSAGES, "seed": 3}, task="InferenceTask")
    [received] = client.miner.received
    assert received.path == "/v1/chat/completions" and received.status == 200
    assert received.json() == {"messages": MESSAGES, "seed": 3}
    assert received.headers["task"] == "InferenceTask"
    assert received.headers["epistula-signed-by"] == GATEWAY.ss58_address


async def test_a_body_that_is_not_json_is_a_400(client: Client, http: httpx.AsyncClient) -> None:
    body = b"{nope"
    response = await http.post(f"http://{client.miner.address}/v1/chat/completions", content=body,
                               headers=client.signer.headers(body, client.miner.hotkey))
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_json"


# -- faults ----------------------------------------------------------------------------------------


async def test_slow_first_token_sends_headers_then_waits(client: Client) -> None:
    await client.miner.set_fault("slow_first_token")
    with trio.fail_after(5):
        async with client.stream() as response:
            headers_at = trio.current_time()
            assert response.status_code == 200
            arrivals = [(trio.current_time(), line) async for line in response.aiter_lines() if line]
    first_at, first = arrivals[0]
    assert first.startswith("data: {") and first_at - headers_at >= 0.55
    assert arrivals[-1][1] == "data: [DONE]"


async def test_slow_tokens_space_the_chunks(client: Client) -> None:
    await client.miner.set_fault("slow_tokens")
    arrivals = []
    with trio.fail_after(5):
        async with client.stream() as response:
            async for line in response.aiter_lines():
                if line.startswith("data: {") and '"content"' in line:
                    arrivals.append(trio.current_time())
    assert len(arrivals) == 4
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    assert min(gaps) >= 0.12


async def test_http_500_is_a_json_error(client: Client) -> None:
    await client.miner.set_fault("http_500")
    response = await client.chat()
    assert response.status_code == 500
    assert response.json()["error"]["code"] == "simulated_failure"
    await client.miner.set_fault("")  # faults change at run time
    assert (await client.chat()).status_code == 200


async def test_refuse_means_nobody_listens_on_its_axon_and_it_comes_back(client: Client) -> None:
    address = client.miner.address
    await client.miner.set_fault(MinerFault.REFUSE)
    with pytest.raises(httpx.ConnectError):
        await client.chat()
    await client.miner.set_fault(MinerFault.HEALTHY)
    assert client.miner.address == address
    assert (await client.chat()).status_code == 200


async def test_a_miner_can_start_refusing(http: httpx.AsyncClient, nursery: trio.Nursery) -> None:
    miner = await start_miner(nursery, fault="refuse")
    with pytest.raises(httpx.ConnectError):
        await Client(http, miner).chat()
    assert miner.neuron().axon == miner.address and miner.address.startswith("127.0.0.1:")


async def test_hang_after_headers_never_sends_a_body_byte(client: Client) -> None:
    await client.miner.set_fault("hang_after_headers")
    with trio.fail_after(5):
        async with client.stream() as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            with trio.move_on_after(0.5):
                async for raw in response.aiter_raw():
                    pytest.fail(f"body bytes arrived: {raw!r}")


async def test_stop_mid_stream_drops_the_connection(client: Client) -> None:
    await client.miner.set_fault("stop_mid_stream")
    lines = []
    with trio.fail_after(5), pytest.raises(httpx.RemoteProtocolError):
        async with client.stream() as response:
            async for line in response.aiter_lines():
                lines.append(line)
    found = events("\n".join(lines) + "\n")
    assert len(contents(found)) == 2  # half of the 4 tokens
    assert "[DONE]" not in found
    assert all(e["choices"][0]["finish_reason"] is None for e in found)


async def test_invalid_json_sends_an_event_that_does_not_parse(client: Client) -> None:
    await client.miner.set_fault("invalid_json")
    found = events((await client.chat()).text)
    assert found[0][0] == "not json"
    assert found[-1] == "[DONE]"


async def test_no_done_ends_cleanly_without_done(client: Client) -> None:
    await client.miner.set_fault("no_done")
    response = await client.chat({"messages": MESSAGES, "seed": 7, "max_tokens": 3})
    assert response.status_code == 200
    found = events(response.text)
    assert "[DONE]" not in found
    assert found[-1]["choices"][0]["finish_reason"] == "length"
    assert len(contents(found)) == 3


async def test_bench_answers_a_fixed_length_at_once(http: httpx.AsyncClient, nursery: trio.Nursery) -> None:
    slow = MinerTiming(first_token_s=1.0, token_s=1.0, bench_tokens=7)
    miner = await start_miner(nursery, fault="bench", timing=slow)
    with trio.fail_after(0.9):  # the normal delays would take 7 s
        found = events((await Client(http, miner).chat()).text)
    assert len(contents(found)) == 7
    assert found[-2]["choices"][0]["finish_reason"] == "stop" and found[-1] == "[DONE]"


def test_unknown_fault_names_are_config_errors() -> None:
    assert parse_faults(["", "http_500"]) == (MinerFault.HEALTHY, MinerFault.HTTP_500)
    with pytest.raises(ConfigError, match=r"devnet.faults\[1\].*'slowly'"):
        parse_faults(["", "slowly"])
