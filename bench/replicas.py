"""`mace bench replicas`: the same load on 1 and on 2 Ray Serve replicas that train one adapter.

Each case starts ``mace serve --replicas N`` in this process (a local Ray, ``--replica-threads``
math threads per replica; N x threads should be the machine's cores), sends one open-loop chat
workload through Ray Serve's proxy, and stops it. The workload: requests in ``--groups`` groups,
each group's chat opening with its own system prompt of about ``--system-chars`` characters (the
prefix the cache can share), a shipped user prompt after it; ``--feedback`` of the requests
rate two answers and post the pair (the drift oracle's judge, as `mace load`). Cases:

- ``1 replica``;
- ``2 replicas``: the prefix-affinity router (a group's requests go to the replica that holds its
  prompt, unless its queue is much longer);
- ``2 replicas, pow-2`` (``--compare-router``): Ray Serve's default power-of-two router, to show
  what the affinity is worth in prefix hits.

Reported per case: output tokens/s, TTFT and TBT (inter-token gap) p99, SLO attainment at
``--slo-ttft-ms`` / ``--slo-tbt-ms``, pairs trained per second (the coordinator's store, over the
run), the adapter broadcast delay (a step to a replica serving it; p50, p99), the coordinator's
step time, and the prefix-cache hit ratio (hit tokens / query tokens, summed over replicas).
``--rounds`` repeats every case, interleaved; figures are means with their spread.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time

from bench.common import cpu_name, free_port, resolve_model, save_results

CASES = {"1 replica": (1, "prefix"), "2 replicas": (2, "prefix"), "2 replicas, pow-2": (2, "pow2")}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="default: the base demo model (built if missing)")
    p.add_argument("--replica-threads", type=int, default=1)
    p.add_argument("--rate", type=float, default=4.0, help="requests per second (Poisson)")
    p.add_argument("--duration", type=float, default=40.0, help="seconds of arrivals per case")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--groups", type=int, default=8, help="distinct system prompts")
    p.add_argument("--system-chars", type=int, default=600)
    p.add_argument("--feedback", type=float, default=0.5, help="share of requests that post a pair")
    p.add_argument("--slo-ttft-ms", type=float, default=1500.0)
    p.add_argument("--slo-tbt-ms", type=float, default=150.0)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--compare-router", action="store_true", help="also 2 replicas on Ray's default router")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench-results/replicas.json")


def workload(args: argparse.Namespace):
    """The chat requests: arrivals, a group's system prompt, a shipped user prompt."""
    import numpy as np

    from clients.workload import RequestSpec, default_prompts, poisson_arrivals

    rng = np.random.default_rng(args.seed)
    words = "answer briefly and kindly , using plain words , and say when you do not know .".split()
    systems = []
    for g in range(args.groups):
        text = f"You are assistant number {g} of the help desk."
        while len(text) < args.system_chars:
            text += " " + words[int(rng.integers(len(words)))]
        systems.append(text)
    users = default_prompts()
    arrivals = poisson_arrivals(args.rate, seed=args.seed, duration_s=args.duration)
    return [RequestSpec(t, args.max_tokens, messages=(
        {"role": "system", "content": systems[int(rng.integers(args.groups))]},
        {"role": "user", "content": users[int(rng.integers(len(users)))]}))
        for t in arrivals]


async def _json(url: str, path: str) -> dict:
    import aiohttp

    async with aiohttp.ClientSession() as http, http.get(url + path) as r:
        r.raise_for_status()
        return await r.json()


