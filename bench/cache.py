"""`mace bench cache`: what the KV cache's memory features buy, measured on one loaded model.

Parts (``--parts``), each a function that adds one key to the same JSON report:

- prefix: prefix sharing on vs off. Two chat workloads of token ids (random ids, seeded): K
  distinct "system prompts" (lengths 0.8-1.2x their mean, not block-aligned, as real ones are),
  each shared by N/K requests, plus a unique "user" part per request, with lengths chosen so
  that shared tokens / all prompt tokens is 0.36 (the ratio MACE reports) and 0.80 (a long
  system prompt). Outputs are fixed (``ignore_eos``, greedy). Requests arrive by a seeded
  Poisson process (``--rate``, the same offsets for every workload) in real time (asyncio sleeps)
  into an ``AsyncEngine``; on and off see the same prompts at the same offsets. Every run gets a fresh core and KV pool over the one
  loaded model; before the clock each system prompt is served once (both settings alike), as on
  a server that has seen them before (``--cold`` skips that: then every system prompt is
  computed once inside the run, which caps the reduction at (1 - K/N) of the shared share).
  Rounds interleave the settings (off, on, on, off, ...), the machine's speed drifts; per-request
  results are pooled. Measured per run: prefill tokens computed (the scheduler's
  ``num_prefix_query_tokens - num_prefix_hit_tokens``: prompt tokens admitted minus those found
  in the cache; a preemption would recount a prompt, so they are reported, and the pool is sized
  for none), KV blocks in use (``pool.num_used_blocks``, and running sequences, sampled every
  ``--sample-ms`` on the loop: mean and peak; blocks per running sequence separates sharing from
  how many requests are admitted at once), TTFT (arrival to first token), output tokens/s
  (all output tokens / (last finish - first arrival)). The target: computed prefill
  tokens fall by at least 0.9 of the shared share, and TTFT falls with them. Only whole blocks
  are shared, so "ideal" is the reduction a perfect block cache reaches on the workload.
- pruning: KV memory per sequence and quality against the full cache for window and
  heavy-hitter at 50% and 25% budgets on 512+-token generations (``bench.pruning``).

Prints a table and writes JSON and Markdown; no timing asserts (the machine is shared and noisy).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import platform
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from bench import pruning
from bench.common import DEFAULT_MODEL, cpu_name, resolve_model, save_results

NUM_WARMUP = 4


# -- prefix sharing: the workloads --------------------------------------------------------------


@dataclass
class ChatWorkload:
    name: str
    systems: list[list[int]]  # the K shared system prompts
    prompts: list[list[int]]  # per request: its system prompt, then its own "user" tokens
    system_ids: list[int]  # per request: which system prompt
    arrivals_s: list[float]  # per request: offset from the run's start
    output_len: int

    @property
    def num_prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    @property
    def system_lens(self) -> list[int]:
        return [len(self.systems[s]) for s in self.system_ids]

    @property
    def shared_share(self) -> float:
        return sum(self.system_lens) / self.num_prompt_tokens

    def ideal_reduction(self, block_size: int, is_warm: bool) -> float:
        """Prefill a perfect block cache saves, as a share of all prompt tokens: the whole blocks
        of every system prompt (cold: of every use after the first)."""
        seen, saved = set(), 0
        for i in sorted(range(len(self.prompts)), key=self.arrivals_s.__getitem__):  # arrival order
            if is_warm or self.system_ids[i] in seen:
                saved += min(len(self.systems[self.system_ids[i]]), len(self.prompts[i]) - 1) // block_size * block_size
            seen.add(self.system_ids[i])
        return saved / self.num_prompt_tokens


def chat_workload(name: str, shared_share: float, args: argparse.Namespace, vocab_size: int) -> ChatWorkload:
    rng = random.Random(f"{args.seed}-{name}")
    n, k = args.num_requests, args.num_systems
    mean_system = shared_share * args.prompt_len
    systems = [[rng.randrange(3, vocab_size) for _ in range(round(mean_system * rng.uniform(0.8, 1.2)))] for _ in range(k)]
    system_ids = [i % k for i in range(n)]
    rng.shuffle(system_ids)
    # User parts 0.5-1.5x their mean, scaled so that the shared share comes out as asked.
    num_user = round(sum(len(systems[s]) for s in system_ids) * (1 - shared_share) / shared_share)
    raw = [rng.uniform(0.5, 1.5) for _ in range(n)]
    user_lens = [max(1, round(num_user * x / sum(raw))) for x in raw]
    user_lens[-1] = max(1, user_lens[-1] + num_user - sum(user_lens))
    prompts = [systems[s] + [rng.randrange(3, vocab_size) for _ in range(u)] for s, u in zip(system_ids, user_lens)]
    arrival_rng = random.Random(args.seed)  # the same arrival times for every workload
    arrivals = list(itertools.accumulate((arrival_rng.expovariate(args.rate) for _ in range(n - 1)), initial=0.0))
    return ChatWorkload(name, systems, prompts, system_ids, arrivals, args.output_len)


# -- prefix sharing: one run --------------------------------------------------------------------


@dataclass
class PrefixRun:
    wall_s: float  # the clock's start (first arrival) to the last finish
    num_output_tokens: int
    num_computed_tokens: int  # prompt tokens the engine ran
    num_hit_tokens: int  # prompt tokens found in the cache
    num_preemptions: int
    worker_busy_s: float
    ttft_s: list[float]  # per request
    used_blocks: list[int]  # samples
    running_seqs: list[int]  # samples, at the same times
    outputs: list[list[int]]  # per request


def pool_runs(runs: list[PrefixRun]) -> PrefixRun:
    """A setting's rounds as one run: counters summed, samples together."""
    return PrefixRun(*(sum(getattr(r, name) for r in runs) for name in (
        "wall_s", "num_output_tokens", "num_computed_tokens", "num_hit_tokens", "num_preemptions", "worker_busy_s")),
        *([x for r in runs for x in getattr(r, name)] for name in ("ttft_s", "used_blocks", "running_seqs", "outputs")))


