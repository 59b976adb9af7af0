"""`mace serve` start-up: the engine is built in a thread that exits (torch's OpenMP team goes
with it), and the port answers 503 until the application is ready."""

import asyncio
import socket
import threading
import types

import aiohttp
import pytest
from aiohttp import web

from server.app import _in_a_passing_thread, _serve_forever
from server.state import STATE


async def test_start_up_runs_in_another_thread_that_is_gone_after():
    seen = []
    assert await _in_a_passing_thread(lambda: seen.append(threading.current_thread()) or 42) == 42
    (thread,) = seen
    thread.join(timeout=5)
    assert thread is not threading.main_thread() and thread.name == "mace-start-up" and not thread.is_alive()


async def test_a_start_up_error_is_raised_in_the_awaiting_coroutine():
    def fail():
        raise ValueError("no such model")

    with pytest.raises(ValueError, match="no such model"):
        await _in_a_passing_thread(fail)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ready_app() -> web.Application:
    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app = web.Application()
    app.router.add_get("/health", health)
    app[STATE] = types.SimpleNamespace(model_name="fake", shutdown_grace_s=0.0)
    return app


async def _get(http: aiohttp.ClientSession, method: str, url: str) -> tuple[int, dict, dict]:
    async with http.request(method, url, json={} if method == "POST" else None) as r:
        return r.status, dict(r.headers), await r.json()


async def test_the_port_answers_503_while_the_model_loads_then_the_app_serves():
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    release, stop = threading.Event(), asyncio.Event()

    def build() -> web.Application:
        assert release.wait(timeout=30)
        return _ready_app()

    server = asyncio.ensure_future(_serve_forever(build, "127.0.0.1", port, stop))
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(100):  # the socket listens within a few event-loop turns
                try:
                    status, headers, body = await _get(http, "GET", f"{base}/health")
                    break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.05)
            assert (status, body, headers["Retry-After"]) == (503, {"status": "loading"}, "1")

            status, headers, body = await _get(http, "POST", f"{base}/v1/chat/completions")
            assert status == 503 and headers["Retry-After"] == "1"
            assert body["error"]["code"] == "loading" and body["error"]["type"]
            status, _, body = await _get(http, "POST", f"{base}/generate")
            assert status == 503 and body["error_type"] and "loading" in body["error"]

            release.set()
            for _ in range(200):
                status, _, body = await _get(http, "GET", f"{base}/health")
                if status == 200:
                    break
                await asyncio.sleep(0.05)
            assert (status, body) == (200, {"status": "ok"})
            # the ready app owns every route now: one it does not have is a plain 404
            async with http.get(f"{base}/v1/models") as r:
                assert r.status == 404
        stop.set()
        await asyncio.wait_for(server, timeout=10)
    finally:
        release.set()
        stop.set()
        if not server.done():
            server.cancel()
    with socket.socket() as s:  # the port is closed again
        assert s.connect_ex(("127.0.0.1", port)) != 0


async def test_a_stop_while_loading_returns_and_a_failed_build_raises():
    port = _free_port()
    release, stop = threading.Event(), asyncio.Event()
    server = asyncio.ensure_future(
        _serve_forever(lambda: release.wait(timeout=30) and _ready_app(), "127.0.0.1", port, stop))
    await asyncio.sleep(0.2)
    stop.set()
    await asyncio.wait_for(server, timeout=10)
    release.set()

    def fail() -> web.Application:
        raise FileNotFoundError("no model at /nowhere")

    with pytest.raises(FileNotFoundError, match="/nowhere"):
        await asyncio.wait_for(_serve_forever(fail, "127.0.0.1", _free_port(), asyncio.Event()), timeout=10)
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0
