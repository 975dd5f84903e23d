"""Epistula: what the gateway signs verifies with bittensor's own Keypair over the bytes that arrive;
each verification failure is its own error; routing headers cannot inject anything."""

from __future__ import annotations

import hashlib
import json
import re
import time
import uuid
from collections.abc import Callable
from typing import Any

import h11
import httpx
import pytest
import trio
from bittensor_core import Keypair
from hypothesis import given, settings
from hypothesis import strategies as st

from wire.epistula import (
    MAX_HEADER_VALUE,
    ROUTED_FIELDS,
    BadSignature,
    EpistulaError,
    FutureRequest,
    MissingHeaders,
    ReplayedRequest,
    Signer,
    StaleRequest,
    UnknownSigner,
    Verifier,
    WrongReceiver,
    body_digest,
    header_value,
    routing_headers,
)

GATEWAY = Keypair.create_from_uri("//Gateway")
MINER = Keypair.create_from_uri("//Miner")
OTHER_MINER = Keypair.create_from_uri("//OtherMiner")
NOW_MS = 1_760_000_000_000
BODY = json.dumps({"messages": [{"role": "user", "content": "héllo"}], "seed": 7}, separators=(",", ":")).encode()


class Clock:
    def __init__(self, now_ms: int = NOW_MS) -> None:
        self.now_ms = now_ms

    def __call__(self) -> int:
        return self.now_ms


def verify_with_bittensor(headers: httpx.Headers | dict[str, str], body: bytes) -> bool:
    """docs/protocol.md, "Epistula signing", checked with nothing but bittensor's Keypair built from the
    ss58 address."""
    message = (
        f"{hashlib.sha256(body).hexdigest()}.{headers['Epistula-Uuid']}."
        f"{headers['Epistula-Timestamp']}.{headers['Epistula-Signed-For']}"
    )
    signature = bytes.fromhex(headers["Epistula-Request-Signature"].removeprefix("0x"))
    return bool(Keypair(ss58_address=headers["Epistula-Signed-By"]).verify(message.encode(), signature))


def test_the_headers_follow_the_protocol() -> None:
    before = time.time_ns() // 1_000_000
    headers = Signer(GATEWAY).headers(BODY, MINER.ss58_address)
    after = time.time_ns() // 1_000_000
    assert headers["Epistula-Version"] == "2"
    assert before <= int(headers["Epistula-Timestamp"]) <= after  # milliseconds
    assert uuid.UUID(headers["Epistula-Uuid"]).version == 4
    assert headers["Epistula-Signed-By"] == GATEWAY.ss58_address
    assert headers["Epistula-Signed-For"] == MINER.ss58_address
    assert re.fullmatch(r"0x[0-9a-f]{128}", headers["Epistula-Request-Signature"])
    assert verify_with_bittensor(headers, BODY)


def test_a_body_hashed_once_for_several_receivers_signs_as_hashing_it_each_time() -> None:
    """A fan-out hashes its body once (`body_digest`) and signs it for every miner."""
    assert body_digest(BODY) == hashlib.sha256(BODY).hexdigest()
    signer = Signer(GATEWAY)
    for receiver in (MINER, OTHER_MINER):
        headers = signer.headers(BODY, receiver.ss58_address, digest=body_digest(BODY))
        assert verify_with_bittensor(headers, BODY)
    assert not verify_with_bittensor(signer.headers(BODY, MINER.ss58_address, digest=body_digest(b"other")), BODY)


def test_every_request_gets_a_fresh_uuid() -> None:
    signer = Signer(GATEWAY)
    assert len({signer.headers(BODY, MINER.ss58_address)["Epistula-Uuid"] for _ in range(50)}) == 50


async def test_the_signature_covers_exactly_the_bytes_the_receiver_got_mock_transport() -> None:
    received: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        received.append(request)
        return httpx.Response(200)

    signer = Signer(GATEWAY)
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        await client.post("http://miner/v1/chat/completions", content=BODY,
                          headers=signer.headers(BODY, MINER.ss58_address))
    (request,) = received
    assert request.content == BODY
    assert verify_with_bittensor(request.headers, request.content)
    assert not verify_with_bittensor(request.headers, request.content[:-1] + b" ")


