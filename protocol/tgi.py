"""TGI-compatible bodies for ``/generate`` and ``/generate_stream`` (text-generation-inference's
shapes: https://huggingface.github.io/text-generation-inference/).

Accepted and ignored, as we do not implement them: ``repetition_penalty``, ``frequency_penalty``,
``typical_p``, ``truncate``, ``watermark``, ``best_of``, ``grammar``. ``adapter_id`` chooses the
adapter as the OpenAI routes' ``model`` does (``server.adapters``).
"""

from __future__ import annotations

import msgspec


class GenerateParameters(msgspec.Struct, kw_only=True):
    max_new_tokens: int | None = 100
    do_sample: bool = False
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: list[str] = []
    details: bool = False
    decoder_input_details: bool = False
    top_n_tokens: int | None = None
    return_full_text: bool = False
    adapter_id: str | None = None
    # MACE extensions
    priority: int = 0
    slo_ttft_ms: float | None = None
    slo_tbt_ms: float | None = None


class GenerateRequest(msgspec.Struct):
    inputs: str
    parameters: GenerateParameters = msgspec.field(default_factory=GenerateParameters)
    stream: bool = False


class Token(msgspec.Struct):
    id: int
    text: str
    logprob: float | None
    special: bool


class PrefillToken(msgspec.Struct):
    id: int
    text: str
    logprob: float | None


class Details(msgspec.Struct):
    finish_reason: str
    generated_tokens: int
    seed: int | None
    prefill: list[PrefillToken] = []
    tokens: list[Token] = []
    top_tokens: list[list[Token]] = []


class GenerateResponse(msgspec.Struct, omit_defaults=True):
    generated_text: str
    details: Details | None = None


class StreamDetails(msgspec.Struct):
    finish_reason: str
    generated_tokens: int
    seed: int | None
    input_length: int


class StreamResponse(msgspec.Struct):
    index: int
    token: Token
    top_tokens: list[Token] | None = None
    generated_text: str | None = None
    details: StreamDetails | None = None


class ErrorResponse(msgspec.Struct):
    error: str
    error_type: str
