"""Timing of the outbound HTTP/1.1 answer parsing: `python -m bench.http1_parse [--baseline REV]`.

Parses N typical miner answers (a 200 head, then a chunked SSE body of 16 chunk events of about
300 bytes, as Hypercorn sends them) delivered in 1 to 4 pieces cut at random places, through
`wire.http1.Connection` (the pool's connection, on a scripted stream: the parsing and the shell's
loop, no socket) of the working tree and of the git revision `--baseline`, and prints microseconds
per answer (best of `--repeat`). Also the I/O-free core alone, and h11 (httpx's parser) for scale.
Not a test: figures vary with the machine; compare the lines of one run.
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import subprocess
import sys
import time
import types
from collections.abc import Callable, Sequence
from pathlib import Path

import h11
import trio

ROOT = Path(__file__).resolve().parent.parent


def typical_answer(i: int) -> tuple[bytes, int]:
    """The answer's bytes, and the length of its body without the chunked framing."""
    head = (b"HTTP/1.1 200 \r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
            b"date: Mon, 06 Jan 2025 10:00:00 GMT\r\nserver: hypercorn-h11\r\n"
            b"transfer-encoding: chunked\r\n\r\n")
    chunks = []
    size = 0
    for k in range(16):
        event = (b'data: {"id":"chatcmpl-devnet-%d","object":"chat.completion.chunk","created":1736157600,'
                 b'"model":"hugging-quants/Meta-Llama-3.1-70B-Instruct-AWQ-INT4","choices":[{"index":0,'
                 b'"delta":{"content":"tok%d "},"finish_reason":null,"logprobs":{"content":[{"token":'
                 b'"tok%d","logprob":-0.1,"top_logprobs":[]}]}}]}\n\n' % (i, k, k))
        chunks.append(b"%x\r\n%s\r\n" % (len(event), event))
        size += len(event)
    return head + b"".join(chunks) + b"0\r\n\r\n", size


def cut(data: bytes, rng: random.Random) -> list[bytes]:
    """`data` in 1 to 4 pieces, cut at random places."""
    points = sorted(rng.sample(range(1, len(data)), rng.randint(0, 3)))
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


def answers(n: int) -> tuple[list[list[bytes]], int]:
    """n answers, each in pieces, and the total length of their bodies."""
    rng = random.Random(1)
    made = [typical_answer(i % 97) for i in range(n)]
    return [cut(raw, rng) for raw, _ in made], sum(size for _, size in made)


class ScriptedStream:
    """What `Connection` reads from: the pieces, one per receive; sends go nowhere."""

    def __init__(self, pieces: list[bytes]) -> None:
        self._pieces = pieces[::-1]

    async def send_all(self, data: bytes) -> None:
        pass

    async def receive_some(self, max_bytes: int) -> bytes:
        return self._pieces.pop() if self._pieces else b""


def load_module(name: str, source: str) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__file__ = f"<{name}>"
    sys.modules[name] = module  # dataclasses look their module up
    exec(compile(source, module.__file__, "exec"), module.__dict__)
    return module


def through_connection(module: types.ModuleType, all_answers: list[list[bytes]], expected: int) -> float:
    """Seconds to read every answer through `module.Connection`, one kept connection."""
    pieces = [piece for answer in all_answers for piece in answer]

    async def main() -> float:
        connection = module.Connection(ScriptedStream(pieces))
        started = time.perf_counter()
        total = 0
        for _ in all_answers:
            await connection.send(b"POST / HTTP/1.1\r\n\r\n", b"", None)
            head = await connection.receive_head(b"POST", None)
            async for part in connection.body(head, None):
                total += len(part)
        elapsed = time.perf_counter() - started
        assert connection.reusable and total == expected, total
        return elapsed

    return trio.run(main)


def through_core(module: types.ModuleType, all_answers: list[list[bytes]]) -> float:
    parser = module.ResponseParser()
    need_data, head_type = module.NEED_DATA, module.ResponseHead
    started = time.perf_counter()
    for answer in all_answers:
        parser.start(b"POST")
        pieces = iter(answer)
        while True:
            event = parser.next_event()
            if event is need_data:
                parser.feed(next(pieces))
            elif type(event) is not bytes and type(event) is not head_type:
                break
    return time.perf_counter() - started


def through_h11(all_answers: list[list[bytes]]) -> float:
    started = time.perf_counter()
    connection = h11.Connection(h11.CLIENT)
    request = h11.Request(method="POST", target="/", headers=[("Host", "miner")])
    for answer in all_answers:
        connection.send(request)
        connection.send(h11.EndOfMessage())
        pieces = iter(answer)
        while True:
            event = connection.next_event()
            if event is h11.NEED_DATA:
                connection.receive_data(next(pieces))
            elif type(event) is h11.EndOfMessage:
                break
        connection.start_next_cycle()
    return time.perf_counter() - started


def best(measure: Callable[[], float], repeat: int) -> float:
    return min(measure() for _ in range(repeat))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default="5023ec2", help="git revision whose engine/http1.py is the old code")
    parser.add_argument("--answers", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args(argv)
    all_answers, expected = answers(args.answers)
    old_source = subprocess.run(["git", "show", f"{args.baseline}:engine/http1.py"], cwd=ROOT, check=True,
                                capture_output=True, text=True).stdout
    old = load_module("http1_baseline", old_source)
    spec = importlib.util.spec_from_file_location("http1_current", ROOT / "engine" / "http1.py")
    assert spec is not None and spec.loader is not None
    new = importlib.util.module_from_spec(spec)
    sys.modules["http1_current"] = new
    spec.loader.exec_module(new)
    per = 1e6 / args.answers
    rows = [(f"Connection, {args.baseline} (old)", lambda: through_connection(old, all_answers, expected)),
            ("Connection, working tree (new)", lambda: through_connection(new, all_answers, expected))]
    if hasattr(new, "ResponseParser"):
        rows.append(("I/O-free core alone (new)", lambda: through_core(new, all_answers)))
    rows.append(("h11 alone", lambda: through_h11(all_answers)))
    results: dict[str, float] = {}
    for _ in range(2):  # interleaved rounds: a machine that slows down costs every line alike
        for name, measure in rows:
            results[name] = min(results.get(name, float("inf")), best(measure, args.repeat))
    print(f"{args.answers} answers of {len(typical_answer(0)[0])} bytes in 1-4 pieces; us per answer (best):")
    for name, _ in rows:
        print(f"  {name:40s} {results[name] * per:7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
