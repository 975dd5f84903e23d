"""The stop of the real process: SIGTERM to exit within `server.drain_timeout_s + EXIT_MARGIN_S`,
whatever miners, the validator or the disk do, with what the miners said so far spooled for scoring."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest
import tomlkit
import trio

from actors.scoring.spool import Spool
from config.loading import load_settings
from devnet import text
from devnet.miner import MinerFault, MinerTiming
from devnet.network import Devnet
from devnet.validator import ValidatorFault
from engine.cli import devnet_key
from engine.gateway import EXIT_MARGIN_S, EXIT_STUCK
from tests.cli_process import config_text, read_until

ROOT = Path(__file__).resolve().parent.parent
DRAIN_S = 3.0  # twice this (the old drain, then a second one for fan-outs) is over DRAIN_S + EXIT_MARGIN_S
TOKENS = 64
SLOW_TOKEN_S = 0.2  # a whole answer of TOKENS takes 12.8 s: the slow miners are mid-answer at the cut


def gateway_config(devnet: Devnet, tmp_path: Path) -> Path:
    doc = tomlkit.parse(devnet.config_toml())
    doc["server"] = {"port": 0, "drain_timeout_s": DRAIN_S}
    doc["auth"] = {"keys_file": "keys.toml"}
    doc["availability"]["source"] = "none"  # type: ignore[index]
    doc["scoring"]["spool_dir"] = "spool"  # type: ignore[index]
    doc["fanout"] = {"miners": 3, "first_token_timeout_s": 30.0}
    path = tmp_path / "gw.toml"
    path.write_text(tomlkit.dumps(doc), encoding="utf-8")
    return path


async def test_sigterm_with_hanging_miners_and_a_slow_validator_exits_in_time_and_spools_what_was_said(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    timing = MinerTiming(first_token_s=0.02, token_s=0.002, slow_token_s=SLOW_TOKEN_S)
    devnet: Devnet = await nursery.start(Devnet(miners=3, timing=timing, validator_poll_s=3600,
                                                faults=("hang_after_headers", "slow_tokens", "slow_tokens")).run)
    devnet.validator.slow_s = 60.0  # takes every payload and answers none before the gateway is gone
    await devnet.validator.set_fault(ValidatorFault.SLOW)
    config = gateway_config(devnet, tmp_path)
    key = await devnet_key(load_settings(config))
    script = Path(sys.executable).with_name("sn1-gateway")
    process = await trio.lowlevel.open_process([str(script), "serve", "--config", str(config)], cwd=tmp_path,
                                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        with trio.fail_after(30):
            banner = (await read_until(process.stdout, b"listening on http://\\S+")).decode()
        url = banner.split("listening on ")[1].split()[0]
        async with httpx.AsyncClient(base_url=url, headers={"api-key": key}, timeout=60) as client:
            streaming = trio.Event()
            said: dict[int, str] = {}

            async def ask(seed: int) -> None:
                body = {"messages": [{"role": "user", "content": f"stop {seed}"}], "stream": True, "seed": seed,
                        "max_tokens": TOKENS}
                said[seed] = ""
                try:
                    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
                        assert response.status_code == 200
                        async for line in response.aiter_lines():
                            if line.startswith("data: {"):
                                choices = json.loads(line[6:]).get("choices") or [{}]
                                said[seed] += choices[0].get("delta", {}).get("content") or ""
                                if len(said) == 3 and all(said.values()):
                                    streaming.set()
                except httpx.TransportError:
                    pass  # cut at the drain deadline: the point of this test

            with trio.fail_after(30):
                async with trio.open_nursery() as clients:
                    for seed in (1, 2, 3):
                        clients.start_soon(ask, seed)
                    await streaming.wait()  # every request is answering, slowly; the hanging miner says nothing
                    process.send_signal(signal.SIGTERM)
                    sent = time.monotonic()
                    with trio.fail_after(DRAIN_S + EXIT_MARGIN_S + 5):
                        code = await process.wait()
                    took = time.monotonic() - sent
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.stderr is not None
    stderr = (await process.stderr.receive_some(1 << 20)).decode(errors="replace")
    assert code == 0, stderr
    assert DRAIN_S - 0.2 <= took <= DRAIN_S + EXIT_MARGIN_S, took  # the streams had the drain, then no more
    assert "Traceback" not in stderr

    spool = Spool(tmp_path / "spool", max_bytes=1 << 30)
    spool.open()
    payloads = [json.loads(r.payload) for r in spool.read(100).records]
    spool.close()
    assert sorted(p["body"]["seed"] for p in payloads) == [1, 2, 3]
    hanging = next(m.uid for m in devnet.miners if m.fault == MinerFault.HANG_AFTER_HEADERS)
    for payload in payloads:
        assert payload["chunks"][str(hanging)] == []
        full = text.answer(payload["body"]["seed"], payload["body"]["messages"], TOKENS).text
        for miner in devnet.miners:
            if miner.uid == hanging:
                continue
            so_far = "".join(payload["chunks"][str(miner.uid)])
            assert so_far and full.startswith(so_far) and so_far != full  # what it said until the cut


# A gateway whose disk hangs once a flag file exists: every fsync from then on blocks for good.
HUNG_DISK_GATEWAY = textwrap.dedent("""
    import os, sys, threading, trio
    from config.loading import load_settings
    from engine.gateway import serve_until_signalled

    flag, real_fsync, forever = sys.argv[2], os.fsync, threading.Event()

    def fsync(fd):
        if os.path.exists(flag):
            forever.wait()
        real_fsync(fd)

    os.fsync = fsync
    trio.run(lambda: serve_until_signalled(
        load_settings(sys.argv[1]), on_ready=lambda gateway: print("listening on", gateway.url, flush=True)))
""")


def test_a_hung_disk_does_not_hold_the_exit(tmp_path: Path) -> None:
    config = tmp_path / "gw.toml"
    config.write_text(config_text(server={"drain_timeout_s": 0.5}, auth={"keys_file": "keys.toml"}),
                      encoding="utf-8")
    key = trio.run(devnet_key, load_settings(config))
    flag = tmp_path / "disk-hung"
    popen = subprocess.Popen([sys.executable, "-c", HUNG_DISK_GATEWAY, str(config), str(flag)], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert popen.stdout is not None
        line = popen.stdout.readline()
        assert "listening on " in line, line
        url = line.split("listening on ", 1)[1].split()[0]
        response = httpx.post(f"{url}/v1/chat/completions", headers={"api-key": key}, timeout=10,
                              json={"messages": [{"role": "user", "content": "hi"}]})
        assert response.status_code == 503  # no miners, but the key's usage counts: it must be saved
        flag.touch()
        started = time.monotonic()
        popen.send_signal(signal.SIGTERM)
        try:
            code = popen.wait(0.5 + EXIT_MARGIN_S + 5)
        except subprocess.TimeoutExpired:
            pytest.fail("the gateway did not exit while its disk hung")
        took = time.monotonic() - started
    finally:
        if popen.poll() is None:
            popen.kill()
        _, stderr = popen.communicate(timeout=10)
    assert code == EXIT_STUCK, stderr
    assert took <= 0.5 + EXIT_MARGIN_S + 0.5, took
    assert "the stop did not finish within server.drain_timeout_s + 2.5s (still saving key usage)" in stderr