async def run_prefix_once(build: Callable, workload: ChatWorkload, is_sharing: bool, is_warm: bool, sample_s: float) -> PrefixRun:
    """One pass of ``workload`` through a fresh ``AsyncEngine``, after its warm-up."""
    from engine.sampling_params import SamplingParams
    from scheduler.async_engine import AsyncEngine
    from bench.engine import _consume

    engine = AsyncEngine(*build(is_sharing))
    sched, pool = engine.core.queues, engine.core.pool
    params = SamplingParams(max_tokens=workload.output_len, temperature=0.0, ignore_eos=True)
    used: list[int] = []
    running: list[int] = []

    async def one(prompt: list[int], arrival_s: float) -> tuple[float, float, list[int]]:
        await asyncio.sleep(max(0.0, start + arrival_s - time.perf_counter()))
        arrived, first, tokens = time.perf_counter(), None, []
        async for out in engine.generate(prompt, params):
            if first is None and out.new_token_ids:
                first = time.perf_counter()
            tokens += out.new_token_ids
        return first - arrived, time.perf_counter(), tokens

    async def sample() -> None:
        while True:
            used.append(pool.num_used_blocks)
            running.append(len(sched.running))
            await asyncio.sleep(sample_s)

    await engine.start()
    try:  # short warm-ups (under a block: they leave nothing in the cache), then the system prompts
        warm = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
        await asyncio.gather(*(_consume(engine, [3 + i, 4, 5, 6], warm) for i in range(NUM_WARMUP)))
        if is_warm:
            once = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
            await asyncio.gather(*(_consume(engine, system, once) for system in workload.systems))
        query0, hit0, pre0 = sched.num_prefix_query_tokens, sched.num_prefix_hit_tokens, sched.num_preemptions
        busy0, start = engine.worker_busy_s, time.perf_counter()
        sampler = asyncio.create_task(sample())
        results = await asyncio.gather(*(one(p, a) for p, a in zip(workload.prompts, workload.arrivals_s)))
        sampler.cancel()
    finally:
        await engine.stop()
    outputs = [r[2] for r in results]
    if any(len(o) != workload.output_len for o in outputs):
        raise RuntimeError(f"{workload.name}: a request did not produce {workload.output_len} tokens")
    hits = sched.num_prefix_hit_tokens - hit0
    return PrefixRun(
        max(r[1] for r in results) - start, sum(len(o) for o in outputs), sched.num_prefix_query_tokens - query0 - hits,
        hits, sched.num_preemptions - pre0, engine.worker_busy_s - busy0, [r[0] for r in results], used, running, outputs,
    )


