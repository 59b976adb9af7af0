"""Bad input, limits, auth and shutdown: each gets its status and a JSON body naming the problem,
and the server keeps serving with every block back in the pool."""

import asyncio
import json
import signal
import time

import aiohttp
import pytest

from tests.conftest import spawn_server, wait_ready

TIMEOUT = aiohttp.ClientTimeout(total=60)
MSG = [{"role": "user", "content": "hi"}]
JSON = {"Content-Type": "application/json"}


async def _still_serves(http, url, engine):
    async with http.post(f"{url}/v1/completions", json={"prompt": "ok", "max_tokens": 2}) as r:
        assert r.status == 200
    assert not engine.core.has_work and engine.core.pool.num_used_blocks == 0


# (path, raw body, status, param or None, substring of the message)
OPENAI_CASES = [
    ("/v1/chat/completions", b"{not json", 400, None, "malformed JSON"),
    ("/v1/chat/completions", b'{"messages": "hi"}', 400, "messages", "Expected `array`"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "n": "2"}', 400, "n", "Expected `int`"),
    ("/v1/chat/completions", b'{"messages": []}', 400, "messages", "must not be empty"),
    ("/v1/chat/completions", b'{"messages": [{"role": "wizard", "content": "hi"}]}', 400, "messages[0].role", "unknown role"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "temperature": 500}', 400, "temperature", "temperature"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "top_p": 0}', 400, "top_p", "top_p"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "n": 0}', 400, "n", "n must be"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "logprobs": true, "top_logprobs": 30}', 400, "top_logprobs", "top_logprobs"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5000}', 400, "max_tokens", "exceeds the context"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "slo_ttft_ms": -1}', 400, "slo_ttft_ms", "slo_ttft_ms"),
    ("/v1/chat/completions", json.dumps({"messages": MSG, "stop": [f"s{i}" for i in range(17)]}).encode(), 400, "stop", "at most 16"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "model": "gpt-4o"}', 404, "model", "does not exist"),
    ("/v1/completions", json.dumps({"prompt": "x " * 1100}).encode(), 400, "prompt", "context"),
    ("/v1/completions", b'{"prompt": [1, "a"]}', 400, "prompt", "prompt must be"),
    ("/v1/completions", b'{"prompt": []}', 400, "prompt", "must not be empty"),
    ("/v1/completions", b'{"prompt": [99999]}', 400, "prompt", "token ids must be in"),
    ("/v1/completions", b'{"prompt": "hi", "max_tokens": 0}', 400, "max_tokens", "echo"),
    ("/v1/completions", b'{"prompt": "hi", "max_tokens": -3}', 400, "max_tokens", "max_tokens"),
]


@pytest.mark.parametrize("path, raw, status, param, needle", OPENAI_CASES)
async def test_openai_bad_input(start_server, path, raw, status, param, needle):
    async with start_server() as (url, engine), aiohttp.ClientSession(timeout=TIMEOUT) as http:
        async with http.post(url + path, data=raw, headers=JSON) as r:
            assert r.status == status
            assert r.headers["x-request-id"]
            err = (await r.json())["error"]
        assert set(err) == {"message", "type", "param", "code"}
        assert err["param"] == param and needle in err["message"]
        assert err["type"] == "invalid_request_error"
        await _still_serves(http, url, engine)


TGI_CASES = [
    (b"{not json", "malformed JSON"),
    (b'{"inputs": 5}', "inputs"),
    (b'{"inputs": ""}', "inputs"),
    (b'{"inputs": "hi", "parameters": {"top_p": 2.0}}', "top_p"),
    (b'{"inputs": "hi", "parameters": {"max_new_tokens": 0}}', "max_new_tokens"),
    (b'{"inputs": "hi", "parameters": {"max_new_tokens": 100000}}', "max_tokens"),
    (b'{"inputs": "hi", "parameters": {"top_n_tokens": 50}}', "top_n_tokens"),
]


@pytest.mark.parametrize("route", ["/generate", "/generate_stream"])
@pytest.mark.parametrize("raw, needle", TGI_CASES)
async def test_tgi_bad_input_gets_422(start_server, route, raw, needle):
    async with start_server() as (url, engine), aiohttp.ClientSession(timeout=TIMEOUT) as http:
        async with http.post(url + route, data=raw, headers=JSON) as r:
            assert r.status == 422
            err = await r.json()
        assert err["error_type"] == "validation" and needle in err["error"]
        await _still_serves(http, url, engine)


async def test_content_type_size_limit_and_unknown_route(start_server):
    async with start_server(max_request_bytes=2048) as (url, engine), aiohttp.ClientSession(timeout=TIMEOUT) as http:
        async with http.post(f"{url}/v1/completions", data=b'{"prompt": "hi"}', headers={"Content-Type": "text/plain"}) as r:
            assert r.status == 415
            assert (await r.json())["error"]["param"] == "Content-Type"
        async with http.post(f"{url}/generate", data="inputs=hi") as r:  # a form post
            assert r.status == 415 and "Content-Type" in (await r.json())["error"]
        big = json.dumps({"prompt": "x" * 4096}).encode()
        async with http.post(f"{url}/v1/completions", data=big, headers=JSON) as r:
            assert r.status == 413
            assert (await r.json())["error"]["code"] == "request_too_large"
        async with http.post(f"{url}/generate", data=big, headers=JSON) as r:
            assert r.status == 413 and "over the limit" in (await r.json())["error"]
        async with http.get(f"{url}/v1/nothing") as r:
            assert r.status == 404 and "error" in await r.json()
        async with http.get(f"{url}/v1/completions") as r:
            assert r.status == 405
        await _still_serves(http, url, engine)


