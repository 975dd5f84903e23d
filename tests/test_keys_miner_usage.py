"""A miner's usage report reaches the key store through chat: a hostile count must not reach the file."""

from __future__ import annotations

import json
import re
from pathlib import Path

from actors.keystore import keyfile
from actors.keystore.records import INT64_MAX, key_id_of
from tests.chat_stack import Stack
from tests.scripted_miners import chunk


async def test_a_miner_reporting_2_64_tokens_changes_no_total_beyond_a_requests_bound(
    stack: Stack, tmp_path: Path
) -> None:
    final = json.loads(chunk(None, "stop")[6:])
    final["usage"] = {"prompt_tokens": 2**64 - 1, "completion_tokens": 2**64 - 1, "total_tokens": 2**65}
    script = [(0.0, chunk("a")), (0.0, chunk("b")), (0.0, f"data: {json.dumps(final)}\n\n"), (0.0, "data: [DONE]\n\n")]
    for port in (9001, 9002, 9003):
        stack.miners.scripts[port] = script
    for body in ({"uids": [1]}, {"uids": [2], "stream": True, "stream_options": {"include_usage": True}}):
        response = await stack.chat(**body)
        assert response.status_code == 200, response.text
    keys = stack.gateway.services.keys
    await keys.flush()
    path = tmp_path / "keys.toml"
    saved = keyfile.read(path).keys[key_id_of(stack.key)]
    assert saved.requests == 2 and saved.tokens == 4  # each answer held to the 2 bytes it wrote, not its claim
    assert all(int(n) <= INT64_MAX for n in re.findall(rb"= ([0-9]+)\n", path.read_bytes()))
