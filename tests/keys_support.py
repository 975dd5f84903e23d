"""Helpers for the key-store tests: a gateway to talk to, in process or as a real `serve` process."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import trio

from config.loading import load_settings
from config.settings import Settings
from engine.gateway import Gateway, run
from tests.cli_process import config_text

ROOT = Path(__file__).resolve().parent.parent
ADMIN = {"admin-key": "test-admin-key"}


async def wait_until(predicate: Callable[[], Awaitable[bool]], *, interval: float = 0.02) -> float:
    """Poll until `predicate` holds; return how long that took. Bound it with `fail_after` (here 10 s)."""
    start = trio.current_time()
    with trio.fail_after(10):
        while True:
            if await predicate():
                return trio.current_time() - start
            await trio.sleep(interval)


def write_config(folder: Path, *, store: str = "file", redis_url: str = "", admin_key: str | None = None) -> Path:
    """A config for a gateway on a free port, with no miners and nothing to score."""
    admin = ADMIN["admin-key"] if admin_key is None else admin_key
    auth: dict[str, object] = {"admin_key": admin, "store": store, "keys_file": "keys.toml"}
    if redis_url:
        auth["redis_url"] = redis_url
    text = config_text(server={"drain_timeout_s": 1.0}, auth=auth, scoring={"spool_dir": "spool"})
    path = folder / "gateway.toml"
    path.write_text(text)
    return path


def settings_in(folder: Path, **kw: str) -> Settings:
    return load_settings(write_config(folder, **kw), environ={})


@asynccontextmanager
async def running_gateway(settings: Settings) -> AsyncIterator[tuple[Gateway, httpx.AsyncClient]]:
    """An in-process gateway on a free port and a client for it; stopped on exit."""
    async with trio.open_nursery() as nursery:
        with trio.fail_after(20):
            gateway: Gateway = await nursery.start(run, settings)
        limits = httpx.Limits(max_connections=250, max_keepalive_connections=250)
        async with httpx.AsyncClient(base_url=gateway.url, timeout=20, limits=limits) as client:
            yield gateway, client
        gateway.shutdown()
        with trio.move_on_after(10):
            await gateway.wait_stopped()
        nursery.cancel_scope.cancel()


async def cli(*args: str, cwd: Path, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    """Run `sn1-gateway ...` as an operator would (`stdin`: what it reads on standard input)."""
    with trio.fail_after(60):
        return await trio.run_process(
            [sys.executable, "-m", "engine.cli", *args],
            stdin=stdin,
            cwd=cwd,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )


@asynccontextmanager
async def serve_process(config: Path) -> AsyncIterator[str]:
    """A real `sn1-gateway serve` process; yields its URL, stops it with SIGTERM (logs in serve-*.log)."""
    log_path = config.parent / f"serve-{id(config):x}.log"
    log = await trio.to_thread.run_sync(open, log_path, "wb")
    try:
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "engine.cli", "serve", "--config", str(config)],
            cwd=config.parent,
            stdout=subprocess.PIPE,
            stderr=log,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        try:
            assert proc.stdout is not None
            line = b""
            with trio.move_on_after(30):
                while b"\n" not in line and (chunk := await proc.stdout.receive_some(4096)):
                    line += chunk
            text = line.decode(errors="replace")
            if "listening on" not in text:  # "sn1-gateway listening on http://... (Ctrl-C to stop)"
                raise RuntimeError(f"gateway did not start: {text!r}; see {log_path}")
            yield text.split("listening on ", 1)[1].split()[0]
        finally:
            proc.terminate()
            with trio.move_on_after(15):
                await proc.wait()
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    finally:
        log.close()
