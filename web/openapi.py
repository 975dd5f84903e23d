"""The OpenAPI 3.1 document of every route the gateway serves (`GET /openapi.json`).

Written by hand, so that each route is described as it behaves (its parameters, its bodies, its
errors), and kept equal to the app by `tests/test_openapi.py`: every (method, path) the app's URL map
serves is documented, every documented one is served. Bounds and names that the route modules
enforce (sampling parameters, tasks, roles, limits) are taken from those modules, so the two cannot
drift apart.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from werkzeug.routing import Rule

from actors.availability import KNOWN_MODELS, KNOWN_TASKS
from actors.fanout.selection import MAX_EXPLICIT_UIDS
from actors.keystore.records import RATE_LIMIT_MAX
from web.availability import MAX_UIDS
from web.chat import RESEARCH_MODE
from web.chat_request import (
    DEFAULT_MODEL_ALIAS,
    MAX_SEED,
    MAX_STOP,
    MAX_STOP_CHARS,
    MAX_TOOLS,
    MAX_TOP_LOGPROBS,
    MIXTURE_MODES,
    REASONING_MODE,
    ROLES,
    SAMPLING_FIELDS,
    SAMPLING_SPEC,
)
from web.chat_request import MAX_UIDS as MAX_CHAT_UIDS
from web.completion_format import FINISH_REASONS
from web.errors import ERROR_TYPES
from web.retrieval import DEFAULT_RESPONSE_TIME_S, MAX_QUERY_CHARS, MAX_RESPONSE_TIME_S
from web.telemetry import route_template

OPENAPI_VERSION = "3.1.0"
TITLE = "sn1-gateway"
HTTP_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
IGNORED_METHODS = frozenset({"HEAD", "OPTIONS"})  # answered by the framework for every route

TAGS = (
    {"name": "GPT Endpoints", "description": "OpenAI-style chat completions and models, answered by Subnet 1 miners."},
    {"name": "API Management", "description": "Creating, changing and removing API keys (`admin-key` header); "
                                              "a key's view of itself."},
    {"name": "Web Retrieval", "description": "Web search results from miners, merged."},
    {"name": "Miner Availability", "description": "What each miner says it serves, from the gateway's own "
                                                  "availability snapshot (upstream: the validator's routes)."},
    {"name": "Health", "description": "Liveness and readiness."},
    {"name": "Monitoring", "description": "Figures for operators: per-miner health, Prometheus metrics, "
                                          "the status page."},
    {"name": "Documentation", "description": "This document and its viewers, served from the gateway itself "
                                             "(no CDN). No key needed."},
)

Security = list[dict[str, list[str]]]
PUBLIC: Security = []
CLIENT: Security = [{"api-key": []}, {"bearer": []}]
ADMIN: Security = [{"admin-key": []}]

def package_version() -> str:
    """The installed sn1-gateway's version, the document's `info.version`."""
    try:
        return version("sn1-gateway")
    except PackageNotFoundError:
        return "0.0.0+unknown"




def served_routes(rules: Iterable[Rule]) -> frozenset[tuple[str, str]]:
    """(method, OpenAPI path) for every route of a URL map, without static files, HEAD and OPTIONS."""
    return frozenset(
        (method, route_template(rule.rule))
        for rule in rules
        if rule.endpoint != "static" and not rule.endpoint.endswith(".static")
        for method in (rule.methods or ()) if method not in IGNORED_METHODS
    )


def documented_routes(document: Mapping[str, Any]) -> frozenset[tuple[str, str]]:
    return frozenset((method.upper(), path) for path, item in document["paths"].items()
                     for method in item if method in HTTP_METHODS)


# --- building blocks ---------------------------------------------------------------------------------

def ref(name: str, kind: str = "schemas") -> dict[str, str]:
    return {"$ref": f"#/components/{kind}/{name}"}


def nullable(schema: dict[str, Any]) -> dict[str, Any]:
    """`schema` or null: the gateway treats a null field as absent."""
    kind = schema.get("type")
    if isinstance(kind, str):
        return {**schema, "type": [kind, "null"]}
    return {"oneOf": [schema, {"type": "null"}]}


def json_content(schema: dict[str, Any], example: Any = None) -> dict[str, Any]:
    media: dict[str, Any] = {"schema": schema}
    if example is not None:
        media["example"] = example
    return {"application/json": media}


RATE_LIMIT_HEADERS = {
    "X-RateLimit-Limit": ref("X-RateLimit-Limit", "headers"),
    "X-RateLimit-Remaining": ref("X-RateLimit-Remaining", "headers"),
    "X-RateLimit-Reset": ref("X-RateLimit-Reset", "headers"),
}
ERROR_RESPONSES = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "AdminDisabled",
    404: "NotFound",
    413: "PayloadTooLarge",
    429: "TooManyRequests",
    502: "BadGateway",
    503: "ServiceUnavailable",
    504: "GatewayTimeout",
}


def errors(*statuses: int) -> dict[str, Any]:
    return {str(status): ref(ERROR_RESPONSES[status], "responses") for status in statuses}


def ok(description: str, schema: dict[str, Any], *, example: Any = None, counted: bool = False,
       extra_headers: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A 200 JSON answer; `counted` adds the X-RateLimit-* headers every authorised answer carries."""
    response: dict[str, Any] = {"description": description, "content": json_content(schema, example)}
    headers = {**(RATE_LIMIT_HEADERS if counted else {}), **(extra_headers or {})}
    if headers:
        response["headers"] = headers
    return response


def operation(op_id: str, tag: str, summary: str, description: str, *, security: Security,
              responses: dict[str, Any], parameters: list[dict[str, Any]] | None = None,
              body: dict[str, Any] | None = None) -> dict[str, Any]:
    op: dict[str, Any] = {"operationId": op_id, "tags": [tag], "summary": summary, "description": description,
                          "security": security}
    if parameters:
        op["parameters"] = parameters
    if body is not None:
        op["requestBody"] = body
    op["responses"] = responses
    return op


def query(name: str, schema: dict[str, Any], description: str, *, required: bool = False,
          **extra: Any) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": required, "description": description, "schema": schema,
            **extra}


def path_param(name: str, description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "description": description,
            "schema": schema or {"type": "string"}}


