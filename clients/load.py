"""The open-loop load generator: sends a workload to a server at its arrival times, measures what
the client sees, and (for a share of requests) plays a user who rates two answers.

Contract of ``run_load``:
- Open loop: request i is started at its scheduled arrival whatever the earlier ones are doing.
  With a concurrency cap, a request beyond it waits for a slot; its latency still counts from
  the scheduled arrival.
- Bounds that always hold: at most ``num_requests`` requests, none arriving at or after
  ``duration_s``, and none sent at or after it (those still waiting for a slot then are
  unfinished). After ``duration_s`` the requests in flight get ``drain_timeout_s`` more, then
  are cancelled and counted unfinished; so a run with a duration ends by about
  ``duration_s + drain_timeout_s``. Without a duration the run waits for every request.
- Feedback (the retrain rate r): exactly ``round(r * N)`` of the N requests, chosen with the seed,
  ask for two answers in one streamed request (``n=2``, seeds s and s+1 on the server). Latency is
  measured on answer 0, the one the user reads; answer 1 is load on the server like any other.
  When both are complete the oracle judges them at that moment, and the pair is posted to
  ``/v1/feedback`` (on the chat messages for a chat request) after the request's slot is free.
  A tie, or a blank answer, posts nothing.
- Errors (an HTTP error, a broken stream, a 429: nothing is retried) fail the request, not the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import numpy as np
from tqdm.auto import tqdm

from clients.metrics import RequestRecord
from clients.oracle import PreferenceOracle
from clients.sdk import AsyncClient, MaceError
from clients.workload import RequestSpec, bounded

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class LoadConfig:
    url: str
    model: str | None = None
    api_key: str | None = None
    num_requests: int | None = None  # at most this many requests
    duration_s: float | None = None  # nothing arrives or is sent at or after this
    drain_timeout_s: float = 30.0  # after duration_s, then the rest is cancelled
    concurrency: int | None = None  # requests in flight at most (None: no cap)
    retrain_rate: float = 0.0  # share of requests that produce a feedback pair
    temperature: float = 1.0
    top_k: int = 0  # an extension of our server's (and vLLM's) OpenAI API; 0: off, and not sent
    ignore_eos: bool = True  # generate exactly max_tokens, as load tests usually do
    seed: int = 0
    request_timeout_s: float = 600.0
    show_progress: bool = True

    def __post_init__(self) -> None:
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")
        if not 0.0 <= self.retrain_rate <= 1.0:
            raise ValueError(f"retrain_rate must be in [0, 1], got {self.retrain_rate}")
        if self.drain_timeout_s < 0:
            raise ValueError(f"drain_timeout_s must be >= 0, got {self.drain_timeout_s}")


@dataclass(slots=True)
class LoadResult:
    records: list[RequestRecord]  # one per request of the bounded workload, in arrival order
    rated: list[int]  # indices of the requests that asked for two answers
    wall_s: float  # the whole run, drain included
    max_in_flight: int
    num_feedback_posted: int = 0
    num_feedback_skipped: int = 0  # a tie, or a blank answer
    num_feedback_failed: int = 0  # no pair: the request failed or was cut, or the POST failed

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "records"}
        return {**out, "records": [r.to_dict() for r in self.records]}


def choose_rated(num_requests: int, retrain_rate: float, seed: int) -> list[int]:
    """The ``round(retrain_rate * num_requests)`` request indices that give feedback (seeded)."""
    return sorted(random.Random(seed).sample(range(num_requests), round(retrain_rate * num_requests)))


async def run_load(specs: Sequence[RequestSpec], config: LoadConfig,
                   oracle: PreferenceOracle | None = None) -> LoadResult:
    """Send ``specs`` (sorted by arrival) under ``config``'s bounds; see the module docstring."""
    if config.retrain_rate > 0 and oracle is None:
        raise ValueError("a retrain rate needs an oracle to judge the answers")
    specs = bounded(specs, num_requests=config.num_requests, duration_s=config.duration_s)
    if any(b.arrival_s < a.arrival_s for a, b in zip(specs, specs[1:])):
        raise ValueError("specs must be sorted by arrival")
    connector = aiohttp.TCPConnector(limit=0)  # no hidden queue in the connection pool
    async with aiohttp.ClientSession(connector=connector) as session:
        client = AsyncClient(config.url, config.api_key, model=config.model, timeout_s=config.request_timeout_s,
                             max_retries=0, session=session)
        return await _Run(specs, config, oracle, client).run()


