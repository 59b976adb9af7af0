"""First-come-first-served planner with chunked prefill (the MACE scheduler replaces it).

Each iteration has a token budget. Running sequences go first, oldest first: a decode costs one
token, an unfinished prefill takes what is left of the budget (chunked prefill) or must fit
whole (chunked prefill off). Then waiting sequences are admitted in arrival order while budget,
sequence slots and blocks last; the first one that does not fit stops admission, so nobody
overtakes the head of the queue. When a running sequence needs a block and none is free, the
newest running sequence is preempted (its blocks freed, recomputed later).

Prefix caching: a sequence being admitted first takes the longest cached prefix of its tokens
(whole blocks, never all of its tokens: the last one must be computed to sample); those tokens
count as computed. Once a block of a running sequence is full and computed, it is offered to
the cache, so a request arriving later, or this one after a preemption, can reuse it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from cache.block_pool import BlockPool
from cache.pruning import PruningPolicy
from engine.plan import KvPrune
from scheduler.request import Sequence, SequenceStatus


@dataclass(slots=True)
class ScheduledSequence:
    seq: Sequence
    num_new_tokens: int


class FcfsScheduler:
    def __init__(
        self,
        pool: BlockPool,
        max_num_batched_tokens: int,
        max_num_seqs: int,
        enable_chunked_prefill: bool = True,
        pruning: PruningPolicy | None = None,
    ) -> None:
        self.pool = pool
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.enable_chunked_prefill = enable_chunked_prefill
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order
        self.num_preemptions = 0
        self.num_prefix_query_tokens = 0  # tokens of admitted sequences looked up in the cache
        self.num_prefix_hit_tokens = 0  # of which found there (not recomputed)
        self.pruning = pruning
        self.num_pruned_tokens = 0  # KV entries dropped by pruning, all sequences
        self._prunes: dict[int, KvPrune] = {}  # this iteration's, by seq_id

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def finish(self, seq: Sequence) -> None:
        """Take a sequence out (finished or aborted) and return its blocks to the pool."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self._release(seq)
        seq.status = SequenceStatus.FINISHED

    def _release(self, seq: Sequence) -> None:
        if seq.block_table:
            self.pool.free(seq.block_table)
            seq.block_table = []
        seq.num_computed_tokens = seq.num_pruned_tokens = 0
        seq.prefix_node, seq.num_prefix_blocks = None, 0
        self._prunes.pop(seq.seq_id, None)  # its blocks are gone: nothing to compact

    # -- prefix cache ----------------------------------------------------------------------------

    def _cacheable_blocks(self, seq: Sequence) -> int:
        """Leading blocks of ``seq`` a cache lookup may cover: whole blocks, leaving at least one
        token to compute. Prompt scoring needs logits at every prompt position: none."""
        if self.pool.trie is None or seq.params.prompt_logprobs is not None:
            return 0
        return (seq.num_tokens - 1) // self.pool.block_size

    def num_cached_prefix_tokens(self, seq: Sequence) -> int:
        """How many of a waiting sequence's tokens the cache would spare it (changes nothing)."""
        max_blocks = self._cacheable_blocks(seq)
        if max_blocks == 0:
            return 0
        return len(self.pool.trie.match(seq.token_ids(0, max_blocks * self.pool.block_size), max_blocks)) * self.pool.block_size

    def _take_cached_prefix(self, seq: Sequence) -> None:
        """Start a fresh sequence from the longest cached prefix of its tokens."""
        if self.pool.trie is None:
            return
        max_blocks = self._cacheable_blocks(seq)
        path = self.pool.match_prefix(seq.token_ids(0, max_blocks * self.pool.block_size), max_blocks) if max_blocks else []
        blocks = [node.block for node in path]
        self.pool.share(blocks)
        seq.block_table = blocks
        seq.num_computed_tokens = seq.num_cached_tokens = len(blocks) * self.pool.block_size
        seq.prefix_node = path[-1] if path else self.pool.trie.root
        seq.num_prefix_blocks = len(blocks)

    def cache_computed_blocks(self, seq: Sequence) -> None:
        """Offer ``seq``'s newly full, computed blocks to the prefix cache."""
        if seq.prefix_node is None:
            return
        bs = self.pool.block_size
        num_full = seq.num_computed_tokens // bs
        if self.pruning is not None:  # a pruned sequence's later blocks are not the plain prefix
            num_full = min(num_full, seq.num_prompt_tokens // bs)
        if num_full > seq.num_prefix_blocks:
            start = seq.num_prefix_blocks
            tokens = seq.token_ids(start * bs, num_full * bs)
            seq.prefix_node = self.pool.cache_full_blocks(seq.prefix_node, tokens, seq.block_table, start, num_full)
            seq.num_prefix_blocks = num_full

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    # -- pruning ---------------------------------------------------------------------------------

    def _prune(self, seq: Sequence) -> None:
        """Before a decode: drop KV entries past the budget, freeing the blocks they leave."""
        private_start = seq.num_prefix_blocks * self.pool.block_size if self.pool.trie is not None else 0
        kv_len = seq.num_kv_tokens
        decision = self.pruning.decide(kv_len, seq.num_tokens, private_start)
        if decision is None:
            return
        self._prunes[seq.seq_id] = KvPrune(
            seq.seq_id, list(seq.block_table), kv_len, private_start,
            decision.num_keep, decision.num_sinks, decision.num_recent, self.pruning.policy,
        )
        new_len = private_start + decision.num_keep
        num_blocks = self.pool.blocks_for_tokens(new_len)
        self.pool.free(seq.block_table[num_blocks:])
        del seq.block_table[num_blocks:]
        seq.num_pruned_tokens += kv_len - new_len
        self.num_pruned_tokens += kv_len - new_len

    def take_prunes(self) -> list[KvPrune]:
        """This iteration's compactions, for the plan (the runner runs them before the forward)."""
        prunes = list(self._prunes.values())
        self._prunes.clear()
        return prunes

    def _grow(self, seq: Sequence, num_new: int) -> bool:
        """Give ``seq`` the blocks to hold ``num_new`` more tokens; False if the pool is short."""
        need = self.pool.blocks_for_tokens(seq.num_kv_tokens + num_new) - len(seq.block_table)
        if need <= 0:
            return True
        blocks = self.pool.allocate(need)
        if blocks is None:
            return False
        seq.block_table.extend(blocks)
        return True

    def _chunk_size(self, seq: Sequence, budget: int, is_first: bool) -> int:
        remaining = seq.num_tokens - seq.num_computed_tokens
        if remaining <= budget:
            return remaining
        # Too big for what is left: a chunk if allowed, else only alone in the iteration.
        if self.enable_chunked_prefill:
            return budget
        return remaining if is_first else 0

    def schedule(self) -> list[ScheduledSequence]:
        budget = self.max_num_batched_tokens
        scheduled: list[ScheduledSequence] = []
        preempted = False

        # 1. Running sequences, oldest first.
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_new = self._chunk_size(seq, budget, not scheduled)
            if num_new == 0:
                i += 1
                continue
            if self.pruning is not None and num_new == 1 and seq.num_output_tokens > 0:
                self._prune(seq)
            while not self._grow(seq, num_new):
                victim = self.running[-1]
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                break  # seq preempted itself: nothing newer is left to schedule
            scheduled.append(ScheduledSequence(seq, num_new))
            budget -= num_new
            i += 1

        # 2. Waiting sequences, in arrival order; none while memory is short.
        while self.waiting and budget > 0 and not preempted and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            self._take_cached_prefix(seq)
            num_new = self._chunk_size(seq, budget, not scheduled)
            if num_new == 0 or not self._grow(seq, num_new):
                self._release(seq)  # cached blocks go back to the cache
                break
            self.num_prefix_query_tokens += seq.num_tokens
            self.num_prefix_hit_tokens += seq.num_cached_tokens
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            scheduled.append(ScheduledSequence(seq, num_new))
            budget -= num_new
        return scheduled
