"""The HTTP front end: aiohttp on uvloop.

Routes: OpenAI's ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``; TGI's
``/generate``, ``/generate_stream``, ``/info``; feedback's ``/v1/feedback`` and
``/v1/feedback/stats``; ``/health`` and ``/metrics``.

Every response carries ``x-request-id``. Errors are JSON in the route's family shape (see
``server.errors``). A client that disconnects cancels its handler (``handler_cancellation``),
which closes its engine stream and aborts the request at once. SIGTERM: stop listening, refuse
new requests (503), give in-flight ones ``--shutdown-grace`` seconds, abort the rest (their
streams end cleanly), stop the worker, exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import hmac
import logging
import signal
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TextIO

import uvloop
from aiohttp import web

from engine.runner import ModelRunner
from scheduler.async_engine import AsyncEngine
from scheduler.builder import build_engine
from scheduler.core import EngineCore
from scheduler.trace import IterationTrace
from server import feedback_api, openai_api, tgi_api
from server.errors import ApiError, error_response, is_expected
from server.flags import engine_config, training_config
from server.metrics import ServerMetrics
from server.adapters import Adapters
from server.serving import Serving
from server.state import REQUEST_ID, STATE, TENANT, ServerState, response_headers
from trainer.feedback import FeedbackStore

log = logging.getLogger(__name__)
_OPEN_PATHS = frozenset({"/health"})


@web.middleware
async def _errors(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    """Request ids on every response; exceptions rendered in the route family's error shape."""
    rid = request.headers.get("x-request-id", "")
    request[REQUEST_ID] = rid if 0 < len(rid) <= 128 and rid.isascii() and rid.isprintable() else Serving.new_request_id()
    try:
        response = await handler(request)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        if not is_expected(exc):
            log.exception("unhandled error in %s", request.path)
        response = error_response(exc, request.path.startswith("/generate"))
    if not response.prepared:
        response.headers.update(response_headers(request))
    return response


@web.middleware
async def _auth(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    state = request.app[STATE]
    key, tenants = state.api_key, state.tenant_keys
    request[TENANT] = None
    if (key is not None or tenants) and request.path not in _OPEN_PATHS:
        given = request.headers.get("Authorization", "")
        token = given[7:].encode() if given.startswith("Bearer ") else None
        tenant = _tenant_of(tenants, token) if tenants and token is not None else None
        if tenant is not None:
            request[TENANT] = tenant
        elif token is None or key is None or not hmac.compare_digest(token, key.encode()):
            raise ApiError(401, "a valid API key is required: Authorization: Bearer KEY", "Authorization", "invalid_api_key")
    return await handler(request)


def _tenant_of(tenants: dict[str, str], token: bytes) -> str | None:
    """The tenant of ``token`` (every key compared in constant time), or None."""
    found = None
    for key, tenant in tenants.items():
        if hmac.compare_digest(token, key.encode()):
            found = tenant
    return found


async def health(request: web.Request) -> web.Response:
    serving = request.app[STATE].serving
    if serving.is_draining:
        return web.json_response({"status": "shutting down"}, status=503)
    return web.json_response({"status": "ok"})


async def metrics(request: web.Request) -> web.Response:
    body = await request.app[STATE].metrics.render()
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


def build_app(
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
) -> web.Application:
    """The application, and the ``AsyncEngine`` over ``core`` and ``runner`` that it starts on
    startup and stops on cleanup (``app[STATE].engine``). It owns ``feedback_store`` too (closed
    on cleanup). ``trace``: a text file that gets one JSON line per iteration (its opener closes it)."""
    model_path = core.config.model.path
    name = model_name or (Path(model_path).name if model_path else "mace")
    aliases = frozenset(a for a in (name, model_path, str(Path(model_path).resolve()) if model_path else None) if a)
    metrics_ = ServerMetrics(core)
    observers = [metrics_.observe_iteration] + ([IterationTrace(trace)] if trace is not None else [])
    engine = AsyncEngine(core, runner, observers)
    app = web.Application(client_max_size=max_request_bytes, middlewares=[_errors, _auth])
    app[STATE] = state = ServerState(
        engine=engine, serving=Serving(engine, metrics_, max_waiting_requests, refuse_late_requests), metrics=metrics_, model_name=name,
        model_aliases=aliases, created=int(time.time()), api_key=api_key, shutdown_grace_s=shutdown_grace_s,
        feedback=feedback_store, tenant_keys=tenant_keys or None,
    )
    state.adapters = Adapters(engine, name, aliases)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    openai_api.add_routes(app)
    tgi_api.add_routes(app)
    feedback_api.add_routes(app)

    async def start(app: web.Application) -> None:
        await engine.start()  # training, if on, loads the pairs stored before a restart

    async def drain(app: web.Application) -> None:
        await state.serving.drain(state.shutdown_grace_s)

    async def stop(app: web.Application) -> None:
        await engine.stop()
        if feedback_store is not None:
            feedback_store.close()

    app.on_startup.append(start)
    app.on_shutdown.append(drain)
    app.on_cleanup.append(stop)
    return app


def make_runner(app: web.Application) -> web.AppRunner:
    """How an app runs, the same in ``mace serve`` and in tests."""
    return web.AppRunner(app, handler_cancellation=True, shutdown_timeout=5.0, access_log=None)


def _starting_app() -> web.Application:
    """What answers while the model loads: 503 everywhere (``/health`` with ``{"status":
    "loading"}``, every other route an error in its family's shape, code ``loading``), with
    ``Retry-After``: load balancers and clients see a server that is coming up, not a refused
    connection."""

    async def starting(request: web.Request) -> web.Response:
        headers = {"Retry-After": "1"}
        if request.path == "/health":
            return web.json_response({"status": "loading"}, status=503, headers=headers)
        response = error_response(ApiError(503, "the model is loading; retry shortly", None, "loading"),
                                  request.path.startswith("/generate"))
        response.headers.update(headers)
        return response

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", starting)
    return app


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family)


