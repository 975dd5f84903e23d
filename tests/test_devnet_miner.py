"""The simulated miner over real loopback HTTP: its answers, and each fault mode as seen on the wire."""

from __future__ import annotations

import contextlib
import itertools
import json
import zlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import trio
from bittensor_core import Keypair

from config.loading import ConfigError
from devnet import text
from devnet.miner import DEFAULT_MODELS, Miner, MinerFault, MinerStyle, MinerTiming, parse_faults
from wire.epistula import Signer

GATEWAY = Keypair.create_from_uri("//devnet/gateway")
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
TIMING = MinerTiming(first_token_s=0.0, token_s=0.0, slow_first_token_s=0.6, slow_token_s=0.15, bench_tokens=7)
VLLM = MinerStyle()  # role chunk, separate finish chunk, usage chunk, [DONE]


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
    async def stream(self, path: str = "/v1/chat/completions", payload: Any = None) -> AsyncIterator[httpx.Response]:
        """A four-token answer (or what `payload` asks of `path`) whose body the caller reads as it arrives."""
        if payload is None:
            payload = {"messages": MESSAGES, "seed": 7, "task": "InferenceTask",
                       "sampling_parameters": {"max_new_tokens": 4}}
        response = await self.http.send(self.request(path, payload), stream=True)
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
    return await start_miner(nursery, style=VLLM)


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


def choices(found: list[Any]) -> list[dict[str, Any]]:
    """The first choice of each chunk that has one (not the usage chunk, not [DONE])."""
    return [e["choices"][0] for e in found if isinstance(e, dict) and e["choices"]]


def contents(found: list[Any]) -> list[str]:
    return [c["delta"]["content"] for c in choices(found) if c["delta"].get("content")]


def finish_of(found: list[Any]) -> str:
    """The stream's finish_reason: sent exactly once."""
    [reason] = [c["finish_reason"] for c in choices(found) if c["finish_reason"] is not None]
    return str(reason)


def usage_of(found: list[Any]) -> dict[str, int]:
    [usage] = [e["usage"] for e in found if isinstance(e, dict) and "usage" in e]
    return dict(usage)


# -- answers ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("uid", range(5))
async def test_a_healthy_answer_streams_as_vllm_does_in_the_style_of_its_uid(
        http: httpx.AsyncClient, nursery: trio.Nursery, uid: int) -> None:
    miner = await start_miner(nursery, uid=uid)
    style = miner.style
    assert style == MinerStyle.for_uid(uid)
    response = await Client(http, miner).chat({"model": "m", "messages": MESSAGES, "seed": 7,
                                               "task": "InferenceTask", "sampling_parameters": {"max_new_tokens": 1000}})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    found = events(response.text)
    expected = text.answer(7, MESSAGES, 1000)
    assert "".join(contents(found)) == expected.text and expected.text
    assert (found[-1] == "[DONE]") is style.done
    chunks = [e for e in found if e != "[DONE]"]
    assert all(c["id"] == chunks[0]["id"] and c["model"] == "m" and c["object"] == "chat.completion.chunk"
               and isinstance(c["created"], int) for c in chunks)
    if style.role_chunk:
        role, chunks = chunks[0], chunks[1:]
        assert role["choices"] == [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                    "finish_reason": None}]
    if style.usage_chunk:
        usage, chunks = chunks[-1], chunks[:-1]
        assert usage["choices"] == []
        prompt = text.prompt_tokens(MESSAGES)
        assert usage["usage"] == {"prompt_tokens": prompt, "completion_tokens": len(expected.tokens),
                                  "total_tokens": prompt + len(expected.tokens)}
    if not style.finish_with_last_token:
        finish, chunks = chunks[-1], chunks[:-1]
        assert finish["choices"] == [{"index": 0, "delta": {}, "finish_reason": "stop"}]
    assert len(chunks) == len(expected.tokens)
    for i, (chunk, token) in enumerate(zip(chunks, expected.tokens, strict=True)):
        choice = chunk["choices"][0]
        last = i == len(chunks) - 1
        assert choice["finish_reason"] == ("stop" if last and style.finish_with_last_token else None)
        assert ("role" in choice["delta"]) is (i == 0 and not style.role_chunk)
        [entry] = choice["logprobs"]["content"]
        assert entry["token"] == choice["delta"]["content"] == token.text
        assert entry["logprob"] <= 0 and entry["bytes"] == list(token.text.encode())
        assert entry["top_logprobs"][0] == {"token": token.text, "logprob": entry["logprob"],
                                            "bytes": list(token.text.encode())}
        assert all(set(t) == {"token", "logprob", "bytes"} for t in entry["top_logprobs"])


def test_five_consecutive_uids_meet_every_pair_of_style_choices() -> None:
    names = ("role_chunk", "finish_with_last_token", "usage_chunk", "done")
    for offset in (0, 5, 12):
        styles = [MinerStyle.for_uid(offset + uid) for uid in range(5)]
        for a, b in itertools.combinations(names, 2):
            met = {(getattr(s, a), getattr(s, b)) for s in styles}
            assert met == {(False, False), (False, True), (True, False), (True, True)}, (a, b)


