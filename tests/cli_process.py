"""Running `sn1-gateway` in a child process from a test, and reading what it prints."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import tomlkit
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


def config_text(**tables: dict[str, object]) -> str:
    """A config file for a quiet gateway: any free port, a development hotkey, an empty static subnet,
    nothing polled or scored; each of `tables` merged into its table key by key."""
    config: dict[str, dict[str, object]] = {
        "server": {"port": 0}, "wallet": {"uri": "//Alice"}, "subnet": {"source": "static"},
        "availability": {"source": "none"}, "scoring": {"enabled": False}}
    for name, values in tables.items():
        config.setdefault(name, {}).update(values)
    return tomlkit.dumps(config)


GOOD_CONFIG = config_text(server={"drain_timeout_s": 20}, auth={"keys_file": "keys.toml"},
                          scoring={"spool_dir": "spool"})

# The gateway as `serve` runs it (serve_until_signalled), with one extra route that waits for a file,
# so a signal can arrive while a request is in flight.
SLOW_GATEWAY = textwrap.dedent("""
    import sys, trio
    from config.loading import load_settings
    from engine.gateway import serve_until_signalled
    from web.errors import json_response

    def hook(app):
        @app.get("/test/slow")
        async def slow():
            print("slow request entered", flush=True)
            while not await trio.Path(sys.argv[2]).exists():
                await trio.sleep(0.02)
            return json_response({"finished": True})

    trio.run(lambda: serve_until_signalled(
        load_settings(sys.argv[1]), app_hook=hook,
        on_ready=lambda gateway: print("listening on", gateway.url, flush=True)))
""")


@dataclass
class Process:
    popen: subprocess.Popen[str]
    url: str

    def read_line(self) -> str:
        assert self.popen.stdout is not None
        return self.popen.stdout.readline()


def start_process(args: list[str], cwd: Path) -> Iterator[Process]:
    popen = subprocess.Popen(args, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert popen.stdout is not None
        line = popen.stdout.readline()  # blocks until the banner: the server is listening
        assert "listening on " in line, line + (popen.stderr.read() if popen.stderr else "")
        url = line.split("listening on ", 1)[1].split()[0]
        yield Process(popen, url)
    finally:
        if popen.poll() is None:
            popen.kill()
        popen.wait(10)
        for stream in (popen.stdout, popen.stderr):
            if stream is not None:
                stream.close()