async def test_a_full_queue_answers_429_at_once(start_server):
    overrides = {"max_num_seqs": 1}
    async with start_server(engine_overrides=overrides, max_waiting_requests=2) as (url, engine), \
            aiohttp.ClientSession(timeout=TIMEOUT) as http:
        body = {"prompt": "a long one", "max_tokens": 300, "ignore_eos": True, "stream": True}
        responses = [await http.post(f"{url}/v1/completions", json=body)]
        for _ in range(250):  # bounded: until the first one runs
            if engine.core.queues.running:
                break
            await asyncio.sleep(0.02)
        for _ in range(4):  # two wait, the rest are refused
            responses.append(await http.post(f"{url}/v1/completions", json=body))
        statuses = [r.status for r in responses]
        assert statuses.count(200) == 3 and statuses.count(429) == 2
        for r in responses:
            if r.status == 429:
                err = (await r.json())["error"]
                assert err["code"] == "queue_full" and err["type"] == "rate_limit_error"
            r.close()  # cut the streams
        t0 = time.monotonic()
        async with http.post(f"{url}/generate", json={"inputs": "x"}) as r:
            assert r.status in (200, 429)
        for _ in range(250):
            if not engine.core.has_work:
                break
            await asyncio.sleep(0.02)
        assert time.monotonic() - t0 < 30
        await _still_serves(http, url, engine)


async def test_api_key_guards_every_route_but_health(start_server):
    async with start_server(api_key="s3cret") as (url, engine), aiohttp.ClientSession(timeout=TIMEOUT) as http:
        async with http.get(f"{url}/health") as r:
            assert r.status == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            for method, path in (("POST", "/v1/chat/completions"), ("GET", "/v1/models"), ("GET", "/metrics"),
                                 ("POST", "/generate")):
                async with http.request(method, url + path, json={"messages": MSG}, headers=headers) as r:
                    assert r.status == 401, (path, headers)
                    body = await r.json()
                    assert ("error" in body) and (path.startswith("/generate") or body["error"]["code"] == "invalid_api_key")
        good = {"Authorization": "Bearer s3cret"}
        async with http.post(f"{url}/v1/chat/completions", json={"messages": MSG, "max_tokens": 2}, headers=good) as r:
            assert r.status == 200
        async with http.get(f"{url}/metrics", headers=good) as r:
            assert r.status == 200


async def test_client_request_id_is_echoed(start_server):
    async with start_server() as (url, engine), aiohttp.ClientSession(timeout=TIMEOUT) as http:
        for _ in range(2):  # the same id twice is fine: engine ids are the server's own
            async with http.post(f"{url}/v1/completions", json={"prompt": "a", "max_tokens": 1},
                                 headers={"x-request-id": "trace-42"}) as r:
                assert r.status == 200 and r.headers["x-request-id"] == "trace-42"


async def test_sigterm_ends_streams_cleanly_and_exits_zero(demo_model_dir, tmp_path):
    proc, url = spawn_server(demo_model_dir, "--shutdown-grace", "0.5", "--state-dir", str(tmp_path))
    try:
        async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
            await wait_ready(http, url)
            body = {"messages": MSG, "max_tokens": 900, "ignore_eos": True, "stream": True}
            async with http.post(f"{url}/v1/chat/completions", json=body) as r:
                assert r.status == 200
                lines = [await r.content.readline()]
                proc.send_signal(signal.SIGTERM)
                async for line in r.content:
                    lines.append(line)
        events = [line[6:].strip() for line in lines if line.startswith(b"data: ")]
        assert events[-1] == b"[DONE]"
        assert json.loads(events[-2])["choices"][0]["finish_reason"] in ("abort", "length")
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("refuse", [True, False])
async def test_a_request_whose_ttft_slo_cannot_be_met_is_refused_or_queued_knowingly(start_server, refuse):
    # the prefill of its own prompt alone is predicted past a 0.01 ms TTFT SLO
    async with start_server(engine_overrides={"policy": "mace"}, refuse_late_requests=refuse) as (url, engine), \
            aiohttp.ClientSession(timeout=TIMEOUT) as http:
        late = {"prompt": "hello there", "max_tokens": 2, "slo_ttft_ms": 0.01}
        async with http.post(f"{url}/v1/completions", json=late) as r:
            if refuse:
                assert r.status == 429 and int(r.headers["Retry-After"]) >= 1
                err = (await r.json())["error"]
                assert err["code"] == "ttft_unattainable" and "TTFT SLO" in err["message"]
            else:
                assert r.status == 200 and (await r.json())["choices"][0]["finish_reason"] == "length"
        async with http.post(f"{url}/v1/completions", json={"prompt": "hello there", "max_tokens": 2}) as r:
            assert r.status == 200  # the default SLO is met: served
        async with http.get(f"{url}/metrics") as r:
            text = await r.text()
        counts = {a: f'mace_requests_late_total{{action="{a}"}} ' for a in ("queued", "refused")}
        want = {"refused": 1.0, "queued": 0.0} if refuse else {"refused": 0.0, "queued": 1.0}
        for action, prefix in counts.items():
            line = next(line for line in text.splitlines() if line.startswith(prefix))
            assert float(line.split()[-1]) == want[action]
        assert "mace_slo_infeasible 0.0" in text
        assert not engine.core.queues.waiting and not engine.core.queues.running
