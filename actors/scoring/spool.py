"""The durable scoring spool: payloads not delivered yet wait on disk until a validator answers 200.

Layout of the spool folder (mode 0700; every file in it 0600, since payloads hold users' prompts):

    00000000000000000001.seg ...  append-only segment files, one record per line, oldest first
    cursor                        where the first undelivered record is: {"segment", "offset", "index"}

A record is one line, `b"%08x @<unix seconds> " % crc32(...) + payload + b"\\n"`, the checksum covering
everything after its space; the time is when the organic was made, so records older than `max_age_s`
leave the spool (skipped when read, whole segments deleted when found at open; counted as expired).
Lines without the `@` time (older spools) are read too, aged by their segment's modification time.
Payloads are compact JSON, which never holds a raw newline, so a torn or corrupt record is caught by
its checksum, skipped and counted, and the next line reads normally. Appends are written in batches
with one fsync each. After a restart the spool never appends to an old segment (its last line may be
torn); it starts a new one.

Bounded: when the segments together would exceed `max_bytes`, the oldest segments are deleted and the
undelivered records in them are counted as dropped.

At least once: a record leaves the spool only when the cursor moves past it, and the forwarder moves
the cursor over a replayed record only after it got a 200 or was appended again at the tail (durably,
in the same call, before the cursor write), or, when the disk refuses that append, once the forwarder
holds it in memory (its shutdown flush writes it back). Records after the last one taken stay where
they are, so a probe that fails moves and appends nothing. The cursor is written atomically (temporary
file, fsync, rename), so a crash leaves the old cursor or the new one. Duplicates come only from a crash
between a 200 and the cursor write that follows it: that batch is sent again on the next start. An
unreadable cursor file is treated as "nothing delivered yet" (everything is sent again, nothing lost).

A failing disk (ENOSPC, EIO, EACCES, ... on open, write, fsync, unlink or the cursor write) raises
`SpoolError` and leaves the spool consistent and usable: the records of a failed append are not
counted as stored (`SpoolError.done` says how many from the front were), the segment's torn tail is
truncated away and the next append writes at the same offset, reusing the same segment file (no new
file per retry); a cursor that could not be written stays moved in memory (nothing is read twice) and
is written by the next `commit` or `sync`; a segment that could not be deleted is deleted later.
If even the truncation fails, the bytes past the last good record stay in the file until they are
overwritten; only a restart before that reads them (at most once more, as records or as corrupt ones).

The class blocks on file I/O: call its methods from a worker thread. A lock makes each call atomic, so
the writer and the replayer may use it from different threads; the counters may be read at any time.
File operations go through `SpoolFiles`, which tests replace to make them fail.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from wire.files import atomic_write_bytes, fsync_dir

log = logging.getLogger("sn1_gateway.spool")

SEGMENT_SUFFIX = ".seg"
CURSOR_NAME = "cursor"
FOLDER_MODE = 0o700
FILE_MODE = 0o600
_READ_CHUNK = 1 << 20


class SpoolError(Exception):
    """A spool operation failed on the disk. The spool stays consistent; the call may be retried.

    `done`: of the payloads given to `append` (or requeued by `commit`), how many from the front were
    durably stored (or dropped as too large): retry with the rest. `committed`: a `commit` whose
    cursor moved (in memory) before the failure, so it must not be repeated.
    """

    def __init__(self, action: str, cause: OSError) -> None:
        self.action = action
        self.cause = cause
        self.errno = cause.errno
        self.done = 0
        self.committed = False
        code = errno.errorcode.get(cause.errno or 0)
        reason = (cause.strerror or str(cause)) + (f" ({code})" if code else "")
        super().__init__(f"cannot {action}: {reason}")


class SpoolFiles:
    """The file operations of the spool, each a thin call to `os`; tests substitute failing ones."""

    def make_folder(self, path: Path) -> None:
        path.mkdir(mode=FOLDER_MODE, parents=True, exist_ok=True)

    def mode(self, path: Path) -> int:
        return stat.S_IMODE(path.stat().st_mode)

    def chmod(self, path: Path, mode: int) -> None:
        os.chmod(path, mode)

    def names(self, path: Path) -> list[str]:
        return os.listdir(path)

    def mtime(self, path: Path) -> float:
        return path.stat().st_mtime

    def create(self, path: Path) -> int:
        """A new segment file for writing (at explicit offsets), readable only by its owner."""
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)

    def pwrite(self, fd: int, data: bytes, offset: int) -> int:
        return os.pwrite(fd, data, offset)

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def truncate(self, fd: int, size: int) -> None:
        os.ftruncate(fd, size)

    def close(self, fd: int) -> None:
        os.close(fd)

    def open_read(self, path: Path) -> BinaryIO:
        return path.open("rb")

    def read_bytes(self, path: Path) -> bytes:
        return path.read_bytes()

    def unlink(self, path: Path) -> None:
        path.unlink(missing_ok=True)

    def write_atomic(self, path: Path, data: bytes) -> None:
        atomic_write_bytes(path, data, mode=FILE_MODE)

    def fsync_dir(self, path: Path) -> None:
        fsync_dir(path)


@dataclass(frozen=True, order=True, slots=True)
class Position:
    """A place in the spool: a byte offset in a segment. Ordered by (segment, offset)."""

    segment: int
    offset: int
    index: int = field(default=0, compare=False)  # records before `offset` in that segment


@dataclass(frozen=True, slots=True)
class SpooledRecord:
    payload: bytes
    end: Position  # just after this record
    created_at: float  # unix seconds: when the organic was made (or an upper bound of it)


@dataclass(frozen=True, slots=True)
class SpoolBatch:
    """What `read` found: the valid records, and where the reading stopped (skipped lines included)."""

    records: tuple[SpooledRecord, ...]
    end: Position


@dataclass(slots=True)
class _Segment:
    number: int
    size: int
    records: int
    mtime: float  # ages the records of older spools, which carry no time of their own


def encode_record(payload: bytes, created_at: float) -> bytes:
    if b"\n" in payload:
        raise ValueError("a spooled payload must not contain a newline")
    body = b"@%d " % int(created_at) + payload
    return b"%08x " % zlib.crc32(body) + body + b"\n"


def decode_record(line: bytes) -> tuple[bytes, float | None] | None:
    """The payload of a record line and its time (None for a line of an older spool), or None when
    the line is torn or corrupt."""
    if len(line) < 10 or line[8:9] != b" " or not line.endswith(b"\n"):
        return None
    try:
        crc = int(line[:8], 16)
    except ValueError:
        return None
    body = line[9:-1]
    if zlib.crc32(body) != crc:
        return None
    if not body.startswith(b"@"):
        return body, None
    space = body.find(b" ")
    if space < 0:
        return None
    try:
        created = float(int(body[1:space]))
    except ValueError:
        return None
    return body[space + 1:], created


def _segment_name(number: int) -> str:
    return f"{number:020d}{SEGMENT_SUFFIX}"


@contextmanager
def _disk(action: str) -> Iterator[None]:
    """Turn an OSError of the block into a `SpoolError` naming what was being done."""
    try:
        yield
    except OSError as exc:
        raise SpoolError(action, exc) from exc


class Spool:
    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        max_bytes: int,
        segment_bytes: int | None = None,
        max_age_s: float | None = None,
        files: SpoolFiles | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.segment_bytes = min(max_bytes, segment_bytes if segment_bytes is not None else max(1, max_bytes // 16))
        self.max_age_s = max_age_s
        self.files = files or SpoolFiles()
        self.clock = clock
        self._lock = threading.Lock()
        self._segments: dict[int, _Segment] = {}  # by number, oldest first
        self._active: _Segment | None = None  # the segment appends go to, created by this process
        self._fd: int | None = None  # its file, open while `_active` is set
        self._folder_unsynced = False  # a segment was created and the folder not fsynced since
        self._tail_dirty = False  # the active file may hold bytes past `_active.size` (a failed write)
        self._garbage: dict[int, int] = {}  # consumed segments not deleted yet (a failed unlink): sizes
        self._cursor_dirty = False  # the cursor moved in memory and is not on disk yet
        self._next_number = 1
        self._cursor = Position(1, 0, 0)
        self._scanned_to = Position(1, 0, 0)  # skipped lines before this were already counted
        self._open = False
        # Counters, readable at any time.
        self.bytes = 0  # on disk: segments, and consumed ones not deleted yet
        self.pending = 0  # records after the cursor
        self.appended = 0
        self.consumed = 0  # records the cursor moved past (delivered, or skipped)
        self.dropped_full = 0  # undelivered records deleted to keep the size bound
        self.dropped_too_large = 0  # payloads larger than the whole spool
        self.corrupt = 0
        self.expired = 0  # records older than max_age_s, skipped or deleted
        self.cursor_resets = 0
        self.tightened = 0  # files and folders whose modes were too loose and were made private
        self.failures = 0  # operations that failed on the disk
        self.failing = False  # the last write (append, commit or sync) failed
        self.last_error: str | None = None

    @property
    def cursor(self) -> Position:
        return self._cursor

    @property
    def segments(self) -> int:
        return len(self._segments)

    @property
    def needs_sync(self) -> bool:
        """A cursor or a deletion is still to be written (a disk failure interrupted it)."""
        return self._cursor_dirty or bool(self._garbage)

    def statistics(self) -> dict[str, Any]:
        return {
            "pending": self.pending,
            "bytes": self.bytes,
            "max_bytes": self.max_bytes,
            "segments": len(self._segments),
            "appended": self.appended,
            "consumed": self.consumed,
            "dropped_full": self.dropped_full,
            "dropped_too_large": self.dropped_too_large,
            "corrupt": self.corrupt,
            "expired": self.expired,
            "cursor_resets": self.cursor_resets,
            "failing": self.failing,
            "disk_failures": self.failures,
            "disk_error": self.last_error,
            "cursor_unsynced": self._cursor_dirty,
        }

    # -- opening and closing -------------------------------------------------------------------

    def open(self) -> None:
        """Read the folder: the segments, how many records they hold, and the cursor.

        The folder is made private (0700) when it is not, and so are the files in it (0600); when
        that is impossible (another owner) it raises `SpoolError`, since others could read prompts.
        """
        with self._lock:
            self._close_locked()
            self._open_locked()

    def _open_locked(self) -> None:
        files, folder = self.files, self.directory
        with _disk(f"create the spool folder {folder}"):
            files.make_folder(folder)
        self._make_private_locked(folder, FOLDER_MODE)
        with _disk(f"list the spool folder {folder}"):
            names = files.names(folder)
        for name in names:
            if name.startswith(f".{CURSOR_NAME}.") and name.endswith(".tmp"):
                self._unlink_quietly(folder / name)  # a cursor write cut short by a crash
        numbers = sorted(int(n[: -len(SEGMENT_SUFFIX)]) for n in names
                         if n.endswith(SEGMENT_SUFFIX) and n[: -len(SEGMENT_SUFFIX)].isdigit())
        if CURSOR_NAME in names:
            self._make_private_locked(folder / CURSOR_NAME, FILE_MODE)
        cursor = self._load_cursor_locked()
        self._segments, self._garbage = {}, {}
        oldest_kept = self.clock() - self.max_age_s if self.max_age_s is not None else None
        for number in numbers:
            path = self._path(number)
            if cursor is not None and number < cursor.segment:
                self._unlink_quietly(path)  # consumed; the process stopped before deleting it
                continue
            self._make_private_locked(path, FILE_MODE)
            with _disk(f"read {path}"):
                size, records = self._count_records(path)
                mtime = files.mtime(path)
            if oldest_kept is not None and mtime < oldest_kept and self._unlink_quietly(path):
                # Every record in it is older than the segment's last write: all expired.
                skipped = cursor.index if cursor is not None and cursor.segment == number else 0
                self.expired += records - skipped
                if records - skipped:
                    log.warning("scoring spool: %d payloads older than %.0fs deleted (segment %d)",
                                records - skipped, self.max_age_s, number)
                continue
            self._segments[number] = _Segment(number, size, records, mtime)
        self._next_number = max([*numbers, cursor.segment if cursor else 0]) + 1
        self._cursor = self._normalized_locked(cursor or Position(0, 0, 0))
        self._scanned_to = self._cursor
        self._cursor_dirty = self._tail_dirty = self._folder_unsynced = False
        self.bytes = sum(s.size for s in self._segments.values())
        self.pending = sum(s.records for s in self._segments.values()) - self._cursor.index
        self._open = True

    def _make_private_locked(self, path: Path, wanted: int) -> None:
        with _disk(f"read the mode of {path}"):
            mode = self.files.mode(path)
        if mode & 0o077:
            with _disk(f"make {path} private (mode {mode:04o}, others may read the prompts in it; "
                       f"want {wanted:04o})"):
                self.files.chmod(path, wanted)
            self.tightened += 1
            log.warning("scoring spool: %s had mode %04o; set to %04o", path, mode, wanted)

    def _count_records(self, path: Path) -> tuple[int, int]:
        """Size and number of lines of a segment; a torn last line counts as one."""
        size = records = 0
        last = b"\n"
        with self.files.open_read(path) as f:
            while chunk := f.read(_READ_CHUNK):
                size += len(chunk)
                records += chunk.count(b"\n")
                last = chunk[-1:]
        if last != b"\n":
            records += 1
        return size, records

    def close(self) -> None:
        with self._lock:
            self._close_locked()

    def _close_locked(self) -> None:
        self._close_active_locked()
        self._open = False

    def _close_active_locked(self) -> None:
        fd, active = self._fd, self._active
        self._fd = self._active = None
        if fd is None:
            return
        if self._tail_dirty and active is not None:
            try:
                self.files.truncate(fd, active.size)  # the bytes of a failed write, if it can be done now
            except OSError as exc:
                log.warning("scoring spool: cannot cut the torn tail of segment %d (%s)", active.number, exc)
        self._tail_dirty = False
        try:
            self.files.close(fd)
        except OSError as exc:  # the descriptor is released all the same
            log.warning("scoring spool: closing a segment failed (%s)", exc)

    def _load_cursor_locked(self) -> Position | None:
        path = self.directory / CURSOR_NAME
        try:
            data = json.loads(self.files.read_bytes(path))
            return Position(int(data["segment"]), int(data["offset"]), int(data["index"]))
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError) as exc:
            self.cursor_resets += 1
            log.error("the spool cursor %s is unreadable (%s); replaying the whole spool", path, exc)
            return None
        except OSError as exc:
            raise SpoolError(f"read the spool cursor {path}", exc) from exc

    def _normalized_locked(self, cursor: Position) -> Position:
        """The cursor moved onto an existing segment (or the next one to be created)."""
        if not self._segments:
            return Position(self._next_number, 0, 0)
        first = next(iter(self._segments))
        segment = self._segments.get(cursor.segment)
        if cursor.segment < first or segment is None:
            return Position(first, 0, 0)
        if cursor.offset > segment.size or cursor.index > segment.records:
            self.cursor_resets += 1
            log.error("the spool cursor points past the end of segment %d; replaying it whole", segment.number)
            return Position(segment.number, 0, 0)
        return cursor

    def _path(self, number: int) -> Path:
        return self.directory / _segment_name(number)

    def _unlink_quietly(self, path: Path) -> bool:
        """Delete a file the spool no longer needs; a failure is logged (and retried where it matters)."""
        try:
            self.files.unlink(path)
        except OSError as exc:
            log.warning("scoring spool: cannot delete %s (%s)", path, exc)
            return False
        return True

    # -- failures ------------------------------------------------------------------------------

    def _failed(self, exc: SpoolError) -> None:
        self.failures += 1
        self.failing = True
        self.last_error = str(exc)

    def _succeeded(self) -> None:
        self.failing = False

    # -- writing -------------------------------------------------------------------------------

    def append(self, payloads: Sequence[bytes], created: Sequence[float] | None = None) -> int:
        """Append records durably (one fsync per segment written); return how many were stored.

        `created`: each payload's time (unix seconds; default now). A `SpoolError` says in `done` how
        many from the front were stored (or dropped as too large) before the disk failed.
        """
        with self._lock:
            try:
                stored = self._append_locked(payloads, created)
            except SpoolError as exc:
                self._failed(exc)
                raise
            self._succeeded()
            return stored

    def _append_locked(self, payloads: Sequence[bytes], created: Sequence[float] | None) -> int:
        if not self._open:
            raise RuntimeError("the spool is not open")
        now = self.clock()
        times = created if created is not None else [now] * len(payloads)
        lines = [encode_record(p, t) for p, t in zip(payloads, times, strict=True)]
        too_large = [i for i, line in enumerate(lines) if len(line) > self.max_bytes]
        kept = [(i, line) for i, line in enumerate(lines) if len(line) <= self.max_bytes]
        written = 0  # of `kept`, how many are durably on disk
        try:
            while written < len(kept):
                part = self._next_part_locked(kept, written)
                self._write_part_locked([line for _, line in kept[written:written + part]])
                written += part
        except SpoolError as exc:
            exc.done = kept[written][0]
            self._count_too_large([i for i in too_large if i < exc.done], lines)
            raise
        self._count_too_large(too_large, lines)
        return written

    def _count_too_large(self, indexes: list[int], lines: list[bytes]) -> None:
        for i in indexes:
            self.dropped_too_large += 1
            log.error("a scoring payload of %d bytes is larger than the whole spool; dropped", len(lines[i]))

    def _next_part_locked(self, kept: list[tuple[int, bytes]], start: int) -> int:
        """Make the segment the next lines go to (a new one when the active one is full) and room
        for them; how many of `kept[start:]` go into it."""
        first = len(kept[start][1])
        active = self._active
        if active is None or (active.size > 0 and active.size + first > self.segment_bytes):
            self._new_segment_locked()
            active = self._active
            assert active is not None
        room = max(self.segment_bytes - active.size, first)
        count = size = 0
        for _, line in kept[start:]:
            if count and size + len(line) > room:
                break
            count += 1
            size += len(line)
        self._make_room_locked(size)
        return count

    def _new_segment_locked(self) -> None:
        """Close the active segment and create the next one. When creating it fails nothing changed:
        the retry creates the same file."""
        self._close_active_locked()
        number = self._next_number
        path = self._path(number)
        with _disk(f"create {path}"):
            fd = self.files.create(path)
        self._next_number += 1
        self._fd = fd
        self._active = self._segments[number] = _Segment(number, 0, 0, self.clock())
        self._folder_unsynced = True

    def _write_part_locked(self, lines: list[bytes]) -> None:
        """Write lines at the end of the active segment and fsync. On failure the sizes stay as
        they were and the torn tail is truncated away, so a retry writes at the same offset."""
        active, fd = self._active, self._fd
        assert active is not None and fd is not None
        path = self._path(active.number)
        if self._folder_unsynced:
            with _disk(f"fsync the spool folder {self.directory}"):
                self.files.fsync_dir(self.directory)
            self._folder_unsynced = False
        data = b"".join(lines)
        try:
            with _disk(f"write {path}"):
                written = 0
                while written < len(data):  # a short write goes on where it stopped
                    written += self.files.pwrite(fd, data[written:] if written else data, active.size + written)
            with _disk(f"fsync {path}"):
                self.files.fsync(fd)
            if self._tail_dirty:  # an earlier failure left bytes past the end: cut them now
                with _disk(f"truncate {path}"):
                    self.files.truncate(fd, active.size + len(data))
                self._tail_dirty = False
        except SpoolError:
            try:
                self.files.truncate(fd, active.size)
            except OSError:
                self._tail_dirty = True
            raise
        active.size += len(data)
        active.records += len(lines)
        active.mtime = self.clock()
        self.bytes += len(data)
        self.pending += len(lines)
        self.appended += len(lines)

    def _make_room_locked(self, size: int) -> None:
        """Delete the oldest segments (never the active one) until `size` more bytes fit."""
        if self.bytes + size > self.max_bytes and self._garbage:
            self._delete_garbage_locked(quiet=True)
        while self.bytes + size > self.max_bytes:
            oldest = next(iter(self._segments.values()))
            if oldest is self._active:
                return
            with _disk(f"delete {self._path(oldest.number)} to make room"):
                self.files.unlink(self._path(oldest.number))
            # The cursor sits on the oldest segment (those before it are deleted as it moves on).
            undelivered = oldest.records - self._cursor.index if self._cursor.segment == oldest.number else 0
            if self._cursor.segment <= oldest.number:
                following = [n for n in self._segments if n > oldest.number]
                self._cursor = Position(following[0], 0, 0)
                self._cursor_dirty = True
            del self._segments[oldest.number]
            self.bytes -= oldest.size
            self.pending -= undelivered
            self.dropped_full += undelivered
            log.warning("scoring spool full: dropped %d undelivered payloads (segment %d)",
                        undelivered, oldest.number)

    def _delete_garbage_locked(self, *, quiet: bool = False) -> None:
        """Delete consumed segments whose deletion failed before; `quiet`: leave the failing ones."""
        for number, size in list(self._garbage.items()):
            try:
                with _disk(f"delete the delivered segment {self._path(number)}"):
                    self.files.unlink(self._path(number))
            except SpoolError:
                if quiet:
                    continue
                raise
            del self._garbage[number]
            self.bytes -= size

    # -- reading and consuming -----------------------------------------------------------------

    def read(self, limit: int, max_bytes: int | None = None) -> SpoolBatch:
        """Up to `limit` valid records from the cursor on, oldest first; corrupt and expired ones are
        skipped and counted. `max_bytes` bounds the payloads' total (the reader holds them in memory),
        but the first record is always read, whatever its size."""
        with self._lock:
            if not self._open:
                raise RuntimeError("the spool is not open")
            records: list[SpooledRecord] = []
            pos = self._cursor
            oldest_kept = self.clock() - self.max_age_s if self.max_age_s is not None else None
            room = max_bytes
            while len(records) < limit:
                segment = self._segments.get(pos.segment)
                if segment is None:
                    break
                if pos.offset >= segment.size:
                    following = [n for n in self._segments if n > pos.segment]
                    if not following:
                        break
                    pos = Position(following[0], 0, 0)
                    continue
                pos, room, full = self._read_segment_locked(segment, pos, limit - len(records), records,
                                                            oldest_kept, room)
                if full:
                    break
            return SpoolBatch(tuple(records), pos)

    def _read_segment_locked(self, segment: _Segment, pos: Position, limit: int, into: list[SpooledRecord],
                             oldest_kept: float | None, room: int | None) -> tuple[Position, int | None, bool]:
        """Records of one segment from `pos` on, into `into`; where the reading stopped, the bytes left
        of `room`, and whether a record did not fit in it (it is left for the next read)."""
        path = self._path(segment.number)
        try:
            f = self.files.open_read(path)
        except FileNotFoundError:
            lost = segment.records - pos.index
            self._count_skipped_locked(Position(segment.number, segment.size, segment.records), lost, "corrupt")
            log.error("scoring spool segment %d vanished; %d records lost", segment.number, lost)
            return Position(segment.number, segment.size, segment.records), room, False
        except OSError as exc:
            raise SpoolError(f"open {path} for reading", exc) from exc
        with f, _disk(f"read {path}"):
            f.seek(pos.offset)
            taken = 0
            while taken < limit and pos.offset < segment.size:
                line = f.readline(segment.size - pos.offset)
                if not line:  # the file is shorter than written: count the rest as corrupt
                    end = Position(segment.number, segment.size, segment.records)
                    self._count_skipped_locked(end, max(1, segment.records - pos.index), "corrupt")
                    return end, room, False
                before, pos = pos, Position(segment.number, pos.offset + len(line), pos.index + 1)
                decoded = decode_record(line)
                if decoded is None:
                    self._count_skipped_locked(pos, 1, "corrupt")
                    continue
                payload, created = decoded
                created_at = created if created is not None else segment.mtime
                if oldest_kept is not None and created_at < oldest_kept:
                    self._count_skipped_locked(pos, 1, "expired")
                    continue
                if room is not None:
                    if into and len(payload) > room:
                        return before, room, True
                    room -= len(payload)
                into.append(SpooledRecord(payload, pos, created_at))
                taken += 1
            return pos, room, False

    def _count_skipped_locked(self, end: Position, count: int, why: str) -> None:
        if end > self._scanned_to:
            self._scanned_to = end
            if why == "expired":
                self.expired += count
                log.warning("scoring spool: skipped %d payload(s) older than %.0fs", count, self.max_age_s)
            else:
                self.corrupt += count
                log.warning("skipped %d corrupt record(s) in the scoring spool", count)

    def commit(self, through: Position, requeue: Sequence[bytes] = (),
               created: Sequence[float] | None = None) -> None:
        """Append `requeue` at the tail (durably), then move the cursor to `through` and persist it.

        Segments the cursor has left behind are deleted. On a `SpoolError` with `committed` false,
        nothing moved and the first `done` of `requeue` are stored: call again with the rest. With
        `committed` true the cursor moved and only its write (or a deletion) is left for `sync`.
        """
        with self._lock:
            try:
                if requeue:
                    self._append_locked(requeue, created)
            except SpoolError as exc:
                self._failed(exc)
                raise
            if through > self._cursor and through.segment in self._segments:
                self._consume_locked(through)
                # Step over segments that are read to their end, so they can be deleted.
                while True:
                    segment = self._segments[self._cursor.segment]
                    following = [n for n in self._segments if n > segment.number]
                    if segment is self._active or self._cursor.offset < segment.size or not following:
                        break
                    self._cursor = Position(following[0], 0, 0)
                self._cursor_dirty = True
            try:
                self._sync_locked()
            except SpoolError as exc:
                exc.committed = True
                self._failed(exc)
                raise
            self._succeeded()

    def sync(self) -> None:
        """Write what a failure left unwritten: the cursor, the deletion of delivered segments."""
        with self._lock:
            try:
                self._sync_locked()
            except SpoolError as exc:
                self._failed(exc)
                raise
            self._succeeded()

    def _sync_locked(self) -> None:
        if self._cursor_dirty:
            cursor = self._cursor
            path = self.directory / CURSOR_NAME
            with _disk(f"write the spool cursor {path}"):
                self.files.write_atomic(path, json.dumps(
                    {"segment": cursor.segment, "offset": cursor.offset, "index": cursor.index}).encode())
            self._cursor_dirty = False
        for number in [n for n in self._segments if n < self._cursor.segment]:
            self._garbage[number] = self._segments.pop(number).size
        if self._garbage:
            self._delete_garbage_locked()

    def _consume_locked(self, through: Position) -> None:
        cursor = self._cursor
        if through.segment == cursor.segment:
            consumed = through.index - cursor.index
        else:
            consumed = self._segments[cursor.segment].records - cursor.index + through.index
            consumed += sum(s.records for n, s in self._segments.items() if cursor.segment < n < through.segment)
        self._cursor = through
        self.pending -= consumed
        self.consumed += consumed
