"""`mace bench engine`: engine-level throughput and latency against transformers' own paths.

Everything runs in one process, one after another, on the same model and the same workload:

1. mixed: N requests (prompts 32-1024 tokens, outputs 16-256, random token ids, seeded), all
   arriving at t=0. Systems: this engine (AsyncEngine, worker thread, no HTTP), transformers'
   continuous batching (``init_continuous_batching``), and static batches of ``model.generate``.
   Output lengths are forced (EOS off everywhere) so every system does the same work.
2. decode: B sequences all in decode (prompt 512): this engine's decode tokens/s against a bare
   loop of the same model's forwards with a DynamicCache: the cost of scheduling and bookkeeping.

Prints a table and writes JSON. No timing assert anywhere: the machine is shared and noisy, so
compare ratios from one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from engine.config import EngineConfig
from engine.sampling_params import SamplingParams
from scheduler.async_engine import AsyncEngine
from scheduler.builder import build_engine
from bench.common import cpu_name, save_results


@dataclass
class Workload:
    prompts: list[list[int]]
    output_lens: list[int]

    @property
    def num_prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    @property
    def num_output_tokens(self) -> int:
        return sum(self.output_lens)


def mixed_workload(num_requests: int, seed: int, vocab_size: int, prompt_range=(32, 1024), output_range=(16, 256)) -> Workload:
    rng = random.Random(seed)
    prompts = [
        [rng.randrange(3, vocab_size) for _ in range(rng.randint(*prompt_range))] for _ in range(num_requests)
    ]
    return Workload(prompts, [rng.randint(*output_range) for _ in range(num_requests)])


@dataclass
class RunStats:
    system: str
    wall_s: float
    num_output_tokens: int
    ttft_s: list[float] = field(default_factory=list)
    tpot_s: list[float] = field(default_factory=list)
    note: str = ""

    def summary(self) -> dict:
        def pct(values, q):
            return float(np.percentile(values, q)) if values else None

        return {
            "system": self.system,
            "wall_s": round(self.wall_s, 2),
            "output_tokens": self.num_output_tokens,
            "output_tok_s": round(self.num_output_tokens / self.wall_s, 2),
            "tpot_p50_ms": round(pct(self.tpot_s, 50) * 1e3, 1),
            "tpot_p99_ms": round(pct(self.tpot_s, 99) * 1e3, 1),
            "ttft_p50_s": round(pct(self.ttft_s, 50), 2),
            "ttft_p99_s": round(pct(self.ttft_s, 99), 2),
            "note": self.note,
        }


def _latencies(start: float, token_times: list[list[float]]) -> tuple[list[float], list[float]]:
    ttft = [t[0] - start for t in token_times]
    tpot = [(t[-1] - t[0]) / (len(t) - 1) for t in token_times if len(t) > 1]
    return ttft, tpot


# -- this engine -------------------------------------------------------------------------------


def run_mace(args, workload: Workload, budget: int | None = None) -> RunStats:
    config = EngineConfig.build(
        args.model,
        max_num_batched_tokens=budget or args.max_num_batched_tokens,
        max_num_seqs=args.max_num_seqs,
        kv_cache_bytes=args.kv_cache_bytes,
        decode_attention=args.decode_attention,
        device=args.device,
        dtype=args.dtype,
    )
    sched = config.scheduler

    async def main() -> RunStats:
        engine = AsyncEngine(*build_engine(config))
        await engine.start()
        try:
            await _consume(engine, [3, 4, 5, 6], SamplingParams(max_tokens=2, temperature=0.0))  # warm-up
            start = time.perf_counter()
            times = await asyncio.gather(
                *(
                    _consume(engine, p, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
                    for p, n in zip(workload.prompts, workload.output_lens)
                )
            )
            wall = time.perf_counter() - start
            busy = engine.worker_busy_s
            iterations = engine.num_iterations
        finally:
            await engine.stop()
        ttft, tpot = _latencies(start, times)
        note = (
            f"budget {sched.max_num_batched_tokens} tokens/iteration, {sched.max_num_seqs} seqs, "
            f"block 16, decode attention {config.model.decode_attention}; {iterations} iterations, "
            f"worker busy {busy / wall:.0%} of the wall time"
        )
        return RunStats(f"mace@{sched.max_num_batched_tokens}", wall, sum(len(t) for t in times), ttft, tpot, note)

    return asyncio.run(main())


async def _consume(engine: AsyncEngine, prompt: list[int], params: SamplingParams) -> list[float]:
    times = []
    async for out in engine.generate(prompt, params):
        now = time.perf_counter()
        times.extend([now] * len(out.new_token_ids))
    return times


# -- transformers peers ------------------------------------------------------------------------


def _torch_dtype(args) -> torch.dtype:
    """The dtype every system runs in: --dtype, else the engine's default (fp32 on CPU, bf16 on CUDA)."""
    if args.dtype:
        return getattr(torch, args.dtype)
    return torch.bfloat16 if args.device.startswith("cuda") else torch.float32


