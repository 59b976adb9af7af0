"""OpenAI-compatible routes: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``.

Choices of ours where OpenAI is silent or differs, following vLLM:
- ``max_tokens`` unset on chat means "until the context is full"; on completions it is 16.
- ``n`` choices with a ``seed`` use seeds ``seed, seed + 1, ...`` so they differ but reproduce.
- Log-probs are the model's raw distribution (before temperature / top-p), at most 20 alternatives.
- ``echo`` with ``logprobs`` and ``max_tokens: 0`` scores a text: each prompt token's log-prob
  (the first has none). ``text_offset`` indexes characters of the returned text.
- A request aborted by the server (shutdown) finishes with ``finish_reason: "abort"``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import msgspec

from engine.plan import TokenLogprob
from engine.sampling_params import MAX_TOP_LOGPROBS, InvalidRequestError, SamplingParams
from scheduler.async_engine import EngineError
from scheduler.core import RequestOutput
from scheduler.request import RequestOptions
from server.api import ApiRequest, ApiResponse, Routes, read_json
from server.errors import ApiError, error_body
from protocol import openai as oa
from server.serving import SequenceSpec, Serving
from protocol.sse import DONE, encode_event
from server.adapters import AdapterChoice
from server.state import ServerState

MAX_N = 16
_encode = msgspec.json.Encoder().encode
_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})


# -- request -> engine --------------------------------------------------------------------------


async def _choose_adapter(request: ApiRequest, model: str | None) -> AdapterChoice:
    """The adapter the request's ``model`` names (404 naming ``model`` for none), kept on the
    request for its headers."""
    choice = await request.state.adapters.resolve(model, tenant=request.tenant)
    request.adapter = choice
    return choice


def _sampling(body: oa.ChatCompletionRequest | oa.CompletionRequest, max_tokens: int | None, logprobs: int | None,
              prompt_logprobs: int | None = None) -> SamplingParams:
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    if not 1 <= body.n <= MAX_N:
        raise InvalidRequestError(f"n must be in [1, {MAX_N}], got {body.n}", "n")
    for name in ("slo_ttft_ms", "slo_tbt_ms"):
        value = getattr(body, name)
        if value is not None and value <= 0:
            raise InvalidRequestError(f"{name} must be > 0, got {value}", name)
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=body.top_k,
        seed=body.seed,
        stop=stop,
        stop_token_ids=tuple(body.stop_token_ids),
        ignore_eos=body.ignore_eos,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
    )


def _choices(prompts: list[list[int]], params: SamplingParams, n: int) -> list[SequenceSpec]:
    """Choice ``p * n + j`` is prompt ``p``'s ``j``-th sample, seeded ``seed + j`` when seeded."""
    specs = []
    for prompt in prompts:
        for j in range(n):
            p = params if params.seed is None or j == 0 else dataclasses.replace(params, seed=params.seed + j)
            specs.append(SequenceSpec(prompt, p))
    return specs


def _options(body, choice: AdapterChoice) -> RequestOptions:
    return RequestOptions(priority=body.priority, slo_ttft_ms=body.slo_ttft_ms, slo_tbt_ms=body.slo_tbt_ms,
                          adapter=choice.adapter)


def _render_chat(state: ServerState, messages: list[oa.ChatMessage]) -> list[int]:
    return state.serving.tokenizer.encode(render_chat_text(state, messages), add_special_tokens=False)


def render_chat_text(state: ServerState, messages: list[oa.ChatMessage]) -> str:
    """The prompt text the chat template makes of ``messages`` (with the assistant's turn
    opened), or InvalidRequestError naming the bad field."""
    if not messages:
        raise InvalidRequestError("messages must not be empty", "messages")
    conversation = []
    for i, m in enumerate(messages):
        if m.role not in _ROLES:
            raise InvalidRequestError(f"unknown role {m.role!r}; expected one of {sorted(_ROLES)}", f"messages[{i}].role")
        content = m.content
        if isinstance(content, list):
            if any(part.type != "text" or part.text is None for part in content):
                raise InvalidRequestError("only text content parts are supported", f"messages[{i}].content")
            content = "".join(part.text for part in content)
        conversation.append({"role": m.role, "content": content or ""})
    tokenizer = state.serving.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidRequestError("this model has no chat template; use /v1/completions", "messages")
    return tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)


# -- engine -> response -------------------------------------------------------------------------


