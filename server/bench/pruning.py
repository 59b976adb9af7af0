"""The pruning part of `mace bench cache`: KV memory per sequence and quality against the full
cache, for each policy at each budget.

Method (teacher forcing, so every setting predicts along the same text):
1. The full cache generates the reference: ``--pruning-seqs`` sequences of ``--pruning-prompt``
   random prompt tokens and ``--pruning-gen`` greedy output tokens, all in one batch, recording
   the next-token logits at every step.
2. Each policy and budget runs the same batch, but after every iteration the sampled token is
   replaced by the reference's (the plan/result seam makes that a one-line edit), so the
   context is always the reference text; its logits are recorded too.
3. Per step: top-1 agreement (argmax equal to the full cache's) and KL(full || pruned) of the
   next-token distributions; KV blocks each sequence holds, sampled every iteration.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import time

import torch

from engine.config import EngineConfig
from engine.sampling_params import SamplingParams
from scheduler.builder import build_from_model

SETTINGS = [("window", 0.5), ("heavy-hitter", 0.5), ("window", 0.25), ("heavy-hitter", 0.25)]


def add_pruning_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pruning-seqs", type=int, default=4, help="sequences per pruning run")
    parser.add_argument("--pruning-prompt", type=int, default=64, help="prompt tokens per sequence")
    parser.add_argument("--pruning-gen", type=int, default=576, help="generated tokens per sequence (512+)")


def _run(model, tokenizer, config: EngineConfig, prompts: list[list[int]], gen: int,
         forced: list[list[int]] | None) -> dict:
    """One batch to the end; per sequence, the logits at every step and the blocks held."""
    core, runner = build_from_model(model, tokenizer, config)
    runner.capture_logits = True
    params = SamplingParams(max_tokens=gen, temperature=0.0, ignore_eos=True)
    seqs = [core.add_request(f"p{i}", p, params) for i, p in enumerate(prompts)]
    index = {s.seq_id: i for i, s in enumerate(seqs)}
    logits: list[list[torch.Tensor]] = [[] for _ in prompts]
    blocks: list[list[int]] = [[] for _ in prompts]
    t0 = time.perf_counter()
    while core.has_work:
        plan = core.schedule()
        result = runner.execute(plan)
        for out in result.outputs:
            if out.token_id is None:
                continue
            i = index[out.seq_id]
            logits[i].append(runner.last_logits[out.seq_id])
            if forced is not None:  # teacher forcing: continue along the reference text
                out.token_id = forced[i][len(logits[i]) - 1]
        core.process_result(result)
        for s in seqs:
            if not s.is_finished:
                blocks[index[s.seq_id]].append(len(s.block_table))
    return {
        "logits": [torch.stack(x) for x in logits],  # per sequence (gen, vocab)
        "tokens": [list(s.output_token_ids) for s in seqs],
        "blocks": blocks,
        "num_pruned_tokens": core.scheduler.num_pruned_tokens,
        "wall_s": time.perf_counter() - t0,
    }


def run_pruning(model, tokenizer, base: EngineConfig, args: argparse.Namespace, block_bytes: int) -> dict:
    rng = random.Random(args.seed)
    vocab = model.config.vocab_size
    prompts = [[rng.randrange(vocab) for _ in range(args.pruning_prompt)] for _ in range(args.pruning_seqs)]
    gen = args.pruning_gen
    base = dataclasses.replace(base, enable_prefix_caching=False, kv_prune="none")
    full = _run(model, tokenizer, base, prompts, gen, None)
    ref_tokens = full["tokens"]
    rows = [_summary("full", None, full, full, block_bytes)]
    for policy, budget in SETTINGS:
        config = dataclasses.replace(base, kv_prune=policy, kv_budget=budget)
        run = _run(model, tokenizer, config, prompts, gen, ref_tokens)
        rows.append(_summary(policy, budget, run, full, block_bytes))
        print(f"  pruning {policy}@{budget}: {rows[-1]}", flush=True)
    return {
        "method": "teacher-forced along the full cache's greedy text; agreement = argmax equal; KL(full || pruned)",
        "num_seqs": args.pruning_seqs,
        "prompt_tokens": args.pruning_prompt,
        "generated_tokens": gen,
        "rows": rows,
    }


def _summary(policy: str, budget: float | None, run: dict, full: dict, block_bytes: int) -> dict:
    agree, kls = [], []
    for got, ref in zip(run["logits"], full["logits"]):
        agree.append((got.argmax(-1) == ref.argmax(-1)).float())
        p_log = torch.log_softmax(ref, -1)
        q_log = torch.log_softmax(got, -1)
        kls.append((p_log.exp() * (p_log - q_log)).sum(-1))
    agree_t, kl_t = torch.cat(agree), torch.cat(kls)
    mean_blocks = sum(sum(b) / len(b) for b in run["blocks"]) / len(run["blocks"])
    peak_blocks = max(max(b) for b in run["blocks"])
    full_mean = sum(sum(b) / len(b) for b in full["blocks"]) / len(full["blocks"])
    full_peak = max(max(b) for b in full["blocks"])
    return {
        "policy": policy,
        "budget": budget,
        "kv_mib_per_seq_mean": round(mean_blocks * block_bytes / 2**20, 2),
        "kv_mib_per_seq_peak": round(peak_blocks * block_bytes / 2**20, 2),
        "memory_vs_full_mean": round(mean_blocks / full_mean, 3),
        "memory_vs_full_peak": round(peak_blocks / full_peak, 3),
        "top1_agreement": round(agree_t.mean().item(), 4),
        "mean_kl": round(kl_t.mean().item(), 5),
        "num_pruned_tokens": run["num_pruned_tokens"],
        "wall_s": round(run["wall_s"], 1),
    }
