"""The worker thread: the only thread that touches the model and the device.

It takes plans from a queue, one at a time, and hands each result (or the exception that
stopped it) to a callback. The callback runs on the worker thread, so an asyncio caller must
pass one that goes through ``loop.call_soon_threadsafe``; the worker itself never touches
asyncio objects.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

from engine.plan import IterationPlan, IterationResult
from engine.runner import ModelRunner

Callback = Callable[[IterationResult | BaseException], None]


class _Call:
    """A function to run on the worker thread between two plans (adapters added or deleted)."""

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.fn = fn


class Worker:
    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        self._queue: queue.SimpleQueue[tuple[IterationPlan, Callback] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="mace-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, plan: IterationPlan, on_done: Callback) -> None:
        self._queue.put((plan, on_done))

    def call(self, fn: Callable[[], Any], on_done: Callable[[Any], None]) -> None:
        """Run ``fn()`` on the worker thread after the plans queued before it; ``on_done`` gets
        its return value or the exception it raised."""
        self._queue.put((_Call(fn), on_done))

    def stop(self, timeout_s: float | None = None) -> None:
        """Finish the plan in flight, then end the thread."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout_s)

    def _loop(self) -> None:
        while (item := self._queue.get()) is not None:
            plan, on_done = item
            try:
                result: IterationResult | BaseException = (plan.fn() if isinstance(plan, _Call)
                                                           else self.runner.execute(plan))
            except Exception as exc:  # handed to the scheduler, which fails the plan's requests
                result = exc
            on_done(result)