def _load_hf(args):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(args.model, local_files_only=True, attn_implementation="sdpa",
                                                 dtype=_torch_dtype(args))
    return model.to(args.device).eval()


def _sync(args) -> None:
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()


def run_hf_continuous(args, workload: Workload) -> RunStats:
    """transformers' continuous batching, configured like ours: same token budget and batch
    size, and a cache that holds the whole workload."""
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    model = _load_hf(args)
    page = 256
    num_pages = sum(-(-(len(p) + n) // page) for p, n in zip(workload.prompts, workload.output_lens))
    cb_config = ContinuousBatchingConfig(
        page_size=page,
        num_blocks=num_pages,
        max_batch_tokens=args.max_num_batched_tokens,
        max_requests_per_batch=args.max_num_seqs,
    )
    gen_config = GenerationConfig(do_sample=False, max_new_tokens=max(workload.output_lens))
    manager = model.init_continuous_batching(generation_config=gen_config, continuous_batching_config=cb_config)
    manager.start()
    try:
        _hf_collect(manager, {manager.add_request([3, 4, 5, 6], max_new_tokens=2, eos_token_id=-1)})  # warm-up
        start = time.perf_counter()
        ids = {
            manager.add_request(p, request_id=f"r{i}", max_new_tokens=n, record_timestamps=True, eos_token_id=-1)
            for i, (p, n) in enumerate(zip(workload.prompts, workload.output_lens))
        }
        results = _hf_collect(manager, ids)
        wall = time.perf_counter() - start
    finally:
        manager.stop(block=True, timeout=30)
    times = [r.timestamps for r in results.values()]
    ttft, tpot = _latencies(start, times)
    note = f"page {page}, {num_pages} pages, max_batch_tokens {args.max_num_batched_tokens}"
    return RunStats("transformers-cb", wall, sum(len(r.generated_tokens) for r in results.values()), ttft, tpot, note)


def _hf_collect(manager, ids: set[str]) -> dict:
    # get_result(request_id=...) re-queues other results and spins; take every result and match.
    results = {}
    while len(results) < len(ids):
        out = manager.get_result(timeout=1)
        if out is None:
            if not manager.is_running():
                raise RuntimeError("transformers' continuous batching thread stopped")
            continue
        if out.request_id in ids and out.is_finished():
            results[out.request_id] = out
    return results


class _StepTimer:
    """A generate() streamer that records when each step's tokens come out."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def run_static(args, workload: Workload) -> RunStats:
    """Static batches of ``model.generate`` in arrival order, left-padded, each batch running to
    its longest output; only the requested tokens count."""
    model = _load_hf(args)
    pad = model.generation_config.pad_token_id or 0
    bsz = args.static_batch_size
    with torch.inference_mode():
        model.generate(torch.tensor([[3, 4, 5]], device=args.device), max_new_tokens=2, do_sample=False)  # warm-up
        start = time.perf_counter()
        token_times = []
        for b in range(0, len(workload.prompts), bsz):
            prompts = workload.prompts[b : b + bsz]
            lens = workload.output_lens[b : b + bsz]
            width = max(len(p) for p in prompts)
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=args.device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=args.device)
            timer = _StepTimer()
            model.generate(
                ids, attention_mask=mask, max_new_tokens=max(lens), min_new_tokens=max(lens),
                do_sample=False, streamer=timer, pad_token_id=pad,
            )
            steps = timer.times[1:]  # the first put() is the prompt
            token_times.extend(steps[:n] for n in lens)
        wall = time.perf_counter() - start
    ttft, tpot = _latencies(start, token_times)
    return RunStats("static-generate", wall, workload.num_output_tokens, ttft, tpot, f"batches of {bsz}")


# -- decode overhead ---------------------------------------------------------------------------


def run_decode_overhead(args) -> dict:
    """Decode tokens/s at a fixed batch: this engine (inline steps, only all-decode iterations
    timed) against a bare loop of forwards with a DynamicCache."""
    from transformers import DynamicCache

    batch, prompt_len, steps = args.decode_batch, 512, args.decode_steps
    rng = random.Random(args.seed + 1)
    prompts = [[rng.randrange(3, 8000) for _ in range(prompt_len)] for _ in range(batch)]

    config = EngineConfig.build(
        args.model, max_num_batched_tokens=1024, max_num_seqs=batch,
        kv_cache_bytes=args.kv_cache_bytes, decode_attention=args.decode_attention,
        device=args.device, dtype=args.dtype,
    )
    core, runner = build_engine(config)
    for i, p in enumerate(prompts):
        core.add_request(f"d{i}", p, SamplingParams(max_tokens=steps + 1, temperature=0.0, ignore_eos=True))
    decode_s, decode_tokens = 0.0, 0
    while core.has_work:
        t0 = time.perf_counter()
        plan = core.schedule()
        outs = core.process_result(runner.execute(plan))
        if all(c.num_tokens == 1 for c in plan.chunks) and len(plan.chunks) == batch:
            decode_s += time.perf_counter() - t0
            decode_tokens += sum(len(o.new_token_ids) for o in outs)
    del core, runner

    model = _load_hf(args)
    with torch.inference_mode():
        ids = torch.tensor(prompts, device=args.device)
        cache = DynamicCache(config=model.config)
        out = model(ids, cache=cache, use_cache=True, logits_to_keep=1)
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        _sync(args)
        t0 = time.perf_counter()
        for _ in range(steps):
            out = model(tok, cache=cache, use_cache=True)
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
        _sync(args)
        bare_s = time.perf_counter() - t0
    engine_tok_s = decode_tokens / decode_s
    bare_tok_s = batch * steps / bare_s
    return {
        "batch": batch,
        "prompt_len": prompt_len,
        "steps": steps,
        "engine_tok_s": round(engine_tok_s, 1),
        "bare_loop_tok_s": round(bare_tok_s, 1),
        "ratio": round(engine_tok_s / bare_tok_s, 3),
    }


# -- driver ------------------------------------------------------------------------------------

SYSTEMS = {"mace": run_mace, "transformers-cb": run_hf_continuous, "static-generate": run_static}


def run_system(spec: str, args, workload: Workload) -> RunStats:
    """``spec`` is a system name; ``mace@N`` runs this engine with a budget of N tokens/iteration."""
    name, _, budget = spec.partition("@")
    if name == "mace":
        return run_mace(args, workload, int(budget) if budget else None)
    return SYSTEMS[name](args, workload)


def pool(runs: list[RunStats]) -> RunStats:
    """One system's rounds as one run: summed wall time and tokens, latency samples together."""
    first = runs[0]
    return RunStats(
        first.system,
        sum(r.wall_s for r in runs),
        sum(r.num_output_tokens for r in runs),
        [x for r in runs for x in r.ttft_s],
        [x for r in runs for x in r.tpot_s],
        first.note + (f"; {len(runs)} rounds pooled" if len(runs) > 1 else ""),
    )


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="local checkpoint directory (benchmarks use the base demo model)")
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--systems",
        default="mace@32,mace@64,transformers-cb,static-generate",
        help="comma-separated, from " + ",".join(SYSTEMS) + "; mace@N sets this engine's tokens/iteration",
    )
    p.add_argument("--rounds", type=int, default=2, help="round-robin repeats, pooled: the machine's speed drifts")
    p.add_argument("--max-num-batched-tokens", type=int, default=64)
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument("--kv-cache-bytes", type=int, default=1 << 30)
    p.add_argument("--decode-attention", choices=["auto", "sdpa"], default="auto")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="every system's dtype (default: fp32 on CPU, bf16 on CUDA)")
    p.add_argument("--static-batch-size", type=int, default=8)
    p.add_argument("--decode-batch", type=int, default=32)
    p.add_argument("--decode-steps", type=int, default=32)
    p.add_argument("--skip-decode", action="store_true")
    p.add_argument("--out", default="bench-results/engine.json")


