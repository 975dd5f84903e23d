"""The predecessor's keys file: JSON, `{"<key>": {"rate_limit": N, "usage": N}}`, keys in clear text."""

from __future__ import annotations

import json
from typing import Any

from actors.keystore.records import INT64_MAX, RATE_LIMIT_MAX, LegacyKey, display_prefix


class LegacyFormatError(ValueError):
    """The file is not in the predecessor's format; the message names the entry (by prefix only)."""


def _count(where: str, name: str, value: Any, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0 or (high is not None and value > high):
        bound = f" at most {high}" if high is not None else ""
        raise LegacyFormatError(f"{where}: {name}: expected a non-negative integer{bound}, found {value!r}")
    return value


def parse_legacy_keys(text: str, source: str) -> list[LegacyKey]:
    try:
        document = json.loads(text)
    except ValueError as exc:
        raise LegacyFormatError(f"{source}: not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise LegacyFormatError(f'{source}: expected an object {{"<key>": {{"rate_limit": N, "usage": N}}}}')
    entries = []
    for number, (key, fields) in enumerate(document.items(), start=1):
        where = f"{source}: entry {number} ({display_prefix(key)}...)"
        if not key.strip() or key != key.strip():
            raise LegacyFormatError(f"{where}: a key must be non-empty, without surrounding spaces")
        if not isinstance(fields, dict):
            raise LegacyFormatError(f"{where}: expected an object with rate_limit and usage")
        rate_limit = _count(where, "rate_limit", fields.get("rate_limit"), RATE_LIMIT_MAX)
        usage = _count(where, "usage", fields.get("usage", 0), INT64_MAX)
        entries.append(LegacyKey(key, rate_limit, usage))
    return entries
