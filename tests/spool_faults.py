"""A spool disk that fails on demand: `SpoolFiles` whose operations raise chosen OSErrors until healed."""

from __future__ import annotations

import errno
import os
from collections import Counter
from pathlib import Path
from typing import BinaryIO

from actors.scoring.spool import SpoolFiles

# Every operation the spool makes on the disk, by its `SpoolFiles` name.
OPERATIONS = ("make_folder", "mode", "chmod", "names", "mtime", "create", "pwrite", "fsync", "truncate", "close",
              "open_read", "read_bytes", "unlink", "write_atomic", "fsync_dir")


class FailingFiles(SpoolFiles):
    """Real file operations, except those told to fail: `fail("pwrite", errno.ENOSPC)` makes every
    later pwrite raise until `heal()`. A failing pwrite first writes half of its data (a short write
    that leaves a torn tail, as a filling disk does). Calls and failures are counted per operation."""

    def __init__(self) -> None:
        self.failing: dict[str, int] = {}
        self.calls: Counter[str] = Counter()
        self.failures: Counter[str] = Counter()

    def fail(self, *operations: str, code: int = errno.ENOSPC) -> None:
        for operation in operations:
            assert operation in OPERATIONS, operation
            self.failing[operation] = code

    def heal(self, *operations: str) -> None:
        for operation in operations or tuple(self.failing):
            self.failing.pop(operation, None)

    def _check(self, operation: str) -> None:
        self.calls[operation] += 1
        code = self.failing.get(operation)
        if code is not None:
            self.failures[operation] += 1
            raise OSError(code, os.strerror(code))

    def make_folder(self, path: Path) -> None:
        self._check("make_folder")
        super().make_folder(path)

    def mode(self, path: Path) -> int:
        self._check("mode")
        return super().mode(path)

    def chmod(self, path: Path, mode: int) -> None:
        self._check("chmod")
        super().chmod(path, mode)

    def names(self, path: Path) -> list[str]:
        self._check("names")
        return super().names(path)

    def mtime(self, path: Path) -> float:
        self._check("mtime")
        return super().mtime(path)

    def create(self, path: Path) -> int:
        self._check("create")
        return super().create(path)

    def pwrite(self, fd: int, data: bytes, offset: int) -> int:
        if "pwrite" in self.failing and len(data) > 1:
            os.pwrite(fd, data[: len(data) // 2], offset)  # the disk filled up half way through
        self._check("pwrite")
        return super().pwrite(fd, data, offset)

    def fsync(self, fd: int) -> None:
        self._check("fsync")
        super().fsync(fd)

    def truncate(self, fd: int, size: int) -> None:
        self._check("truncate")
        super().truncate(fd, size)

    def close(self, fd: int) -> None:
        self._check("close")
        super().close(fd)

    def open_read(self, path: Path) -> BinaryIO:
        self._check("open_read")
        return super().open_read(path)

    def read_bytes(self, path: Path) -> bytes:
        self._check("read_bytes")
        return super().read_bytes(path)

    def unlink(self, path: Path) -> None:
        self._check("unlink")
        super().unlink(path)

    def write_atomic(self, path: Path, data: bytes) -> None:
        self._check("write_atomic")
        super().write_atomic(path, data)

    def fsync_dir(self, path: Path) -> None:
        self._check("fsync_dir")
        super().fsync_dir(path)