def main(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(args.model, local_files_only=True).vocab_size
    workload = mixed_workload(args.num_requests, args.seed, vocab)
    print(
        f"mixed workload: {args.num_requests} requests, {workload.num_prompt_tokens} prompt tokens, "
        f"{workload.num_output_tokens} output tokens; torch threads {torch.get_num_threads()}",
        flush=True,
    )
    specs = args.systems.split(",")
    runs: dict[str, list[RunStats]] = {spec: [] for spec in specs}
    for round_ in range(args.rounds):
        for spec in specs:
            runs[spec].append(run_system(spec, args, workload))
            print(f"round {round_ + 1}: " + json.dumps(runs[spec][-1].summary()), flush=True)
    rows = [pool(r).summary() for r in runs.values()]
    base = max((r for r in rows if r["system"].startswith("mace")), key=lambda r: r["output_tok_s"], default=None)
    if base:
        for r in rows:
            r["best_mace_throughput_ratio"] = round(base["output_tok_s"] / r["output_tok_s"], 2)
    decode = None if args.skip_decode else run_decode_overhead(args)
    report = {
        "command": "mace " + " ".join(sys.argv[1:]),
        "machine": {
            "platform": platform.platform(),
            "processor": cpu_name(),
            "cpus": torch.get_num_threads(),
            "torch": torch.__version__,
            "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
            "dtype": str(_torch_dtype(args)).removeprefix("torch."),
        },
        "workload": {"requests": args.num_requests, "prompt_tokens": workload.num_prompt_tokens, "output_tokens": workload.num_output_tokens},
        "mixed": rows,
        "decode": decode,
    }
    _print_table(report)
    save_results(args.out, report, markdown_table(report))
    return report



def markdown_table(report: dict) -> str:
    w = report["workload"]
    lines = [
        f"Workload: {w['requests']} requests, {w['prompt_tokens']} prompt and {w['output_tokens']} output tokens, "
        f"all at t=0; {report['machine'].get('processor', 'cpu')}, {report['machine']['cpus']} threads, "
        f"torch {report['machine']['torch']}. Command: `{report['command']}`.",
        "",
        "| system | output tok/s | best mace / this | TPOT p50 | TPOT p99 | TTFT p50 | TTFT p99 |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["mixed"]:
        lines.append(
            f"| {r['system']} | {r['output_tok_s']:.1f} | {r.get('best_mace_throughput_ratio', '-')} | "
            f"{r['tpot_p50_ms']:.0f} ms | {r['tpot_p99_ms']:.0f} ms | {r['ttft_p50_s']:.1f} s | {r['ttft_p99_s']:.1f} s |"
        )
    d = report["decode"]
    if d:
        lines += [
            "",
            f"Decode batch {d['batch']} (prompt {d['prompt_len']}, {d['steps']} steps): engine {d['engine_tok_s']} tok/s, "
            f"bare forward loop with DynamicCache {d['bare_loop_tok_s']} tok/s, ratio {d['ratio']}.",
        ]
    return "\n".join(lines) + "\n"


def _print_table(report: dict) -> None:
    print("\nbest/x: the best mace row's output tokens/s over this row's")
    print(f"{'system':<18}{'out tok/s':>10}{'best/x':>8}{'TPOT p50':>10}{'TPOT p99':>10}{'TTFT p50':>10}{'TTFT p99':>10}")
    for r in report["mixed"]:
        ratio = r.get("best_mace_throughput_ratio")
        print(
            f"{r['system']:<18}{r['output_tok_s']:>10.1f}{(f'{ratio:.2f}' if ratio else '-'):>8}"
            f"{r['tpot_p50_ms']:>8.0f}ms{r['tpot_p99_ms']:>8.0f}ms{r['ttft_p50_s']:>9.1f}s{r['ttft_p99_s']:>9.1f}s"
        )
    d = report["decode"]
    if d:
        print(
            f"\ndecode batch {d['batch']} (prompt {d['prompt_len']}): engine {d['engine_tok_s']} tok/s, "
            f"bare forward loop {d['bare_loop_tok_s']} tok/s, ratio {d['ratio']}"
        )
