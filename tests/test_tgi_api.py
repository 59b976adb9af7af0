"""The TGI-compatible routes against a real server on 127.0.0.1."""

import asyncio
import json

import aiohttp

TIMEOUT = aiohttp.ClientTimeout(total=60)


async def _events(http, url, body) -> list[dict]:
    events = []
    async with http.post(f"{url}/generate_stream", json=body) as r:
        assert r.status == 200 and r.headers["Content-Type"] == "text/event-stream" and r.headers["x-request-id"]
        async for line in r.content:
            if line.startswith(b"data:"):
                events.append(json.loads(line[5:]))
    return events


async def test_generate_and_stream_agree(start_server):
    body = {"inputs": "def parse(text):", "parameters": {"max_new_tokens": 12, "details": True, "top_n_tokens": 2}}
    async with start_server() as (url, engine), aiohttp.ClientSession(timeout=TIMEOUT) as http:
        async with http.get(f"{url}/health") as r:
            assert r.status == 200
        async with http.post(f"{url}/generate", json=body) as r:
            assert r.status == 200 and r.headers["x-request-id"]
            full = await r.json()
        events = await _events(http, url, body)
        async with http.get(f"{url}/info") as r:
            info = await r.json()
    details = full["details"]
    assert set(details) == {"finish_reason", "generated_tokens", "seed", "prefill", "tokens", "top_tokens"}
    assert details["generated_tokens"] == len(details["tokens"]) == 12 and details["finish_reason"] == "length"
    assert details["prefill"] == [] and details["seed"] is None
    assert [e["index"] for e in events] == list(range(1, 13))
    assert [e["token"] for e in events] == details["tokens"]
    assert [e["top_tokens"] for e in events] == details["top_tokens"]
    assert all(len(t) == 2 for t in details["top_tokens"])
    assert all(t["logprob"] <= 0 and t["special"] is False for t in details["tokens"])
    # greedy: the chosen token is the most likely one
    assert all(top[0]["id"] == t["id"] for top, t in zip(details["top_tokens"], details["tokens"]))
    assert events[-1]["generated_text"] == full["generated_text"]
    assert "".join(e["token"]["text"] for e in events) == full["generated_text"]
    assert all(e["generated_text"] is None and e["details"] is None for e in events[:-1])
    assert events[-1]["details"] == {"finish_reason": "length", "generated_tokens": 12, "seed": None,
                                     "input_length": len(engine.core.tokenizer.encode("def parse(text):"))}
    assert info["max_total_tokens"] == engine.core.config.model.max_model_len
    assert engine.core.pool.num_free_blocks == engine.core.pool.num_blocks


async def test_stop_sequence_prefill_details_and_full_text(start_server):
    async with start_server() as (url, engine), aiohttp.ClientSession(timeout=TIMEOUT) as http:
        async with http.post(f"{url}/generate", json={"inputs": "import sys", "parameters": {"max_new_tokens": 30}}) as r:
            free = (await r.json())["generated_text"]
        stop = free[8:11]
        params = {"max_new_tokens": 30, "stop": [stop], "details": True, "decoder_input_details": True,
                  "return_full_text": True}
        async with http.post(f"{url}/generate", json={"inputs": "import sys", "parameters": params}) as r:
            out = await r.json()
        async with http.post(f"{url}/v1/completions", json={"prompt": "import sys", "echo": True, "logprobs": 0,
                                                             "max_tokens": 0}) as r:
            scored = (await r.json())["choices"][0]["logprobs"]
        events = await _events(http, url, {"inputs": "import sys", "parameters": params})
    assert out["generated_text"] == "import sys" + free[: free.index(stop)]
    assert out["details"]["finish_reason"] == "stop_sequence"
    prefill = out["details"]["prefill"]
    assert [p["text"] for p in prefill] == scored["tokens"]
    assert [p["logprob"] for p in prefill] == scored["token_logprobs"]
    assert events[-1]["generated_text"] == out["generated_text"]
    assert events[-1]["details"]["finish_reason"] == "stop_sequence"


async def test_seeded_sampling_reproduces(start_server):
    body = {"inputs": "while True:", "parameters": {"max_new_tokens": 10, "do_sample": True, "seed": 11,
                                                    "temperature": 0.8, "top_k": 50, "details": True}}
    async with start_server() as (url, engine), aiohttp.ClientSession(timeout=TIMEOUT) as http:
        outs = []
        for _ in range(2):
            async with http.post(f"{url}/generate", json=body) as r:
                outs.append(await r.json())
    assert outs[0] == outs[1] and outs[0]["details"]["seed"] == 11


async def test_client_disconnect_aborts_and_frees_blocks(start_server):
    async with start_server() as (url, engine), aiohttp.ClientSession(timeout=TIMEOUT) as http:
        body = {"inputs": "x" * 50, "parameters": {"max_new_tokens": 500}}
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