@dataclasses.dataclass
class _Choice:
    """What one choice has produced so far."""

    text: list[str] = dataclasses.field(default_factory=list)
    logprobs: list[TokenLogprob] = dataclasses.field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    num_output_tokens: int = 0

    def add(self, out: RequestOutput) -> None:
        self.text.append(out.new_text)
        self.logprobs.extend(out.new_logprobs)
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        self.num_output_tokens = out.num_output_tokens
        if out.finished:
            self.finish_reason, self.stop_reason = out.finish_reason, out.stop_reason


def _chat_logprobs(serving: Serving, entries: list[TokenLogprob]) -> oa.ChatLogprobs:
    def top(tid: int, lp: float) -> oa.TopLogprob:
        text = serving.token_text(tid)
        return oa.TopLogprob(text, lp, list(text.encode()))

    content = []
    for e in entries:
        token = top(e.token_id, e.logprob)
        content.append(oa.ChatTokenLogprob(token.token, token.logprob, token.bytes, [top(i, lp) for i, lp in e.top]))
    return oa.ChatLogprobs(content)


def _completion_logprobs(serving: Serving, ids: list[int], entries: list[TokenLogprob | None], offset: int,
                         offsets: list[int] | None = None) -> oa.CompletionLogprobs:
    """Log-probs of tokens ``ids`` (an entry of None: not scored), text offsets from ``offset``
    (or ``offsets`` when the tokenizer gave them)."""
    tokens = [serving.token_text(t) for t in ids]
    if offsets is None:
        offsets = []
        for text in tokens:
            offsets.append(offset)
            offset += len(text)
    return oa.CompletionLogprobs(
        tokens=tokens,
        token_logprobs=[None if e is None else e.logprob for e in entries],
        # As vLLM: each position's dict holds the chosen token and the top alternatives.
        top_logprobs=[None if e is None else {serving.token_text(i): lp for i, lp in [(e.token_id, e.logprob), *e.top]}
                      for e in entries],
        text_offset=offsets,
    )


def _usage(prompts: list[list[int]], choices: list[_Choice]) -> oa.Usage:
    num_prompt = sum(len(p) for p in prompts)
    num_out = sum(c.num_output_tokens for c in choices)
    return oa.Usage(num_prompt, num_out, num_prompt + num_out)


def _sse(stream, chunk: Callable[[int, RequestOutput], bytes | None],
         usage_chunk: Callable[[], bytes] | None) -> ApiResponse:
    """One SSE event per useful output, then the usage chunk (if asked) and [DONE]; closing the
    response closes (aborts) ``stream``."""

    async def events():
        try:
            async for i, out in stream:
                data = chunk(i, out)
                if data is not None:
                    yield encode_event(data)
            if usage_chunk is not None:
                yield encode_event(usage_chunk())
        except EngineError as exc:
            yield encode_event(error_body(500, str(exc), None, None, "generation", False))
        yield encode_event(DONE)

    return ApiResponse.sse(events(), stream.aclose)


# -- routes -------------------------------------------------------------------------------------


async def chat_completions(request: ApiRequest) -> ApiResponse:
    state = request.state
    serving = state.serving
    body: oa.ChatCompletionRequest = await read_json(request, oa.ChatCompletionRequest)
    choice = await _choose_adapter(request, body.model)
    if body.top_logprobs is not None and not body.logprobs:
        raise InvalidRequestError("top_logprobs needs logprobs: true", "top_logprobs")
    if body.top_logprobs is not None and not 0 <= body.top_logprobs <= MAX_TOP_LOGPROBS:
        raise InvalidRequestError(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}]", "top_logprobs")
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    if max_tokens is not None and max_tokens < 1:
        raise InvalidRequestError(f"max_tokens must be >= 1, got {max_tokens}", "max_tokens")
    params = _sampling(body, max_tokens, (body.top_logprobs or 0) if body.logprobs else None)
    prompt = _render_chat(state, body.messages)
    rid = request.request_id
    stream = await serving.submit(_choices([prompt], params, body.n), _options(body, choice))
    created, model = int(time.time()), choice.name
    choices = [_Choice() for _ in range(body.n)]
    try:
        if not body.stream:
            async for i, out in stream:
                choices[i].add(out)
            result = oa.ChatCompletion(
                id=f"chatcmpl-{rid}", created=created, model=model, usage=_usage([prompt], choices),
                choices=[oa.ChatChoice(
                    index=i, message=oa.AssistantMessage("".join(c.text)), finish_reason=c.finish_reason,
                    logprobs=_chat_logprobs(serving, c.logprobs) if body.logprobs else None, stop_reason=c.stop_reason,
                ) for i, c in enumerate(choices)],
            )
            await stream.aclose()
            return ApiResponse.json(_encode(result))

        include_usage = body.stream_options is not None and body.stream_options.include_usage
        usage_field = None
        started = [False] * body.n

        def chunk(i: int, out: RequestOutput) -> bytes | None:
            choices[i].num_output_tokens = out.num_output_tokens
            delta = oa.Delta(content=out.new_text)
            if not started[i]:
                started[i], delta.role = True, "assistant"
            elif not out.new_text and not out.finished and not (body.logprobs and out.new_logprobs):
                return None  # nothing to show yet (held-back text, a partial character)
            return _encode(oa.ChatCompletionChunk(
                id=f"chatcmpl-{rid}", created=created, model=model, usage=usage_field,
                choices=[oa.ChatChunkChoice(
                    index=i, delta=delta, finish_reason=out.finish_reason if out.finished else None,
                    logprobs=_chat_logprobs(serving, out.new_logprobs) if body.logprobs else None,
                    stop_reason=out.stop_reason,
                )],
            ))

        def usage_chunk() -> bytes:
            return _encode(oa.ChatCompletionChunk(id=f"chatcmpl-{rid}", created=created, model=model, choices=[],
                                                  usage=_usage([prompt], choices)))

        return _sse(stream, chunk, usage_chunk if include_usage else None)
    except BaseException:
        await stream.aclose()
        raise