class _Run:
    def __init__(self, specs: list[RequestSpec], config: LoadConfig, oracle: PreferenceOracle | None,
                 client: AsyncClient) -> None:
        self.specs, self.config, self.oracle, self.client = specs, config, oracle, client
        self.records = [RequestRecord(i, s.arrival_s) for i, s in enumerate(specs)]
        self.rated = choose_rated(len(specs), config.retrain_rate, config.seed)
        self.is_rated = set(self.rated)
        self.seeds = np.random.default_rng(config.seed).integers(0, 2**31 - 2, size=len(specs)).tolist()
        self.slots = asyncio.Semaphore(config.concurrency) if config.concurrency else None
        self.run_id = uuid.uuid4().hex[:12]  # feedback ids: unique per run, stable across resends
        self.num_in_flight = self.max_in_flight = 0
        self.counts = {"posted": 0, "skipped": 0, "failed": 0}
        self.start = 0.0

    def now(self) -> float:
        return time.perf_counter() - self.start

    def is_past_deadline(self) -> bool:
        return self.config.duration_s is not None and self.now() >= self.config.duration_s

    async def run(self) -> LoadResult:
        progress = tqdm(total=len(self.specs), unit="req", disable=not self.config.show_progress)
        tasks: list[asyncio.Task] = []
        self.start = time.perf_counter()
        try:
            for i, spec in enumerate(self.specs):
                await asyncio.sleep(max(0.0, spec.arrival_s - self.now()))
                task = asyncio.create_task(self._request(i, spec))
                task.add_done_callback(lambda _: progress.update(1))
                tasks.append(task)
            await self._finish(tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            progress.close()
        for record in self.records:  # tasks cancelled before they ever ran, or never started
            if record.send_s is None and not record.is_unfinished:
                record.is_unfinished, record.error = True, "never sent"
        missing = len(self.rated) - sum(self.counts.values())
        return LoadResult(self.records, self.rated, self.now(), self.max_in_flight, self.counts["posted"],
                          self.counts["skipped"], self.counts["failed"] + missing)

    async def _finish(self, tasks: list[asyncio.Task]) -> None:
        """Wait for the tasks, within the duration and the drain timeout when there is a duration."""
        if self.config.duration_s is None:
            await asyncio.gather(*tasks)
            return
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=max(0.0, self.config.duration_s - self.now()))
        for i, task in enumerate(tasks):  # still waiting for a slot at the deadline: never sent
            if task in pending and self.records[i].send_s is None:
                task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=self.config.drain_timeout_s)

    async def _request(self, i: int, spec: RequestSpec) -> None:
        record = self.records[i]
        try:
            async with self.slots or contextlib.nullcontext():
                if self.is_past_deadline():
                    record.is_unfinished, record.error = True, "not sent: no slot before the deadline"
                    return
                record.send_s = self.now()
                self.num_in_flight += 1
                self.max_in_flight = max(self.max_in_flight, self.num_in_flight)
                try:
                    texts = await self._stream(record, spec, 2 if i in self.is_rated else 1)
                finally:
                    self.num_in_flight -= 1
                    record.end_s = self.now()
        except asyncio.CancelledError:
            record.is_unfinished = True
            record.error = "cancelled at the drain timeout" if record.send_s is not None else "not sent: no slot before the deadline"
            raise
        if i in self.is_rated and texts is not None:
            await self._feedback(i, spec, texts)

    async def _stream(self, record: RequestRecord, spec: RequestSpec, n: int) -> list[str] | None:
        """Stream one request, stamping each event of answer 0; the answers' texts, or None on an error."""
        params = {"max_tokens": spec.max_tokens, "temperature": self.config.temperature, "n": n,
                  "seed": self.seeds[record.index], "ignore_eos": self.config.ignore_eos,
                  **({"top_k": self.config.top_k} if self.config.top_k else {})}
        texts: list[list[str]] = [[] for _ in range(n)]
        try:
            stream = (self.client.stream_chat(list(spec.messages), **params) if spec.is_chat
                      else self.client.stream_complete(spec.prompt, **params))
            async with stream:
                async for piece in stream:  # a ChatDelta or a CompletionChoice
                    if piece.index == 0:
                        record.token_times_s.append(self.now())
                        record.finish_reason = piece.finish_reason or record.finish_reason
                    texts[piece.index].append(piece.content if spec.is_chat else piece.text)
        except MaceError as exc:
            record.error = f"{type(exc).__name__}: {exc}"
            return None
        if record.finish_reason is None:
            record.error = "the stream ended without a finish reason"
            return None
        return ["".join(t) for t in texts]

    async def _feedback(self, i: int, spec: RequestSpec, texts: list[str]) -> None:
        answer_a, answer_b = texts
        judged = self.oracle.prefer(answer_a, answer_b, self.now()) if answer_a.strip() and answer_b.strip() else None
        if judged is None:
            self.counts["skipped"] += 1
            return
        prompt = spec.prompt if spec.messages is None else list(spec.messages)
        try:
            await self.client.feedback(prompt, *judged, id=f"{self.run_id}-{i}")
            self.counts["posted"] += 1
        except MaceError as exc:
            log.warning("feedback for request %d failed: %s", i, exc)
            self.counts["failed"] += 1


