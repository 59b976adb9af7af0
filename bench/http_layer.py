"""`mace bench http`: what the HTTP layer costs. Output tokens/s streamed over HTTP against the
engine alone, on the same workload, in the same run (the bar: under 10% overhead).

One process loads the model once; every run gets a fresh core and KV pool over it (nothing
carries from run to run) and a few warm-up requests before the clock starts. The workload is
the engine bench's (N requests, prompts 32-1024 tokens, outputs 16-256 forced with
``ignore_eos``, greedy, all at t=0, at most ``--max-concurrency`` in flight). Rounds interleave
the systems (engine, http, http, engine, ...) because the machine's speed drifts:

- engine: asyncio tasks drive ``AsyncEngine.generate``, no HTTP.
- http: ``mace serve``'s app (``build_app`` + ``make_runner``) on 127.0.0.1, uvloop as in
  ``mace serve``, and a client streaming ``/v1/completions`` (token-id prompts). The client
  (``--client``) runs in a spawned subprocess by default, like a real client: it shares no GIL
  with the server, though on a small machine it takes CPU from the worker's torch threads (its
  CPU per token is reported); ``thread``: its own loop in a thread, contending for the GIL with
  the loop and the worker (on 2 cores and the tiny model it showed 2-3x the process client's
  overhead); ``loop``: on the server's loop. On a shared machine tokens/s swing by several % run
  to run; the loop's CPU per token (engine vs http) is the steadier measure of the HTTP layer.

Each streamed chunk is one token; the usage chunk's count must equal ``max_tokens``. A token
whose text is not complete yet (a partial UTF-8 character) gets no chunk of its own, so the
counts of tokens and of token chunks are both reported. Times are taken where the tokens
arrive: TTFT from the common start, TPOT = (last - first) / (tokens - 1), tokens/s = output
tokens / (last finish - start).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import msgspec

from bench.common import DEFAULT_MODEL, cpu_name, resolve_model, save_results
from protocol.sse import DONE, Decoder

NUM_WARMUP = 4


class _Chunk(msgspec.Struct):
    choices: list[dict] = []
    usage: dict | None = None
    error: dict | None = None


_decode_chunk = msgspec.json.Decoder(_Chunk).decode


# -- the client (a thread, a subprocess, or the server's loop) ----------------------------------


async def stream_all(url: str, prompts: list[list[int]], output_lens: list[int], max_concurrency: int):
    """Stream every request at once: (start, arrival times per request, usage tokens per request,
    CPU seconds of this thread)."""
    import aiohttp

    sem = asyncio.Semaphore(max_concurrency)
    connector = aiohttp.TCPConnector(limit=max_concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as session:

        async def one(prompt: list[int], max_tokens: int) -> tuple[list[float], int | None]:
            body = {"prompt": prompt, "max_tokens": max_tokens, "stream": True, "ignore_eos": True,
                    "temperature": 0.0, "stream_options": {"include_usage": True}}
            times, num_tokens, decoder = [], None, Decoder()
            async with sem, session.post(url, json=body) as resp:
                if resp.status != 200:
                    raise RuntimeError(f"HTTP {resp.status}: {await resp.text()}")
                async for data in resp.content.iter_any():
                    now = time.perf_counter()
                    for event in decoder.feed(data):
                        if event.data == DONE:
                            continue
                        chunk = _decode_chunk(event.data)
                        if chunk.error is not None:
                            raise RuntimeError(f"stream error: {chunk.error}")
                        if chunk.choices:
                            times.append(now)
                        elif chunk.usage is not None:
                            num_tokens = chunk.usage["completion_tokens"]
            return times, num_tokens

        cpu0, start = time.thread_time(), time.perf_counter()
        results = await asyncio.gather(*(one(p, n) for p, n in zip(prompts, output_lens)))
    return start, [r[0] for r in results], [r[1] for r in results], time.thread_time() - cpu0


def stream_all_blocking(*args):
    """``stream_all`` on a fresh event loop of its own (a thread's or a subprocess's)."""
    import uvloop

    return uvloop.run(stream_all(*args))


# -- the systems --------------------------------------------------------------------------------


def _stats(system: str, start: float, times: list[list[float]], num_tokens: list[int]):
    from bench.engine import RunStats

    ttft = [t[0] - start for t in times]
    tpot = [(t[-1] - t[0]) / (n - 1) for t, n in zip(times, num_tokens) if n > 1]
    return RunStats(system, max(t[-1] for t in times) - start, sum(num_tokens), ttft, tpot)


def _check(system: str, num_tokens: list[int | None], output_lens: list[int]) -> None:
    bad = [(i, got, want) for i, (got, want) in enumerate(zip(num_tokens, output_lens)) if got != want]
    if bad:
        raise RuntimeError(f"{system}: {len(bad)} requests did not produce max_tokens, e.g. (index, got, want) {bad[:3]}")


def _note(c: dict, client: str | None) -> str:
    """What a run's counters (summed over rounds) say about where the time went."""
    note = (f"{c['iterations']} iterations, worker busy {c['worker_busy_s'] / c['wall_s']:.0%} of the wall time; "
            f"loop CPU {1e6 * c['loop_cpu_s'] / c['tokens']:.0f} us/token")
    if client is None:
        return note
    if client != "loop":  # on the loop, the client's CPU is in the loop's
        note += f", client CPU {1e6 * c['client_cpu_s'] / c['tokens']:.0f} us/token"
    return f"client: {client}; {note}; {c['chunks']} token chunks for {c['tokens']} tokens"


