"""The OpenAI-compatible routes against a real server on 127.0.0.1: raw HTTP and the official
``openai`` package, streaming vs not, scoring, concurrency, cut streams, metrics."""

import asyncio
import json

import aiohttp
import openai
import pytest
import torch

from protocol.sse import DONE, Decoder

TIMEOUT = aiohttp.ClientTimeout(total=120)
REQUIRED_METRICS = [
    "mace_time_to_first_token_seconds", "mace_inter_token_latency_seconds", "mace_e2e_request_latency_seconds",
    "mace_requests_running", "mace_requests_waiting", "mace_kv_blocks_total", "mace_kv_blocks_used",
    "mace_prompt_tokens_total", "mace_generation_tokens_total", "mace_requests_total",
    "mace_prefix_cache_queries_total", "mace_prefix_cache_hits_total", "mace_kv_blocks_cached",
    "mace_slo_attained_total", "mace_slo_violated_total", "mace_scheduler_plan_seconds", "mace_iteration_seconds",
    "mace_cost_model_error_ratio",
]
CHAT = [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "What does parse() return?"}]


async def _post(http, url, body, **kw):
    async with http.post(url, json=body, **kw) as r:
        return r.status, await r.json(), r.headers


async def _stream(http, url, body) -> list[dict]:
    """The JSON chunks of a stream, checking it ends with [DONE]."""
    decoder, chunks, done = Decoder(), [], False
    async with http.post(url, json=body) as r:
        assert r.status == 200 and r.headers["Content-Type"] == "text/event-stream"
        async for data in r.content.iter_any():
            for event in decoder.feed(data):
                assert not done
                if event.data == DONE:
                    done = True
                else:
                    chunks.append(json.loads(event.data))
    assert done
    return chunks


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        key, _, value = line.rpartition(" ")
        if key == name:
            return float(value)
    raise KeyError(name)


