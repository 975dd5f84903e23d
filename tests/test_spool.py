"""The durable scoring spool: order, size bound, corrupt records, what survives a kill, privacy, age,
and a failing disk (injected failures, and a real full filesystem where one can be mounted)."""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest

from actors.scoring.spool import CURSOR_NAME, SEGMENT_SUFFIX, Spool, SpoolError
from tests.spool_faults import FailingFiles

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


def test_a_read_holds_at_most_max_bytes_of_payloads_but_always_one(tmp_path: Path) -> None:
    """What the replay reads it holds in memory until delivered: `max_bytes` bounds it, the record
    that does not fit is left for the next read, and a record larger than the bound still comes alone."""
    spool = opened(tmp_path, segment_bytes=1000)
    spool.append([payload(0, pad=900), payload(1), payload(2), payload(3, pad=700), payload(4)])
    size = len(payload(1))
    batch = spool.read(10, max_bytes=2 * size)
    assert [json.loads(r.payload)["n"] for r in batch.records] == [0], "the first always, even over the bound"
    spool.commit(batch.end)
    batch = spool.read(10, max_bytes=2 * size)
    assert [json.loads(r.payload)["n"] for r in batch.records] == [1, 2]
    spool.commit(batch.end)
    assert numbers(spool) == [3, 4], "nothing skipped by a read that stopped at the bound"
    batch = spool.read(10, max_bytes=10_000)
    assert [json.loads(r.payload)["n"] for r in batch.records] == [3, 4]
    assert [r.payload for r in spool.read(10, max_bytes=0).records] == [payload(3, pad=700)]


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
from actors.scoring.spool import Spool
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
    acknowledged as committed comes back, and the records are in order. What the writer acknowledged
    is all it printed before the kill (it runs on while the test reads), and one commit, of the two
    records after the last acknowledged one, may have been made and not yet acknowledged.
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
    for line in proc.stdout.read().splitlines():  # printed before the kill, not read yet
        kind, _, n = line.partition(" ")
        if n.isdigit():
            appended, committed = (int(n), committed) if kind == "A" else (appended, int(n))
    spool = opened(tmp_path)
    found = numbers(spool)
    assert found == sorted(found)
    unacknowledged_commit = set(range(committed + 1, committed + 3))
    assert set(range(committed + 1, appended + 1)) - unacknowledged_commit <= set(found), \
        "nothing acknowledged is lost"
    assert not set(range(committed + 1)) & set(found), "nothing committed comes back"


# -- privacy -----------------------------------------------------------------------------------


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_folder_is_0700_and_every_file_0600(tmp_path: Path) -> None:
    folder = tmp_path / "spool"
    spool = opened(folder, segment_bytes=300)
    spool.append([payload(i) for i in range(8)])  # several segments
    spool.commit(spool.read(1).end)  # a cursor
    assert mode_of(folder) == 0o700
    files = [*segment_files(folder), folder / CURSOR_NAME]
    assert len(files) > 2
    assert {p.name: mode_of(p) for p in files} == {p.name: 0o600 for p in files}


def test_a_folder_and_files_with_loose_modes_are_made_private(tmp_path: Path) -> None:
    folder = tmp_path / "spool"
    spool = opened(folder)
    spool.append([payload(0), payload(1)])
    spool.commit(spool.read(1).end)
    spool.close()
    (segment,) = segment_files(folder)
    os.chmod(folder, 0o755)
    os.chmod(segment, 0o644)
    os.chmod(folder / CURSOR_NAME, 0o666)
    again = opened(folder)
    assert again.tightened == 3
    assert (mode_of(folder), mode_of(segment), mode_of(folder / CURSOR_NAME)) == (0o700, 0o600, 0o600)
    assert numbers(again) == [1]