def spec_schema(kind: str, low: float, high: float) -> dict[str, Any]:
    """The JSON Schema of one entry of `web.chat_request.SAMPLING_SPEC`."""
    if kind == "bool":
        return {"type": "boolean"}
    if kind == "int":
        return {"type": "integer", "minimum": int(low), "maximum": int(high)}
    return {"type": "number", "minimum": low, "maximum": high}


# --- schemas -------------------------------------------------------------------------------------------

def error_schemas() -> dict[str, Any]:
    types = sorted({*ERROR_TYPES.values(), "server_error", "invalid_request_error"})
    return {
        "Error": {
            "type": "object",
            "description": "Every error the gateway answers, whatever the route or the status.",
            "required": ["error"],
            "additionalProperties": False,
            "properties": {"error": ref("ErrorDetail")},
        },
        "ErrorDetail": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "additionalProperties": False,
            "properties": {
                "message": {"type": "string", "description": "What went wrong, for a person. Never holds a key."},
                "type": {"type": "string", "enum": types,
                         "description": "The kind of error, in OpenAI's vocabulary where it has a word for it."},
                "param": {"type": ["string", "null"],
                          "description": "The parameter at fault (`messages[0].content`, `rate_limit`), if any."},
                "code": {"type": ["string", "null"],
                         "description": "A stable identifier: `invalid_parameter`, `rate_limit_exceeded`, "
                                        "`miners_failed`, ..."},
                "details": {"type": "object", "additionalProperties": {"type": "string"},
                            "description": "On 502s: each miner's uid and why it failed."},
            },
        },
    }


