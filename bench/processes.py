"""Child processes of the benchmark (devnet, gateway, key commands) and their CPU and memory from /proc."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Generic, TypeVar

import trio

from bench.report import ProcessSample

T = TypeVar("T")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
STOP_TIMEOUT_S = 15.0
_STATUS_FIELD = re.compile(r"^(VmRSS|VmHWM):\s+(\d+)\s+kB", re.MULTILINE)


class ChildFailed(Exception):
    """A child process exited or stayed silent before it was ready; the message says which and where its log is."""


def cli(*args: str) -> list[str]:
    """The `sn1-gateway` command line, run by this interpreter (no reliance on PATH)."""
    return [sys.executable, "-m", "engine.cli", *args]


def sample(pid: int) -> ProcessSample:
    """CPU seconds (user + system), current and peak RSS of a live process, from /proc."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    cpu_s = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime: fields 14 and 15
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        found = dict(_STATUS_FIELD.findall(f.read()))
    return ProcessSample(cpu_s=cpu_s, rss_mb=int(found.get("VmRSS", 0)) / 1024,
                         peak_rss_mb=int(found.get("VmHWM", 0)) / 1024)


def descendants(pid: int) -> list[int]:
    """`pid`'s live child processes, and theirs, from /proc (empty when it has none or has ended)."""
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children", encoding="ascii") as f:
                children = [int(c) for c in f.read().split()]
        except OSError:
            continue
        for child in children:
            found += [child, *descendants(child)]
    return found


def sample_tree(pid: int) -> ProcessSample:
    """`sample` summed over a process and its live descendants (a supervisor and its workers): RSS and
    peak RSS are the sums of each process's own."""
    samples = [sample(pid)]
    for child in descendants(pid):
        try:
            samples.append(sample(child))
        except OSError:  # it ended meanwhile
            continue
    return ProcessSample(cpu_s=sum(s.cpu_s for s in samples), rss_mb=sum(s.rss_mb for s in samples),
                         peak_rss_mb=sum(s.peak_rss_mb for s in samples))


@dataclass
class Child(Generic[T]):
    """A running child: its process, what it announced when ready, and its log file."""

    name: str
    process: trio.Process
    ready: T
    log_path: Path
    spawned_at: float = 0.0  # time.perf_counter() when it was started
    cpus: frozenset[int] | None = None  # the cores it is pinned to (None: any)

    @property
    def pid(self) -> int:
        return self.process.pid

    def sample(self) -> ProcessSample:
        return sample(self.process.pid)

    async def stop(self) -> int:
        """SIGTERM, then SIGKILL if it has not exited within STOP_TIMEOUT_S; returns its exit code."""
        with trio.CancelScope(shield=True):
            if self.process.returncode is None:
                self.process.send_signal(signal.SIGTERM)
                with trio.move_on_after(STOP_TIMEOUT_S):
                    await self.process.wait()
                if self.process.returncode is None:
                    self.process.kill()
            code: int = await self.process.wait()
        return code