async def test_a_style_given_to_the_constructor_wins(http: httpx.AsyncClient, nursery: trio.Nursery) -> None:
    plain = MinerStyle(role_chunk=False, finish_with_last_token=True, usage_chunk=False, done=False)
    miner = await start_miner(nursery, uid=0, style=plain)
    found = events((await Client(http, miner).chat()).text)
    assert all(isinstance(e, dict) and e["choices"] and e["choices"][0]["delta"].get("content") for e in found)
    assert found[-1]["choices"][0]["finish_reason"] in ("stop", "length")


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
    assert finish_of(found) == "length" and usage_of(found)["completion_tokens"] == expected
    assert found[-1] == "[DONE]"


async def test_web_retrieval_answers_one_chunk_of_results(client: Client, http: httpx.AsyncClient,
                                                          nursery: trio.Nursery) -> None:
    payload = {"seed": 1, "task": "WebRetrievalTask", "target_results": 4, "timeout": 10,
               "sampling_parameters": {}, "messages": [{"role": "user", "content": "trio nurseries"}]}
    found = events((await client.chat(payload)).text)
    assert found[-1] == "[DONE]" and finish_of(found) == "stop"
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


async def test_defaults_serve_inference_retrieval_and_two_models_mistral_first(
        client: Client, http: httpx.AsyncClient) -> None:
    assert DEFAULT_MODELS == ("mrfakename/mistral-small-3.1-24b-instruct-2503-hf",
                              "hugging-quants/Meta-Llama-3.1-70B-Instruct-AWQ-INT4")
    answer = (await http.send(client.request("/availability", {}))).json()
    assert answer == {"task_availabilities": {"InferenceTask": True, "WebRetrievalTask": True},
                      "llm_model_availabilities": dict.fromkeys(DEFAULT_MODELS, True)}
    # A request without a model is answered as the first model.
    found = events((await client.chat()).text)
    assert {e["model"] for e in found if isinstance(e, dict)} == {DEFAULT_MODELS[0]}


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
                if line.startswith("data: {") and '"content"' in line and '"content":""' not in line:
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
    assert finish_of(found) == "length" and "usage" in found[-1]
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


# -- a validating miner ----------------------------------------------------------------------------


@pytest.mark.parametrize(("sampling", "loc"), [
    ({"temperature": "hot"}, ["body", "sampling_parameters", "temperature"]),
    ({"temperature": 0.7, "stop": ["\n"]}, ["body", "sampling_parameters", "stop"]),
    ({"top_p": None}, ["body", "sampling_parameters", "top_p"]),
    ({"seed": {"a": 1}}, ["body", "sampling_parameters", "seed"]),
    (["temperature", 0.7], ["body", "sampling_parameters"]),
])
async def test_sampling_parameters_that_are_not_numbers_are_a_422(client: Client, sampling: Any,
                                                                  loc: list[str]) -> None:
    response = await client.chat({"messages": MESSAGES, "seed": 1, "sampling_parameters": sampling})
    assert response.status_code == 422
    assert response.headers["content-type"].startswith("application/json")
    [error] = response.json()["detail"]
    assert error["loc"] == loc and error["msg"].startswith("Input should be a valid")
    assert client.miner.received[-1].status == 422


async def test_numbers_and_booleans_are_valid_sampling_parameters(client: Client) -> None:
    sampling = {"temperature": 0.7, "top_p": 0.95, "top_k": 50, "max_new_tokens": 3, "do_sample": True}
    response = await client.chat({"messages": MESSAGES, "seed": 1, "sampling_parameters": sampling})
    assert response.status_code == 200 and len(contents(events(response.text))) == 3
    assert (await client.chat({"messages": MESSAGES, "seed": 1, "sampling_parameters": None})).status_code == 200


# -- hostile faults --------------------------------------------------------------------------------


async def wait_streams_closed(miner: Miner) -> None:
    with trio.fail_after(3):
        await miner.wait_streams_closed()


def test_the_hostile_faults_are_selectable_by_name() -> None:
    names = ["endless_line", "flood", "tool_calls", "huge_usage", "deep_json", "gzip_bomb"]
    assert [f.value for f in parse_faults(names)] == names


async def test_endless_line_sends_one_line_forever_and_stops_when_the_client_leaves(client: Client) -> None:
    await client.miner.set_fault("endless_line")
    received = bytearray()
    with trio.fail_after(5):
        async with client.stream() as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            async for raw in response.aiter_raw():
                received += raw
                if len(received) > 1_000_000:
                    break
            assert client.miner.streams_open == 1
    assert received.startswith(b"data: {") and b"\n" not in received and b"\r" not in received
    await wait_streams_closed(client.miner)


async def test_endless_line_keeps_a_steady_rate(nursery: trio.Nursery, http: httpx.AsyncClient) -> None:
    timing = MinerTiming(first_token_s=0.0, flood_interval_s=0.05)
    client = Client(http, await start_miner(nursery, fault="endless_line", timing=timing))
    received = 0
    with trio.fail_after(5):
        async with client.stream() as response:
            with trio.move_on_after(0.5):
                async for raw in response.aiter_raw():
                    received += len(raw)
    assert 5 * 65_536 <= received <= 13 * 65_536  # about one 64 KiB step per 50 ms


