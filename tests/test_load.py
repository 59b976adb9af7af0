"""The workload (arrival processes, synthetic requests, trace replay) and the open-loop load
generator against a real tiny server: its bounds, its concurrency cap, its feedback pairs."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from clients import AsyncClient
from clients.load import LoadConfig, choose_rated, run_load
from clients.metrics import RequestRecord, summarize
from clients.oracle import drift_oracle
from clients.workload import (
    OutputLengths,
    RequestSpec,
    TraceError,
    bounded,
    gamma_arrivals,
    poisson_arrivals,
    read_trace,
    synthetic_requests,
)

# -- arrival processes --------------------------------------------------------------------------


def test_arrivals_are_seeded_and_increasing():
    a = gamma_arrivals(4.0, burstiness=2.0, seed=3, num_requests=50)
    assert a == gamma_arrivals(4.0, burstiness=2.0, seed=3, num_requests=50)
    assert a != gamma_arrivals(4.0, burstiness=2.0, seed=4, num_requests=50)
    assert len(a) == 50 and a[0] > 0 and all(y >= x for x, y in zip(a, a[1:]))
    assert poisson_arrivals(4.0, seed=3, num_requests=5) == gamma_arrivals(4.0, burstiness=1.0, seed=3, num_requests=5)


def test_bounds_cut_one_and_the_same_sequence():
    long = poisson_arrivals(10.0, seed=1, num_requests=3000)
    assert poisson_arrivals(10.0, seed=1, duration_s=30.0) == [t for t in long if t < 30.0]
    assert poisson_arrivals(10.0, seed=1, num_requests=7, duration_s=1e9) == long[:7]
    assert poisson_arrivals(10.0, seed=1, num_requests=3000, duration_s=2.0) == [t for t in long if t < 2.0]
    assert poisson_arrivals(10.0, seed=1, num_requests=0) == []
    with pytest.raises(ValueError, match="needs a bound"):
        poisson_arrivals(10.0)
    with pytest.raises(ValueError):
        gamma_arrivals(0.0, num_requests=3)


@pytest.mark.parametrize("burstiness", [0.5, 1.0, 3.0])
def test_mean_rate_and_burstiness_as_coefficient_of_variation(burstiness):
    gaps = np.diff([0.0, *gamma_arrivals(5.0, burstiness=burstiness, seed=0, num_requests=40_000)])
    assert gaps.mean() == pytest.approx(1 / 5.0, rel=0.05)
    assert gaps.std() / gaps.mean() == pytest.approx(burstiness, rel=0.08)


def test_synthetic_requests_and_output_lengths():
    lengths = OutputLengths.parse("4:9")
    specs = synthetic_requests([0.5, 1.0, 1.5] * 100, lengths, seed=2)
    assert specs == synthetic_requests([0.5, 1.0, 1.5] * 100, lengths, seed=2)
    assert {s.max_tokens for s in specs} == set(range(4, 10))
    assert all(s.is_chat and len(s.messages) == 1 and s.messages[0]["role"] == "user" for s in specs)
    assert len({s.messages[0]["content"] for s in specs}) > 20
    assert OutputLengths.parse("32") == OutputLengths(32, 32)
    for bad in ("0", "9:4", "x", "3:"):
        with pytest.raises(ValueError):
            OutputLengths.parse(bad)


# -- traces -------------------------------------------------------------------------------------


def test_read_trace_sorts_by_arrival_and_keeps_file_order_on_ties(tmp_path):
    path = tmp_path / "t.jsonl"
    rows = [{"arrival_s": 2.5, "prompt": "late", "max_tokens": 4},
            {"arrival_s": 0, "messages": [{"role": "user", "content": "first"}], "max_tokens": 8},
            {"arrival_s": 1.0, "prompt": "tie a", "max_tokens": 2},
            {"arrival_s": 1.0, "prompt": "tie b", "max_tokens": 3}]
    path.write_text("\n".join(json.dumps(r) for r in rows[:2]) + "\n\n" + "\n".join(json.dumps(r) for r in rows[2:]))
    specs = read_trace(path)
    assert [s.arrival_s for s in specs] == [0.0, 1.0, 1.0, 2.5]
    assert specs[0] == RequestSpec(0.0, 8, messages=({"role": "user", "content": "first"},))
    assert [s.prompt for s in specs[1:]] == ["tie a", "tie b", "late"] and specs[3].max_tokens == 4
    assert bounded(specs, num_requests=2) == specs[:2] and bounded(specs, duration_s=1.0) == specs[:1]


@pytest.mark.parametrize("line, needle", [
    ("not json", "not JSON"),
    ("[1, 2]", "JSON object"),
    ('{"arrival_s": 1, "max_tokens": 4}', "exactly one of prompt and messages"),
    ('{"arrival_s": 1, "max_tokens": 4, "prompt": "a", "messages": [{"role": "user", "content": "b"}]}',
     "exactly one of prompt and messages"),
    ('{"prompt": "a", "max_tokens": 4}', "missing arrival_s"),
    ('{"arrival_s": -1, "prompt": "a", "max_tokens": 4}', "arrival_s must be"),
    ('{"arrival_s": "soon", "prompt": "a", "max_tokens": 4}', "arrival_s must be a number"),
    ('{"arrival_s": 1, "prompt": "a", "max_tokens": 0}', "max_tokens must be >= 1"),
    ('{"arrival_s": 1, "prompt": "a", "max_tokens": 2.5}', "max_tokens must be an integer"),
    ('{"arrival_s": 1, "prompt": " ", "max_tokens": 4}', "prompt must be a non-empty string"),
    ('{"arrival_s": 1, "messages": [{"role": "user"}], "max_tokens": 4}', "messages[0]"),
    ('{"arrival_s": 1, "prompt": "a", "max_tokens": 4, "output_len": 9}', "unknown key(s) output_len"),
])
def test_bad_trace_lines_name_their_line(tmp_path, line, needle):
    path = tmp_path / "bad.jsonl"
    good = json.dumps({"arrival_s": 0.5, "prompt": "ok", "max_tokens": 4})
    path.write_text(f"{good}\n\n{line}\n{good}\n")
    with pytest.raises(TraceError) as err:
        read_trace(path)
    assert str(err.value).startswith(f"{path}:3: ") and needle in str(err.value)


def test_an_empty_trace_is_refused(tmp_path):
    (tmp_path / "e.jsonl").write_text("\n\n")
    with pytest.raises(TraceError, match="no requests"):
        read_trace(tmp_path / "e.jsonl")


# -- the load generator against a real server ---------------------------------------------------

FAST = {"show_progress": False, "temperature": 1.0}


def mixed_specs(arrivals: list[float], max_tokens: int = 4) -> list[RequestSpec]:
    """Chat and completion requests, alternating."""
    return [RequestSpec(t, max_tokens, messages=({"role": "user", "content": f"Say something, {i}."},))
            if i % 2 == 0 else RequestSpec(t, max_tokens, prompt=f"Once upon a time {i}") for i, t in enumerate(arrivals)]


async def server_request_count(url: str) -> int:
    """Finished sequences by the server's own count (``mace_requests_total``, all outcomes)."""
    counts = await server_sequences(url)
    return sum(counts[outcome] for outcome in ("stop", "length", "abort", "error", "rejected"))