def test_a_loose_folder_that_cannot_be_made_private_is_refused_with_the_reason(tmp_path: Path) -> None:
    folder = tmp_path / "spool"
    folder.mkdir(mode=0o755)
    os.chmod(folder, 0o755)
    disk = FailingFiles()
    disk.fail("chmod", code=errno.EPERM)  # another user's folder
    spool = Spool(folder, max_bytes=1 << 20, files=disk)
    with pytest.raises(SpoolError) as caught:
        spool.open()
    message = str(caught.value)
    assert str(folder) in message and "0755" in message and "Operation not permitted" in message
    with pytest.raises(RuntimeError):
        spool.append([payload(0)])  # not opened: nothing is written to a folder others can read


# -- a failing disk ------------------------------------------------------------------------------


def faulty(folder: Path, **kw: int) -> tuple[Spool, FailingFiles]:
    disk = FailingFiles()
    spool = Spool(folder, max_bytes=kw.pop("max_bytes", 1 << 20), files=disk, **kw)
    spool.open()
    return spool, disk


@pytest.mark.parametrize(("operations", "code"), [
    (("pwrite",), errno.ENOSPC),  # the disk fills up half way through a write
    (("fsync",), errno.EIO),
    (("create",), errno.ENOSPC),  # no room for a new segment file
    (("fsync_dir",), errno.EIO),
    (("pwrite", "truncate"), errno.EIO),  # even the torn tail cannot be cut
    (("create",), errno.EACCES),
])
def test_a_failed_append_stores_nothing_and_its_retry_reuses_the_segment(
        tmp_path: Path, operations: tuple[str, ...], code: int) -> None:
    spool, disk = faulty(tmp_path, segment_bytes=100_000)
    if "create" not in operations and "fsync_dir" not in operations:
        spool.append([payload(i) for i in range(3)])  # the active segment exists already
    first = spool.pending
    disk.fail(*operations, code=code)
    for _ in range(5):  # retried while the disk stays full
        with pytest.raises(SpoolError) as caught:
            spool.append([payload(i) for i in range(10, 14)])
        assert caught.value.done == 0 and caught.value.errno == code
        assert spool.pending == first and spool.appended == first, "nothing counted as stored"
    stats = spool.statistics()
    assert stats["failing"] is True and stats["disk_failures"] == 5
    assert os.strerror(code) in stats["disk_error"]
    assert len(segment_files(tmp_path)) <= 1, "no new segment file per retry"
    disk.heal()
    assert spool.append([payload(i) for i in range(10, 14)]) == 4
    assert spool.statistics()["failing"] is False
    expected = [i for i in range(3) if first] + list(range(10, 14))
    assert numbers(spool) == expected and spool.corrupt == 0
    spool.close()
    again = opened(tmp_path)  # a restart reads exactly what was stored, nothing torn
    assert numbers(again) == expected and again.corrupt == 0 and again.pending == len(expected)


def test_a_restart_after_a_failed_append_finds_no_torn_record(tmp_path: Path) -> None:
    spool, disk = faulty(tmp_path)
    spool.append([payload(i) for i in range(3)])
    disk.fail("pwrite")  # half of the batch reaches the disk
    with pytest.raises(SpoolError):
        spool.append([payload(i) for i in range(10, 14)])
    spool.close()
    disk.heal()
    again = opened(tmp_path)
    assert numbers(again) == [0, 1, 2] and again.corrupt == 0 and again.pending == 3


def test_a_failure_in_the_second_segment_of_a_batch_reports_what_the_first_stored(tmp_path: Path) -> None:
    spool, disk = faulty(tmp_path, segment_bytes=300)
    calls = 0
    real = disk.create

    def create(path: Path) -> int:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(path)

    disk.create = create  # type: ignore[method-assign]
    batch = [payload(i) for i in range(8)]  # about 3 records per segment
    with pytest.raises(SpoolError) as caught:
        spool.append(batch)
    done = caught.value.done
    assert 0 < done < len(batch)
    assert numbers(spool) == list(range(done))
    assert spool.append(batch[done:]) == len(batch) - done
    spool.close()
    assert numbers(opened(tmp_path)) == list(range(8))


