"""The durable scoring spool: payloads not delivered yet wait on disk until a validator answers 200.

Layout of the spool folder:

    00000000000000000001.seg ...  append-only segment files, one record per line, oldest first
    cursor                        where the first undelivered record is: {"segment", "offset", "index"}

A record is one line, `b"%08x " % crc32(payload) + payload + b"\\n"`. Payloads are compact JSON, which never
holds a raw newline, so a torn or corrupt record is caught by its checksum, skipped and counted, and the
next line reads normally. Appends are written in batches with one fsync per batch. After a restart the
spool never appends to an old segment (its last line may be torn); it starts a new one.

Bounded: when the segments together would exceed `max_bytes`, the oldest segments are deleted and the
undelivered records in them are counted as dropped.

At least once: a record leaves the spool only when the cursor moves past it, and the forwarder moves
the cursor over a replayed batch only after each record of it got a 200 or was appended again at the
tail (durably, in the same call, before the cursor write). The cursor is written atomically (temporary
file, fsync, rename), so a crash leaves the old cursor or the new one. Duplicates come only from a crash
between a 200 and the cursor write that follows it: that batch is sent again on the next start. An
unreadable cursor file is treated as "nothing delivered yet" (everything is sent again, nothing lost).

The class blocks on file I/O: call its methods from a worker thread. A lock makes each call atomic, so
the writer and the replayer may use it from different threads; the counters may be read at any time.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from engine.files import atomic_write_bytes, fsync_dir

log = logging.getLogger("sn1_gateway.spool")

SEGMENT_SUFFIX = ".seg"
CURSOR_NAME = "cursor"
_READ_CHUNK = 1 << 20


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


@dataclass(frozen=True, slots=True)
class SpoolBatch:
    """What `read` found: the valid records, and where the reading stopped (corrupt lines included)."""

    records: tuple[SpooledRecord, ...]
    end: Position


@dataclass(slots=True)
class _Segment:
    number: int
    size: int
    records: int


def encode_record(payload: bytes) -> bytes:
    if b"\n" in payload:
        raise ValueError("a spooled payload must not contain a newline")
    return b"%08x " % zlib.crc32(payload) + payload + b"\n"


def decode_record(line: bytes) -> bytes | None:
    """The payload of a record line, or None when it is torn or corrupt."""
    if len(line) < 10 or line[8:9] != b" " or not line.endswith(b"\n"):
        return None
    try:
        crc = int(line[:8], 16)
    except ValueError:
        return None
    payload = line[9:-1]
    return payload if zlib.crc32(payload) == crc else None


def _count_records(path: Path) -> tuple[int, int]:
    """Size and number of lines of a segment; a torn last line counts as one."""
    size = records = 0
    last = b"\n"
    with path.open("rb") as f:
        while chunk := f.read(_READ_CHUNK):
            size += len(chunk)
            records += chunk.count(b"\n")
            last = chunk[-1:]
    if last != b"\n":
        records += 1
    return size, records


class Spool:
    def __init__(self, directory: str | os.PathLike[str], *, max_bytes: int, segment_bytes: int | None = None
                 ) -> None:
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.segment_bytes = min(max_bytes, segment_bytes if segment_bytes is not None else max(1, max_bytes // 16))
        self._lock = threading.Lock()
        self._segments: dict[int, _Segment] = {}  # by number, oldest first
        self._active: _Segment | None = None  # the segment appends go to, opened by this process
        self._active_file: BinaryIO | None = None
        self._next_number = 1
        self._cursor = Position(1, 0, 0)
        self._scanned_to = Position(1, 0, 0)  # corrupt lines before this were already counted
        self._open = False
        # Counters, readable at any time.
        self.bytes = 0
        self.pending = 0  # records after the cursor
        self.appended = 0
        self.consumed = 0  # records the cursor moved past (delivered, or corrupt and skipped)
        self.dropped_full = 0  # undelivered records deleted to keep the size bound
        self.dropped_too_large = 0  # payloads larger than the whole spool
        self.corrupt = 0
        self.cursor_resets = 0

    @property
    def cursor(self) -> Position:
        return self._cursor

    @property
    def segments(self) -> int:
        return len(self._segments)

    def statistics(self) -> dict[str, int]:
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
            "cursor_resets": self.cursor_resets,
        }

    # -- opening and closing -------------------------------------------------------------------

    def open(self) -> None:
        """Read the folder: the segments, how many records they hold, and the cursor."""
        with self._lock:
            self._close_locked()
            self.directory.mkdir(parents=True, exist_ok=True)
            for stray in self.directory.glob(f".{CURSOR_NAME}.*.tmp"):
                stray.unlink(missing_ok=True)
            numbers = sorted(
                int(p.name[: -len(SEGMENT_SUFFIX)])
                for p in self.directory.glob(f"*{SEGMENT_SUFFIX}")
                if p.name[: -len(SEGMENT_SUFFIX)].isdigit()
            )
            cursor = self._load_cursor_locked()
            self._segments = {}
            for number in numbers:
                path = self._path(number)
                if cursor is not None and number < cursor.segment:
                    path.unlink(missing_ok=True)  # consumed; the process stopped before deleting it
                    continue
                size, records = _count_records(path)
                self._segments[number] = _Segment(number, size, records)
            self._next_number = max([*numbers, cursor.segment if cursor else 0]) + 1
            self._cursor = self._normalized_locked(cursor or Position(0, 0, 0))
            self._scanned_to = self._cursor
            self.bytes = sum(s.size for s in self._segments.values())
            self.pending = sum(s.records for s in self._segments.values()) - self._cursor.index
            self._open = True

    def close(self) -> None:
        with self._lock:
            self._close_locked()

    def _close_locked(self) -> None:
        if self._active_file is not None:
            self._active_file.close()
        self._active_file = None
        self._active = None
        self._open = False

    def _load_cursor_locked(self) -> Position | None:
        path = self.directory / CURSOR_NAME
        try:
            data = json.loads(path.read_bytes())
            return Position(int(data["segment"]), int(data["offset"]), int(data["index"]))
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError) as exc:
            self.cursor_resets += 1
            log.error("the spool cursor %s is unreadable (%s); replaying the whole spool", path, exc)
            return None

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
        return self.directory / f"{number:020d}{SEGMENT_SUFFIX}"

    # -- writing -------------------------------------------------------------------------------

    def append(self, payloads: Sequence[bytes]) -> int:
        """Append records durably (one fsync for the batch); return how many were stored."""
        with self._lock:
            return self._append_locked(payloads)

    def _append_locked(self, payloads: Sequence[bytes]) -> int:
        if not self._open:
            raise RuntimeError("the spool is not open")
        lines = [encode_record(p) for p in payloads]
        stored = 0
        created = False
        try:
            for line in lines:
                if len(line) > self.max_bytes:
                    self.dropped_too_large += 1
                    log.error("a scoring payload of %d bytes is larger than the whole spool; dropped", len(line))
                    continue
                created |= self._make_active_locked(len(line))
                self._make_room_locked(len(line))
                assert self._active is not None and self._active_file is not None
                self._active_file.write(line)
                self._active.size += len(line)
                self._active.records += 1
                self.bytes += len(line)
                stored += 1
            if self._active_file is not None and stored:
                self._active_file.flush()
                os.fsync(self._active_file.fileno())
            if created:
                fsync_dir(self.directory)
        except OSError:
            # The tail of the active segment is unknown now: re-read its size and start a new one.
            if self._active is not None:
                real = self._path(self._active.number).stat().st_size
                self.bytes += real - self._active.size
                self._active.size = real
            self._close_file_locked()
            raise
        finally:
            self.pending += stored  # visible to readers of the counters once durable (or failed)
        self.appended += stored
        return stored

    def _make_active_locked(self, size: int) -> bool:
        """Open a new segment when there is none or the line does not fit; True when one was created."""
        active = self._active
        if active is not None and (active.size == 0 or active.size + size <= self.segment_bytes):
            return False
        if self._active_file is not None:
            self._active_file.flush()
            os.fsync(self._active_file.fileno())
        self._close_file_locked()
        number = self._next_number
        self._next_number += 1
        self._active_file = self._path(number).open("ab")
        self._active = self._segments[number] = _Segment(number, 0, 0)
        return True

    def _close_file_locked(self) -> None:
        if self._active_file is not None:
            self._active_file.close()
        self._active_file = None
        self._active = None

    def _make_room_locked(self, size: int) -> None:
        """Delete the oldest segments (never the active one) until `size` more bytes fit."""
        while self.bytes + size > self.max_bytes:
            oldest = next(iter(self._segments.values()))
            if oldest is self._active:
                return
            # The cursor sits on the oldest segment (those before it are deleted as it moves on).
            undelivered = oldest.records - self._cursor.index if self._cursor.segment == oldest.number else 0
            if self._cursor.segment <= oldest.number:
                following = [n for n in self._segments if n > oldest.number]
                self._cursor = Position(following[0], 0, 0)
            del self._segments[oldest.number]
            self._path(oldest.number).unlink(missing_ok=True)
            self.bytes -= oldest.size
            self.pending -= undelivered
            self.dropped_full += undelivered
            log.warning("scoring spool full: dropped %d undelivered payloads (segment %d)",
                        undelivered, oldest.number)

    # -- reading and consuming -----------------------------------------------------------------

    def read(self, limit: int) -> SpoolBatch:
        """Up to `limit` valid records from the cursor on, oldest first; corrupt ones are skipped and counted."""
        with self._lock:
            if not self._open:
                raise RuntimeError("the spool is not open")
            records: list[SpooledRecord] = []
            pos = self._cursor
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
                pos = self._read_segment_locked(segment, pos, limit - len(records), records)
            return SpoolBatch(tuple(records), pos)

    def _read_segment_locked(self, segment: _Segment, pos: Position, limit: int,
                             into: list[SpooledRecord]) -> Position:
        try:
            f = self._path(segment.number).open("rb")
        except FileNotFoundError:
            lost = segment.records - pos.index
            self._count_corrupt_locked(Position(segment.number, segment.size, segment.records), lost)
            log.error("scoring spool segment %d vanished; %d records lost", segment.number, lost)
            return Position(segment.number, segment.size, segment.records)
        with f:
            f.seek(pos.offset)
            taken = 0
            while taken < limit and pos.offset < segment.size:
                line = f.readline(segment.size - pos.offset)
                if not line:  # the file is shorter than written: count the rest as corrupt
                    end = Position(segment.number, segment.size, segment.records)
                    self._count_corrupt_locked(end, max(1, segment.records - pos.index))
                    return end
                pos = Position(segment.number, pos.offset + len(line), pos.index + 1)
                payload = decode_record(line)
                if payload is None:
                    self._count_corrupt_locked(pos, 1)
                    continue
                into.append(SpooledRecord(payload, pos))
                taken += 1
            return pos

    def _count_corrupt_locked(self, end: Position, count: int) -> None:
        if end > self._scanned_to:
            self._scanned_to = end
            self.corrupt += count
            log.warning("skipped %d corrupt record(s) in the scoring spool", count)

    def commit(self, through: Position, requeue: Sequence[bytes] = ()) -> None:
        """Append `requeue` at the tail (durably), then move the cursor to `through` and persist it.

        Segments the cursor has left behind are deleted.
        """
        with self._lock:
            if requeue:
                self._append_locked(requeue)
            if through <= self._cursor or through.segment not in self._segments:
                return
            self._consume_locked(through)
            # Step over segments that are read to their end, so they can be deleted.
            while True:
                segment = self._segments[self._cursor.segment]
                following = [n for n in self._segments if n > segment.number]
                if segment is self._active or self._cursor.offset < segment.size or not following:
                    break
                self._cursor = Position(following[0], 0, 0)
            atomic_write_bytes(
                self.directory / CURSOR_NAME,
                json.dumps({"segment": self._cursor.segment, "offset": self._cursor.offset,
                            "index": self._cursor.index}).encode(),
            )
            for number in [n for n in self._segments if n < self._cursor.segment]:
                gone = self._segments.pop(number)
                self.bytes -= gone.size
                self._path(number).unlink(missing_ok=True)

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
