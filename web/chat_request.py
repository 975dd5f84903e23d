"""Validating an OpenAI chat request and turning it into the body miners receive.

Clients send the OpenAI fields plus SN1's own (`task`, `mixture`, `sampling_parameters`, `seed`,
`uids`, `inference_mode`), at the top level (where the official client puts `extra_body`) or inside a
literal `extra_body` object. Each problem is a 400 that names the parameter.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from actors.availability import KNOWN_TASKS
from web.errors import ApiError

ROLES = frozenset({"system", "user", "assistant", "tool", "developer", "function"})
MIXTURE_MODES = frozenset({"Mixture-of-Agents", "mixture-of-agents", "mixture"})
DEFAULT_SAMPLING = {"temperature": 0.7, "top_p": 0.95, "top_k": 50, "max_new_tokens": 256, "do_sample": True}
# OpenAI fields and the sampling parameter each maps to, for miners.
SAMPLING_FIELDS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
                   "max_tokens": "max_new_tokens", "max_completion_tokens": "max_new_tokens",
                   "stop": "stop", "presence_penalty": "presence_penalty",
                   "frequency_penalty": "frequency_penalty"}
# Fields the gateway consumes itself and never sends on.
GATEWAY_ONLY = frozenset({"uids", "mixture", "extra_body", "stream_options", "n", "inference_mode"})
MAX_SEED = 2**32 - 1


def bad(param: str, message: str) -> ApiError:
    return ApiError(400, message, param=param, code="invalid_parameter")


@dataclass(frozen=True)
class ChatRequest:
    model: str | None
    stream: bool
    task: str
    mixture: bool
    uids: tuple[int, ...] | None
    include_usage: bool
    miner_body: dict[str, Any]  # exactly what miners get (stream always true: miners always stream)

    @property
    def messages(self) -> list[dict[str, Any]]:
        messages: list[dict[str, Any]] = self.miner_body["messages"]
        return messages


def _number(data: Mapping[str, Any], name: str, low: float, high: float) -> float | None:
    value = data.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise bad(name, f"'{name}' must be a number between {low:g} and {high:g}.")
    return float(value)


def _int(data: Mapping[str, Any], name: str, low: int, high: int) -> int | None:
    value = data.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise bad(name, f"'{name}' must be an integer between {low} and {high}.")
    return value


def _bool(value: Any, name: str) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad(name, f"'{name}' must be a boolean.")
    return value


def _messages(value: Any) -> list[dict[str, Any]]:
    if value is None:
        raise ApiError(400, "'messages' is required.", param="messages", code="missing_parameter")
    if not isinstance(value, list) or not value:
        raise bad("messages", "'messages' must be a non-empty array of message objects.")
    out = []
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise bad(where, f"'{where}' must be an object with 'role' and 'content'.")
        role = message.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise bad(f"{where}.role", f"'{where}.role' must be one of {', '.join(sorted(ROLES))}.")
        content = message.get("content")
        if isinstance(content, list):  # OpenAI content parts: only text reaches miners
            texts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise bad(f"{where}.content[{j}]", "Only text content parts are supported.")
                texts.append(part["text"])
            content = "\n".join(texts)
        elif content is None and role == "assistant":
            content = ""
        elif not isinstance(content, str):
            raise bad(f"{where}.content", f"'{where}.content' must be a string.")
        out.append({**message, "content": content})
    return out


def parse_chat_request(data: Any, *, rng: random.Random | None = None) -> ChatRequest:
    if not isinstance(data, dict):
        raise ApiError(400, "The request body must be a JSON object.", code="invalid_request")
    extra = data.get("extra_body")
    if extra is not None:
        if not isinstance(extra, dict):
            raise bad("extra_body", "'extra_body' must be an object.")
        data = {**data, **extra}
    messages = _messages(data.get("messages"))
    model = data.get("model")
    if model is not None and (not isinstance(model, str) or not model.strip()):
        raise bad("model", "'model' must be a non-empty string or null.")
    stream = _bool(data.get("stream"), "stream")
    task = data.get("task", "InferenceTask")
    if not isinstance(task, str) or task not in KNOWN_TASKS:
        raise bad("task", f"Unknown task {task!r}; known tasks: {', '.join(KNOWN_TASKS)}.")
    params = data.get("sampling_parameters")
    params = {} if params is None else params
    if not isinstance(params, dict):
        raise bad("sampling_parameters", "'sampling_parameters' must be an object.")
    mixture = _bool(data.get("mixture"), "mixture") or _bool(params.get("mixture"), "sampling_parameters.mixture")
    mode = data.get("inference_mode")
    if mode is not None and not isinstance(mode, str):
        raise bad("inference_mode", "'inference_mode' must be a string.")
    mixture = mixture or mode in MIXTURE_MODES
    n = _int(data, "n", 1, 1)
    del n  # one choice per request is all miners give
    _number(data, "temperature", 0.0, 2.0)
    _number(data, "top_p", 0.0, 1.0)
    _int(data, "top_k", 1, 100_000)
    _number(data, "presence_penalty", -2.0, 2.0)
    _number(data, "frequency_penalty", -2.0, 2.0)
    _int(data, "max_tokens", 1, 1_000_000)
    _int(data, "max_completion_tokens", 1, 1_000_000)
    _int(params, "max_new_tokens", 1, 1_000_000)
    seed = _int(data, "seed", 0, MAX_SEED)
    if seed is None:
        seed = (rng or random.Random()).randint(0, MAX_SEED)
    uids = data.get("uids")
    if uids is not None:
        if (not isinstance(uids, list) or not uids
                or not all(isinstance(u, int) and not isinstance(u, bool) and u >= 0 for u in uids)):
            raise bad("uids", "'uids' must be a non-empty array of non-negative integers.")
        uids = tuple(uids)
    options = data.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad("stream_options", "'stream_options' must be an object.")
    include_usage = bool(options and options.get("include_usage") is True)

    sampling = dict(DEFAULT_SAMPLING)
    for name, target in SAMPLING_FIELDS.items():
        if data.get(name) is not None:
            sampling[target] = data[name]
    sampling.update({k: v for k, v in params.items() if k != "mixture"})
    body: dict[str, Any] = {
        k: v for k, v in data.items()
        if k not in GATEWAY_ONLY and k not in ("messages", "model", "stream", "task", "seed", "sampling_parameters")
    }
    body.update({
        "model": model, "messages": messages, "stream": True, "seed": seed, "task": task,
        "sampling_parameters": sampling,
    })
    return ChatRequest(model=model, stream=stream, task=task, mixture=mixture, uids=uids,
                       include_usage=include_usage, miner_body=body)
