"""The cost model and the fine-tune budget it gives each policy, with fixed costs."""

import numpy as np
import pytest

from scheduler.core import PRIOR_COSTS
from scheduler.cost_model import CostModel, IterationShape

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


class _Trainer:
    def __init__(self, smallest):
        self.smallest = smallest

    def next_pair_tokens(self):
        return self.smallest

    def next_whole_tokens(self):
        return self.smallest


@pytest.mark.parametrize("policy", ["synchronous", "inference-only"])
def test_the_fine_tune_budget_per_policy(make_engine, policy):
    core, _ = make_engine(policy=policy, slo_tbt_ms=100.0, slo_margin=0.1, finetune_tokens_per_iteration=512,
                          finetune_min_every=3)
    core.cost_model = CostModel([0.01, 0.001, 0.0, 0.002, 0.0, 0.0002])  # fixed: 0.2 ms per fine-tune token
    core.trainer = _Trainer(smallest=100)
    busy = IterationShape(num_decodes=20)  # 10 + 40 = 50 ms predicted; 90 ms allowed -> 40 ms of slack
    full = IterationShape(num_prefill_tokens=40, num_decodes=20)  # 90 ms: no slack
    idle = IterationShape()
    if policy == "inference-only":
        assert core._finetune_budget(busy) == core._finetune_budget(idle) == 0
        return
    assert core._finetune_budget(busy) == core._finetune_budget(full) == 512  # synchronous: SLO-blind
    core.trainer = _Trainer(smallest=None)
    assert core._finetune_budget(busy) == 0



def test_profile_measures_every_kind_and_round_trips(make_engine, tmp_path):
    from scheduler.builder import attach_trainer
    from scheduler.profiler import profile
    from trainer.feedback import FeedbackStore

    core, runner = make_engine(kv_cache_bytes=64 << 20, enable_prefix_caching=False)
    attach_trainer(core, runner, FeedbackStore(tmp_path / "f.sqlite3"))
    model, rows = profile(runner, core.config.max_model_len, quick=True, repeats=1, progress=False)
    kinds = {("prefill" if r["shape"]["num_prefill_tokens"] else "decode" if r["shape"]["num_decodes"] else "finetune")
             for r in rows}
    assert kinds == {"prefill", "decode", "finetune"} and len(rows) == 17
    ft = [r["shape"] for r in rows if r["shape"]["num_finetune_chunks"]]
    # whole pairs, one-sequence parts and reference passes (priced at a third a token), small and large
    assert [s["num_finetune_tokens"] for s in ft] == [60, 126, 252, 24, 48, 20, 84]
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


def test_periodic_bursts_train_every_period_until_the_pairs_run_out(make_engine):
    core, _ = make_engine(policy="periodic", retrain_period_s=60.0, finetune_tokens_per_iteration=512)
    now = [1000.0]
    core.clock = lambda: now[0]
    core._next_burst_s = 1060.0
    trainer = _Trainer(smallest=100)
    trainer._in_flight = {}
    core.trainer = trainer
    busy = IterationShape(num_decodes=4)
    assert core._finetune_budget(busy) == 0  # between bursts: nothing, however much waits
    now[0] = 1061.0
    assert core._finetune_budget(busy) == 512  # the burst: full chunks
    now[0] = 1062.0
    assert core._finetune_budget(busy) == 512
    trainer.smallest = None  # ran out
    now[0] = 1063.0
    assert core._finetune_budget(busy) == 0 and core._next_burst_s == 1123.0
    trainer.smallest = 100  # new feedback: waits for the next burst
    now[0] = 1100.0
    assert core._finetune_budget(busy) == 0
    now[0] = 1123.0
    assert core._finetune_budget(busy) == 512


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