def chat_schemas() -> dict[str, Any]:
    sampling_properties: dict[str, Any] = {
        name: {**spec_schema(*spec), "description": f"Passed on to miners as `sampling_parameters.{name}`."}
        for name, spec in SAMPLING_SPEC.items()
    }
    sampling_properties["mixture"] = {"type": ["boolean", "null"],
                                      "description": "The seed document's place for `mixture`; same meaning."}
    sampling_properties["max_new_tokens"]["description"] = (
        "The answer's token budget (also set by `max_tokens`); it sets the miners' time budget too.")
    openai_sampling = {
        field: nullable({**spec_schema(*SAMPLING_SPEC[target]),
                         "description": f"Sets `sampling_parameters.{target}` for miners."})
        for field, target in SAMPLING_FIELDS.items()
    }
    openai_sampling["top_k"]["description"] = "Not an OpenAI field; sets `sampling_parameters.top_k`."
    stop_string = {"type": "string", "minLength": 1, "maxLength": MAX_STOP_CHARS}
    mixture_modes = sorted(MIXTURE_MODES)
    request_properties: dict[str, Any] = {
        "model": {
            "type": ["string", "null"], "minLength": 1, "examples": [DEFAULT_MODEL_ALIAS, KNOWN_MODELS[0]],
            "description": f"The model to ask miners for. Absent, null or `{DEFAULT_MODEL_ALIAS}`: the subnet's "
                           "default model (`fanout.default_model`). A model no miner advertises is asked of "
                           "miners as the default model, as upstream does (a 404 with `fanout.strict_models`). "
                           "The answer carries the name as written.",
        },
        "messages": {"type": "array", "minItems": 1, "items": ref("ChatMessage")},
        "stream": {"type": ["boolean", "null"], "default": False,
                   "description": "Answer as a `text/event-stream` of `chat.completion.chunk` events."},
        "stream_options": {
            "type": ["object", "null"],
            "properties": {"include_usage": {"type": "boolean",
                                             "description": "A last chunk with `usage` and no choices."}},
        },
        **openai_sampling,
        "n": {"type": ["integer", "null"], "minimum": 1, "maximum": 1,
              "description": "Only one choice per request."},
        "stop": {"oneOf": [stop_string, {"type": "array", "maxItems": MAX_STOP, "items": stop_string},
                           {"type": "null"}],
                 "description": "Passed on to miners."},
        "logprobs": {"type": ["boolean", "null"], "default": False,
                     "description": "Include each token's log-probability, as miners report it."},
        "top_logprobs": {"type": ["integer", "null"], "minimum": 0, "maximum": MAX_TOP_LOGPROBS,
                         "description": "How many alternatives per token, with `logprobs`."},
        "seed": {"type": ["integer", "null"], "minimum": 0, "maximum": MAX_SEED,
                 "description": "Miners' answers are determined by seed and messages; drawn at random when absent."},
        "tools": {"type": ["array", "null"], "maxItems": MAX_TOOLS, "items": {"type": "object"},
                  "description": "As upstream: appended for miners as a last `tool` message holding the list "
                                 "as JSON. No `tool_calls` come back."},
        "tool_choice": {"description": "Accepted; not passed on."},
        "parallel_tool_calls": {"type": ["boolean", "null"], "description": "Accepted; not passed on."},
        "user": {"type": ["string", "null"], "description": "Accepted; not passed on."},
        "metadata": {"type": ["object", "null"], "description": "Accepted; not passed on."},
        "store": {"type": ["boolean", "null"], "description": "Accepted; not passed on."},
        "task": {
            "type": ["string", "null"], "enum": [*KNOWN_TASKS, None], "default": "InferenceTask",
            "description": "The Subnet 1 task miners are chosen for and asked to do "
                           f"(`{REASONING_MODE}` makes it `MultiStepReasoningTask`).",
        },
        "mixture": {"type": ["boolean", "null"], "default": False,
                    "description": "Mixture of miners: several miners answer, one more combines their answers."},
        "sampling_parameters": nullable(ref("SamplingParameters")),
        "uids": {"type": ["array", "null"], "minItems": 1, "maxItems": MAX_CHAT_UIDS,
                 "items": {"type": "integer", "minimum": 0},
                 "description": "Ask exactly these miners (a uid not in the metagraph, or with no axon, is a "
                                "400). Deprecated and ignored upstream."},
        "inference_mode": {
            "type": ["string", "null"],
            "examples": [REASONING_MODE, "Mixture-of-Agents", "Chain-of-Thought"],
            "description": f"`{REASONING_MODE}`: task `MultiStepReasoningTask`; "
                           f"{', '.join(f'`{m}`' for m in mixture_modes)}: mixture of miners; "
                           f"`{RESEARCH_MODE}`: deep research. Any other value is passed on to miners with an "
                           "ordinary chat.",
        },
        "timeout": {"type": ["number", "null"], "exclusiveMinimum": 0, "maximum": 3600,
                    "description": "Seconds; clamped to 60-300 for miners, as upstream."},
        "json_format": {"type": ["boolean", "null"], "description": "Passed on to miners (no effect upstream)."},
        "test_time_inference": {"type": ["boolean", "null"],
                                "description": f"`true`: deep research, as `inference_mode: \"{RESEARCH_MODE}\"`."},
        "extra_body": {"type": ["object", "null"],
                       "description": "A literal `extra_body` object: its fields count as top-level fields."},
    }
    logprob_properties: dict[str, Any] = {
        "token": {"type": "string"}, "logprob": {"type": "number"},
        "bytes": {"type": ["array", "null"], "items": {"type": "integer", "minimum": 0, "maximum": 255}}}
    logprob_entry: dict[str, Any] = {
        "type": "object", "required": ["token", "logprob", "bytes"], "additionalProperties": False,
        "properties": logprob_properties,
    }
    finish = sorted(FINISH_REASONS)
    return {
        "ChatMessage": {
            "type": "object",
            "required": ["role"],
            "description": "A message; other fields (`name`, ...) are passed on. Only text reaches miners.",
            "properties": {
                "role": {"type": "string", "enum": sorted(ROLES)},
                "content": {
                    "oneOf": [{"type": "string"}, {"type": "array", "items": ref("TextContentPart")},
                              {"type": "null"}],
                    "description": "Text, or OpenAI text parts (joined by newlines). Null only for an assistant.",
                },
            },
        },
        "TextContentPart": {
            "type": "object", "required": ["type", "text"],
            "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
        },
        "SamplingParameters": {
            "type": "object",
            "additionalProperties": False,
            "description": "Upstream's defaults (temperature 0.7, top_p 0.95, top_k 50, max_new_tokens 1024, "
                           "do_sample true), overridden by the OpenAI fields and then by these, key by key. "
                           "Only these names, with numbers (or booleans) in range: the validator that scores "
                           "the answers refuses anything else.",
            "properties": sampling_properties,
        },
        "ChatCompletionRequest": {
            "type": "object",
            "required": ["messages"],
            "additionalProperties": True,
            "description": "OpenAI's chat request plus Subnet 1's fields, at the top level or inside "
                           "`extra_body`. Unknown fields are passed on to miners unchanged.",
            "properties": request_properties,
        },
        "ChatCompletion": {
            "type": "object",
            "required": ["id", "object", "created", "model", "choices", "usage"],
            "additionalProperties": False,
            "properties": {
                "id": {"type": "string", "pattern": "^chatcmpl-"},
                "object": {"const": "chat.completion"},
                "created": {"type": "integer"},
                "model": {"type": "string", "description": "The model as the request named it."},
                "choices": {"type": "array", "minItems": 1, "maxItems": 1, "items": ref("ChatCompletionChoice")},
                "usage": ref("Usage"),
            },
        },
        "ChatCompletionChoice": {
            "type": "object",
            "required": ["index", "message", "finish_reason", "logprobs"],
            "additionalProperties": False,
            "properties": {
                "index": {"type": "integer", "minimum": 0},
                "message": {
                    "type": "object", "required": ["role", "content"], "additionalProperties": False,
                    "properties": {"role": {"const": "assistant"}, "content": {"type": "string"}},
                },
                "finish_reason": {"type": "string", "enum": finish},
                "logprobs": nullable(ref("ChoiceLogprobs")),
            },
        },
        "ChoiceLogprobs": {
            "type": "object", "required": ["content"], "additionalProperties": False,
            "properties": {"content": {"type": "array", "items": ref("TokenLogprob")}},
        },
        "TokenLogprob": {
            **logprob_entry,
            "required": ["token", "logprob", "bytes", "top_logprobs"],
            "properties": {**logprob_properties,
                           "top_logprobs": {"type": "array", "items": ref("TopLogprob")}},
        },
        "TopLogprob": logprob_entry,
        "Usage": {
            "type": "object",
            "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
            "additionalProperties": False,
            "description": "The miner's own counts within the request's budget, else one completion token per "
                           "content chunk and a prompt token per four characters.",
            "properties": {name: {"type": "integer", "minimum": 0}
                           for name in ("prompt_tokens", "completion_tokens", "total_tokens")},
        },
        "ChatCompletionChunk": {
            "type": "object",
            "required": ["id", "object", "created", "model", "choices"],
            "additionalProperties": False,
            "description": "One event of a streamed answer; the same `id` and `model` throughout. The last "
                           "(with `stream_options.include_usage`) has no choices and the `usage`.",
            "properties": {
                "id": {"type": "string", "pattern": "^chatcmpl-"},
                "object": {"const": "chat.completion.chunk"},
                "created": {"type": "integer"},
                "model": {"type": "string"},
                "choices": {"type": "array", "maxItems": 1, "items": ref("ChatCompletionChunkChoice")},
                "usage": ref("Usage"),
            },
        },
        "ChatCompletionChunkChoice": {
            "type": "object",
            "required": ["index", "delta", "finish_reason"],
            "additionalProperties": False,
            "properties": {
                "index": {"type": "integer", "minimum": 0},
                "delta": {
                    "type": "object", "additionalProperties": False,
                    "description": "The role (first chunk only) and the next piece of text; empty on the finish.",
                    "properties": {"role": {"const": "assistant"}, "content": {"type": "string"}},
                },
                "finish_reason": {"type": ["string", "null"], "enum": [*finish, None]},
                "logprobs": ref("ChoiceLogprobs"),
            },
        },
        "Model": {
            "type": "object", "required": ["id", "object", "created", "owned_by"], "additionalProperties": False,
            "properties": {"id": {"type": "string"}, "object": {"const": "model"}, "created": {"type": "integer"},
                           "owned_by": {"type": "string"}},
        },
        "ModelList": {
            "type": "object", "required": ["object", "data"], "additionalProperties": False,
            "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": ref("Model")}},
        },
    }


