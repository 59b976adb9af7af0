"""The engine's bookkeeping: requests in, plans out, results back into sequences and outputs.

``EngineCore`` never touches tensors. One iteration is three calls:

    plan = core.schedule()                  # which tokens of which sequences, with block tables
    result = runner.execute(plan)           # on the worker thread (AsyncEngine) or inline (step)
    outputs = core.process_result(result)   # append tokens, stop checks, free finished blocks

``schedule`` asks the policy (``scheduler/policies.py``) for the iteration's work over the
sequence queues, with the trainer's offer; every policy is driven the same way. ``step()`` runs
all three inline, which tests use to control exactly when requests arrive.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from cache.block_pool import BlockPool
from cache.pruning import PruningPolicy
from engine.config import EngineConfig
from engine.detokenizer import IncrementalDetokenizer
from engine.plan import IterationPlan, IterationResult, SequenceChunk, TokenLogprob
from engine.sampling_params import InvalidRequestError, SamplingParams
from scheduler.cost_model import PRIOR_COSTS, CostModel, IterationShape, shape_of
from scheduler.policies import make_policy
from scheduler.policy import ScheduledSequence
from scheduler.queues import SequenceQueues
from scheduler.request import FinishReason, RequestOptions, Sequence

if TYPE_CHECKING:
    from trainer.training import Training


@dataclass(slots=True)
class RequestOutput:
    """What one iteration produced for one request (a delta: new tokens and text only)."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int
    new_logprobs: list[TokenLogprob] = field(default_factory=list)
    # Set once, on the output that completes the prompt: one entry per prompt token.
    prompt_logprobs: list[TokenLogprob | None] | None = None
    # Why a "stop" finish stopped: the stop string or stop token id; None for EOS (as vLLM).
    stop_reason: str | int | None = None
    error: str | None = None