async def test_chat_stream_equals_the_answer_for_the_same_seed(start_server):
    body = {"messages": CHAT, "max_tokens": 24, "temperature": 0.9, "top_p": 0.95, "seed": 7, "n": 2,
            "logprobs": True, "top_logprobs": 3}
    async with start_server() as (url, engine), aiohttp.ClientSession(timeout=TIMEOUT) as http:
        status, full, headers = await _post(http, f"{url}/v1/chat/completions", body)
        assert status == 200 and headers["x-request-id"] and full["object"] == "chat.completion"
        chunks = await _stream(http, f"{url}/v1/chat/completions",
                               {**body, "stream": True, "stream_options": {"include_usage": True}})
    for choice in full["choices"]:
        i = choice["index"]
        mine = [c["choices"][0] for c in chunks if c["choices"] and c["choices"][0]["index"] == i]
        assert mine[0]["delta"]["role"] == "assistant"
        assert "".join(c["delta"].get("content", "") for c in mine) == choice["message"]["content"]
        assert [c["finish_reason"] for c in mine][-1] == choice["finish_reason"] == "length"
        assert all(c["finish_reason"] is None for c in mine[:-1])
        streamed_lp = [t for c in mine for t in c["logprobs"]["content"]]
        assert streamed_lp == choice["logprobs"]["content"]
        assert len(streamed_lp) == 24 and all(len(t["top_logprobs"]) == 3 for t in streamed_lp)
    # different seeds per choice: the two samples differ
    assert full["choices"][0]["message"]["content"] != full["choices"][1]["message"]["content"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == full["usage"]
    assert full["usage"]["completion_tokens"] == 48
    assert all(c["usage"] is None for c in chunks[:-1])
    assert engine.core.pool.num_used_blocks == 0


async def test_greedy_completion_matches_transformers(start_server, demo_model_dir, reference_models):
    model = reference_models(demo_model_dir)
    async with start_server() as (url, engine), aiohttp.ClientSession(timeout=TIMEOUT) as http:
        tokenizer = engine.core.tokenizer
        prompt = "def read_config(path):\n    "
        ids = tokenizer.encode(prompt, add_special_tokens=True)
        ref = model.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False)[0, len(ids):].tolist()
        for p in (prompt, ids):  # text and token-id prompts
            status, out, _ = await _post(http, f"{url}/v1/completions",
                                         {"prompt": p, "max_tokens": 20, "temperature": 0, "ignore_eos": True})
            assert status == 200
            assert out["choices"][0]["text"] == tokenizer.decode(ref)
            assert out["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 20, "total_tokens": len(ids) + 20}


async def test_echo_scores_a_text_like_the_model(start_server, demo_model_dir, reference_models):
    model = reference_models(demo_model_dir)
    text = "Return the number of items in a container."
    async with start_server() as (url, engine), aiohttp.ClientSession(timeout=TIMEOUT) as http:
        ids = engine.core.tokenizer.encode(text, add_special_tokens=True)
        status, out, _ = await _post(http, f"{url}/v1/completions",
                                     {"prompt": text, "echo": True, "logprobs": 2, "max_tokens": 0})
    assert status == 200
    choice = out["choices"][0]
    assert choice["text"] == text and choice["finish_reason"] == "length"
    lp = choice["logprobs"]
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    expected = [ref[p - 1, ids[p]].item() for p in range(1, len(ids))]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["token_logprobs"][1:] == pytest.approx(expected, abs=1e-4)
    assert "".join(lp["tokens"]) == text
    assert [text[o:] for o in lp["text_offset"]][1:] == [text[len("".join(lp["tokens"][:k])):] for k in range(1, len(ids))]
    assert all(len(t) == 3 for t in lp["top_logprobs"][1:])  # the token itself and 2 alternatives at most
    assert out["usage"]["completion_tokens"] == 0


async def test_completion_stream_with_echo_and_stop_string(start_server):
    async with start_server() as (url, engine), aiohttp.ClientSession(timeout=TIMEOUT) as http:
        base = {"prompt": "class Parser:", "max_tokens": 30, "temperature": 0, "ignore_eos": True}
        _, free, _ = await _post(http, f"{url}/v1/completions", base)
        text = free["choices"][0]["text"]
        stop = text[10:13]  # a stop string the greedy answer is sure to meet
        body = {**base, "stop": [stop], "echo": True, "logprobs": 1}
        _, full, _ = await _post(http, f"{url}/v1/completions", body)
        chunks = await _stream(http, f"{url}/v1/completions", {**body, "stream": True})
    choice = full["choices"][0]
    assert choice["text"] == "class Parser:" + text[: text.index(stop)]
    assert choice["finish_reason"] == "stop" and choice["stop_reason"] == stop
    assert "".join(c["choices"][0]["text"] for c in chunks) == choice["text"]
    streamed = [t for c in chunks for t in c["choices"][0]["logprobs"]["token_logprobs"]]
    assert streamed == choice["logprobs"]["token_logprobs"]
    offsets = [t for c in chunks for t in c["choices"][0]["logprobs"]["text_offset"]]
    assert offsets == choice["logprobs"]["text_offset"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


async def test_the_openai_package_works_unchanged(start_server):
    async with start_server(model_name="demo") as (url, engine):
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
        models = await client.models.list()
        assert [m.id for m in models.data] == ["demo", "demo:base"]  # no training here: no versions
        chat = await client.chat.completions.create(model="demo", messages=CHAT, max_tokens=12, seed=3,
                                                    temperature=0.7, extra_body={"priority": 1})
        assert chat.choices[0].finish_reason == "length" and chat.usage.completion_tokens == 12
        parts, finish = [], None
        stream = await client.chat.completions.create(model="demo", messages=CHAT, max_tokens=12, seed=3,
                                                      temperature=0.7, stream=True)
        async for chunk in stream:
            parts.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
        assert "".join(parts) == chat.choices[0].message.content and finish == "length"

        comp = await client.completions.create(model="demo", prompt="import os", max_tokens=8, seed=5)
        parts = [c.choices[0].text async for c in await client.completions.create(
            model="demo", prompt="import os", max_tokens=8, seed=5, stream=True)]
        assert "".join(parts) == comp.choices[0].text

        with pytest.raises(openai.NotFoundError):
            await client.chat.completions.create(model="gpt-4o", messages=CHAT, max_tokens=2)
        with pytest.raises(openai.BadRequestError) as err:
            await client.chat.completions.create(model="demo", messages=[], max_tokens=2)
        assert err.value.body["param"] == "messages"
        await client.close()
    assert engine.core.pool.num_used_blocks == 0


async def test_fifty_concurrent_streams_all_complete(start_server):
    async with start_server() as (url, engine), aiohttp.ClientSession(timeout=TIMEOUT) as http:
        async def one(i: int) -> tuple[int, str]:
            chunks = await _stream(http, f"{url}/v1/completions", {
                "prompt": f"def task_{i}(x):", "max_tokens": 6 + i % 5, "seed": i, "ignore_eos": True,
                "stream": True, "logprobs": 0})
            return sum(len(c["choices"][0]["logprobs"]["tokens"]) for c in chunks), chunks[-1]["choices"][0]["finish_reason"]

        results = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(50))), 120)
        async with http.get(f"{url}/metrics") as r:
            metrics = await r.text()
    assert results == [(6 + i % 5, "length") for i in range(50)]
    for name in REQUIRED_METRICS:
        assert f"# TYPE {name} " in metrics, name
    assert _metric(metrics, "mace_prompt_tokens_total") == sum(
        len(engine.core.tokenizer.encode(f"def task_{i}(x):")) for i in range(50))
    assert _metric(metrics, "mace_inter_token_latency_seconds_count") == sum(5 + i % 5 for i in range(50))
    assert _metric(metrics, "mace_kv_blocks_total") == engine.core.pool.num_blocks
    assert _metric(metrics, "mace_slo_attained_total") + _metric(metrics, "mace_slo_violated_total") == 50
    assert _metric(metrics, "mace_iteration_seconds_count") == engine.num_iterations
    assert _metric(metrics, 'mace_requests_total{outcome="length"}') == 50
    assert _metric(metrics, "mace_time_to_first_token_seconds_count") == 50
    assert _metric(metrics, "mace_generation_tokens_total") == sum(6 + i % 5 for i in range(50))
    assert _metric(metrics, "mace_kv_blocks_used") == 0


