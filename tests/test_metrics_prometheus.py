"""`/metrics` over a devnet, read with `prometheus_client`'s own parser: real types, identifiers only in
labels, and values that follow from the requests made."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import prometheus_client
import trio
from prometheus_client.exposition import generate_latest

from tests import devnet_stack
from tests.chat_stack import Stack
from tests.metrics_support import scrape

CHAT = "/v1/chat/completions"


async def wait_delivered(net: devnet_stack.Net, count: int) -> None:
    with trio.fail_after(10):
        while net.gateway.services.readiness()["scoring"]["delivered"] < count:  # noqa: ASYNC110 - a figure
            await trio.sleep(0.05)


async def test_families_have_real_types_labels_and_the_values_of_the_requests_made(
        nursery: trio.Nursery, tmp_path: Path) -> None:
    with trio.fail_after(60):
        net = await devnet_stack.start(nursery, tmp_path, miners=2, fanout=2, faults=("", "http_500"))
        for i in range(3):
            await devnet_stack.stream_chat(net.client, f"count to {i}")
        whole = await net.client.post(CHAT, json={"messages": [{"role": "user", "content": "once more"}]})
        assert whole.status_code == 200
        refused = await net.client.post(CHAT, headers={"api-key": "sn1-not-a-key-of-this-gateway-000"},
                                        json={"messages": [{"role": "user", "content": "hi"}]})
        assert refused.status_code == 401
        await net.gateway.services.fanout.wait_idle()
        await wait_delivered(net, 4)
        response = await net.client.get("/metrics")
    assert response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    metrics = scrape(response.text)

    kinds = {name: metrics.kind(name) for name in (
        "sn1_gateway_http_request_duration_seconds", "sn1_gateway_time_to_first_token_seconds",
        "sn1_gateway_http_responses", "sn1_gateway_scoring_delivered", "sn1_gateway_scoring_queued",
        "sn1_gateway_scoring_dropped", "sn1_gateway_fanout_miner_failures", "sn1_gateway_connections_open",
        "sn1_gateway_miner_breaker_state", "sn1_gateway_miner_successes", "sn1_gateway_actor_restarts")}
    assert kinds == {
        "sn1_gateway_http_request_duration_seconds": "histogram", "sn1_gateway_time_to_first_token_seconds": "histogram",
        "sn1_gateway_http_responses": "counter", "sn1_gateway_scoring_delivered": "counter",
        "sn1_gateway_scoring_queued": "gauge", "sn1_gateway_scoring_dropped": "counter",
        "sn1_gateway_fanout_miner_failures": "counter", "sn1_gateway_connections_open": "gauge",
        "sn1_gateway_miner_breaker_state": "gauge", "sn1_gateway_miner_successes": "counter",
        "sn1_gateway_actor_restarts": "counter"}

    # The requests: four answered chats (the first three streamed), one refused key.
    assert metrics.value("sn1_gateway_http_responses_total", route=CHAT, status="200") == 4
    assert metrics.value("sn1_gateway_http_responses_total", route=CHAT, status="401") == 1
    assert metrics.value("sn1_gateway_http_request_duration_seconds_count", route=CHAT, status_class="2xx") == 4
    assert metrics.value("sn1_gateway_http_request_duration_seconds_bucket", route=CHAT, status_class="4xx",
                         le="+Inf") == 1
    assert 0 < metrics.value("sn1_gateway_http_request_duration_seconds_sum", route=CHAT, status_class="2xx") < 30
    assert metrics.value("sn1_gateway_time_to_first_token_seconds_count", route=CHAT) == 4
    # Devnet miners send their first token after 20 ms: no answer came before that, all within 5 s.
    assert metrics.value("sn1_gateway_time_to_first_token_seconds_bucket", route=CHAT, le="0.01") == 0
    assert metrics.value("sn1_gateway_time_to_first_token_seconds_bucket", route=CHAT, le="5.0") == 4
    assert metrics.value("sn1_gateway_http_requests_in_flight") == 1  # this scrape

    # The miners: uid 0 answered all four; uid 1 failed three times, which opened its breaker, so the
    # fourth request went to uid 0 alone.
    hotkeys = {n.uid: n.hotkey for n in net.gateway.services.subnet.get().neurons}
    assert metrics.value("sn1_gateway_miner_successes_total", uid="0", hotkey=hotkeys[0]) == 4
    assert metrics.value("sn1_gateway_miner_failures_total", uid="1", hotkey=hotkeys[1]) == 3
    assert metrics.value("sn1_gateway_miner_breaker_state", uid="1", state="open") == 1
    assert metrics.value("sn1_gateway_miner_breaker_state", uid="1", state="closed") == 0
    assert metrics.value("sn1_gateway_miner_breaker_state", uid="0", state="closed") == 1
    assert metrics.value("sn1_gateway_fanout_jobs_total") == 4
    assert metrics.value("sn1_gateway_fanout_miner_failures_total", kind="failed") == 3
    assert metrics.value("sn1_gateway_fanout_miner_failures_total", kind="over_bounds") == 0

    # Scoring: every fan-out delivered, to the devnet's validator, named by a label.
    validator = next(n for n in net.gateway.services.subnet.get().neurons if n.axon and n.validator_permit)
    assert metrics.value("sn1_gateway_scoring_delivered_total") == 4
    assert metrics.value("sn1_gateway_scoring_validator_delivered_total", hotkey=validator.hotkey) == 4
    assert metrics.value("sn1_gateway_scoring_dropped_total", reason="overflow") == 0
    assert metrics.value("sn1_gateway_actor_running", actor="scoring") == 1
    assert metrics.value("sn1_gateway_keys_failed_auth_total") == 1

    # No identifier in any name, and every declared number has its family (nothing left over).
    for name in metrics.families:
        assert not any(hotkey in name for hotkey in hotkeys.values()), name
    assert metrics.find("sn1_gateway_health_figure") == []


async def test_a_number_no_family_declares_still_appears_under_its_exact_path(
        nursery: trio.Nursery, tmp_path: Path) -> None:
    class NewPart:
        """A part added later, whose report holds identifiers as keys and paths that look alike."""

        name = "newpart"

        def health(self) -> dict[str, Any]:
            return {"served": 7, "by_peer": {"5Fabc": 1, "5F-abc": 2}, "a-b": 3, "a_b": 4,
                    "ok": True, "note": "text is left out", "unknown": None}

    with trio.fail_after(60):
        net = await devnet_stack.start(nursery, tmp_path, miners=1, fanout=1)
        net.gateway.services.actors.add(NewPart())
        first = scrape((await net.client.get("/metrics")).text)
        await devnet_stack.stream_chat(net.client, "hello")
        second = scrape((await net.client.get("/metrics")).text)
    figures = {s.labels["figure"]: s.value for s in first.find("sn1_gateway_health_figure", part="newpart")}
    assert figures == {"served": 7, "by_peer.5Fabc": 1, "by_peer.5F-abc": 2, "a-b": 3, "a_b": 4, "ok": 1}
    assert first.kind("sn1_gateway_health_figure") == "unknown"
    # Read afresh on every scrape.
    assert first.find("sn1_gateway_http_responses_total", route=CHAT) == []
    assert second.value("sn1_gateway_http_responses_total", route=CHAT, status="200") == 1


async def test_each_scrape_reads_every_parts_report_once(stack: Stack) -> None:
    class Counted:
        """A part whose report costs something to build (here: it counts its reads)."""

        name = "counted"
        reads = 0

        def health(self) -> dict[str, Any]:
            self.reads += 1
            return {"reads": self.reads}

    part = Counted()
    stack.gateway.services.actors.add(part)
    for _ in range(3):
        response = await stack.client.get("/metrics")
        assert response.status_code == 200
    assert part.reads == 3  # before: twice per scrape (readiness, then the parts again)
    assert scrape(response.text).find("sn1_gateway_health_figure", part="counted", figure="reads")[0].value == 3


def test_the_process_wide_registry_holds_none_of_the_gateways_metrics() -> None:
    assert b"sn1_gateway" not in generate_latest(prometheus_client.REGISTRY)