def job_schemas() -> dict[str, Any]:
    status = {"type": "string", "enum": ["pending", "running", "completed", "failed"],
              "description": "`pending` until the gateway starts it, `running`, then `completed` or `failed`."}
    stamps = {"created_at": {"type": "string", "format": "date-time", "description": "ISO 8601, UTC."},
              "updated_at": {"type": "string", "format": "date-time",
                             "description": "ISO 8601, UTC: the job's last change (a status, or result chunks "
                                            "written)."}}
    return {
        "ChatJob": {
            "type": "object",
            "required": ["job_id", "status", "created_at", "updated_at"],
            "properties": {"job_id": {"type": "string", "format": "uuid"}, "status": status, **stamps},
        },
        "ChatJobResult": {
            "type": "object",
            "required": ["job_id", "status", "created_at", "updated_at", "result", "error"],
            "properties": {
                "job_id": {"type": "string", "format": "uuid"},
                "status": status,
                **stamps,
                "result": {
                    "type": "array",
                    "description": "What the answer has streamed so far, in order (written in batches, at most "
                                   "about half a second behind the answer).",
                    "items": {"type": "object", "required": ["seq_id", "chunk"],
                              "properties": {
                                  "seq_id": {"type": "integer", "minimum": 0,
                                             "description": "The item's position, from 0."},
                                  "chunk": {"type": "string", "description": (
                                      "As upstream, a JSON string holding an array; here its elements are the "
                                      "`chat.completion.chunk` objects (schema `ChatCompletionChunk`) that came "
                                      "together, exactly as the `data:` lines of the same request streamed, so "
                                      "that one parser reads both: the text is in `choices[0].delta.content`, "
                                      "the finish_reason and the logprobs (when asked) are kept, and the last "
                                      "chunk of a completed job carries `usage`.")}}},
                },
                "error": {"oneOf": [ref("ErrorDetail"), {"type": "null"}],
                          "description": "Why a failed job failed, as a failed request's `error` object: "
                                         "`cancelled` (DELETE), `job_interrupted` (the gateway stopped while it "
                                         "ran), `job_result_too_large`, or what the request itself would have "
                                         "answered (`miners_failed`, `miner_timeout`, `research_deadline`, ...)."},
            },
        },
    }


def management_schemas() -> dict[str, Any]:
    return {
        "KeyCreated": {
            "type": "object", "required": ["message", "api_key"], "additionalProperties": False,
            "properties": {"message": {"const": "API key created"},
                           "api_key": {"type": "string", "description": "Shown this once; stored only hashed."}},
        },
        "KeyUpdated": {
            "type": "object", "required": ["message", "api_key"], "additionalProperties": False,
            "properties": {"message": {"const": "API key updated"}, "api_key": {"type": "string"}},
        },
        "KeyDeleted": {
            "type": "object", "required": ["message"], "additionalProperties": False,
            "properties": {"message": {"const": "API key deleted"}},
        },
        "KeyInfo": {
            "type": "object",
            "required": ["id", "prefix", "rate_limit", "created_at", "last_used_at", "usage"],
            "description": "A key as stored: never the key itself.",
            "properties": {
                "id": {"type": "string", "pattern": "^[0-9a-f]{64}$", "description": "The sha256 of the key."},
                "prefix": {"type": "string", "description": "The key's first characters, to recognise it."},
                "rate_limit": {"type": "integer", "minimum": 0, "maximum": RATE_LIMIT_MAX,
                               "description": "Requests per minute; 0 blocks the key."},
                "created_at": {"type": ["string", "null"], "format": "date-time"},
                "last_used_at": {"type": ["string", "null"], "format": "date-time"},
                "usage": {"type": "object", "required": ["requests", "tokens"],
                          "properties": {"requests": {"type": "integer", "minimum": 0},
                                         "tokens": {"type": "integer", "minimum": 0}}},
            },
        },
        "KeyList": {
            "type": "object", "required": ["object", "data"],
            "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": ref("KeyInfo")}},
        },
        "WhoAmI": {
            "allOf": [ref("KeyInfo"), {"type": "object", "required": ["object"],
                                       "properties": {"object": {"const": "api_key"}}}],
        },
    }


def other_schemas() -> dict[str, Any]:
    figures = {"type": "object", "description": "That component's figures (counts, ages, last errors)."}
    return {
        "WebRetrievalRequest": {
            "type": "object",
            "required": ["search_query"],
            "description": "The predecessor's POST form: the query parameters of `GET /web_retrieval` as JSON.",
            "properties": {
                "search_query": {"type": "string", "minLength": 1, "maxLength": MAX_QUERY_CHARS},
                "n_miners": {"type": ["integer", "string", "null"], "minimum": 1, "maximum": 64, "default": 10},
                "n_results": {"type": ["integer", "string", "null"], "minimum": 1, "maximum": 100, "default": 5},
                "max_response_time": {"type": ["integer", "string", "null"], "minimum": 1,
                                      "maximum": MAX_RESPONSE_TIME_S, "default": DEFAULT_RESPONSE_TIME_S},
                "uids": {"type": ["array", "null"], "maxItems": MAX_EXPLICIT_UIDS,
                         "items": {"type": "integer", "minimum": 0}},
            },
        },
        "WebRetrievalResult": {
            "type": "object", "required": ["url", "content", "relevant"], "additionalProperties": False,
            "properties": {"url": {"type": "string", "format": "uri", "maxLength": 2048},
                           "content": {"type": "string"}, "relevant": {"type": ["string", "null"]}},
        },
        "WebRetrievalResponse": {
            "type": "object", "required": ["results"], "additionalProperties": False,
            "properties": {"results": {"type": "array", "minItems": 1, "items": ref("WebRetrievalResult")}},
        },
        "MinerAvailability": {
            "type": "object", "required": ["task_availabilities", "llm_model_availabilities"],
            "properties": {
                "task_availabilities": {"type": "object", "additionalProperties": {"type": "boolean"},
                                        "example": {t: t == "InferenceTask" for t in KNOWN_TASKS}},
                "llm_model_availabilities": {"type": "object", "additionalProperties": {"type": "boolean"}},
            },
        },
        "MinerAvailabilities": {
            "type": "object",
            "description": "Per uid asked (as text): what it serves, or null when unknown or not available.",
            "additionalProperties": nullable(ref("MinerAvailability")),
        },
        "Health": {"type": "object", "required": ["status"], "properties": {"status": {"const": "ok"}}},
        "ActorState": {
            "type": "object", "required": ["status", "restarts", "last_error", "for_s"],
            "properties": {"status": {"type": "string", "examples": ["running", "restarting", "failed"]},
                           "restarts": {"type": "integer", "minimum": 0},
                           "last_error": {"type": ["string", "null"]},
                           "for_s": {"type": "number"}, "next_attempt_in_s": {"type": "number"}},
        },
        "Readiness": {
            "type": "object",
            "required": ["ready", "draining", "actors"],
            "description": "Whether the gateway serves, each actor's state, and each component's figures "
                           "(`keys`, `subnet`, `availability`, `fanout`, `scoring`, ...).",
            "properties": {"ready": {"type": "boolean"}, "draining": {"type": "boolean"},
                           "worker": {"type": ["integer", "null"],
                                      "description": "Which of `server.workers` processes answered (null: one)."},
                           "actors": {"type": "object", "additionalProperties": ref("ActorState")}},
            "additionalProperties": figures,
        },
        "MinerHealth": {
            "type": "object",
            "properties": {
                "breaker": {"type": "string", "enum": ["closed", "open", "half_open"]},
                "ttft_ewma_s": {"type": ["number", "null"], "description": "Time to first token, moving average."},
                "failure_ewma": {"type": "number"},
                "consecutive_failures": {"type": "integer"},
                "successes": {"type": "integer"},
                "failures": {"type": "integer"},
                "retry_in_s": {"type": ["number", "null"]},
                "last_error": {"type": ["string", "null"]},
            },
        },
        "MinersStatus": {
            "type": "object", "required": ["miners", "fanout"],
            "properties": {"miners": {"type": "object", "additionalProperties": ref("MinerHealth")},
                           "fanout": figures},
        },
    }


