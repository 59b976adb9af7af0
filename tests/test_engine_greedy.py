"""Greedy output equals transformers' own generate, token for token."""

import pytest
import torch

from engine import attention
from engine.sampling_params import SamplingParams
from scheduler.builder import generate
from tests.conftest import random_prompts

LENGTHS = [5, 130, 17, 1, 64, 33, 200, 16, 48]  # mixed, block-aligned and not
MAX_NEW = [24, 8, 16, 20, 12, 24, 6, 18, 10]
ARRIVE_AT = [0, 0, 1, 2, 2, 3, 5, 8, 13]  # the iteration each request joins


def _avx512() -> bool:
    with open("/proc/cpuinfo") as f:
        return "avx512f" in f.read()


def reference(model, prompt, max_new):
    out = model.generate(
        torch.tensor([prompt]), max_new_tokens=max_new, min_new_tokens=max_new, do_sample=False
    )
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("model_name", ["demo", "qwen2", "head64"])
@pytest.mark.parametrize("chunked", [True, False])
@pytest.mark.parametrize("decode_attention", ["auto", "sdpa"])  # the C kernels, and gather + SDPA
def test_greedy_matches_generate_with_staggered_arrivals(
    model_name, chunked, decode_attention, make_engine, reference_models, demo_model_dir, qwen2_model_dir,
    head64_model_dir, monkeypatch
):
    path = {"demo": demo_model_dir, "qwen2": qwen2_model_dir, "head64": head64_model_dir}[model_name]
    covered = []  # what the C prefill attention answered, each time it was offered a chunk
    real_prefill_attention = attention.prefill_attention

    def prefill_attention(*args):
        covered.append(real_prefill_attention(*args))
        return covered[-1]

    monkeypatch.setattr(attention, "prefill_attention", prefill_attention)
    core, runner = make_engine(
        model=path, enable_chunked_prefill=chunked, max_num_batched_tokens=48, decode_attention=decode_attention
    )
    assert (runner.decode_kernel is not None) == (decode_attention == "auto")
    prompts = random_prompts(LENGTHS, seed=7)
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in MAX_NEW]
    got: dict[str, list[int]] = {}
    iteration = 0
    max_tokens_per_iteration = 0
    while iteration <= max(ARRIVE_AT) or core.has_work:
        for i, at in enumerate(ARRIVE_AT):
            if at == iteration:
                core.add_request(f"r{i}", prompts[i], params[i])
                got[f"r{i}"] = []
        plan = core.schedule()
        if plan is not None:
            max_tokens_per_iteration = max(max_tokens_per_iteration, plan.num_tokens)
            for out in core.process_result(runner.execute(plan)):
                got[out.request_id].extend(out.new_token_ids)
        iteration += 1
        core.check_integrity()
        assert iteration < 500

    ref_model = reference_models(path)
    for i, prompt in enumerate(prompts):
        assert got[f"r{i}"] == reference(ref_model, prompt, MAX_NEW[i]), f"request {i} ({len(prompt)} tokens)"
    # Fresh prompts (whole, or their first chunk) were offered to the C causal attention when the C
    # kernels are on; it took them where the heads are 64 wide (and the CPU has AVX-512).
    if decode_attention == "auto":
        assert len(covered) >= len(LENGTHS)  # once a layer for each prompt's first chunk at least
        assert all(covered) if model_name == "head64" and _avx512() else not any(covered)
    else:
        assert covered == []
    # Every block is back.
    assert core.pool.num_free_blocks == core.pool.num_blocks
    if chunked:
        assert max_tokens_per_iteration <= 48  # prompts were cut into chunks
    else:
        assert max_tokens_per_iteration >= 200  # the 200-token prompt went in whole


def test_preemption_under_a_small_pool_keeps_outputs_exact(make_engine, reference_models, demo_model_dir):
    # 12 blocks of 16 tokens for 6 sequences that each grow to ~5 blocks: preemption must happen.
    core, runner = make_engine(kv_cache_bytes=12 * 2 * 4 * 16 * 2 * 32 * 4, max_num_batched_tokens=64)
    assert core.pool.num_blocks == 12
    prompts = random_prompts([40, 50, 30, 60, 45, 35], seed=3)
    params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    for i, p in enumerate(prompts):
        core.add_request(f"r{i}", p, params)
    got = {f"r{i}": [] for i in range(len(prompts))}
    steps = 0
    while core.has_work:
        for out in core.step(runner):
            got[out.request_id].extend(out.new_token_ids)
        core.check_integrity()
        steps += 1
        assert steps < 1000
    assert core.queues.num_preemptions > 0
    ref_model = reference_models(demo_model_dir)
    for i, p in enumerate(prompts):
        assert got[f"r{i}"] == reference(ref_model, p, 30)
    assert core.pool.num_free_blocks == 12


def test_mistral_greedy_matches_generate_and_context_stops_at_the_window(
    make_engine, reference_models, mistral_model_dir
):
    core, runner = make_engine(model=mistral_model_dir, max_num_batched_tokens=32)
    assert core.config.model.max_model_len == 256  # the sliding window, not the 512 positions
    prompts = random_prompts([3, 40, 90, 150], seed=8)
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    got = generate(core, runner, prompts, params)
    ref_model = reference_models(mistral_model_dir)
    assert got == [reference(ref_model, p, 16) for p in prompts]
    assert core.pool.num_free_blocks == core.pool.num_blocks


def test_qwen3_greedy_matches_generate(make_engine, reference_models, qwen3_model_dir):
    core, runner = make_engine(model=qwen3_model_dir, max_num_batched_tokens=32)
    prompts = random_prompts([5, 37, 120], seed=12)
    got = generate(core, runner, prompts, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    ref_model = reference_models(qwen3_model_dir)
    assert got == [reference(ref_model, p, 12) for p in prompts]
