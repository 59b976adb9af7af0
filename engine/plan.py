"""The contract between the scheduler and the worker: one plan in, one result out, per iteration.

Both are plain dataclasses of ids, counts and token ids; no tensors cross this seam. The chain:

    IterationPlan ──(ModelRunner.prepare)──> packed tensors: input_ids (1, T), position_ids (1, T),
        PagedAttentionMetadata (slot mapping, decode block tables, prefill spans)
    ──(one forward, sample)──> IterationResult

Token order inside the packed batch is the runner's business; results are keyed by ``seq_id``.
The scheduler owns the block pool: a chunk's ``block_table`` already covers every position it
writes, so the runner never allocates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from engine.sampling_params import SamplingParams


@dataclass(slots=True)
class SequenceChunk:
    """One sequence's share of an iteration: feed ``token_ids`` at positions
    ``start_pos .. start_pos + len(token_ids) - 1`` (a prefill chunk, or one decode token)."""

    seq_id: int
    token_ids: list[int]
    start_pos: int
    # Block ids covering KV entries [0, kv_start + len(token_ids)), in order.
    block_table: list[int]
    # Set when the chunk ends at the sequence's last token: sample the next one.
    sampling: SamplingParams | None = None
    # The seed for this sequence and the index of the output token being sampled; together
    # they seed the noise, so sampling does not depend on the rest of the batch.
    seed: int = 0
    output_index: int = 0
    # Prompt scoring: for chunk positions ``prompt_logprob_start + i`` the log-prob of
    # ``prompt_logprob_targets[i]`` (the next prompt token), with this many alternatives.
    prompt_logprob_start: int = 0
    prompt_logprob_targets: list[int] = field(default_factory=list)
    num_prompt_top_logprobs: int = 0
    # Where the chunk's K/V go: KV entry index of its first token. It differs from ``start_pos``
    # (the position RoPE sees) once pruning has dropped entries; None means equal.
    kv_start: int | None = None
    # The LoRA adapter this chunk's tokens read: a PEFT adapter name on the model,
    # ``engine.lora.BASE`` for none, or None for the default (what PEFT has active: the live
    # serving adapter).
    adapter: str | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def kv_offset(self) -> int:
        return self.start_pos if self.kv_start is None else self.kv_start


@dataclass(slots=True)
class KvPrune:
    """Drop KV entries of one sequence and compact the rest, before this iteration's forward.

    Entries ``[0, private_start)`` stay as they are (blocks the prefix cache or other sequences
    share). Of the entries ``[private_start, kv_len)`` the runner keeps ``num_keep``: the first
    ``num_sinks``, the last ``num_recent``, and (``heavy-hitter``) the rest by highest
    accumulated attention; kept entries move, in order, to ``[private_start, private_start +
    num_keep)``. ``block_table`` is the table before pruning: the scheduler has already freed
    the blocks past the new length (the runner reads them before anything else can write them).
    """

    seq_id: int
    block_table: list[int]
    kv_len: int
    private_start: int
    num_keep: int
    num_sinks: int
    num_recent: int
    policy: str  # "window" | "heavy-hitter"


# A forward without backward costs about a third of a forward with one (the backward is about
# twice the forward): how no-grad fine-tune tokens (reference passes) are priced.
NO_GRAD_COST = 1 / 3


@dataclass(slots=True)
class PreferencePair:
    """One stored feedback pair, tokenized: ``prompt_ids + chosen_ids`` against
    ``prompt_ids + rejected_ids`` (responses end with EOS)."""

    pair_id: str
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    # Summed response log-probs under the reference (adapter off); None until computed.
    ref_chosen: float | None = None
    ref_rejected: float | None = None

    @property
    def num_tokens(self) -> int:
        return 2 * len(self.prompt_ids) + len(self.chosen_ids) + len(self.rejected_ids)


@dataclass(slots=True)
class FinetuneChunk:
    """Fine-tune work the worker runs in the same iteration, after the inference forward.

    ``kind``: ``"reference"`` computes the pairs' response log-probs with the adapter off (no
    gradient); ``"gradient"`` runs forward and backward of the DPO loss under the ``train``
    adapter and accumulates gradients; with ``step`` set it then clips, takes an AdamW step and
    publishes the ``train`` weights to the ``serving`` adapter (unless a value is not finite).

    A pair too big for an iteration's slack is cut into two ``part``s of one sequence each,
    whose gradients add up to the whole pair's exactly. With ``z = beta * ((logp_c - ref_c) -
    (logp_r - ref_r))`` the pair's gradient is ``w * (grad logp_r - grad logp_c)``, ``w = beta *
    sigmoid(-z)``, and ``w`` needs both log-probs. So ``"chosen"`` back-propagates ``logp_c``
    alone into a gradient buffer of its own (kept on the worker, the LoRA parameters' size) and
    ``"rejected"`` back-propagates ``logp_r`` into another, forms ``w`` from both log-probs and
    adds ``w * (grad logp_r - grad logp_c)`` to the accumulation: the same compute as the whole
    pair, one sequence per iteration.
    """

    task_id: int
    kind: str  # "reference" | "gradient"
    pairs: list[PreferencePair]
    step: bool = False
    # After the step, write a checkpoint whatever the period (the trainer asks when it runs dry).
    checkpoint: bool = False
    part: str | None = None  # None: whole pairs; "chosen" then "rejected" (one pair)
    # Work cut at decoder layers (trainer/staged.py): the units [start, end) this chunk runs of a
    # part's units (or of a reference pass's), and their share of the whole (their price).
    # None: the whole part, or the whole pass.
    units: tuple[int, int] | None = None
    share: float = 1.0
    # reference: also a no-grad pass under the serving adapter, for the pair's DPO loss now (the
    # trainer ranks pairs by it); its units follow the reference pass's
    estimate: bool = False
    # Drop the gradients accumulated so far before this chunk (an iteration carrying part of
    # the accumulation failed; the trainer sent its pairs round again).
    reset: bool = False
    # whose adapter the chunk trains: a tenant's (trainer/tenants.py), None for the default one
    tenant: str | None = None

    @property
    def num_tokens(self) -> int:
        if self.part is None:
            whole = sum(p.num_tokens for p in self.pairs) * (2 if self.estimate else 1)
        else:
            p = self.pairs[0]
            whole = len(p.prompt_ids) + len(p.chosen_ids if self.part == "chosen" else p.rejected_ids)
        return whole if self.units is None else max(1, math.ceil(whole * self.share))

    @property
    def has_grad(self) -> bool:
        return self.kind == "gradient"

    @property
    def cost_tokens(self) -> int:
        """Tokens as the cost model prices them: a forward without backward costs about a third
        of a forward with one."""
        return self.num_tokens if self.has_grad else math.ceil(self.num_tokens * NO_GRAD_COST)

    @property
    def cost_chunks(self) -> float:
        """The chunk's fixed cost in units of a gradient chunk's (a third without backward too:
        the profile here measured about 14 ms for a gradient chunk and 4.5 ms for a reference pass)."""
        return 1.0 if self.has_grad else NO_GRAD_COST


@dataclass(frozen=True, slots=True)
class FinetuneOffer:
    """What the trainer can add to an iteration, stated by the trainer and priced by the
    scheduler's policy. Sizes are tokens the trainer can cut a piece at; the policy decides how
    many the iteration makes room for, and the trainer then cuts the chunk (``FinetuneChunk``)."""

    # The smallest piece: the next part of a pair cut in two, one pair's reference pass, or the
    # first sequence of a pair ready to train.
    min_tokens: int
    # The next piece when nothing is cut: one whole pair (or the next part of a cut one).
    whole_tokens: int
    loss: float  # the last DPO loss of the pair trained next (the recent mean; ln 2 before any)
    wait_s: float  # since the work became ready or a piece last ran
    # The smallest piece's price per token relative to a gradient token: NO_GRAD_COST when it is
    # a forward without backward (a reference pass). Tokens past it price at 1.
    min_cost_factor: float = 1.0


@dataclass(slots=True)
class IterationPlan:
    """Everything the worker does in one iteration."""

    iteration: int
    # Inference work: at most one chunk per sequence.
    chunks: list[SequenceChunk]
    # Optional fine-tune work, run after the inference forward.
    finetune: FinetuneChunk | None = None
    # KV pruning, run before the forward.
    kv_prunes: list[KvPrune] = field(default_factory=list)
    # What the scheduler expected (the worker ignores both): the cost model's price of the whole
    # plan, and the latency its policy planned against (None: the policy plans by tokens).
    predicted_s: float = 0.0
    capacity_s: float | None = None

    @property
    def num_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.chunks)


@dataclass(slots=True)
class TokenLogprob:
    """A token's log-prob and the top alternatives at its position, best first."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass(slots=True)
class SequenceResult:
    seq_id: int
    # The sampled token, or None when the chunk did not end at the sequence's last token.
    token_id: int | None = None
    logprob: TokenLogprob | None = None
    # One entry per target in the chunk's ``prompt_logprob_targets``.
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass(slots=True)
class FinetuneResult:
    task_id: int
    kind: str
    # reference: per pair (chosen, rejected) summed response log-probs with the adapter off, and
    # (``estimate``) under the serving adapter.
    ref_logprobs: dict[str, tuple[float, float]] = field(default_factory=dict)
    policy_logprobs: dict[str, tuple[float, float]] = field(default_factory=dict)
    # gradient: DPO loss per pair (feeds the scheduler's fine-tune priority and the outlier guard).
    losses: dict[str, float] = field(default_factory=dict)
    num_tokens: int = 0
    # Set when the chunk ended an accumulation: whether the step was taken (False: a loss or
    # gradient was not finite, the step was skipped and the last good weights restored).
    stepped: bool | None = None
    adapter_version: int = 0
    # The version of a checkpoint this chunk queued, if any: it is on disk once the writer says
    # so (trainer/checkpoint.py CheckpointWriter), not when this result arrives.
    checkpoint_version: int | None = None
    elapsed_s: float = 0.0
    # An executor that hands its gradients over (replicas: trainer/distributed.py) instead of
    # stepping: the accumulated LoRA gradients (CPU, keyed as a checkpoint keys the weights).
    gradients: dict | None = None
    gradients_generation: int | None = None  # the oldest weights they were computed from (a coordinator's change number)


@dataclass(slots=True)
class IterationResult:
    iteration: int
    outputs: list[SequenceResult]
    num_tokens: int
    # Measured on the worker: input preparation, the model forward, sampling, whole iteration.
    prepare_s: float = 0.0
    forward_s: float = 0.0
    sample_s: float = 0.0
    total_s: float = 0.0
    finetune: FinetuneResult | None = None
