"""Sizing the KV pool: bytes per block, and the memory there is to spend on it."""

from __future__ import annotations

import torch


def kv_bytes_per_block(
    num_layers: int, num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype
) -> int:
    """Bytes one block takes across all layers: a K and a V slab per layer."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * num_layers * block_size * num_kv_heads * head_dim * itemsize


def available_memory_bytes(device: torch.device) -> int:
    """Memory free for the pool right now: the CUDA allocator's free bytes, or on CPU the
    kernel's MemAvailable estimate."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("cannot read MemAvailable from /proc/meminfo")
