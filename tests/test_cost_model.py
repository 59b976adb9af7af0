"""The cost model, and the fine-tune budget each FCFS-planned policy gives (inference-only,
synchronous, periodic)."""

import math

import numpy as np
import pytest

from cache.block_pool import BlockPool
from engine.config import SchedulerConfig, TrainingConfig
from engine.plan import FinetuneOffer
from engine.sampling_params import SamplingParams
from scheduler.cost_model import PRIOR_COSTS, CostModel, IterationShape
from scheduler.policies import Periodic
from scheduler.queues import SequenceQueues
from tests.conftest import random_prompts

TRUE = np.array([0.004, 0.0009, 0.00002, 0.0011, 0.00003, 0.0025, 0.015])


def _shapes(n: int, seed: int = 0) -> list[IterationShape]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        ft = int(rng.choice([0, 0, 24, 48, 128, 256]))
        out.append(IterationShape(int(rng.integers(0, 64)), int(rng.integers(0, 40_000)), int(rng.integers(0, 32)),
                                  int(rng.integers(0, 20_000)), ft, int(ft > 0)))
    return out


def test_fit_recovers_the_coefficients():
    shapes = _shapes(200)
    model = CostModel.fit(shapes, [float(TRUE @ s.features()) for s in shapes])
    assert model.coefficients == pytest.approx(TRUE, rel=1e-6)


def test_online_correction_converges_from_a_wrong_prior():
    model = CostModel(PRIOR_COSTS)
    shapes = _shapes(400, seed=1)
    rng = np.random.default_rng(2)
    for s in shapes:
        model.observe(s, float(TRUE @ s.features()) * (1 + 0.02 * rng.standard_normal()))
    assert model.error_ratio < 0.05
    test = IterationShape(32, 20_000, 16, 8_000, 256, 1)
    assert model.predict(test) == pytest.approx(float(TRUE @ test.features()), rel=0.05)


def test_a_profile_file_round_trips(tmp_path):
    model = CostModel(TRUE)
    model.save(tmp_path / "p.json", {"model": "x"})
    assert CostModel.load(tmp_path / "p.json").coefficients == pytest.approx(TRUE)


def test_a_profile_without_the_per_chunk_cost_loads_with_none(tmp_path):
    import json

    from scheduler.cost_model import FEATURES

    (tmp_path / "old.json").write_text(json.dumps({"features": list(FEATURES[:6]), "coefficients": TRUE[:6].tolist()}))
    model = CostModel.load(tmp_path / "old.json")
    assert model.coefficients == pytest.approx([*TRUE[:6], 0.0]) and model.finetune_chunk_overhead() == 0.0
    (tmp_path / "bad.json").write_text(json.dumps({"features": ["intercept"], "coefficients": [0.1]}))
    with pytest.raises(ValueError, match="not a cost profile of this version"):
        CostModel.load(tmp_path / "bad.json")


def test_a_fine_tune_chunks_fixed_cost_is_told_from_its_tokens():
    """Small and large pieces measured: the fit prices a 24-token part at its fixed cost plus 24
    tokens, where a per-token price alone (through the origin) would give a third of it."""
    sizes = [24, 48, 128, 256]
    shapes = [IterationShape(num_finetune_tokens=n, num_finetune_chunks=1) for n in sizes]
    shapes += [IterationShape(num_decodes=d, decode_context=100 * d) for d in (1, 8, 16)]
    model = CostModel.fit(shapes, [float(TRUE @ s.features()) for s in shapes])
    part = IterationShape(num_finetune_tokens=24, num_finetune_chunks=1)
    assert model.predict(part) == pytest.approx(0.004 + 0.015 + 24 * 0.0025, rel=1e-6)
    assert model.finetune_chunk_overhead() == pytest.approx(0.015)


