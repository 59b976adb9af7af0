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
lowest-priority running sequence is preempted and recomputed later), most urgent first, as many
as ``slo_bank_max`` TBT budgets hold by the cost model (at least one): under overload the rest
wait their turn (next iteration they are the most urgent) rather than stretch every gap. What they leave of ``L``
and ``M`` goes to the candidates: prefill chunks (running sequences part-way through their
prompt, and waiting requests) and the trainer's next fine-tune piece. Each has a priority:

    prefill:   w_prefill + request priority + alpha_wait * wait / slo_ttft  (+ URGENT)
    fine-tune: delta_ft + alpha_ft * wait + gamma_loss * L_dpo

(with ``finetune_max_slowdown`` set, the default, fine-tune work only fills what the prefills
leave: it is packed after them, so it never cuts a prompt's chunk and delays a first token)

where a prefill is URGENT once the iterations it still needs no longer fit before its TTFT
deadline (or its own prefill and two budgets no longer fit) and the deadline has not passed:
urgent prefills are placed first and may run the iteration past its capacity; a prompt already
past its deadline gains nothing from being forced and waits for room, first by its wait (under
overload the head of the queue is such a prompt, so nothing stretches the admitted requests'
token gaps); and ``L_dpo`` is the last
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
iterations without one, and whenever fine-tune work has had less than ``finetune_min_share`` of
the time since pairs began to wait (a credit that grows with the clock and that every piece
placed spends: the guaranteed share, so training goes on under a load that leaves no slack;
its pieces go into iterations without prompt work, so they lengthen a plain decode step rather
than one a prefill already makes the longest, unless twice the piece is owed); a prefill's
priority grows with its wait until it wins; and when the cost model says nothing fits while
nothing is running, the top candidate runs anyway (an idle engine never waits on a wrong
prediction).

Waiting requests of the default class (no per-request priority or SLO) have priorities in
arrival order, so no more of them can be admitted than there are free sequence slots, from the
head; the planner looks at those and at every request with its own options, which keeps
planning time flat in the queue length.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from engine.config import SchedulerConfig
from scheduler.cost_model import CostModel, IterationShape
from scheduler.policy import FinetuneOffer, Policy, ScheduledSequence, SchedulerOutput
from scheduler.queues import SequenceQueues
from scheduler.request import RequestOptions, Sequence, SequenceStatus
from scheduler.slos import Slos

URGENT = 100.0
INFERENCE_WINDOW, MIN_INFERENCE_SAMPLES = 512, 64
IDLE_TTFT_SHARE = 0.5  # of the default TTFT SLO: how long an iteration with no decode may take
MAX_CREDIT_S = 0.5  # the guaranteed share's credit, at most and (owed the other way) at least
# With a TBT SLO inference alone does not meet, fine-tune work's smallest piece at least once
# every this many iterations (the guaranteed share; the starvation guard's period otherwise).
INFEASIBLE_FINETUNE_EVERY = 10
_NO_CAP = 1 << 40


@dataclass(slots=True)
class _Candidate:
    priority: float
    seq: Sequence | None  # None: the fine-tune piece
    waiting: bool = False
    urgent: bool = False  # placed first, and allowed past the capacity (MacePolicy._is_urgent)
    # A prefill's state, taken once per plan (a waiting one's cache lookup included): KV entries
    # it holds or would reuse, prompt tokens left, blocks it holds or would share.
    kv: int = 0
    remaining: int = 0
    held: int = 0


@dataclass(slots=True)
class _Room:
    """What is left of one iteration's bin while the planner fills it."""

    capacity_s: float  # L: the latency the iteration may take
    latency_s: float  # of L, not yet spent
    # Of L, what fine-tune work may not use: the share the cost model's safety factor says the
    # iteration may run over its prediction. Inference is planned on L, as it must run anyway.
    reserve_s: float
    # How long fine-tune work may make the iteration (finetune_max_slowdown x the p90 of recent
    # inference-alone iterations, both predicted; the capacity when not set or not yet measured).
    # Not divided by the safety factor: the noise it measures stretches inference-alone
    # iterations as much, and a bound of 1.2 divided by a noisy machine's 1.4 left no room at all.
    finetune_limit_s: float
    mem_total: int  # M: KV blocks new prefill may claim
    mem: int  # of M, not yet claimed
    tokens: int  # of max_num_batched_tokens, not yet used
    slots: int  # sequence slots left for waiting requests
    finetune_mem_total: int  # fine-tune tokens the activation memory allows (_NO_CAP: no cap)
    finetune_mem: int
    finetune_tokens: int = 0  # the fine-tune piece placed (0: none)
    finetune_s: float = 0.0  # its price


class MacePolicy(Policy):
    name = "mace"
    plans_by_time = True

    def __init__(self, queues: SequenceQueues, config: SchedulerConfig, cost_model: CostModel,
                 clock: Callable[[], float]) -> None:
        super().__init__(queues, config, cost_model, clock)
        self.weights = config.mace
        self._iterations_without_finetune = 0  # the starvation guard's count
        # the guaranteed share's credit, seconds of fine-tune work owed (and when it last grew)
        self._finetune_credit_s = 0.0
        self._credit_at: float | None = None
        self.slos = Slos(config, cost_model)  # the defaults, learned when none was given
        # predicted inference-alone cost of recent iterations that had inference work
        self._inference_s: deque[float] = deque(maxlen=INFERENCE_WINDOW)
        # (p50, p90) of those, and the longest piece an idle engine runs; None: too few yet
        self._inference_quantiles: tuple[float, float] | None = None
        self._idle_piece_s: float | None = None
        self._decode_cost_s = 0.0  # the running decodes' predicted cost, all of them (last plan)

    # -- SLOs and priorities ----------------------------------------------------------------------

    def default_slos_ms(self) -> tuple[float, float]:
        return self.slos.ttft_ms, self.slos.tbt_ms

    @property
    def slo_infeasible(self) -> bool:
        return self.slos.infeasible

    def predicted_ttft_s(self, num_prompt_tokens: int) -> float:
        """When a request arriving now with this prompt would see its first token: the prefill
        work queued ahead of it and its own, at what each iteration leaves after the running
        decodes (one TBT budget an iteration; a tenth of it when the decodes take more)."""
        q = self.queues
        work = self._prefill_cost(num_prompt_tokens, 0)
        for seq in q.running:
            if seq.num_tokens - seq.num_computed_tokens > 1:
                work += self._prefill_cost(seq.num_tokens - seq.num_computed_tokens, seq.num_computed_tokens)
        for seq in q.waiting:
            work += self._prefill_cost(seq.num_tokens - seq.num_computed_tokens, 0)
        budget = self._base_budget()
        return work * budget / max(budget - self._decode_cost_s, 0.1 * budget)

    def _tbt_budget(self, options: RequestOptions) -> float:
        tbt = options.slo_tbt_ms if options.slo_tbt_ms is not None else self.slos.tbt_ms
        return tbt / 1e3 * (1 - self.config.slo_margin)

    def _ttft(self, options: RequestOptions) -> float:
        return (options.slo_ttft_ms if options.slo_ttft_ms is not None else self.slos.ttft_ms) / 1e3

    def decode_slack(self, seq: Sequence, now: float) -> float:
        """Seconds until the deadline of ``seq``'s next token (negative: behind its pace)."""
        if seq.first_token_s is None:  # the last prompt token: the TTFT deadline
            return seq.arrival_s + self._ttft(seq.options) - now
        return seq.first_token_s + seq.num_output_tokens * self._tbt_budget(seq.options) - now

    def prefill_priority(self, seq: Sequence, now: float) -> float:
        return self._wait_priority(seq, now) + URGENT * self._is_urgent(seq, now)

    def _wait_priority(self, seq: Sequence, now: float) -> float:
        w = self.weights
        return w.w_prefill + seq.options.priority + w.alpha_wait * (now - seq.arrival_s) / self._ttft(seq.options)

    def _is_urgent(self, seq: Sequence, now: float) -> bool:
        """The iterations its prompt still needs no longer fit before its TTFT deadline, which has
        not passed (past it, forcing the prompt in saves nothing)."""
        # iterations still needed at one TBT budget each, at most max_num_batched_tokens a chunk
        # (iterations may run up to slo_bank_max budgets when decodes have banked slack), or the
        # prompt's own prefill and two budgets when that is longer
        remaining = seq.num_tokens - seq.num_computed_tokens
        chunks = math.ceil(remaining / self.config.max_num_batched_tokens)
        budget = self._tbt_budget(seq.options)
        needed = max((chunks + 1) * budget * self.weights.slo_bank_max,
                     self._prefill_cost(remaining, seq.num_computed_tokens) + 2 * budget)
        return 0 < seq.arrival_s + self._ttft(seq.options) - now <= needed

    def finetune_priority(self, offer: FinetuneOffer) -> float:
        w = self.weights
        return w.delta_ft + w.alpha_ft * offer.wait_s + w.gamma_loss * offer.loss

    def _victim(self) -> Sequence:
        """Who is preempted when blocks run out: the lowest request priority, newest first."""
        return min(self.queues.running, key=lambda s: (s.options.priority, -s.arrival_s))

    # -- costs ------------------------------------------------------------------------------------

    def _prefill_cost(self, num_new: int, kv_offset: int) -> float:
        return self.cost_model.prefill_cost(num_new, kv_offset)

    def _prefill_candidate(self, seq: Sequence, now: float, waiting: bool = False) -> _Candidate:
        cached = self.queues.num_cached_prefix_tokens(seq) if waiting else 0
        done = max(seq.num_computed_tokens, cached)
        held = len(seq.block_table) if not waiting else cached // self.queues.pool.block_size
        urgent = self._is_urgent(seq, now)
        return _Candidate(self._wait_priority(seq, now) + URGENT * urgent, seq, waiting, urgent,
                          kv=done - seq.num_pruned_tokens, remaining=seq.num_tokens - done, held=held)

    def _prefill_cost_blocks(self, cand: _Candidate, n: int) -> tuple[float, int]:
        """Seconds and new blocks of the next ``n`` tokens of a prefill candidate."""
        return self._prefill_cost(n, cand.kv), self.queues.pool.blocks_for_tokens(cand.kv + n) - cand.held

    def _prefill_fit(self, cand: _Candidate, lat: float, mem: int, tokens: int, force: bool) -> tuple[int, float, int]:
        """Largest chunk of a prefill candidate within the capacities: (tokens, seconds, blocks)."""
        remaining = cand.remaining
        n = min(remaining, tokens)
        if not self.config.enable_chunked_prefill:
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
        bs = self.queues.pool.block_size
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

    def _finetune_piece_cost(self, offer: FinetuneOffer, tokens: int) -> float:
        """Seconds of a piece of ``tokens`` (the smallest unit's price, the tokens past it at full price)."""
        return self._finetune_cost(offer) + max(0, tokens - offer.min_tokens) * self.cost_model.cost_per_finetune_token()

    def _finetune_size(self, offer: FinetuneOffer, seconds: float) -> int:
        """Tokens of the largest piece whose price fits ``seconds`` (at least the smallest unit;
        tokens past it at full price), before the offer's and memory's caps."""
        spare = max(0.0, seconds - self._finetune_cost(offer))
        return offer.min_tokens + int(spare / self.cost_model.cost_per_finetune_token())

    def _finetune_token_cap(self) -> int:
        """Fine-tune tokens the activation memory allows in one iteration."""
        per_token, budget = self.cost_model.finetune_bytes_per_token, self.weights.finetune_memory_bytes
        if not per_token or budget is None:
            return _NO_CAP
        return int(self.weights.tau_mem * budget / per_token)

    # -- one plan ---------------------------------------------------------------------------------

    def schedule(self, offer: FinetuneOffer | None) -> SchedulerOutput:
        now = self.clock()
        every = self.weights.finetune_min_every
        if self.slos.infeasible:
            every = min(every, INFEASIBLE_FINETUNE_EVERY)
        credit = self._credit(offer, now)
        # the guaranteed share's piece goes into an iteration without prompt work, so that it
        # lengthens a decode step, not one a prefill already makes long (the gaps at the tail);
        # when prompts never stop coming, once twice its price is owed
        cost = self._finetune_cost(offer) if offer is not None else 0.0
        owed = credit >= cost and (not self._prompt_work() or credit >= min(2 * cost, MAX_CREDIT_S))
        force = offer is not None and (self._iterations_without_finetune >= every or owed)
        # the guard's piece comes out of what the decodes may take: under overload too, the
        # iteration stays within the longest one planned
        scheduled, preempted = self._schedule_decodes(now, cost if force else 0.0)
        room = self._room(scheduled, preempted, now)
        candidates = self._candidates(now)
        later: list[_Candidate] = []
        if offer is not None:
            if not scheduled and not candidates:
                # nothing running: a piece as long as the longest iteration the planner ever
                # plans (slo_bank_max TBT budgets), so that a request arriving meanwhile waits no
                # longer behind fine-tune work than behind a banked iteration (and memory allows);
                # with a slowdown bound, no longer than a median inference-alone iteration
                longest = self.weights.slo_bank_max * self._base_budget()
                if self.weights.finetune_max_slowdown and self._inference_s:
                    # requests have come: until what they take is measured, the smallest piece
                    longest = min(longest, self._idle_piece_s or 0.0)
                longest /= self.cost_model.safety_factor()
                fits = self._finetune_size(offer, longest)
                room.finetune_tokens = max(offer.min_tokens, min(self._max_finetune_tokens(offer), fits,
                                                                 room.finetune_mem))
                room.finetune_s = self._finetune_piece_cost(offer, room.finetune_tokens)
            elif force:  # the starvation guard: the smallest piece, SLO or not
                room.finetune_tokens, room.finetune_s = offer.min_tokens, cost
                room.latency_s -= room.finetune_s
            elif self.weights.finetune_max_slowdown:
                later = [_Candidate(self.finetune_priority(offer), None)]  # it fills what prefills leave
            else:
                candidates.append(_Candidate(self.finetune_priority(offer), None))
        candidates.sort(key=lambda cand: -cand.priority)
        self._pack(candidates, room, scheduled, offer)
        if later:
            self._pack(later, room, scheduled, offer)
            candidates += later  # not placed
        if not scheduled and not room.finetune_tokens and candidates:
            self._move_an_idle_engine(candidates, room, scheduled, offer)
        if scheduled or room.finetune_tokens:
            self._iterations_without_finetune = 0 if room.finetune_tokens else self._iterations_without_finetune + 1
        if scheduled:
            self._observe_inference(room)
        if room.finetune_tokens:  # what the piece costs comes out of the credit
            self._finetune_credit_s = max(-MAX_CREDIT_S, self._finetune_credit_s - room.finetune_s)
        return SchedulerOutput(scheduled, room.finetune_tokens, predicted_s=room.capacity_s - room.latency_s,
                               capacity_s=room.capacity_s)

    def _credit(self, offer: FinetuneOffer | None, now: float) -> float:
        """The guaranteed share's credit now: finetune_min_share of the time since it last grew,
        while work waits (at most MAX_CREDIT_S, so a long wait does not come due at once)."""
        if offer is None or not self.weights.finetune_min_share:
            self._credit_at = None
            return 0.0
        if self._credit_at is not None:
            grown = self.weights.finetune_min_share * (now - self._credit_at)
            self._finetune_credit_s = min(MAX_CREDIT_S, self._finetune_credit_s + grown)
        self._credit_at = now
        return self._finetune_credit_s

    def _prompt_work(self) -> bool:
        """Whether a prompt waits or is part-way through its prefill."""
        q = self.queues
        return bool(q.waiting) or any(s.num_tokens - s.num_computed_tokens > 1 for s in q.running)

    def _observe_inference(self, room: _Room) -> None:
        """Record the predicted cost of the iteration's inference work (what it would take alone)."""
        spent = room.capacity_s - room.latency_s
        if room.finetune_tokens:
            spent -= room.finetune_s
        self._inference_s.append(spent)
        if len(self._inference_s) >= MIN_INFERENCE_SAMPLES and len(self._inference_s) % 16 == 0:
            ordered = sorted(self._inference_s)
            median, p90 = ordered[len(ordered) // 2], ordered[int(0.9 * (len(ordered) - 1))]
            self._inference_quantiles = (median, p90)
            # an arrival waits behind an idle engine's piece: at most (slowdown - 1) of a typical
            # first token alone (its prompt's prefill after an iteration in progress)
            prompt = self.slos.median_prompt_s()
            if prompt is not None:
                self._idle_piece_s = (self.weights.finetune_max_slowdown - 1.0) * (prompt + median)

    def _base_budget(self) -> float:
        """One TBT budget of the server's default SLO, in seconds."""
        return self.slos.tbt_ms / 1e3 * (1 - self.config.slo_margin)

    def _max_finetune_tokens(self, offer: FinetuneOffer) -> int:
        """The largest piece one iteration may carry: the per-iteration cap, even on an idle
        engine (an arrival waits for the piece in flight), or the smallest unit if larger."""
        return max(offer.min_tokens, self.config.finetune_tokens_per_iteration)

    def _schedule_decodes(self, now: float, reserved_s: float = 0.0) -> tuple[list[ScheduledSequence], bool]:
        """1. The running decodes, most urgent first, with their blocks, as many as the longest
        iteration (slo_bank_max TBT budgets) holds by the cost model, at least one; when the pool
        is short the lowest-priority running sequence is preempted; ``reserved_s`` of the iteration
        is kept for a fine-tune piece. Returns the decodes and whether any sequence was preempted."""
        q = self.queues
        scheduled: list[ScheduledSequence] = []
        tokens = self.config.max_num_batched_tokens
        decodes = sorted((s for s in q.running if s.num_tokens - s.num_computed_tokens == 1),
                         key=lambda s: self.decode_slack(s, now))
        limit = self.weights.slo_bank_max * self._base_budget() - reserved_s
        preempted = False
        context = 0
        self._decode_cost_s = 0.0
        if decodes:  # what inference alone takes at this load, before the cap
            self._decode_cost_s = self.cost_model.predict(IterationShape(
                num_decodes=len(decodes), decode_context=sum(s.num_kv_tokens + 1 for s in decodes)))
            self.slos.observe_decodes(self._decode_cost_s)
        capped = self._decode_cost_s > limit  # else every decode fits: no pricing one by one
        for seq in decodes:
            if seq.status is not SequenceStatus.RUNNING or tokens == 0:
                continue
            if capped and scheduled:
                shape = IterationShape(num_decodes=len(scheduled) + 1, decode_context=context + seq.num_kv_tokens + 1)
                if self.cost_model.predict(shape) > limit:
                    break  # overload: the rest are the most urgent next time
            if q.pruning is not None and seq.num_output_tokens > 0:
                q.prune(seq)
            while not q.grow(seq, 1):
                victim = self._victim()
                q.preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq.status is SequenceStatus.RUNNING:
                scheduled.append(ScheduledSequence(seq, 1))
                context += seq.num_kv_tokens + 1
                tokens -= 1
        # a victim may be a decode planned earlier in this loop: its blocks are gone, drop it
        return [s for s in scheduled if s.seq.status is SequenceStatus.RUNNING], preempted

    def _room(self, decodes: list[ScheduledSequence], preempted: bool, now: float) -> _Room:
        """2. The bin the decodes leave: latency to their tightest deadline (at least one TBT
        budget, at most slo_bank_max of them) minus the decodes' predicted cost, of which
        fine-tune work may not use the reserve the cost model's safety factor asks for (what the
        recent iterations took beyond their prediction); KV blocks free or evictable (none when
        the decodes preempted); fine-tune activation memory."""
        base = self._base_budget()
        seqs = [s.seq for s in decodes]
        predicted = self.cost_model.predict(IterationShape(num_decodes=len(seqs),
                                                           decode_context=sum(s.num_kv_tokens + 1 for s in seqs)))
        if seqs:
            slack = min(self.decode_slack(s, now) for s in seqs)
            capacity = min(max(slack, base), self.weights.slo_bank_max * base)
        else:
            # no token gap to protect: prompts may take half a TTFT budget (a request arriving
            # meanwhile keeps the other half for its own prefill), in chunks as large as that
            capacity = max(base, IDLE_TTFT_SHARE * self._ttft(_DEFAULT_OPTIONS))
        pool = self.queues.pool
        mem_total = max(1, int(self.weights.tau_mem * (pool.num_free_blocks + pool.num_cached_blocks)))
        ft_mem = self._finetune_token_cap()
        reserve = capacity * (1.0 - 1.0 / self.cost_model.safety_factor())
        limit = capacity
        if self.weights.finetune_max_slowdown:  # until inference alone is measured, nothing beside it
            p90 = self._inference_quantiles[1] if self._inference_quantiles is not None else 0.0
            limit = min(capacity, self.weights.finetune_max_slowdown * p90)
        return _Room(capacity_s=capacity, latency_s=capacity - predicted, reserve_s=reserve, finetune_limit_s=limit,
                     mem_total=mem_total,
                     mem=mem_total if not preempted else 0, tokens=self.config.max_num_batched_tokens - len(decodes),
                     slots=self.config.max_num_seqs - len(self.queues.running), finetune_mem_total=ft_mem,
                     finetune_mem=ft_mem)

    def _candidates(self, now: float) -> list[_Candidate]:
        """3. Prefills that could join: running ones part-way through their prompt, the head of
        the queue (as many as there are free sequence slots), and every waiting request with
        options of its own."""
        q = self.queues
        candidates = [self._prefill_candidate(s, now) for s in q.running if s.num_tokens - s.num_computed_tokens > 1]
        head, room = 0, max(self.weights.pack_top_k, self.config.max_num_seqs - len(q.running))
        for seq in q.waiting:
            own = seq.options.has_scheduling_options
            if own or head < room:
                head += not own
                candidates.append(self._prefill_candidate(seq, now, waiting=True))
        return candidates

    def _pack(self, candidates: list[_Candidate], room: _Room, scheduled: list[ScheduledSequence],
              offer: FinetuneOffer | None) -> None:
        """4. Urgent prefills first, then best fit among the top K that fit, until nothing fits."""
        w = self.weights
        while candidates and room.tokens > 0:
            choice = None  # (f, -priority, index, size, seconds, blocks)
            considered = 0
            for i, cand in enumerate(candidates):
                if considered == w.pack_top_k:
                    break
                if cand.seq is None:
                    whole_s = self._finetune_cost(offer)  # one unit: a pair or a part
                    spent = room.capacity_s - room.latency_s
                    room_s = min(room.latency_s - room.reserve_s,
                                 room.finetune_limit_s - spent)
                    if room_s < whole_s or room.finetune_mem < offer.min_tokens:
                        continue
                    size = min(self._max_finetune_tokens(offer), self._finetune_size(offer, room_s),
                               room.finetune_mem)
                    seconds, blocks = self._finetune_piece_cost(offer, size), 0
                else:
                    if cand.waiting and room.slots <= 0:
                        continue
                    urgent = cand.urgent
                    size, seconds, blocks = self._prefill_fit(cand, room.latency_s, room.mem, room.tokens, force=urgent)
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
                    mem_fit = (abs(room.finetune_mem - offer.min_tokens) / room.finetune_mem_total
                               if room.finetune_mem_total < _NO_CAP else 1.0)
                else:
                    mem_fit = abs(room.mem - whole_blocks) / room.mem_total
                f = w.lambda_mem * mem_fit + w.lambda_lat * abs(room.latency_s - whole_s) / room.capacity_s
                key = (f, -cand.priority, i, size, seconds, blocks)
                if choice is None or key < choice:
                    choice = key
            if choice is None:
                return
            _, _, i, size, seconds, blocks = choice
            cand = candidates.pop(i)
            if cand.seq is None:
                room.finetune_tokens, room.finetune_s = size, seconds
                room.finetune_mem -= size
            elif not self._commit(cand, size, scheduled):
                continue
            else:
                room.slots -= cand.waiting
                room.tokens -= size
                room.mem -= blocks
            room.latency_s -= seconds

    def _move_an_idle_engine(self, candidates: list[_Candidate], room: _Room, scheduled: list[ScheduledSequence],
                             offer: FinetuneOffer | None) -> None:
        """5. The cost model says nothing fits, yet nothing runs either: an idle engine must move,
        so the top candidate runs anyway."""
        for cand in candidates:
            if cand.seq is None:
                room.finetune_tokens, room.finetune_s = offer.min_tokens, self._finetune_cost(offer)
                room.latency_s -= room.finetune_s
                return
            size, seconds, _ = self._prefill_fit(cand, room.latency_s, room.mem_total, room.tokens, force=True)
            if size and self._commit(cand, size, scheduled):
                room.latency_s -= seconds
                return

    def _commit(self, cand: _Candidate, num_new: int, scheduled: list[ScheduledSequence]) -> bool:
        seq, q = cand.seq, self.queues
        if cand.waiting:
            if not q.adapter_fits(seq):
                return False
            q.take_cached_prefix(seq)
            num_new = min(num_new, seq.num_tokens - seq.num_computed_tokens)
        if not q.grow(seq, num_new):
            if cand.waiting:
                q.release(seq)
            return False
        if cand.waiting:
            q.admit(seq)
            self.slos.observe_prompt(self._prefill_cost(cand.remaining, cand.kv))
        scheduled.append(ScheduledSequence(seq, num_new))
        return True


_DEFAULT_OPTIONS = RequestOptions()