def components() -> dict[str, Any]:
    error = ref("Error")

    def error_response(description: str, *, headers: Mapping[str, Any] | None = None,
                       example: Any = None) -> dict[str, Any]:
        response: dict[str, Any] = {"description": description, "content": json_content(error, example)}
        if headers:
            response["headers"] = dict(headers)
        return response

    def sample(message: str, type_: str, code: str, param: str | None = None) -> dict[str, Any]:
        return {"error": {"message": message, "type": type_, "param": param, "code": code}}

    return {
        "securitySchemes": {
            "api-key": {"type": "apiKey", "in": "header", "name": "api-key",
                        "description": "A client's API key (made by `POST /api_management/create-api-key/` or "
                                       "`sn1-gateway keys create`)."},
            "bearer": {"type": "http", "scheme": "bearer",
                       "description": "The same API key as `Authorization: Bearer <key>`, as OpenAI clients send it."},
            "admin-key": {"type": "apiKey", "in": "header", "name": "admin-key",
                          "description": "The operator's key, `auth.admin_key` (or `SN1_GATEWAY_ADMIN_KEY`). "
                                         "Compared in constant time."},
        },
        "headers": {
            "X-RateLimit-Limit": {"description": "The key's limit, requests per minute.",
                                  "schema": {"type": "integer", "minimum": 0}},
            "X-RateLimit-Remaining": {"description": "Requests the key may send at once now.",
                                      "schema": {"type": "integer", "minimum": 0}},
            "X-RateLimit-Reset": {"description": "Seconds until the full limit is available again.",
                                  "schema": {"type": "integer", "minimum": 0}},
            "Retry-After": {"description": "Seconds to wait before trying again.",
                            "schema": {"type": "integer", "minimum": 0}},
            "X-Request-Id": {"description": "The request's id in the gateway's logs and scoring records.",
                             "schema": {"type": "string"}},
        },
        "responses": {
            "BadRequest": error_response(
                "The request is invalid: the body is not JSON (or nested too deeply), or a parameter is "
                "missing, of the wrong type or out of range; `error.param` names it.",
                headers=RATE_LIMIT_HEADERS,
                example=sample("'temperature' must be between 0 and 2.", "invalid_request_error",
                               "invalid_parameter", "temperature")),
            "Unauthorized": error_response(
                "A missing, unknown or revoked API key (`missing_api_key`, `invalid_api_key`), or a missing or "
                "wrong admin key (`invalid_admin_key`). Counted against the client's address.",
                example=sample("Invalid API key: it is unknown or has been revoked.", "authentication_error",
                               "invalid_api_key")),
            "AdminDisabled": error_response(
                "`admin_disabled`: no admin key is configured, so the admin routes are off.",
                example=sample("The admin endpoints are disabled: no admin key is configured (auth.admin_key).",
                               "permission_error", "admin_disabled")),
            "NotFound": error_response("Not found (`api_key_not_found`, `model_not_found`, `not_found`).",
                                       headers=RATE_LIMIT_HEADERS),
            "PayloadTooLarge": error_response("`request_too_large`: the body is over `server.max_body_bytes`."),
            "TooManyRequests": error_response(
                "`rate_limit_exceeded`: over the key's limit; `key_blocked`: its limit is 0; "
                "`too_many_failed_auth`: too many failed authentications from this address "
                "(`auth.failed_auth_per_minute`; a correct API key still passes).",
                headers={"Retry-After": ref("Retry-After", "headers"), **RATE_LIMIT_HEADERS},
                example=sample("Rate limit of 60 requests per minute exceeded; retry in 1 s.", "rate_limit_error",
                               "rate_limit_exceeded")),
            "BadGateway": error_response(
                "`miners_failed`: every miner asked failed before any usable answer (`error.details` says why, "
                "per uid); `miner_stream_broken`: the answer broke off.",
                headers={**RATE_LIMIT_HEADERS, "X-Request-Id": ref("X-Request-Id", "headers")}),
            "ServiceUnavailable": error_response(
                "Nothing can answer now: `no_miners`, `no_available_miners`, `miners_unhealthy`, `overloaded` "
                "(with `Retry-After`), `key_store_unavailable`.",
                headers={"Retry-After": ref("Retry-After", "headers"), **RATE_LIMIT_HEADERS}),
            "GatewayTimeout": error_response(
                "`miner_timeout`: no first token (or no whole answer) within the time budget.",
                headers=RATE_LIMIT_HEADERS),
        },
        "schemas": {**error_schemas(), **chat_schemas(), **job_schemas(), **management_schemas(), **other_schemas()},
    }


