"""The one-file executable (`make binary`: dist/sn1-gateway), used as an operator would use it: copied
alone into an empty folder and run with no Python and no venv in its environment.

It is tested when it exists (`SN1_GATEWAY_BINARY` names another file to test), or after building it when
`SN1_GATEWAY_BUILD_BINARY=1`. Otherwise the tests skip, except in CI (`CI` set), where `.ci/run` builds it
and its absence is a failure.
"""

from __future__ import annotations

import contextlib
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import bittensor as bt
import httpx
import pytest
import tomlkit
from bittensor_core import Keypair

from tests.cli_process import GOOD_CONFIG, SLOW_GATEWAY, start_process
from tests.redis_server import RedisServer

ROOT = Path(__file__).resolve().parent.parent
CLEAN_PATH = "/usr/bin:/bin"  # no venv, no pyenv: only what any Linux machine has
START_S = 60.0  # generous: a one-file start unpacks itself, and the machine may be busy
CHAT = {"messages": [{"role": "user", "content": "Hello!"}]}


def binary_path() -> Path:
    return Path(os.environ.get("SN1_GATEWAY_BINARY") or ROOT / "dist" / "sn1-gateway")


def build(path: Path) -> None:
    """Build with this interpreter's environment (which must hold PyInstaller: the `build` extra)."""
    if path != ROOT / "dist" / "sn1-gateway":
        pytest.fail(f"SN1_GATEWAY_BUILD_BINARY=1 builds dist/sn1-gateway, not {path}")
    done = subprocess.run(["bash", "packaging/build.sh"], cwd=ROOT, env={**os.environ, "PYTHON": sys.executable},
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"the build failed:\n{done.stdout}\n{done.stderr}"


@pytest.fixture(scope="module")
def built() -> Path:
    path = binary_path()
    if os.environ.get("SN1_GATEWAY_BUILD_BINARY") == "1":
        build(path)
    if not path.is_file():
        if os.environ.get("CI"):
            pytest.fail(f"{path} is missing, and CI is set: .ci/run should have built it (make binary)")
        pytest.skip(f"{path} is not built: `make binary` builds it (or set SN1_GATEWAY_BUILD_BINARY=1)")
    return path


@dataclass(frozen=True)
class Binary:
    """The executable, alone in an empty folder that is also its HOME and working directory."""

    exe: Path

    @property
    def folder(self) -> Path:
        return self.exe.parent

    @property
    def env(self) -> dict[str, str]:
        return {"PATH": CLEAN_PATH, "HOME": str(self.folder)}

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(self.exe), *args], cwd=self.folder, env=self.env, capture_output=True,
                              text=True, timeout=START_S)

    def start(self, *args: str, new_session: bool = False) -> Running:
        popen = subprocess.Popen([str(self.exe), *args], cwd=self.folder, env=self.env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, start_new_session=new_session)
        return Running(popen)


