"""Validating an OpenAI chat request and turning it into the body miners receive.

Clients send the OpenAI fields plus SN1's own (`task`, `mixture`, `sampling_parameters`, `seed`,
`uids`, `inference_mode`, `tools`, `timeout`, `json_format`, `test_time_inference`), at the top level
(where the official client puts `extra_body`) or inside a literal `extra_body` object. Each problem is a
400 that names the parameter: a request miners would refuse for its own input (a 422 for a sampling
parameter of the wrong type, say) must never reach them, or it would count against honest miners.

Sampling starts from upstream's defaults; the OpenAI fields and then `sampling_parameters` override
them key by key. Only known sampling parameters with numbers (or booleans) in range are accepted: the
validator that scores the answers declares `sampling_params: dict[str, float]`.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from actors.availability import KNOWN_TASKS
from web.errors import ApiError

ROLES = frozenset({"system", "user", "assistant", "tool", "developer", "function"})
MIXTURE_MODES = frozenset({"Mixture-of-Agents", "mixture-of-agents", "mixture"})
REASONING_MODE = "Reasoning-Fast"  # upstream: task MultiStepReasoningTask, then ordinary chat
DEFAULT_MODEL_ALIAS = "Default"  # exact, as upstream: the subnet's default model
DEFAULT_SAMPLING: Mapping[str, float | int | bool] = {
    "temperature": 0.7, "top_p": 0.95, "top_k": 50, "max_new_tokens": 1024, "do_sample": True}
MAX_NEW_TOKENS = 32_768
# Sampling parameters miners accept: name -> (kind, low, high). "int" and "float" are inclusive ranges.
SAMPLING_SPEC: Mapping[str, tuple[str, float, float]] = {
    "temperature": ("float", 0.0, 2.0),
    "top_p": ("float", 0.0, 1.0),
    "top_k": ("int", -1, 1_000_000),
    "min_p": ("float", 0.0, 1.0),
    "typical_p": ("float", 0.0, 1.0),
    "max_new_tokens": ("int", 1, MAX_NEW_TOKENS),
    "min_new_tokens": ("int", 0, MAX_NEW_TOKENS),
    "repetition_penalty": ("float", 0.0, 10.0),
    "presence_penalty": ("float", -2.0, 2.0),
    "frequency_penalty": ("float", -2.0, 2.0),
    "length_penalty": ("float", -10.0, 10.0),
    "no_repeat_ngram_size": ("int", 0, 1_000),
    "num_beams": ("int", 1, 16),
    "best_of": ("int", 1, 16),
    "seed": ("int", 0, 2**32 - 1),
    "do_sample": ("bool", 0, 1),
}
# OpenAI fields and the sampling parameter each maps to, for miners.
SAMPLING_FIELDS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
                   "max_tokens": "max_new_tokens", "max_completion_tokens": "max_new_tokens",
                   "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty"}
# Fields the gateway consumes itself and never sends on.
GATEWAY_ONLY = frozenset({"uids", "mixture", "extra_body", "stream_options", "n", "logprobs", "top_logprobs",
                          "user", "metadata", "store", "parallel_tool_calls", "tool_choice"})
MAX_SEED = 2**32 - 1
MAX_TOOLS = 128
MAX_STOP = 4
MAX_STOP_CHARS = 256
MAX_TOP_LOGPROBS = 20  # OpenAI's bound
MAX_UIDS = 16  # miners a chat request may name: every one is asked, each a stream and a scoring answer


def bad(param: str, message: str) -> ApiError:
    return ApiError(400, message, param=param, code="invalid_parameter")


@dataclass(frozen=True)
class ChatRequest:
    model: str  # the model asked of miners (the subnet's default when the client named none or "Default")
    requested_model: str | None  # the model as the client wrote it, echoed in the answer
    stream: bool
    task: str
    mixture: bool
    uids: tuple[int, ...] | None
    include_usage: bool
    logprobs: bool
    top_logprobs: int | None
    miner_body: dict[str, Any]  # exactly what miners get (stream always true: miners always stream)

    @property
    def messages(self) -> list[dict[str, Any]]:
        messages: list[dict[str, Any]] = self.miner_body["messages"]
        return messages

    @property
    def max_new_tokens(self) -> int:
        budget: int = self.miner_body["sampling_parameters"]["max_new_tokens"]
        return budget

    def with_model(self, model: str) -> ChatRequest:
        """The same request asking miners for `model` (a model no miner serves falls back to the default)."""
        if model == self.model:
            return self
        return replace(self, model=model, miner_body={**self.miner_body, "model": model})


def _check(value: Any, name: str, kind: str, low: float, high: float) -> int | float | bool:
    if kind == "bool":
        if not isinstance(value, bool):
            raise bad(name, f"'{name}' must be a boolean.")
        return value
    if isinstance(value, bool) or not isinstance(value, int | float) or (kind == "int" and not isinstance(value, int)):
        raise bad(name, f"'{name}' must be {'an integer' if kind == 'int' else 'a number'} "
                        f"between {low:g} and {high:g}.")
    if not low <= value <= high:
        raise bad(name, f"'{name}' must be between {low:g} and {high:g}.")
    return value


def _number(data: Mapping[str, Any], name: str, low: float, high: float) -> float | None:
    value = data.get(name)
    return None if value is None else float(_check(value, name, "float", low, high))


def _int(data: Mapping[str, Any], name: str, low: int, high: int) -> int | None:
    value = data.get(name)
    return None if value is None else int(_check(value, name, "int", low, high))


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


def _sampling(params: Mapping[str, Any]) -> dict[str, int | float | bool]:
    checked: dict[str, int | float | bool] = {}
    for name, value in params.items():
        if name == "mixture":
            continue  # the seed document's spelling of the gateway's own `mixture` flag
        spec = SAMPLING_SPEC.get(name)
        if spec is None:
            raise bad(f"sampling_parameters.{name}", f"Unknown sampling parameter {name!r}; known: "
                      f"{', '.join(sorted(SAMPLING_SPEC))}.")
        checked[name] = _check(value, f"sampling_parameters.{name}", *spec)
    return checked


def _stop(value: Any) -> str | list[str] | None:
    if value is None:
        return None
    items = [value] if isinstance(value, str) else value
    if (not isinstance(items, list) or len(items) > MAX_STOP
            or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in items)):
        raise bad("stop", f"'stop' must be a string or an array of at most {MAX_STOP} non-empty strings of at "
                          f"most {MAX_STOP_CHARS} characters.")
    return value


def _tools(value: Any) -> list[dict[str, Any]] | None:
    if value is None:
        return None
    if not isinstance(value, list) or len(value) > MAX_TOOLS or not all(isinstance(t, dict) for t in value):
        raise bad("tools", f"'tools' must be an array of at most {MAX_TOOLS} tool objects.")
    return value


def _timeout(value: Any) -> float | None:
    if value is None:
        return None
    if (isinstance(value, bool) or not isinstance(value, int | float)
            or (isinstance(value, float) and not math.isfinite(value)) or not 0 < value <= 3600):
        raise bad("timeout", "'timeout' must be a number of seconds between 0 and 3600 (60 to 300 are used).")
    return value


def parse_chat_request(data: Any, *, default_model: str, rng: random.Random | None = None) -> ChatRequest:
    if not isinstance(data, dict):
        raise ApiError(400, "The request body must be a JSON object.", code="invalid_request")
    extra = data.get("extra_body")
    if extra is not None:
        if not isinstance(extra, dict):
            raise bad("extra_body", "'extra_body' must be an object.")
        data = {**data, **extra}
    messages = _messages(data.get("messages"))
    requested = data.get("model")
    if requested is not None and (not isinstance(requested, str) or not requested.strip()):
        raise bad("model", "'model' must be a non-empty string or null.")
    model = default_model if requested is None or requested == DEFAULT_MODEL_ALIAS else requested
    stream = _bool(data.get("stream"), "stream")
    mode = data.get("inference_mode")
    if mode is not None and not isinstance(mode, str):
        raise bad("inference_mode", "'inference_mode' must be a string.")
    task = data.get("task")
    if task is None:
        task = "MultiStepReasoningTask" if mode == REASONING_MODE else "InferenceTask"
    if not isinstance(task, str) or task not in KNOWN_TASKS:
        raise bad("task", f"Unknown task {task!r}; known tasks: {', '.join(KNOWN_TASKS)}.")
    params = data.get("sampling_parameters")
    params = {} if params is None else params
    if not isinstance(params, dict):
        raise bad("sampling_parameters", "'sampling_parameters' must be an object.")
    mixture = _bool(data.get("mixture"), "mixture") or _bool(params.get("mixture"), "sampling_parameters.mixture")
    mixture = mixture or mode in MIXTURE_MODES
    _int(data, "n", 1, 1)  # one choice per request is all miners give
    _bool(data.get("json_format"), "json_format")
    _bool(data.get("test_time_inference"), "test_time_inference")
    openai_sampling: dict[str, int | float | bool] = {}
    for name, target in SAMPLING_FIELDS.items():
        if data.get(name) is not None:
            openai_sampling[target] = _check(data[name], name, *SAMPLING_SPEC[target])
    seed = _int(data, "seed", 0, MAX_SEED)
    if seed is None:
        seed = (rng or random.Random()).randint(0, MAX_SEED)
    uids = data.get("uids")
    if uids is not None:
        if not isinstance(uids, list) or not uids or len(uids) > MAX_UIDS:
            raise bad("uids", f"'uids' must be a non-empty array of at most {MAX_UIDS} non-negative integers"
                      + (f" ({len(uids)} given)." if isinstance(uids, list) and uids else "."))
        if not all(isinstance(u, int) and not isinstance(u, bool) and u >= 0 for u in uids):
            raise bad("uids", f"'uids' must be a non-empty array of at most {MAX_UIDS} non-negative integers.")
        uids = tuple(uids)
    options = data.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad("stream_options", "'stream_options' must be an object.")
    include_usage = bool(options and options.get("include_usage") is True)
    logprobs = _bool(data.get("logprobs"), "logprobs")
    top_logprobs = _int(data, "top_logprobs", 0, MAX_TOP_LOGPROBS)
    stop = _stop(data.get("stop"))
    tools = _tools(data.get("tools"))
    timeout = _timeout(data.get("timeout"))

    sampling = {**DEFAULT_SAMPLING, **openai_sampling, **_sampling(params)}
    if tools is not None:  # upstream: the tool list also goes to miners as a last tool message
        messages = [*messages, {"role": "tool", "content": json.dumps(tools)}]
    body: dict[str, Any] = {
        k: v for k, v in data.items()
        if k not in GATEWAY_ONLY and k not in SAMPLING_FIELDS
        and k not in ("messages", "model", "stream", "task", "seed", "sampling_parameters", "stop", "timeout")
    }
    body.update({
        "model": model, "messages": messages, "stream": True, "seed": seed, "task": task,
        "sampling_parameters": sampling,
    })
    if stop is not None:
        body["stop"] = stop
    if timeout is not None:
        body["timeout"] = timeout
    return ChatRequest(model=model, requested_model=requested, stream=stream, task=task, mixture=mixture,
                       uids=uids, include_usage=include_usage, logprobs=logprobs, top_logprobs=top_logprobs,
                       miner_body=body)
