"""Client-side latency metrics against hand-worked examples."""

from __future__ import annotations

import json

import pytest

from clients.metrics import Distribution, RequestRecord, attains_slo, distribution_ms, summarize


def make_record(index: int, arrival_s: float, token_times_s: list[float], end_s: float | None,
                finish_reason: str | None = "length", **fields) -> RequestRecord:
    return RequestRecord(index, arrival_s, send_s=arrival_s if end_s is not None else None,
                         token_times_s=token_times_s, end_s=end_s, finish_reason=finish_reason, **fields)


def hand_worked() -> list[RequestRecord]:
    """r0..r3 succeed; r4 failed (a 429); r5 was never sent (cut by the duration)."""
    return [
        make_record(0, 0.0, [0.1, 0.2, 0.4], 0.4),  # TTFT 100, ITL 100 200, TPOT 150, E2E 400
        make_record(1, 0.5, [0.8, 0.9], 0.9),  # TTFT 300, ITL 100, TPOT 100, E2E 400
        make_record(2, 1.0, [1.2], 1.25, "stop"),  # TTFT 200, one token: no ITL/TPOT, E2E 250
        make_record(3, 1.5, [1.6, 2.0], 2.0),  # TTFT 100, ITL 400, TPOT 400, E2E 500
        make_record(4, 1.8, [], 1.85, None, error="APIError: 429: queue full"),
        make_record(5, 1.9, [], None, None, error="not sent", is_unfinished=True),
    ]


def approx_distribution(count, mean, p50, p90, p99) -> Distribution:
    return Distribution(count, pytest.approx(mean), pytest.approx(p50), pytest.approx(p90), pytest.approx(p99))


def test_per_request_quantities():
    r0, r1, r2, _, r4, r5 = hand_worked()
    assert (r0.ttft_s, r0.tpot_s, r0.e2e_s, r0.num_output_tokens) == pytest.approx((0.1, 0.15, 0.4, 3))
    assert r0.itls_s == pytest.approx([0.1, 0.2])
    assert r2.tpot_s is None and r2.itls_s == [] and r2.is_ok
    assert r1.is_ok and not r4.is_ok and not r5.is_ok
    assert r4.ttft_s is None and r5.e2e_s is None
    assert not make_record(9, 0.0, [0.1], 0.2, finish_reason=None).is_ok  # no finish: it did not complete


def test_summary_of_the_hand_worked_records():
    s = summarize(hand_worked(), slo_ttft_ms=250, slo_tbt_ms=200)
    assert (s.num_requests, s.num_ok, s.num_failed, s.num_unfinished, s.num_output_tokens) == (6, 4, 1, 1, 8)
    assert s.span_s == pytest.approx(2.0)  # first arrival 0.0 to the last token, r3's at 2.0
    assert s.request_throughput_per_s == pytest.approx(4 / 2.0)
    assert s.output_token_throughput_per_s == pytest.approx(8 / 2.0)
    # numpy linear: value at rank p/100 * (n - 1) of the sorted values
    assert s.ttft_ms == approx_distribution(4, 175, 150, 270, 297)  # sorted 100 100 200 300
    assert s.itl_ms == approx_distribution(4, 200, 150, 340, 394)  # sorted 100 100 200 400
    assert s.tpot_ms == approx_distribution(3, 650 / 3, 150, 350, 395)  # sorted 100 150 400
    assert s.e2e_ms == approx_distribution(4, 387.5, 400, 470, 497)  # sorted 250 400 400 500
    # r0 attains; r1's TTFT 300 > 250; r2 is judged on its TTFT alone; r3's TPOT 400 > 200;
    # r4 failed, r5 never ran: 2 of 6
    assert s.num_attained == 2
    assert s.slo_attainment == pytest.approx(2 / 6)
    assert s.goodput_per_s == pytest.approx(2 / 2.0)


def test_slo_is_on_ttft_and_tpot_not_on_single_gaps():
    r0, r1, r2, r3, r4, r5 = hand_worked()
    assert [attains_slo(r, 1000, 1000) for r in hand_worked()] == [True, True, True, True, False, False]
    assert not attains_slo(r0, 1000, 120) and attains_slo(r0, 1000, 160)  # TPOT 150 though one gap is 200
    assert attains_slo(r2, 250, 0.001)  # one token: TPOT is not asked
    assert summarize(hand_worked(), 1000, 1000).goodput_per_s == pytest.approx(4 / 2.0)


def test_percentiles_interpolate_linearly():
    d = distribution_ms([0.001, 0.002, 0.003, 0.004, 0.010])  # ms: 1 2 3 4 10
    assert d == approx_distribution(5, 4.0, 3.0, 7.6, 9.76)  # p90: rank 3.6 -> 4 + 0.6 * 6
    assert distribution_ms([0.005]) == approx_distribution(1, 5.0, 5.0, 5.0, 5.0)
    assert distribution_ms([]) == Distribution(0, None, None, None, None)


def test_empty_and_all_failed_runs():
    s = summarize([], 100, 100)
    assert (s.num_requests, s.span_s, s.slo_attainment, s.goodput_per_s, s.ttft_ms.p50) == (0, 0.0, None, None, None)
    failed = summarize([make_record(0, 0.0, [], None, None, error="x")], 100, 100)
    assert (failed.num_failed, failed.slo_attainment, failed.request_throughput_per_s) == (1, 0.0, None)


def test_json_and_table():
    s = summarize(hand_worked(), 250, 200)
    d = json.loads(json.dumps(s.to_dict()))
    assert d["ttft_ms"]["p90"] == pytest.approx(270) and d["num_attained"] == 2 and d["tpot_ms"]["count"] == 3
    table = s.table()
    assert "6 (4 ok, 1 failed, 1 unfinished)" in table
    assert "TTFT" in table and "270.0" in table and "2/6 = 33.3%" in table
    # the hand-worked figures of test_summary_of_the_hand_worked_records, as printed
    assert table.splitlines() == [
        "requests     6 (4 ok, 1 failed, 1 unfinished) over 2.00 s",
        "throughput   2.00 req/s, 4.0 output tok/s (8 tokens)",
        "latency (ms)      n      mean       p50       p90       p99",
        "TTFT              4     175.0     150.0     270.0     297.0",
        "ITL               4     200.0     150.0     340.0     394.0",
        "TPOT              3     216.7     150.0     350.0     395.0",
        "E2E               4     387.5     400.0     470.0     497.0",
        "SLO          TTFT <= 250 ms and TPOT <= 200 ms: 2/6 = 33.3%, goodput 1.00 req/s",
    ]
    # nothing measured: every figure without a value prints "-", the counts print 0
    assert summarize([], 100, 100).table().splitlines() == [
        "requests     0 (0 ok, 0 failed, 0 unfinished) over 0.00 s",
        "throughput   - req/s, - output tok/s (0 tokens)",
        "latency (ms)      n      mean       p50       p90       p99",
        "TTFT              0         -         -         -         -",
        "ITL               0         -         -         -         -",
        "TPOT              0         -         -         -         -",
        "E2E               0         -         -         -         -",
        "SLO          TTFT <= 100 ms and TPOT <= 100 ms: 0/0 = -, goodput - req/s",
    ]
    assert json.loads(json.dumps(hand_worked()[0].to_dict()))["token_times_s"] == [0.1, 0.2, 0.4]