def run_case(args: argparse.Namespace, model: str, replicas: int, router: str, specs) -> dict:
    from clients.load import LoadConfig, run_load
    from clients.metrics import summarize
    from clients.oracle import drift_oracle
    from server.cli import build_parser
    from server.ray_serve import start_application, stop_application

    port = free_port()
    with tempfile.TemporaryDirectory() as state_dir:
        serve_args = build_parser().parse_args([
            "serve", "--replicas", str(replicas), "--replica-threads", str(args.replica_threads), "--model", model,
            "--port", str(port), "--state-dir", state_dir, "--no-ray-dashboard", "--replica-router", router,
            "--served-model-name", "bench",
        ])
        t0 = time.monotonic()
        app = start_application(serve_args)
        started_s = time.monotonic() - t0
        try:
            url = f"http://127.0.0.1:{port}"
            before = asyncio.run(_json(url, "/v1/feedback/stats"))
            config = LoadConfig(url=url, model="bench", duration_s=args.duration, drain_timeout_s=30.0,
                                retrain_rate=args.feedback, seed=args.seed)
            t1 = time.monotonic()
            result = asyncio.run(run_load(specs, config, drift_oracle(None)))
            wall_s = time.monotonic() - t1
            time.sleep(3.0)  # the replicas' counters reach the coordinator with their polls
            after = asyncio.run(_json(url, "/v1/feedback/stats"))
            adapters = asyncio.run(_json(url, "/v1/adapters"))
        finally:
            stop_application(app)
    summary = summarize(result.records, args.slo_ttft_ms, args.slo_tbt_ms)
    coordinator = adapters["coordinator"]
    queries = sum(r.get("prefix_query_tokens", 0) for r in adapters["replicas"])
    hits = sum(r.get("prefix_hit_tokens", 0) for r in adapters["replicas"])
    return {
        "replicas": replicas, "router": router, "start_s": started_s,
        "output_tokens_per_s": summary.output_token_throughput_per_s,
        "ttft_p99_ms": summary.ttft_ms.p99, "tbt_p99_ms": summary.itl_ms.p99,
        "slo_attainment": summary.slo_attainment, "num_requests": summary.num_requests, "num_ok": summary.num_ok,
        "pairs_posted": result.num_feedback_posted,
        "pairs_trained_per_s": (after["trained"] - before["trained"]) / wall_s,
        "pairs_pending_at_end": after["pending"],
        "steps": coordinator["steps"], "stale_gradients": coordinator["stale_gradients"],
        "pairs_by_replica": coordinator["pairs_by_replica"],
        "broadcast_ms_p50": coordinator["broadcast_ms_p50"], "broadcast_ms_p99": coordinator["broadcast_ms_p99"],
        "step_ms_p50": coordinator["step_ms_p50"], "step_ms_p99": coordinator["step_ms_p99"],
        "submit_ms_p50": coordinator["submit_ms_p50"], "adapter_bytes": coordinator["adapter_bytes"],
        "prefix_hit_ratio": hits / queries if queries else None,
        "replica_versions": [r["version"] for r in adapters["replicas"]],
    }


def _stat(values: list) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "stdev": None}
    return {"mean": statistics.fmean(values), "stdev": statistics.stdev(values) if len(values) > 1 else 0.0}


FIELDS = ("output_tokens_per_s", "ttft_p99_ms", "tbt_p99_ms", "slo_attainment", "pairs_trained_per_s",
          "broadcast_ms_p50", "broadcast_ms_p99", "step_ms_p50", "submit_ms_p50", "prefix_hit_ratio")


def run(args: argparse.Namespace) -> dict:
    model = resolve_model(args.model)
    specs = workload(args)
    cases = [c for c in CASES if args.compare_router or c != "2 replicas, pow-2"]
    runs: dict[str, list[dict]] = {c: [] for c in cases}
    for r in range(args.rounds):
        for case in cases:
            replicas, router = CASES[case]
            print(f"round {r + 1}/{args.rounds}: {case} ...", flush=True)
            runs[case].append(run_case(args, model, replicas, router, specs))
    summary = {case: {f: _stat([run[f] for run in rs]) for f in FIELDS} for case, rs in runs.items()}
    return {"bench": "replicas", "model": model, "cpu": cpu_name(), "args": vars(args) | {"func": None},
            "num_requests": len(specs), "runs": runs, "summary": summary}


def table(report: dict) -> str:
    def cell(stat: dict, fmt: str) -> str:
        if stat["mean"] is None:
            return "-"
        spread = f" ± {format(stat['stdev'], fmt)}" if stat["stdev"] else ""
        return format(stat["mean"], fmt) + spread

    lines = ["| case | output tok/s | TTFT p99 ms | TBT p99 ms | SLO attained | pairs trained/s | "
             "broadcast p50 / p99 ms | step p50 ms | prefix hit ratio |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for case, s in report["summary"].items():
        lines.append(f"| {case} | {cell(s['output_tokens_per_s'], '.1f')} | {cell(s['ttft_p99_ms'], '.0f')} | "
                     f"{cell(s['tbt_p99_ms'], '.0f')} | {cell(s['slo_attainment'], '.1%')} | "
                     f"{cell(s['pairs_trained_per_s'], '.2f')} | {cell(s['broadcast_ms_p50'], '.0f')} / "
                     f"{cell(s['broadcast_ms_p99'], '.0f')} | {cell(s['step_ms_p50'], '.1f')} | "
                     f"{cell(s['prefix_hit_ratio'], '.1%')} |")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> dict:
    report = run(args)
    markdown = table(report)
    save_results(args.out, report, markdown)
    print(markdown)
    return report