# --- paths ---------------------------------------------------------------------------------------------

STREAM_DESCRIPTION = (
    "With `stream: true`: Server-Sent Events. Each `data:` line is a `chat.completion.chunk` (schema "
    "`ChatCompletionChunk`); the first carries the role, the last choice the `finish_reason`; with "
    "`stream_options.include_usage` one more chunk carries `usage`; then `data: [DONE]`. While nothing is "
    "ready, a comment line `: keep-alive` goes out every `fanout.sse_keepalive_s`. A failure after the "
    "200 is sent is one event holding an `Error` body, and no `[DONE]`. `x-sse-data` is the schema of "
    "each event's data."
)
STREAM_EXAMPLE = (
    'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"Default",'
    '"choices":[{"index":0,"delta":{"role":"assistant","content":"Hel"},"finish_reason":null}]}\n\n'
    'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"Default",'
    '"choices":[{"index":0,"delta":{"content":"lo"},"finish_reason":null}]}\n\n'
    'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"Default",'
    '"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n'
    "data: [DONE]\n\n"
)


def chat_operation(op_id: str, summary: str, description: str) -> dict[str, Any]:
    request_example = {"model": DEFAULT_MODEL_ALIAS, "messages": [{"role": "user", "content": "Hello"}],
                       "stream": False, "max_tokens": 64, "task": "InferenceTask",
                       "sampling_parameters": {"temperature": 0.7, "top_p": 0.95}}
    headers = {**RATE_LIMIT_HEADERS, "X-Request-Id": ref("X-Request-Id", "headers")}
    return operation(
        op_id, "GPT Endpoints", summary, description, security=CLIENT,
        body={"required": True, "content": json_content(ref("ChatCompletionRequest"), request_example)},
        responses={
            "200": {
                "description": "The answer: a `chat.completion`, or with `stream: true` an event stream.",
                "headers": headers,
                "content": {
                    "application/json": {"schema": ref("ChatCompletion")},
                    "text/event-stream": {
                        "schema": {"type": "string", "description": STREAM_DESCRIPTION},
                        "example": STREAM_EXAMPLE,
                        "x-sse-data": {"oneOf": [ref("ChatCompletionChunk"), ref("Error")]},
                    },
                },
            },
            **errors(400, 401, 404, 413, 429, 502, 503, 504),
        },
    )


CHAT_DESCRIPTION = (
    "Fans the request out to `fanout.miners` miners (serving, available for the task and model, sampled "
    "from the best by incentive, skipping those whose circuit breaker is open), or to `uids`. Streaming: "
    "the first miner to send text wins and its chunks are passed on; if it breaks or stalls, a miner whose "
    "answer so far is exactly what was sent takes over. Not streaming: the first complete valid answer. "
    "Mixture (`mixture`, `sampling_parameters.mixture` or a mixture `inference_mode`): several miners "
    "answer, then one more combines their answers. Every miner's answer is forwarded to a validator for "
    "scoring. Errors after authorisation still count against the key and carry its `X-RateLimit-*` headers.\n\n"
    f"Deep research (`inference_mode: \"{RESEARCH_MODE}\"` or `test_time_inference: true`): a run of model "
    "calls and web searches, each an ordinary fan-out to miners (and scored as one), within "
    "`research.deadline_s` and `research.max_steps`. Streamed, the text is Markdown progress headings "
    "(`## Research Plan`, `## Step 1: Planning Tools`, ...) then `## Final Answer` with the direct answer, the "
    "explanation, the sources with their URLs and the limitations, then `[DONE]`; keep-alive comments go out "
    "while a step works, and the client leaving stops the run. Not streamed: the final answer as one "
    "`chat.completion`. A run that fails ends with `research_deadline` (504), `research_unusable_answer` (a "
    "step's JSON still unusable after `research.json_retries` more tries) or `research_call_failed` (502). "
    "The run is one request against the key; the completion tokens of all its calls are its usage."
)


def chat_paths() -> dict[str, Any]:
    job_id = path_param("job_id", "The id `POST /v1/chat/completions/jobs` answered.",
                        {"type": "string", "format": "uuid"})
    return {
        "/v1/chat/completions": {"post": chat_operation("createChatCompletion", "Chat completion",
                                                        CHAT_DESCRIPTION)},
        "/chat/completions": {"post": chat_operation(
            "createChatCompletionUnversioned", "Chat completion (without /v1)",
            "The same as `POST /v1/chat/completions`, for clients whose base URL has no `/v1`.")},
        "/v1/models": {"get": operation(
            "listModels", "GPT Endpoints", "Models served",
            "The models miners say they serve, from the availability snapshot.", security=CLIENT,
            responses={"200": ok("The models.", ref("ModelList"), counted=True), **errors(401, 429, 503)})},
        "/v1/chat/completions/jobs": {"post": operation(
            "createChatCompletionJob", "GPT Endpoints", "Start a chat completion job",
            "The same body as `POST /v1/chat/completions` (any chat request, deep research and mixture "
            "included; `stream` is ignored), checked at once (a bad one is a 400); the answer is made in the "
            "gateway, as a stream, without holding the connection, and read with "
            "`GET /v1/chat/completions/jobs/{job_id}`. A job belongs to the key that made it; it is kept "
            "`jobs.ttl_s` (24 h) after it was created or, once finished, after it finished. At most "
            "`jobs.max_running_per_key` jobs of a key run at once in a gateway and `jobs.max_stored_per_key` "
            "are kept (429 beyond, `too_many_running_jobs`, `too_many_jobs`), and `jobs.max_running` in all "
            "(503, `jobs_busy`), each with `Retry-After`. With `auth.store = \"redis\"` every gateway on that "
            "Redis serves every job.", security=CLIENT,
            body={"required": True, "content": json_content(ref("ChatCompletionRequest"))},
            responses={
                "202": {"description": "Accepted; the job is pending.", "headers": RATE_LIMIT_HEADERS,
                        "content": json_content(ref("ChatJob"), {
                            "job_id": "0b9f3c1e-8f0e-4a57-9d55-6b3b1f7c2a10", "status": "pending",
                            "created_at": "2025-01-01T00:00:00.000Z", "updated_at": "2025-01-01T00:00:00.000Z"})},
                **errors(400, 401, 413, 429, 503)})},
        "/v1/chat/completions/jobs/{job_id}": {
            "get": operation(
                "getChatCompletionJob", "GPT Endpoints", "A chat completion job",
                "The job's status and what its answer has streamed so far. Another key's job, like an unknown or "
                "expired one, is a 404 (`job_not_found`).", security=CLIENT,
                parameters=[job_id],
                responses={"200": ok("The job.", ref("ChatJobResult"), counted=True), **errors(401, 404, 429, 503)}),
            "delete": operation(
                "deleteChatCompletionJob", "GPT Endpoints", "Cancel or remove a chat completion job",
                "A pending or running job is stopped (also when another gateway on the same Redis runs it) and "
                "kept, `failed` with error code `cancelled`, until it expires; a finished job is removed (then "
                "404). Answers the job as it then is (or was).", security=CLIENT, parameters=[job_id],
                responses={"200": ok("Cancelled, or removed.", ref("ChatJobResult"), counted=True),
                           **errors(401, 404, 429, 503)}),
        },
    }