async def server_sequences(url: str) -> dict[str, int]:
    """The server's own view of its sequences: finished ones by outcome (``mace_requests_total``),
    those still ``running`` or ``waiting``, and the engine's ``iterations`` so far."""
    import aiohttp

    async with aiohttp.ClientSession() as http, http.get(f"{url}/metrics") as r:
        text = await r.text()
    counts = {}
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        if name.startswith('mace_requests_total{outcome="'):
            counts[name.split('"')[1]] = round(float(value))
        elif name in ("mace_requests_running", "mace_requests_waiting"):
            counts[name.removeprefix("mace_requests_")] = round(float(value))
        elif name == "mace_engine_iterations":
            counts["iterations"] = round(float(value))
    return counts


def max_overlap(records: list[RequestRecord]) -> int:
    """The most requests in flight at once, from their [send, end] intervals (an end before a
    start at the same instant)."""
    events = sorted([(r.send_s, 1) for r in records if r.send_s is not None]
                    + [(r.end_s, -1) for r in records if r.send_s is not None])
    level = peak = 0
    for _, step in events:
        level += step
        peak = max(peak, level)
    return peak


async def test_count_bound_is_exact_and_every_request_is_measured(start_server):
    async with start_server() as (url, _):
        specs = mixed_specs([0.02 * i for i in range(20)])
        result = await run_load(specs, LoadConfig(url, num_requests=6, **FAST))
        assert await server_request_count(url) == 6
    assert [r.index for r in result.records] == list(range(6))
    assert all(r.is_ok and r.num_output_tokens == 4 and r.finish_reason == "length" for r in result.records)
    assert all(r.arrival_s == specs[r.index].arrival_s <= r.send_s < r.token_times_s[0] <= r.end_s
               for r in result.records)
    assert result.rated == [] and result.num_feedback_posted == 0
    s = summarize(result.records, slo_ttft_ms=60_000, slo_tbt_ms=60_000)
    assert (s.num_ok, s.num_output_tokens, s.num_attained, s.ttft_ms.count, s.itl_ms.count) == (6, 24, 6, 6, 18)