async def test_flood_sends_valid_60_kb_content_events_forever(client: Client) -> None:
    await client.miner.set_fault("flood")
    found: list[Any] = []
    with trio.fail_after(5):
        async with client.stream() as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line:
                    found.append(json.loads(line.removeprefix("data: ")))
                if len(found) == 20:
                    break
    assert all(len(c["choices"][0]["delta"]["content"]) == 60_000 for c in found)
    assert all(c["choices"][0]["finish_reason"] is None for c in found)
    await wait_streams_closed(client.miner)


async def test_tool_calls_carries_tool_calls_and_unknown_logprob_fields(client: Client) -> None:
    await client.miner.set_fault("tool_calls")
    found = events((await client.chat({"messages": MESSAGES, "seed": 7, "max_tokens": 6})).text)
    expected = text.answer(7, MESSAGES, 6)
    assert "".join(contents(found)) == expected.text
    assert finish_of(found) == "tool_calls" and found[-1] == "[DONE]"
    content_chunks = [c for c in choices(found) if c["delta"].get("content")]
    calls = [c["delta"]["tool_calls"][0] for c in content_chunks]
    assert calls[0]["id"] and calls[0]["type"] == "function" and calls[0]["function"]["name"]
    arguments = "".join(call["function"]["arguments"] for call in calls)
    assert json.loads(arguments) == {"query": expected.text.strip()}
    for chunk in content_chunks:
        logprobs = chunk["logprobs"]
        assert set(logprobs) - {"content"} and logprobs["content"][0]["token"] == chunk["delta"]["content"]
        assert set(logprobs["content"][0]) - {"token", "logprob", "bytes", "top_logprobs"}


async def test_huge_usage_claims_2_64_minus_1_tokens(client: Client) -> None:
    await client.miner.set_fault("huge_usage")
    found = events((await client.chat({"messages": MESSAGES, "seed": 7, "max_tokens": 3})).text)
    assert len(contents(found)) == 3 and finish_of(found) == "length"
    usage = usage_of(found)
    assert usage["completion_tokens"] == usage["total_tokens"] == 2**64 - 1


async def test_deep_json_sends_a_chunk_nested_100000_deep_then_an_answer(client: Client) -> None:
    await client.miner.set_fault("deep_json")
    response = await client.chat({"messages": MESSAGES, "seed": 7, "max_tokens": 3})
    first, rest = response.text.split("\n\n", 1)
    assert "[" * 100_000 in first and "[" * 100_001 not in first and first.endswith("]" * 100_000 + "}")
    with pytest.raises(RecursionError):
        json.loads(first.removeprefix("data: "))
    found = events(rest)
    assert "".join(contents(found)) == text.answer(7, MESSAGES, 3).text and found[-1] == "[DONE]"


async def test_gzip_bomb_answers_availability_with_gigabytes_of_gzip(client: Client) -> None:
    await client.miner.set_fault("gzip_bomb")
    compressed = bytearray()
    with trio.fail_after(5):
        async with client.stream("/availability", {}) as response:
            assert response.status_code == 200 and response.headers["content-encoding"] == "gzip"
            async for raw in response.aiter_raw():  # as sent, not inflated
                compressed += raw
                if len(compressed) >= 32_768:
                    break
    inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
    inflated = 0
    data = bytes(compressed)
    while data:
        out = inflate.decompress(data, 1 << 20)
        assert out.count(0) == len(out)
        inflated += len(out)
        data = inflate.unconsumed_tail
    assert inflated >= 1000 * len(compressed) // 2  # about 1,000 to 1
    await wait_streams_closed(client.miner)
    await client.miner.set_fault("")
    assert (await client.http.send(client.request("/availability", {}))).json()["task_availabilities"]


async def test_a_whole_gzip_bomb_is_a_valid_gzip_stream(http: httpx.AsyncClient, nursery: trio.Nursery) -> None:
    size = 5 * (1 << 20) + 12_345  # small enough to inflate in a test
    client = Client(http, await start_miner(nursery, fault="gzip_bomb", gzip_bomb_bytes=size))
    async with client.stream("/availability", {}) as response:
        compressed = b"".join([raw async for raw in response.aiter_raw()])
    assert len(compressed) < size // 900
    inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)  # checks the CRC and the length at the end
    inflated = len(inflate.decompress(compressed)) + len(inflate.flush())
    assert inflate.eof and inflated == size


async def test_gzip_bomb_spares_the_signers_it_is_told_to_and_chat_stays_normal(
        http: httpx.AsyncClient, nursery: trio.Nursery) -> None:
    client = Client(http, await start_miner(nursery, fault="gzip_bomb", spared=[GATEWAY.ss58_address]))
    response = await http.send(client.request("/availability", {}))
    assert "content-encoding" not in response.headers and response.json()["task_availabilities"]
    found = events((await client.chat()).text)
    assert contents(found) and finish_of(found) in ("stop", "length")
