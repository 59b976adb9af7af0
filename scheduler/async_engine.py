"""The asyncio face of the engine: requests stream out of an async iterator while a scheduler
coroutine feeds the worker thread one plan at a time.

The event loop never runs a tensor op; the worker never touches asyncio objects (it resolves a
future through ``loop.call_soon_threadsafe``).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from engine.plan import IterationPlan, IterationResult
from engine.runner import ModelRunner
from engine.sampling_params import SamplingParams
from engine.worker import Worker
from scheduler.core import EngineCore, RequestOutput
from scheduler.request import RequestOptions

if TYPE_CHECKING:
    from trainer.training import Training


log = logging.getLogger(__name__)


class EngineError(RuntimeError):
    """The forward failed for this request; the engine itself keeps running."""


@dataclass(slots=True)
class IterationRecord:
    """One iteration as the engine ran it: what its observers (metrics, the trace) read."""

    plan: IterationPlan
    planned_at_s: float  # time.monotonic() when the plan was built
    plan_s: float  # seconds building it took
    result: IterationResult | None  # None: the iteration failed


class AsyncEngine:
    """``observers`` are called on the event loop after every iteration with its
    ``IterationRecord`` (they must be quick: the next plan waits for them)."""

    def __init__(self, core: EngineCore, runner: ModelRunner,
                 observers: Sequence[Callable[[IterationRecord], None]] = ()) -> None:
        self.core = core
        self.worker = Worker(runner)
        self.observers = tuple(observers)
        self._streams: dict[str, asyncio.Queue[RequestOutput]] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._ids = itertools.count()
        self.num_iterations = 0
        self.worker_busy_s = 0.0  # summed iteration time on the worker: busy / wall = utilization

    @property
    def training(self) -> Training | None:
        """What trains the adapter while serving (``trainer.training.Training``), or None."""
        return self.core.training

    def training_for(self, tenant: str | None) -> Training | None:
        """A tenant's training, or (None) the default one."""
        return self.core.training if tenant is None else self.core.tenants[tenant]

    async def start(self) -> None:
        """Start the worker and the scheduler coroutine, and training (which loads the feedback
        stored before a restart)."""
        if self.training is not None:
            await self.training.start(self._wake.set)
        for training in self.core.tenants.values():
            await training.start(self._wake.set)
        self.worker.start()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="mace-scheduler")

    async def stop(self) -> None:
        """Abort what is left, finish the iteration in flight, stop the worker, then training
        (its last checkpoint)."""
        for rid in list(self._streams):
            self.abort(rid)
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        await asyncio.to_thread(self.worker.stop)
        if self.training is not None:
            await self.training.stop()
        for training in self.core.tenants.values():
            await training.stop()
            training.store.close()  # a tenant's store is its training's own

    def add_request(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        request_id: str | None = None,
        options: RequestOptions | None = None,
    ) -> OutputStream:
        """Queue a request now (or raise InvalidRequestError, changing nothing) and return the
        stream of its outputs. The caller must iterate it to the end or ``aclose()`` it; closing
        early aborts the request."""
        rid = request_id or f"req-{next(self._ids)}"
        self.core.add_request(rid, prompt_token_ids, params, options)
        queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self._streams[rid] = queue
        self._wake.set()
        return OutputStream(self, rid, queue)

    async def generate(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        request_id: str | None = None,
        options: RequestOptions | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """``add_request`` as one async generator: raises InvalidRequestError before the first
        output if the request cannot be served; leaving the iteration early aborts the request.
        A request the engine aborts itself (``abort``, ``stop``) ends with a finished output,
        reason "abort"."""
        stream = self.add_request(prompt_token_ids, params, request_id, options)
        try:
            async for out in stream:
                yield out
        finally:
            await stream.aclose()

    def abort(self, request_id: str) -> None:
        """Drop a request; its blocks are free before the next plan. A live stream of it ends
        with a finished output (reason "abort")."""
        seq = self.core.sequences.get(request_id)
        if not self.core.abort(request_id):
            return
        self._wake.set()
        queue = self._streams.get(request_id)
        if queue is not None:
            queue.put_nowait(
                RequestOutput(request_id, [], seq.detokenizer.take_delta(True), True, "abort",
                              seq.num_prompt_tokens, seq.num_output_tokens)
            )

    async def run_on_worker(self, fn: Callable[[], object]) -> object:
        """``fn()`` on the worker thread, between two iterations (never beside a forward): what
        changes the model's modules, such as adding or deleting an adapter. Raises what it raises."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()
        self.worker.call(fn, lambda r: loop.call_soon_threadsafe(_resolve, done, r))
        result = await done
        if isinstance(result, BaseException):
            raise result
        return result

    @property
    def num_requests(self) -> int:
        """Requests in the engine, waiting or running."""
        return len(self.core.sequences)

    async def _run(self) -> None:
        while True:
            try:
                await self._iterate()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bug of ours: fail what is in flight, keep serving
                log.exception("engine iteration failed")
                self._fail_all(exc)

    async def _iterate(self) -> None:
        t0 = time.perf_counter()
        plan = self.core.schedule() if self.core.has_work else None
        plan_s = time.perf_counter() - t0
        if plan is None:
            self._wake.clear()
            await self._wake.wait()
            return
        planned_at_s = time.monotonic()
        loop = asyncio.get_running_loop()
        done: asyncio.Future[IterationResult | BaseException] = loop.create_future()
        self.worker.submit(plan, lambda r: loop.call_soon_threadsafe(_resolve, done, r))
        result = await done
        self.num_iterations += 1
        if isinstance(result, IterationResult):
            self.worker_busy_s += result.total_s
        record = IterationRecord(plan, planned_at_s, plan_s, result if isinstance(result, IterationResult) else None)
        for observe in self.observers:
            observe(record)
        for out in self.core.process_result(result, plan.iteration):
            queue = self._streams.get(out.request_id)
            if queue is not None:
                queue.put_nowait(out)

    def _fail_all(self, exc: Exception) -> None:
        for rid, queue in list(self._streams.items()):
            self.core.abort(rid)
            queue.put_nowait(
                RequestOutput(rid, [], "", True, "error", 0, 0, error=f"{type(exc).__name__}: {exc}")
            )


class OutputStream:
    """One request's outputs, in order; ends after the finished one. ``aclose`` (idempotent)
    aborts the request if it has not finished."""

    def __init__(self, engine: AsyncEngine, request_id: str, queue: asyncio.Queue[RequestOutput]) -> None:
        self.request_id = request_id
        self._engine = engine
        self._queue = queue
        self._is_done = False

    def __aiter__(self) -> OutputStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._is_done:
            raise StopAsyncIteration
        out = await self._queue.get()
        if out.finished:
            self._is_done = True
            self._engine._streams.pop(self.request_id, None)
        if out.error is not None:
            raise EngineError(out.error)
        return out

    async def aclose(self) -> None:
        if not self._is_done:
            self._is_done = True
            self._engine._streams.pop(self.request_id, None)
            self._engine.abort(self.request_id)


def _resolve(fut: asyncio.Future, value) -> None:
    if not fut.done():  # cancelled when the engine stops mid-iteration
        fut.set_result(value)