def management_paths() -> dict[str, Any]:
    rate_limit = query("rate_limit", {"type": "integer", "minimum": 0, "maximum": RATE_LIMIT_MAX},
                       "Requests per minute: a fresh key may send that many at once, then one every 60/N s "
                       "(0 blocks the key).", required=True)
    key = path_param("api_key", "The key itself.")
    paths: dict[str, Any] = {}
    for prefix in ("/api_management", ""):
        suffix = "" if prefix else "Unprefixed"
        where = ("" if prefix else " Upstream's path, without `/api_management`; the same route.")
        paths[f"{prefix}/create-api-key/"] = {"post": operation(
            f"createApiKey{suffix}", "API Management", "Create an API key",
            "A new random key with the given rate limit; the key is in this answer only." + where,
            security=ADMIN, parameters=[rate_limit],
            responses={"200": ok("Created.", ref("KeyCreated")), **errors(400, 401, 403, 429, 503)})}
        paths[f"{prefix}/modify-api-key/{{api_key}}"] = {"put": operation(
            f"modifyApiKey{suffix}", "API Management", "Change an API key's rate limit",
            "Takes effect on the key's next request, in every gateway sharing the store." + where,
            security=ADMIN, parameters=[key, rate_limit],
            responses={"200": ok("Changed.", ref("KeyUpdated")), **errors(400, 401, 403, 404, 429, 503)})}
        paths[f"{prefix}/delete-api-key/{{api_key}}"] = {"delete": operation(
            f"deleteApiKey{suffix}", "API Management", "Delete an API key",
            "The key is refused from its next request on." + where, security=ADMIN, parameters=[key],
            responses={"200": ok("Deleted.", ref("KeyDeleted")), **errors(401, 403, 404, 429, 503)})}
    paths["/api_management/keys"] = {"get": operation(
        "listApiKeys", "API Management", "List API keys",
        "Every key's id, prefix, rate limit and usage; never a key.", security=ADMIN,
        responses={"200": ok("The keys.", ref("KeyList")), **errors(401, 403, 429, 503)})}
    paths["/api_management/whoami"] = {"get": operation(
        "whoAmI", "API Management", "The calling key",
        "The calling API key's own prefix, rate limit and usage.", security=CLIENT,
        responses={"200": ok("The key.", ref("WhoAmI"), counted=True), **errors(401, 429, 503)})}
    return paths


def retrieval_paths() -> dict[str, Any]:
    description = (
        "Asks `n_miners` miners (or `uids`) for `n_results` results each, waits up to `max_response_time` "
        "seconds, and merges their answers round-robin, the first mention of a URL winning. Items without "
        "an http(s) URL or content are left out. Every miner's answer is forwarded for scoring."
    )
    responses = {"200": ok("The merged results.", ref("WebRetrievalResponse"), counted=True,
                           extra_headers={"X-Request-Id": ref("X-Request-Id", "headers")}),
                 **errors(400, 401, 429, 502, 503)}
    parameters = [
        query("search_query", {"type": "string", "minLength": 1, "maxLength": MAX_QUERY_CHARS}, "The query.",
              required=True),
        query("n_miners", {"type": "integer", "minimum": 1, "maximum": 64, "default": 10}, "Miners to ask."),
        query("n_results", {"type": "integer", "minimum": 1, "maximum": 100, "default": 5},
              "Results wanted (and asked of each miner)."),
        query("max_response_time", {"type": "integer", "minimum": 1, "maximum": MAX_RESPONSE_TIME_S,
                                     "default": DEFAULT_RESPONSE_TIME_S}, "Seconds to wait for miners."),
        query("uids", {"type": "array", "maxItems": MAX_EXPLICIT_UIDS, "items": {"type": "integer", "minimum": 0}},
              "Ask exactly these miners; repeated (`uids=1&uids=2`) or comma-separated.",
              style="form", explode=True),
    ]
    return {"/web_retrieval": {
        "get": operation("webRetrieval", "Web Retrieval", "Web search through miners", description,
                         security=CLIENT, parameters=parameters, responses=responses),
        "post": operation("webRetrievalPost", "Web Retrieval", "Web search through miners (JSON body)",
                          "The predecessor's form of `GET /web_retrieval`, with the parameters in a JSON body. "
                          + description, security=CLIENT,
                          body={"required": True, "content": json_content(ref("WebRetrievalRequest"))},
                          responses={**responses, **errors(413)}),
    }}


def availability_paths() -> dict[str, Any]:
    return {
        "/miner_availabilities/miner_availabilities": {"post": operation(
            "minerAvailabilities", "Miner Availability", "Availability of miners",
            "From the gateway's availability snapshot; no miner is asked.", security=CLIENT,
            body={"required": False, "description": "The uids to report, or null (or nothing, or []) for all.",
                  "content": json_content(nullable({"type": "array", "maxItems": MAX_UIDS,
                                                    "items": {"type": "integer"}}), [1, 2, 3])},
            responses={"200": ok("Per uid.", ref("MinerAvailabilities"), counted=True),
                       **errors(400, 401, 413, 429)})},
        "/miner_availabilities/get_available_miners": {"get": operation(
            "getAvailableMiners", "Miner Availability", "Miners available for a task and model",
            "Uids of serving miners available for `task` (and `model`), best incentive first.", security=CLIENT,
            parameters=[
                query("task", {"type": "string", "enum": list(KNOWN_TASKS)}, "Only miners serving this task."),
                query("model", {"type": "string"}, "Only miners serving this model."),
                query("k", {"type": "integer", "minimum": 1, "maximum": 65536, "default": 10}, "At most this many."),
            ],
            responses={"200": ok("Uids.", {"type": "array", "items": {"type": "integer"}}, counted=True),
                       **errors(400, 401, 429)})},
    }


