"""`sn1-gateway keys ...`: manage API keys in the configured store, also while gateways run.

The file store takes the same lock as a running gateway and the gateway reloads the file within a
second; with Redis every change applies to the next request everywhere.

`modify` and `delete` name a key by the key itself or its id; `-` reads either from standard input,
so that a key need not appear in the process list or the shell's history.
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path

import trio

from actors.keystore.actor import open_keystore
from actors.keystore.legacy import LegacyFormatError, parse_legacy_keys
from actors.keystore.records import (
    RATE_LIMIT_MAX,
    KeyInfo,
    KeyNotFound,
    KeyStore,
    KeyStoreError,
    iso_time,
)
from config.settings import Settings

SettingsLoader = Callable[[argparse.Namespace], Settings]
Action = Callable[[KeyStore, argparse.Namespace], Awaitable[int]]

STDIN = "-"
MAX_REF_CHARS = 4096  # a key or an id is far shorter; more on standard input is a mistake
KEY_HELP = ("the key, or its id from `keys list`; - reads it from standard input (one line; a hidden prompt "
            "on a terminal), so that it appears neither in the process list nor in the shell's history")


class NoKeyGiven(Exception):
    """`-` was given and standard input held no key."""


def read_ref(ref: str) -> str:
    """`ref` itself, or for `-` the first line of standard input (asked for without echo on a terminal)."""
    if ref != STDIN:
        return ref
    if sys.stdin is None:
        raise NoKeyGiven("no standard input to read the key from")
    if sys.stdin.isatty():
        text = getpass.getpass("API key or id: ")
    else:
        text = sys.stdin.readline(MAX_REF_CHARS + 1)
        if len(text.rstrip("\r\n")) > MAX_REF_CHARS:
            raise NoKeyGiven(f"the first line of standard input is longer than {MAX_REF_CHARS} characters")
    ref = text.strip()
    if not ref:
        raise NoKeyGiven("standard input held no key (expected the key or its id on the first line)")
    return ref


def rate_limit(text: str) -> int:
    """argparse type: an integer number of requests per minute, 0 (blocked) to RATE_LIMIT_MAX."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, not {text!r}") from None
    if not 0 <= value <= RATE_LIMIT_MAX:
        raise argparse.ArgumentTypeError(f"expected 0 to {RATE_LIMIT_MAX}, not {value}")
    return value


def describe(info: KeyInfo) -> str:
    return f"{info.prefix}... (id {info.id[:16]})"


async def create(store: KeyStore, args: argparse.Namespace) -> int:
    api_key, info = await store.create(args.rate_limit)
    print(api_key)
    print(f"created {describe(info)} with a limit of {info.rate_limit} requests/min; "
          "the key is shown only now", file=sys.stderr)
    return 0


async def list_keys(store: KeyStore, args: argparse.Namespace) -> int:
    keys = await store.list_keys()
    if args.json:
        print(json.dumps([info.as_dict() for info in keys], indent=2))
        return 0
    rows = [("ID", "PREFIX", "LIMIT/MIN", "REQUESTS", "TOKENS", "CREATED", "LAST USED")]
    rows += [
        (info.id, info.prefix, str(info.rate_limit), str(info.requests), str(info.tokens),
         iso_time(info.created_at) or "", iso_time(info.last_used_at) or "-")
        for info in keys
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    print(f"{len(keys)} key(s)", file=sys.stderr)
    return 0


async def modify(store: KeyStore, args: argparse.Namespace) -> int:
    info = await store.modify(args.key, args.rate_limit)
    print(f"updated {describe(info)}: {info.rate_limit} requests/min")
    return 0


async def delete(store: KeyStore, args: argparse.Namespace) -> int:
    info = await store.delete(args.key)
    print(f"deleted {describe(info)}")
    return 0


async def import_keys(store: KeyStore, args: argparse.Namespace) -> int:
    path = Path(args.file)
    try:
        text = await trio.Path(path).read_text(encoding="utf-8")
        entries = parse_legacy_keys(text, str(path))
    except (OSError, UnicodeDecodeError, LegacyFormatError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    report = await store.import_keys(entries)
    print(f"imported {report.added} key(s); skipped {report.skipped} already present")
    return 0


async def _run(settings: Settings, action: Action, args: argparse.Namespace) -> int:
    async with open_keystore(settings) as store:
        return await action(store, args)


def run(load: SettingsLoader, action: Action, args: argparse.Namespace) -> int:
    settings = load(args)
    if getattr(args, "key", None) is not None:
        try:
            args.key = read_ref(args.key)
        except (NoKeyGiven, OSError, UnicodeDecodeError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    try:
        return trio.run(_run, settings, action, args)
    except KeyNotFound:
        print("error: no such API key (give the key itself, or its id from `keys list`)", file=sys.stderr)
        return 1
    except KeyStoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser], load: SettingsLoader) -> None:
    """Register `keys {create,list,modify,delete,import}`; `load` reads the settings from `--config`."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="FILE", help="config file naming the key store")
    keys = sub.add_parser("keys", help="manage API keys (create, list, modify, delete, import)")
    actions = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")

    def action(name: str, func: Action, help: str, epilog: str | None = None) -> argparse.ArgumentParser:
        parser = actions.add_parser(name, parents=[common], help=help, description=help, epilog=epilog)
        parser.set_defaults(func=partial(run, load, func))
        return parser

    p = action("create", create, "create a key and print it (only this once)")
    p.add_argument("--rate-limit", type=rate_limit, required=True, metavar="N", help="requests per minute")
    p = action("list", list_keys, "list keys: id, prefix, limit and usage (never the keys)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p = action("modify", modify, "change a key's rate limit",
               "example, keeping the key off the command line: "
               "printf '%s\\n' \"$KEY\" | sn1-gateway keys modify - --rate-limit 120")
    p.add_argument("key", metavar="KEY", help=KEY_HELP)
    p.add_argument("--rate-limit", type=rate_limit, required=True, metavar="N", help="requests per minute")
    p = action("delete", delete, "revoke a key",
               "example, keeping the key off the command line: sn1-gateway keys delete - < key.txt")
    p.add_argument("key", metavar="KEY", help=KEY_HELP)
    p = action("import", import_keys, "import the predecessor's api_keys.json (existing keys are kept)")
    p.add_argument("file", metavar="FILE", help='JSON: {"<key>": {"rate_limit": N, "usage": N}}')
