"""A sequence being served: a few counters, with the rest derived.

There is no prefill or decode phase: ``num_computed_tokens`` (tokens whose K/V are in the pool)
catches up with ``num_tokens`` (prompt plus outputs) one chunk at a time. A decode is the case
where exactly one token is missing. Preemption frees the blocks and sets the counter back to 0:
the sequence is recomputed later from prompt plus outputs, and samples the same tokens again
(sampling is seeded per position).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from cache.prefix_cache import TrieNode
from engine.detokenizer import IncrementalDetokenizer
from engine.plan import TokenLogprob
from engine.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, a stop token or a stop string
    LENGTH = "length"  # max_tokens or the context
    ABORT = "abort"  # the client went away or asked
    ERROR = "error"  # the forward failed


@dataclass(frozen=True, slots=True)
class RequestOptions:
    """What a request asks of the scheduler beyond sampling (the API's extension fields).

    ``priority``: larger is more urgent (vLLM's sign is the opposite; we follow the SDKs' plain
    reading). ``slo_ttft_ms`` / ``slo_tbt_ms``: this request's latency targets; None takes the
    server's defaults. The FCFS planner ignores them; the MACE scheduler reads them.
    ``adapter``: the LoRA adapter the request reads (a PEFT adapter name on the model,
    ``engine.lora.BASE`` for none); None: the live serving adapter.
    """

    priority: int = 0
    slo_ttft_ms: float | None = None
    slo_tbt_ms: float | None = None
    adapter: str | None = None

    @property
    def has_scheduling_options(self) -> bool:
        """Whether the request sets a priority or SLO of its own."""
        return self.priority != 0 or self.slo_ttft_ms is not None or self.slo_tbt_ms is not None

    @property
    def cache_namespace(self) -> str:
        """The prefix cache's namespace for this request's K/V: one per adapter."""
        return self.adapter or ""


@dataclass(eq=False, slots=True)
class Sequence:
    seq_id: int
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    seed: int
    max_tokens: int  # resolved: never past the context
    stop_token_ids: frozenset[int]
    detokenizer: IncrementalDetokenizer
    arrival_s: float
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    # prompt_logprobs[p] scores prompt token p; the first token has none.
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)
    output_logprobs: list[TokenLogprob] = field(default_factory=list)
    num_preemptions: int = 0
    first_token_s: float | None = None
    stop_reason: str | int | None = None
    options: RequestOptions = field(default_factory=RequestOptions)
    # Prefix cache: the trie node of block ``num_prefix_blocks - 1`` of the block table (the
    # root when 0), under which the next full block is offered; None stops offering.
    prefix_node: TrieNode | None = None
    num_prefix_blocks: int = 0
    num_cached_tokens: int = 0  # tokens reused from the cache at the last admission
    num_pruned_tokens: int = 0  # KV entries dropped by pruning (since the last admission)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_kv_tokens(self) -> int:
        """KV entries the sequence holds: computed tokens less the pruned ones."""
        return self.num_computed_tokens - self.num_pruned_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def token_ids(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + outputs, without building the whole list."""
        p = len(self.prompt_token_ids)
        if end <= p:
            return self.prompt_token_ids[start:end]
        if start >= p:
            return self.output_token_ids[start - p : end - p]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - p]
