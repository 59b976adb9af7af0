"""Bodies of ``POST /v1/feedback`` and ``GET /v1/feedback/stats``.

A request is one pair (``prompt`` or ``messages``, ``chosen``, ``rejected``, optional ``id``) or a
batch ``{"pairs": [...]}``; the route checks which and that the other fields are absent.
"""

from __future__ import annotations

import msgspec

from protocol.openai import ChatMessage


class FeedbackItem(msgspec.Struct, kw_only=True):
    """One preference pair: ``chosen`` is the better response to the prompt, ``rejected`` the worse.

    Every field is optional here so that the route, not the decoder, names a missing one
    (``pairs[3].chosen``); chosen and rejected are required, and exactly one of prompt/messages."""

    chosen: str | None = None
    rejected: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    id: str | None = None  # the client's id, for retries: a repeated id is stored once


class FeedbackRequest(FeedbackItem, kw_only=True):
    """One pair's fields at the top level, or a batch in ``pairs`` (and none of the others)."""

    pairs: list[FeedbackItem] | None = None


class FeedbackResponse(msgspec.Struct):
    ids: list[str]  # one per pair sent, in order (a duplicate shows the id it already had)
    stored: int  # pairs newly stored
    duplicates: int  # pairs whose id was already stored (or repeated in the batch)


class FeedbackStats(msgspec.Struct):
    received: int
    trained: int
    pending: int
    set_aside: int


class RollbackRequest(msgspec.Struct):
    version: int


class TrainingRequest(msgspec.Struct):
    enabled: bool