async def test_fifty_cut_streams_free_every_block(start_server):
    async with start_server() as (url, engine), aiohttp.ClientSession(timeout=TIMEOUT) as http:
        async def cut(i: int) -> None:
            body = {"messages": [{"role": "user", "content": f"tell me a long story number {i}"}],
                    "max_tokens": 400, "stream": True, "seed": i}
            async with http.post(f"{url}/v1/chat/completions", json=body) as r:
                decoder, seen = Decoder(), 0
                async for data in r.content.iter_any():
                    seen += len(decoder.feed(data))
                    if seen >= 2:
                        break
            # leaving the block closes the connection mid-stream

        await asyncio.wait_for(asyncio.gather(*(cut(i) for i in range(50))), 120)
        for _ in range(250):  # bounded: each abort lands within an iteration
            async with http.get(f"{url}/metrics") as r:
                metrics = await r.text()
            if _metric(metrics, "mace_kv_blocks_used") == 0 and not engine.core.has_work:
                break
            await asyncio.sleep(0.02)
        assert _metric(metrics, "mace_kv_blocks_used") == 0
        assert _metric(metrics, "mace_requests_running") == _metric(metrics, "mace_requests_waiting") == 0
        assert _metric(metrics, 'mace_requests_total{outcome="abort"}') == 50
        engine.core.check_integrity()
        # and it still serves
        status, out, _ = await _post(http, f"{url}/v1/completions", {"prompt": "ok", "max_tokens": 2})
        assert status == 200 and out["usage"]["completion_tokens"] == 2


async def test_prefix_cache_metrics(start_server):
    system = "You are a careful assistant who answers in one short sentence. " * 4
    async with start_server() as (url, engine), aiohttp.ClientSession(timeout=TIMEOUT) as http:
        lengths = []
        for question in ("Why?", "How so?"):
            body = {"messages": [{"role": "system", "content": system}, {"role": "user", "content": question}],
                    "max_tokens": 4}
            status, out, _ = await _post(http, f"{url}/v1/chat/completions", body)
            assert status == 200
            lengths.append(out["usage"]["prompt_tokens"])
        async with http.get(f"{url}/metrics") as r:
            metrics = await r.text()
    hits = _metric(metrics, "mace_prefix_cache_hits_total")
    assert _metric(metrics, "mace_prefix_cache_queries_total") == sum(lengths)
    assert hits == engine.core.queues.num_prefix_hit_tokens > 0 and hits % 16 == 0
    assert _metric(metrics, "mace_kv_blocks_cached") == engine.core.pool.num_cached_blocks > 0
    assert _metric(metrics, "mace_kv_blocks_used") == 0


async def test_slo_attainment_is_counted_per_request(start_server):
    async with start_server() as (url, engine), aiohttp.ClientSession(timeout=TIMEOUT) as http:
        for slo in ({"slo_ttft_ms": 1e6, "slo_tbt_ms": 1e6}, {"slo_ttft_ms": 1e-6}, {"slo_tbt_ms": 1e-6}):
            status, _, _ = await _post(http, f"{url}/v1/completions", {"prompt": "x", "max_tokens": 4, **slo})
            assert status == 200
        async with http.get(f"{url}/metrics") as r:
            metrics = await r.text()
    assert _metric(metrics, "mace_slo_attained_total") == 1
    assert _metric(metrics, "mace_slo_violated_total") == 2
