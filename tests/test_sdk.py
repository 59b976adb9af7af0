"""The async SDK against a real server on 127.0.0.1, and against tiny fake servers for retries,
timeouts and error events."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable

import msgspec
import pytest
from aiohttp import web

from clients import (
    APIConnectionError,
    APIError,
    APITimeoutError,
    AsyncClient,
    ChatDelta,
)
from engine.sampling_params import SamplingParams
from scheduler.async_engine import AsyncEngine
from server.app import build_app, make_runner
from server.state import STATE
from protocol import openai as oa
from protocol import tgi
from protocol.sse import encode_event

MESSAGES = [{"role": "user", "content": "Write a haiku about paging."}]


async def _serve(app: web.Application) -> tuple[str, web.AppRunner]:
    runner = make_runner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return f"http://127.0.0.1:{runner.addresses[0][1]}", runner


@pytest.fixture
async def start_server(make_engine):
    """Start a real server on the demo model (``build_app`` keywords pass through)."""
    runners = []

    async def start(**app_kwargs) -> tuple[str, AsyncEngine]:
        app = build_app(*make_engine(), **app_kwargs)
        url, runner = await _serve(app)
        runners.append(runner)
        return url, app[STATE].engine

    yield start
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
async def server(start_server):
    return await start_server()


@pytest.fixture
async def fake_server():
    """Start a one-route fake server: ``await fake_server(path, handler)`` gives its base URL."""
    runners = []

    async def start(path: str, handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
                    method: str = "POST") -> str:
        app = web.Application()
        app.router.add_route(method, path, handler)
        url, runner = await _serve(app)
        runners.append(runner)
        return url

    yield start
    for runner in runners:
        await runner.cleanup()


def _scripted(answers: list[web.Response | Callable[[web.Request], Awaitable[web.StreamResponse]]]):
    """A handler giving ``answers`` in turn (the last one repeats), counting its calls."""
    calls = []

    async def handler(request: web.Request) -> web.StreamResponse:
        calls.append(time.monotonic())
        answer = answers[min(len(calls), len(answers)) - 1]
        return answer if isinstance(answer, web.StreamResponse) else await answer(request)

    return handler, calls


def _openai_error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    body = msgspec.json.encode(oa.ErrorResponse(oa.ErrorInfo(message, "rate_limit_error", None, "queue_full")))
    return web.Response(status=status, body=body, content_type="application/json", headers=headers)


CANNED_CHAT = oa.ChatCompletion("chatcmpl-1", 0, "fake", [oa.ChatChoice(0, oa.AssistantMessage("hi"), "stop")],
                                oa.Usage(1, 1, 2))


def _ok_chat() -> web.Response:
    return web.Response(body=msgspec.json.encode(CANNED_CHAT), content_type="application/json")


# -- against the real server --------------------------------------------------------------------


async def test_chat_and_stream_chat_agree_under_a_seed(server):
    url, engine = server
    params = {"seed": 11, "temperature": 1.0, "max_tokens": 12}
    async with AsyncClient(url) as client:
        full = await client.chat(MESSAGES, **params)
        async with client.stream_chat(MESSAGES, **params, stream_options={"include_usage": True}) as stream:
            deltas = [d async for d in stream]
    assert isinstance(full, oa.ChatCompletion) and len(full.choices) == 1
    choice = full.choices[0]
    assert all(isinstance(d, ChatDelta) and d.index == 0 for d in deltas)
    assert "".join(d.content for d in deltas) == choice.message.content
    assert choice.message.content and choice.finish_reason in ("length", "stop")
    assert [d.finish_reason for d in deltas] == [None] * (len(deltas) - 1) + [choice.finish_reason]
    assert stream.usage == full.usage and full.usage.completion_tokens <= 12
    assert engine.core.pool.num_free_blocks == engine.core.pool.num_blocks


async def test_stream_without_usage_and_with_logprobs(server):
    url, _ = server
    async with AsyncClient(url) as client:
        stream = client.stream_chat(MESSAGES, seed=3, max_tokens=5, logprobs=True, top_logprobs=2)
        deltas = [d async for d in stream]
    assert stream.usage is None
    entries = [e for d in deltas for e in d.logprobs or []]
    assert 1 <= len(entries) <= 5 and all(len(e.top_logprobs) == 2 and e.logprob <= 0 for e in entries)
    assert "".join(e.token for e in entries) == "".join(d.content for d in deltas)


async def test_complete_and_stream_complete_agree(server):
    url, _ = server
    params = {"seed": 5, "max_tokens": 10, "temperature": 0.8}
    async with AsyncClient(url, model=None) as client:
        full = await client.complete("Once upon a time", **params)
        pieces = [c async for c in client.stream_complete("Once upon a time", **params)]
    assert isinstance(full, oa.Completion) and full.usage is not None
    assert "".join(p.text for p in pieces) == full.choices[0].text
    assert pieces[-1].finish_reason == full.choices[0].finish_reason


async def test_generate_stream_tokens_equal_generate_details(server):
    url, _ = server
    async with AsyncClient(url) as client:
        full = await client.generate("def parse(text):", max_new_tokens=12, details=True)
        events = [e async for e in client.generate_stream("def parse(text):", max_new_tokens=12)]
    assert isinstance(full, tgi.GenerateResponse) and full.details is not None
    assert all(isinstance(e, tgi.StreamResponse) for e in events)
    assert [e.token.id for e in events] == [t.id for t in full.details.tokens]
    assert events[-1].generated_text == full.generated_text
    assert events[-1].details is not None and events[-1].details.generated_tokens == full.details.generated_tokens


async def test_leaving_a_stream_early_aborts_the_request(server):
    url, engine = server
    async with AsyncClient(url) as client, client.generate_stream("x" * 50, max_new_tokens=500) as stream:
        async for event in stream:
            if event.index == 3:
                break
    for _ in range(200):  # bounded: the abort lands within an iteration or two
        if not engine.core.has_work:
            break
        await asyncio.sleep(0.02)
    assert not engine.core.has_work
    assert engine.core.pool.num_free_blocks == engine.core.pool.num_blocks


async def test_score_matches_the_engine_prompt_logprobs(server, make_engine):
    url, _ = server
    prompt, continuation = "The quick brown fox", " jumps over the lazy dog"
    async with AsyncClient(url) as client:
        score = await client.score(prompt, continuation)

    core, runner = make_engine()  # the same weights, run inline
    enc = core.tokenizer(prompt + continuation, add_special_tokens=True, return_offsets_mapping=True)
    core.add_request("score", enc["input_ids"], SamplingParams(max_tokens=0, prompt_logprobs=0))
    outputs = []
    while core.has_work:
        outputs.extend(core.step(runner))
    entries = outputs[-1].prompt_logprobs
    expected = [e.logprob for e, (start, _) in zip(entries, enc["offset_mapping"]) if start >= len(prompt)]

    assert "".join(score.tokens) == continuation
    assert len(expected) == len(score.tokens) >= 2
    assert score.token_logprobs == pytest.approx(expected, abs=1e-5)
    assert score.logprob == pytest.approx(sum(expected), abs=1e-4) and score.logprob < 0


async def test_models_and_health(server, fake_server):
    url, engine = server
    async with AsyncClient(url) as client:
        models = await client.models()
        assert await client.health()
    assert isinstance(models, oa.ModelList) and models.data[0].max_model_len == engine.core.config.model.max_model_len
    handler, _ = _scripted([web.json_response({"status": "shutting down"}, status=503)])
    draining = await fake_server("/health", handler, method="GET")
    async with AsyncClient(draining) as client:
        assert not await client.health()


async def test_bad_requests_raise_the_server_error(server):
    url, _ = server
    async with AsyncClient(url) as client:
        with pytest.raises(APIError) as err:
            await client.chat([])
        assert (err.value.status, err.value.param, err.value.type) == (400, "messages", "invalid_request_error")
        assert "must not be empty" in err.value.message
        with pytest.raises(APIError) as err:
            async for _ in client.stream_chat(MESSAGES, top_logprobs=2):
                pass
        assert (err.value.status, err.value.param) == (400, "top_logprobs")
        with pytest.raises(APIError) as err:
            await client.generate("")
        assert (err.value.status, err.value.type) == (422, "validation") and "inputs" in err.value.message
        with pytest.raises(APIError) as err:
            async for _ in client.generate_stream("hi", top_p=2.0):
                pass
        assert err.value.status == 422 and "top_p" in err.value.message
    async with AsyncClient(url, model="no-such-model") as client:
        with pytest.raises(APIError) as err:
            await client.complete("hi")
        assert (err.value.status, err.value.code) == (404, "model_not_found")


async def test_feedback_and_its_stats(start_server, tmp_path, demo_model_dir):
    from transformers import AutoTokenizer

    from protocol import feedback as fb
    from trainer.feedback import FeedbackStore

    store = FeedbackStore(tmp_path / "f.sqlite3")
    url, _ = await start_server(feedback_store=store)
    async with AsyncClient(url) as client:
        first = await client.feedback("Name a colour.", " teal", " mud", id="p1")
        again = await client.feedback("Name a colour.", " teal", " mud", id="p1")
        chat = await client.feedback(MESSAGES, " paged lines flow", " no")
        with pytest.raises(APIError) as err:
            await client.feedback("Name a colour.", " same", " same")
        stats = await client.feedback_stats()
    assert isinstance(first, fb.FeedbackResponse) and (first.ids, first.stored, first.duplicates) == (["p1"], 1, 0)
    assert (again.ids, again.stored, again.duplicates) == (["p1"], 0, 1)
    assert chat.stored == 1 and len(chat.ids[0]) == 32  # the server's uuid4 hex
    assert (err.value.status, err.value.param) == (400, "rejected")
    assert stats == fb.FeedbackStats(received=2, trained=0, pending=2, set_aside=0)
    template = AutoTokenizer.from_pretrained(demo_model_dir)  # messages are kept as the template renders them
    rendered = template.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert (store.get("p1").prompt, store.get(chat.ids[0]).prompt) == ("Name a colour.", rendered)
    store.close()


async def test_feedback_without_a_store_raises_503(server):
    url, _ = server
    async with AsyncClient(url, max_retries=0) as client:
        with pytest.raises(APIError) as err:
            await client.feedback_stats()
    assert (err.value.status, err.value.code) == (503, "feedback_unavailable")


async def test_api_key(start_server):
    url, _ = await start_server(api_key="k")
    async with AsyncClient(url) as client:
        with pytest.raises(APIError) as err:
            await client.models()
        assert (err.value.status, err.value.code, err.value.type) == (401, "invalid_api_key", "authentication_error")
        assert await client.health()  # open without a key
    async with AsyncClient(url, api_key="wrong", max_retries=0) as client:
        with pytest.raises(APIError, match="401"):
            await client.generate("hi", max_new_tokens=1)
    async with AsyncClient(url, api_key="k") as client:
        assert (await client.chat(MESSAGES, max_tokens=2, seed=0)).usage.completion_tokens <= 2


# -- retries, timeouts, error events (fake servers) -----------------------------------------------


@pytest.mark.parametrize("max_retries, is_ok", [(2, True), (3, True), (1, False)])
async def test_429_is_retried_until_max_retries(fake_server, max_retries, is_ok):
    handler, calls = _scripted([_openai_error(429, "the queue is full"), _openai_error(429, "the queue is full"),
                                _ok_chat()])
    url = await fake_server("/v1/chat/completions", handler)
    async with AsyncClient(url, max_retries=max_retries, backoff_s=0.01) as client:
        if is_ok:
            assert await client.chat(MESSAGES) == CANNED_CHAT
        else:
            with pytest.raises(APIError) as err:
                await client.chat(MESSAGES)
            assert (err.value.status, err.value.message, err.value.code) == (429, "the queue is full", "queue_full")
    assert len(calls) == (3 if is_ok else 2)


async def test_retry_after_is_honoured(fake_server):
    handler, calls = _scripted([_openai_error(503, "shutting down", {"Retry-After": "0.3"}), _ok_chat()])
    url = await fake_server("/v1/chat/completions", handler)
    async with AsyncClient(url, backoff_s=0.001) as client:
        assert await client.chat(MESSAGES) == CANNED_CHAT
    assert len(calls) == 2 and calls[1] - calls[0] >= 0.3


async def test_other_errors_are_not_retried(fake_server):
    handler, calls = _scripted([_openai_error(500, "boom"), _ok_chat()])
    url = await fake_server("/v1/chat/completions", handler)
    async with AsyncClient(url, backoff_s=0.01) as client:
        with pytest.raises(APIError) as err:
            await client.chat(MESSAGES)
    assert err.value.status == 500 and len(calls) == 1


def _tgi_event(index: int, text: str, final: bool = False) -> bytes:
    event = tgi.StreamResponse(index, tgi.Token(index, text, -1.0, False),
                               generated_text="ab" if final else None)
    return encode_event(msgspec.json.encode(event), with_space=False)


def _sse_handler(events: list[bytes]) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for event in events:
            await response.write(event)
        return response

    return handler


async def test_a_stream_is_retried_before_its_first_event(fake_server):
    tgi_busy = web.Response(status=503, body=msgspec.json.encode(tgi.ErrorResponse("draining", "unavailable")),
                            content_type="application/json", headers={"Retry-After": "0"})
    handler, calls = _scripted([tgi_busy, _sse_handler([_tgi_event(1, "a"), _tgi_event(2, "b", final=True)])])
    url = await fake_server("/generate_stream", handler)
    async with AsyncClient(url, backoff_s=5.0) as client:  # Retry-After: 0 wins over the backoff
        events = [e async for e in client.generate_stream("x")]
    assert [e.token.text for e in events] == ["a", "b"] and events[-1].generated_text == "ab"
    assert len(calls) == 2


async def test_error_events_inside_a_stream_raise(fake_server):
    aborted = encode_event(msgspec.json.encode(tgi.ErrorResponse("aborted: shutting down", "aborted")),
                           with_space=False)
    url = await fake_server("/generate_stream", _sse_handler([_tgi_event(1, "a"), aborted]))
    seen = []
    async with AsyncClient(url) as client:
        with pytest.raises(APIError) as err:
            async for event in client.generate_stream("x"):
                seen.append(event.token.text)
    assert seen == ["a"] and (err.value.status, err.value.type) == (None, "aborted")

    failed = msgspec.json.encode(oa.ErrorResponse(oa.ErrorInfo("engine failed", "server_error")))
    url = await fake_server("/v1/chat/completions", _sse_handler([encode_event(failed), encode_event(b"[DONE]")]))
    async with AsyncClient(url) as client:
        with pytest.raises(APIError, match="engine failed") as err:
            async for _ in client.stream_chat(MESSAGES):
                pass
    assert err.value.type == "server_error"


async def test_a_slow_server_raises_api_timeout_error(fake_server):
    """The handler never answers (it waits for an event nobody sets): the only way out is the
    client's timeout, which drops the connection, so the server cancels the handler; a timeout
    is not retried."""
    never, entered, cancelled, answered = asyncio.Event(), [], asyncio.Queue(), []

    async def slow(request: web.Request) -> web.Response:
        entered.append(request.path)
        try:
            await never.wait()
        except asyncio.CancelledError:
            cancelled.put_nowait(request.path)
            raise
        answered.append(request.path)
        return _ok_chat()

    url = await fake_server("/v1/chat/completions", slow)
    async with AsyncClient(url, timeout_s=0.2, backoff_s=0.01) as client:
        # wait_for only turns a hang into a failure; it never fires while the timeout works
        with pytest.raises(APITimeoutError, match="0.2 s") as err:
            await asyncio.wait_for(client.chat(MESSAGES), 30)
        assert isinstance(err.value.__cause__, TimeoutError)
        assert await asyncio.wait_for(cancelled.get(), 30) == "/v1/chat/completions"
        assert len(entered) == 1  # not retried

        async def read_stream() -> None:
            async for _ in client.stream_chat(MESSAGES):
                pass

        with pytest.raises(APITimeoutError, match="0.2 s") as err:
            await asyncio.wait_for(read_stream(), 30)
        assert isinstance(err.value.__cause__, TimeoutError)
        assert await asyncio.wait_for(cancelled.get(), 30) == "/v1/chat/completions"
    assert len(entered) == 2 and answered == [] and cancelled.empty()


async def test_an_unreachable_server_raises_api_connection_error():
    with socket.socket() as s:  # a port nobody listens on once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    async with AsyncClient(f"http://127.0.0.1:{port}", max_retries=2, backoff_s=0.01) as client:
        with pytest.raises(APIConnectionError) as err:
            await client.models()
        assert not isinstance(err.value, APITimeoutError)
        assert not await client.health()
