"""Loading a local Hugging Face checkpoint for serving. Never a hub download."""

from __future__ import annotations

import logging
import os

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from engine import host_memory
from engine.attention import ATTENTION_NAME, register_paged_attention

log = logging.getLogger(__name__)

# Architectures whose attention goes through transformers' AttentionInterface with the
# (query, key, value) layout the paged attention expects.
SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral", "qwen3")


def default_dtype(device: torch.device) -> torch.dtype:
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def load_model(
    path: str, device: torch.device, dtype: torch.dtype | None = None
) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """Load model and tokenizer from a local directory, with the paged attention selected."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--model must be a local checkpoint directory; {path!r} is not one")
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"model type {config.model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    register_paged_attention()
    model = AutoModelForCausalLM.from_pretrained(
        path,
        local_files_only=True,
        dtype=dtype or default_dtype(device),
        attn_implementation=ATTENTION_NAME,
    )
    model.to(device).eval()
    if device.type == "cpu":
        moved = host_memory.move_weights(model)
        log.info("weights: %.0f MiB copied out of the checkpoint's file mapping into anonymous memory", moved / 2**20)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model, tokenizer


def max_context_len(config) -> int:
    """The longest sequence the engine serves. A sliding-window model (Mistral) is capped at its
    window, since the paged attention attends over the whole context."""
    limit = config.max_position_embeddings
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True):
        limit = min(limit, window)
    return limit


def eos_token_ids(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    ids: set[int] = set()
    gen = getattr(model, "generation_config", None)
    for value in (getattr(gen, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(value)
    return frozenset(ids)