class Running:
    """A started command whose output is read line by line in the background, so waits are bounded."""

    def __init__(self, popen: subprocess.Popen[str]) -> None:
        self.popen = popen
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        for stream, into in ((popen.stdout, self.stdout), (popen.stderr, None)):
            threading.Thread(target=self._pump, args=(stream, into), daemon=True).start()

    def _pump(self, stream: object, into: list[str] | None) -> None:
        for line in stream:  # type: ignore[attr-defined]
            if into is None:
                self.stderr.append(line)
            else:
                self.lines.put(line)
        if into is not None:
            self.lines.put(None)

    def wait_for(self, marker: str) -> str:
        """The first stdout line holding `marker` (the lines before it are kept in `stdout`)."""
        deadline = time.monotonic() + START_S
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no {marker!r} within {START_S}s:\n{self.output()}") from None
            if line is None:
                raise AssertionError(f"exited with {self.popen.wait()} before {marker!r}:\n{self.output()}")
            self.stdout.append(line)
            if marker in line:
                return line

    def stop(self, signum: signal.Signals, *, group: bool = False) -> int:
        """Send `signum` (to the process group, as a terminal or systemd does, when `group`); the exit status."""
        if group:
            os.killpg(self.popen.pid, signum)
        else:
            self.popen.send_signal(signum)
        return self.popen.wait(20)

    def output(self) -> str:
        time.sleep(0.1)  # let the readers catch up
        return "".join(self.stdout) + "--- stderr ---\n" + "".join(self.stderr)

    def close(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait(10)


@pytest.fixture
def binary(built: Path, tmp_path: Path) -> Binary:
    folder = tmp_path / "empty"
    folder.mkdir()
    exe = folder / "sn1-gateway"
    shutil.copy2(built, exe)
    return Binary(exe)


@contextlib.contextmanager
def started(binary: Binary, *args: str, new_session: bool = False) -> Iterator[Running]:
    running = binary.start(*args, new_session=new_session)
    try:
        yield running
    finally:
        running.close()


def project_version() -> str:
    with (ROOT / "pyproject.toml").open("rb") as f:
        return str(tomllib.load(f)["project"]["version"])


def test_version_is_the_projects(binary: Binary) -> None:
    done = binary.run("--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"sn1-gateway {project_version()}\n"


def test_bench_and_the_children_it_starts_run_from_the_binary(binary: Binary) -> None:
    """`bench` starts its gateways and its floor as `sys.executable -m MODULE`: the binary runs those."""
    helped = binary.run("bench", "--help")
    assert helped.returncode == 0 and helped.stdout.startswith("usage: sn1-gateway bench"), helped.stderr
    as_module = binary.run("-m", "engine.cli", "--version")
    assert (as_module.returncode, as_module.stdout) == (0, f"sn1-gateway {project_version()}\n"), as_module.stderr
    floor = binary.run("-m", "bench.floor", "--help")
    assert floor.returncode == 0 and "--tokens" in floor.stdout, floor.stderr
    missing = binary.run("-m", "no_such_module")
    assert missing.returncode == 1 and "No module named no_such_module" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_init_writes_a_config_that_check_config_accepts_and_a_wrong_key_is_refused(binary: Binary) -> None:
    done = binary.run("init")
    assert done.returncode == 0, done.stderr
    written = binary.folder / "sn1-gateway.toml"
    assert "[server]" in written.read_text(encoding="utf-8")
    checked = binary.run("check-config", "sn1-gateway.toml")
    assert (checked.returncode, checked.stdout) == (0, "sn1-gateway.toml: OK\n"), checked.stderr
    (binary.folder / "typo.toml").write_text("[server]\nprot = 1\n", encoding="utf-8")
    refused = binary.run("check-config", "typo.toml")
    assert refused.returncode == 2
    assert "server.prot" in refused.stderr and "Traceback" not in refused.stderr


def test_keys_live_in_redis_through_coredis(binary: Binary, redis_url: str, redis_server: RedisServer) -> None:
    (binary.folder / "redis.toml").write_text(f'[auth]\nstore = "redis"\nredis_url = "{redis_url}"\n',
                                              encoding="utf-8")
    done = binary.run("keys", "create", "--config", "redis.toml", "--rate-limit", "7")
    assert done.returncode == 0, done.stderr
    listed = binary.run("keys", "list", "--config", "redis.toml")
    assert listed.returncode == 0, listed.stderr
    assert "1 key(s)" in listed.stderr and " 7 " in listed.stdout
    assert redis_server.command("DBSIZE") != b":0\r\n"


def api_key_in(line: str) -> str:
    return line.rsplit(": ", 1)[1].strip()


def chat(url: str, key: str) -> None:
    """A non-streamed and a streamed chat request answered (the devnet's miners make up the text)."""
    with httpx.Client(base_url=url, headers={"api-key": key}, timeout=30, trust_env=False) as client:
        answer = client.post("/v1/chat/completions", json=CHAT)
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["message"]["content"]
        with client.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as stream:
            assert stream.status_code == 200
            events = [line for line in stream.iter_lines() if line.startswith("data: ")]
    assert len(events) > 2 and events[-1] == "data: [DONE]"


def test_serve_devnet_answers_chat_with_the_key_it_prints_then_stops_on_sigint(binary: Binary) -> None:
    (binary.folder / "port.toml").write_text("[server]\nport = 0\n", encoding="utf-8")
    with started(binary, "serve", "--devnet", "--config", "port.toml") as gateway:
        url = gateway.wait_for("listening on ").split("listening on ", 1)[1].split()[0]
        key = api_key_in(gateway.wait_for("API key"))
        chat(url, key)
        assert gateway.stop(signal.SIGINT) == 0, gateway.output()
        assert "Traceback" not in gateway.output()


def test_devnet_and_serve_with_a_wallet_hotkey_stop_once_when_their_group_is_signalled(
    binary: Binary,
) -> None:
    """`devnet` in one process, `serve` in another, signing with a bittensor wallet's hotkey. A signal to
    the whole process group (Ctrl-C at a terminal, systemd stopping a unit) reaches both the launcher and
    the program; the gateway still drains once and exits 0, not at once with 130."""
    mnemonic = Keypair.generate_mnemonic()
    wallets = binary.folder / "wallets"
    bt.Wallet("gw", "hot", str(wallets)).regenerate_hotkey(mnemonic=mnemonic, suppress=True)
    with started(binary, "devnet", "--miners", "2", "--gateway-uri", mnemonic, new_session=True) as devnet:
        devnet.wait_for("validator_hotkey")  # the last line of the config it prints
        config = tomlkit.parse("".join(devnet.stdout))
        config["wallet"] = {"name": "gw", "hotkey": "hot", "path": str(wallets)}
        config["server"] = {"port": 0}
        (binary.folder / "gw.toml").write_text(tomlkit.dumps(config), encoding="utf-8")
        created = binary.run("keys", "create", "--config", "gw.toml", "--rate-limit", "60")
        assert created.returncode == 0, created.stderr
        key = created.stdout.splitlines()[0]
        with started(binary, "serve", "--config", "gw.toml", new_session=True) as gateway:
            url = gateway.wait_for("listening on ").split("listening on ", 1)[1].split()[0]
            chat(url, key)
            assert gateway.stop(signal.SIGTERM, group=True) == 0, gateway.output()
            log = gateway.output()
            assert log.count("SIGTERM: draining") == 1 and "second SIGTERM" not in log, log
        assert devnet.stop(signal.SIGINT, group=True) == 0, devnet.output()


def test_serve_reads_the_chain_through_bittensor_and_reports_it_unreachable(binary: Binary) -> None:
    """bittensor's chain client runs in the frozen program: nothing listens at the endpoint, and the
    gateway serves on and says why its metagraph is empty (bittensor's own connection error)."""
    with socket.socket() as placeholder:
        placeholder.bind(("127.0.0.1", 0))
        endpoint = f"ws://127.0.0.1:{placeholder.getsockname()[1]}"  # closed: bound, never listening
        (binary.folder / "chain.toml").write_text(
            f'[server]\nport = 0\n[wallet]\nuri = "//Alice"\n[subnet]\nsource = "chain"\nnetwork = "{endpoint}"\n'
            '[availability]\nsource = "none"\n[scoring]\nenabled = false\n', encoding="utf-8")
        with started(binary, "serve", "--config", "chain.toml") as gateway:
            url = gateway.wait_for("listening on ").split("listening on ", 1)[1].split()[0]
            deadline = time.monotonic() + START_S
            while (subnet := httpx.get(f"{url}/health/ready", timeout=10).json()["subnet"])["failures"] == 0:
                assert time.monotonic() < deadline, subnet
                time.sleep(0.1)
            assert subnet["source"] == "chain" and subnet["neurons"] == 0
            assert endpoint in subnet["last_error"] and "RpcConnectionError" in subnet["last_error"]
            assert gateway.stop(signal.SIGINT) == 0, gateway.output()


def test_the_same_signal_twice_at_once_drains_as_one(tmp_path: Path) -> None:
    """What the binary's launcher does on Ctrl-C: the program has the signal from the terminal and,
    a moment later, again from the launcher. That is one request to stop, not two (a second, later
    signal still exits at once: tests/test_web_shell.py)."""
    config = tmp_path / "gw.toml"
    config.write_text(GOOD_CONFIG, encoding="utf-8")
    release = tmp_path / "release"
    slow_gateway = contextlib.contextmanager(start_process)
    with slow_gateway([sys.executable, "-c", SLOW_GATEWAY, str(config), str(release)], ROOT) as process:
        with httpx.Client(timeout=30, trust_env=False) as client:
            outcome: list[httpx.Response] = []
            worker = threading.Thread(target=lambda: outcome.append(client.get(f"{process.url}/test/slow")))
            worker.start()
            assert process.read_line() == "slow request entered\n"
            process.popen.send_signal(signal.SIGINT)
            time.sleep(0.03)
            process.popen.send_signal(signal.SIGINT)
            time.sleep(0.5)
            assert process.popen.poll() is None  # draining, not gone with 130
            release.touch()
            worker.join(20)
        assert outcome[0].status_code == 200
        assert process.popen.wait(10) == 0