async def test_concurrency_cap_is_never_exceeded_and_queueing_counts_in_ttft(start_server):
    async with start_server() as (url, _):
        specs = mixed_specs([0.0] * 12, max_tokens=6)  # all at once, 3 slots
        result = await run_load(specs, LoadConfig(url, concurrency=3, **FAST))
    records = result.records
    assert all(r.is_ok for r in records)
    assert max_overlap(records) == result.max_in_flight == 3  # reached, never passed
    first_end_s = min(r.end_s for r in records)
    waited = [r for r in records if r.send_s >= first_end_s]
    assert len(waited) == 9  # each waited for a slot to free up
    assert all(r.ttft_s > first_end_s - r.arrival_s for r in waited)  # and the wait is in its TTFT


async def test_duration_bound_stops_sending_and_the_drain_cancels_the_rest(start_server):
    duration_s, drain_s = 1.0, 0.3
    async with start_server() as (url, _):
        specs = mixed_specs(poisson_arrivals(30.0, seed=0, num_requests=200), max_tokens=600)
        result = await run_load(specs, LoadConfig(url, duration_s=duration_s, drain_timeout_s=drain_s,
                                                  concurrency=4, **FAST))
        records = result.records
        cancelled = [r for r in records if r.error == "cancelled at the drain timeout"]
        num_ok = sum(r.is_ok for r in records)
        at_return = await server_sequences(url)
        # The cancelled streams closed their connections, so the server aborts them: poll (bounded)
        # until nothing of the load runs or waits there any more.
        for _ in range(300):
            seen = await server_sequences(url)
            if seen["running"] == seen["waiting"] == 0 and seen["length"] == num_ok:
                break
            await asyncio.sleep(0.02)
        # nothing of the run goes on on the server: each cancelled request was aborted there
        # (one that had streamed a token certainly reached it), each finished one ended at its length
        assert (seen["running"], seen["waiting"], seen["length"]) == (0, 0, num_ok)
        assert 1 <= sum(bool(r.token_times_s) for r in cancelled) <= seen["abort"] <= len(cancelled)
        assert seen["stop"] == seen["error"] == seen["rejected"] == 0
        # and aborted at once, not run to their end: a sequence left running would need one more
        # iteration per token still to come (hundreds of its 600); the engine went idle long before
        assert seen["iterations"] - at_return["iterations"] < 600 - max(len(r.token_times_s) for r in cancelled) - 50
    assert len(records) == sum(s.arrival_s < duration_s for s in specs[:200])  # about 30
    assert all(r.arrival_s < duration_s for r in records)
    assert all(r.send_s < duration_s for r in records if r.send_s is not None)
    # 600 tokens take far longer than the drain: what was in flight was cancelled, the rest never sent
    never_sent = [r for r in records if r.send_s is None]
    assert 1 <= len(cancelled) <= 4 and len(cancelled) + len(never_sent) + num_ok == len(records)
    # cancelled only once the drain timeout had run out after the duration (on the run's own clock;
    # a lower bound, which a slow machine only makes later; 10 ms for the timers' resolution)
    assert all(r.is_unfinished and duration_s + drain_s - 0.01 <= r.end_s <= result.wall_s for r in cancelled)
    assert all(r.is_unfinished and r.error.startswith("not sent") and not r.token_times_s for r in never_sent)
    assert summarize(records, 1e9, 1e9).num_unfinished == len(cancelled) + len(never_sent)


async def test_retrain_rate_posts_the_seeded_share_as_judged_pairs(start_server, tmp_path, demo_model_dir):
    from transformers import AutoTokenizer

    from trainer.feedback import FeedbackStore

    store = FeedbackStore(tmp_path / "f.sqlite3")
    oracle = drift_oracle(None)  # vowels throughout
    async with start_server(feedback_store=store) as (url, _):
        specs = mixed_specs([0.01 * i for i in range(8)], max_tokens=8)
        result = await run_load(specs, LoadConfig(url, retrain_rate=0.5, seed=7, **FAST), oracle)
        async with AsyncClient(url) as client:
            stats = await client.feedback_stats()
        pairs = store.pending(100)
    assert result.rated == choose_rated(8, 0.5, 7) and len(result.rated) == 4
    assert result.num_feedback_failed == 0
    assert result.num_feedback_posted + result.num_feedback_skipped == 4
    assert result.num_feedback_posted >= 3  # ties of 8-token random answers are rare
    assert stats.received == result.num_feedback_posted
    assert len(pairs) == result.num_feedback_posted
    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir)  # chat pairs are kept as the template renders them
    is_chat_by_prompt = {
        specs[i].prompt if not specs[i].is_chat else
        tokenizer.apply_chat_template(list(specs[i].messages), tokenize=False, add_generation_prompt=True): specs[i].is_chat
        for i in result.rated}
    for pair in pairs:
        assert pair.is_chat == is_chat_by_prompt[pair.prompt]
        assert pair.id.rsplit("-", 1)[1] in {str(i) for i in result.rated}
        assert oracle.score(pair.chosen, 0.0) > oracle.score(pair.rejected, 0.0)


