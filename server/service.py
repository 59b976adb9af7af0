"""The server without its transport: the state every route reads and the route table, built
from an engine; started and stopped by whichever front door serves it (``server.app``'s aiohttp
server, or a Ray Serve replica in ``server.ray_serve``)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TextIO

from engine.runner import ModelRunner
from scheduler.async_engine import AsyncEngine
from scheduler.core import EngineCore
from scheduler.trace import IterationTrace
from server import feedback_api, openai_api, tgi_api
from server.adapters import Adapters
from server.api import ApiRequest, ApiResponse, Routes
from server.metrics import ServerMetrics
from server.serving import Serving
from server.state import ServerState
from trainer.feedback import FeedbackStore


async def health(request: ApiRequest) -> ApiResponse:
    if request.state.serving.is_draining:
        return ApiResponse.json({"status": "shutting down"}, status=503)
    return ApiResponse.json({"status": "ok"})


async def metrics(request: ApiRequest) -> ApiResponse:
    body = await request.state.metrics.render()
    if request.state.cluster is not None:  # a Ray Serve replica: the coordinator's figures too
        body += await request.state.cluster.metrics()
    return ApiResponse(200, body, {"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


def build_routes() -> Routes:
    routes = Routes()
    routes.get("/health", health)
    routes.get("/metrics", metrics)
    openai_api.add_routes(routes)
    tgi_api.add_routes(routes)
    feedback_api.add_routes(routes)
    return routes


def build_state(
    core: EngineCore,
    runner: ModelRunner,
    *,
    model_name: str | None = None,
    api_key: str | None = None,
    max_waiting_requests: int = 256,
    refuse_late_requests: bool = False,
    max_request_bytes: int = 4 << 20,
    shutdown_grace_s: float = 30.0,
    feedback_store: FeedbackStore | None = None,
    trace: TextIO | None = None,
    tenant_keys: dict[str, str] | None = None,
) -> ServerState:
    """What a server serves: the ``AsyncEngine`` over ``core`` and ``runner`` (not started:
    ``start``), the route table, and ``feedback_store`` (closed by ``stop``). ``trace``: a text
    file that gets one JSON line per iteration (its opener closes it)."""
    model_path = core.config.model.path
    name = model_name or (Path(model_path).name if model_path else "mace")
    aliases = frozenset(a for a in (name, model_path, str(Path(model_path).resolve()) if model_path else None) if a)
    metrics_ = ServerMetrics(core)
    observers = [metrics_.observe_iteration] + ([IterationTrace(trace)] if trace is not None else [])
    engine = AsyncEngine(core, runner, observers)
    state = ServerState(
        engine=engine, serving=Serving(engine, metrics_, max_waiting_requests, refuse_late_requests), metrics=metrics_,
        model_name=name, model_aliases=aliases, created=int(time.time()), api_key=api_key,
        shutdown_grace_s=shutdown_grace_s, feedback=feedback_store, tenant_keys=tenant_keys or None,
        max_request_bytes=max_request_bytes, routes=build_routes(),
    )
    state.adapters = Adapters(engine, name, aliases)
    return state


async def start(state: ServerState) -> None:
    await state.engine.start()  # training, if on, loads the pairs stored before a restart


async def drain(state: ServerState) -> None:
    await state.serving.drain(state.shutdown_grace_s)


async def stop(state: ServerState) -> None:
    await state.engine.stop()
    if state.feedback is not None:
        state.feedback.close()