async def run_engine(ctx: dict, workload, max_concurrency: int):
    """(stats, counters) of one run of the engine alone."""
    from engine.sampling_params import SamplingParams
    from scheduler.async_engine import AsyncEngine
    from bench.engine import _consume

    engine = AsyncEngine(*ctx["build"]())
    await engine.start()
    try:
        warm = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
        await asyncio.gather(*(_consume(engine, [3 + i, 4, 5, 6], warm) for i in range(NUM_WARMUP)))
        busy0, iters0, sem = engine.worker_busy_s, engine.num_iterations, asyncio.Semaphore(max_concurrency)

        async def one(prompt: list[int], max_tokens: int) -> list[float]:
            async with sem:
                return await _consume(engine, prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))

        cpu0, start = time.thread_time(), time.perf_counter()
        times = await asyncio.gather(*(one(p, n) for p, n in zip(workload.prompts, workload.output_lens)))
        loop_cpu = time.thread_time() - cpu0
        busy, iters = engine.worker_busy_s - busy0, engine.num_iterations - iters0
    finally:
        await engine.stop()
    num_tokens = [len(t) for t in times]
    _check("engine", num_tokens, workload.output_lens)
    stats = _stats("engine", start, times, num_tokens)
    return stats, {"iterations": iters, "worker_busy_s": busy, "wall_s": stats.wall_s, "loop_cpu_s": loop_cpu,
                   "tokens": stats.num_output_tokens}


