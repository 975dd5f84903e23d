"""Random identifiers: UUID version 4 (RFC 9562) from `os.urandom`, written out directly.

A request makes several (its id, its completion's id, one Epistula nonce per miner and validator
asked); `uuid.uuid4()` builds a `uuid.UUID` each time, whose checks and integer arithmetic cost three
times the randomness. The same 122 random bits and the same text, tested against `uuid.UUID`."""

from __future__ import annotations

import os


def _uuid4_bytes() -> bytes:
    raw = bytearray(os.urandom(16))
    raw[6] = (raw[6] & 0x0F) | 0x40  # version 4
    raw[8] = (raw[8] & 0x3F) | 0x80  # the RFC variant
    return bytes(raw)


def uuid4_hex() -> str:
    """As `uuid.uuid4().hex`: 32 lower-case hex digits."""
    return _uuid4_bytes().hex()


def uuid4_text() -> str:
    """As `str(uuid.uuid4())`: 8-4-4-4-12 lower-case hex digits."""
    h = _uuid4_bytes().hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
