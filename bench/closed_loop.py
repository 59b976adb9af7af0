"""`mace bench policies --closed-loop`: each fine-tune policy the way a new user tries it: a real
``mace serve --policy P`` with its defaults (no SLO flags), N chat users in a closed loop.

Per policy and client count, a fresh server (its own feedback store and checkpoints). Each of the
N clients, for ``--duration`` seconds (at most ``--max-requests-per-client`` requests), streams a
chat completion (a shipped prompt drawn with its seed, greedy, ``--output-len`` tokens) and, after
every other request, posts a pair to /v1/feedback: chosen = the answer it just got, rejected = its
previous answer (to another prompt, the same length); then sends the next request at once.

Measured from the client: TTFT (sent -> first content chunk), token gaps (between content chunks),
TPOT ((last - first) / (chunks - 1)); at the end the server's pairs stepped and adapter version
(/v1/adapters). The SLO per client count comes from the inference-only run, which goes first:
TTFT <= 3x its median TTFT and TPOT <= 2x its median TPOT. Attainment counts every request sent
(an error is a miss); goodput is attaining requests per second of the run's span.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp

from bench.common import cpu_name, save_results, spawned_server
from clients.metrics import RequestRecord, distribution_ms, summarize
from clients.sdk import AsyncClient, MaceError
from clients.workload import default_prompts

BASELINE = "inference-only"
SLO_TTFT_FACTOR, SLO_TPOT_FACTOR = 3.0, 2.0


async def _client(client: AsyncClient, index: int, args: argparse.Namespace, start: float, counts: dict[str, int],
                  records: list[RequestRecord]) -> None:
    """One user's closed loop until the deadline or its request budget."""
    rng = random.Random(f"{args.seed}-{index}")  # the same prompts for every policy
    prompts, run_id, previous = default_prompts(), uuid.uuid4().hex[:8], None
    for n in range(args.max_requests_per_client):
        if time.perf_counter() - start >= args.duration:
            return
        messages = [{"role": "user", "content": rng.choice(prompts)}]
        record = RequestRecord(len(records), time.perf_counter() - start)  # arrival = send: nobody queues
        record.send_s = record.arrival_s
        records.append(record)
        text: list[str] = []
        try:
            async with client.stream_chat(messages, max_tokens=args.output_len, temperature=0.0, ignore_eos=True) as stream:
                async for delta in stream:
                    if delta.content:
                        record.token_times_s.append(time.perf_counter() - start)
                        text.append(delta.content)
                    record.finish_reason = delta.finish_reason or record.finish_reason
            if record.finish_reason is None:
                record.error = "the stream ended without a finish reason"
        except MaceError as exc:
            record.error = f"{type(exc).__name__}: {exc}"
        record.end_s = time.perf_counter() - start
        answer = "".join(text) if record.is_ok else None
        if n % 2 == 1 and answer and previous and answer != previous:
            try:
                await client.feedback(messages, answer, previous, id=f"{run_id}-{index}-{n}")
                counts["posted"] += 1
            except MaceError:
                counts["feedback_failed"] += 1
        previous = answer


async def _load(url: str, args: argparse.Namespace, num_clients: int) -> dict[str, Any]:
    records: list[RequestRecord] = []
    counts = {"posted": 0, "feedback_failed": 0}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        client = AsyncClient(url, max_retries=0, timeout_s=120.0, session=session)
        start = time.perf_counter()
        await asyncio.gather(*(_client(client, i, args, start, counts, records) for i in range(num_clients)))
        wall_s = time.perf_counter() - start
        adapters = await client.adapters()
    return {"records": records, "wall_s": wall_s, "pairs_posted": counts["posted"],
            "feedback_failed": counts["feedback_failed"], "pairs_stepped": adapters.get("pairs_stepped", 0),
            "adapter_version": (adapters.get("serving") or {}).get("version")}


def _run(args: argparse.Namespace, policy: str, num_clients: int, logs: Path) -> dict[str, Any]:
    log_path = logs / f"{policy}-{num_clients}.log"
    with spawned_server(args.model, "--policy", policy, log_path=log_path, ready_timeout_s=600.0) as url:
        run = asyncio.run(_load(url, args, num_clients))
    slos = re.search(r"default SLOs: TTFT (\d+) ms, TBT (\d+) ms", log_path.read_text())
    run["server_default_slo_ms"] = {"ttft": float(slos[1]), "tbt": float(slos[2])} if slos else None
    return run


def _row(policy: str, num_clients: int, run: dict[str, Any], slo_ttft_ms: float, slo_tpot_ms: float) -> dict[str, Any]:
    records = run.pop("records")
    s = summarize(records, slo_ttft_ms, slo_tpot_ms)
    ms = lambda v: None if v is None else round(v, 2)
    return {"clients": num_clients, "policy": policy, "requests": s.num_requests, "completed": s.num_ok,
            "errors": s.num_failed + s.num_unfinished, "ttft_p50_ms": ms(s.ttft_ms.p50), "ttft_p99_ms": ms(s.ttft_ms.p99),
            "tpot_p50_ms": ms(s.tpot_ms.p50), "tpot_p99_ms": ms(s.tpot_ms.p99), "gap_p50_ms": ms(s.itl_ms.p50),
            "gap_p99_ms": ms(s.itl_ms.p99), "slo_ttft_ms": slo_ttft_ms, "slo_tpot_ms": slo_tpot_ms,
            "slo_attainment": s.slo_attainment, "goodput_per_s": s.goodput_per_s, **run,
            "records": [{"ttft_ms": r.ttft_s * 1e3 if r.is_ok else None,
                         "tpot_ms": r.tpot_s * 1e3 if r.is_ok and r.tpot_s is not None else None,
                         "num_tokens": r.num_output_tokens, "error": r.error} for r in records]}


