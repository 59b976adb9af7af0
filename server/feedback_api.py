"""Feedback routes: ``POST /v1/feedback`` stores preference pairs, ``GET /v1/feedback/stats``.

A post is all or nothing: every pair is validated first (a 400 names the field, ``pairs[3].chosen``
for a batch item), then all are stored in one transaction, and the answer is sent only after the
commit. Chat ``messages`` are stored as the prompt text the model sees: the chat template applied
with the generation prompt, exactly as ``/v1/chat/completions`` renders it.
"""

from __future__ import annotations

import asyncio

import msgspec

from engine.sampling_params import InvalidRequestError
from server.api import ApiRequest, ApiResponse, Routes, read_json
from server.errors import ApiError
from server.openai_api import render_chat_text
from protocol import feedback as fb
from server.state import ServerState
from trainer.feedback import FeedbackStore, NewPair

MAX_PAIRS = 256
MAX_ID_CHARS = 128
_encode = msgspec.json.Encoder().encode


def _store(state: ServerState, tenant=None) -> FeedbackStore:
    if tenant is not None:
        return state.engine.training_for(tenant).store
    if state.feedback is None:
        raise ApiError(503, "feedback is not enabled on this server: it has no feedback store "
                            "(mace serve keeps one under --state-dir)", None, "feedback_unavailable")
    return state.feedback


def _items(body: fb.FeedbackRequest) -> list[tuple[str, fb.FeedbackItem]]:
    """(param prefix, pair) for each pair of the request, single or batch."""
    if body.pairs is None:
        return [("", body)]
    for name in ("prompt", "messages", "chosen", "rejected", "id"):
        if getattr(body, name) is not None:
            raise InvalidRequestError(f"send one pair or a batch as `pairs`, not both (found `{name}` beside it)", name)
    if not 1 <= len(body.pairs) <= MAX_PAIRS:
        raise InvalidRequestError(f"pairs must hold 1 to {MAX_PAIRS} pairs, got {len(body.pairs)}", "pairs")
    return [(f"pairs[{i}].", item) for i, item in enumerate(body.pairs)]


def _prompt(state: ServerState, item: fb.FeedbackItem, at: str) -> tuple[str, int]:
    """The prompt text the model sees and its length in tokens."""
    if (item.prompt is None) == (item.messages is None):
        raise InvalidRequestError("give exactly one of prompt and messages", at + "prompt")
    tokenizer = state.serving.tokenizer
    if item.prompt is not None:
        if not item.prompt.strip():
            raise InvalidRequestError("prompt must not be empty", at + "prompt")
        return item.prompt, len(tokenizer.encode(item.prompt))
    try:
        text = render_chat_text(state, item.messages)
    except InvalidRequestError as exc:
        raise InvalidRequestError(str(exc), at + (exc.param or "messages"), exc.code) from exc
    return text, len(tokenizer.encode(text, add_special_tokens=False))


def _validate(state: ServerState, at: str, item: fb.FeedbackItem) -> NewPair:
    """The pair to store, or InvalidRequestError naming the first bad field (cheap checks first)."""
    if item.id is not None and not 1 <= len(item.id) <= MAX_ID_CHARS:
        raise InvalidRequestError(f"id must be 1 to {MAX_ID_CHARS} characters, got {len(item.id)}", at + "id")
    for name in ("chosen", "rejected"):
        value = getattr(item, name)
        if value is None:
            raise InvalidRequestError(f"{name} is required", at + name)
        if not value.strip():
            raise InvalidRequestError(f"{name} must not be empty", at + name)
    if item.chosen == item.rejected:
        raise InvalidRequestError("chosen and rejected are the same response; a pair needs two", at + "rejected")
    prompt, num_prompt = _prompt(state, item, at)
    tokenizer = state.serving.tokenizer
    num_chosen = len(tokenizer.encode(item.chosen, add_special_tokens=False))
    num_rejected = len(tokenizer.encode(item.rejected, add_special_tokens=False))
    longer, num_longer = ("chosen", num_chosen) if num_chosen >= num_rejected else ("rejected", num_rejected)
    max_len = state.engine.core.config.model.max_model_len
    if num_prompt + num_longer > max_len:
        raise InvalidRequestError(
            f"the prompt ({num_prompt} tokens) plus {longer} ({num_longer} tokens) exceeds the context of "
            f"{max_len} tokens", at + longer, "context_length_exceeded",
        )
    return NewPair(prompt=prompt, chosen=item.chosen, rejected=item.rejected, id=item.id,
                   is_chat=item.messages is not None)


