"""`mace bench train`: DPO pairs trained per second alone and while serving a steady chat load,
and that load's TPOT with and without training, in one run on one loaded model.

Three runs, each a fresh engine (and fresh LoRA adapters) over the same weights:
1. train alone: ``--pairs`` stored pairs, no requests; wall time from the first chunk to the
   last pair marked trained (reference log-probs, gradient chunks, steps).
2. train + serve: the same pairs while chat requests arrive by a seeded Poisson process
   (``--rate``, ``--output-len`` tokens each, greedy); pairs/s as in 1, and the requests' TPOT.
3. serve alone: the same arrivals without training: the TPOT baseline.
Training under load runs twice: ``synchronous`` puts a chunk of up to ``--finetune-tokens``
tokens in every iteration while pairs wait, blind to latency; ``mace`` gives fine-tune work only
the slack the cost model predicts under ``--slo-tbt-ms`` (plus one pair every 50 iterations, so
training never starves). Engine-level (no HTTP); prints a table, writes JSON and Markdown.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import DEFAULT_MODEL, cpu_name, resolve_model, save_results


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help=f"local checkpoint (default: {DEFAULT_MODEL}, built if missing)")
    p.add_argument("--pairs", type=int, default=32)
    p.add_argument("--requests", type=int, default=24)
    p.add_argument("--rate", type=float, default=1.0, help="chat requests per second (Poisson)")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=48)
    p.add_argument("--finetune-tokens", type=int, default=256, help="fine-tune tokens per iteration")
    p.add_argument("--grad-accum", type=int, default=4)
    p.add_argument("--slo-tbt-ms", type=float, default=50.0, help="the TBT SLO the mace policy protects")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench-results/train.json")


def _pairs(rng: random.Random) -> list[tuple[str, str, str]]:
    words = ["parse", "file", "value", "return", "list", "string", "object", "error", "module", "default"]
    out = []
    for i in range(64):
        prompt = f"Question {i}: how do I {rng.choice(words)} a {rng.choice(words)} in Python? Answer:"
        out.append((prompt, " " + " ".join(rng.choice(words) for _ in range(12)),
                    " " + " ".join(rng.choice(words) for _ in range(8))))
    return out


async def _run(build, args, texts, arrivals, prompts, train: bool) -> dict:
    from engine.config import TrainingConfig
    from engine.sampling_params import SamplingParams
    from scheduler.async_engine import AsyncEngine
    from trainer.feedback import FeedbackStore, NewPair

    store = None
    if train:
        store = FeedbackStore(Path(tempfile.mkdtemp()) / "f.sqlite3")
        store.add([NewPair(*texts[i % len(texts)], id=f"p{i}") for i in range(args.pairs)])
    core, runner = build(TrainingConfig(grad_accum=args.grad_accum) if train else None, store)
    engine = AsyncEngine(core, runner)
    await engine.start()  # training loads the stored pairs
    params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
    tpots: list[float] = []

    async def one(prompt: list[int], at: float) -> None:
        await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
        times = []
        async for out in engine.generate(prompt, params):
            if out.new_token_ids:
                times.append(time.perf_counter())
        tpots.append((times[-1] - times[0]) / (len(times) - 1))

    start = time.perf_counter()
    trained_s = None
    try:
        tasks = [asyncio.create_task(one(p, a)) for p, a in zip(prompts, arrivals)]
        if train:
            while True:  # bounded by the work: every pair gets trained once
                await core.training.flush()
                if store.stats()["trained"] >= args.pairs:
                    trained_s = time.perf_counter() - start
                    break
                await asyncio.sleep(0.05)
        await asyncio.gather(*tasks)
    finally:
        await engine.stop()
        if store is not None:
            store.close()
    row = {"pairs_per_s": round(args.pairs / trained_s, 2) if trained_s else None,
           "train_wall_s": round(trained_s, 1) if trained_s else None, "requests": len(tpots)}
    if tpots:
        row |= {"tpot_p50_ms": round(1e3 * float(np.percentile(tpots, 50)), 1),
                "tpot_p99_ms": round(1e3 * float(np.percentile(tpots, 99)), 1)}
    if train:
        row["steps"] = core.trainer.num_steps
    return row


def main(args: argparse.Namespace) -> dict:
    import torch

    from engine.config import EngineConfig
    from engine.model_loader import load_model
    from scheduler.builder import build_from_model

    args.model = resolve_model(args.model)
    rng = random.Random(args.seed)
    texts = _pairs(rng)
    config = EngineConfig.build(args.model, kv_cache_bytes=512 << 20, max_num_seqs=32,
                                finetune_tokens_per_iteration=args.finetune_tokens, slo_tbt_ms=args.slo_tbt_ms)
    vocab = None
    rows = {}
    started = time.perf_counter()
    runs = (("train alone", True, False, "synchronous"), ("train + serve, synchronous", True, True, "synchronous"),
            ("train + serve, mace", True, True, "mace"), ("serve alone", False, True, "synchronous"))
    for name, with_train, with_load, policy in runs:
        model, tokenizer = load_model(args.model, torch.device("cpu"))  # fresh weights: adapters go on per run
        vocab = model.config.vocab_size
        prompts = [[rng.randrange(vocab) for _ in range(args.prompt_len)] for _ in range(args.requests)] if with_load else []
        gaps = np.random.default_rng(args.seed).exponential(1 / args.rate, len(prompts))
        arrivals = list(np.cumsum(gaps)) if with_load else []
        def build(training, store, model=model, tokenizer=tokenizer, policy=policy):
            return build_from_model(model, tokenizer, config.replace(policy=policy), training, store)

        rows[name] = asyncio.run(_run(build, args, texts, arrivals, prompts, with_train))
        print(f"{name}: {rows[name]}", flush=True)
    report = {
        "command": "mace " + " ".join(sys.argv[1:]),
        "machine": {"processor": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__},
        "model": args.model,
        "config": {k: v for k, v in vars(args).items() if k not in ("func", "out", "bench", "bench_module")},
        "rows": rows,
        "run_s": round(time.perf_counter() - started, 1),
    }
    lines = [f"Model `{args.model}`; {args.pairs} DPO pairs (grad accum {args.grad_accum}, up to {args.finetune_tokens} "
             f"fine-tune tokens per iteration; mace protects a TBT SLO of {args.slo_tbt_ms:g} ms); chat load {args.requests} requests at {args.rate}/s, prompt "
             f"{args.prompt_len}, output {args.output_len} tokens; {report['machine']['processor']}, "
             f"{report['machine']['threads']} threads; {report['run_s']:.0f} s. Command: `{report['command']}`.", "",
             "| run | DPO pairs/s | TPOT p50 | TPOT p99 |", "|---|---:|---:|---:|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['pairs_per_s'] or '-'} | {r.get('tpot_p50_ms', '-')} ms | {r.get('tpot_p99_ms', '-')} ms |")
    save_results(args.out, report, "\n".join(lines))
    print("\n".join(lines))
    return report