def monitoring_paths() -> dict[str, Any]:
    return {
        "/health": {"get": operation(
            "health", "Health", "Liveness", "Answers while the process serves HTTP.", security=PUBLIC,
            responses={"200": ok("Alive.", ref("Health"), example={"status": "ok"})})},
        "/health/ready": {"get": operation(
            "ready", "Health", "Readiness", "Each actor's state and each component's figures; 503 while not "
            "ready or draining.", security=PUBLIC,
            responses={"200": ok("Ready.", ref("Readiness")),
                       "503": {"description": "Not ready (an actor not running) or draining.",
                               "content": json_content(ref("Readiness"))}})},
        "/metrics": {"get": operation(
            "metrics", "Monitoring", "Prometheus metrics",
            "The figures of `/health/ready` and each miner's health, in the Prometheus text format.",
            security=PUBLIC,
            responses={"200": {"description": "Metrics.", "content": {"text/plain": {"schema": {"type": "string"},
                                                                                      "example": "sn1_gateway_ready 1\n"}}}})},
        "/status/miners": {"get": operation(
            "minersStatus", "Monitoring", "Miners' health",
            "Per miner: circuit breaker state, moving averages of time to first token and of failures; and "
            "the fan-out pool's figures.", security=PUBLIC,
            responses={"200": ok("Per miner.", ref("MinersStatus"))})},
        "/status": {"get": operation(
            "statusPage", "Monitoring", "Status page",
            "A live HTML page for operators: miners (breaker, time to first token, failure rate, last error, "
            "requests), requests per second and time-to-first-token p50/p99 over the last five minutes, the "
            "scoring pipeline per validator, key usage by display prefix, actors and their restarts. No key "
            "to load it: it asks for the admin key once, keeps it in the tab's session storage and reads "
            "`GET /status/data` every few seconds (`?refresh=SECONDS`, 1 to 60). Served from the gateway "
            "itself; it loads nothing from elsewhere.",
            security=PUBLIC,
            responses={"200": {"description": "The page.", "content": {"text/html": {"schema": {"type": "string"}}}}})},
        "/status/data": {"get": operation(
            "statusData", "Monitoring", "Status page data",
            "What the status page shows, as JSON: `miners` (one row per miner), `chart` (points of "
            "`requests_per_s`, `errors_per_s`, `ttft_p50_s`, `ttft_p99_s`), `requests`, `scoring` (with "
            "`validators` and the `API_HOTKEY` hint of one refusing the gateway), `keys` (`count` and the "
            "most used by display prefix; never a key), `actors`. Needs the admin key.", security=ADMIN,
            responses={"200": ok("The gateway's state.", {"type": "object"}), **errors(401, 403, 429)})},
    }


def documentation_paths() -> dict[str, Any]:
    html = {"text/html": {"schema": {"type": "string"}}}
    return {
        "/openapi.json": {"get": operation(
            "openapi", "Documentation", "This document", "The OpenAPI document of every route. No key needed.",
            security=PUBLIC, responses={"200": ok("The document.", {"type": "object"})})},
        "/docs": {"get": operation(
            "swaggerUi", "Documentation", "Swagger UI",
            "This document in Swagger UI, served from the gateway itself (works offline). No key needed; "
            "enter keys under Authorize to try routes.", security=PUBLIC,
            responses={"200": {"description": "The page.", "content": html}})},
        "/redoc": {"get": operation(
            "redoc", "Documentation", "ReDoc", "This document in ReDoc, served from the gateway itself "
            "(works offline). No key needed.", security=PUBLIC,
            responses={"200": {"description": "The page.", "content": html}})},
        "/docs/assets/{package}/{version}/{name}": {"get": operation(
            "docsAsset", "Documentation", "A file of the documentation viewers",
            "The vendored Swagger UI and ReDoc files and their licences, cached for a year (the version is in "
            "the path). No key needed.", security=PUBLIC,
            parameters=[path_param("package", "`swagger-ui` or `redoc`."),
                        path_param("version", "The vendored version."),
                        path_param("name", "The file name.")],
            responses={"200": {"description": "The file.",
                               "content": {"text/javascript": {"schema": {"type": "string"}},
                                           "text/css": {"schema": {"type": "string"}},
                                           "text/plain": {"schema": {"type": "string"}}}},
                       "304": {"description": "Not modified (`If-None-Match`)."},
                       **errors(404)})},
    }


INFO_DESCRIPTION = (
    "An OpenAI-style API gateway for a Bittensor Subnet 1 validator: clients send chat requests with an API "
    "key; the gateway picks miners, sends them the request signed with the validator's hotkey, streams the "
    "first good answer back and forwards every miner's answer to a validator for scoring.\n\n"
    "**Keys.** Client routes take an API key in the `api-key` header or as `Authorization: Bearer <key>`; "
    "management routes take the `admin-key` header. Health, monitoring and these documentation routes need "
    "no key. Every authorised answer carries `X-RateLimit-Limit`, `X-RateLimit-Remaining` and "
    "`X-RateLimit-Reset`; over the limit the answer is 429 with `Retry-After`.\n\n"
    "**Errors.** Every error, on every route (also an unknown path, 404, or a wrong method, 405), is "
    '`{"error": {"message", "type", "param", "code"}}` with the fitting status.'
)


def openapi_document(*, version: str) -> dict[str, Any]:
    """The document, `version` its `info.version`."""
    paths: dict[str, Any] = {**chat_paths(), **management_paths(), **retrieval_paths(), **availability_paths(),
                             **monitoring_paths(), **documentation_paths()}
    return {
        "openapi": OPENAPI_VERSION,
        "info": {"title": TITLE, "version": version, "description": INFO_DESCRIPTION},
        "tags": [dict(tag) for tag in TAGS],
        "paths": paths,
        "components": components(),
    }
