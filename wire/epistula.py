"""Epistula request signing (gateway -> miners and validators) and verification (the devnet).

Signed message: f"{sha256_hex(body)}.{uuid}.{timestamp_ms}.{signed_for}", sr25519 over exactly the
bytes sent. See docs/protocol.md, "Epistula signing".
"""

from __future__ import annotations

import hashlib
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Container, Iterable, Mapping
from typing import Any, Protocol

from bittensor_core import Keypair

from wire.ids import uuid4_text

VERSION = "2"
MAX_AGE_MS = 8_000
MAX_FUTURE_SKEW_MS = 2_000
MAX_HEADER_VALUE = 256
_UNSAFE = re.compile(r"[\x00-\x1f\x7f]")
# The body fields also sent as plain headers of the same name: what deployed miners read (the reference
# miner routes on `task` and reads `target_results` with its underscore) and the other scalar fields
# upstream sends. An allowlist: a client's own fields never become headers (no `x-forwarded-for`,
# `api-key`, or `content_length` that a server would read as `Content-Length`).
ROUTED_FIELDS = ("task", "seed", "target_results", "timeout", "inference_mode", "json_format",
                 "test_time_inference", "mixture")


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def body_digest(body: bytes) -> str:
    """What a signature says of the body: its SHA-256, in hex."""
    return hashlib.sha256(body).hexdigest()


class Signer:
    """Signs outbound requests with the gateway's hotkey."""

    def __init__(self, keypair: Keypair, *, clock_ms: Callable[[], int] = _now_ms) -> None:
        self.keypair = keypair
        self.ss58 = keypair.ss58_address
        self._clock_ms = clock_ms

    def headers(self, body: bytes, signed_for: str, *, digest: str | None = None) -> dict[str, str]:
        """The Epistula headers for sending `body` (the exact bytes) to `signed_for`; `digest`: the
        body's `body_digest`, when the same body goes to several receivers."""
        timestamp = str(self._clock_ms())
        request_id = uuid4_text()
        message = f"{digest or body_digest(body)}.{request_id}.{timestamp}.{signed_for}"
        signature = self.keypair.sign(message.encode())
        return {
            "Epistula-Version": VERSION,
            "Epistula-Timestamp": timestamp,
            "Epistula-Uuid": request_id,
            "Epistula-Signed-By": self.ss58,
            "Epistula-Signed-For": signed_for,
            "Epistula-Request-Signature": "0x" + signature.hex(),
        }


class EpistulaError(Exception):
    """A request that fails verification; `status` is what the receiver answers."""

    status = 400
    code = "invalid_signature"


class MissingHeaders(EpistulaError):
    code = "missing_headers"


class WrongReceiver(EpistulaError):
    code = "wrong_receiver"


class UnknownSigner(EpistulaError):
    status = 401
    code = "unknown_signer"


class StaleRequest(EpistulaError):
    code = "stale"


class FutureRequest(EpistulaError):
    code = "from_the_future"


class ReplayedRequest(EpistulaError):
    code = "replayed"


class BadSignature(EpistulaError):
    code = "bad_signature"


class HeaderItems(Protocol):
    """Request headers as any framework hands them: a mapping, or werkzeug's `Headers`."""

    def items(self) -> Iterable[tuple[str, str]]: ...


