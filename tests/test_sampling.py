"""Seeded sampling, top-k/top-p, log-probs of sampled tokens and of a given text."""

import math

import pytest
import torch

from engine.sampling import _apply_top_k_top_p, sample
from engine.sampling_params import InvalidRequestError, SamplingParams
from scheduler.builder import generate
from tests.conftest import random_prompts


def test_top_k_top_p_mask_exact_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.2, 0.1], [0.1, 0.6, 0.25, 0.05]]))
    masked = _apply_top_k_top_p(logits.clone(), top_k=[2, 0], top_p=[1.0, 0.8])
    kept = torch.isfinite(masked).tolist()
    # Row 0: top-2 keeps 0.5 and one 0.2 (ties broken by sort). Row 1: 0.6 + 0.25 reach 0.8.
    assert sum(kept[0]) == 2 and kept[0][0]
    assert kept[1] == [False, True, True, False]
    # The kept logits are untouched.
    assert torch.equal(masked[1, 1:3], logits[1, 1:3])


def test_top_k_rows_mask_as_a_full_sort_does():
    """Rows that all have a top-k are masked from their top max(k) (no full sort); the result is
    the same as when another row (k = 0) makes the whole vocabulary sorted."""
    torch.manual_seed(0)
    logits = torch.randn(32, 1000)
    ks = torch.randint(1, 200, (32,)).tolist()
    ps = (torch.rand(32) * 0.5 + 0.5).tolist()
    fast = _apply_top_k_top_p(logits, ks, ps)
    sorted_path = _apply_top_k_top_p(torch.cat([logits, logits[:1]]), ks + [0], ps + [0.9])[:32]
    assert torch.equal(torch.isfinite(fast), torch.isfinite(sorted_path))
    assert torch.equal(fast[torch.isfinite(fast)], logits[torch.isfinite(fast)])  # kept logits untouched
    assert [int(n) for n in torch.isfinite(fast).sum(-1)] != ks  # top_p cut some rows further
    assert all(int(n) <= k for n, k in zip(torch.isfinite(fast).sum(-1), ks))


def test_sample_draws_match_probabilities():
    probs = torch.tensor([0.7, 0.2, 0.1])
    logits = probs.log().expand(1, 3)
    params = SamplingParams(temperature=1.0)
    counts = [0, 0, 0]
    for i in range(3000):
        tokens, _ = sample(logits, [params], [12345], [i])
        counts[tokens[0]] += 1
    freqs = [c / 3000 for c in counts]
    for f, p in zip(freqs, probs.tolist()):
        assert abs(f - p) < 0.03


def test_seeded_sampling_is_independent_of_the_batch(make_engine):
    prompts = random_prompts([12, 40, 7, 90, 25], seed=11)
    params = SamplingParams(max_tokens=20, temperature=0.9, top_p=0.95, top_k=50, seed=42, ignore_eos=True)
    core, runner = make_engine()
    alone = generate(core, runner, [prompts[0]], params)[0]
    others = SamplingParams(max_tokens=25, temperature=1.3, seed=7, ignore_eos=True)
    core, runner = make_engine(max_num_batched_tokens=32)
    batched = generate(core, runner, prompts, [params] + [others] * 4)[0]
    assert alone == batched
    # A different seed gives a different sequence; no seed differs from run to run of the engine.
    core, runner = make_engine()
    other_seed = generate(core, runner, [prompts[0]], SamplingParams(max_tokens=20, temperature=0.9, seed=43, ignore_eos=True))[0]
    assert other_seed != alone


def test_top_k_one_is_greedy(make_engine):
    prompts = random_prompts([30, 9], seed=5)
    core, runner = make_engine()
    greedy = generate(core, runner, prompts, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    core, runner = make_engine()
    top1 = generate(core, runner, prompts, SamplingParams(max_tokens=12, temperature=1.5, top_k=1, seed=3, ignore_eos=True))
    assert greedy == top1


def test_logprobs_of_sampled_tokens_match_the_reference(make_engine, reference_models, demo_model_dir):
    prompt = random_prompts([20], seed=9)[0]
    core, runner = make_engine()
    core.add_request("a", prompt, SamplingParams(max_tokens=5, temperature=0.8, seed=1, logprobs=3, ignore_eos=True))
    outputs = []
    while core.has_work:
        outputs.extend(core.step(runner))
    tokens = [t for o in outputs for t in o.new_token_ids]
    lps = [lp for o in outputs for lp in o.new_logprobs]
    ref = reference_models(demo_model_dir)
    with torch.no_grad():
        logits = ref(torch.tensor([prompt + tokens])).logits[0].float()
    ref_lp = torch.log_softmax(logits, -1)
    for i, (tok, lp) in enumerate(zip(tokens, lps)):
        row = ref_lp[len(prompt) - 1 + i]
        assert lp.token_id == tok
        assert lp.logprob == pytest.approx(row[tok].item(), abs=1e-4)
        top_vals, top_ids = row.topk(3)
        assert [t for t, _ in lp.top] == top_ids.tolist()
        assert [v for _, v in lp.top] == pytest.approx(top_vals.tolist(), abs=1e-4)


@pytest.mark.parametrize("budget", [16, 512])  # scoring across prefill chunks, and in one
def test_prompt_logprobs_score_a_given_text(make_engine, reference_models, demo_model_dir, budget):
    prompt = random_prompts([70], seed=4)[0]
    core, runner = make_engine(max_num_batched_tokens=budget)
    core.add_request("s", prompt, SamplingParams(max_tokens=0, prompt_logprobs=2))
    outputs = []
    while core.has_work:
        outputs.extend(core.step(runner))
    assert len(outputs) == 1 and outputs[0].finished and outputs[0].new_token_ids == []
    scored = outputs[0].prompt_logprobs
    assert len(scored) == len(prompt) and scored[0] is None
    ref = reference_models(demo_model_dir)
    with torch.no_grad():
        ref_lp = torch.log_softmax(ref(torch.tensor([prompt])).logits[0].float(), -1)
    expected = [ref_lp[p - 1, prompt[p]].item() for p in range(1, len(prompt))]
    assert [s.token_id for s in scored[1:]] == prompt[1:]
    assert [s.logprob for s in scored[1:]] == pytest.approx(expected, abs=1e-4)
    assert all(len(s.top) == 2 for s in scored[1:])
    total = sum(expected)
    assert math.isfinite(total) and total < 0
    assert core.pool.num_free_blocks == core.pool.num_blocks


@pytest.mark.parametrize(
    "kwargs, param",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"logprobs": 21}, "logprobs"),
        ({"stop": ("",)}, "stop"),
        ({"stop": tuple("abcdefghijklmnopq")}, "stop"),
    ],
)
def test_bad_sampling_params_name_the_field(kwargs, param):
    with pytest.raises(InvalidRequestError) as err:
        SamplingParams(**kwargs)
    assert err.value.param == param
