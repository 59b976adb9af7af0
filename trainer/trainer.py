"""The trainer's side on the event loop: stored feedback in, fine-tune chunks out, results back.

Each iteration the scheduler's policy prices the trainer's ``offer(now)`` and the core asks
``next_chunk(tokens)`` for a chunk of that size; the worker runs it after the iteration's
inference forward; ``on_result`` takes what came back. The order per pair: a ``reference`` chunk
(log-probs with the adapter off, computed once and stored), then ``gradient`` chunks until
``grad_accum`` pairs have been accumulated, the last of which asks for the optimizer step (or,
once the accumulation began ``max_step_delay_s`` ago, the last chunk of the pair in progress
steps with fewer: under a load that leaves training a small share, feedback still reaches the
serving adapter within about that long). Depth
first: a pair whose reference is known trains before the next pair's reference is computed, so
the work in progress is one pair at a time and steps come as early as the room allows
(references computed ahead would be work not yet worth anything).

Ranking (``rank_window`` > 0, once the adapter has stepped): a pair's reference pass also runs
it under the serving adapter, which gives its DPO loss as the adapter stands, and references run
ahead until ``rank_window`` pairs are ready, or for at most ``max_step_delay_s`` after a step
(then the ready pairs train: under a small share the window would take minutes to fill and
nothing would step meanwhile); the ready pair with the highest loss trains first
(ties, and pairs whose loss is not known, first come, first served: an unknown loss counts as
ln 2, an unmoved adapter's). A pair the adapter already gets right waits behind those it gets
wrong. The estimate is the adapter's when the pass ran: later steps may move it, and it is not
renewed (a fresh estimate would cost a pass per pair per step).

A pair is marked trained only once a step that included it was taken; a step skipped for a
non-finite value sends its pairs back. With checkpoints on, "trained" is written only once a
checkpoint holds the step, so a crash in between trains those pairs again. A pair whose loss is
not finite, or an outlier (over ``outlier_factor`` times the recent mean), counts an attempt;
after ``max_attempts`` it is set aside, so noisy or adversarial feedback cannot take the adapter
over.

Nothing acknowledged is lost: pairs stay "pending" in the store until trained, and a restart
picks every pending pair up again (at least once).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
from collections import deque
from collections.abc import Callable

from engine.config import TrainingConfig
from engine.plan import NO_GRAD_COST, FinetuneChunk, FinetuneOffer, FinetuneResult, PreferencePair
from trainer.feedback import FeedbackPair, FeedbackStore
from trainer.staged import UnitCosts

log = logging.getLogger(__name__)


class Trainer:
    def __init__(
        self,
        store: FeedbackStore,
        tokenizer,
        config: TrainingConfig,
        eos_token_id: int | None,
        *,
        adapter_version: int = 0,
        checkpointing: bool = False,
        unit_costs: UnitCosts | None = None,
        max_attempts: int = 3,
        outlier_factor: float = 5.0,
        refill_batch: int = 256,
        task_ids=None,
    ) -> None:
        self.store = store
        self.tokenizer = tokenizer
        self.config = config
        self.eos_token_id = eos_token_id
        self.max_attempts = max_attempts
        self.outlier_factor = outlier_factor
        self.refill_batch = refill_batch
        self._needs_reference: deque[PreferencePair] = deque()
        self._ready: deque[PreferencePair] = deque()
        # ids loaded and not yet stored as trained: refill skips them. A pair stepped but not yet
        # checkpointed is still "pending" in the store, so it stays known until the store says
        # "trained" (else every refill in between would train it again); a pair set aside stays
        # known, as it stays in _set_aside, so that a refill racing its store write cannot reload it.
        self._known: set[str] = set()
        self._accumulated: list[PreferencePair] = []  # in the optimizer's gradients now
        # when the accumulation's first gradient chunk was handed out (max_step_delay_s), and the
        # clock as of the last offer (the scheduler's)
        self._accumulating_since: float | None = None
        self._now: float | None = None
        # Replicas (trainer/distributed.py): called with the accumulation's pair ids and the
        # result that hands its gradients over (instead of a step).
        self.gradient_sink: Callable[[list[str], FinetuneResult], None] | None = None
        # since when references run ahead of ready pairs for ranking: the last step, or the
        # first time a ready pair waited behind them
        self._look_ahead_since: float | None = None
        # A pair cut in two parts (FinetuneChunk): the pair, its next part, and that part's next
        # layer unit. With ``unit_costs`` (what a sequence's units cost, trainer/staged.py)
        # a part is cut further, at decoder layers, to fit the room.
        self._split: PreferencePair | None = None
        self._split_part = "chosen"
        self._split_unit = 0
        # A reference pass cut at decoder layers, part-way: the pair and its next unit.
        self._ref_pair: PreferencePair | None = None
        self._ref_unit = 0
        self._ref_estimate = False  # that pass runs the serving adapter too (the loss estimate)
        self.rank_window = config.rank_window
        self.unit_costs = unit_costs
        self._reset = False  # the next gradient chunk drops the gradients accumulated so far
        self.paused = False  # POST /v1/adapters/training: feedback is stored, nothing trains
        self._pair_losses: dict[str, float] = {}  # last DPO loss per pair (the scheduler's priority)
        self._in_flight: dict[int, FinetuneChunk] = {}
        self._task_ids = task_ids if task_ids is not None else itertools.count()
        self._recent_losses: deque[float] = deque(maxlen=64)
        self._attempts: dict[str, int] = {}  # bad tries per pair, this process
        self._set_aside: set[str] = set()
        # With checkpoints, pairs are marked trained when a checkpoint holds their step: the
        # pairs of each step taken, by adapter version, until a checkpoint of that version or a
        # newer one is on disk (the writer reports it from its thread: on_checkpoint_threadsafe).
        self.checkpointing = checkpointing
        self._unsaved: list[tuple[int, list[str]]] = []
        self._saved_version = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending_io: set[asyncio.Task] = set()
        self._on_new_work: Callable[[], None] = lambda: None  # the engine wakes its loop (start)
        self._offered_since: float | None = None  # when the work on offer became ready or last ran
        # The version of the adapter inference reads: the resumed checkpoint's, then each step's.
        self.adapter_version = adapter_version
        self.num_steps = 0
        self.num_skipped_steps = 0
        # pairs in the steps taken by this process (the store's "trained" count lags it until a
        # checkpoint holds the step)
        self.num_pairs_stepped = 0
        self.num_tokens = 0

    # -- feeding ----------------------------------------------------------------------------------

    async def start(self, on_new_work: Callable[[], None]) -> None:
        """On the event loop: ``on_new_work`` is called whenever work becomes ready (the engine
        wakes its scheduler); pairs stored before a restart are loaded now."""
        self._loop = asyncio.get_running_loop()
        self._on_new_work = on_new_work
        await self.refill()

    def on_checkpoint_threadsafe(self, version: int) -> None:
        """The checkpoint writer's report, from its own thread: ``on_checkpoint`` on the loop."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self.on_checkpoint, version)

    async def refill(self) -> int:
        """Load stored pairs not yet known (pending, oldest first); returns how many."""
        self._loop = asyncio.get_running_loop()
        pairs = await asyncio.to_thread(self.store.pending, self.refill_batch, tuple(self._known))
        # refills overlap (one per feedback post): one that started before this one's loads took
        # the same snapshot of _known, so a pair may come back twice
        pairs = [p for p in pairs if p.id not in self._known]
        for p in pairs:
            self._known.add(p.id)
            pair = self._tokenize(p)
            (self._ready if pair.ref_chosen is not None else self._needs_reference).append(pair)
        self._rank()
        if pairs:
            self._on_new_work()
        return len(pairs)

    def _tokenize(self, p: FeedbackPair) -> PreferencePair:
        enc = self.tokenizer.encode
        eos = [self.eos_token_id] if self.eos_token_id is not None else []
        # prompts as the server encodes them: a rendered chat as is, a plain prompt with the
        # tokenizer's special tokens (as /v1/completions); responses continue them, plus EOS
        return PreferencePair(p.id, enc(p.prompt, add_special_tokens=not p.is_chat),
                              enc(p.chosen, add_special_tokens=False) + eos,
                              enc(p.rejected, add_special_tokens=False) + eos,
                              p.ref_chosen, p.ref_rejected)

    @property
    def has_work(self) -> bool:
        return (bool(self._needs_reference or self._ready or self._split or self._ref_pair) and not self._in_flight
                and not self.paused)

    @property
    def is_idle(self) -> bool:
        """No chunk of this trainer is in an iteration."""
        return not self._in_flight

    @property
    def mean_recent_loss(self) -> float | None:
        return sum(self._recent_losses) / len(self._recent_losses) if self._recent_losses else None

    # -- the scheduler's side ---------------------------------------------------------------------

    def offer(self, now: float) -> FinetuneOffer | None:
        """What the next iteration may carry, as a value for the scheduler's policy (None: no
        work ready). ``now`` dates the wait: since the work became ready or a chunk last ran."""
        self._now = now
        smallest = self.next_pair_tokens() if not self.paused else None
        if smallest is None:
            self._offered_since = None
            return None
        if self._offered_since is None:
            self._offered_since = now
        loss = self.head_loss()
        return FinetuneOffer(smallest, self.next_whole_tokens(), loss if loss is not None else _LN2,
                             now - self._offered_since,
                             min_cost_factor=1.0 if self.next_unit_has_grad() else NO_GRAD_COST)

    def next_pair_tokens(self) -> int | None:
        """Tokens of the smallest chunk ``next_chunk`` can give, or None: the next part of a cut
        pair, a reference pass of one pair, or (a pair ready to train) its first part."""
        if not self.has_work:
            return None
        if self._split is not None:
            return self._part_chunk(0, max_tokens=0).num_tokens
        if self._ref_pair is not None:
            return self._reference_chunk(0, self._ref_pair, self._ref_unit, self._ref_estimate, max_tokens=0).num_tokens
        if self._reference_next():
            head = self._needs_reference[0]
            if self.unit_costs is None:
                return head.num_tokens * (2 if self._estimating() else 1)
            return self._reference_chunk(0, head, 0, self._estimating(), max_tokens=0).num_tokens
        head = self._ready[0]
        chosen = len(head.prompt_ids) + len(head.chosen_ids)
        if self.unit_costs is not None:  # the first layer unit of its chosen part
            weights = self.unit_costs.weights(len(head.prompt_ids), len(head.chosen_ids))
            chosen = max(1, math.ceil(chosen * weights[0] / sum(weights)))
        return min(head.num_tokens, chosen)

    def next_whole_tokens(self) -> int | None:
        """Tokens of the next chunk if nothing is cut: the rest of a cut pair's part in progress,
        else one whole pair (None: no work)."""
        if not self.has_work:
            return None
        if self._split is not None:
            return self._part_chunk(0).num_tokens
        if self._ref_pair is not None:
            return self._reference_chunk(0, self._ref_pair, self._ref_unit, self._ref_estimate).num_tokens
        if self._reference_next():
            return self._needs_reference[0].num_tokens * (2 if self._estimating() else 1)
        return self._ready[0].num_tokens

    def next_unit_has_grad(self) -> bool:
        """Whether the smallest chunk (``next_pair_tokens``) runs a backward."""
        return self._split is not None or (self._ref_pair is None and not self._reference_next())  # else a reference pass

    def _ranking(self) -> bool:
        """Whether pairs are ranked now: an adapter that has stepped gives losses worth comparing
        (an unmoved one gives every pair ln 2)."""
        return self.rank_window > 0 and self.adapter_version > 0

    def _reference_next(self) -> bool:
        """Whether the next pair's reference pass comes before training a ready pair: when none is
        ready, or (ranking) fewer than ``rank_window`` are and the look-ahead is not overdue."""
        if not self._needs_reference:
            return False
        if not self._ready:
            return True
        return self._ranking() and len(self._ready) < self.rank_window and not self._look_ahead_overdue()

    def _look_ahead_overdue(self) -> bool:
        """Whether references have run ahead for max_step_delay_s since the last step (or since a
        ready pair first waited behind them): the ready pairs train now. Under a load that leaves
        training a small share, filling the window can take minutes, and nothing would step
        meanwhile."""
        delay = self.config.max_step_delay_s
        if not delay or self._now is None:
            return False
        if self._look_ahead_since is None:
            self._look_ahead_since = self._now
        return self._now - self._look_ahead_since >= delay

    def _estimating(self) -> bool:
        """Whether the next reference pass estimates its pair's loss too: ranking, and another pair
        is waiting (else there is nothing to rank it against)."""
        return self._ranking() and len(self._needs_reference) + len(self._ready) > 1

    def estimated_loss(self, pair_id: str) -> float:
        """The pair's DPO loss as last estimated or trained; ln 2 when not known."""
        return self._pair_losses.get(pair_id, _LN2)

    def _rank(self) -> None:
        """Ready pairs by estimated loss, highest first (stable: FIFO among equals)."""
        if self.rank_window > 0 and len(self._ready) > 1:
            self._ready = deque(sorted(self._ready, key=lambda p: -self.estimated_loss(p.pair_id)))

    def head_loss(self) -> float | None:
        """The last DPO loss of the pair trained next, else the recent mean (None: no losses yet)."""
        pair = self._split or (self._ready[0] if self._ready else None)
        if pair is not None and pair.pair_id in self._pair_losses:
            return self._pair_losses[pair.pair_id]
        return self.mean_recent_loss

    def _part_chunk(self, task_id: int, max_tokens: int | None = None) -> FinetuneChunk:
        """The next piece of the part in progress: with layer cuts, as many of its units as
        ``max_tokens`` prices (at least one; None: all that remain), else the whole part."""
        pair, part = self._split, self._split_part
        chunk = FinetuneChunk(task_id, "gradient", [pair], part=part)
        if self.unit_costs is not None:
            response = pair.chosen_ids if part == "chosen" else pair.rejected_ids
            weights = self.unit_costs.weights(len(pair.prompt_ids), len(response))
            start = end = self._split_unit
            whole = (len(pair.prompt_ids) + len(response)) / sum(weights)  # priced tokens per weight
            if max_tokens is None:
                end = len(weights)
            else:
                end += 1
                while end < len(weights) and whole * sum(weights[start : end + 1]) <= max_tokens:
                    end += 1
            if (start, end) != (0, len(weights)):
                chunk.units, chunk.share = (start, end), sum(weights[start:end]) / sum(weights)
            if end < len(weights):
                return chunk  # the part goes on: no step yet
        if part == "rejected":
            is_last = not (self._ready or self._needs_reference)
            chunk.step = self._steps_now(is_last)
            chunk.checkpoint = chunk.step and is_last
        return chunk

    def _reference_chunk(self, task_id: int, pair: PreferencePair, start: int, estimate: bool,
                         max_tokens: int | None = None) -> FinetuneChunk:
        """A reference pass of ``pair`` cut at decoder layers (with ``estimate``, followed by the
        same pass under the serving adapter): its units from ``start``, as many as ``max_tokens``
        prices (at least one; None: all that remain)."""
        weights = self.unit_costs.forward_weights(pair.num_tokens) * (2 if estimate else 1)
        end = len(weights) if max_tokens is None else start + 1
        per_weight = pair.num_tokens * (2 if estimate else 1) / sum(weights)
        while max_tokens is not None and end < len(weights) and per_weight * sum(weights[start : end + 1]) <= max_tokens:
            end += 1
        return FinetuneChunk(task_id, "reference", [pair], units=(start, end),
                             share=sum(weights[start:end]) / sum(weights), estimate=estimate)

    def next_chunk(self, max_tokens: int) -> FinetuneChunk | None:
        """The next piece of fine-tune work, of at most ``max_tokens`` (at least one pair), or
        None. One chunk at a time: the next waits for this one's result."""
        if not self.has_work:
            return None
        if self._split is not None:
            chunk = self._part_chunk(next(self._task_ids), max_tokens)
        elif self._ref_pair is not None:
            chunk = self._reference_chunk(next(self._task_ids), self._ref_pair, self._ref_unit, self._ref_estimate, max_tokens)
        elif self._reference_next():
            estimate = self._estimating()
            scale = 2 if estimate else 1  # the estimate is a second pass as big
            if self.unit_costs is not None and self._needs_reference[0].num_tokens * scale > max_tokens:
                # too big: cut at layers
                self._ref_pair, self._ref_unit, self._ref_estimate = self._needs_reference.popleft(), 0, estimate
                chunk = self._reference_chunk(next(self._task_ids), self._ref_pair, 0, estimate, max_tokens)
            else:
                room = self.rank_window - len(self._ready) if self._ranking() else len(self._needs_reference)
                pairs = self._take(self._needs_reference, max_tokens // scale, max(1, room))
                chunk = FinetuneChunk(next(self._task_ids), "reference", pairs, estimate=estimate)
        elif self._ready[0].num_tokens > max_tokens:  # too big for the room: cut in two parts
            self._split, self._split_part, self._split_unit = self._ready.popleft(), "chosen", 0
            self._accumulated.append(self._split)
            chunk = self._part_chunk(next(self._task_ids), max_tokens)
        else:
            room = self.config.grad_accum - len(self._accumulated)
            pairs = self._take(self._ready, max_tokens, room)
            self._accumulated += pairs
            # step at a full accumulation, or when nothing else is waiting (do not sit on gradients)
            is_last = not (self._ready or self._needs_reference)
            step = self._steps_now(is_last)
            # running dry: checkpoint now, so the pairs are marked trained without waiting
            chunk = FinetuneChunk(next(self._task_ids), "gradient", pairs, step=step, checkpoint=step and is_last)
        if chunk.kind == "gradient" and self._reset:
            chunk.reset, self._reset = True, False
        if chunk.kind == "gradient" and self._accumulating_since is None:
            self._accumulating_since = self._now
        self._in_flight[chunk.task_id] = chunk
        self._offered_since = None  # the wait starts again when work is offered next
        return chunk

    def _steps_now(self, is_last: bool) -> bool:
        """Whether the pair completing now takes the step: a full accumulation, nothing else
        waiting (``is_last``), or an accumulation begun max_step_delay_s ago or more."""
        if len(self._accumulated) >= self.config.grad_accum or is_last:
            return True
        delay, since = self.config.max_step_delay_s, self._accumulating_since
        return bool(delay) and since is not None and self._now is not None and self._now - since >= delay

    @staticmethod
    def _take(queue: deque[PreferencePair], max_tokens: int, max_pairs: int) -> list[PreferencePair]:
        pairs = [queue.popleft()]
        used = pairs[0].num_tokens
        while queue and len(pairs) < max_pairs and used + queue[0].num_tokens <= max_tokens:
            used += queue[0].num_tokens
            pairs.append(queue.popleft())
        return pairs

    def on_result(self, result: FinetuneResult) -> None:
        chunk = self._in_flight.pop(result.task_id)
        self.num_tokens += result.num_tokens
        if result.kind == "reference":
            if chunk.units is not None:
                if chunk.units[1] < self.unit_costs.num_forward_units * (2 if chunk.estimate else 1):
                    self._ref_unit = chunk.units[1]  # the pass goes on from there
                    self._on_new_work()
                    return
                self._ref_pair = None
            for p in chunk.pairs:
                p.ref_chosen, p.ref_rejected = result.ref_logprobs[p.pair_id]
                self._io(self.store.set_reference, p.pair_id, p.ref_chosen, p.ref_rejected)
                if p.pair_id in result.policy_logprobs:
                    logp_c, logp_r = result.policy_logprobs[p.pair_id]
                    margin = self.config.dpo_beta * ((logp_c - p.ref_chosen) - (logp_r - p.ref_rejected))
                    self._pair_losses[p.pair_id] = _softplus(-margin)  # -log sigmoid(margin)
            self._ready.extend(chunk.pairs)
            self._rank()
            return
        if chunk.part is not None:
            if chunk.units is not None and chunk.units[1] < self.unit_costs.num_units:
                self._split_unit = chunk.units[1]  # the part goes on from there
            elif chunk.part == "rejected":
                self._split = None
            else:
                self._split_part, self._split_unit = "rejected", 0
        mean = self.mean_recent_loss
        for p in chunk.pairs:
            if p.pair_id not in result.losses:
                continue  # a part without the loss
            loss = result.losses[p.pair_id]
            self._pair_losses[p.pair_id] = loss
            if math.isfinite(loss):
                self._recent_losses.append(loss)
            if not math.isfinite(loss) or (mean is not None and loss > self.outlier_factor * max(mean, 1e-3)):
                self._attempts[p.pair_id] = self._attempts.get(p.pair_id, 0) + 1
                self._io(self.store.record_attempt, p.pair_id, loss)
                if self._attempts[p.pair_id] >= self.max_attempts:
                    log.warning("feedback pair %s set aside: loss %s after %d tries", p.pair_id, loss, self.max_attempts)
                    self._set_aside.add(p.pair_id)
                    self._io(self.store.set_aside, p.pair_id)
        if result.stepped is None:
            if self._split is not None:
                self._on_new_work()
            return
        accumulated, self._accumulated = self._accumulated, []
        self._accumulating_since = None
        self._look_ahead_since = self._now
        for p in accumulated:
            self._pair_losses.pop(p.pair_id, None)
        self.adapter_version = result.adapter_version
        kept = [p for p in accumulated if p.pair_id not in self._set_aside]
        if result.stepped:
            if self.gradient_sink is not None:
                self.gradient_sink([p.pair_id for p in kept], result)
            self.num_steps += 1
            self.num_pairs_stepped += len(kept)
            self._unsaved.append((result.adapter_version, [p.pair_id for p in kept]))
            # without checkpoints a step is final; with them the writer's report may have come first
            self.on_checkpoint(None if not self.checkpointing else self._saved_version)
        else:  # skipped: the pairs go round again (those set aside excepted)
            self.num_skipped_steps += 1
            self._ready.extendleft(reversed(kept))
            self._rank()
        if self._ready or self._needs_reference:
            self._on_new_work()

    def on_checkpoint(self, version: int | None = None) -> None:
        """A checkpoint of adapter ``version`` is on disk (None: every step taken is): the pairs
        of the steps up to it are trained for good. (Marked only now, so a crash between a step
        and its checkpoint retrains them.)"""
        if version is None:
            done, self._unsaved = self._unsaved, []
        else:
            self._saved_version = max(self._saved_version, version)
            done = [entry for entry in self._unsaved if entry[0] <= self._saved_version]
            self._unsaved = [entry for entry in self._unsaved if entry[0] > self._saved_version]
        ids = [pair_id for _, pair_ids in done for pair_id in pair_ids]
        if not ids:
            return
        # forgotten only once the store holds "trained": a refill in between must not reload them
        self._io(self.store.mark_trained, ids).add_done_callback(lambda _: self._known.difference_update(ids))

    def set_paused(self, paused: bool) -> None:
        self.paused = paused
        if not paused:
            self._on_new_work()

    def rollback(self, version: int) -> None:
        """The adapter went back to ``version`` and the executor dropped every gradient and
        pass in progress (``FinetuneExecutor.rollback``; nothing of this trainer in flight): the
        pairs accumulated go back to the queue, a reference pass cut at layers starts over.
        Pairs stepped into the versions left behind are not trained again."""
        assert not self._in_flight, "roll back between fine-tune chunks"
        if self._ref_pair is not None:
            self._needs_reference.appendleft(self._ref_pair)
            self._ref_pair, self._ref_unit = None, 0
        self.adapter_version = version
        self._requeue_accumulation()
        self._on_new_work()

    def drop_accumulation(self) -> None:
        """The weights changed under the accumulation (a replica adopting a rollback): its pairs
        train again from the new weights."""
        self._requeue_accumulation()
        self._on_new_work()

    def _requeue_accumulation(self) -> None:
        """The accumulated pairs back at the head of the queue; the next gradient chunk drops
        whatever gradients the executor holds."""
        self._ready.extendleft(reversed(self._accumulated))
        self._accumulated, self._split, self._reset = [], None, True
        self._accumulating_since = None
        self._rank()

    def on_failure(self, task_id: int) -> None:
        """The iteration carrying this chunk failed. A reference chunk's pairs go back; for a
        gradient chunk the whole accumulation does (the gradients may hold part of it), and the
        next gradient chunk drops the gradients."""
        chunk = self._in_flight.pop(task_id, None)
        if chunk is None:
            return
        if chunk.kind == "reference":
            if chunk.units is not None:  # a pass cut at layers starts over
                self._ref_unit = 0
            else:
                self._needs_reference.extendleft(reversed(chunk.pairs))
            return
        self._requeue_accumulation()

    def _io(self, fn, *args) -> asyncio.Task:
        """Store writes off the loop, in order of submission per call site."""
        task = asyncio.get_running_loop().create_task(asyncio.to_thread(fn, *args))
        self._pending_io.add(task)
        task.add_done_callback(self._pending_io.discard)
        return task

    async def flush(self) -> None:
        """Wait for the store writes in flight (``Training.flush`` waits for checkpoints first)."""
        while self._pending_io:
            await asyncio.gather(*list(self._pending_io), return_exceptions=True)


_LN2 = 0.6931471805599453  # the DPO loss of a pair the adapter has not moved yet


def _softplus(x: float) -> float:
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))