# -- prefix sharing: the part -------------------------------------------------------------------


def _row(workload: ChatWorkload, setting: str, run: PrefixRun, off: PrefixRun | None, equal: int, ideal: float) -> dict:
    import numpy as np

    share = workload.shared_share
    row = {
        "workload": workload.name, "sharing": setting, "shared_share": round(share, 4),
        "ideal_reduction": round(ideal, 4),
        "prefill_computed_tokens": run.num_computed_tokens, "prefill_hit_tokens": run.num_hit_tokens,
        "kv_blocks_mean": round(float(np.mean(run.used_blocks)), 1), "kv_blocks_peak": int(max(run.used_blocks)),
        "running_seqs_mean": round(float(np.mean(run.running_seqs)), 2),
        "kv_blocks_per_running_seq": round(float(np.mean(run.used_blocks)) / max(float(np.mean(run.running_seqs)), 1e-9), 1),
        "ttft_p50_s": round(float(np.percentile(run.ttft_s, 50)), 3), "ttft_p99_s": round(float(np.percentile(run.ttft_s, 99)), 3),
        "output_tok_s": round(run.num_output_tokens / run.wall_s, 1), "worker_busy": round(run.worker_busy_s / run.wall_s, 3),
        "preemptions": run.num_preemptions, "outputs_equal_to_off": equal,
    }
    if off is not None:
        reduction = 1 - run.num_computed_tokens / off.num_computed_tokens
        row |= {"reduction": round(reduction, 4), "reduction_over_share": round(reduction / share, 3),
                "ttft_p50_change": round(row["ttft_p50_s"] / float(np.percentile(off.ttft_s, 50)) - 1, 3)}
        row["target_met"] = row["reduction_over_share"] >= 0.9 and row["ttft_p50_change"] < 0
    return row


def run_prefix(args: argparse.Namespace, ctx: dict) -> dict:
    """Sharing off vs on for each workload of ``--shares``: the report's "prefix" part."""
    workloads = [chat_workload(f"chat-{round(100 * s)}%", s, args, ctx["vocab_size"]) for s in args.shares]
    rows = []
    for w in workloads:
        print(f"{w.name}: {len(w.prompts)} requests, {w.num_prompt_tokens} prompt tokens, shared share "
              f"{w.shared_share:.4f}, arrivals over {w.arrivals_s[-1]:.1f} s", flush=True)
        runs: dict[str, list[PrefixRun]] = {"off": [], "on": []}
        for round_ in range(args.rounds):
            for setting in ("off", "on")[:: -1 if round_ % 2 else 1]:  # ABBA: off, on, on, off, ...
                run = asyncio.run(run_prefix_once(ctx["build"], w, setting == "on", not args.cold, args.sample_ms / 1e3))
                runs[setting].append(run)
                print(f"  round {round_ + 1} {setting}: computed {run.num_computed_tokens}, {run.wall_s:.1f} s, "
                      f"busy {run.worker_busy_s / run.wall_s:.0%}, preemptions {run.num_preemptions}", flush=True)
        reference, off = runs["off"][0].outputs, pool_runs(runs["off"])
        ideal = w.ideal_reduction(ctx["block_size"], not args.cold)
        for setting, rs in runs.items():
            equal = sum(o == ref for r in rs for o, ref in zip(r.outputs, reference))
            rows.append(_row(w, setting, pool_runs(rs), off if setting == "on" else None, equal, ideal))
    workloads_ = [{"name": w.name, "requests": len(w.prompts), "prompt_tokens": w.num_prompt_tokens, "shared_tokens":
                   sum(w.system_lens), "system_prompt_lens": [len(x) for x in w.systems], "arrival_span_s": round(w.arrivals_s[-1], 2)}
                  for w in workloads]
    return {"workloads": workloads_, "rows": rows}


