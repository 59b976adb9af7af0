"""The HTTP front end: aiohttp on uvloop.

Routes: OpenAI's ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``; TGI's
``/generate``, ``/generate_stream``, ``/info``; feedback's ``/v1/feedback`` and
``/v1/feedback/stats``; ``/health`` and ``/metrics``.

The routes themselves are transport-independent (``server.api``, ``server.service``); this
module serves them with aiohttp. Every response carries ``x-request-id``. Errors are JSON in the
route's family shape (see ``server.errors``). A client that disconnects cancels its handler (``handler_cancellation``),
which closes its engine stream and aborts the request at once. SIGTERM: stop listening, refuse
new requests (503), give in-flight ones ``--shutdown-grace`` seconds, abort the rest (their
streams end cleanly), stop the worker, exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import signal
import socket
import threading
from collections.abc import Callable
from pathlib import Path

import uvloop
from aiohttp import web

from engine.runner import ModelRunner
from scheduler.builder import build_engine
from scheduler.core import EngineCore
from server import service
from server.api import ApiRequest, BodyTooLarge, dispatch, error_response
from server.errors import ApiError
from server.flags import engine_config, training_config
from server.state import STATE
from trainer.feedback import FeedbackStore

log = logging.getLogger(__name__)


async def _handle(request: web.Request) -> web.StreamResponse:
    """Every route: the aiohttp request as an ``ApiRequest``, the ``ApiResponse`` written back.
    A client that disconnects cancels this (``handler_cancellation``); closing the response then
    aborts its engine streams."""
    state = request.app[STATE]

    async def read() -> bytes:
        try:
            return await request.read()
        except web.HTTPRequestEntityTooLarge as exc:
            raise BodyTooLarge from exc

    api_request = ApiRequest(state, request.method, request.path, request.headers, read, request.query)
    response = await dispatch(api_request)
    if response.stream is None:
        return web.Response(status=response.status, body=response.body, headers=response.headers)
    try:
        stream = web.StreamResponse(status=response.status, headers=response.headers)
        await stream.prepare(request)
        async for data in response.stream:
            await stream.write(data)
        return stream
    finally:
        await response.close()


def build_app(core: EngineCore, runner: ModelRunner, **options) -> web.Application:
    """The aiohttp application over ``service.build_state(core, runner, **options)``
    (``app[STATE]``): it starts the engine on startup, drains on shutdown and stops the engine
    (and closes the feedback store) on cleanup."""
    state = service.build_state(core, runner, **options)
    app = web.Application(client_max_size=state.max_request_bytes)
    app[STATE] = state
    app.router.add_route("*", "/{tail:.*}", _handle)

    async def start(app: web.Application) -> None:
        await service.start(state)

    async def drain(app: web.Application) -> None:
        await service.drain(state)

    async def stop(app: web.Application) -> None:
        await service.stop(state)

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
        if request.path == "/health":
            return web.json_response({"status": "loading"}, status=503, headers={"Retry-After": "1"})
        error = error_response(ApiError(503, "the model is loading; retry shortly", None, "loading"),
                               request.path.startswith("/generate"))
        return web.Response(status=error.status, body=error.body, headers=error.headers)

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