def test_small_fine_tune_pieces_are_priced_from_their_own_time():
    """Under a steady load (4 decodes every iteration, noisy; small pieces of 5-9 tokens beside
    two in three) with a prior that prices fine-tune work 4x low: given what each piece took,
    the fit prices a piece within 15%, and closer than from iteration totals alone."""
    prior = TRUE.copy()
    prior[5:7] /= 4  # finetune_tokens, finetune_chunks
    errors = {}
    for timed_apart in (True, False):
        model, rng = CostModel(prior), np.random.default_rng(3)
        for i in range(300):
            tokens = int(rng.integers(5, 10)) if i % 3 else 0
            inference = IterationShape(num_decodes=4, decode_context=400 + i)
            shape = IterationShape(num_decodes=4, decode_context=400 + i, num_finetune_tokens=tokens,
                                   num_finetune_chunks=int(tokens > 0))
            finetune_s = tokens * TRUE[5] + (tokens > 0) * TRUE[6]
            inference_s = float(TRUE @ inference.features()) * (1 + 0.2 * abs(rng.standard_normal()))
            model.observe(shape, inference_s + finetune_s, finetune_s if tokens and timed_apart else None)
        want = 7 * TRUE[5] + TRUE[6]
        errors[timed_apart] = abs(7 * model.cost_per_finetune_token() + model.finetune_chunk_overhead() - want) / want
    assert errors[True] < 0.15 and errors[True] < errors[False]


def _offer(smallest: int, whole: int | None = None) -> FinetuneOffer:
    return FinetuneOffer(smallest, whole or smallest, loss=0.69, wait_s=0.0)


@pytest.mark.parametrize("policy", ["synchronous", "inference-only"])
def test_the_fine_tune_budget_per_policy(make_engine, policy):
    core, _ = make_engine(policy=policy, slo_tbt_ms=100.0, slo_margin=0.1, finetune_tokens_per_iteration=512)
    assert core.policy.name == policy
    idle = core.policy.schedule(_offer(100))
    for i, prompt in enumerate(random_prompts([30] * 16, seed=1)):  # a full iteration: 64 tokens of prefill
        core.add_request(f"r{i}", prompt, SamplingParams(max_tokens=4))
    full = core.policy.schedule(_offer(100))
    assert sum(s.num_new_tokens for s in full.scheduled) == 64
    if policy == "inference-only":
        assert idle.finetune_tokens == full.finetune_tokens == 0
        return
    assert idle.finetune_tokens == full.finetune_tokens == 512  # synchronous: SLO-blind
    assert core.policy.schedule(_offer(100, whole=700)).finetune_tokens == 700  # at least one whole pair
    assert core.policy.schedule(None).finetune_tokens == 0
    assert idle.capacity_s is None and idle.predicted_s is None  # it plans by tokens, not time


def test_an_unknown_policy_is_refused_when_the_engine_is_built(make_engine):
    with pytest.raises(ValueError, match="policy must be one of inference-only, synchronous, periodic, mace"):
        make_engine(policy="fastest")


def test_profile_measures_every_kind_and_round_trips(make_engine, tmp_path):
    from scheduler.profiler import profile
    from trainer.feedback import FeedbackStore

    core, runner = make_engine(kv_cache_bytes=64 << 20, enable_prefix_caching=False, training=TrainingConfig(),
                               feedback_store=FeedbackStore(tmp_path / "f.sqlite3"))
    model, rows = profile(runner, core.config.model.max_model_len, quick=True, repeats=1, progress=False)
    kinds = {("prefill" if r["shape"]["num_prefill_tokens"] else "decode" if r["shape"]["num_decodes"] else "finetune")
             for r in rows}
    assert kinds == {"prefill", "decode", "finetune"} and len(rows) == 19
    ft = [r["shape"] for r in rows if r["shape"]["num_finetune_chunks"]]
    # whole pairs, one-sequence parts and reference passes (priced at a third a token), small and large
    # and the first one and three layer units of a 96-token part, priced by their share of it
    weights = runner.finetune_executor.stages.costs.weights(32, 64)
    units = [math.ceil(96 * sum(weights[:k]) / sum(weights)) for k in (1, 3)]
    assert [s["num_finetune_tokens"] for s in ft] == [60, 126, 252, 24, 48, *units, 20, 84]
    assert units[0] < units[1] < 96
    assert all(np.isfinite(model.coefficients)) and (model.coefficients >= 0).all()
    assert all(r["seconds"] > 0 for r in rows)
    model.save(tmp_path / "p.json", {"measurements": rows})
    assert CostModel.load(tmp_path / "p.json").coefficients == pytest.approx(model.coefficients)
    # activations saved for the backward: at least one hidden state per layer per token (fp32)
    hidden, layers = runner.model.config.hidden_size, runner.model.config.num_hidden_layers
    assert model.finetune_bytes_per_token > 4 * hidden * layers
    assert CostModel.load(tmp_path / "p.json").finetune_bytes_per_token == model.finetune_bytes_per_token
    # no gradient left behind, no step taken
    assert runner.finetune_executor.version == 0
    assert all(p.grad is None for p in runner.finetune_executor.params)


