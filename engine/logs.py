"""Logging set-up: one handler on standard error, in the format and at the level of `[log]`.

Configured by the command line: once with the defaults when it starts, again from the settings when
`serve` has read them (nothing here reads settings at import). Every record gets `request_id`, the id
of the request being handled where it was emitted (`web.telemetry`), or None; the text format shows it
in brackets, the JSON format as a field, and an access line's fields (`extra={"access": {...}}`)
become fields of its JSON object.
"""

from __future__ import annotations

import json
import logging
import sys
import traceback
from datetime import UTC, datetime
from typing import IO, Any

from config.settings import LogSettings
from web.telemetry import current_request_id

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
# Loggers that say one line per devnet server start or per outbound request: quiet unless debugging
# with -v (a `[log] level = "debug"` still keeps them at warnings).
NOISY = ("sn1_gateway.devnet.http", "httpx", "httpcore")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s%(request_tag)s: %(message)s"
_HANDLER_MARK = "sn1_gateway_handler"


class RequestIdFilter(logging.Filter):
    """Puts the current request's id on each record (`request_id`, and `request_tag` for the text
    format); a record that already carries one keeps it."""

    def filter(self, record: logging.LogRecord) -> bool:
        request_id = getattr(record, "request_id", None) or current_request_id()
        record.request_id = request_id
        record.request_tag = f" [{request_id}]" if request_id else ""
        return True


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, request_id, an access
    line's fields, and the exception's traceback as text."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace(
                "+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", None),
        }
        access = getattr(record, "access", None)
        if isinstance(access, dict):
            entry.update({k: v for k, v in access.items() if k not in entry})
        if record.exc_info:
            entry["exception"] = "".join(traceback.format_exception(*record.exc_info)).rstrip()
        elif record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = record.stack_info
        return json.dumps(entry, ensure_ascii=False, default=str)


def configure(settings: LogSettings, *, verbose: bool = False, stream: IO[str] | None = None,
              force: bool = False) -> logging.Handler | None:
    """Replace the handler a previous call installed with one for `settings` (`verbose`: debug, noisy
    loggers included); returns it. Like `logging.basicConfig`, this leaves alone a process whose
    logging someone else set up (an embedder, a test runner) and returns None, unless `force`: such
    handlers get request ids by adding `RequestIdFilter`."""
    for name in NOISY:
        logging.getLogger(name).setLevel(logging.NOTSET if verbose else logging.WARNING)
    root = logging.getLogger()
    ours = [h for h in root.handlers if getattr(h, _HANDLER_MARK, False)]
    if not force and len(ours) < len(root.handlers):
        return None
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter() if settings.format == "json" else TextFormatter())
    setattr(handler, _HANDLER_MARK, True)
    for old in ours:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else LEVELS[settings.level])
    return handler


def remove(handler: logging.Handler) -> None:
    """Take out a handler `configure` installed (for tests that configure logging and must leave it)."""
    logging.getLogger().removeHandler(handler)
    handler.close()
