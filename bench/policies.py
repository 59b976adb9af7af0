"""`mace bench policies`: the fine-tune policies under one chat load where 10%, 30% and 50% of
the requests produce a feedback pair (stored as they finish, trained while serving).

Per policy and feedback share: TTFT and TPOT p50/p99, SLO attainment (TTFT <= --slo-ttft-ms and
TPOT <= --slo-tbt-ms), and DPO pairs trained per second of the run. Every run gets a fresh engine
and adapters over the same weights, the same arrivals and prompts. Engine-level (no HTTP).

A rated request posts (its prompt, its answer, another answer of the same length): a pair of
about 2 x (prompt + output) tokens, so feedback is real work. The mace runs use one cost profile
measured at the start (``mace profile --quick``, as ``mace serve`` does), corrected online.

``--closed-loop``: instead, a real ``mace serve`` per policy with its defaults, under N streaming
chat clients in a closed loop (``bench/closed_loop.py``).
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

from bench.common import cpu_name, save_results
from server.flags import add_threads_flag

POLICIES = ("inference-only", "synchronous", "periodic", "mace")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="models/demo-base")
    p.add_argument("--shares", default="0.1,0.3,0.5", help="shares of requests that produce feedback")
    p.add_argument("--policies", default=None, help="which policies to run, comma-separated (default: all; "
                   "--closed-loop: inference-only,synchronous,mace)")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--rates", default="1.0,2.0",
                   help="Poisson arrival rates (requests/s), comma-separated: one load per rate")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--slo-ttft-ms", type=float, default=1000.0)
    p.add_argument("--slo-tbt-ms", type=float, default=50.0)
    p.add_argument("--retrain-period", type=float, default=10.0)
    p.add_argument("--finetune-tokens", type=int, default=256, help="fine-tune tokens per iteration (at most)")
    p.add_argument("--seed", type=int, default=0)
    add_threads_flag(p)
    p.add_argument("--out", default=None, help="the JSON report (default: bench-results/policies.json; "
                   "--closed-loop: bench-results/policies-closed-loop.json)")
    g = p.add_argument_group("closed loop (real `mace serve` per run, its defaults; ignores the engine-level flags "
                             "but --model, --policies, --output-len, --seed)")
    g.add_argument("--closed-loop", action="store_true",
                   help="N streaming chat clients in a closed loop against `mace serve --policy P` (bench/closed_loop.py)")
    g.add_argument("--clients", default="4,12", help="client counts, comma-separated: one run per count and policy")
    g.add_argument("--duration", type=float, default=75.0, help="seconds each client keeps sending")
    g.add_argument("--max-requests-per-client", type=int, default=1000)


async def _run(core, runner, store, args, prompts, arrivals, share: float) -> dict:
    from engine.sampling_params import SamplingParams
    from scheduler.async_engine import AsyncEngine
    from trainer.feedback import NewPair

    trainer = core.trainer
    engine = AsyncEngine(core, runner)
    tokenizer = core.tokenizer
    await engine.start()
    # exactly round(share * N) requests give feedback, the same ones for every policy
    rated = set(random.Random(args.seed).sample(range(len(prompts)), round(share * len(prompts))))
    params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
    ttfts, tpots, posted = [], [], 0

    async def one(i: int) -> None:
        nonlocal posted
        await asyncio.sleep(max(0.0, start + arrivals[i] - time.perf_counter()))
        t0, times, text = time.perf_counter(), [], []
        async for out in engine.generate(prompts[i], params):
            if out.new_token_ids:
                times.append(time.perf_counter())
            text.append(out.new_text)
        ttfts.append(times[0] - t0)
        tpots.append((times[-1] - times[0]) / (len(times) - 1))
        if i in rated:  # the user rates this answer against another of the same length
            other = tokenizer.decode(prompts[(i + 1) % len(prompts)][: args.output_len])
            store.add([NewPair(tokenizer.decode(prompts[i]), "".join(text) or " ok", other)])
            posted += 1
            if trainer is not None:
                await trainer.refill()

    start = time.perf_counter()
    try:
        await asyncio.gather(*(one(i) for i in range(len(prompts))))
        wall = time.perf_counter() - start
        busy = engine.worker_busy_s  # the worker's iteration time, inference and fine-tune
        if core.training is not None:
            await core.training.flush()
    finally:
        await engine.stop()
    trained = store.stats()["trained"]
    store.close()
    slo = [a * 1e3 <= args.slo_ttft_ms and b * 1e3 <= args.slo_tbt_ms for a, b in zip(ttfts, tpots)]
    return {"ttft_p50_ms": round(1e3 * float(np.percentile(ttfts, 50)), 1), "ttft_p99_ms": round(1e3 * float(np.percentile(ttfts, 99)), 1),
            "tpot_p50_ms": round(1e3 * float(np.percentile(tpots, 50)), 1), "tpot_p99_ms": round(1e3 * float(np.percentile(tpots, 99)), 1),
            "slo_attainment": round(sum(slo) / len(slo), 3), "pairs_posted": posted, "pairs_trained": trained,
            "pairs_per_s": round(trained / wall, 3), "wall_s": round(wall, 1), "busy": round(busy / wall, 3)}


def _verdicts(rows: list[dict]) -> list[dict]:
    """The policies' targets per rate, at the 50% feedback share: mace keeps >= 99% SLO attainment
    while synchronous does not, and trains >= 0.76x synchronous's pairs per second."""
    out = []
    for rate in sorted({r["rate"] for r in rows}):
        cell = {r["policy"]: r for r in rows if r["rate"] == rate and r["share"] == 0.5}
        if "mace" not in cell or "synchronous" not in cell:
            continue
        mace, sync = cell["mace"], cell["synchronous"]
        ratio = mace["pairs_per_s"] / sync["pairs_per_s"] if sync["pairs_per_s"] else float("nan")
        met = mace["slo_attainment"] >= 0.99 and sync["slo_attainment"] < 0.99 and ratio >= 0.76
        out.append({"rate": rate, "mace_slo": mace["slo_attainment"], "synchronous_slo": sync["slo_attainment"],
                    "pairs_ratio": round(ratio, 3), "met": met})
    return out


