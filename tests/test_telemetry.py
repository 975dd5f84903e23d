"""The request recorder: what the chart, the histograms and the access line are made of."""

from __future__ import annotations

import re

import pytest

from web.asgi import access_line, request_id_from
from web.telemetry import (
    TTFT_BIN_RATIO,
    RequestRecord,
    Telemetry,
    loggable_path,
    percentile_of,
    route_template,
    ttft_bin,
)


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def finished(telemetry: Telemetry, clock: Clock, *, status: int = 200, ttft_s: float | None = None,
             route: str | None = "/v1/chat/completions", duration_s: float = 0.05) -> None:
    record = RequestRecord(id="r", method="POST", path="/v1/chat/completions", started=clock.now - duration_s,
                           route=route, status=status, ended=clock.now, ttft_s=ttft_s)
    telemetry.started()
    telemetry.finished(record)


def test_the_chart_counts_requests_errors_and_first_token_percentiles_per_point() -> None:
    clock = Clock(1000.2)
    telemetry = Telemetry(window_s=600, clock=clock)
    for i in range(100):  # one second: 100 requests, first tokens 10..109 ms
        finished(telemetry, clock, ttft_s=0.010 + i / 1000)
    for _ in range(5):
        finished(telemetry, clock, status=502)
    finished(telemetry, clock, status=429)
    clock.now = 1003.5  # 1000 is now a completed second
    chart = telemetry.chart(seconds=10, step=5)
    points = chart["points"]
    # Points are aligned to multiples of 5 s and end at the last completed second: [993, 994] (the
    # first, cut by the 10 s asked), [995, 999], [1000, 1002]; `t` is each one's end, from now.
    assert [p["t"] for p in points] == [-8.5, -3.5, -0.5]
    second = points[-1]
    assert second["requests_per_s"] == pytest.approx(106 / 3, abs=0.001)
    assert second["errors_per_s"] == pytest.approx(5 / 3, abs=0.001)
    assert second["rejected_per_s"] == pytest.approx(1 / 3, abs=0.001)
    # Percentiles come from bins 10% wide: within 5% of the exact ones (59 ms and 108 ms).
    assert second["ttft_p50_s"] == pytest.approx(0.059, rel=0.06)
    assert second["ttft_p99_s"] == pytest.approx(0.108, rel=0.06)
    assert points[1]["requests_per_s"] == 0 and points[1]["ttft_p50_s"] is None
    assert telemetry.summary() == {"total": 106, "errors": 5, "in_flight": 0}


def test_the_chart_is_bounded_and_forgets_what_is_older_than_its_window() -> None:
    clock = Clock(0.5)
    telemetry = Telemetry(window_s=60, clock=clock)
    for second in range(200):  # more seconds than the window holds: slots are reused
        clock.now = second + 0.5
        finished(telemetry, clock, ttft_s=0.5)
    assert len(telemetry._seconds) == 60
    clock.now = 200.5
    points = telemetry.chart(seconds=600, step=1)["points"]
    assert len(points) == 59  # at most the window, less the second still running
    assert all(p["requests_per_s"] == 1 for p in points)
    clock.now = 400.5  # long after: nothing is left from then
    assert all(p["requests_per_s"] == 0 for p in telemetry.chart(seconds=60, step=1)["points"])


def test_monitoring_requests_are_counted_but_left_out_of_the_chart() -> None:
    clock = Clock(10.0)
    telemetry = Telemetry(clock=clock)
    finished(telemetry, clock, route="/status/data")
    finished(telemetry, clock, route="/metrics")
    finished(telemetry, clock, route=None, status=404)  # unmatched paths are traffic
    clock.now = 12.0
    points = telemetry.chart(seconds=5, step=1)["points"]
    assert sum(p["requests_per_s"] for p in points) == 1
    assert telemetry.responses == {("/status/data", "200"): 1, ("/metrics", "200"): 1, ("unmatched", "404"): 1}


