"""The HTTP front end, against a real server on 127.0.0.1 (TGI-style routes)."""

import asyncio
import json

import aiohttp
import pytest
from aiohttp import web

from scheduler.async_engine import AsyncEngine
from server.app import build_app


@pytest.fixture
async def server(make_engine):
    engine = AsyncEngine(*make_engine())
    runner = web.AppRunner(build_app(engine))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", engine
    finally:
        await runner.cleanup()


async def test_generate_and_stream_agree(server):
    url, engine = server
    body = {"inputs": "def parse(text):", "parameters": {"max_new_tokens": 12, "details": True}}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
        async with http.get(f"{url}/health") as r:
            assert r.status == 200
        async with http.post(f"{url}/generate", json=body) as r:
            assert r.status == 200 and r.headers["x-request-id"]
            full = await r.json()
        events = []
        async with http.post(f"{url}/generate_stream", json=body) as r:
            assert r.headers["Content-Type"] == "text/event-stream"
            async for line in r.content:
                if line.startswith(b"data:"):
                    events.append(json.loads(line[5:]))
    details = full["details"]
    assert details["generated_tokens"] == len(details["tokens"]) <= 12
    assert [e["token"]["id"] for e in events] == [t["id"] for t in details["tokens"]]
    assert events[-1]["generated_text"] == full["generated_text"]
    assert "".join(e["token"]["text"] for e in events) == full["generated_text"]
    assert all(e["generated_text"] is None for e in events[:-1])
    assert engine.core.pool.num_free_blocks == engine.core.pool.num_blocks


@pytest.mark.parametrize(
    "body, needle",
    [
        (b"{not json", "malformed JSON"),
        (b'{"inputs": 5}', "inputs"),
        (b'{"inputs": ""}', "inputs"),
        (b'{"inputs": "hi", "parameters": {"top_p": 2.0}}', "top_p"),
        (b'{"inputs": "hi", "parameters": {"max_new_tokens": 100000}}', "max_tokens"),
    ],
)
async def test_bad_input_gets_422_and_the_server_still_serves(server, body, needle):
    url, engine = server
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
        async with http.post(f"{url}/generate", data=body, headers={"Content-Type": "application/json"}) as r:
            assert r.status == 422
            err = await r.json()
            assert err["error_type"] == "validation" and needle in err["error"]
        async with http.post(f"{url}/generate", json={"inputs": "ok", "parameters": {"max_new_tokens": 2}}) as r:
            assert r.status == 200
    assert not engine.core.has_work


async def test_client_disconnect_aborts_and_frees_blocks(server):
    url, engine = server
    body = {"inputs": "x" * 50, "parameters": {"max_new_tokens": 500}}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
        async with http.post(f"{url}/generate_stream", json=body) as r:
            n = 0
            async for line in r.content:
                n += line.startswith(b"data:")
                if n == 3:
                    break
    for _ in range(200):  # bounded: the abort lands within an iteration or two
        if not engine.core.has_work:
            break
        await asyncio.sleep(0.02)
    assert not engine.core.has_work
    assert engine.core.pool.num_free_blocks == engine.core.pool.num_blocks
