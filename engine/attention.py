"""Paged attention, plugged into transformers through ``AttentionInterface``.

The model runs one forward per iteration over a packed batch of shape (1, T): the decode tokens
of many sequences first, then prefill chunks. The attention function receives the packed
queries and the new keys and values (after RoPE), writes K/V into the block pool at each token's
slot, and attends over each sequence's block table.

Pool layout per layer: ``(num_blocks, block_size, num_kv_heads, head_dim)`` for K and for V, the
layout flash-attn's paged kernels read. On CPU (and on CUDA without flash-attn) we gather the
keys a sequence needs by slot (a flat index over ``num_blocks * block_size`` rows: measured
2-3x faster on CPU than gathering whole blocks) and call torch SDPA.

Called without ``mace_meta`` (training, reference log-probs, ``model.generate``), the function is
plain SDPA, so one model object serves both paths.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from engine.cpu_kernels import paged_decode_attention, prefill_attention

# A fresh chunk up to this many tokens takes the C causal attention (engine/csrc/prefill_attention.c):
# 12 heads of 64, 4 KV heads, 2 threads: 1.23 vs 1.68 ms at 256 tokens, 4.76 vs 6.45 at 512, 9.45
# vs 10.60 at 768 against torch's SDPA; at 1024 the two are even (18.3 vs 18.8), past it SDPA's
# blocking of the keys skips more of the masked half.
PREFILL_KERNEL_MAX_TOKENS = 768

ATTENTION_NAME = "mace_paged"


@dataclass(slots=True)
class PrefillSpan:
    """A multi-token chunk of one sequence inside the packed batch."""

    start: int  # first row in the packed batch
    length: int  # number of query tokens
    # (context + length,) slots of every key the chunk sees; None when the chunk starts at
    # position 0 and can attend over its own fresh K/V with a plain causal mask.
    key_slots: torch.Tensor | None = None
    # (length, context + length) bool: key j visible to query i (causal, offset by the context);
    # for a chunk at position 0 only when heavy-hitter scores are collected (else SDPA is_causal).
    mask: torch.Tensor | None = None


@dataclass(slots=True)
class PagedAttentionMetadata:
    """Built once per iteration by the runner, shared by every layer."""

    # Per layer (K, V), each (num_blocks, block_size, num_kv_heads, head_dim).
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]]
    # (T,) flat slot (block * block_size + offset) each packed token writes to.
    slot_mapping: torch.Tensor
    # Rows [0, num_decode_tokens) are single-token chunks, batched together.
    num_decode_tokens: int = 0
    # The C kernels (engine.cpu_kernels) where they serve (fp32 CPU): the decode attention reads
    # the pool in place through the block tables and lengths below (otherwise the SDPA path's
    # slots and mask), and a fresh prefill chunk's causal attention.
    kernels: Any = None
    # (num_decode_tokens, max_blocks) int64 block ids and (num_decode_tokens,) int64 key counts.
    decode_block_tables: torch.Tensor | None = None
    decode_lens: torch.Tensor | None = None
    # (num_decode_tokens * max_len,) slots of each decode's keys, padded with slot 0.
    decode_key_slots: torch.Tensor | None = None
    decode_max_len: int = 0
    # (num_decode_tokens, 1, 1, max_len) bool: which keys are real; None when no padding.
    decode_mask: torch.Tensor | None = None
    # Heavy-hitter pruning: (num_layers, num_decode_tokens, >= max_len) fp32; each layer adds
    # each decode key's attention probability (summed over heads) to its own row, in the same
    # pass. None: off.
    decode_scores: torch.Tensor | None = None
    # (num_decode_tokens * nb * bs,) the slot of each ``decode_scores`` entry (runner's use).
    decode_score_slots: torch.Tensor | None = None
    # Heavy-hitter pruning: the runner's (num_layers, num_blocks * block_size) fp32 scores; each
    # prefill chunk adds the attention every key receives from the chunk's queries (summed over
    # queries and heads), as H2O counts the prompt. None: off.
    prefill_scores: torch.Tensor | None = None
    prefills: list[PrefillSpan] = field(default_factory=list)
    # Scratch for gathered keys and values, (rows >= any gather, Hkv, D) each, reused by every
    # layer: a fresh multi-MB tensor per gather costs page faults that measured 3-5x the copy.
    k_scratch: torch.Tensor | None = None
    v_scratch: torch.Tensor | None = None


def paged_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    meta: PagedAttentionMetadata | None = kwargs.get("mace_meta")
    if meta is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    _, num_heads, num_tokens, head_dim = query.shape  # (1, H, T, D)
    num_kv_heads = key.shape[1]
    group = num_heads // num_kv_heads
    k_cache, v_cache = meta.kv_caches[module.layer_idx]
    k_slots = k_cache.view(-1, num_kv_heads, head_dim)  # (num_blocks * block_size, Hkv, D)
    v_slots = v_cache.view(-1, num_kv_heads, head_dim)

    # 1. Write this iteration's K/V into the pool.
    k_slots.index_copy_(0, meta.slot_mapping, key[0].transpose(0, 1))  # (T, Hkv, D)
    v_slots.index_copy_(0, meta.slot_mapping, value[0].transpose(0, 1))

    q = query[0]  # (H, T, D)
    out = query.new_empty(num_tokens, num_heads, head_dim)

    # 2. Decodes: one query per sequence. Fold the GQA group into the query-length axis so
    # that K/V are never repeated: (Bd, Hkv, G, D) against (Bd, Hkv, L, D).
    num_decodes = meta.num_decode_tokens
    if num_decodes and meta.kernels is not None:
        out[:num_decodes] = paged_decode_attention(
            meta.kernels, q[:, :num_decodes].transpose(0, 1), k_cache, v_cache,
            meta.decode_block_tables, meta.decode_lens, scaling or head_dim**-0.5,
            meta.decode_scores[module.layer_idx] if meta.decode_scores is not None else None,
        )  # (Bd, H, D)
    elif num_decodes:
        length = meta.decode_max_len
        qd = q[:, :num_decodes].transpose(0, 1).reshape(num_decodes, num_kv_heads, group, head_dim)
        kd = _gather(k_slots, meta.decode_key_slots, meta.k_scratch).view(num_decodes, length, num_kv_heads, head_dim)
        vd = _gather(v_slots, meta.decode_key_slots, meta.v_scratch).view(num_decodes, length, num_kv_heads, head_dim)
        if meta.decode_scores is None:
            od = F.scaled_dot_product_attention(
                qd, kd.transpose(1, 2), vd.transpose(1, 2), attn_mask=meta.decode_mask, scale=scaling
            )  # (Bd, Hkv, G, D)
        else:  # the probabilities are needed too: the same attention, spelled out
            att = qd @ kd.permute(0, 2, 3, 1) * (scaling or head_dim**-0.5)  # (Bd, Hkv, G, L)
            if meta.decode_mask is not None:
                att = att.masked_fill(~meta.decode_mask, float("-inf"))
            probs = att.float().softmax(-1)
            meta.decode_scores[module.layer_idx, :, :length] += probs.sum((1, 2))
            od = probs.to(vd.dtype) @ vd.transpose(1, 2)  # (Bd, Hkv, G, D)
        out[:num_decodes] = od.reshape(num_decodes, num_heads, head_dim)

    # 3. Prefill chunks, one SDPA call each.
    for span in meta.prefills:
        rows = slice(span.start, span.start + span.length)
        qp = q[None, :, rows]  # (1, H, c, D)
        if meta.prefill_scores is not None:
            if span.key_slots is None:  # the chunk's own fresh keys
                kp, vp, key_slots = key[0, :, rows], value[0, :, rows], meta.slot_mapping[rows]
            else:
                kp = _gather(k_slots, span.key_slots, meta.k_scratch).transpose(0, 1)  # (Hkv, L, D)
                vp = _gather(v_slots, span.key_slots, meta.v_scratch).transpose(0, 1)
                key_slots = span.key_slots
            op, received = _attention_with_column_sums(qp[0], kp, vp, span.mask, scaling or head_dim**-0.5)
            meta.prefill_scores[module.layer_idx].index_add_(0, key_slots, received)
            out[rows] = op.transpose(0, 1)  # (c, H, D)
            continue
        if span.key_slots is None:
            kp, vp = key[:, :, rows], value[:, :, rows]  # (1, Hkv, c, D)
            kernel = meta.kernels if span.length <= PREFILL_KERNEL_MAX_TOKENS else None
            if (kernel is not None and not torch.is_grad_enabled()
                    and prefill_attention(kernel, qp[0], kp[0], vp[0], out[rows], scaling or head_dim**-0.5)):
                continue
            op = F.scaled_dot_product_attention(
                qp, kp, vp, is_causal=True, scale=scaling, enable_gqa=group > 1
            )
        else:
            kp = _gather(k_slots, span.key_slots, meta.k_scratch).transpose(0, 1)  # (Hkv, L, D)
            vp = _gather(v_slots, span.key_slots, meta.v_scratch).transpose(0, 1)
            op = F.scaled_dot_product_attention(
                qp, kp[None], vp[None], attn_mask=span.mask, scale=scaling, enable_gqa=group > 1
            )
        out[rows] = op[0].transpose(0, 1)  # (c, H, D)
    return out.unsqueeze(0), None  # (1, T, H, D)


def _attention_with_column_sums(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked attention of q (H, c, D) over k, v (Hkv, L, D), spelled out so the probabilities
    are at hand: the output (H, c, D) and each key's probability summed over queries and heads,
    (L,) fp32. The GQA group folds into the query axis, so K/V are never repeated."""
    num_heads, c, head_dim = q.shape
    num_kv_heads = k.shape[0]
    group = num_heads // num_kv_heads
    qg = q.reshape(num_kv_heads, group * c, head_dim)  # heads h = kv * group + g
    att = qg @ k.transpose(1, 2) * scale  # (Hkv, G * c, L)
    att = att.masked_fill(~mask.repeat(group, 1), float("-inf"))
    probs = att.float().softmax(-1)
    out = (probs.to(v.dtype) @ v).view(num_heads, c, head_dim)
    return out, probs.sum((0, 1))


def _gather(slots: torch.Tensor, index: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """Rows ``index`` of ``slots`` (N, Hkv, D), copied into the front of ``scratch``."""
    return torch.index_select(slots, 0, index, out=scratch[: index.numel()])


def register_paged_attention() -> None:
    """Make ``attn_implementation="mace_paged"`` known to transformers (idempotent).

    The mask function is SDPA's: the unpaged path needs a real causal mask, and the paged path
    passes an already-4D placeholder mask, which transformers hands through untouched.
    """
    AttentionInterface.register(ATTENTION_NAME, paged_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