async def test_ties_post_nothing(start_server, tmp_path):
    import string

    from clients.oracle import Phase, PreferenceOracle
    from trainer.feedback import FeedbackStore

    likes_every_letter = PreferenceOracle([(0.0, Phase("all", frozenset(string.ascii_lowercase)))])
    async with start_server(feedback_store=FeedbackStore(tmp_path / "f.sqlite3")) as (url, _):
        specs = mixed_specs([0.0] * 4, max_tokens=8)
        result = await run_load(specs, LoadConfig(url, retrain_rate=1.0, **FAST), likes_every_letter)
        async with AsyncClient(url) as client:
            stats = await client.feedback_stats()
    assert result.rated == [0, 1, 2, 3] and all(r.is_ok for r in result.records)
    assert (result.num_feedback_posted, result.num_feedback_skipped, stats.received) == (0, 4, 0)


async def test_mace_load_cli_prints_the_table_and_writes_json(start_server, tmp_path, capsys):
    from server.cli import main

    out, trace = tmp_path / "load.json", tmp_path / "trace.jsonl"
    trace.write_text('{"arrival_s": 0.05, "prompt": "Once", "max_tokens": 3}\n'
                     '{"arrival_s": 0.0, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}\n')
    async with start_server() as (url, _):
        argv = ["load", "--url", url, "--rate", "50", "--num-requests", "5", "--max-tokens", "3:5",
                "--arrival", "bursty", "--burstiness", "2", "--seed", "1", "--no-progress", "--out", str(out)]
        await asyncio.to_thread(main, argv)  # the cli runs its own event loop
        report = json.loads(out.read_text())
        printed = capsys.readouterr().out
        await asyncio.to_thread(main, ["load", "--url", url, "--arrival", "trace", "--trace", str(trace), "--no-progress",
                                       "--out", str(out)])
        replayed = json.loads(out.read_text())
    assert report["summary"]["num_requests"] == 5 and report["summary"]["num_ok"] == 5
    assert len(report["records"]) == 5 and all(3 <= len(r["token_times_s"]) <= 5 for r in report["records"])
    assert report["config"]["num_requests"] == 5 and report["config"]["retrain_rate"] == 0.0
    assert "TTFT" in printed and "5 (5 ok, 0 failed, 0 unfinished)" in printed and f"wrote {out}" in printed
    assert [len(r["token_times_s"]) for r in replayed["records"]] == [2, 3]  # sorted by arrival
    with pytest.raises(SystemExit, match="needs a bound"):
        main(["load", "--url", "http://127.0.0.1:9"])
    with pytest.raises(SystemExit, match="needs --trace"):
        main(["load", "--url", "http://127.0.0.1:9", "--arrival", "trace"])


async def test_top_k_reaches_the_server(start_server, tmp_path):
    """top_k=1 is greedy: both answers of every rated request are the same text, so the oracle
    ties on each and nothing is posted (at top_k 0, 8-token random answers almost never tie)."""
    from trainer.feedback import FeedbackStore

    async with start_server(feedback_store=FeedbackStore(tmp_path / "f.sqlite3")) as (url, _):
        specs = mixed_specs([0.0] * 4, max_tokens=8)
        result = await run_load(specs, LoadConfig(url, retrain_rate=1.0, top_k=1, **FAST), drift_oracle(None))
        async with AsyncClient(url) as client:
            greedy = await client.chat(list(specs[0].messages), max_tokens=8, temperature=0.0, ignore_eos=True)
    assert all(r.is_ok for r in result.records) and result.rated == [0, 1, 2, 3]
    assert (result.num_feedback_posted, result.num_feedback_skipped) == (0, 4)
    assert greedy.choices[0].message.content  # not blank: the skips were ties, not empty answers
