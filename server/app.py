"""HTTP front end (aiohttp on uvloop): TGI-style `/generate` and `/generate_stream`, `/health`.

The OpenAI-compatible routes, metrics, limits and auth arrive with the server issue; this is the
smallest front end that serves the engine for real.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import uuid

import msgspec
import uvloop
from aiohttp import web

from engine.config import EngineConfig
from engine.sampling_params import InvalidRequestError, SamplingParams
from scheduler.async_engine import AsyncEngine, EngineError
from scheduler.builder import build_engine
from scheduler.core import RequestOutput

log = logging.getLogger(__name__)
ENGINE = web.AppKey("engine", AsyncEngine)


class GenerateParameters(msgspec.Struct, omit_defaults=True):
    max_new_tokens: int | None = 20
    do_sample: bool = False
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: list[str] = []
    details: bool = False


class GenerateRequest(msgspec.Struct):
    inputs: str
    parameters: GenerateParameters = msgspec.field(default_factory=GenerateParameters)


_decode_request = msgspec.json.Decoder(GenerateRequest).decode
_encode = msgspec.json.Encoder().encode
# TGI's names for why generation ended.
_TGI_FINISH = {"stop": "eos_token", "length": "length", "abort": "length", "error": "length"}


def _tgi_error(status: int, message: str, error_type: str = "validation") -> web.Response:
    return web.Response(status=status, body=_encode({"error": message, "error_type": error_type}), content_type="application/json")


def _sampling(p: GenerateParameters) -> SamplingParams:
    # TGI samples when do_sample is set or any sampling knob is given; greedy otherwise.
    sample = p.do_sample or p.temperature is not None or p.top_p is not None or (p.top_k or 0) > 0
    return SamplingParams(
        max_tokens=p.max_new_tokens,
        temperature=(p.temperature if p.temperature is not None else 1.0) if sample else 0.0,
        top_p=p.top_p if p.top_p is not None else 1.0,
        top_k=p.top_k or 0,
        seed=p.seed,
        stop=tuple(p.stop),
        logprobs=0,
    )


async def _parse(request: web.Request) -> tuple[list[int], SamplingParams, bool]:
    try:
        body = _decode_request(await request.read())
    except msgspec.ValidationError as exc:
        raise InvalidRequestError(str(exc)) from exc
    except msgspec.DecodeError as exc:
        raise InvalidRequestError(f"malformed JSON: {exc}") from exc
    if not body.inputs:
        raise InvalidRequestError("`inputs` must not be empty", "inputs")
    tokenizer = request.app[ENGINE].core.tokenizer
    return tokenizer.encode(body.inputs, add_special_tokens=False), _sampling(body.parameters), body.parameters.details


def _token(out: RequestOutput, text: str) -> dict:
    lp = out.new_logprobs[0].logprob if out.new_logprobs else None
    return {"id": out.new_token_ids[0], "text": text, "logprob": lp, "special": False}


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def generate(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    rid = uuid.uuid4().hex
    try:
        prompt, params, details = await _parse(request)
        text, tokens, last = [], [], None
        async for out in engine.generate(prompt, params, rid):
            text.append(out.new_text)
            if out.new_token_ids:
                tokens.append(_token(out, out.new_text))
            last = out
    except InvalidRequestError as exc:
        return _tgi_error(422, str(exc))
    except EngineError as exc:
        return _tgi_error(500, str(exc), "generation")
    body: dict = {"generated_text": "".join(text)}
    if details:
        body["details"] = {
            "finish_reason": _TGI_FINISH[last.finish_reason],
            "generated_tokens": last.num_output_tokens,
            "seed": params.seed,
            "prefill": [],
            "tokens": tokens,
        }
    return web.Response(body=_encode(body), content_type="application/json", headers={"x-request-id": rid})


async def generate_stream(request: web.Request) -> web.StreamResponse:
    engine = request.app[ENGINE]
    rid = uuid.uuid4().hex
    try:
        prompt, params, _ = await _parse(request)
        stream = engine.generate(prompt, params, rid)
        first = await anext(stream)
    except InvalidRequestError as exc:
        return _tgi_error(422, str(exc))
    except EngineError as exc:
        return _tgi_error(500, str(exc), "generation")
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "x-request-id": rid})
    await response.prepare(request)
    text = []
    out: RequestOutput | None = first
    try:
        while out is not None:
            text.append(out.new_text)
            event = {"token": _token(out, out.new_text) if out.new_token_ids else None, "generated_text": None, "details": None}
            if out.finished:
                event["generated_text"] = "".join(text)
                event["details"] = {"finish_reason": _TGI_FINISH[out.finish_reason], "generated_tokens": out.num_output_tokens, "seed": params.seed}
            await response.write(b"data:" + _encode(event) + b"\n\n")
            out = await anext(stream, None)
    except EngineError as exc:
        await response.write(b"data:" + _encode({"error": str(exc), "error_type": "generation"}) + b"\n\n")
    finally:
        await stream.aclose()  # a client that went away aborts its request here
    return response


def build_app(engine: AsyncEngine) -> web.Application:
    app = web.Application(client_max_size=4 << 20)
    app[ENGINE] = engine
    app.router.add_get("/health", health)
    app.router.add_post("/generate", generate)
    app.router.add_post("/generate_stream", generate_stream)

    async def start(app: web.Application) -> None:
        await engine.start()

    async def stop(app: web.Application) -> None:
        await engine.stop()

    app.on_startup.append(start)
    app.on_cleanup.append(stop)
    return app


def serve(args: argparse.Namespace) -> None:
    config = EngineConfig(
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        block_size=args.block_size,
        kv_cache_bytes=args.kv_cache_bytes,
        kv_cache_fraction=args.kv_cache_fraction,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_num_seqs=args.max_num_seqs,
        enable_chunked_prefill=not args.no_chunked_prefill,
        max_model_len=args.max_model_len,
        seed=args.seed,
    )
    engine = AsyncEngine(*build_engine(config))
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    web.run_app(build_app(engine), host=args.host, port=args.port, loop=loop, print=lambda msg: log.info(msg))