async def run_http(ctx: dict, workload, max_concurrency: int, client: str):
    """(stats, counters) of one run over HTTP, seen from the client."""
    from aiohttp import web

    from server.app import build_app, make_runner
    from server.state import STATE

    app = build_app(*ctx["build"](), max_waiting_requests=max(256, len(workload.prompts)))
    engine = app[STATE].engine
    runner = make_runner(app)
    await runner.setup()  # starts the engine
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        url = f"http://127.0.0.1:{runner.addresses[0][1]}/v1/completions"

        async def stream(prompts, output_lens):
            args = (url, prompts, output_lens, max_concurrency)
            if client == "loop":
                return await stream_all(*args)
            if client == "thread":
                return await asyncio.to_thread(stream_all_blocking, *args)
            return await asyncio.get_running_loop().run_in_executor(ctx["pool"], stream_all_blocking, *args)

        await stream([[3 + i, 4, 5, 6] for i in range(NUM_WARMUP)], [4] * NUM_WARMUP)
        busy0, iters0, cpu0 = engine.worker_busy_s, engine.num_iterations, time.thread_time()
        start, times, num_tokens, client_cpu = await stream(workload.prompts, workload.output_lens)
        loop_cpu = time.thread_time() - cpu0
        busy, iters = engine.worker_busy_s - busy0, engine.num_iterations - iters0
    finally:
        await runner.cleanup()  # drains (nothing left), stops the engine
    _check("http", num_tokens, workload.output_lens)
    stats = _stats("http", start, times, num_tokens)
    return stats, {"iterations": iters, "worker_busy_s": busy, "wall_s": stats.wall_s, "loop_cpu_s": loop_cpu,
                   "tokens": stats.num_output_tokens, "client_cpu_s": client_cpu, "chunks": sum(len(t) for t in times)}


# -- driver -------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help=f"local checkpoint directory (default: {DEFAULT_MODEL}, built if missing)")
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--max-concurrency", type=int, default=None, help="requests in flight at once (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=2, help="engine/http pairs, ABBA-ordered and pooled: the machine drifts")
    p.add_argument("--client", choices=["process", "thread", "loop"], default="process",
                   help="where the HTTP client runs: a subprocess, its own thread and loop, or the server's loop")
    p.add_argument("--max-num-batched-tokens", type=int, default=64)
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument("--kv-cache-bytes", type=int, default=1 << 30)
    p.add_argument("--decode-attention", choices=["auto", "sdpa"], default="auto")
    p.add_argument("--out", default="bench-results/http.json")


def main(args: argparse.Namespace) -> dict:
    import torch
    import uvloop

    from engine.config import EngineConfig
    from engine.model_loader import load_model, max_context_len
    from scheduler.builder import build_from_model
    from bench.engine import mixed_workload, pool

    args.model = resolve_model(args.model)
    torch.manual_seed(args.seed)
    config = EngineConfig.build(args.model, max_num_batched_tokens=args.max_num_batched_tokens,
                                max_num_seqs=args.max_num_seqs, kv_cache_bytes=args.kv_cache_bytes,
                                decode_attention=args.decode_attention)
    model, tokenizer = load_model(args.model, torch.device("cpu"))
    ctx = {"build": lambda: build_from_model(model, tokenizer, config)}
    # The engine bench's workload, its prompts cut to fit a smaller model's context.
    max_prompt = min(1024, max_context_len(model.config) - 256)
    workload = mixed_workload(args.num_requests, args.seed, model.config.vocab_size, prompt_range=(32, max_prompt))
    cap = args.max_concurrency or args.num_requests
    print(f"workload: {args.num_requests} requests, {workload.num_prompt_tokens} prompt tokens, "
          f"{workload.num_output_tokens} output tokens, {cap} in flight; client: {args.client}; "
          f"torch threads {torch.get_num_threads()}", flush=True)

    clients = {"engine": None, "http": args.client}  # for the notes

    async def rounds() -> dict[str, list]:
        runs = {"engine": [], "http": []}
        for round_ in range(args.rounds):
            # ABBA: odd rounds run http first, so that going first or second cancels out.
            for name in ("engine", "http")[:: -1 if round_ % 2 else 1]:
                stats, counters = await (run_engine(ctx, workload, cap) if name == "engine" else
                                         run_http(ctx, workload, cap, args.client))
                runs[name].append((stats, counters))
                stats.note = _note(counters, clients[name])
                print(f"round {round_ + 1}: " + json.dumps(stats.summary()), flush=True)
        return runs

    if args.client == "process":
        ctx["pool"] = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    try:
        runs = uvloop.run(rounds())
    finally:
        if "pool" in ctx:
            ctx["pool"].shutdown()
    rows = []
    for name, pairs in runs.items():
        pooled = pool([stats for stats, _ in pairs])
        pooled.note = _note({k: sum(c[k] for _, c in pairs) for k in pairs[0][1]}, clients[name]) + (
            f"; {len(pairs)} rounds pooled" if len(pairs) > 1 else "")
        rows.append(pooled.summary())
    ratio = rows[1]["output_tok_s"] / rows[0]["output_tok_s"]
    report = {
        "command": "mace " + " ".join(sys.argv[1:]),
        "machine": {"platform": platform.platform(), "processor": cpu_name(), "cpus": torch.get_num_threads(),
                    "torch": torch.__version__, "device": "cpu"},
        "model": args.model,
        "config": {"max_num_batched_tokens": config.scheduler.max_num_batched_tokens,
                   "max_num_seqs": config.scheduler.max_num_seqs, "kv_cache_bytes": config.cache.kv_cache_bytes,
                   "decode_attention": config.model.decode_attention, "block_size": config.cache.block_size,
                   "client": args.client, "max_concurrency": cap, "rounds": args.rounds},
        "workload": {"requests": args.num_requests, "prompt_tokens": workload.num_prompt_tokens,
                     "output_tokens": workload.num_output_tokens},
        "rows": rows,
        "http_over_engine": round(ratio, 3),
        "overhead_pct": round(100 * (1 - ratio), 1),
        "round_ratios": [round(h.num_output_tokens / h.wall_s / (e.num_output_tokens / e.wall_s), 3)
                         for (e, _), (h, _) in zip(runs["engine"], runs["http"])],
        "round_rows": [stats.summary() for pairs in zip(*runs.values()) for stats, _ in pairs],
    }
    _print_table(report)
    save_results(args.out, report, markdown_table(report))
    return report


