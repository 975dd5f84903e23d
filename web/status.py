"""The status page for a person (`GET /status`), the figures it shows (`GET /status/data`, admin key),
and each miner's health as JSON (`GET /status/miners`).

The page is plain HTML, CSS and JS of our own from `web/static/status/`, sent as one document (the
script and the style inline, allowed by their hashes in its Content-Security-Policy), so it loads
nothing from anywhere: the gateway may run offline. It asks for the admin key once, keeps it in the
tab's session storage, and polls `status/data` every few seconds (`?refresh=SECONDS`, 1 to 60).

`/status/data` holds no key and no prompt: the keys appear by their display prefix only.
"""

from __future__ import annotations

import base64
import hashlib
import time
from dataclasses import dataclass, field
from importlib.resources import files
from typing import Any

import trio
from quart import Blueprint, Response

from actors.keystore import KeyStoreError
from actors.keystore.records import KeyInfo, iso_time
from web.auth import admin_required
from web.errors import json_response
from web.openapi import package_version
from web.services import Services
from web.whole import merge_status

PAGE_FILES = ("status.html", "status.css", "status.js")
KEYS_REFRESH_S = 5.0  # the key summary is read again at most this often (Redis: one pipelined read)
KEYS_TIMEOUT_S = 3.0
TOP_KEYS = 5
CHART_SECONDS = 300
CHART_STEP_S = 5


def source_hash(text: str) -> str:
    """The CSP source that allows exactly this inline script or style."""
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


def page_policy(script: str, style: str) -> str:
    """Nothing but the page's own inline script and style, and requests to its own origin."""
    return "; ".join((
        "default-src 'none'",
        f"script-src {source_hash(script)}",
        f"style-src {source_hash(style)}",
        "img-src data:",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ))


@dataclass(frozen=True, slots=True)
class Page:
    html: str
    policy: str


def build_page() -> Page:
    """The page, from the packaged files (read off the event loop, once per app)."""
    root = files("web").joinpath("static", "status")
    html, style, script = (root.joinpath(name).read_text(encoding="utf-8") for name in PAGE_FILES)
    return Page(html.replace("/*STYLE*/", style).replace("/*SCRIPT*/", script), page_policy(script, style))


def short_hotkey(hotkey: str) -> str:
    return hotkey if len(hotkey) <= 12 else f"{hotkey[:6]}…{hotkey[-4:]}"


def miners_table(services: Services) -> list[dict[str, Any]]:
    """One row per miner: every serving neuron without a validator permit, and any other the fan-out
    has asked (one named by `uids`, one gone from the metagraph)."""
    neurons = services.subnet.get().by_uid
    health = services.miner_health.report()
    uids = {n.uid for n in neurons.values() if n.axon and not n.validator_permit} | {int(u) for u in health}
    rows = []
    for uid in sorted(uids):
        neuron = neurons.get(uid)
        miner = health.get(str(uid))
        hotkey = neuron.hotkey if neuron is not None else None
        rows.append({
            "uid": uid,
            "hotkey": hotkey,
            "hotkey_short": None if hotkey is None else short_hotkey(hotkey),
            "axon": None if neuron is None else neuron.axon,
            "incentive": None if neuron is None else neuron.incentive,
            "breaker": "closed" if miner is None else miner["breaker"],
            "ttft_s": None if miner is None else miner["ttft_ewma_s"],
            "failure_rate": 0.0 if miner is None else miner["failure_ewma"],
            "requests": 0 if miner is None else miner["successes"] + miner["failures"],
            "successes": 0 if miner is None else miner["successes"],
            "failures": 0 if miner is None else miner["failures"],
            "retry_in_s": None if miner is None else miner["retry_in_s"],
            "last_error": None if miner is None else miner["last_error"],
        })
    return rows