def _compare(rows: list[dict[str, Any]]) -> None:
    """Each row against inference-only and synchronous at its client count, in place."""
    for row in rows:
        cell = {r["policy"]: r for r in rows if r["clients"] == row["clients"]}
        base, sync = cell[BASELINE], cell.get("synchronous")
        row["gap_p99_vs_inference_only"] = (round(row["gap_p99_ms"] / base["gap_p99_ms"], 3)
                                            if row["gap_p99_ms"] and base["gap_p99_ms"] else None)
        row["attainment_vs_inference_only_pts"] = round(100 * (row["slo_attainment"] - base["slo_attainment"]), 1)
        row["pairs_stepped_vs_synchronous"] = (round(row["pairs_stepped"] / sync["pairs_stepped"], 3)
                                               if sync and sync["pairs_stepped"] else None)


def main(args: argparse.Namespace) -> dict[str, Any]:
    policies = args.policies.split(",")
    if BASELINE not in policies:
        raise SystemExit(f"mace bench policies --closed-loop: --policies needs {BASELINE}: its medians set the SLOs")
    policies = [BASELINE] + [p for p in policies if p != BASELINE]
    logs = Path(args.out).with_name(Path(args.out).stem + "-logs")  # one server log per run
    logs.mkdir(parents=True, exist_ok=True)
    started, rows = time.perf_counter(), []
    for num_clients in (int(c) for c in args.clients.split(",")):
        slo_ttft_ms = slo_tpot_ms = None
        for policy in policies:
            run = _run(args, policy, num_clients, logs)
            if policy == BASELINE:
                ok = [r for r in run["records"] if r.is_ok]
                if not any(r.tpot_s is not None for r in ok):
                    raise SystemExit(f"mace bench policies --closed-loop: {BASELINE} completed no request of 2+ "
                                     f"tokens at {num_clients} clients: no SLO to set; see {logs}")
                slo_ttft_ms = SLO_TTFT_FACTOR * distribution_ms([r.ttft_s for r in ok]).p50
                slo_tpot_ms = SLO_TPOT_FACTOR * distribution_ms([r.tpot_s for r in ok if r.tpot_s is not None]).p50
            rows.append(_row(policy, num_clients, run, slo_ttft_ms, slo_tpot_ms))
            print({k: v for k, v in rows[-1].items() if k != "records"}, flush=True)
    _compare(rows)
    report = {"command": "mace " + " ".join(sys.argv[1:]), "processor": cpu_name(), "model": args.model,
              "config": {k: v for k, v in vars(args).items() if k not in ("func", "bench", "bench_module")},
              "rows": rows, "run_s": round(time.perf_counter() - started, 1)}
    num = lambda v, fmt=".1f": "-" if v is None else format(v, fmt)
    intro = (f"Model `{args.model}`; closed loop: each client streams a chat answer ({args.output_len} tokens, greedy), "
             f"posts a feedback pair after every other one, for {args.duration:g} s; `mace serve --policy P` with its defaults; "
             f"SLO: TTFT <= {SLO_TTFT_FACTOR:g}x and TPOT <= {SLO_TPOT_FACTOR:g}x inference-only's medians at the same client "
             f"count; {report['processor']}; {report['run_s']:.0f} s. Command: `{report['command']}`.")
    header = ("| clients | policy | completed / errors | TTFT p50 / p99 | TPOT p50 / p99 | gap p50 / p99 | SLO (TTFT, TPOT) | "
              "attainment | goodput | pairs posted / stepped | adapter | gap p99 / inf-only | attainment vs inf-only | stepped / sync |")
    lines = [intro, "", header,
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['clients']} | {r['policy']} | {r['completed']} / {r['errors']} | {num(r['ttft_p50_ms'])} / "
                     f"{num(r['ttft_p99_ms'])} ms | {num(r['tpot_p50_ms'])} / {num(r['tpot_p99_ms'])} ms | "
                     f"{num(r['gap_p50_ms'])} / {num(r['gap_p99_ms'])} ms | {r['slo_ttft_ms']:.0f}, {r['slo_tpot_ms']:.1f} ms | "
                     f"{num(r['slo_attainment'] and 100 * r['slo_attainment'])}% | {num(r['goodput_per_s'], '.2f')}/s | "
                     f"{r['pairs_posted']} / {r['pairs_stepped']} | {num(r['adapter_version'], 'd')} | "
                     f"{num(r['gap_p99_vs_inference_only'], '.2f')}x | {r['attainment_vs_inference_only_pts']:+.1f} pts | "
                     f"{num(r['pairs_stepped_vs_synchronous'], '.2f')}x |")
    defaults = {r["policy"]: r["server_default_slo_ms"] for r in rows}
    lines += ["", f"mace serve's own default SLOs (its log): {defaults}"]
    save_results(args.out, report, "\n".join(lines))
    print("\n".join(lines))
    return report
