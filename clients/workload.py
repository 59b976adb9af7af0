"""What the load generator sends and when: seeded arrival processes, synthetic chat requests, and
the replay of a JSONL trace.

Times are seconds from the start of a run. A workload is a finite list of ``RequestSpec`` sorted
by arrival, cut by a request count and/or a duration (``bounded``), so the load generator never
has to decide how much to send.

Arrivals: ``gamma_arrivals(rate, burstiness)`` draws inter-arrival gaps from a gamma distribution
with mean ``1 / rate`` and shape ``1 / burstiness**2``, so ``burstiness`` is the coefficient of
variation (std / mean) of the gaps: 1 is a Poisson process (exponential gaps), above 1 requests
come in clumps with long pauses between, below 1 they come more evenly (0 would be a fixed
clock, which this does not allow). Note that vLLM's ``--burstiness`` is the gamma *shape*, the
inverse square of this one.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True, slots=True)
class RequestSpec:
    """One request of a workload: exactly one of ``prompt`` (sent to /v1/completions) and
    ``messages`` (sent to /v1/chat/completions), at ``arrival_s``, for ``max_tokens`` tokens."""

    arrival_s: float
    max_tokens: int
    prompt: str | None = None
    messages: tuple[dict[str, Any], ...] | None = None

    def __post_init__(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt and messages")
        if not (math.isfinite(self.arrival_s) and self.arrival_s >= 0):
            raise ValueError(f"arrival_s must be a finite number >= 0, got {self.arrival_s}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")

    @property
    def is_chat(self) -> bool:
        return self.messages is not None


@dataclass(frozen=True, slots=True)
class OutputLengths:
    """Output lengths drawn uniformly from the integers ``[min_tokens, max_tokens]`` (a fixed
    length when they are equal). ``parse("32")`` is fixed, ``parse("16:64")`` uniform."""

    min_tokens: int
    max_tokens: int

    def __post_init__(self) -> None:
        if not 1 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"need 1 <= min <= max output tokens, got {self.min_tokens}:{self.max_tokens}")

    @classmethod
    def parse(cls, text: str) -> OutputLengths:
        try:
            low, sep, high = text.partition(":")
            return cls(int(low), int(high) if sep else int(low))
        except ValueError as exc:
            raise ValueError(f"output length must be N or MIN:MAX (integers >= 1), got {text!r}: {exc}") from None

    def sample(self, rng: np.random.Generator, num: int) -> list[int]:
        return rng.integers(self.min_tokens, self.max_tokens, size=num, endpoint=True).tolist()


def gamma_arrivals(rate_per_s: float, *, burstiness: float = 1.0, seed: int = 0, num_requests: int | None = None,
                   duration_s: float | None = None) -> list[float]:
    """Arrival times (increasing, the first one gap after 0) of a renewal process with gamma gaps of
    mean ``1 / rate_per_s`` and coefficient of variation ``burstiness``, until ``num_requests``
    arrivals or the first arrival at or after ``duration_s``, whichever comes first."""
    if not rate_per_s > 0 or not burstiness > 0:
        raise ValueError(f"rate and burstiness must be > 0, got {rate_per_s} and {burstiness}")
    _check_bounds(num_requests, duration_s)
    shape = 1.0 / burstiness**2
    rng = np.random.default_rng(seed)
    times: list[float] = []
    t = 0.0
    while True:  # gaps in fixed-size batches: the i-th arrival depends on the seed only, not the bounds
        for gap in rng.gamma(shape, 1.0 / (rate_per_s * shape), size=1024).tolist():
            if num_requests is not None and len(times) >= num_requests:
                return times
            t += gap
            if duration_s is not None and t >= duration_s:
                return times
            times.append(t)


def poisson_arrivals(rate_per_s: float, *, seed: int = 0, num_requests: int | None = None,
                     duration_s: float | None = None) -> list[float]:
    """A Poisson process: exponential gaps of mean ``1 / rate_per_s``."""
    return gamma_arrivals(rate_per_s, burstiness=1.0, seed=seed, num_requests=num_requests, duration_s=duration_s)


def default_prompts() -> list[str]:
    """The shipped short chat prompts (``clients/data/prompts.txt``)."""
    text = resources.files("clients").joinpath("data/prompts.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def synthetic_requests(arrivals: Sequence[float], lengths: OutputLengths, *, seed: int = 0,
                       prompts: Sequence[str] | None = None) -> list[RequestSpec]:
    """One single-message chat request per arrival, its prompt and output length drawn (seeded)
    from ``prompts`` (default: the shipped ones) and ``lengths``."""
    prompts = list(prompts) if prompts is not None else default_prompts()
    if not prompts:
        raise ValueError("need at least one prompt")
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(prompts), size=len(arrivals)).tolist()
    max_tokens = lengths.sample(rng, len(arrivals))
    return [RequestSpec(t, n, messages=({"role": "user", "content": prompts[p]},))
            for t, p, n in zip(arrivals, picks, max_tokens)]


class TraceError(ValueError):
    """A trace file that cannot be replayed; the message names the file and line."""


def read_trace(path: str | Path) -> list[RequestSpec]:
    """The requests of a JSONL trace, sorted by arrival (stable: equal times keep file order).

    Each non-blank line is an object ``{"arrival_s": float >= 0, "max_tokens": int >= 1}`` with
    exactly one of ``"prompt": str`` and ``"messages": [{"role": str, "content": str}, ...]``.
    Any other key, or a bad value, raises ``TraceError`` naming ``path:line``."""
    specs = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    specs.append(_trace_line(line))
                except (ValueError, TypeError) as exc:
                    raise TraceError(f"{path}:{lineno}: {exc}") from None
    if not specs:
        raise TraceError(f"{path}: the trace holds no requests")
    return sorted(specs, key=lambda s: s.arrival_s)


_TRACE_KEYS = frozenset({"arrival_s", "max_tokens", "prompt", "messages"})


def _trace_line(line: str) -> RequestSpec:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {exc.msg} at column {exc.colno}") from None
    if not isinstance(row, dict):
        raise ValueError(f"a line must be a JSON object, got {type(row).__name__}")
    if unknown := sorted(row.keys() - _TRACE_KEYS):
        raise ValueError(f"unknown key(s) {', '.join(unknown)}; a line has {', '.join(sorted(_TRACE_KEYS))}")
    for key in ("arrival_s", "max_tokens"):
        if key not in row:
            raise ValueError(f"missing {key}")
    arrival, max_tokens = row["arrival_s"], row["max_tokens"]
    if isinstance(arrival, bool) or not isinstance(arrival, int | float):
        raise ValueError(f"arrival_s must be a number, got {arrival!r}")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
        raise ValueError(f"max_tokens must be an integer, got {max_tokens!r}")
    prompt, messages = row.get("prompt"), row.get("messages")
    if prompt is not None and (not isinstance(prompt, str) or not prompt.strip()):
        raise ValueError("prompt must be a non-empty string")
    if messages is not None:
        if not isinstance(messages, list) or not messages:
            raise ValueError("messages must be a non-empty list")
        for i, m in enumerate(messages):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise ValueError(f"messages[{i}] must be an object with string role and content")
        messages = tuple(messages)
    return RequestSpec(float(arrival), max_tokens, prompt=prompt, messages=messages)


def bounded(specs: Sequence[RequestSpec], *, num_requests: int | None = None,
            duration_s: float | None = None) -> list[RequestSpec]:
    """The first ``num_requests`` of ``specs`` (sorted by arrival) that arrive before ``duration_s``."""
    _check_bounds(num_requests, duration_s, need_one=False)
    kept = [s for s in specs if duration_s is None or s.arrival_s < duration_s]
    return kept[:num_requests] if num_requests is not None else kept


def _check_bounds(num_requests: int | None, duration_s: float | None, need_one: bool = True) -> None:
    if need_one and num_requests is None and duration_s is None:
        raise ValueError("an endless arrival process needs a bound: num_requests, duration_s or both")
    if num_requests is not None and num_requests < 0:
        raise ValueError(f"num_requests must be >= 0, got {num_requests}")
    if duration_s is not None and not duration_s > 0:
        raise ValueError(f"duration_s must be > 0, got {duration_s}")
