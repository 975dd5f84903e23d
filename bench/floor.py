"""The stack's floor: what Quart-Trio on Hypercorn alone spends on one chat request.

A bare app, served as the gateway is served (the same Hypercorn settings, the same ASGI wrapper, the
heap settled the same way once listening), reads and parses the request body and answers a fixed
chat completion as long as the gateway's answer. No key, no miner, no scoring: what the gateway
spends beyond this figure is its own work, and the figure itself is the least any handler on this
stack costs on this machine, in this run. `python -m bench.floor` prints "listening on URL" when ready
and stops on SIGINT or SIGTERM.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from collections.abc import Sequence
from functools import partial

import trio
from quart import Response, request
from quart_trio import QuartTrio

from config.settings import ServerSettings, Settings
from web import inbound
from web.errors import ApiError, install_error_handlers
from web.server import serve, settle_heap
from wire import jsonio


def fixed_completion(tokens: int) -> bytes:
    """A chat completion of `tokens` words, shaped as the gateway answers one."""
    text = "".join(f"word{i} " for i in range(tokens))
    return jsonio.dumps({
        "id": "chatcmpl-floor", "object": "chat.completion", "created": int(time.time()), "model": "floor",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop",
                     "logprobs": None}],
        "usage": {"prompt_tokens": 12, "completion_tokens": tokens, "total_tokens": 12 + tokens},
    })


def floor_app(tokens: int, max_body_bytes: int) -> QuartTrio:
    app = QuartTrio("sn1_gateway_floor")
    app.config["MAX_CONTENT_LENGTH"] = max_body_bytes
    install_error_handlers(app)
    answer = fixed_completion(tokens)

    @app.post("/v1/chat/completions")
    async def chat() -> Response:
        try:
            body = jsonio.loads(await request.get_data())
        except ValueError:
            raise ApiError(400, "the body is not valid JSON", code="invalid_json") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object", code="invalid_body")
        return Response(answer, content_type="application/json")

    return app


async def serve_floor(host: str, port: int, tokens: int) -> None:
    settings = Settings(server=ServerSettings(host=host, port=port))
    app = floor_app(tokens, settings.server.max_body_bytes)
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:
        connections = inbound.Connections(settings.server.max_connections,
                                          busy_idle_s=settings.server.keep_alive_busy_s,
                                          head_timeout_s=settings.server.request_head_timeout_s)
        urls = await nursery.start(partial(serve, app, settings, connections, shutdown_trigger=shutdown.wait,
                                           drain_deadline=lambda: trio.current_time()))
        settle_heap()
        print(f"floor listening on {urls[0]}", flush=True)
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                shutdown.set()
                break


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--tokens", type=int, default=16, help="words in the fixed answer")
    args = parser.parse_args(argv)
    trio.run(serve_floor, args.host, args.port, args.tokens)
    return 0


if __name__ == "__main__":
    sys.exit(main())
