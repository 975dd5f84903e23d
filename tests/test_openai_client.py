"""The official `openai` client, configured as the seed document shows, against the gateway."""

from __future__ import annotations

import openai
import pytest
from openai import AsyncOpenAI

from tests.chat_stack import Stack
from tests.scripted_miners import answer


def client_for(stack: Stack, key: str | None = None) -> AsyncOpenAI:
    key = key or stack.key
    headers = {"api-key": key, "Content-Type": "application/json"}
    return AsyncOpenAI(
        base_url=f"{stack.gateway.url}/v1",
        api_key=key,
        max_retries=0,
        timeout=openai.Timeout(30, connect=10, read=20),
        http_client=openai.DefaultAsyncHttpxClient(headers=headers),
    )


async def test_streamed_answer_as_in_the_seed_document(stack: Stack) -> None:
    for port in (9001, 9002, 9003):
        stack.miners.scripts[port] = answer(["I", " am", " fine"], first_delay=0.01 * (port - 9000))
    async with client_for(stack) as client:
        result = await client.chat.completions.create(
            model="hugging-quants/Meta-Llama-3.1-70B-Instruct-AWQ-INT4",
            messages=[{"role": "user", "content": "How are you?"}],
            stream=True,
            temperature=0.7,
            extra_body={"task": "InferenceTask",
                        "sampling_parameters": {"mixture": False, "max_new_tokens": 256, "do_sample": True}},
            seed=42,
        )
        parts, finishes = [], []
        async for chunk in result:
            parts.append(chunk.choices[0].delta.content or "")
            finishes.append(chunk.choices[0].finish_reason)
            assert chunk.model == "hugging-quants/Meta-Llama-3.1-70B-Instruct-AWQ-INT4"
    assert "".join(parts) == "I am fine"
    assert finishes[-1] == "stop"


async def test_non_streamed_answer(stack: Stack) -> None:
    for port in (9001, 9002, 9003):
        stack.miners.scripts[port] = answer(["Fine", ", thanks"])
    async with client_for(stack) as client:
        completion = await client.chat.completions.create(
            model=None,  # type: ignore[arg-type]
            messages=[{"role": "user", "content": "How are you?"}],
            max_tokens=32,
        )
    assert completion.choices[0].message.content == "Fine, thanks"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None and completion.usage.completion_tokens == 2
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + 2 and completion.usage.prompt_tokens > 0


async def test_errors_surface_as_openai_exceptions(stack: Stack) -> None:
    async with client_for(stack, key="sn1-not-a-key") as client:
        with pytest.raises(openai.AuthenticationError):
            await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    for port in (9001, 9002, 9003):
        stack.miners.scripts[port] = 500
    async with client_for(stack) as client:
        with pytest.raises(openai.APIStatusError) as info:
            await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
        assert info.value.status_code == 502
        with pytest.raises(openai.BadRequestError):
            await client.chat.completions.create(model="m", messages=[])


async def test_models_list(stack: Stack) -> None:
    async with client_for(stack) as client:
        models = await client.models.list()
    assert models.object == "list"
