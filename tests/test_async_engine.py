"""The asyncio engine over the worker thread."""

import asyncio
import threading

import pytest

from engine.sampling_params import InvalidRequestError, SamplingParams
from scheduler.async_engine import AsyncEngine
from scheduler.builder import generate
from tests.conftest import random_prompts

GREEDY = dict(temperature=0.0, ignore_eos=True)


async def collect(engine, prompt, params, request_id=None):
    tokens = []
    async for out in engine.generate(prompt, params, request_id):
        tokens.extend(out.new_token_ids)
    return tokens


async def test_concurrent_streams_match_the_inline_engine(make_engine):
    prompts = random_prompts([5, 60, 23, 110, 8, 41, 77, 3], seed=13)
    params = [SamplingParams(max_tokens=10 + i, **GREEDY) for i in range(len(prompts))]
    core, runner = make_engine()
    expected = generate(core, runner, prompts, params)

    engine = AsyncEngine(*make_engine())
    runner = engine.worker.runner
    real_execute, forward_threads = runner.execute, []

    def recording_execute(plan):  # which thread runs each iteration's forward
        forward_threads.append(threading.get_ident())
        return real_execute(plan)

    runner.execute = recording_execute
    await engine.start()
    try:
        got = await asyncio.wait_for(
            asyncio.gather(*(collect(engine, p, sp) for p, sp in zip(prompts, params))), timeout=120
        )
        assert got == expected
        # every iteration's forward ran on the worker thread, none on the event loop's
        assert len(forward_threads) == engine.num_iterations > 0
        assert set(forward_threads) == {engine.worker._thread.ident}
        assert threading.get_ident() not in forward_threads
        assert engine.core.pool.num_free_blocks == engine.core.pool.num_blocks
    finally:
        await engine.stop()
    assert not engine.worker._thread.is_alive()


async def test_leaving_a_stream_early_aborts_and_frees_blocks(make_engine):
    engine = AsyncEngine(*make_engine())
    await engine.start()
    try:
        stream = engine.generate(random_prompts([50])[0], SamplingParams(max_tokens=200, **GREEDY), "leaver")
        n = 0
        async for _ in stream:
            n += 1
            if n == 3:
                break
        await stream.aclose()
        assert "leaver" not in engine.core.sequences
        # Another request still runs to completion afterwards.
        tokens = await asyncio.wait_for(collect(engine, [5, 6, 7], SamplingParams(max_tokens=4, **GREEDY)), 60)
        assert len(tokens) == 4
        assert engine.core.pool.num_free_blocks == engine.core.pool.num_blocks
    finally:
        await engine.stop()


async def test_invalid_request_raises_before_any_output(make_engine):
    engine = AsyncEngine(*make_engine())
    await engine.start()
    try:
        with pytest.raises(InvalidRequestError):
            await collect(engine, random_prompts([2000])[0], SamplingParams())
        assert not engine.core.has_work
    finally:
        await engine.stop()


async def test_a_failed_forward_fails_its_requests_and_the_engine_goes_on(make_engine):
    from scheduler.async_engine import EngineError

    core, runner = make_engine()
    engine = AsyncEngine(core, runner)
    real_execute = runner.execute
    calls = {"n": 0}

    def flaky(plan):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("injected failure")
        return real_execute(plan)

    runner.execute = flaky
    await engine.start()
    try:
        with pytest.raises(EngineError, match="injected failure"):
            await asyncio.wait_for(collect(engine, [5, 6, 7, 8], SamplingParams(max_tokens=10, **GREEDY)), 60)
        assert core.pool.num_free_blocks == core.pool.num_blocks and not core.has_work
        tokens = await asyncio.wait_for(collect(engine, [5, 6, 7, 8], SamplingParams(max_tokens=3, **GREEDY)), 60)
        assert len(tokens) == 3
    finally:
        await engine.stop()


async def test_the_iteration_trace_has_one_line_per_iteration(make_engine):
    import io
    import json

    from scheduler.trace import IterationTrace

    text = io.StringIO()
    engine = AsyncEngine(*make_engine(policy="mace"), observers=[IterationTrace(text)])
    await engine.start()
    try:
        prompt = random_prompts([100], seed=3)[0]
        await asyncio.wait_for(collect(engine, prompt, SamplingParams(max_tokens=5, **GREEDY)), timeout=60)
    finally:
        await engine.stop()
    lines = [json.loads(line) for line in text.getvalue().splitlines()]
    assert len(lines) == engine.num_iterations
    # 100 prompt tokens in chunks of at most 64, then a decode per token after the first
    assert sum(t["prefill_tokens"] for t in lines) == 100 and sum(t["decodes"] for t in lines) == 4
    assert all(t["measured_s"] > 0 and t["predicted_s"] > 0 and t["capacity_s"] > 0 for t in lines)
    assert [t["iteration"] for t in lines] == sorted(t["iteration"] for t in lines)


def test_the_trace_counts_a_one_token_prompt_piece_as_prompt_work():
    import io
    import json

    from engine.plan import IterationPlan, IterationResult, SequenceChunk
    from scheduler.async_engine import IterationRecord
    from scheduler.trace import IterationTrace

    # a prompt's last token (samples output 0), a decode (samples output 3), a 4-token prompt piece
    chunks = [SequenceChunk(seq_id=1, token_ids=[9], start_pos=99, block_table=[0], sampling=SamplingParams()),
              SequenceChunk(seq_id=2, token_ids=[7], start_pos=12, block_table=[1], output_index=3),
              SequenceChunk(seq_id=3, token_ids=[1, 2, 3, 4], start_pos=0, block_table=[2])]
    text = io.StringIO()
    plan = IterationPlan(iteration=5, chunks=chunks, predicted_s=0.01)
    IterationTrace(text)(IterationRecord(plan, 1.0, 0.001, IterationResult(5, [], 6, total_s=0.02)))
    line = json.loads(text.getvalue())
    assert (line["decodes"], line["prefill_tokens"], line["iteration"]) == (1, 5, 5)