def test_a_failed_make_room_keeps_everything_and_is_retried(tmp_path: Path) -> None:
    spool, disk = faulty(tmp_path, max_bytes=1_000, segment_bytes=300)
    spool.append([payload(i) for i in range(9)])  # close to the bound
    disk.fail("unlink", code=errno.EACCES)
    with pytest.raises(SpoolError, match="to make room"):
        spool.append([payload(i) for i in range(9, 15)])
    assert spool.dropped_full == 0 and disk_bytes(tmp_path) <= 1_000 + 300
    disk.heal()
    stored = spool.append([payload(i) for i in range(9, 15)])
    assert stored == 6 and spool.dropped_full + spool.pending == 15
    assert disk_bytes(tmp_path) <= 1_000


def test_a_cursor_that_cannot_be_written_still_moves_and_is_written_later(tmp_path: Path) -> None:
    spool, disk = faulty(tmp_path)
    spool.append([payload(i) for i in range(6)])
    batch = spool.read(3)
    disk.fail("write_atomic")
    with pytest.raises(SpoolError) as caught:
        spool.commit(batch.end)
    assert caught.value.committed, "the commit happened; only its write is left"
    assert numbers(spool) == [3, 4, 5], "what was delivered is not read again"
    assert spool.needs_sync and spool.statistics()["cursor_unsynced"] is True
    with pytest.raises(SpoolError):
        spool.sync()
    disk.heal()
    spool.sync()
    assert not spool.needs_sync
    spool.close()
    assert numbers(opened(tmp_path)) == [3, 4, 5]


def test_a_requeue_that_fails_moves_nothing_and_its_retry_stores_each_once(tmp_path: Path) -> None:
    spool, disk = faulty(tmp_path)
    spool.append([payload(i) for i in range(6)])
    batch = spool.read(3)
    failed = [r.payload for r in batch.records if json.loads(r.payload)["n"] != 1]  # 0 and 2 not delivered
    disk.fail("pwrite")
    with pytest.raises(SpoolError) as caught:
        spool.commit(batch.end, failed)
    assert not caught.value.committed and caught.value.done == 0
    assert numbers(spool) == [0, 1, 2, 3, 4, 5], "the cursor did not move"
    disk.heal()
    spool.commit(batch.end, failed[caught.value.done:])
    assert numbers(spool) == [3, 4, 5, 0, 2]
    spool.close()
    assert numbers(opened(tmp_path)) == [3, 4, 5, 0, 2]


def test_delivered_segments_that_cannot_be_deleted_are_deleted_later(tmp_path: Path) -> None:
    spool, disk = faulty(tmp_path, segment_bytes=300)
    spool.append([payload(i) for i in range(9)])
    disk.fail("unlink", code=errno.EIO)
    with pytest.raises(SpoolError) as caught:
        spool.commit(spool.read(7).end)
    assert caught.value.committed
    assert numbers(spool) == [7, 8]
    assert spool.bytes == disk_bytes(tmp_path), "undeleted segments still count against the bound"
    disk.heal()
    spool.sync()
    assert spool.bytes == disk_bytes(tmp_path)
    assert len(segment_files(tmp_path)) == spool.segments, "the delivered segments are gone"
    assert numbers(spool) == [7, 8]


def test_a_segment_that_cannot_be_read_is_an_error_then_reads_again(tmp_path: Path) -> None:
    spool, disk = faulty(tmp_path)
    spool.append([payload(i) for i in range(3)])
    disk.fail("open_read", code=errno.EIO)
    with pytest.raises(SpoolError, match="Input/output error"):
        spool.read(10)
    disk.heal()
    assert numbers(spool) == [0, 1, 2] and spool.corrupt == 0


# -- age ----------------------------------------------------------------------------------------


def test_records_older_than_max_age_are_skipped_counted_and_leave_the_spool(tmp_path: Path) -> None:
    now = [1_000_000.0]
    spool = Spool(tmp_path, max_bytes=1 << 20, max_age_s=3600, clock=lambda: now[0])
    spool.open()
    spool.append([payload(0), payload(1)], [now[0] - 4000, now[0] - 10])
    spool.append([payload(2)])
    batch = spool.read(10)
    assert [json.loads(r.payload)["n"] for r in batch.records] == [1, 2]
    assert spool.expired == 1
    now[0] += 3595  # 1 is now too old as well, 2 is not
    assert numbers(spool) == [2] and spool.expired == 2
    spool.commit(spool.read(10).end)
    assert spool.pending == 0 and spool.expired == 2


