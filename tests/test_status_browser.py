"""The status page in a real browser: headless Chromium (Debian's `chromium`, which .ci/run installs)
loads `/status` from a gateway over a devnet while load runs, is given the admin key once, shows one row
per miner and the API_HOTKEY fix of a validator refusing us, logs no console error, and redraws on its
own: two screenshots some seconds apart differ, and so do the figures on them."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from tests import devnet_stack
from tests.cdp import Browser, find_chromium
from tests.observe_support import ADMIN_KEY, start

CHROMIUM = find_chromium()
MINERS = 4

pytestmark = pytest.mark.skipif(
    CHROMIUM is None and not os.environ.get("CI"),
    reason="Debian's chromium is not installed (`apt-get install chromium`; .ci/run installs it, and in CI "
           "this test runs)")

FIGURES = """JSON.stringify({
  served: [...document.querySelectorAll('#request-tiles .tile')]
    .find(t => t.querySelector('span').textContent === 'requests served').querySelector('b').textContent,
  miners: [...document.querySelectorAll('#miners tbody tr')].map(r => r.textContent),
})"""


@dataclass
class Seen:
    asked: bool
    rows: list[int]
    first: bytes
    second: bytes
    before: dict[str, Any]
    after: dict[str, Any]
    hint: str
    kept: bool
    asked_again: bool
    problems: list[str]


def served(figures: dict[str, Any]) -> int:
    return int(figures["served"].replace(",", ""))


def look_at_the_page(url: str, profile: Path, shots: Path) -> Seen:
    """What a person does with the page; returns what they saw."""
    assert CHROMIUM is not None, "CI must have Debian's chromium: .ci/run installs it"
    browser = Browser(CHROMIUM, profile)
    try:
        browser.navigate(f"{url}/status?refresh=1")
        asked = browser.evaluate("!document.getElementById('login').hidden && document.getElementById('dashboard').hidden")
        browser.evaluate("document.getElementById('login-key').focus()")
        browser.page("Input.insertText", {"text": ADMIN_KEY})
        browser.evaluate("document.querySelector('#login-form button[type=submit]').click()")
        browser.wait_for("Number(document.body.dataset.updates || 0) >= 1")
        rows = browser.evaluate("[...document.querySelectorAll('#miners tbody tr')].map(r => Number(r.dataset.uid))")
        browser.pump(0.5)
        first = browser.screenshot()
        before = json.loads(browser.evaluate(FIGURES))
        updates = browser.evaluate("Number(document.body.dataset.updates)")
        browser.wait_for(f"Number(document.body.dataset.updates) >= {updates + 3}")  # three seconds on
        second = browser.screenshot()
        after = json.loads(browser.evaluate(FIGURES))
        hint = browser.evaluate("document.querySelector('#validators tbody').textContent")
        kept = browser.evaluate(f"sessionStorage.getItem('sn1-gateway.admin-key') === {json.dumps(ADMIN_KEY)}")
        # Opened again in the same tab: the key is not asked for again.
        browser.navigate(f"{url}/status?refresh=1")
        browser.wait_for("Number(document.body.dataset.updates || 0) >= 1")
        asked_again = browser.evaluate("!document.getElementById('login').hidden")
        browser.pump(0.3)
        (shots / "status-1.png").write_bytes(first)
        (shots / "status-2.png").write_bytes(second)
        return Seen(asked, rows, first, second, before, after, hint, kept, asked_again, list(browser.problems))
    finally:
        browser.close()


async def test_the_status_page_in_chromium_shows_every_miner_and_updates_itself(
        nursery: trio.Nursery, tmp_path: Path) -> None:
    with trio.fail_after(90):
        net = await start(nursery, tmp_path, miners=MINERS, faults=("", "http_500"),
                          validator_fault="refuse_signer")

        async def load() -> None:
            i = 0
            while True:
                i += 1
                await devnet_stack.stream_chat(net.client, f"load {i}")
                await trio.sleep(0.05)

        async with trio.open_nursery() as traffic:
            traffic.start_soon(load)
            seen = await trio.to_thread.run_sync(look_at_the_page, net.gateway.url, tmp_path / "profile", tmp_path)
            traffic.cancel_scope.cancel()

    assert seen.asked is True, "the page asks for the admin key first"
    assert sorted(seen.rows) == list(range(MINERS)), "one row per miner"
    assert seen.problems == [], "no console errors"
    assert seen.first != seen.second, "the page redrew itself"
    assert served(seen.after) > served(seen.before) > 0, (seen.before, seen.after)
    assert f"set API_HOTKEY={net.devnet.gateway_hotkey}" in seen.hint
    assert seen.kept is True and seen.asked_again is False
