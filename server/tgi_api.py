"""TGI-compatible routes: ``POST /generate``, ``POST /generate_stream`` and ``GET /info``.

As in TGI: greedy unless ``do_sample`` or a sampling knob (temperature, top_p, top_k) is given;
``finish_reason`` is ``eos_token``, ``stop_sequence`` or ``length``; validation errors are 422
with ``error_type: "validation"``; a stream ends with the event that carries ``generated_text``
and ``details``. A stream aborted by the server (shutdown) ends with an error event
(``error_type: "aborted"``), since TGI's stream events always carry a token.
"""

from __future__ import annotations

import msgspec

from engine.plan import TokenLogprob
from engine.sampling_params import MAX_STOP_SEQUENCES, MAX_TOP_LOGPROBS, InvalidRequestError, SamplingParams
from scheduler.async_engine import EngineError
from scheduler.core import RequestOutput
from scheduler.request import RequestOptions
from server.api import ApiRequest, ApiResponse, Routes, read_json
from protocol import tgi
from server.serving import SequenceSpec, Serving
from protocol.sse import encode_event

_encode = msgspec.json.Encoder().encode


def _finish_reason(out: RequestOutput) -> str:
    if out.finish_reason == "stop":
        return "stop_sequence" if out.stop_reason is not None else "eos_token"
    return "length"


def _sampling(p: tgi.GenerateParameters) -> SamplingParams:
    if p.max_new_tokens is not None and p.max_new_tokens < 1:
        raise InvalidRequestError(f"max_new_tokens must be >= 1, got {p.max_new_tokens}", "max_new_tokens")
    if p.temperature is not None and p.temperature <= 0:
        raise InvalidRequestError(f"temperature must be > 0, got {p.temperature}", "temperature")
    if p.top_n_tokens is not None and not 0 <= p.top_n_tokens <= MAX_TOP_LOGPROBS:
        raise InvalidRequestError(f"top_n_tokens must be in [0, {MAX_TOP_LOGPROBS}]", "top_n_tokens")
    sample = p.do_sample or p.temperature is not None or p.top_p is not None or (p.top_k or 0) > 0
    return SamplingParams(
        max_tokens=p.max_new_tokens,
        temperature=(p.temperature if p.temperature is not None else 1.0) if sample else 0.0,
        top_p=p.top_p if p.top_p is not None else 1.0,
        top_k=p.top_k or 0,
        seed=p.seed,
        stop=tuple(p.stop),
        logprobs=p.top_n_tokens or 0,
        prompt_logprobs=0 if p.decoder_input_details else None,
    )


async def _submit(request: ApiRequest):
    state = request.state
    body: tgi.GenerateRequest = await read_json(request, tgi.GenerateRequest)
    if not body.inputs:
        raise InvalidRequestError("`inputs` must not be empty", "inputs")
    p = body.parameters
    params = _sampling(p)
    choice = await state.adapters.resolve(p.adapter_id, "parameters.adapter_id", request.tenant)
    request.adapter = choice
    prompt = state.serving.tokenizer.encode(body.inputs, add_special_tokens=True)
    options = RequestOptions(priority=p.priority, slo_ttft_ms=p.slo_ttft_ms, slo_tbt_ms=p.slo_tbt_ms,
                             adapter=choice.adapter)
    stream = await state.serving.submit([SequenceSpec(prompt, params)], options)
    return state.serving, body, params, prompt, stream


def _token(serving: Serving, token_id: int, logprob: TokenLogprob | None) -> tgi.Token:
    return tgi.Token(token_id, serving.token_text(token_id), None if logprob is None else logprob.logprob,
                     token_id in serving.special_ids)


def _top_tokens(serving: Serving, logprob: TokenLogprob | None) -> list[tgi.Token]:
    return [] if logprob is None else [_token(serving, i, TokenLogprob(i, lp)) for i, lp in logprob.top]


async def generate(request: ApiRequest) -> ApiResponse:
    serving, body, params, prompt, stream = await _submit(request)
    p = body.parameters
    text, tokens, top_tokens, last, prefill = [], [], [], None, []
    try:
        async for _, out in stream:
            text.append(out.new_text)
            for token_id, lp in zip(out.new_token_ids, out.new_logprobs):
                tokens.append(_token(serving, token_id, lp))
                top_tokens.append(_top_tokens(serving, lp))
            if out.prompt_logprobs is not None:
                prefill = [tgi.PrefillToken(t, serving.token_text(t), None if e is None else e.logprob)
                           for t, e in zip(prompt, out.prompt_logprobs)]
            last = out
    finally:
        await stream.aclose()
    if last is None or last.finish_reason == "abort":
        raise EngineError("the request was aborted: the server is shutting down")
    generated = ("".join(text))
    if p.return_full_text:
        generated = body.inputs + generated
    details = None
    if p.details:
        details = tgi.Details(
            finish_reason=_finish_reason(last), generated_tokens=last.num_output_tokens, seed=params.seed,
            prefill=prefill, tokens=tokens, top_tokens=top_tokens if p.top_n_tokens else [],
        )
    return ApiResponse.json(_encode(tgi.GenerateResponse(generated, details)))


async def generate_stream(request: ApiRequest) -> ApiResponse:
    serving, body, params, prompt, stream = await _submit(request)
    p = body.parameters

    async def events():
        text = [body.inputs] if p.return_full_text else []
        index = 0
        try:
            async for _, out in stream:
                text.append(out.new_text)
                if out.finished and out.finish_reason == "abort":
                    yield encode_event(_encode(tgi.ErrorResponse(
                        "the request was aborted: the server is shutting down", "aborted")), with_space=False)
                    break
                if not out.new_token_ids:
                    continue
                index += 1
                lp = out.new_logprobs[0] if out.new_logprobs else None
                event = tgi.StreamResponse(index, _token(serving, out.new_token_ids[0], lp),
                                           _top_tokens(serving, lp) if p.top_n_tokens else None)
                if out.finished:
                    event.generated_text = "".join(text)
                    event.details = tgi.StreamDetails(_finish_reason(out), out.num_output_tokens, params.seed,
                                                      len(prompt))
                yield encode_event(_encode(event), with_space=False)
        except EngineError as exc:
            yield encode_event(_encode(tgi.ErrorResponse(str(exc), "generation")), with_space=False)

    return ApiResponse.sse(events(), stream.aclose)


async def info(request: ApiRequest) -> ApiResponse:
    state = request.state
    config = state.engine.core.config.model
    return ApiResponse.json({
        "model_id": state.model_name,
        "model_dtype": str(config.dtype),
        "max_input_tokens": config.max_model_len - 1,
        "max_total_tokens": config.max_model_len,
        "max_best_of": 1,
        "max_stop_sequences": MAX_STOP_SEQUENCES,
        "router": "mace-serve",
    })


def add_routes(routes: Routes) -> None:
    routes.post("/generate", generate)
    routes.post("/generate_stream", generate_stream)
    routes.get("/info", info)