class EngineCore:
    """``training``: what trains the adapter while serving (``trainer.training.Training``), or
    None. The core plans with its ``trainer`` (the offer, the chunks, their results); its owners
    (``AsyncEngine``) start and stop it. ``clock`` times arrivals, first tokens and deadlines:
    simulations drive their own."""

    def __init__(self, config: EngineConfig, tokenizer, eos_token_ids: frozenset[int], num_blocks: int, *,
                 cost_model: CostModel | None = None, training: Training | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if config.scheduler.slo_ttft_ms is None or config.scheduler.slo_tbt_ms is None:
            config = dataclasses.replace(config, scheduler=config.scheduler.with_slos())
        self.config = config
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        cache = config.cache
        self.pool = BlockPool(num_blocks, cache.block_size, enable_prefix_cache=cache.enable_prefix_caching)
        pruning = None
        if cache.kv_prune != "none":
            pruning = PruningPolicy(cache.kv_prune, cache.kv_budget, cache.block_size, cache.kv_sink_tokens)
        self.queues = SequenceQueues(self.pool, pruning, config.scheduler.max_loras)
        if cost_model is None:  # the profile file, else a prior; corrected online either way
            profile = config.scheduler.cost_profile
            cost_model = CostModel.load(profile) if profile else CostModel(PRIOR_COSTS)
        self.cost_model = cost_model
        self.clock = clock
        self.policy = make_policy(self.queues, config.scheduler, self.cost_model, clock)
        self.training = training
        # what the core plans with (tests and simulations put a stand-in of their own here)
        self.trainer = training.trainer if training is not None else None
        # each tenant's Training, by tenant (trainer/tenants.py; the builder sets them)
        self.tenants: dict[str, Training] = {}
        self.sequences: dict[str, Sequence] = {}
        self._seq_ids = itertools.count()
        self._iterations = itertools.count()
        self._seed_rng = random.Random(config.model.seed)
        self._in_flight: dict[int, list[ScheduledSequence]] = {}
        self._finetune_in_flight: dict[int, int] = {}  # iteration -> fine-tune task id
        self._shapes: dict[int, IterationShape] = {}

    # -- requests -----------------------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        options: RequestOptions | None = None,
    ) -> Sequence:
        """Queue a request, or raise InvalidRequestError (nothing changes) if it cannot be served."""
        if request_id in self.sequences:
            raise InvalidRequestError(f"request id {request_id!r} is already in use", "request_id")
        num_prompt = len(prompt_token_ids)
        max_len = self.config.model.max_model_len
        if num_prompt == 0:
            raise InvalidRequestError("the prompt is empty", "prompt")
        if num_prompt >= max_len:
            raise InvalidRequestError(
                f"the prompt has {num_prompt} tokens; this model's context is {max_len} tokens, "
                "which must also hold at least one output token",
                "prompt",
                "context_length_exceeded",
            )
        vocab = self.config.model.vocab_size
        if vocab and any(not 0 <= t < vocab for t in prompt_token_ids):
            raise InvalidRequestError(f"prompt token ids must be in [0, {vocab})", "prompt")
        max_tokens = params.max_tokens
        if max_tokens is None:
            max_tokens = max_len - num_prompt
        elif num_prompt + max_tokens > max_len:
            raise InvalidRequestError(
                f"the prompt ({num_prompt} tokens) plus max_tokens ({max_tokens}) exceeds the "
                f"context of {max_len} tokens",
                "max_tokens",
                "context_length_exceeded",
            )
        if self.pool.blocks_for_tokens(num_prompt + max(max_tokens, 1)) > self.pool.num_blocks:
            raise InvalidRequestError(
                f"the request needs more KV blocks than the whole pool holds ({self.pool.num_blocks})",
                "max_tokens",
            )
        stop_ids = frozenset(params.stop_token_ids)
        if not params.ignore_eos:
            stop_ids |= self.eos_token_ids
        seq = Sequence(
            seq_id=next(self._seq_ids),
            request_id=request_id,
            prompt_token_ids=list(prompt_token_ids),
            params=params,
            seed=params.seed if params.seed is not None else self._seed_rng.getrandbits(63),
            max_tokens=max_tokens,
            stop_token_ids=stop_ids,
            detokenizer=IncrementalDetokenizer(self.tokenizer, params.stop),
            arrival_s=self.clock(),
            prompt_logprobs=[None],
            options=options or RequestOptions(),
        )
        self.sequences[request_id] = seq
        self.queues.add(seq)
        return seq

    def abort(self, request_id: str) -> bool:
        """Drop a request; its blocks are free before the next plan is built."""
        seq = self.sequences.pop(request_id, None)
        if seq is None:
            return False
        self.queues.finish(seq)
        seq.finish_reason = FinishReason.ABORT
        return True

    @property
    def has_work(self) -> bool:
        return self.queues.has_work or (self.trainer is not None and self.trainer.has_work)

    # -- one iteration ------------------------------------------------------------------------

    def schedule(self) -> IterationPlan | None:
        """The next iteration, or None: nothing to run. The policy plans it from the trainer's
        offer; the trainer then cuts the fine-tune chunk to the tokens the policy made room for."""
        offer = self.trainer.offer(self.clock()) if self.trainer is not None else None
        out = self.policy.schedule(offer)
        chunks = [self._chunk(s.seq, s.num_new_tokens) for s in out.scheduled]
        finetune = self.trainer.next_chunk(out.finetune_tokens) if out.finetune_tokens else None
        if not chunks and finetune is None:
            return None
        shape = shape_of(chunks)
        if finetune is not None:
            shape = dataclasses.replace(shape, num_finetune_tokens=finetune.cost_tokens,
                                        num_finetune_chunks=finetune.cost_chunks)
        iteration = next(self._iterations)
        self._in_flight[iteration] = out.scheduled
        if finetune is not None:
            self._finetune_in_flight[iteration] = finetune.task_id
        self._shapes[iteration] = shape
        return IterationPlan(iteration=iteration, chunks=chunks, finetune=finetune, kv_prunes=self.queues.take_prunes(),
                             predicted_s=self.cost_model.predict(shape), capacity_s=out.capacity_s)

    def _chunk(self, seq: Sequence, num_new: int) -> SequenceChunk:
        start = seq.num_computed_tokens
        end = start + num_new
        chunk = SequenceChunk(
            seq_id=seq.seq_id,
            token_ids=seq.token_ids(start, end),
            start_pos=start,
            block_table=list(seq.block_table),
            seed=seq.seed,
            output_index=seq.num_output_tokens,
            kv_start=start - seq.num_pruned_tokens if seq.num_pruned_tokens else None,
            adapter=seq.options.adapter,
        )
        if end == seq.num_tokens and seq.max_tokens > 0:
            chunk.sampling = seq.params
        if seq.params.prompt_logprobs is not None:
            # Position p scores prompt token p + 1; skip what an earlier (preempted) pass scored.
            first = max(start, len(seq.prompt_logprobs) - 1)
            last = min(end, seq.num_prompt_tokens - 1)
            if first < last:
                chunk.prompt_logprob_start = first
                chunk.prompt_logprob_targets = seq.prompt_token_ids[first + 1 : last + 1]
                chunk.num_prompt_top_logprobs = seq.params.prompt_logprobs
        return chunk

    def process_result(self, result: IterationResult | BaseException, iteration: int | None = None) -> list[RequestOutput]:
        """Apply a result (or the exception that replaced it) to its sequences."""
        if isinstance(result, BaseException):
            self._shapes.pop(iteration, None)
            task_id = self._finetune_in_flight.pop(iteration, None)
            if task_id is not None:
                self.trainer.on_failure(task_id)
            return self._fail(self._in_flight.pop(iteration, []), result)
        scheduled = self._in_flight.pop(result.iteration)
        if self._finetune_in_flight.pop(result.iteration, None) is not None:
            self.trainer.on_result(result.finetune)
        shape = self._shapes.pop(result.iteration, None)
        if shape is not None and result.total_s > 0:
            finetune_s = result.finetune.elapsed_s if result.finetune is not None else None
            self.cost_model.observe(shape, result.total_s, finetune_s)
        by_id = {r.seq_id: r for r in result.outputs}
        now = self.clock()
        outputs = []
        for s in scheduled:
            seq = s.seq
            if seq.is_finished:  # aborted while the iteration ran
                continue
            seq.num_computed_tokens += s.num_new_tokens
            self.queues.cache_computed_blocks(seq)
            res = by_id[seq.seq_id]
            seq.prompt_logprobs.extend(res.prompt_logprobs)
            if res.token_id is None:
                if seq.max_tokens == 0 and seq.num_computed_tokens >= seq.num_prompt_tokens:
                    outputs.append(self._finish(seq, FinishReason.LENGTH, [], []))  # scoring only
                continue
            outputs.append(self._append(seq, res.token_id, res.logprob, now))
        return outputs

    def _append(self, seq: Sequence, token_id: int, logprob: TokenLogprob | None, now: float) -> RequestOutput:
        is_first = seq.num_output_tokens == 0
        seq.output_token_ids.append(token_id)
        if logprob is not None:
            seq.output_logprobs.append(logprob)
        if seq.first_token_s is None:
            seq.first_token_s = now
        reason = None
        if token_id in seq.stop_token_ids:
            reason = FinishReason.STOP
            if token_id not in self.eos_token_ids:
                seq.stop_reason = token_id
        elif (stop := seq.detokenizer.push(token_id)) is not None:
            reason = FinishReason.STOP
            seq.stop_reason = stop
        elif seq.num_output_tokens >= seq.max_tokens:
            reason = FinishReason.LENGTH
        new_lp = [logprob] if logprob is not None else []
        if reason is not None:
            out = self._finish(seq, reason, [token_id], new_lp)
        else:
            out = self._output(seq, [token_id], new_lp, finished=False)
        if is_first and seq.params.prompt_logprobs is not None:
            out.prompt_logprobs = seq.prompt_logprobs
        return out

    def _output(self, seq: Sequence, tokens: list[int], logprobs: list[TokenLogprob], finished: bool) -> RequestOutput:
        return RequestOutput(
            request_id=seq.request_id,
            new_token_ids=tokens,
            new_text=seq.detokenizer.take_delta(finished),
            finished=finished,
            finish_reason=seq.finish_reason.value if seq.finish_reason else None,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_output_tokens=seq.num_output_tokens,
            new_logprobs=logprobs,
            stop_reason=seq.stop_reason if finished else None,
        )

    def _finish(self, seq: Sequence, reason: FinishReason, tokens: list[int], logprobs: list[TokenLogprob]) -> RequestOutput:
        self.queues.finish(seq)
        seq.finish_reason = reason
        self.sequences.pop(seq.request_id, None)
        out = self._output(seq, tokens, logprobs, finished=True)
        if seq.params.prompt_logprobs is not None and seq.num_output_tokens == 0:
            out.prompt_logprobs = seq.prompt_logprobs
        return out

    def _fail(self, scheduled: list[ScheduledSequence], exc: BaseException) -> list[RequestOutput]:
        outputs = []
        for s in scheduled:
            if s.seq.is_finished:
                continue
            out = self._finish(s.seq, FinishReason.ERROR, [], [])
            out.error = f"{type(exc).__name__}: {exc}"
            outputs.append(out)
        return outputs

    def step(self, runner) -> list[RequestOutput]:
        """One iteration inline: schedule, execute on ``runner``, process."""
        plan = self.schedule()
        if plan is None:
            return []
        return self.process_result(runner.execute(plan))

    def check_integrity(self) -> None:
        """Block conservation and ref counts against the live sequences' block tables."""
        self.queues.check_integrity()

