"""The durable scoring spool: order, size bound, corrupt records, and what survives a kill."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from actors.spool import CURSOR_NAME, SEGMENT_SUFFIX, Spool

ROOT = Path(__file__).resolve().parent.parent


def payload(n: int, pad: int = 60) -> bytes:
    return json.dumps({"n": n, "text": "é" + "x" * pad}, separators=(",", ":"), ensure_ascii=False).encode()


def numbers(spool: Spool, limit: int = 10_000) -> list[int]:
    return [json.loads(r.payload)["n"] for r in spool.read(limit).records]


def segment_files(folder: Path) -> list[Path]:
    return sorted(folder.glob(f"*{SEGMENT_SUFFIX}"))


def disk_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in segment_files(folder))


def opened(folder: Path, **kw: int) -> Spool:
    spool = Spool(folder, max_bytes=kw.pop("max_bytes", 1 << 20), **kw)
    spool.open()
    return spool


def test_replay_is_oldest_first_across_segments_and_restarts(tmp_path: Path) -> None:
    spool = opened(tmp_path, segment_bytes=300)
    spool.append([payload(i) for i in range(5)])
    spool.append([payload(i) for i in range(5, 12)])
    spool.append([payload(12)])
    assert len(segment_files(tmp_path)) > 2
    first = spool.read(5)
    assert [json.loads(r.payload)["n"] for r in first.records] == [0, 1, 2, 3, 4]
    # Reading alone moves nothing: the same records come again until they are committed.
    assert numbers(spool, 5) == [0, 1, 2, 3, 4]
    spool.commit(first.end)
    assert spool.pending == 8
    spool.close()

    again = opened(tmp_path, segment_bytes=300)  # a restart
    assert again.pending == 8
    assert numbers(again) == list(range(5, 13))
    again.append([payload(13)])
    batch = again.read(100)
    assert [json.loads(r.payload)["n"] for r in batch.records] == list(range(5, 14))
    again.commit(batch.end)
    assert again.pending == 0
    again.close()
    # Fully delivered segments are deleted; what is left holds nothing undelivered.
    assert disk_bytes(tmp_path) <= 300
    assert numbers(opened(tmp_path, segment_bytes=300)) == []


def test_requeued_records_go_to_the_tail_in_the_same_commit(tmp_path: Path) -> None:
    spool = opened(tmp_path)
    spool.append([payload(i) for i in range(6)])
    batch = spool.read(3)
    failed = [r.payload for r in batch.records if json.loads(r.payload)["n"] == 1]
    spool.commit(batch.end, failed)
    assert spool.pending == 4
    spool.close()
    assert numbers(opened(tmp_path)) == [3, 4, 5, 1]


def test_size_bound_holds_and_drops_are_counted(tmp_path: Path) -> None:
    spool = opened(tmp_path, max_bytes=2_000, segment_bytes=500)
    rng = random.Random(7)
    n = 0
    while n < 120:
        size = rng.randint(1, 5)
        spool.append([payload(i, pad=rng.randint(20, 120)) for i in range(n, n + size)])
        n += size
        assert disk_bytes(tmp_path) <= 2_000
        assert spool.bytes == disk_bytes(tmp_path)
    assert spool.dropped_full > 0
    assert spool.dropped_full + spool.pending == n
    kept = numbers(spool)
    assert kept == list(range(n - len(kept), n)), "the newest survive, in order"
    spool.close()

    again = opened(tmp_path, max_bytes=2_000, segment_bytes=500)
    assert again.pending == len(kept)
    again.append([payload(n + i) for i in range(30)])
    assert disk_bytes(tmp_path) <= 2_000
    assert again.dropped_full > 0


def test_drops_count_only_undelivered_records(tmp_path: Path) -> None:
    spool = opened(tmp_path, max_bytes=1_000, segment_bytes=300)
    spool.append([payload(i) for i in range(4)])  # the first segment is full after these
    spool.commit(spool.read(2).end)
    spool.append([payload(i) for i in range(4, 20)])
    assert spool.dropped_full + spool.pending == 18
    assert disk_bytes(tmp_path) <= 1_000


def test_payload_larger_than_the_spool_is_dropped_and_counted(tmp_path: Path) -> None:
    spool = opened(tmp_path, max_bytes=4_096)
    assert spool.append([payload(0), payload(1, pad=5_000), payload(2)]) == 2
    assert spool.dropped_too_large == 1
    assert numbers(spool) == [0, 2]


def test_corrupt_record_is_skipped_and_counted(tmp_path: Path) -> None:
    spool = opened(tmp_path)
    spool.append([payload(i) for i in range(5)])
    spool.close()
    (segment,) = segment_files(tmp_path)
    data = bytearray(segment.read_bytes())
    third = data.index(b'"n":2')
    data[third + 4] = ord("7")  # a flipped byte inside the third record
    segment.write_bytes(bytes(data))

    again = opened(tmp_path)
    batch = again.read(10)
    assert [json.loads(r.payload)["n"] for r in batch.records] == [0, 1, 3, 4]
    assert again.corrupt == 1
    assert numbers(again) == [0, 1, 3, 4]
    assert again.corrupt == 1, "reading the same place again does not count it twice"
    again.commit(batch.end)
    assert again.pending == 0
    again.close()
    assert numbers(opened(tmp_path)) == []


def test_torn_last_record_after_a_crash_is_skipped_and_appending_goes_on(tmp_path: Path) -> None:
    spool = opened(tmp_path)
    spool.append([payload(i) for i in range(3)])
    spool.close()
    (segment,) = segment_files(tmp_path)
    data = segment.read_bytes()
    segment.write_bytes(data[: len(data) - 20])  # the last write was cut short

    again = opened(tmp_path)
    assert again.pending == 3
    again.append([payload(3)])
    assert numbers(again) == [0, 1, 3]
    assert again.corrupt == 1


def test_unreadable_cursor_replays_everything(tmp_path: Path) -> None:
    spool = opened(tmp_path)
    spool.append([payload(i) for i in range(4)])
    spool.commit(spool.read(2).end)
    spool.close()
    (tmp_path / CURSOR_NAME).write_bytes(b'{"segment": 1, "off')
    again = opened(tmp_path)
    assert again.cursor_resets == 1
    assert numbers(again) == [0, 1, 2, 3]  # at least once: sent again rather than lost


def test_interrupted_cursor_write_keeps_the_previous_cursor(tmp_path: Path) -> None:
    spool = opened(tmp_path)
    spool.append([payload(i) for i in range(4)])
    spool.commit(spool.read(1).end)
    spool.close()
    stray = tmp_path / f".{CURSOR_NAME}.abc123.tmp"
    stray.write_bytes(b'{"segment": 1, "offset": 999')  # a crash before the rename
    again = opened(tmp_path)
    assert numbers(again) == [1, 2, 3]
    assert not stray.exists()


def test_reading_an_unopened_spool_is_an_error(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=4096)
    with pytest.raises(RuntimeError):
        spool.read(1)
    with pytest.raises(RuntimeError):
        spool.append([payload(0)])


KILLED_WRITER = """
import json, sys
from actors.spool import Spool
spool = Spool(sys.argv[1], max_bytes=1 << 30, segment_bytes=2_000)
spool.open()
n = 0
while True:
    spool.append([json.dumps({"n": i}).encode() for i in range(n, n + 3)])
    n += 3
    print("A", n - 1, flush=True)
    batch = spool.read(2)
    spool.commit(batch.end)
    print("C", json.loads(batch.records[-1].payload)["n"], flush=True)
"""


@pytest.mark.parametrize("kill_after", [7, 40, 113])
def test_kill_minus_nine_loses_nothing_acknowledged(tmp_path: Path, kill_after: int) -> None:
    """A writer that appends and commits in a loop is killed at some point; reopen the spool.

    Everything acknowledged as appended and not acknowledged as committed is still there, nothing
    acknowledged as committed comes back, and the records are in order.
    """
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, str(tmp_path)],
        stdout=subprocess.PIPE, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, text=True,
    )
    assert proc.stdout is not None
    appended, committed = -1, -1
    try:
        for _ in range(kill_after):
            kind, n = proc.stdout.readline().split()
            if kind == "A":
                appended = int(n)
            else:
                committed = int(n)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    spool = opened(tmp_path)
    found = numbers(spool)
    assert found == sorted(found)
    assert set(range(committed + 1, appended + 1)) <= set(found), "nothing acknowledged is lost"
    assert not set(range(committed + 1)) & set(found), "nothing committed comes back"