def markdown_table(report: dict) -> str:
    w, m, c = report["workload"], report["machine"], report["config"]
    lines = [
        (f"Workload: {w['requests']} requests, {w['prompt_tokens']} prompt and {w['output_tokens']} output tokens, "
         f"all at t=0, {c['max_concurrency']} in flight; model `{report['model']}`, budget {c['max_num_batched_tokens']} "
         f"tokens/iteration, {c['max_num_seqs']} seqs; client in a {c['client']}; {m['processor']}, {m['cpus']} threads, "
         f"torch {m['torch']}. Command: `{report['command']}`."),
        "",
        "| system | output tok/s | TPOT p50 | TPOT p99 | TTFT p50 | TTFT p99 | note |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in report["rows"]:
        lines.append(f"| {r['system']} | {r['output_tok_s']:.1f} | {r['tpot_p50_ms']:.1f} ms | {r['tpot_p99_ms']:.1f} ms | "
                     f"{r['ttft_p50_s']:.2f} s | {r['ttft_p99_s']:.2f} s | {r['note']} |")
    lines += ["", (f"http / engine tokens/s: {report['http_over_engine']} (overhead {report['overhead_pct']}%); "
                   f"per round: {report['round_ratios']}.")]
    return "\n".join(lines) + "\n"


def _print_table(report: dict) -> None:
    print(f"\n{'system':<8}{'out tok/s':>10}{'TPOT p50':>10}{'TPOT p99':>10}{'TTFT p50':>10}{'TTFT p99':>10}  note")
    for r in report["rows"]:
        print(f"{r['system']:<8}{r['output_tok_s']:>10.1f}{r['tpot_p50_ms']:>8.1f}ms{r['tpot_p99_ms']:>8.1f}ms"
              f"{r['ttft_p50_s']:>9.2f}s{r['ttft_p99_s']:>9.2f}s  {r['note']}")
    print(f"http / engine tokens/s: {report['http_over_engine']} (overhead {report['overhead_pct']}%); "
          f"per round: {report['round_ratios']}")
