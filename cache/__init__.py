"""The KV cache: the block pool with ref counts, the prefix trie that shares full blocks between
sequences, pruning policies that drop entries past a budget, and memory accounting."""

from cache.block_pool import BlockPool

__all__ = ["BlockPool"]