class Verifier:
    """Checks inbound Epistula requests for one receiver, with replay protection inside the window."""

    def __init__(
        self,
        own_hotkey: str,
        known_signers: Container[str],
        *,
        clock_ms: Callable[[], int] = _now_ms,
        max_age_ms: int = MAX_AGE_MS,
        max_future_ms: int = MAX_FUTURE_SKEW_MS,
        max_remembered: int = 100_000,
    ) -> None:
        self.own_hotkey = own_hotkey
        self.known_signers = known_signers
        self._clock_ms = clock_ms
        self.max_age_ms = max_age_ms
        self.max_future_ms = max_future_ms
        self.max_remembered = max_remembered
        self._seen: OrderedDict[str, int] = OrderedDict()  # uuid -> timestamp, oldest first
        self._keypairs: dict[str, Keypair] = {}

    def verify(self, headers: HeaderItems, body: bytes) -> str:
        """Verify; return the signer's address or raise a specific `EpistulaError`."""
        get = {k.lower(): v for k, v in headers.items()}.get
        names = ("timestamp", "uuid", "signed-by", "signed-for", "request-signature")
        values = [get(f"epistula-{n}") for n in names]
        if any(v is None or v == "" for v in values):
            missing = [f"Epistula-{n.title()}" for n, v in zip(names, values, strict=True) if not v]
            raise MissingHeaders(f"missing headers: {', '.join(missing)}")
        timestamp_text, request_id, signed_by, signed_for, signature_text = (str(v) for v in values)
        if signed_for != self.own_hotkey:
            raise WrongReceiver(f"signed for {signed_for}, not for this receiver ({self.own_hotkey})")
        if signed_by not in self.known_signers:
            raise UnknownSigner(f"unknown signer {signed_by}")
        try:
            timestamp = int(timestamp_text)
        except ValueError:
            raise StaleRequest(f"timestamp {timestamp_text!r} is not integer milliseconds") from None
        now = self._clock_ms()
        if now - timestamp > self.max_age_ms:
            raise StaleRequest(f"timestamp is {now - timestamp} ms old (limit {self.max_age_ms} ms)")
        if timestamp - now > self.max_future_ms:
            raise FutureRequest(f"timestamp is {timestamp - now} ms in the future")
        self._forget_before(now - self.max_age_ms - self.max_future_ms)
        if request_id in self._seen:
            raise ReplayedRequest(f"uuid {request_id} was already used")
        if not signature_text.startswith("0x"):
            raise BadSignature("signature must be 0x-prefixed hex")
        try:
            signature = bytes.fromhex(signature_text[2:])
        except ValueError:
            raise BadSignature("signature is not hex") from None
        message = f"{body_digest(body)}.{request_id}.{timestamp_text}.{signed_for}"
        try:
            ok = self._keypair(signed_by).verify(message.encode(), signature)
        except Exception as exc:  # the binding raises plain errors on malformed input
            raise BadSignature(f"signature cannot be checked: {exc}") from exc
        if not ok:
            raise BadSignature("signature does not match")
        self._seen[request_id] = timestamp
        if len(self._seen) > self.max_remembered:
            self._seen.popitem(last=False)
        return signed_by

    def _keypair(self, ss58: str) -> Keypair:
        keypair = self._keypairs.get(ss58)
        if keypair is None:
            keypair = self._keypairs[ss58] = Keypair(ss58_address=ss58)
        return keypair

    def _forget_before(self, cutoff_ms: int) -> None:
        while self._seen:
            request_id, timestamp = next(iter(self._seen.items()))
            if timestamp >= cutoff_ms:
                break
            del self._seen[request_id]


def header_value(value: Any) -> str | None:
    """A scalar body field as a safe single-line header value, or None when it cannot be one."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, str):
        text = value
    elif isinstance(value, int | float):
        text = repr(value)
    else:
        return None
    # Printable ASCII only: httpx encodes header values as ASCII, so anything else would fail the send.
    # Leading or trailing blanks are not part of a header value (a receiver strips them, h11 refuses
    # them): such a value is sent stripped, and an empty one not at all.
    text = text.strip(" \t")
    if not text or _UNSAFE.search(text) or len(text) > MAX_HEADER_VALUE or not text.isascii():
        return None
    return text


def routing_headers(body: Mapping[str, Any], *, client_timeout_s: float | None = None) -> dict[str, str]:
    """Plain headers that deployed miners route on: the `ROUTED_FIELDS` the body has, as one bounded
    line each (values that cannot be one are left out), and `X-Client-Timeout`."""
    headers: dict[str, str] = {}
    for name in ROUTED_FIELDS:
        if name in body and (text := header_value(body[name])) is not None:
            headers[name] = text
    if client_timeout_s is not None:
        headers["X-Client-Timeout"] = f"{client_timeout_s:g}"
    return headers