def test_histograms_are_cumulative_with_inclusive_bounds() -> None:
    clock = Clock()
    telemetry = Telemetry(clock=clock)
    for duration in (0.005, 0.006, 0.3, 1000.0):
        finished(telemetry, clock, duration_s=duration, ttft_s=0.01)
    finished(telemetry, clock, status=503, duration_s=0.001)
    histogram = telemetry.durations[("/v1/chat/completions", "2xx")]
    buckets = dict(histogram.cumulative())
    assert buckets["0.005"] == 1 and buckets["0.01"] == 2 and buckets["0.25"] == 2 and buckets["0.5"] == 3
    assert buckets["300.0"] == 3 and buckets["+Inf"] == 4
    assert histogram.total == pytest.approx(1000.311)
    assert dict(telemetry.durations[("/v1/chat/completions", "5xx")].cumulative())["+Inf"] == 1
    assert dict(telemetry.ttfts["/v1/chat/completions"].cumulative())["0.01"] == 4


def test_ttft_bins_and_percentiles() -> None:
    assert ttft_bin(0.0) == ttft_bin(0.001) == 0
    assert ttft_bin(0.0011) == 1 and ttft_bin(0.001 * TTFT_BIN_RATIO) == 1
    assert ttft_bin(1e9) == ttft_bin(1e6)  # the last bin holds everything longer
    bins = {ttft_bin(0.1): 99, ttft_bin(2.0): 1}
    assert percentile_of(bins, 0.5) == pytest.approx(0.1, rel=0.05)
    assert percentile_of(bins, 0.99) == pytest.approx(0.1, rel=0.05)
    assert percentile_of(bins, 1.0) == pytest.approx(2.0, rel=0.05)
    assert percentile_of({}, 0.5) is None


@pytest.mark.parametrize(("given", "kept"), [
    (b"abc-123", True),
    (b"0b9f3c1e-8f0e-4a57-9d55-6b3b1f7c2a10", True),
    (b"trace:span/1+2=3~x_y.z", True),
    (b"x" * 64, True),
    (b"x" * 65, False),
    (b"has space", False),
    (b"line\r\nbreak", False),
    (b'quote"', False),
    (b"\xff\xfe", False),
    (b"", False),
])
def test_a_clients_request_id_is_kept_only_when_it_is_a_short_printable_token(given: bytes, kept: bool) -> None:
    got = request_id_from([(b"x-request-id", given)])
    if kept:
        assert got == given.decode()
    else:
        assert re.fullmatch(r"[0-9a-f]{32}", got)
    assert re.fullmatch(r"[0-9a-f]{32}", request_id_from([]))
    assert request_id_from([]) != request_id_from([])


def test_logged_paths_name_the_route_and_cut_what_could_be_a_key() -> None:
    key = "sn1-AbCdEfGhIjKlMnOpQrStUvWxYz012345"
    matched = RequestRecord(id="r", method="PUT", path=f"/modify-api-key/{key}", started=0.0,
                            route=route_template("/modify-api-key/<api_key>"))
    assert loggable_path(matched) == "/modify-api-key/{api_key}"
    assert route_template("/docs/assets/<package>/<version>/<path:name>") == "/docs/assets/{package}/{version}/{name}"
    unmatched = RequestRecord(id="r", method="GET", path=f"/modify-api-key/{key}", started=0.0)
    assert loggable_path(unmatched) == "/modify-api-key/sn1-..."
    hostile = RequestRecord(id="r", method="GET", path="/a\nb/" + "c" * 500, started=0.0)
    assert loggable_path(hostile) == "/a?b/cccc..."
    assert len(loggable_path(RequestRecord(id="r", method="GET", path="/ab" * 300, started=0.0))) <= 203


def test_the_access_line_says_each_field_or_a_dash() -> None:
    line = access_line({"method": "POST", "path": "/v1/chat/completions", "status": 200, "duration_ms": 35.2,
                        "key": "sn1-AbCd", "miners": [0, 3, 4], "winner": 3, "ttft_ms": 20.4})
    assert line == "POST /v1/chat/completions 200 35.2ms key=sn1-AbCd miners=0,3,4 winner=3 ttft=20.4ms"
    line = access_line({"method": "GET", "path": "/health", "status": None, "duration_ms": 0.3,
                        "key": None, "miners": [], "winner": None, "ttft_ms": None})
    assert line == "GET /health - 0.3ms key=- miners=- winner=- ttft=-"
