"""`mace bench plan`: how long building one iteration's plan takes with 16, 256 and 1024 requests
queued (the scheduler's cost, which must stay off the critical path; the MACE paper reports about
15 ms). The real ``EngineCore`` with the mace policy (no fine-tune work); the runner is replaced by a
fixed cost per iteration (no model runs), so only planning is timed.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time

from bench.common import cpu_name, save_results


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--queued", default="16,256,1024", help="requests queued, comma-separated")
    p.add_argument("--iterations", type=int, default=400)
    p.add_argument("--out", default="bench-results/plan.json")


def _one(queued: int, iterations: int, tokenizer, model_dir: str) -> dict:
    from engine.config import EngineConfig
    from engine.plan import IterationResult, SequenceResult
    from engine.sampling_params import SamplingParams
    from scheduler.core import EngineCore

    config = EngineConfig.build(model_dir, policy="mace", max_num_batched_tokens=256, max_num_seqs=32,
                                max_model_len=2048, vocab_size=8192)
    core = EngineCore(config, tokenizer, frozenset(), num_blocks=32 * 128 + 1024)  # no trainer: inference only
    rng = random.Random(0)
    params = SamplingParams(max_tokens=10_000 // 8, temperature=0.0, ignore_eos=True)
    from scheduler.request import RequestOptions

    for i in range(queued):  # one in ten with its own priority: the planner scans those whole
        options = RequestOptions(priority=rng.randint(1, 3)) if i % 10 == 0 else None
        core.add_request(f"r{i}", [rng.randrange(8000) for _ in range(rng.randint(32, 512))], params, options)
    times = []
    for _ in range(iterations):
        t0 = time.perf_counter()
        plan = core.schedule()
        times.append(time.perf_counter() - t0)
        outputs = [SequenceResult(c.seq_id, token_id=7 if c.sampling is not None else None) for c in plan.chunks]
        core.process_result(IterationResult(plan.iteration, outputs, plan.num_tokens, total_s=0.03))
    times.sort()
    return {"queued": queued, "iterations": iterations, "median_ms": round(1e3 * statistics.median(times), 4),
            "p99_ms": round(1e3 * times[int(0.99 * (len(times) - 1))], 4),
            "running": len(core.queues.running), "waiting": len(core.queues.waiting)}


def main(args: argparse.Namespace) -> dict:
    from transformers import AutoTokenizer

    from server.cli import _default_model

    model_dir = str(_default_model())  # only its tokenizer is used
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = [_one(int(q), args.iterations, tokenizer, model_dir) for q in args.queued.split(",")]
    report = {"command": "mace " + " ".join(sys.argv[1:]), "processor": cpu_name(), "rows": rows}
    lines = [f"Planning time per iteration (EngineCore.schedule, mace policy, 32 running at most, "
             f"one queued request in ten with its own priority); "
             f"{report['processor']}. Command: `{report['command']}`.", "",
             "| queued requests | median | p99 |", "|---:|---:|---:|"]
    lines += [f"| {r['queued']} | {r['median_ms']:.3f} ms | {r['p99_ms']:.3f} ms |" for r in rows]
    save_results(args.out, report, "\n".join(lines))
    print("\n".join(lines))
    return report