async def post_feedback(request: ApiRequest) -> ApiResponse:
    state = request.state
    tenant = request.tenant
    store = _store(state, tenant)
    body: fb.FeedbackRequest = await read_json(request, fb.FeedbackRequest)
    pairs = [_validate(state, at, item) for at, item in _items(body)]
    results = await asyncio.to_thread(store.add, pairs)  # returns after the commit
    num_stored = sum(is_new for _, is_new in results)
    training = state.engine.training_for(tenant)
    if training is not None and num_stored and state.cluster is None:
        # picks the new pairs up and wakes the engine (replicas: the coordinator tells them all)
        await training.trainer.refill()
    answer = fb.FeedbackResponse(ids=[i for i, _ in results], stored=num_stored, duplicates=len(results) - num_stored)
    return ApiResponse.json(_encode(answer))


async def feedback_stats(request: ApiRequest) -> ApiResponse:
    store = _store(request.state, request.tenant)
    stats = await asyncio.to_thread(store.stats)
    return ApiResponse.json(_encode(fb.FeedbackStats(**stats)))


async def adapters(request: ApiRequest) -> ApiResponse:
    """The adapter inference reads, and the trainer's counters (the caller's tenant's). Behind
    ``--replicas``: every replica's serving version and the coordinator's counters too."""
    state = request.state
    training = state.engine.training_for(request.tenant)
    if training is None:
        return ApiResponse.json({"serving": None, "training": False})
    trainer = training.trainer
    answer = {
        "training": True,
        "training_enabled": not trainer.paused,
        "serving": {"name": "serving", "version": training.adapter_version},
        "versions": state.adapters.versions(request.tenant),
        "steps": trainer.num_steps,
        "pairs_stepped": trainer.num_pairs_stepped,
        "skipped_steps": trainer.num_skipped_steps,
        "tokens": trainer.num_tokens,
        "dpo_loss": trainer.mean_recent_loss,
    }
    if state.cluster is not None:
        coordinator = await state.cluster.status()
        answer["replicas"] = coordinator.pop("replicas")
        answer["coordinator"] = coordinator
        answer["training_enabled"] = coordinator["training_enabled"]
    return ApiResponse.json(answer)


def _training(request: ApiRequest):
    training = request.state.engine.training_for(request.tenant)
    if training is None:
        raise ApiError(400, "training is off on this server (--no-training): there are no adapter versions", None,
                       "training_off")
    return training


async def rollback(request: ApiRequest) -> ApiResponse:
    """``{version}``: serve and train from that kept version again; the next step gets a
    version number above every one used before."""
    state = request.state
    training = _training(request)
    body: fb.RollbackRequest = await read_json(request, fb.RollbackRequest)
    if state.cluster is not None:  # the coordinator rolls back; every replica adopts it
        if not await state.cluster.rollback(body.version):
            raise ApiError(404, f"version {body.version} is not kept", "version", "version_not_found")
        status = await state.cluster.status()
        return ApiResponse.json({"version": status["version"], "next_version": status["max_version"] + 1})
    if not await training.rollback(body.version, state.engine.run_on_worker):
        kept = ", ".join(str(v) for v in state.adapters.versions(request.tenant)) or "none"
        raise ApiError(404, f"version {body.version} is not kept (kept: {kept})", "version", "version_not_found")
    return ApiResponse.json({"version": training.adapter_version, "next_version": training.executor.max_version + 1})


async def set_training(request: ApiRequest) -> ApiResponse:
    """``{enabled}``: pause or resume training; feedback is stored either way."""
    training = _training(request)
    body: fb.TrainingRequest = await read_json(request, fb.TrainingRequest)
    if request.state.cluster is not None:
        await request.state.cluster.set_training(body.enabled)
    else:
        training.set_training(body.enabled)
    return ApiResponse.json({"training_enabled": body.enabled})


def add_routes(routes: Routes) -> None:
    routes.post("/v1/feedback", post_feedback)
    routes.get("/v1/feedback/stats", feedback_stats)
    routes.get("/v1/adapters", adapters)
    routes.post("/v1/adapters/rollback", rollback)
    routes.post("/v1/adapters/training", set_training)
