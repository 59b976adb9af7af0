"""Client-side latency metrics over per-request records (DESIGN.md, "Latency metrics").

Definitions, all from what the client saw, times in seconds on the run's clock:
- TTFT: first token received - scheduled arrival (so waiting for a concurrency slot counts).
- ITL (TBT): gaps between consecutive tokens of a request, pooled over all requests.
- TPOT: (last token - first token) / (tokens - 1), per request with at least 2 tokens.
- E2E: end of the response - scheduled arrival.
- Latency distributions take the succeeded requests only (``is_ok``).
- Percentiles: numpy's default linear interpolation, the value at rank ``p / 100 * (n - 1)`` of
  the sorted values (p50 of [1, 2, 3, 4] is 2.5); None when there are no values.
- Span: the first scheduled arrival to the last thing received (token or end) of any request;
  throughputs and goodput are per second of span.
- SLO: a request attains it when it succeeded, TTFT <= ``slo_ttft_ms`` and TPOT <= ``slo_tbt_ms``
  (a one-token request on TTFT alone). Failed and unfinished requests are violations.
  Attainment = attaining / all requests; goodput = attaining requests per second of span.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

PERCENTILES = (50, 90, 99)


@dataclass(slots=True)
class RequestRecord:
    """What the client saw of one request. ``token_times_s`` holds one time per received stream
    event of the measured answer (one token per event on this server)."""

    index: int
    arrival_s: float  # the scheduled arrival
    send_s: float | None = None  # sent, after waiting for a concurrency slot; None: never sent
    token_times_s: list[float] = field(default_factory=list)
    end_s: float | None = None  # the response complete, or the request failed or was cancelled
    finish_reason: str | None = None
    error: str | None = None
    is_unfinished: bool = False  # cut by the run's bounds: never sent, or cancelled after the drain

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_times_s)

    @property
    def is_ok(self) -> bool:
        return self.error is None and not self.is_unfinished and self.finish_reason is not None and bool(self.token_times_s)

    @property
    def ttft_s(self) -> float | None:
        return self.token_times_s[0] - self.arrival_s if self.token_times_s else None

    @property
    def tpot_s(self) -> float | None:
        t = self.token_times_s
        return (t[-1] - t[0]) / (len(t) - 1) if len(t) > 1 else None

    @property
    def itls_s(self) -> list[float]:
        t = self.token_times_s
        return [b - a for a, b in zip(t, t[1:])]

    @property
    def e2e_s(self) -> float | None:
        return self.end_s - self.arrival_s if self.end_s is not None else None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True, slots=True)
class Distribution:
    """Mean and percentiles of some values, in milliseconds; None fields when ``count`` is 0."""

    count: int
    mean: float | None
    p50: float | None
    p90: float | None
    p99: float | None


def distribution_ms(values_s: Sequence[float]) -> Distribution:
    if not values_s:
        return Distribution(0, None, None, None, None)
    ms = np.asarray(values_s, dtype=float) * 1e3
    p50, p90, p99 = (float(v) for v in np.percentile(ms, PERCENTILES))
    return Distribution(len(ms), float(ms.mean()), p50, p90, p99)


def attains_slo(record: RequestRecord, slo_ttft_ms: float, slo_tbt_ms: float) -> bool:
    if not record.is_ok or record.ttft_s * 1e3 > slo_ttft_ms:
        return False
    return record.tpot_s is None or record.tpot_s * 1e3 <= slo_tbt_ms


def span_s(records: Sequence[RequestRecord]) -> float:
    """First scheduled arrival to the last token or end received (0 when nothing was received)."""
    last = [t for r in records for t in (r.token_times_s[-1:] + ([r.end_s] if r.end_s is not None else []))]
    return max(0.0, max(last) - min(r.arrival_s for r in records)) if last else 0.0


@dataclass(frozen=True, slots=True)
class LatencySummary:
    num_requests: int
    num_ok: int
    num_failed: int  # an error from the server or the connection
    num_unfinished: int  # cut by the run's bounds
    num_output_tokens: int  # of the succeeded requests
    span_s: float
    request_throughput_per_s: float | None  # succeeded requests per second of span
    output_token_throughput_per_s: float | None
    ttft_ms: Distribution
    itl_ms: Distribution
    tpot_ms: Distribution
    e2e_ms: Distribution
    slo_ttft_ms: float
    slo_tbt_ms: float
    num_attained: int
    slo_attainment: float | None  # attaining / all requests
    goodput_per_s: float | None  # attaining requests per second of span

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def table(self) -> str:
        """A terminal table."""
        def num(v: float | None, fmt: str = ".1f") -> str:
            return "-" if v is None else format(v, fmt)

        lines = [
            f"requests     {self.num_requests} ({self.num_ok} ok, {self.num_failed} failed, "
            f"{self.num_unfinished} unfinished) over {self.span_s:.2f} s",
            f"throughput   {num(self.request_throughput_per_s, '.2f')} req/s, "
            f"{num(self.output_token_throughput_per_s)} output tok/s ({self.num_output_tokens} tokens)",
            f"{'latency (ms)':<12} {'n':>6} {'mean':>9} {'p50':>9} {'p90':>9} {'p99':>9}",
        ]
        for name, d in (("TTFT", self.ttft_ms), ("ITL", self.itl_ms), ("TPOT", self.tpot_ms), ("E2E", self.e2e_ms)):
            lines.append(f"{name:<12} {d.count:>6} {num(d.mean):>9} {num(d.p50):>9} {num(d.p90):>9} {num(d.p99):>9}")
        attainment = "-" if self.slo_attainment is None else f"{self.slo_attainment:.1%}"
        lines.append(f"SLO          TTFT <= {self.slo_ttft_ms:g} ms and TPOT <= {self.slo_tbt_ms:g} ms: "
                     f"{self.num_attained}/{self.num_requests} = {attainment}, goodput "
                     f"{num(self.goodput_per_s, '.2f')} req/s")
        return "\n".join(lines)


def summarize(records: Sequence[RequestRecord], slo_ttft_ms: float, slo_tbt_ms: float) -> LatencySummary:
    ok = [r for r in records if r.is_ok]
    span = span_s(records) if records else 0.0
    num_attained = sum(attains_slo(r, slo_ttft_ms, slo_tbt_ms) for r in records)
    num_tokens = sum(r.num_output_tokens for r in ok)
    num_unfinished = sum(r.is_unfinished for r in records)

    def per_s(count: int) -> float | None:
        return count / span if span > 0 else None

    return LatencySummary(
        num_requests=len(records),
        num_ok=len(ok),
        num_failed=len(records) - len(ok) - num_unfinished,
        num_unfinished=num_unfinished,
        num_output_tokens=num_tokens,
        span_s=span,
        request_throughput_per_s=per_s(len(ok)),
        output_token_throughput_per_s=per_s(num_tokens),
        ttft_ms=distribution_ms([r.ttft_s for r in ok]),
        itl_ms=distribution_ms([gap for r in ok for gap in r.itls_s]),
        tpot_ms=distribution_ms([r.tpot_s for r in ok if r.tpot_s is not None]),
        e2e_ms=distribution_ms([r.e2e_s for r in ok if r.e2e_s is not None]),
        slo_ttft_ms=slo_ttft_ms,
        slo_tbt_ms=slo_tbt_ms,
        num_attained=num_attained,
        slo_attainment=num_attained / len(records) if records else None,
        goodput_per_s=per_s(num_attained),
    )
