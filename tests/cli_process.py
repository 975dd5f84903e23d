"""Running `sn1-gateway` in a child process from a test, and reading what it prints."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import trio


async def start_cli(*args: str, cwd: Path) -> trio.Process:
    env = {**os.environ, "HOME": str(cwd)}  # no wallet anywhere
    return await trio.lowlevel.open_process([sys.executable, "-m", "engine.cli", *args], cwd=cwd, env=env,
                                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


async def read_until(stream: trio.abc.ReceiveStream | None, marker: bytes) -> bytes:
    """Everything read from `stream` until `marker` (a regular expression) appears in it."""
    assert stream is not None
    seen = b""
    while not re.search(marker, seen):
        chunk = await stream.receive_some()
        if not chunk:
            raise AssertionError(f"the output ended before {marker!r}: {seen.decode(errors='replace')}")
        seen += chunk
    return seen


async def stop(process: trio.Process) -> int:
    process.send_signal(signal.SIGINT)
    with trio.fail_after(15):
        return await process.wait()
