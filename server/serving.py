"""What both APIs share: admission (queue limit, draining), fan-out of one API request into
several engine sequences (``n``, prompt lists), per-token metrics, and token text for log-probs.

No aiohttp here: handlers turn ``Overloaded`` / ``ShuttingDown`` / ``InvalidRequestError`` into
their API's error bodies.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from engine.sampling_params import InvalidRequestError, SamplingParams
from scheduler.async_engine import AsyncEngine, EngineError
from scheduler.core import RequestOutput
from scheduler.request import RequestOptions
from server.metrics import ServerMetrics


class Overloaded(RuntimeError):
    """The waiting queue is full, or (``--refuse-late-requests``) the request's first token
    would come past its TTFT SLO: answer 429 now, saying when to retry."""

    def __init__(self, message: str, retry_after_s: int = 1, code: str = "queue_full") -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.code = code


class ShuttingDown(RuntimeError):
    """The server is draining after SIGTERM: answer 503."""


@dataclass(frozen=True, slots=True)
class SequenceSpec:
    """One engine sequence of an API request (one choice)."""

    prompt_token_ids: list[int]
    params: SamplingParams


class Serving:
    def __init__(self, engine: AsyncEngine, metrics: ServerMetrics, max_waiting_requests: int,
                 refuse_late_requests: bool = False) -> None:
        self.engine = engine
        self.metrics = metrics
        self.max_waiting_requests = max_waiting_requests
        self.refuse_late_requests = refuse_late_requests
        self.config = engine.core.config.scheduler  # its SLOs are the defaults for requests that set none
        self.is_draining = False
        self._token_text: dict[int, str] = {}
        tokenizer = engine.core.tokenizer
        self.tokenizer = tokenizer
        self.special_ids = frozenset(tokenizer.all_special_ids)

    @staticmethod
    def new_request_id() -> str:
        return uuid.uuid4().hex

    def token_text(self, token_id: int) -> str:
        """A token's own text (what log-prob entries show), cached: a vocabulary is finite."""
        text = self._token_text.get(token_id)
        if text is None:
            text = self._token_text[token_id] = self.tokenizer.decode([token_id])
        return text

    def admit(self, num_sequences: int) -> None:
        if self.is_draining:
            raise ShuttingDown("the server is shutting down")
        waiting = len(self.engine.core.queues.waiting)
        if waiting + num_sequences > self.max_waiting_requests:
            self.metrics.requests.labels("rejected").inc(num_sequences)
            raise Overloaded(
                f"the queue is full ({waiting} sequences waiting, limit {self.max_waiting_requests}); retry later"
            )

    def check_ttft(self, specs: list[SequenceSpec], options: RequestOptions) -> None:
        """A request whose first token the policy predicts past its TTFT SLO (the prefill queued
        ahead of it at what the running decodes leave) is counted late; with
        ``refuse_late_requests`` it is refused (``Overloaded``, retry when the queue ahead has
        drained), else it queues knowing it."""
        policy = self.engine.core.policy
        predicted = policy.predicted_ttft_s(sum(len(s.prompt_token_ids) for s in specs))
        if predicted is None:
            return
        slo_s = (options.slo_ttft_ms if options.slo_ttft_ms is not None else policy.default_slos_ms()[0]) / 1e3
        if predicted <= slo_s:
            return
        self.metrics.late_requests.labels("refused" if self.refuse_late_requests else "queued").inc()
        if self.refuse_late_requests:
            self.metrics.requests.labels("rejected").inc(len(specs))
            raise Overloaded(f"the first token would come in about {predicted * 1e3:.0f} ms, past the TTFT SLO of "
                             f"{slo_s * 1e3:.0f} ms; retry later", retry_after_s=max(1, math.ceil(predicted - slo_s)),
                             code="ttft_unattainable")

    async def submit(self, specs: list[SequenceSpec], options: RequestOptions) -> RequestStream:
        """Validate and queue every sequence of a request, or raise (``InvalidRequestError``,
        ``Overloaded``, ``ShuttingDown``) having queued none. The caller iterates the returned
        stream and must ``aclose()`` it (a ``finally``): that aborts whatever still runs.

        Engine ids are ours (the client's x-request-id need not be unique)."""
        self.admit(len(specs))
        self.check_ttft(specs, options)
        request_id = self.new_request_id()
        gens = []
        try:
            for i, spec in enumerate(specs):
                rid = request_id if len(specs) == 1 else f"{request_id}-{i}"
                gens.append(self._tracked(rid, spec, options))
                await anext(gens[-1])  # validates and queues; yields None
        except BaseException:
            for gen in gens:
                await gen.aclose()
            raise
        return RequestStream(gens)

    async def _tracked(self, rid: str, spec: SequenceSpec, options: RequestOptions) -> AsyncIterator[RequestOutput | None]:
        """One sequence with its metrics. Yields None once queued, then the outputs."""
        m = self.metrics
        arrival = last = time.monotonic()
        try:
            engine_stream = self.engine.add_request(spec.prompt_token_ids, spec.params, rid, options)
        except InvalidRequestError:
            m.requests.labels("rejected").inc()
            raise
        m.prompt_tokens.inc(len(spec.prompt_token_ids))
        outcome = "abort"
        first = None
        try:
            yield None
            async for out in engine_stream:
                if out.new_token_ids:
                    now = time.monotonic()
                    if out.num_output_tokens == len(out.new_token_ids):
                        m.ttft_s.observe(now - arrival)
                        first = now
                    else:
                        m.itl_s.observe(now - last)
                    last = now
                    m.generation_tokens.inc(len(out.new_token_ids))
                if out.finished:
                    outcome = out.finish_reason or "stop"
                    m.e2e_s.observe(time.monotonic() - arrival)
                    if first is not None and outcome in ("stop", "length"):
                        self._count_slo(options, first - arrival, (last - first) / max(out.num_output_tokens - 1, 1))
                yield out
        except EngineError:
            outcome = "error"
            raise
        finally:
            await engine_stream.aclose()
            m.requests.labels(outcome).inc()

    def _count_slo(self, options: RequestOptions, ttft_s: float, tpot_s: float) -> None:
        """DESIGN.md's attainment: TTFT <= its SLO and TPOT <= the TBT SLO."""
        default_ttft, default_tbt = self.engine.core.policy.default_slos_ms()
        ttft_slo = options.slo_ttft_ms if options.slo_ttft_ms is not None else default_ttft
        tbt_slo = options.slo_tbt_ms if options.slo_tbt_ms is not None else default_tbt
        if ttft_s * 1e3 <= ttft_slo and tpot_s * 1e3 <= tbt_slo:
            self.metrics.slo_attained.inc()
        else:
            self.metrics.slo_violated.inc()

    async def drain(self, grace_s: float) -> None:
        """Refuse new work, let what runs finish for up to ``grace_s``, then abort the rest
        (their streams end with finish reason "abort")."""
        self.is_draining = True
        deadline = time.monotonic() + grace_s
        while self.engine.num_requests and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for rid in list(self.engine.core.sequences):
            self.engine.abort(rid)


class RequestStream:
    """``(index, output)`` pairs of a request's sequences, in the order they are produced."""

    def __init__(self, gens: list[AsyncIterator[RequestOutput | None]]) -> None:
        self._gens = gens
        self._outputs = None if len(gens) == 1 else _merge(gens)

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> tuple[int, RequestOutput]:
        if self._outputs is None:  # one sequence: no merging layer on the per-token path
            return 0, await anext(self._gens[0])
        return await anext(self._outputs)

    async def aclose(self) -> None:
        if self._outputs is not None:
            await self._outputs.aclose()
        for gen in self._gens:  # an output iterator never started does not close them itself
            await gen.aclose()


async def _merge(gens: list[AsyncIterator[RequestOutput | None]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave already-started sequence streams; closing this closes (aborts) them all."""
    queue: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = asyncio.Queue()

    async def pump(i: int, gen) -> None:
        try:
            async for out in gen:
                await queue.put((i, out))
        except Exception as exc:
            await queue.put((i, exc))
        finally:
            await queue.put((i, None))

    tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(gens)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for gen in gens:
            await gen.aclose()