def main(args: argparse.Namespace) -> dict:
    if args.closed_loop:
        from bench.closed_loop import main as closed_loop_main

        args.policies = args.policies or "inference-only,synchronous,mace"
        args.out = args.out or "bench-results/policies-closed-loop.json"
        return closed_loop_main(args)
    args.policies = args.policies or ",".join(POLICIES)
    from server.flags import apply_threads

    apply_threads(args)  # as mace serve: the engine shares this process with the load
    args.out = args.out or "bench-results/policies.json"
    import torch

    from engine.config import EngineConfig
    from engine.model_loader import load_model
    from scheduler.builder import build_from_model

    rng = random.Random(args.seed)
    gaps = np.random.default_rng(args.seed).exponential(1.0, args.requests)  # one shape, scaled per rate
    prompts = [[rng.randrange(8000) for _ in range(args.prompt_len)] for _ in range(args.requests)]
    from engine.config import TrainingConfig
    from scheduler.profiler import profile
    from trainer.feedback import FeedbackStore

    config = EngineConfig.build(args.model, kv_cache_bytes=512 << 20, max_num_seqs=32, slo_tbt_ms=args.slo_tbt_ms,
                                slo_ttft_ms=args.slo_ttft_ms, retrain_period_s=args.retrain_period,
                                finetune_tokens_per_iteration=args.finetune_tokens)
    started = time.perf_counter()
    model, tokenizer = load_model(args.model, torch.device("cpu"))
    core, runner = build_from_model(model, tokenizer, config.replace(policy="mace"), TrainingConfig(),
                                    FeedbackStore(Path(tempfile.mkdtemp()) / "f.sqlite3"))
    cost_model, _ = profile(runner, core.config.model.max_model_len, quick=True, progress=False)
    profile_path = Path(tempfile.mkdtemp()) / "profile.json"
    cost_model.save(profile_path)  # every run starts from this profile
    config = config.replace(cost_profile=str(profile_path))
    rows = []
    for rate in (float(r) for r in args.rates.split(",")):
        arrivals = list(np.cumsum(gaps / rate))
        for share in (float(s) for s in args.shares.split(",")):
            for policy in args.policies.split(","):
                model, tokenizer = load_model(args.model, torch.device("cpu"))  # adapters go on per run
                store = FeedbackStore(Path(tempfile.mkdtemp()) / "f.sqlite3")
                training = TrainingConfig() if policy != "inference-only" else None
                core, runner = build_from_model(model, tokenizer, config.replace(policy=policy), training, store)
                row = {"rate": rate, "share": share, "policy": policy,
                       **asyncio.run(_run(core, runner, store, args, prompts, arrivals, share))}
                rows.append(row)
                print(row, flush=True)
    verdicts = _verdicts(rows)
    report = {"command": "mace " + " ".join(sys.argv[1:]), "processor": cpu_name(), "model": args.model,
              "config": {k: v for k, v in vars(args).items() if k not in ("func", "out", "bench", "bench_module")}, "rows": rows,
              "targets": verdicts, "run_s": round(time.perf_counter() - started, 1)}
    lines = [f"Model `{args.model}`; {args.requests} requests per run, Poisson at {args.rates.replace(',', ' and ')}/s (prompt {args.prompt_len}, output "
             f"{args.output_len}); up to {args.finetune_tokens} fine-tune tokens per iteration; SLO TTFT {args.slo_ttft_ms:g} ms, TPOT {args.slo_tbt_ms:g} ms; periodic every "
             f"{args.retrain_period:g} s; {report['processor']}; {report['run_s']:.0f} s. Command: `{report['command']}`.", "",
             "| rate | feedback share | policy | busy | TTFT p50 | TTFT p99 | TPOT p50 | TPOT p99 | SLO attainment | pairs trained / posted | pairs/s |",
             "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['rate']:g}/s | {r['share']:.0%} | {r['policy']} | {r['busy']:.0%} | {r['ttft_p50_ms']} ms | {r['ttft_p99_ms']} ms | {r['tpot_p50_ms']} ms | "
                     f"{r['tpot_p99_ms']} ms | {r['slo_attainment']:.1%} | {r['pairs_trained']} / {r['pairs_posted']} | {r['pairs_per_s']} |")
    lines += ["", "busy: the worker's iteration time (inference and fine-tune) / the run's wall time.", "",
              "| rate | mace SLO at 50% | synchronous SLO at 50% | mace / synchronous pairs/s | target (mace >= 99%, synchronous < 99%, ratio >= 0.76) |",
              "|---:|---:|---:|---:|---|"]
    for v in verdicts:
        lines.append(f"| {v['rate']:g}/s | {v['mace_slo']:.1%} | {v['synchronous_slo']:.1%} | {v['pairs_ratio']:.2f} | "
                     f"{'met' if v['met'] else 'NOT met'} |")
    save_results(args.out, report, "\n".join(lines))
    print("\n".join(lines))
    return report