async def _serve_forever(build: Callable[[], web.Application], host: str, port: int,
                         stop: asyncio.Event | None = None) -> None:
    """Listen at once and answer 503 while ``build()`` makes the application in a thread that
    then exits (``_in_a_passing_thread``), then serve it on the same socket until ``stop`` is set
    (None: until SIGTERM or SIGINT, which also cut the loading short)."""
    loop = asyncio.get_running_loop()
    if stop is None:
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
    sock = _listen(host, port)
    starting = make_runner(_starting_app())
    await starting.setup()
    # the starting site gets a duplicate of the socket: stopping it closes only the duplicate
    await web.SockSite(starting, sock.dup()).start()
    log.info("listening on http://%s:%d; /health answers 503 until the model is loaded", host, port)
    built = asyncio.ensure_future(_in_a_passing_thread(build))
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({built, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if not built.done():  # stopped while loading: the loading thread is a daemon and goes with the process
            log.info("stopped while loading")
            return
        app = built.result()  # a failed start-up raises here
        runner = make_runner(app)
        await runner.setup()
        await web.SockSite(runner, sock).start()  # both accept until the starting site stops
    finally:
        stopped.cancel()
        await starting.cleanup()
    log.info("serving %s on http://%s:%d", app[STATE].model_name, host, port)
    await stop.wait()
    log.info("shutting down: draining in-flight requests (up to %.0f s)", app[STATE].shutdown_grace_s)
    await runner.cleanup()
    log.info("stopped")


async def _in_a_passing_thread(fn: Callable[[], object]):
    """``fn()`` in a thread that then exits; the caller awaits its result (or its exception).

    Start-up (loading, the cost profile) runs torch's parallel ops, and on CPU the OpenMP runtime
    keeps a thread team for every thread that ran one. The main thread's idle team beside the
    worker's makes more OpenMP threads than cores, and libgomp then stops spinning between
    parallel regions: the worker's decode step took 24-29 ms instead of 15-19 (base demo model, 2
    threads). A team goes with the thread that made it. The thread is a daemon, so a stop while it
    runs does not wait for it, and the event loop keeps answering meanwhile."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future = loop.create_future()

    def settle(value: object, error: BaseException | None) -> None:
        if done.done():
            return
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(value)

    def run() -> None:
        try:
            value, error = fn(), None
        except BaseException as exc:  # noqa: BLE001 - raised in the awaiting coroutine
            value, error = None, exc
        try:
            loop.call_soon_threadsafe(settle, value, error)
        except RuntimeError:  # the loop closed: the server stopped while this ran
            pass

    threading.Thread(target=run, name="mace-start-up", daemon=True).start()
    return await done


def serve(args: argparse.Namespace) -> None:
    api_key = args.api_key
    if args.api_key_file:
        api_key = Path(args.api_key_file).read_text().strip()
    state_dir = Path(args.state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    feedback_store = FeedbackStore(state_dir / "feedback.sqlite3")
    with contextlib.ExitStack() as files:
        trace = None
        if args.trace_iterations:
            trace = files.enter_context(open(args.trace_iterations, "a", buffering=1 << 16))

        tenant_keys = None
        if getattr(args, "tenants", None):
            from trainer.tenants import read_tenants

            tenant_keys = read_tenants(args.tenants)

        def build() -> web.Application:
            tenants = sorted(set(tenant_keys.values())) if tenant_keys else ()
            core, runner = build_engine(engine_config(args), training_config(args, str(state_dir)), feedback_store,
                                        tenants)
            sched = core.config.scheduler
            ttft, tbt = core.policy.default_slos_ms()
            learned = (" (learned from the load as it runs; this is the start)"
                       if sched.learned_slos and core.policy.plans_by_time else "")
            log.info("default SLOs: TTFT %.0f ms, TBT %.0f ms%s", ttft, tbt, learned)
            app = build_app(
                core, runner, model_name=args.served_model_name, api_key=api_key or None,
                max_waiting_requests=args.max_waiting_requests, refuse_late_requests=args.refuse_late_requests,
                max_request_bytes=args.max_request_bytes,
                shutdown_grace_s=args.shutdown_grace, feedback_store=feedback_store, trace=trace,
                tenant_keys=tenant_keys,
            )
            _freeze_start_up_objects()
            return app

        uvloop.run(_serve_forever(build, args.host, args.port))


def _freeze_start_up_objects() -> None:
    """Move what start-up built (the model's modules, the tokenizer, the profile's leftovers) out
    of the garbage collector's reach, as vLLM and SGLang do: otherwise every full collection while
    serving walks all of it and pauses the worker and the event loop (220-280 ms per collection on
    the tiny demo model, measured at the end of 30-second runs; a first token behind one waits
    that long). Cycles made while serving are still collected."""
    gc.collect()
    gc.freeze()
