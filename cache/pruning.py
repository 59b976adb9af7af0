"""KV-cache pruning policies: how many of a sequence's KV entries to keep, and which kinds.

- ``window`` (StreamingLLM, arXiv 2309.17453): the first ``num_sinks`` tokens (attention sinks)
  plus the most recent ones.
- ``heavy-hitter`` (H2O, arXiv 2306.14048): sinks, the most recent half of the budget, and the
  rest by highest attention received so far. The attention accumulates those scores in the
  same pass that computes its output (``engine.attention``), from prefill queries (the prompt's
  tokens attend to one another, as H2O counts them) and from every decode.

The budget is per sequence: ``budget >= 1`` is a number of KV entries, ``0 < budget < 1`` a
fraction of the sequence's tokens so far. Only decodes prune, and only once the sequence holds a
block past its budget, so every prune frees at least one whole block. Entries in blocks the
prefix cache or other sequences share (``private_start``) are never touched; they count towards
the budget, since a shared block costs this sequence nothing it could give back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

POLICIES = ("none", "window", "heavy-hitter")


@dataclass(frozen=True, slots=True)
class PruneDecision:
    num_keep: int  # private entries kept
    num_sinks: int  # of which the first ones
    num_recent: int  # of which the last ones


@dataclass(frozen=True, slots=True)
class PruningPolicy:
    policy: str
    budget: float
    block_size: int
    num_sinks: int = 4

    def __post_init__(self) -> None:
        if self.policy not in POLICIES[1:]:
            raise ValueError(f"kv pruning policy must be window or heavy-hitter, got {self.policy!r}")
        if not (0 < self.budget < 1 or self.budget >= self.num_sinks + 2 * self.block_size):
            raise ValueError(
                f"kv budget must be a fraction in (0, 1) or at least {self.num_sinks + 2 * self.block_size} "
                f"tokens (sinks plus two blocks), got {self.budget}"
            )

    def budget_tokens(self, num_tokens: int) -> int:
        if self.budget >= 1:
            return int(self.budget)
        # never below sinks plus two blocks: a recent window needs room to be one
        return max(math.ceil(self.budget * num_tokens), self.num_sinks + 2 * self.block_size)

    def decide(self, kv_len: int, num_tokens: int, private_start: int) -> PruneDecision | None:
        """What to keep of entries ``[private_start, kv_len)`` of a sequence of ``num_tokens``
        tokens, or None when it is within budget or pruning would free no block."""
        bs = self.block_size
        budget = self.budget_tokens(num_tokens)
        if kv_len < budget + bs:
            return None
        sinks = max(0, self.num_sinks - private_start)  # sinks already in shared blocks stay anyway
        keep = max(budget - private_start, sinks + bs)
        num_private = kv_len - private_start
        # the decode that follows writes entry private_start + keep; it must need fewer blocks
        if -(-(private_start + keep + 1) // bs) >= -(-(kv_len + 1) // bs) or keep >= num_private:
            return None
        recent = keep - sinks if self.policy == "window" else (keep - sinks + 1) // 2
        return PruneDecision(keep, sinks, recent)
