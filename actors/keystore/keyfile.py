"""The keys file: TOML, one table per key id, written atomically under an advisory lock.

Everything here blocks (file I/O, fsync, `flock`): the server calls it from a worker thread, the CLI
directly. Every writer (the server's usage flushes and admin calls, any number of CLI runs) goes through
`transact`, which holds an exclusive `flock` on `<file>.lock` while it reads the current file, applies
its change and writes the result. A writer therefore never overwrites a change it has not seen, and the
server's usage counters are added to what is on disk rather than written over it. Readers need no lock:
the file is only ever replaced by an atomic rename, so they see the old content or the new.

The file, its lock and its temporary files are 0600 and a folder made for them 0700, whatever the
umask: they hold what identifies every key.

A usage counter that does not read (beyond int64, negative, not an integer: edited by hand, or
written by an older version) does not make the file unusable: it is read as 2^63-1 or 0, reported
in the snapshot's `problems`, and written back repaired. Nothing beyond int64 is ever written.
"""

from __future__ import annotations

import fcntl
import logging
import os
import tomllib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import tomlkit

from actors.keystore.records import INT64_MAX, RATE_LIMIT_MAX, KeyInfo, KeyStoreError, is_key_id, read_counter
from wire.files import atomic_write_bytes

T = TypeVar("T")

log = logging.getLogger("sn1_gateway.keys")

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


FILE_MODE = 0o600
FOLDER_MODE = 0o700


@dataclass(frozen=True, slots=True)
class Problem:
    """A stored value read as something else than the file holds (`where`: the file and dotted key)."""

    where: str
    found: object
    problem: str


@dataclass(frozen=True, slots=True)
class Snapshot:
    keys: dict[str, KeyInfo]
    signature: Signature | None  # None: there is no file yet
    problems: tuple[Problem, ...] = ()


def lock_path(path: Path) -> Path:
    return path.with_name(path.name + ".lock")


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold the exclusive advisory lock that every writer of `path` takes."""
    try:
        make_folder(path.parent)
        fd = os.open(lock_path(path), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, FILE_MODE)
    except OSError as exc:
        raise KeyStoreError(f"{lock_path(path)}: cannot be opened: {exc}") from exc
    try:
        try:
            if os.fstat(fd).st_mode & 0o777 != FILE_MODE:  # made by an older version, or by hand
                os.fchmod(fd, FILE_MODE)
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as exc:
            raise KeyStoreError(f"{lock_path(path)}: cannot be locked: {exc}") from exc
        yield
    finally:
        os.close(fd)  # closing releases the lock


def make_folder(folder: Path) -> None:
    """Create `folder` (and its parents) 0700 whatever the umask; an existing folder is left as it is."""
    if folder.is_dir():
        return
    make_folder(folder.parent)
    try:
        folder.mkdir(mode=FOLDER_MODE)
    except FileExistsError:
        return
    os.chmod(folder, FOLDER_MODE)  # mkdir's mode is filtered by the umask


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


def _entry(source: str, key_id: str, table: Any, problems: list[Problem]) -> KeyInfo:
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
    counters = {}
    for name in _COUNTERS:
        value, problem = read_counter(table.get(name, 0))
        if problem is not None:
            problems.append(Problem(f"{where}.{name}", table.get(name), problem))
        counters[name] = value
    if not 0 <= table["rate_limit"] <= RATE_LIMIT_MAX:
        raise KeyStoreError(f"{where}.rate_limit: expected an integer from 0 to {RATE_LIMIT_MAX}, "
                            f"found {table['rate_limit']}")
    last_used = table.get("last_used_at")
    if last_used is not None and not isinstance(last_used, datetime):
        raise KeyStoreError(f"{where}.last_used_at: expected a date-time, found {last_used!r}")
    return KeyInfo(
        id=key_id,
        prefix=table["prefix"],
        rate_limit=table["rate_limit"],
        created_at=_timestamp(table["created_at"]),
        requests=counters["requests"],
        tokens=counters["tokens"],
        last_used_at=None if last_used is None else _timestamp(last_used),
    )


def parse(data: bytes, source: str, problems: list[Problem] | None = None) -> dict[str, KeyInfo]:
    """The keys in a file's bytes; anything malformed is a KeyStoreError naming the place, except
    usage counters, which are repaired and reported in `problems`."""
    if problems is None:
        problems = []
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
    return {key_id: _entry(source, key_id, table, problems) for key_id, table in keys.items()}


def _datetime(ts: float) -> str:
    return datetime.fromtimestamp(int(ts), UTC).isoformat().replace("+00:00", "Z")


def _count(value: int) -> int:
    """A counter as written: within [0, 2^63-1], which TOML (and every reader of the file) can hold."""
    return min(INT64_MAX, max(0, int(value)))


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
            f"requests = {_count(info.requests)}\n"
            f"tokens = {_count(info.tokens)}\n"
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
    problems: list[Problem] = []
    keys = parse(data, str(path), problems)
    return Snapshot(keys, (st.st_ino, st.st_mtime_ns, st.st_size), tuple(problems))


def _holds(path: Path, data: bytes) -> bool:
    try:
        with open(path, "rb") as file:
            return file.read() == data
    except OSError:
        return False


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
        data = render(keys)
        try:
            atomic_write_bytes(path, data, mode=FILE_MODE)
        except OSError as exc:
            # Failing after the rename (the folder's fsync) leaves the new file in place: reporting
            # a failure would make the caller apply its change again (usage counted twice).
            if not _holds(path, data):
                raise KeyStoreError(f"{path}: cannot be written: {exc}") from exc
            log.warning("%s: written, but not made durable (%s); a power loss could undo it", path, exc)
        return result, Snapshot(keys, signature(path), current.problems)