def prefix_cells(part: dict) -> tuple[list[str], list[list[str]], str]:
    """The prefix part as a table: header, rows, and what the columns mean."""
    header = ["workload", "sharing", "share", "ideal", "prefill computed", "reduction", "red. / share", "KV blocks mean",
              "KV blocks peak", "running mean", "blocks / running", "TTFT p50", "TTFT p99", "output tok/s", "busy", "preempt", "= off", "target"]
    rows = []
    for r in part["rows"]:
        on = "reduction" in r
        rows.append([
            r["workload"], r["sharing"], f"{r['shared_share']:.3f}", f"{r['ideal_reduction']:.3f}",
            str(r["prefill_computed_tokens"]), f"{r['reduction']:.3f}" if on else "-",
            f"{r['reduction_over_share']:.3f}" if on else "-", f"{r['kv_blocks_mean']:.0f}", str(r["kv_blocks_peak"]),
            f"{r['running_seqs_mean']:.1f}", f"{r['kv_blocks_per_running_seq']:.1f}", f"{r['ttft_p50_s']:.2f} s", f"{r['ttft_p99_s']:.2f} s",
            f"{r['output_tok_s']:.1f}", f"{r['worker_busy']:.0%}", str(r["preemptions"]), str(r["outputs_equal_to_off"]),
            ("met" if r["target_met"] else "NOT met") if on else "-",
        ])
    note = ("share: shared (system prompt) tokens / all prompt tokens; ideal: the reduction a perfect block cache "
            "reaches (whole blocks only; with --cold, each system prompt computed once); target: reduction / share "
            ">= 0.9 and TTFT p50 below off's; running: sequences admitted (holding blocks); busy: worker busy / wall; = off: requests "
            "(all rounds) whose tokens equal the first off run's.")
    return header, rows, note


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i < 2 else "---:" for i in range(len(header))) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def console_table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(c) for c in col) for col in zip(header, *rows)]
    return ["  ".join(c.rjust(w) if i >= 2 else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
            for row in (header, *rows)]


# -- driver ---------------------------------------------------------------------------------

# The report's parts, in order: name -> (run(args, ctx) -> its entry, entry -> (header, rows, note)).
PARTS: dict[str, tuple[Callable[[argparse.Namespace, dict], dict], Callable[[dict], tuple[list[str], list[list[str]], str]]]] = {
    "prefix": (run_prefix, prefix_cells),
    "pruning": (pruning.run_part, pruning.cells),
}


def _parts(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [n for n in names if n not in PARTS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"parts must be a comma-separated list from {', '.join(PARTS)}; got {text!r}")
    return names


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help=f"local checkpoint directory (default: {DEFAULT_MODEL}, built if missing)")
    p.add_argument("--parts", type=_parts, default=list(PARTS), help=f"comma-separated, from {','.join(PARTS)}")
    p.add_argument("--num-requests", type=int, default=48)
    p.add_argument("--num-systems", type=int, default=4, help="distinct system prompts the requests share")
    p.add_argument("--shares", type=lambda s: [float(x) for x in s.split(",")], default=[0.36, 0.80],
                   help="shared prefix tokens / all prompt tokens, one workload each")
    p.add_argument("--prompt-len", type=int, default=512, help="mean prompt tokens (system + user)")
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--rate", type=float, default=1.4, help="Poisson arrivals, requests/s")
    p.add_argument("--cold", action="store_true", help="no system prompt served before the clock: a cold cache")
    p.add_argument("--rounds", type=int, default=2, help="off/on pairs, ABBA-ordered and pooled: the machine drifts")
    p.add_argument("--sample-ms", type=float, default=5.0, help="period of the KV blocks-in-use samples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-num-batched-tokens", type=int, default=64)
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument("--kv-cache-bytes", type=int, default=1 << 30)
    p.add_argument("--decode-attention", choices=["auto", "sdpa"], default="auto")
    pruning.add_pruning_arguments(p)
    p.add_argument("--out", default="bench-results/cache.json")


def main(args: argparse.Namespace) -> dict:
    import torch

    from engine.config import EngineConfig
    from engine.model_loader import load_model
    from scheduler.builder import build_from_model

    args.model = resolve_model(args.model)
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    config = EngineConfig.build(args.model, max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs,
                                kv_cache_bytes=args.kv_cache_bytes, decode_attention=args.decode_attention)
    model, tokenizer = load_model(args.model, torch.device("cpu"))
    ctx = {
        "build": lambda is_sharing: build_from_model(model, tokenizer, config.replace(enable_prefix_caching=is_sharing)),
        "vocab_size": model.config.vocab_size,
        "block_size": config.cache.block_size,
        "model": model,
        "tokenizer": tokenizer,
        "config": config,
    }
    num_blocks = ctx["build"](False)[0].pool.num_blocks
    report = {
        "command": "mace " + " ".join(sys.argv[1:]),
        "machine": {"platform": platform.platform(), "processor": cpu_name(), "cpus": torch.get_num_threads(),
                    "torch": torch.__version__, "device": "cpu"},
        "model": args.model,
        "config": {"max_num_batched_tokens": config.scheduler.max_num_batched_tokens,
                   "max_num_seqs": config.scheduler.max_num_seqs, "kv_cache_bytes": config.cache.kv_cache_bytes,
                   "num_kv_blocks": num_blocks, "block_size": config.cache.block_size,
                   "decode_attention": config.model.decode_attention, "requests": args.num_requests,
                   "system_prompts": args.num_systems, "prompt_len": args.prompt_len, "output_len": args.output_len,
                   "rate_per_s": args.rate, "cache": "cold" if args.cold else "warm", "rounds": args.rounds,
                   "sample_ms": args.sample_ms, "seed": args.seed},
    }
    for name in args.parts:
        report[name] = PARTS[name][0](args, ctx)
    report["run_s"] = round(time.perf_counter() - started, 1)
    for name in args.parts:
        header, rows, note = PARTS[name][1](report[name])
        print(f"\n{name}:", *console_table(header, rows), note, sep="\n")
    save_results(args.out, report, markdown(report))
    return report


def markdown(report: dict) -> str:
    m, c = report["machine"], report["config"]
    lines = [
        (f"Model `{report['model']}`; {c['requests']} requests per workload over {c['system_prompts']} system prompts, "
         f"mean prompt {c['prompt_len']} tokens, {c['output_len']} output tokens (greedy, EOS ignored), Poisson arrivals "
         f"at {c['rate_per_s']}/s, {c['cache']} cache; budget {c['max_num_batched_tokens']} tokens/iteration, {c['max_num_seqs']} seqs, "
         f"{c['num_kv_blocks']} KV blocks of {c['block_size']}; {c['rounds']} rounds pooled; {m['processor']}, "
         f"{m['cpus']} threads, torch {m['torch']}; {report['run_s']:.0f} s in all. Command: `{report['command']}`."),
    ]
    for name, (_, cells) in PARTS.items():
        if name in report:
            header, rows, note = cells(report[name])
            lines += ["", f"### {name}", "", *markdown_table(header, rows), "", note]
    return "\n".join(lines) + "\n"
