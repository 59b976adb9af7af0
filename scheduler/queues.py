"""The engine's sequences, waiting and running, and the KV blocks they hold.

Every policy plans over one ``SequenceQueues``: it admits waiting sequences (``take_cached_prefix``
first, then ``grow``), grows running ones, ``preempt``s when the pool is short, ``prune``s KV
past a budget before a decode, and ``finish``es them. The queues keep the counters the metrics
read (preemptions, prefix-cache queries and hits, pruned tokens).

Prefix caching: a sequence being admitted first takes the longest cached prefix of its tokens
(whole blocks, never all of its tokens: the last one must be computed to sample); those tokens
count as computed. Once a block of a running sequence is full and computed, it is offered to
the cache (``cache_computed_blocks``), so a request arriving later, or this one after a
preemption, can reuse it.

Preemption is by recomputation: the sequence's blocks are freed (cached full blocks stay in the
prefix cache) and it goes back to the head of the queue.
"""

from __future__ import annotations

from collections import deque

from cache.block_pool import BlockPool
from cache.pruning import PruningPolicy
from engine.lora import BASE
from engine.plan import KvPrune
from scheduler.request import Sequence, SequenceStatus


class SequenceQueues:
    def __init__(self, pool: BlockPool, pruning: PruningPolicy | None = None, max_loras: int | None = None) -> None:
        self.pool = pool
        # distinct LoRA adapters (the base model not counted) among the running sequences
        self.max_loras = max_loras
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
        self.release(seq)
        seq.status = SequenceStatus.FINISHED

    def release(self, seq: Sequence) -> None:
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
        tokens = seq.token_ids(0, max_blocks * self.pool.block_size)
        return len(self.pool.trie.match(tokens, max_blocks, seq.options.cache_namespace)) * self.pool.block_size

    def take_cached_prefix(self, seq: Sequence) -> None:
        """Start a fresh sequence from the longest cached prefix of its tokens."""
        if self.pool.trie is None:
            return
        max_blocks = self._cacheable_blocks(seq)
        namespace = seq.options.cache_namespace
        tokens = seq.token_ids(0, max_blocks * self.pool.block_size)
        path = self.pool.match_prefix(tokens, max_blocks, namespace) if max_blocks else []
        blocks = [node.block for node in path]
        self.pool.share(blocks)
        seq.block_table = blocks
        seq.num_computed_tokens = seq.num_cached_tokens = len(blocks) * self.pool.block_size
        seq.prefix_node = path[-1] if path else self.pool.trie.root_of(namespace)
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

    def adapter_fits(self, seq: Sequence) -> bool:
        """Whether admitting ``seq`` keeps the running sequences within ``max_loras`` distinct
        adapters (a sequence on an adapter already running always fits; so does the base model)."""
        adapter = seq.options.adapter
        if self.max_loras is None or adapter == BASE:
            return True
        running = {s.options.adapter for s in self.running}
        running.discard(BASE)
        return adapter in running or len(running) < self.max_loras

    def admit(self, seq: Sequence) -> None:
        """A waiting sequence that now holds the blocks for its first chunk starts running."""
        self.num_prefix_query_tokens += seq.num_tokens
        self.num_prefix_hit_tokens += seq.num_cached_tokens
        self.waiting.remove(seq)
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)

    def preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.release(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    # -- pruning ---------------------------------------------------------------------------------

    def prune(self, seq: Sequence) -> None:
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

    def grow(self, seq: Sequence, num_new: int) -> bool:
        """Give ``seq`` the blocks to hold ``num_new`` more tokens; False if the pool is short."""
        need = self.pool.blocks_for_tokens(seq.num_kv_tokens + num_new) - len(seq.block_table)
        if need <= 0:
            return True
        blocks = self.pool.allocate(need)
        if blocks is None:
            return False
        seq.block_table.extend(blocks)
        return True

    def check_integrity(self) -> None:
        """Block conservation and ref counts against the live sequences' block tables."""
        self.pool.check_integrity([s.block_table for s in self.running] + [s.block_table for s in self.waiting])
        for s in self.waiting:
            assert s.status is SequenceStatus.WAITING and not s.block_table