def scoring_summary(report: dict[str, Any] | None) -> dict[str, Any] | None:
    """The scoring pipeline's figures; each validator with the operator's fix when it refuses us."""
    if report is None:
        return None
    dropped = {reason: count for reason, count in report.get("dropped", {}).items() if count}
    spool = report.get("spool", {})
    validators = [{
        "hotkey": hotkey,
        "hotkey_short": short_hotkey(hotkey),
        "axon": state.get("axon"),
        "delivered": state.get("delivered", 0),
        "failures": state.get("failures", 0),
        "rejected": state.get("rejected", 0),
        "refused_signer": state.get("refused_signer", False),
        "backoff_s": state.get("backoff_remaining_s", 0.0),
        "hint": state.get("hint"),
        "last_error": state.get("last_error"),
    } for hotkey, state in report.get("validators", {}).items()]
    return {
        "enabled": report.get("enabled", False),
        "queued": report.get("queued", 0),
        "queue_size": report.get("queue_size", 0),
        "in_flight": report.get("in_flight", 0),
        "delivered": report.get("delivered", 0),
        "replayed": report.get("replayed", 0),
        "spooled": report.get("spooled", 0),
        "spool_pending": spool.get("pending", 0),
        "spool_bytes": spool.get("bytes", 0),
        "refused": report.get("validators_refusing_signer", 0),
        "dropped": dropped,
        "dropped_total": sum(dropped.values()),
        "warnings": list(report.get("warnings", [])),
        "validators": validators,
    }


def key_row(info: KeyInfo) -> dict[str, Any]:
    return {"prefix": info.prefix, "requests": info.requests, "tokens": info.tokens,
            "rate_limit": info.rate_limit, "last_used_at": iso_time(info.last_used_at)}


@dataclass
class KeySummary:
    """How many keys there are and the most used few, read again at most every KEYS_REFRESH_S."""

    read_at: float | None = None
    summary: dict[str, Any] = field(default_factory=dict)

    async def get(self, services: Services) -> dict[str, Any]:
        now = trio.current_time()
        if self.read_at is not None and now - self.read_at < KEYS_REFRESH_S:
            return self.summary
        try:
            with trio.fail_after(KEYS_TIMEOUT_S):
                keys = await services.keys.list_keys()
        except (KeyStoreError, trio.TooSlowError) as exc:
            reason = "the key store did not answer in time" if isinstance(exc, trio.TooSlowError) else str(exc)
            return {"count": None, "top": [], "error": reason, **{k: v for k, v in self.summary.items()
                                                                    if k in ("count", "top")}}
        top = sorted(keys, key=lambda k: (-k.requests, -k.tokens, k.prefix))[:TOP_KEYS]
        self.summary = {"count": len(keys), "top": [key_row(k) for k in top], "error": None}
        self.read_at = now
        return self.summary


async def status_data(services: Services, keys: KeySummary) -> dict[str, Any]:
    return {**status_figures(services), "keys": await keys.get(services)}


def status_figures(services: Services) -> dict[str, Any]:
    """What `/status/data` shows but the keys: figures at hand, no I/O (what each worker publishes)."""
    report = services.readiness()
    actors = [{"name": name, **state} for name, state in report["actors"].items()]
    return {
        "time": time.time(),
        "version": package_version(),
        "hotkey": services.signer.ss58,
        "ready": report["ready"],
        "draining": report["draining"],
        "requests": services.telemetry.summary(),
        "chart": services.telemetry.chart(seconds=CHART_SECONDS, step=CHART_STEP_S),
        "miners": miners_table(services),
        "scoring": scoring_summary(report.get("scoring")),
        "actors": actors,
    }


def blueprint(services: Services) -> Blueprint:
    bp = Blueprint("status", __name__)
    pages: list[Page] = []  # built on first request
    keys = KeySummary()

    @bp.get("/status")
    async def status_page() -> Response:
        if not pages:
            pages.append(await trio.to_thread.run_sync(build_page))
        page = pages[0]
        return Response(page.html, content_type="text/html; charset=utf-8", headers={
            "Cache-Control": "no-cache",
            "Content-Security-Policy": page.policy,
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
        })

    @bp.get("/status/data")
    async def status_figures() -> Response:
        admin_required(services)
        data = await status_data(services, keys)
        if services.peers is not None:
            data = merge_status(data, services.peers.index, await services.peers.others())
        return json_response(data, headers={"Cache-Control": "no-store"})

    @bp.get("/status/miners")
    async def miners_status() -> Response:
        return json_response({"miners": services.miner_health.report(),
                              "fanout": services.fanout.health()})

    return bp