async def start_child(
    nursery: trio.Nursery,
    name: str,
    argv: Sequence[str],
    *,
    cwd: Path,
    ready: Callable[[str], T | None],
    timeout_s: float = 30.0,
    cpus: frozenset[int] | None = None,
    env: dict[str, str] | None = None,
) -> Child[T]:
    """Start `argv`; `ready` is given the stdout read so far until it returns a value.

    stderr goes to `<cwd>/<name>.log`; stdout keeps being drained in `nursery` so the child never
    blocks on a full pipe. `cpus`: the cores it may run on (set at once, before it has imported
    anything; its threads inherit them). `env`: its whole environment (default: ours, unbuffered).
    """
    log_path = cwd / f"{name}.log"
    log_file = _open_log(log_path)
    spawned_at = time.perf_counter()
    try:
        process = await trio.lowlevel.open_process(
            list(argv), stdout=subprocess.PIPE, stderr=log_file, cwd=cwd,
            env=env if env is not None else {**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    finally:
        log_file.close()  # the child holds its own copy
    if cpus is not None:
        pin(process.pid, cpus)
    assert process.stdout is not None
    output = bytearray()
    found: T | None = None
    try:
        with trio.fail_after(timeout_s):
            while found is None:
                data = await process.stdout.receive_some(65536)
                if not data:
                    await process.wait()
                    raise ChildFailed(f"{name} exited with {process.returncode} before it was ready; "
                                      f"see {log_path}")
                output += data
                found = ready(output.decode("utf-8", "replace"))
    except trio.TooSlowError:
        process.kill()
        raise ChildFailed(f"{name} was not ready within {timeout_s:g}s; see {log_path}") from None
    except BaseException:
        process.kill()
        raise
    stdout = process.stdout

    async def drain() -> None:
        while await stdout.receive_some(65536):
            pass

    nursery.start_soon(drain)
    return Child(name, process, found, log_path, spawned_at, cpus)


PACKAGES = ("config", "wire", "actors", "web", "engine", "devnet", "bench")


def compiled_env(cache_dir: Path) -> dict[str, str]:
    """Our environment for a child that should start as an installed package does: its modules
    byte-compiled once into `cache_dir` (not into the source tree), even where the environment says
    not to write bytecode (then every start would compile the project's sources again)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    return {**env, "PYTHONUNBUFFERED": "1", "PYTHONPYCACHEPREFIX": str(cache_dir)}


def package_paths() -> list[str]:
    """The folders of the project's packages (beside this one)."""
    root = Path(__file__).resolve().parent.parent
    return [str(root / name) for name in PACKAGES if (root / name).is_dir()]


WARM_IMPORTS = "import engine.cli, engine.gateway, actors.keystore.actor, bench.floor"


async def byte_compile(env: dict[str, str], cwd: Path) -> None:
    """Byte-compile, into `env`'s cache prefix, the project's packages and every module a gateway
    imports when it starts (the prefix holds third-party modules' bytecode too, so a first start would
    otherwise compile them all from source)."""
    paths = package_paths()
    with trio.fail_after(180):
        await trio.run_process([sys.executable, "-m", "compileall", "-q", "-j", "0", *paths], cwd=cwd, env=env,
                               capture_stdout=True, capture_stderr=True)
        await trio.run_process([sys.executable, "-c", WARM_IMPORTS], cwd=cwd, env=env, capture_stdout=True,
                               capture_stderr=True)


def pin(pid: int, cpus: frozenset[int]) -> None:
    """Run `pid` (0: this process) only on `cpus`, and its threads with it."""
    os.sched_setaffinity(pid, cpus)
    try:
        tasks = os.listdir(f"/proc/{pid or os.getpid()}/task")
    except OSError:
        return
    for task in tasks:
        try:
            os.sched_setaffinity(int(task), cpus)
        except OSError:  # a thread that ended meanwhile
            continue


def core_plan(cores: int) -> tuple[frozenset[int] | None, frozenset[int] | None]:
    """(the gateway's cores, everyone else's): with two cores or more the gateway gets one of its own
    and the devnet, the validator and the load generator share the others; on one core, no pinning."""
    available = sorted(os.sched_getaffinity(0))
    if len(available) < 2 or cores < 2:
        return None, None
    return frozenset(available[:1]), frozenset(available[1:])


def _open_log(path: Path) -> BinaryIO:
    return open(path, "wb")  # a local file, opened once per child: not worth a thread


async def run_command(argv: Sequence[str], *, cwd: Path, timeout_s: float = 30.0) -> str:
    """Run a short command to its end; its stdout, or ChildFailed with its stderr."""
    with trio.fail_after(timeout_s):
        done = await trio.run_process(list(argv), cwd=cwd, capture_stdout=True, capture_stderr=True,
                                      check=False)
    if done.returncode != 0:
        raise ChildFailed(f"{' '.join(argv[2:])} failed ({done.returncode}): "
                          f"{done.stderr.decode('utf-8', 'replace').strip()}")
    return done.stdout.decode()


def raise_fd_limit(wanted: int) -> int:
    """Raise this process's soft open-files limit towards `wanted` (up to the hard limit); the new soft limit."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        return target
    return soft
