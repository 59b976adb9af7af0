"""The pruning part of `mace bench cache`: KV memory per sequence and quality against the full
cache, for each policy at each budget.

Method (teacher forcing, so every setting predicts along the same text):
1. The text: ``--pruning-seqs`` windows of the corpus shipped in the repo (CPython docstrings,
   seeded offsets), each ``--pruning-prompt`` prompt tokens then ``--pruning-gen`` tokens fed
   one decode at a time (``--pruning-text greedy`` uses the full cache's own greedy output
   instead; a weak model's greedy text repeats itself, which hides what pruning loses).
2. The full cache and each policy at each budget run the same batch; after every iteration the
   sampled token is replaced by the text's next token (the plan/result seam makes that a
   one-line edit), recording the next-token logits at every step.
3. Per step: top-1 agreement (argmax equal to the full cache's) and KL(full || pruned) of the
   next-token distributions; KV blocks each sequence holds, sampled every iteration.
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from engine.config import EngineConfig
from engine.sampling_params import SamplingParams
from scheduler.builder import build_from_model

SETTINGS = [("window", 0.5), ("heavy-hitter", 0.5), ("window", 0.25), ("heavy-hitter", 0.25)]


TRAINED_MODEL = "models/demo-base-trained"  # the base demo model after TRAIN_STEPS steps on the corpus
TRAIN_STEPS = 150


def add_pruning_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pruning-model", default=None,
                        help=f"checkpoint for the quality measurement (default: {TRAINED_MODEL}, built and "
                             f"trained for {TRAIN_STEPS} steps if missing: random weights predict nearly flat "
                             "distributions, where top-1 agreement is noise)")
    parser.add_argument("--pruning-seqs", type=int, default=4, help="sequences per pruning run")
    parser.add_argument("--pruning-prompt", type=int, default=64, help="prompt tokens per sequence")
    parser.add_argument("--pruning-gen", type=int, default=576, help="decoded tokens per sequence (512+)")
    parser.add_argument("--pruning-text", choices=["corpus", "greedy"], default="corpus",
                        help="what the sequences are forced along: corpus windows, or the full cache's greedy output")


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
        "num_pruned_tokens": core.queues.num_pruned_tokens,
        "wall_s": time.perf_counter() - t0,
    }


def run_part(args: argparse.Namespace, ctx: dict) -> dict:
    """The ``pruning`` entry of the cache report."""
    from pathlib import Path

    from cache.memory import kv_bytes_per_block
    from engine.model_loader import load_model

    path = args.pruning_model
    if path is None:
        path = TRAINED_MODEL
        if not (Path(path) / "config.json").exists():
            from engine.demo_model import build_demo_model
            from engine.demo_training import train_demo_model

            print(f"building {path}: the base demo model trained for {TRAIN_STEPS} steps (a few minutes)", flush=True)
            train_demo_model(build_demo_model(path, "base"), TRAIN_STEPS)
    model, tokenizer = load_model(path, torch.device("cpu"))
    ctx = {**ctx, "model": model, "tokenizer": tokenizer,
           "config": ctx["config"].replace(path=path)}
    m = model.config
    head_dim = getattr(m, "head_dim", None) or m.hidden_size // m.num_attention_heads
    block_bytes = kv_bytes_per_block(m.num_hidden_layers, m.num_key_value_heads, head_dim, ctx["block_size"],
                                     next(model.parameters()).dtype)
    part = run_pruning(model, ctx["tokenizer"], ctx["config"], args, block_bytes)
    part["model"] = path
    return part


def cells(part: dict) -> tuple[list[str], list[list[str]], str]:
    header = ["policy", "budget", "KV MiB/seq mean", "KV MiB/seq peak", "memory vs full (mean)",
              "memory vs full (peak)", "top-1 agreement", "mean KL", "target"]
    rows = []
    for r in part["rows"]:
        target = "-"
        if r["budget"] == 0.5 and r["policy"] == "heavy-hitter":
            met = r["memory_vs_full_mean"] <= 0.55 and r["top1_agreement"] >= 0.95
            target = "met" if met else "NOT met"
        rows.append([r["policy"], "full" if r["budget"] is None else f"{r['budget']:g}",
                     f"{r['kv_mib_per_seq_mean']:.2f}", f"{r['kv_mib_per_seq_peak']:.2f}",
                     f"{r['memory_vs_full_mean']:.3f}", f"{r['memory_vs_full_peak']:.3f}",
                     f"{r['top1_agreement']:.3f}", f"{r['mean_kl']:.4f}", target])
    note = (f"Model `{part['model']}`; {part['num_seqs']} sequences of {part['prompt_tokens']} prompt + {part['generated_tokens']} decoded tokens, "
            f"one batch; {part['method']}. Full-cache top-1 probability: mean {part['full_top1_prob']:.4f} "
            f"(1/vocab = {part['uniform_prob']:.5f}); target (heavy-hitter at 0.5): memory about halved "
            "(mean <= 0.55 of full) and top-1 agreement >= 0.95.")
    return header, rows, note


def run_pruning(model, tokenizer, base: EngineConfig, args: argparse.Namespace, block_bytes: int) -> dict:
    rng = random.Random(args.seed)
    vocab = model.config.vocab_size
    gen = args.pruning_gen
    if args.pruning_text == "corpus":
        from importlib import resources

        text = resources.files("engine").joinpath("data/corpus.txt").read_text(encoding="utf-8")
        ids = tokenizer.encode(text, add_special_tokens=False)
        span = args.pruning_prompt + gen
        windows = [ids[s : s + span] for s in (rng.randrange(len(ids) - span) for _ in range(args.pruning_seqs))]
        prompts, forced = [w[: args.pruning_prompt] for w in windows], [w[args.pruning_prompt :] for w in windows]
    else:
        prompts = [[rng.randrange(vocab) for _ in range(args.pruning_prompt)] for _ in range(args.pruning_seqs)]
        forced = None
    base = base.replace(enable_prefix_caching=False, kv_prune="none")
    full = _run(model, tokenizer, base, prompts, gen, forced)
    ref_tokens = full["tokens"]
    rows = [_summary("full", None, full, full, block_bytes)]
    for policy, budget in SETTINGS:
        config = base.replace(kv_prune=policy, kv_budget=budget)
        run = _run(model, tokenizer, config, prompts, gen, ref_tokens)
        rows.append(_summary(policy, budget, run, full, block_bytes))
        print(f"  pruning {policy}@{budget}: {rows[-1]}", flush=True)
    probs = torch.cat([torch.softmax(x, -1).max(-1).values for x in full["logits"]])
    what = "windows of the shipped corpus" if args.pruning_text == "corpus" else "the full cache's greedy text"
    return {
        "method": f"teacher-forced along {what}; agreement = argmax equal; KL(full || pruned)",
        "full_top1_prob": round(probs.mean().item(), 5),
        "uniform_prob": round(1 / vocab, 6),
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