def _completion_prompts(state: ServerState, prompt) -> list[tuple[list[int], str | None, list[int] | None]]:
    """(token ids, text or None, character offsets or None) for each prompt of the request."""
    tokenizer = state.serving.tokenizer
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise InvalidRequestError("prompt must not be empty", "prompt")
    if all(isinstance(p, int) for p in prompt):
        prompt = [prompt]
    out = []
    for p in prompt:
        if isinstance(p, str):
            enc = tokenizer(p, add_special_tokens=True, return_offsets_mapping=True)
            out.append((enc["input_ids"], p, [start for start, _ in enc["offset_mapping"]]))
        elif isinstance(p, list) and all(isinstance(t, int) for t in p):
            out.append((p, None, None))
        else:
            raise InvalidRequestError("prompt must be a string, a list of strings, a list of token ids, "
                                      "or a list of token-id lists", "prompt")
    return out


async def completions(request: ApiRequest) -> ApiResponse:
    state = request.state
    serving = state.serving
    body: oa.CompletionRequest = await read_json(request, oa.CompletionRequest)
    choice = await _choose_adapter(request, body.model)
    if body.logprobs is not None and not 0 <= body.logprobs <= MAX_TOP_LOGPROBS:
        raise InvalidRequestError(f"logprobs must be in [0, {MAX_TOP_LOGPROBS}]", "logprobs")
    if body.max_tokens == 0 and not body.echo:
        raise InvalidRequestError("max_tokens: 0 only makes sense with echo (scoring a prompt)", "max_tokens")
    params = _sampling(body, body.max_tokens, body.logprobs,
                       prompt_logprobs=body.logprobs if body.echo and body.logprobs is not None else None)
    prompts = _completion_prompts(state, body.prompt)
    rid = request.request_id
    stream = await serving.submit(_choices([p[0] for p in prompts], params, body.n), _options(body, choice))
    created, model, n = int(time.time()), choice.name, body.n
    choices = [_Choice() for _ in range(len(prompts) * n)]

    def prompt_text(i: int) -> str:
        ids, text, _ = prompts[i // n]
        return text if text is not None else serving.tokenizer.decode(ids)

    def echo_logprobs(i: int, c: _Choice) -> oa.CompletionLogprobs:
        ids, _, offsets = prompts[i // n]
        entries = c.prompt_logprobs or [None] * len(ids)
        return _completion_logprobs(serving, ids, entries, 0, offsets)

    def logprobs(i: int, c: _Choice, entries: list[TokenLogprob], offset: int, with_prompt: bool) -> oa.CompletionLogprobs:
        lp = _completion_logprobs(serving, [e.token_id for e in entries], entries, offset)
        if with_prompt:
            head = echo_logprobs(i, c)
            lp = oa.CompletionLogprobs(head.tokens + lp.tokens, head.token_logprobs + lp.token_logprobs,
                                       head.top_logprobs + lp.top_logprobs, head.text_offset + lp.text_offset)
        return lp

    try:
        if not body.stream:
            async for i, out in stream:
                choices[i].add(out)
            result = []
            for i, c in enumerate(choices):
                head = prompt_text(i) if body.echo else ""
                lp = logprobs(i, c, c.logprobs, len(head), body.echo) if body.logprobs is not None else None
                result.append(oa.CompletionChoice(i, head + "".join(c.text), c.finish_reason, lp, c.stop_reason))
            usage = _usage([p[0] for p in prompts], choices)
            await stream.aclose()
            return ApiResponse.json(_encode(oa.Completion(f"cmpl-{rid}", created, model, result, usage)))

        include_usage = body.stream_options is not None and body.stream_options.include_usage
        started = [False] * len(choices)
        token_chars = [0] * len(choices)  # characters of token texts so far, for text_offset

        def chunk(i: int, out: RequestOutput) -> bytes | None:
            c = choices[i]
            c.num_output_tokens = out.num_output_tokens
            if out.prompt_logprobs is not None:
                c.prompt_logprobs = out.prompt_logprobs
            text = out.new_text
            if not started[i]:
                started[i] = True
                if body.echo:
                    text = prompt_text(i) + text
            elif not text and not out.finished and not (body.logprobs is not None and out.new_logprobs):
                return None
            lp = None
            if body.logprobs is not None:
                # offsets count the tokens' own texts (as the non-streamed answer does), not the
                # streamed text, which may lag behind (held-back stop prefixes, split characters)
                if body.echo and out.prompt_logprobs is not None:
                    token_chars[i] = len(prompt_text(i))
                lp = logprobs(i, c, out.new_logprobs, token_chars[i], body.echo and out.prompt_logprobs is not None)
                token_chars[i] += sum(len(t) for t in lp.tokens[-len(out.new_logprobs):]) if out.new_logprobs else 0
            return _encode(oa.Completion(
                f"cmpl-{rid}", created, model,
                [oa.CompletionChoice(i, text, out.finish_reason if out.finished else None, lp, out.stop_reason)],
                None,
            ))

        def usage_chunk() -> bytes:
            return _encode(oa.Completion(f"cmpl-{rid}", created, model, [], _usage([p[0] for p in prompts], choices)))

        return _sse(stream, chunk, usage_chunk if include_usage else None)
    except BaseException:
        await stream.aclose()
        raise


async def models(request: ApiRequest) -> ApiResponse:
    """Every name a request's ``model`` may use: the served model, its base, the versions a
    request may pin, the adapters loaded at run time (vLLM's ``root`` and ``parent``)."""
    state = request.state
    max_len = state.engine.core.config.model.max_model_len
    listing = [oa.Model(id=i, created=state.created, max_model_len=max_len, root=root, parent=parent)
               for i, root, parent in state.adapters.listing(request.tenant)]
    return ApiResponse.json(_encode(oa.ModelList(listing)))


def _one_server_only(request: ApiRequest, what: str) -> None:
    """Behind ``--replicas`` a request reaches one replica; what must reach them all is refused."""
    if request.state.cluster is not None:
        raise ApiError(400, f"{what} at run time is not supported with --replicas: it would reach one replica",
                       None, "unsupported_with_replicas")


async def load_lora_adapter(request: ApiRequest) -> ApiResponse:
    """vLLM's route and body: ``{lora_name, lora_path}``; the adapter serves requests whose
    ``model`` is ``lora_name`` from the next iteration on."""
    body: oa.LoadLoraAdapterRequest = await read_json(request, oa.LoadLoraAdapterRequest)
    _one_server_only(request, "loading an adapter")
    await request.state.adapters.load(body.lora_name, body.lora_path, request.tenant)
    return ApiResponse.text(f"Success: LoRA adapter '{body.lora_name}' added successfully.")


async def unload_lora_adapter(request: ApiRequest) -> ApiResponse:
    body: oa.UnloadLoraAdapterRequest = await read_json(request, oa.UnloadLoraAdapterRequest)
    _one_server_only(request, "unloading an adapter")
    await request.state.adapters.unload(body.lora_name, request.tenant)
    return ApiResponse.text(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")


def add_routes(routes: Routes) -> None:
    routes.post("/v1/chat/completions", chat_completions)
    routes.post("/v1/completions", completions)
    routes.get("/v1/models", models)
    routes.post("/v1/load_lora_adapter", load_lora_adapter)
    routes.post("/v1/unload_lora_adapter", unload_lora_adapter)
