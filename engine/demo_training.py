"""Pre-train a demo model briefly on the text shipped in the repo (language modelling, AdamW).

Random weights are right for speed benchmarks, but their next-token distribution is nearly
flat, so anything that measures prediction quality (pruning's top-1 agreement, preference
learning) needs a model that has learnt something. A few hundred steps over the shipped corpus
(CPython docstrings) give peaked, context-dependent predictions; no download is involved.
"""

from __future__ import annotations

import logging
import math
import time
from importlib import resources
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

log = logging.getLogger(__name__)


def train_demo_model(model_dir: str | Path, steps: int, seq_len: int = 128, batch_size: int = 8,
                     lr: float = 2e-3, seed: int = 0) -> list[float]:
    """Train the checkpoint in ``model_dir`` in place for ``steps`` steps of ``batch_size``
    random windows of ``seq_len`` tokens; returns the loss of every step."""
    model_dir = Path(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, attn_implementation="sdpa")
    text = resources.files("engine").joinpath("data/corpus.txt").read_text(encoding="utf-8")
    ids = torch.tensor(tokenizer.encode(text, add_special_tokens=False), dtype=torch.long)  # (N,)
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    model.train()
    losses = []
    t0 = time.perf_counter()
    for step in range(steps):
        starts = torch.randint(0, len(ids) - seq_len - 1, (batch_size,), generator=gen)
        batch = torch.stack([ids[s : s + seq_len] for s in starts])  # (B, T)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 10 == 0 or step == steps - 1:
            log.info("demo-model training: step %d/%d, loss %.3f, %.0f s", step + 1, steps, losses[-1],
                     time.perf_counter() - t0)
    model.eval()
    model.save_pretrained(model_dir)
    return losses
