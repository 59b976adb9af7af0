"""First-come-first-served planning with chunked prefill: the inference part of the
inference-only, synchronous and periodic policies.

Each iteration has a token budget. Running sequences go first, oldest first: a decode costs one
token, an unfinished prefill takes what is left of the budget (chunked prefill) or must fit
whole (chunked prefill off). Then waiting sequences are admitted in arrival order while budget,
sequence slots and blocks last; the first one that does not fit stops admission, so nobody
overtakes the head of the queue. When a running sequence needs a block and none is free, the
newest running sequence is preempted (its blocks freed, recomputed later).
"""

from __future__ import annotations

from scheduler.policy import ScheduledSequence
from scheduler.queues import SequenceQueues
from scheduler.request import Sequence, SequenceStatus


def _chunk_size(seq: Sequence, budget: int, is_first: bool, enable_chunked_prefill: bool) -> int:
    remaining = seq.num_tokens - seq.num_computed_tokens
    if remaining <= budget:
        return remaining
    # Too big for what is left: a chunk if allowed, else only alone in the iteration.
    if enable_chunked_prefill:
        return budget
    return remaining if is_first else 0


def plan_fcfs(queues: SequenceQueues, max_num_batched_tokens: int, max_num_seqs: int,
              enable_chunked_prefill: bool = True) -> list[ScheduledSequence]:
    """The next iteration's inference work, first come first served."""
    budget = max_num_batched_tokens
    scheduled: list[ScheduledSequence] = []
    preempted = False

    # 1. Running sequences, oldest first.
    running = queues.running
    i = 0
    while i < len(running) and budget > 0:
        seq = running[i]
        num_new = _chunk_size(seq, budget, not scheduled, enable_chunked_prefill)
        if num_new == 0:
            i += 1
            continue
        if queues.pruning is not None and num_new == 1 and seq.num_output_tokens > 0:
            queues.prune(seq)
        while not queues.grow(seq, num_new):
            victim = running[-1]
            queues.preempt(victim)
            preempted = True
            if victim is seq:
                break
        if seq.status is not SequenceStatus.RUNNING:
            break  # seq preempted itself: nothing newer is left to schedule
        scheduled.append(ScheduledSequence(seq, num_new))
        budget -= num_new
        i += 1

    # 2. Waiting sequences, in arrival order; none while memory is short.
    while queues.waiting and budget > 0 and not preempted and len(running) < max_num_seqs:
        seq = queues.waiting[0]
        if not queues.adapter_fits(seq):
            break  # its adapter waits for a running one to finish
        queues.take_cached_prefix(seq)
        num_new = _chunk_size(seq, budget, not scheduled, enable_chunked_prefill)
        if num_new == 0 or not queues.grow(seq, num_new):
            queues.release(seq)  # cached blocks go back to the cache
            break
        queues.admit(seq)
        scheduled.append(ScheduledSequence(seq, num_new))
        budget -= num_new
    return scheduled