def test_a_segment_found_older_than_max_age_at_open_is_deleted_and_counted(tmp_path: Path) -> None:
    spool = opened(tmp_path, segment_bytes=300)
    spool.append([payload(i) for i in range(6)])
    spool.close()
    old = segment_files(tmp_path)[0]
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    in_old = len(old.read_bytes().splitlines())
    again = Spool(tmp_path, max_bytes=1 << 20, segment_bytes=300, max_age_s=3600)
    again.open()
    assert not old.exists() and again.expired == in_old
    assert numbers(again) == list(range(in_old, 6))


def test_records_of_an_older_spool_without_a_time_are_aged_by_their_segment(tmp_path: Path) -> None:
    legacy = b"".join(b"%08x " % zlib.crc32(p) + p + b"\n" for p in (payload(0), payload(1)))
    segment = tmp_path / "00000000000000000001.seg"
    segment.write_bytes(legacy)
    spool = opened(tmp_path)
    assert numbers(spool) == [0, 1] and spool.corrupt == 0
    spool.close()
    os.utime(segment, (time.time() - 7200, time.time() - 7200))
    aged = Spool(tmp_path, max_bytes=1 << 20, max_age_s=3600)
    aged.open()
    assert aged.expired == 2 and numbers(aged) == []


# -- a real full filesystem ----------------------------------------------------------------------

SMALL_FS_SCRIPT = """
import json, os, sys
from actors.scoring.spool import Spool, SpoolError
folder = sys.argv[1]
filler = os.path.join(folder, "filler")
fd = os.open(filler, os.O_WRONLY | os.O_CREAT)  # fill the filesystem, then leave a few KiB
try:
    while True:
        os.write(fd, b"x" * 4096)
except OSError:
    pass
os.ftruncate(fd, os.fstat(fd).st_size - 3000)
os.close(fd)
spool = Spool(os.path.join(folder, "spool"), max_bytes=1 << 20)
spool.open()
sent, errors, n = [], 0, 0
while n < 200:
    batch = [json.dumps({"n": i, "pad": "y" * 200}).encode() for i in range(n, n + 5)]
    try:
        spool.append(batch)
        n += 5
    except SpoolError as exc:
        errors += 1
        n += exc.done
        if errors == 3:
            os.unlink(filler)  # space is freed
    if errors > 50:
        break
got = [json.loads(r.payload)["n"] for r in spool.read(1000).records]
spool.close()
again = Spool(os.path.join(folder, "spool"), max_bytes=1 << 20)
again.open()
after = [json.loads(r.payload)["n"] for r in again.read(1000).records]
print(json.dumps({"errors": errors, "got": got, "after": after, "corrupt": again.corrupt,
                  "error": spool.last_error}))
"""


def test_a_real_full_filesystem_is_survived(tmp_path: Path) -> None:
    """A 64 KiB tmpfs in a user and mount namespace (no root needed where the kernel allows it)."""
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("unshare(1) is not installed")
    mount = tmp_path / "small"
    mount.mkdir()
    script = (f"mount -t tmpfs -o size=64k tmpfs {mount} && "
              f"exec {sys.executable} -c \"$0\" {mount}")
    try:
        done = subprocess.run([unshare, "--user", "--map-root-user", "--mount", "sh", "-c", script,
                               SMALL_FS_SCRIPT], capture_output=True, text=True, timeout=60, cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    except subprocess.TimeoutExpired:
        pytest.fail("the small-filesystem run did not finish")
    if done.returncode != 0 and ("mount" in done.stderr or "unshare" in done.stderr):
        pytest.skip(f"cannot mount a small tmpfs here without privileges: {done.stderr.strip()[:200]}")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["errors"] >= 1 and "No space left on device" in result["error"]
    assert result["got"] == list(range(200)), "every payload once, in order"
    assert result["after"] == list(range(200)) and result["corrupt"] == 0