def test_periodic_bursts_train_every_period_until_the_pairs_run_out():
    now = [1000.0]
    config = SchedulerConfig(policy="periodic", retrain_period_s=60.0, finetune_tokens_per_iteration=512,
                             max_num_batched_tokens=64).with_slos()
    policy = Periodic(SequenceQueues(BlockPool(8, 16)), config, CostModel(PRIOR_COSTS), lambda: now[0])
    assert policy.next_burst_s == 1060.0  # a period after start
    waiting = _offer(100)
    assert policy.schedule(waiting).finetune_tokens == 0  # between bursts: nothing, however much waits
    now[0] = 1061.0
    assert policy.schedule(waiting).finetune_tokens == 512  # the burst: full chunks
    now[0] = 1062.0
    assert policy.schedule(waiting).finetune_tokens == 512
    now[0] = 1063.0
    assert policy.schedule(None).finetune_tokens == 0 and policy.next_burst_s == 1123.0  # ran out
    now[0] = 1100.0
    assert policy.schedule(waiting).finetune_tokens == 0  # new feedback: waits for the next burst
    now[0] = 1123.0
    assert policy.schedule(waiting).finetune_tokens == 512


def test_no_windup_when_a_feature_goes_unused_for_long():
    model = CostModel(PRIOR_COSTS)
    shape = IterationShape(num_decodes=16, decode_context=4000)  # never any fine-tune or prefill work
    for _ in range(50_000):
        model.observe(shape, float(TRUE @ shape.features()))
    assert np.isfinite(model.coefficients).all()
    assert model.predict(shape) == pytest.approx(float(TRUE @ shape.features()), rel=1e-3)
    busy = IterationShape(num_decodes=16, decode_context=4000, num_finetune_tokens=256, num_finetune_chunks=1)
    for _ in range(200):  # fine-tune work comes back: the model picks its cost up again
        model.observe(busy, float(TRUE @ busy.features()))
    assert model.predict(busy) == pytest.approx(float(TRUE @ busy.features()), rel=0.05)


def test_default_slos_come_from_the_profile():
    from scheduler.cost_model import suggest_slos

    # TBT: 2 x (4 + 16 x 1.1 + 8.192 x 0.03) ms = 43.7 -> 45 ms (5 ms steps);
    # TTFT: 2 x (4 + 1024 x 0.9 + 524.288 x 0.02) ms = 1872.2 -> 1900 ms (50 ms steps)
    assert suggest_slos(CostModel(TRUE), max_num_seqs=64) == (1900.0, 45.0)
    assert suggest_slos(CostModel(np.zeros(7)), max_num_seqs=64) == (200.0, 20.0)  # the floors


def test_nnls_matches_a_brute_force_search_over_active_sets():
    import itertools

    from scheduler.cost_model import nnls

    rng = np.random.default_rng(3)
    for _ in range(20):
        a, b = rng.standard_normal((12, 5)), rng.standard_normal(12)
        best = min(
            (np.linalg.norm(a @ x - b), tuple(x))
            for k in range(6) for cols in itertools.combinations(range(5), k)
            for x in [_on(cols, np.linalg.lstsq(a[:, list(cols)], b, rcond=None)[0] if cols else [], 5)]
            if (x >= 0).all()
        )
        got = nnls(a, b)
        assert (got >= 0).all()
        assert np.linalg.norm(a @ got - b) == pytest.approx(best[0], rel=1e-9, abs=1e-12)


def _on(cols, values, n):
    x = np.zeros(n)
    x[list(cols)] = values
    return x
