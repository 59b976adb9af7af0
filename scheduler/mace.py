"""The MACE planner: SLO-aware priorities and best-fit packing of one iteration (``--policy mace``).

One iteration is one bin with two capacities:

- latency ``L``: how long the iteration may take. Every running decode has a deadline for its
  next token, ``first_token + n * tbt * (1 - margin)`` after ``n`` output tokens (the pace that
  keeps its TPOT within the SLO); ``L`` is the smallest slack to those deadlines, never below one
  TBT budget ``tbt * (1 - margin)`` (a request behind its pace cannot be helped by a shorter
  iteration than that) and never above ``slo_bank_max`` of them (so the gap between two tokens
  stays bounded). Slack banked by fast iterations can thus be spent on fine-tune work without a
  request's mean time per token going past its SLO. Without decodes, ``L`` is one TBT budget.
- memory ``M``: ``tau_mem`` times the KV blocks free or evictable at the start (the rest is the
  reserve running sequences grow into) for inference; for fine-tune work, ``tau_mem`` times
  ``finetune_memory_bytes`` over the profiled activation bytes per fine-tune token (no cap when
  either is unknown).

Decodes run first, every iteration (their blocks come first too; when the pool is short the
lowest-priority running sequence is preempted and recomputed later). What they leave of ``L``
and ``M`` goes to the candidates: prefill chunks (running sequences part-way through their
prompt, and waiting requests) and the trainer's next fine-tune piece. Each has a priority:

    prefill:   w_prefill + request priority + alpha_wait * wait / slo_ttft  (+ URGENT)
    fine-tune: delta_ft + alpha_ft * wait + gamma_loss * L_dpo

where a prefill is URGENT once the iterations it still needs no longer fit before its TTFT
deadline (urgent prefills are placed first, before anything else), and ``L_dpo`` is the last
DPO loss seen for the pair (the running mean for unseen pairs): higher loss, sooner. Then,
repeatedly: among the ``pack_top_k`` highest-priority candidates that fit, take the one with the
smallest ``f = lambda_mem * |M_rem - m_i| / M + lambda_lat * |L_rem - l_i| / L`` (best fit; a
task that does not use KV blocks is scored on latency alone), cut to what remains when it is
divisible (prefill chunks at block boundaries, fine-tune pieces by the trainer), until nothing
fits. Ties go to the higher priority. Costs ``l_i`` are the cost model's marginal prices; a
fine-tune piece's includes the fixed cost of a fine-tune chunk.

With nothing running and nothing waiting, the fine-tune piece may take ``slo_bank_max`` TBT
budgets (the longest iteration planned at all), as memory allows: an arrival waits behind it.

Starvation guards: a fine-tune piece is forced into an iteration after ``finetune_min_every``
iterations without one; a prefill's priority grows with its wait until it wins; and when the
cost model says nothing fits while nothing is running, the top candidate runs anyway (an idle
engine never waits on a wrong prediction).

Waiting requests of the default class (no per-request priority or SLO) have priorities in
arrival order, so no more of them can be admitted than there are free sequence slots, from the
head; the planner looks at those and at every request with its own options, which keeps
planning time flat in the queue length.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from cache.block_pool import BlockPool
from cache.pruning import PruningPolicy
from engine.config import EngineConfig
from scheduler.cost_model import CostModel, IterationShape
from scheduler.fcfs import FcfsScheduler, ScheduledSequence
from scheduler.request import RequestOptions, Sequence, SequenceStatus

URGENT = 100.0
_NO_CAP = 1 << 40


@dataclass(slots=True)
class FinetuneOffer:
    """What the trainer can add to an iteration: a piece of ``min_tokens`` up to ``max_tokens``."""

    min_tokens: int
    max_tokens: int
    loss: float  # the DPO loss the priority uses
    wait_s: float  # since the work became ready or last ran
    # The smallest piece's price per token relative to a gradient token: 1/3 when it is a
    # forward without backward (a reference pass). Tokens past it price at 1.
    min_cost_factor: float = 1.0


@dataclass(slots=True)
class _Candidate:
    priority: float
    seq: Sequence | None  # None: the fine-tune piece
    waiting: bool = False
    # A prefill's state, taken once per plan (a waiting one's cache lookup included): KV entries
    # it holds or would reuse, prompt tokens left, blocks it holds or would share.
    kv: int = 0
    remaining: int = 0
    held: int = 0


class MaceScheduler(FcfsScheduler):
    def __init__(self, pool: BlockPool, config: EngineConfig, cost_model: CostModel,
                 pruning: PruningPolicy | None = None, clock=time.monotonic) -> None:
        super().__init__(pool, config.max_num_batched_tokens, config.max_num_seqs,
                         config.enable_chunked_prefill, pruning)
        self.config = config
        self.cost_model = cost_model
        self.clock = clock
        self.finetune_tokens = 0  # the fine-tune piece the last plan makes room for (0: none)
        self.latency_capacity_s = 0.0  # the last plan's L, and its prediction (tests, metrics)
        self.predicted_s = 0.0

    # -- SLOs and priorities ----------------------------------------------------------------------

    def _tbt_budget(self, options: RequestOptions) -> float:
        tbt = options.slo_tbt_ms if options.slo_tbt_ms is not None else self.config.slo_tbt_ms
        return tbt / 1e3 * (1 - self.config.slo_margin)

    def _ttft(self, options: RequestOptions) -> float:
        return (options.slo_ttft_ms if options.slo_ttft_ms is not None else self.config.slo_ttft_ms) / 1e3

    def decode_slack(self, seq: Sequence, now: float) -> float:
        """Seconds until the deadline of ``seq``'s next token (negative: behind its pace)."""
        if seq.first_token_s is None:  # the last prompt token: the TTFT deadline
            return seq.arrival_s + self._ttft(seq.options) - now
        return seq.first_token_s + seq.num_output_tokens * self._tbt_budget(seq.options) - now

    def prefill_priority(self, seq: Sequence, now: float) -> float:
        c = self.config
        ttft = self._ttft(seq.options)
        priority = c.w_prefill + seq.options.priority + c.alpha_wait * (now - seq.arrival_s) / ttft
        # iterations still needed at one TBT budget each, at most max_num_batched_tokens a chunk
        remaining = seq.num_tokens - seq.num_computed_tokens
        # (iterations may run up to slo_bank_max budgets when decodes have banked slack)
        needed = (math.ceil(remaining / self.max_num_batched_tokens) + 1) * self._tbt_budget(seq.options) * c.slo_bank_max
        if seq.arrival_s + ttft - now <= needed:
            priority += URGENT
        return priority

    def finetune_priority(self, offer: FinetuneOffer) -> float:
        c = self.config
        return c.delta_ft + c.alpha_ft * offer.wait_s + c.gamma_loss * offer.loss

    def _victim(self) -> Sequence:
        """Who is preempted when blocks run out: the lowest request priority, newest first."""
        return min(self.running, key=lambda s: (s.options.priority, -s.arrival_s))

    # -- costs ------------------------------------------------------------------------------------

    def _prefill_cost(self, num_new: int, kv_offset: int) -> float:
        c = self.cost_model.coefficients
        return max(0.0, c[1] * num_new + c[2] * num_new * (kv_offset + num_new) / 1e3)

    def _prefill_candidate(self, seq: Sequence, now: float, waiting: bool = False) -> _Candidate:
        cached = self.num_cached_prefix_tokens(seq) if waiting else 0
        done = max(seq.num_computed_tokens, cached)
        held = len(seq.block_table) if not waiting else cached // self.pool.block_size
        return _Candidate(self.prefill_priority(seq, now), seq, waiting,
                          kv=done - seq.num_pruned_tokens, remaining=seq.num_tokens - done, held=held)

    def _prefill_cost_blocks(self, cand: _Candidate, n: int) -> tuple[float, int]:
        """Seconds and new blocks of the next ``n`` tokens of a prefill candidate."""
        return self._prefill_cost(n, cand.kv), self.pool.blocks_for_tokens(cand.kv + n) - cand.held

    def _prefill_fit(self, cand: _Candidate, lat: float, mem: int, tokens: int, force: bool) -> tuple[int, float, int]:
        """Largest chunk of a prefill candidate within the capacities: (tokens, seconds, blocks)."""
        remaining = cand.remaining
        n = min(remaining, tokens)
        if not self.enable_chunked_prefill:
            if n < remaining:
                return 0, 0.0, 0
            lat_n, mem_n = self._prefill_cost_blocks(cand, n)
            return (n, lat_n, mem_n) if (lat_n <= lat or force) and mem_n <= mem else (0, 0.0, 0)
        lo, hi = 0, n
        while lo < hi:  # the largest n whose cost fits (costs grow with n)
            mid = (lo + hi + 1) // 2
            lat_m, mem_m = self._prefill_cost_blocks(cand, mid)
            if (lat_m <= lat or force) and mem_m <= mem:
                lo = mid
            else:
                hi = mid - 1
        n = lo
        bs = self.pool.block_size
        if 0 < n < remaining and n > bs:
            n -= (cand.kv + n) % bs  # a cut chunk ends at a block boundary (its blocks can be cached)
        if n == 0:
            return 0, 0.0, 0
        lat_n, mem_n = self._prefill_cost_blocks(cand, n)
        return n, lat_n, mem_n

    def _finetune_cost(self, offer: FinetuneOffer) -> float:
        """Seconds of the offer's smallest piece: the chunk's fixed cost plus its tokens (both at
        a third without backward)."""
        return offer.min_cost_factor * (self.cost_model.finetune_chunk_overhead()
                                        + offer.min_tokens * self.cost_model.cost_per_finetune_token())

    def _finetune_size(self, offer: FinetuneOffer, seconds: float) -> int:
        """Tokens of the largest piece whose price fits ``seconds`` (at least the smallest unit;
        tokens past it at full price), before the offer's and memory's caps."""
        spare = max(0.0, seconds - self._finetune_cost(offer))
        return offer.min_tokens + int(spare / self.cost_model.cost_per_finetune_token())

    def _finetune_token_cap(self) -> int:
        """Fine-tune tokens the activation memory allows in one iteration."""
        per_token, budget = self.cost_model.finetune_bytes_per_token, self.config.finetune_memory_bytes
        if not per_token or budget is None:
            return _NO_CAP
        return int(self.config.tau_mem * budget / per_token)

    # -- one plan ---------------------------------------------------------------------------------

    def schedule(self, offer: FinetuneOffer | None = None, force_finetune: bool = False) -> list[ScheduledSequence]:
        c = self.config
        now = self.clock()
        self.finetune_tokens = 0
        scheduled: list[ScheduledSequence] = []
        tokens = self.max_num_batched_tokens
        base = c.slo_tbt_ms / 1e3 * (1 - c.slo_margin)

        # 1. Decodes, most urgent first; blocks for them before anything else.
        decodes = sorted((s for s in self.running if s.num_tokens - s.num_computed_tokens == 1),
                         key=lambda s: self.decode_slack(s, now))
        preempted = False
        for seq in decodes:
            if seq.status is not SequenceStatus.RUNNING or tokens == 0:
                continue
            if self.pruning is not None and seq.num_output_tokens > 0:
                self._prune(seq)
            while not self._grow(seq, 1):
                victim = self._victim()
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq.status is SequenceStatus.RUNNING:
                scheduled.append(ScheduledSequence(seq, 1))
                tokens -= 1
        # a victim may be a decode planned earlier in this loop: its blocks are gone, drop it
        tokens += sum(s.seq.status is not SequenceStatus.RUNNING for s in scheduled)
        scheduled = [s for s in scheduled if s.seq.status is SequenceStatus.RUNNING]
        decoding = [s.seq for s in scheduled]
        num_ctx = sum(s.num_kv_tokens + 1 for s in decoding)
        predicted = self.cost_model.predict(IterationShape(num_decodes=len(decoding), decode_context=num_ctx))
        if decoding:
            slack = min(self.decode_slack(s, now) for s in decoding)
            capacity = min(max(slack, base), c.slo_bank_max * base)
        else:
            capacity = base
        lat = capacity - predicted
        free = self.pool.num_free_blocks + self.pool.num_cached_blocks
        mem_total = max(1, int(c.tau_mem * free))
        mem = mem_total if not preempted else 0  # memory is short: no new KV this iteration

        # 2. Candidates: part-way prefills, the head of the queue, requests with their own options.
        candidates = [self._prefill_candidate(s, now) for s in self.running if s.num_tokens - s.num_computed_tokens > 1]
        head, room = 0, max(c.pack_top_k, self.max_num_seqs - len(self.running))
        for seq in self.waiting:
            if seq.options != _DEFAULT_OPTIONS or head < room:
                head += seq.options == _DEFAULT_OPTIONS
                candidates.append(self._prefill_candidate(seq, now, waiting=True))
        idle = not decoding and not candidates
        if offer is not None:
            candidates.append(_Candidate(self.finetune_priority(offer), None))
            if idle:  # nothing running: a piece as long as the longest iteration the planner ever
                # plans (slo_bank_max TBT budgets), so that a request arriving meanwhile waits no
                # longer behind fine-tune work than behind a banked iteration (and memory allows)
                fits = self._finetune_size(offer, c.slo_bank_max * base)
                self.finetune_tokens = max(offer.min_tokens, min(offer.max_tokens, fits, self._finetune_token_cap()))
                candidates.pop()
            elif force_finetune:  # the starvation guard: the smallest piece, SLO or not
                self.finetune_tokens = offer.min_tokens
                lat -= self._finetune_cost(offer)
                candidates.pop()
        candidates.sort(key=lambda cand: -cand.priority)

        # 3. Urgent prefills first, then best fit among the top K that fit.
        slots = self.max_num_seqs - len(self.running)
        per_token = self.cost_model.cost_per_finetune_token()
        ft_mem_total = ft_mem = self._finetune_token_cap()
        while candidates and tokens > 0:
            choice = None  # (f, -priority, index, size, seconds, blocks)
            considered = 0
            for i, cand in enumerate(candidates):
                if considered == c.pack_top_k:
                    break
                if cand.seq is None:
                    whole_s = self._finetune_cost(offer)  # one unit: a pair or a part
                    if lat < whole_s or ft_mem < offer.min_tokens:
                        continue
                    size = min(offer.max_tokens, self._finetune_size(offer, lat), ft_mem)
                    seconds, blocks = whole_s + (size - offer.min_tokens) * per_token, 0
                else:
                    if cand.waiting and slots <= 0:
                        continue
                    urgent = cand.priority >= URGENT
                    size, seconds, blocks = self._prefill_fit(cand, lat, mem, tokens, force=urgent)
                    if size == 0:
                        continue
                    if urgent:  # placed before anything else
                        choice = (-1.0, -cand.priority, i, size, seconds, blocks)
                        break
                    whole_s, whole_blocks = self._prefill_cost_blocks(cand, cand.remaining)
                considered += 1
                # best fit on the task's whole size: the one that fills what remains most closely,
                # in latency and in the memory it draws on (KV blocks, or fine-tune activations)
                if cand.seq is None:
                    mem_fit = abs(ft_mem - offer.min_tokens) / ft_mem_total if ft_mem_total < _NO_CAP else 1.0
                else:
                    mem_fit = abs(mem - whole_blocks) / mem_total
                f = c.lambda_mem * mem_fit + c.lambda_lat * abs(lat - whole_s) / capacity
                key = (f, -cand.priority, i, size, seconds, blocks)
                if choice is None or key < choice:
                    choice = key
            if choice is None:
                break
            _, _, i, size, seconds, blocks = choice
            cand = candidates.pop(i)
            if cand.seq is None:
                self.finetune_tokens = size
                ft_mem -= size
            elif not self._commit(cand, size, scheduled):
                continue
            else:
                slots -= cand.waiting
                tokens -= size
                mem -= blocks
            lat -= seconds
        if not scheduled and not self.finetune_tokens and candidates:
            # The model says nothing fits, yet nothing runs either: an idle engine must move.
            for cand in candidates:
                if cand.seq is None:
                    self.finetune_tokens = offer.min_tokens
                    lat -= self._finetune_cost(offer)
                    break
                size, seconds, _ = self._prefill_fit(cand, lat, mem_total, tokens, force=True)
                if size and self._commit(cand, size, scheduled):
                    lat -= seconds
                    break
        self.latency_capacity_s = capacity
        self.predicted_s = capacity - lat
        return scheduled

    def _commit(self, cand: _Candidate, num_new: int, scheduled: list[ScheduledSequence]) -> bool:
        seq = cand.seq
        if cand.waiting:
            self._take_cached_prefix(seq)
            num_new = min(num_new, seq.num_tokens - seq.num_computed_tokens)
        if not self._grow(seq, num_new):
            if cand.waiting:
                self._release(seq)
            return False
        if cand.waiting:
            self.num_prefix_query_tokens += seq.num_tokens
            self.num_prefix_hit_tokens += seq.num_cached_tokens
            self.waiting.remove(seq)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
        scheduled.append(ScheduledSequence(seq, num_new))
        return True


_DEFAULT_OPTIONS = RequestOptions()