def main(args: Any) -> dict[str, Any]:
    """``mace load``: build the workload from ``args`` (see ``server/cli.py``), run it, print the
    table and write the JSON report (the summary, the feedback counts and every record)."""
    import json
    import sys
    from pathlib import Path

    from clients.metrics import summarize
    from clients.oracle import drift_oracle
    from clients.workload import OutputLengths, gamma_arrivals, read_trace, synthetic_requests

    try:
        if args.arrival == "trace":
            if args.trace is None:
                raise ValueError("--arrival trace needs --trace FILE")
            specs = read_trace(args.trace)
        else:
            burstiness = args.burstiness if args.arrival == "bursty" else 1.0
            arrivals = gamma_arrivals(args.rate, burstiness=burstiness, seed=args.seed,
                                      num_requests=args.num_requests, duration_s=args.duration)
            specs = synthetic_requests(arrivals, OutputLengths.parse(args.max_tokens), seed=args.seed)
        config = LoadConfig(url=args.url, model=args.model, api_key=args.api_key, num_requests=args.num_requests,
                            duration_s=args.duration, drain_timeout_s=args.drain_timeout, concurrency=args.concurrency,
                            retrain_rate=args.retrain_rate, temperature=args.temperature, top_k=args.top_k,
                            seed=args.seed, show_progress=not args.no_progress)
    except ValueError as exc:
        raise SystemExit(f"mace load: {exc}") from None
    result = asyncio.run(run_load(specs, config, drift_oracle(args.drift_at)))
    summary = summarize(result.records, args.slo_ttft_ms, args.slo_tbt_ms)
    print(summary.table())
    if result.rated:
        print(f"feedback     {len(result.rated)} rated: {result.num_feedback_posted} pairs posted, "
              f"{result.num_feedback_skipped} skipped (a tie or a blank answer), {result.num_feedback_failed} failed")
    report = {"command": "mace " + " ".join(sys.argv[1:]), "config": dataclasses.asdict(config),
              "summary": summary.to_dict(), **result.to_dict()}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")
    return report