async def serve_once(
    listeners: list[trio.SocketListener], got: list[tuple[dict[str, str], bytes]], *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """A bare HTTP/1.1 server (h11, no framework in between) that records one request as it arrived."""
    (listener,) = listeners
    task_status.started(listener.socket.getsockname()[1])
    stream = await listener.accept()
    connection = h11.Connection(h11.SERVER)
    headers: dict[str, str] = {}
    body = b""
    while True:
        event = connection.next_event()
        if event is h11.NEED_DATA:
            connection.receive_data(await stream.receive_some(65536))
        elif isinstance(event, h11.Request):
            headers = {k.decode(): v.decode() for k, v in event.headers}
        elif isinstance(event, h11.Data):
            body += bytes(event.data)
        elif isinstance(event, h11.EndOfMessage):
            break
    got.append((headers, body))
    await stream.send_all(connection.send(h11.Response(status_code=204, headers=[])) or b"")
    await stream.send_all(connection.send(h11.EndOfMessage()) or b"")
    await stream.aclose()


async def test_the_signature_verifies_over_a_real_connection() -> None:
    got: list[tuple[dict[str, str], bytes]] = []
    with trio.fail_after(10):
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        async with trio.open_nursery() as nursery:
            port = await nursery.start(serve_once, listeners, got)
            signer = Signer(GATEWAY)
            payload = {"messages": [{"role": "user", "content": "日本語 and emoji 🎉"}], "stream": True}
            body = json.dumps(payload).encode()
            headers = {**routing_headers({"task": "InferenceTask", "seed": 3}),
                       **signer.headers(body, MINER.ss58_address), "Content-Type": "application/json"}
            async with httpx.AsyncClient() as client:
                response = await client.post(f"http://127.0.0.1:{port}/v1/chat/completions",
                                             content=body, headers=headers)
            assert response.status_code == 204
        for listener in listeners:
            await listener.aclose()
    ((arrived, arrived_body),) = got
    wire = {k.title(): v for k, v in arrived.items()}  # header names arrive in lower case
    assert arrived_body == body
    assert verify_with_bittensor(wire, arrived_body)
    assert Verifier(MINER.ss58_address, {GATEWAY.ss58_address}).verify(arrived, arrived_body) == GATEWAY.ss58_address
    assert arrived["task"] == "InferenceTask" and arrived["seed"] == "3"


# --- verification: each failure is its own error -------------------------------------------------


def signed(
    body: bytes = BODY, *, by: Keypair = GATEWAY, for_: str = MINER.ss58_address, at_ms: int = NOW_MS
) -> dict[str, str]:
    return Signer(by, clock_ms=lambda: at_ms).headers(body, for_)


def verifier(clock: Clock | None = None, **kw: Any) -> Verifier:
    return Verifier(MINER.ss58_address, {GATEWAY.ss58_address}, clock_ms=clock or Clock(), **kw)


def test_a_good_request_verifies_and_names_its_signer() -> None:
    assert verifier().verify(signed(), BODY) == GATEWAY.ss58_address


def test_header_names_are_case_insensitive() -> None:
    headers = {k.lower(): v for k, v in signed().items()}
    assert verifier().verify(headers, BODY) == GATEWAY.ss58_address


Breaker = Callable[[dict[str, str]], tuple[dict[str, str], bytes]]


def with_header(name: str, value: str | None) -> Breaker:
    def change(headers: dict[str, str]) -> tuple[dict[str, str], bytes]:
        if value is None:
            headers.pop(name)
        else:
            headers[name] = value
        return headers, BODY
    return change


def flipped_signature_bit(headers: dict[str, str]) -> tuple[dict[str, str], bytes]:
    signature = bytearray(bytes.fromhex(headers["Epistula-Request-Signature"][2:]))
    signature[7] ^= 0x01
    headers["Epistula-Request-Signature"] = "0x" + signature.hex()
    return headers, BODY


@pytest.mark.parametrize(
    ("make", "error", "status", "code", "message"),
    [
        (lambda: (signed(), BODY[:-1] + b"!"), BadSignature, 400, "bad_signature", "does not match"),
        (lambda: (signed(), BODY + b" "), BadSignature, 400, "bad_signature", "does not match"),
        (lambda: flipped_signature_bit(signed()), BadSignature, 400, "bad_signature", "does not match"),
        (lambda: with_header("Epistula-Request-Signature", "deadbeef")(signed()), BadSignature, 400,
         "bad_signature", "0x-prefixed"),
        (lambda: with_header("Epistula-Request-Signature", "0xzz")(signed()), BadSignature, 400,
         "bad_signature", "not hex"),
        (lambda: with_header("Epistula-Request-Signature", "0x" + "ab" * 10)(signed()), BadSignature, 400,
         "bad_signature", ""),
        (lambda: with_header("Epistula-Uuid", str(uuid.uuid4()))(signed()), BadSignature, 400,
         "bad_signature", "does not match"),
        (lambda: with_header("Epistula-Timestamp", str(NOW_MS - 1))(signed()), BadSignature, 400,
         "bad_signature", "does not match"),
        # signed by a known key, but the Signed-By header claims someone else
        (lambda: (Verifier(MINER.ss58_address, {GATEWAY.ss58_address, OTHER_MINER.ss58_address},
                           clock_ms=Clock()), with_header("Epistula-Signed-By", OTHER_MINER.ss58_address)(signed())),
         BadSignature, 400, "bad_signature", "does not match"),
        (lambda: (signed(for_=OTHER_MINER.ss58_address), BODY), WrongReceiver, 400, "wrong_receiver",
         f"signed for {OTHER_MINER.ss58_address}"),
        (lambda: (signed(by=OTHER_MINER), BODY), UnknownSigner, 401, "unknown_signer",
         f"unknown signer {OTHER_MINER.ss58_address}"),
        (lambda: (signed(at_ms=NOW_MS - 8_001), BODY), StaleRequest, 400, "stale", "8001 ms old"),
        (lambda: (signed(at_ms=NOW_MS + 2_001), BODY), FutureRequest, 400, "from_the_future", "2001 ms in the future"),
        (lambda: with_header("Epistula-Timestamp", "soon")(signed()), StaleRequest, 400, "stale", "not integer"),
        (lambda: with_header("Epistula-Uuid", None)(signed()), MissingHeaders, 400, "missing_headers",
         "Epistula-Uuid"),
        (lambda: ({}, BODY), MissingHeaders, 400, "missing_headers", "Epistula-Timestamp, Epistula-Uuid"),
        (lambda: with_header("Epistula-Signed-For", "")(signed()), MissingHeaders, 400, "missing_headers",
         "Epistula-Signed-For"),
    ],
    ids=[
        "body-last-byte", "body-extra-byte", "signature-bit", "signature-no-0x", "signature-not-hex",
        "signature-too-short", "uuid-changed", "timestamp-changed", "signed-by-swapped", "wrong-receiver",
        "unknown-signer", "stale", "future", "timestamp-not-a-number", "missing-uuid", "unsigned",
        "empty-signed-for",
    ],
)
def test_each_verification_failure_is_a_distinct_error(
    make: Callable[[], Any], error: type[EpistulaError], status: int, code: str, message: str
) -> None:
    made = make()
    check, (headers, body) = (made[0], made[1]) if isinstance(made[0], Verifier) else (verifier(), made)
    with pytest.raises(error) as caught:
        check.verify(headers, body)
    assert type(caught.value) is error
    assert (caught.value.status, caught.value.code) == (status, code)
    assert message in str(caught.value)


def test_the_age_limits_are_inclusive_at_the_edges() -> None:
    assert verifier().verify(signed(at_ms=NOW_MS - 8_000), BODY)
    assert verifier().verify(signed(at_ms=NOW_MS + 2_000), BODY)


def test_a_replayed_uuid_is_refused_inside_the_window() -> None:
    check = verifier()
    headers = signed()
    assert check.verify(headers, BODY) == GATEWAY.ss58_address
    with pytest.raises(ReplayedRequest, match="already used"):
        check.verify(headers, BODY)


def test_after_the_window_a_replay_is_stale_and_the_uuid_is_forgotten() -> None:
    clock = Clock()
    check = verifier(clock)
    check.verify(signed(), BODY)
    clock.now_ms += 8_001
    with pytest.raises(StaleRequest):
        check.verify(signed(), BODY)
    clock.now_ms += 2_000
    check.verify(signed(at_ms=clock.now_ms), BODY)  # a later request makes it drop the old entry
    assert len(check._seen) == 1


def test_a_forged_request_does_not_burn_the_uuid_of_the_real_one() -> None:
    check = verifier()
    real = signed()
    forged = {**real, "Epistula-Request-Signature": "0x" + "00" * 64}
    with pytest.raises(BadSignature):
        check.verify(forged, BODY)
    assert check.verify(real, BODY) == GATEWAY.ss58_address


def test_remembered_uuids_are_bounded() -> None:
    check = verifier(max_remembered=3)
    first = signed()
    check.verify(first, BODY)
    for _ in range(3):
        check.verify(signed(), BODY)
    assert len(check._seen) == 3
    assert check.verify(first, BODY)  # memory stays bounded: the oldest uuid was forgotten


# --- routing headers ------------------------------------------------------------------------------


def test_routed_fields_become_headers_and_nothing_else() -> None:
    body = {
        "messages": [{"role": "user", "content": "x"}], "model": "m", "stream": True,
        "task": "WebRetrievalTask", "target_results": 3, "seed": 42, "timeout": 12.5,
        "mixture": False, "sampling_parameters": {"temperature": 0.7, "top_p": [1]},
        "inference_mode": "Reasoning-Fast", "json_format": True,
    }
    assert routing_headers(body, client_timeout_s=30.0) == {
        "task": "WebRetrievalTask", "target_results": "3", "seed": "42", "timeout": "12.5",
        "mixture": "false", "inference_mode": "Reasoning-Fast", "json_format": "true",
        "X-Client-Timeout": "30",
    }


@pytest.mark.parametrize(
    "body",
    [
        {"task": "Inference\r\nX-Admin: 1"},
        {"task": "tab\tinside"},
        {"task": "nul\x00"},
        {"task": "del\x7f"},
        {"task": "x" * (MAX_HEADER_VALUE + 1)},
        {"task": "naïve"},  # not ASCII: httpx could not send it, so it is dropped rather than mangled
        {"task": "✓"},
        {"task": None},
        {"task": " "},  # blank: no header at all (h11 refuses a value that is only whitespace)
        {"task": ""},
        {"task": ["InferenceTask"]},
        {"task": {"name": "InferenceTask"}},
        # a client's own fields never become headers
        {"x-forwarded-for": "10.0.0.1"},
        {"forwarded": "for=10.0.0.1"},
        {"api-key": "secret"},
        {"transfer_encoding": "chunked"},
        {"content_length": 0},
        {"Content-Length": 0},
        {"Host": "evil"},
        {"authorization": "Bearer x"},
        {"X-Client-Timeout": 1},
        {"Epistula-Signed-By": "5F..."},
        {"TASK": "a"},
        {"bad name": "x"},
    ],
)
def test_unsafe_fields_are_left_out(body: dict[str, Any]) -> None:
    assert routing_headers(body) == {}


def test_header_values() -> None:
    assert header_value(True) == "true"
    assert header_value(3) == "3"
    assert header_value(0.1) == "0.1"
    assert header_value({"a": "b"}) is None  # nested values are not sent as headers
    assert header_value(["x"]) is None
    assert header_value(b"bytes") is None


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(
    body=st.dictionaries(st.text(max_size=70) | st.sampled_from(["task", "seed", "Content-Length", "host"]),
                         json_values, max_size=40),
    timeout=st.none() | st.floats(min_value=0.001, max_value=1e6),
)
def test_routing_headers_are_always_single_bounded_lines_httpx_can_send(
    body: dict[str, Any], timeout: float | None
) -> None:
    headers = routing_headers(body, client_timeout_s=timeout)
    assert set(headers) <= {*ROUTED_FIELDS, "X-Client-Timeout"}
    for name, value in headers.items():
        assert name.lower() not in {"content-length", "host", "transfer-encoding", "content-type"}
        assert not re.search(r"[\x00-\x1f\x7f]", value)
        assert len(value) <= MAX_HEADER_VALUE
        value.encode("ascii")
    request = httpx.Request("POST", "http://miner/", headers=headers, content=b"{}")
    assert request.headers["content-length"] == "2"
    h11.Connection(h11.CLIENT).send(h11.Request(method="POST", target="/", headers=[
        ("Host", "miner"), ("Content-Length", "2"), *headers.items()]))
