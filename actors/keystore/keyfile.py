"""The keys file: TOML, one table per key id, written atomically under an advisory lock.

Everything here blocks (file I/O, fsync, `flock`): the server calls it from a worker thread, the CLI
directly. Every writer (the server's usage flushes and admin calls, any number of CLI runs) goes through
`transact`, which holds an exclusive `flock` on `<file>.lock` while it reads the current file, applies
its change and writes the result. A writer therefore never overwrites a change it has not seen, and the
server's usage counters are added to what is on disk rather than written over it. Readers need no lock:
the file is only ever replaced by an atomic rename, so they see the old content or the new.
"""

from __future__ import annotations

import fcntl
import os
import tomllib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import tomlkit

from actors.keystore.records import KeyInfo, KeyStoreError, is_key_id
from engine.files import atomic_write_bytes

T = TypeVar("T")

FORMAT_VERSION = 1
HEADER = (
    "sn1-gateway API keys. Each table is named by the sha256 of a key; the key itself is never stored.",
    "Change it with `sn1-gateway keys ...` (a running gateway picks changes up within a second);",
    "edit by hand only while no gateway runs.",
)

# (inode, mtime in ns, size): changes whenever the file is replaced.
Signature = tuple[int, int, int]

_REQUIRED: dict[str, type] = {"prefix": str, "rate_limit": int, "created_at": datetime}
_COUNTERS = ("requests", "tokens")


@dataclass(frozen=True, slots=True)
class Snapshot:
    keys: dict[str, KeyInfo]
    signature: Signature | None  # None: there is no file yet


def lock_path(path: Path) -> Path:
    return path.with_name(path.name + ".lock")


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold the exclusive advisory lock that every writer of `path` takes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path(path), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def signature(path: Path) -> Signature | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise KeyStoreError(f"{path}: cannot be read: {exc}") from exc
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def _timestamp(value: datetime) -> float:
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.timestamp()


def _entry(source: str, key_id: str, table: Any) -> KeyInfo:
    where = f"{source}: keys.{key_id}"
    if not is_key_id(key_id):
        raise KeyStoreError(f"{where}: a key id is the 64 lowercase hex digits of a sha256")
    if not isinstance(table, dict):
        raise KeyStoreError(f"{where}: expected a table")
    known = {*_REQUIRED, *_COUNTERS, "last_used_at"}
    for name in table:
        if name not in known:
            raise KeyStoreError(f"{where}.{name}: unknown field (known: {', '.join(sorted(known))})")
    for name, kind in _REQUIRED.items():
        value = table.get(name)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise KeyStoreError(f"{where}.{name}: expected {kind.__name__}, found {value!r}")
    for name in _COUNTERS:
        value = table.get(name, 0)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise KeyStoreError(f"{where}.{name}: expected a non-negative integer, found {value!r}")
    if table["rate_limit"] < 0:
        raise KeyStoreError(f"{where}.rate_limit: expected a non-negative integer, found {table['rate_limit']}")
    last_used = table.get("last_used_at")
    if last_used is not None and not isinstance(last_used, datetime):
        raise KeyStoreError(f"{where}.last_used_at: expected a date-time, found {last_used!r}")
    return KeyInfo(
        id=key_id,
        prefix=table["prefix"],
        rate_limit=table["rate_limit"],
        created_at=_timestamp(table["created_at"]),
        requests=table.get("requests", 0),
        tokens=table.get("tokens", 0),
        last_used_at=None if last_used is None else _timestamp(last_used),
    )


def parse(data: bytes, source: str) -> dict[str, KeyInfo]:
    """The keys in a file's bytes; anything malformed is a KeyStoreError naming the place."""
    try:
        document = tomllib.loads(data.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise KeyStoreError(f"{source}: not a valid keys file: {exc}") from exc
    version = document.get("version")
    if version != FORMAT_VERSION:
        raise KeyStoreError(f"{source}: version: expected {FORMAT_VERSION}, found {version!r}")
    extra = set(document) - {"version", "keys"}
    if extra:
        raise KeyStoreError(f"{source}: unknown top-level key(s): {', '.join(sorted(extra))}")
    keys = document.get("keys", {})
    if not isinstance(keys, dict):
        raise KeyStoreError(f"{source}: keys: expected a table")
    return {key_id: _entry(source, key_id, table) for key_id, table in keys.items()}


def _datetime(ts: float) -> str:
    return datetime.fromtimestamp(int(ts), UTC).isoformat().replace("+00:00", "Z")


def render(keys: dict[str, KeyInfo]) -> bytes:
    """The file's text. The header goes through tomlkit, and so does the one free-form value (the
    prefix); the per-key tables are formatted directly, as tomlkit documents cost about a millisecond
    per key and a flush rewrites them all."""
    doc = tomlkit.document()
    for line in HEADER:
        doc.add(tomlkit.comment(line))
    doc.add("version", FORMAT_VERSION)
    parts = [tomlkit.dumps(doc)]
    for key_id in sorted(keys):
        info = keys[key_id]
        parts.append(
            f"\n[keys.{key_id}]\n"
            f"prefix = {tomlkit.string(info.prefix).as_string()}\n"
            f"rate_limit = {int(info.rate_limit)}\n"
            f"created_at = {_datetime(info.created_at)}\n"
            f"requests = {int(info.requests)}\n"
            f"tokens = {int(info.tokens)}\n"
        )
        if info.last_used_at is not None:
            parts.append(f"last_used_at = {_datetime(info.last_used_at)}\n")
    return "".join(parts).encode("utf-8")


def read(path: Path) -> Snapshot:
    """The file's keys and the signature of exactly the version read; no file is an empty store."""
    try:
        with open(path, "rb") as file:
            st = os.fstat(file.fileno())
            data = file.read()
    except FileNotFoundError:
        return Snapshot({}, None)
    except OSError as exc:
        raise KeyStoreError(f"{path}: cannot be read: {exc}") from exc
    return Snapshot(parse(data, str(path)), (st.st_ino, st.st_mtime_ns, st.st_size))


def _remove_stale_temporaries(path: Path) -> None:
    """Temporary files left by a writer killed mid-write (only called under the lock)."""
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)


def transact(path: Path, change: Callable[[dict[str, KeyInfo]], T]) -> tuple[T, Snapshot]:
    """Under the lock: read the file, let `change` edit the keys in place, write the result.

    `change` may raise to abandon the transaction (nothing is written). Returns its result and the
    keys as written.
    """
    with locked(path):
        current = read(path)
        keys = dict(current.keys)
        result = change(keys)
        _remove_stale_temporaries(path)
        try:
            atomic_write_bytes(path, render(keys))
        except OSError as exc:
            raise KeyStoreError(f"{path}: cannot be written: {exc}") from exc
        return result, Snapshot(keys, signature(path))
