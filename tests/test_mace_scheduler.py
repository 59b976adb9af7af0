"""The mace planner with fixed costs and a hand-driven clock: which tasks go into an iteration and
at what size, in which order, the slack that decodes bank, the starvation guard, preemption.

Costs (seconds): 10 ms per iteration, 1 ms per prefill token, 2 ms per decode, 0.25 ms per
fine-tune token; TBT SLO 100 ms with a 10% margin, so one iteration may take 90 ms. The paper's
planner (``finetune_max_slowdown`` 0, no guaranteed share) unless a test says otherwise.
"""

import dataclasses

import pytest
from transformers import AutoTokenizer

from engine.config import EngineConfig
from engine.plan import NO_GRAD_COST, FinetuneChunk, FinetuneOffer, IterationResult, PreferencePair, SequenceResult
from engine.sampling_params import SamplingParams
from scheduler.core import EngineCore
from scheduler.cost_model import CostModel
from scheduler.mace import URGENT
from scheduler.request import RequestOptions, SequenceStatus
from tests.conftest import random_prompts

COSTS = [0.010, 0.001, 0.0, 0.002, 0.0, 0.00025]
PARAMS = SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True)


class FakeTrainer:
    """Offers pieces of ``smallest`` tokens or more (a forward and backward each, unless
    ``has_grad`` is cleared); dates the wait as the trainer does; records what it was asked for."""

    def __init__(self, smallest: int | None, loss: float = 0.6931471805599453):
        self.smallest, self.loss, self.asked = smallest, loss, []
        self.has_grad = True
        self.since = None

    def offer(self, now):
        if self.smallest is None:
            self.since = None
            return None
        if self.since is None:
            self.since = now
        return FinetuneOffer(self.smallest, self.smallest, self.loss, now - self.since,
                             min_cost_factor=1.0 if self.has_grad else NO_GRAD_COST)

    def next_chunk(self, budget):
        self.asked.append(budget)
        self.since = None
        # one sequence of ``budget`` tokens (a pair's chosen part), so the plan prices it at that
        return FinetuneChunk(len(self.asked), "gradient", [PreferencePair("p", [1] * budget, [], [])], part="chosen")

    def on_result(self, result):
        pass

    has_work = property(lambda self: self.smallest is not None)


@pytest.fixture
def core_factory(demo_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir)

    def make(num_blocks: int = 64, cost_model: CostModel | None = None, **overrides) -> tuple[EngineCore, list[float]]:
        settings = dict(policy="mace", slo_tbt_ms=100.0, slo_margin=0.1, slo_ttft_ms=1000.0,
                        max_num_batched_tokens=256, max_num_seqs=16, finetune_tokens_per_iteration=512,
                        max_model_len=1024, vocab_size=8192, slo_bank_max=3.0, finetune_max_slowdown=0.0,
                        finetune_min_share=0.0)
        config = EngineConfig.build(demo_model_dir, **{**settings, **overrides})
        now = [0.0]
        core = EngineCore(config, tokenizer, frozenset(), num_blocks=num_blocks,
                          cost_model=cost_model or CostModel(COSTS), clock=lambda: now[0])
        return core, now

    return make


def _sizes(plan) -> dict[int, int]:
    return {c.seq_id: len(c.token_ids) for c in plan.chunks}


def _carries_finetune(core: EngineCore, now: list[float], n: int, step_s: float) -> list[bool]:
    """``n`` iterations ``step_s`` apart: whether each carried fine-tune work."""
    trained = []
    for _ in range(n):
        now[0] += step_s
        plan = core.schedule()
        trained.append(plan.finetune is not None)
        _finish_iteration(core, plan)
    return trained


def _finish_iteration(core: EngineCore, plan) -> None:
    """The worker's part, without a model: token 7 wherever a chunk samples; zero time, so the
    cost model keeps its fixed costs."""
    outputs = [SequenceResult(c.seq_id, token_id=7 if c.sampling is not None else None) for c in plan.chunks]
    core.process_result(IterationResult(plan.iteration, outputs, plan.num_tokens, total_s=0.0))


def test_prefills_fill_the_latency_budget_and_fine_tune_takes_the_rest(core_factory):
    core, now = core_factory()
    a, b = (core.add_request(f"r{i}", p, PARAMS) for i, p in enumerate(random_prompts([20, 20], seed=1)))
    plan = core.schedule()  # no decodes: 90 ms, 10 of them fixed; both prompts whole (20 ms each)
    assert _sizes(plan) == {a.seq_id: 20, b.seq_id: 20} and plan.finetune is None
    now[0] = 0.05
    _finish_iteration(core, plan)
    assert a.first_token_s == b.first_token_s == 0.05

    core.trainer = FakeTrainer(smallest=30)
    c = core.add_request("r2", random_prompts([100], seed=2)[0], PARAMS)
    plan = core.schedule()
    # Two decodes at pace: L = 90 ms, of which 10 + 2 x 2 = 14 fixed, 76 left. Best fit on whole
    # sizes: the prompt (100 ms; f = 0.5 * |54 - 7| / 54 + 0.5 * |76 - 100| / 90 = 0.57) beats
    # a fine-tune unit (7.5 ms; f = 0.5 * 54 / 54 + 0.5 * |76 - 7.5| / 90 = 0.88), and is cut to
    # the 76 ms left, at a block boundary: 64 tokens. The 12 ms left take 48 fine-tune tokens.
    assert _sizes(plan) == {a.seq_id: 1, b.seq_id: 1, c.seq_id: 64}
    assert core.trainer.asked == [48]
    assert plan.capacity_s == pytest.approx(0.09)
    assert plan.predicted_s == pytest.approx(0.014 + 0.064 + 0.012)


def test_no_room_no_fine_tune_until_the_starvation_guard(core_factory):
    core, now = core_factory(finetune_min_every=3)
    seqs = [core.add_request(f"r{i}", p, PARAMS) for i, p in enumerate(random_prompts([8] * 16, seed=3))]
    _finish_iteration(core, core.schedule())  # 10 prompts of 8 tokens fill the 80 ms
    _finish_iteration(core, core.schedule())  # 10 decodes (30 ms) and the other 6 prompts
    assert all(s.num_output_tokens > 0 for s in seqs)
    core.trainer = FakeTrainer(smallest=100)
    trained = []
    for i in range(8):
        now[0] += 0.09  # every iteration exactly at pace: the slack is one budget, 90 ms
        plan = core.schedule()  # 16 decodes: 10 + 32 = 42 ms of the 90
        assert len(plan.chunks) == 16
        trained.append(plan.finetune is not None)
        _finish_iteration(core, plan)
    # 48 ms of room is 192 tokens: the 100-token unit fits each time, sized to the room
    assert trained == [True] * 8 and set(core.trainer.asked) == {192}

    core.trainer = FakeTrainer(smallest=400)  # a unit of 100 ms never fits: only the guard runs it
    assert _carries_finetune(core, now, 8, 0.09) == [False, False, False, True, False, False, False, True]
    assert core.trainer.asked == [400, 400]  # the smallest unit, SLO or not
    assert all(s.status is SequenceStatus.RUNNING for s in seqs)


def test_decodes_bank_slack_that_fine_tune_spends(core_factory):
    core, now = core_factory()
    (a,) = (core.add_request("r0", p, PARAMS) for p in random_prompts([16], seed=4))
    _finish_iteration(core, core.schedule())  # first token at t = 0
    for _ in range(5):  # five tokens, each 10 ms: 80 ms banked per token against the 90 ms pace
        now[0] += 0.01
        _finish_iteration(core, core.schedule())
    assert core.policy.decode_slack(a, now[0]) == pytest.approx(6 * 0.09 - 0.05)
    core.trainer = FakeTrainer(smallest=100)
    plan = core.schedule()
    # slack 490 ms, capped at slo_bank_max (3) budgets: 270 ms; minus 12 ms of decode: 258 ms
    assert plan.capacity_s == pytest.approx(0.27)
    assert core.trainer.asked == [512]  # all the piece may carry (258 ms would take 1032 tokens)
    assert _sizes(plan) == {a.seq_id: 1}


def test_priority_orders_the_queue_and_best_fit_decides_within_the_top_k(core_factory, monkeypatch):
    import scheduler.mace

    monkeypatch.setattr(scheduler.mace, "IDLE_TTFT_SHARE", 0.0)  # no decodes: one TBT budget
    prompts = random_prompts([300, 70, 300], seed=5)
    # top-1: pure priority. The request with priority 5 goes first and takes the whole budget
    core, now = core_factory(pack_top_k=1)
    first = core.add_request("old", prompts[0], PARAMS)
    vip = core.add_request("vip", prompts[2], PARAMS, RequestOptions(priority=5))
    plan = core.schedule()
    assert list(_sizes(plan)) == [vip.seq_id]
    assert first.status is SequenceStatus.WAITING
    # top-4: best fit. 80 ms left: the 70-token prompt fills it best, then the rest takes 10 ms
    core, now = core_factory(pack_top_k=4)
    big = core.add_request("big", prompts[0], PARAMS)
    small = core.add_request("small", prompts[1], PARAMS)
    plan = core.schedule()
    assert _sizes(plan) == {small.seq_id: 70, big.seq_id: 10}


def test_with_nothing_decoding_a_prompt_takes_half_a_ttft_budget_at_once(core_factory):
    # no token gap to protect: 500 ms (half the 1000 ms TTFT SLO), so the 256-token cap binds,
    # not the 90 ms TBT budget (80 tokens at 1 ms each after the 10 ms fixed cost)
    core, now = core_factory()
    lone = core.add_request("lone", random_prompts([300], seed=5)[0], PARAMS)
    plan = core.schedule()
    assert _sizes(plan) == {lone.seq_id: 256} and plan.capacity_s == pytest.approx(0.5)
    _finish_iteration(core, plan)
    plan = core.schedule()
    assert _sizes(plan) == {lone.seq_id: 44}
    _finish_iteration(core, plan)  # its first token
    # once it decodes, a new prompt beside it gets what the TBT budget leaves
    core.add_request("next", random_prompts([300], seed=6)[0], PARAMS)
    now[0] += 0.3
    plan = core.schedule()
    assert plan.capacity_s == pytest.approx(0.09)


def test_a_prefill_near_its_ttft_deadline_goes_first(core_factory):
    core, now = core_factory(pack_top_k=1)
    late = core.add_request("late", random_prompts([200], seed=6)[0], PARAMS, RequestOptions(slo_ttft_ms=300.0))
    vip = core.add_request("vip", random_prompts([200], seed=7)[0], PARAMS, RequestOptions(priority=5))
    # (1 chunk + 1) x 90 ms x 3 banked budgets = 540 ms of need > 300 ms left: urgent at once
    assert core.policy.prefill_priority(late, now[0]) == 1.0 + URGENT
    assert core.policy.prefill_priority(vip, now[0]) == 6.0
    plan = core.schedule()
    assert list(_sizes(plan))[0] == late.seq_id


def test_memory_pressure_preempts_the_lowest_priority_not_the_oldest(core_factory):
    core, now = core_factory(num_blocks=4)
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    bs = core.pool.block_size
    low = core.add_request("low", random_prompts([bs], seed=8)[0], params, RequestOptions(priority=-1))
    high = core.add_request("high", random_prompts([bs], seed=9)[0], params, RequestOptions(priority=1))
    mid = core.add_request("mid", random_prompts([bs], seed=10)[0], params)
    _finish_iteration(core, core.schedule())  # three sequences of one full block each
    assert core.pool.num_free_blocks == 1
    plan = core.schedule()  # each needs a second block for its next token; one is free
    # highest priority first takes the free block; the next preempts the lowest priority ("low",
    # the oldest) and takes its block; the last has none left and preempts itself
    assert low.status is SequenceStatus.WAITING and low.num_preemptions == 1
    assert [c.seq_id for c in plan.chunks] == [high.seq_id, mid.seq_id] or [c.seq_id for c in plan.chunks] == [mid.seq_id, high.seq_id]
    core.check_integrity()
    _finish_iteration(core, plan)
    assert low.num_output_tokens == 1  # its token is kept: recomputed from prompt + outputs later


def test_a_decode_already_planned_that_is_then_preempted_leaves_the_plan(core_factory):
    # "low" is the most urgent (tightest TBT), so it is planned first and takes the free block;
    # "high" then finds none and preempts the lowest priority: "low", already in the plan. The plan
    # must drop it (its blocks are gone: the runner would index an empty block table).
    core, now = core_factory(num_blocks=4)
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    bs = core.pool.block_size
    low = core.add_request("low", random_prompts([bs], seed=8)[0], params, RequestOptions(priority=-1, slo_tbt_ms=10.0))
    high = core.add_request("high", random_prompts([bs], seed=9)[0], params, RequestOptions(priority=1))
    mid = core.add_request("mid", random_prompts([bs], seed=10)[0], params)
    _finish_iteration(core, core.schedule())
    plan = core.schedule()
    assert low.status is SequenceStatus.WAITING and low.num_preemptions == 1 and low.block_table == []
    assert sorted(c.seq_id for c in plan.chunks) == sorted([high.seq_id, mid.seq_id])
    assert all(c.block_table for c in plan.chunks)
    core.check_integrity()
    _finish_iteration(core, plan)


def test_tau_mem_caps_the_blocks_new_prefill_may_claim(core_factory):
    # prefill at 0.1 ms a token: 80 ms would take 800 tokens, but 40 free blocks x 0.5 = 20
    # blocks of 16 may be claimed: 320 tokens
    core, now = core_factory(num_blocks=40, tau_mem=0.5, max_num_batched_tokens=1024,
                             cost_model=CostModel([0.010, 0.0001, 0.0, 0.002, 0.0, 0.00025]))
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    a = core.add_request("a", random_prompts([600], seed=11)[0], params)
    assert _sizes(core.schedule()) == {a.seq_id: 320}
    assert core.pool.num_free_blocks == 20


def test_an_idle_engine_moves_even_when_the_model_says_nothing_fits(core_factory):
    # 200 ms fixed > the 90 ms budget
    core, now = core_factory(cost_model=CostModel([0.2, 0.001, 0.0, 0.002, 0.0, 0.00025]))
    a = core.add_request("a", random_prompts([40], seed=12)[0], PARAMS)
    plan = core.schedule()
    assert _sizes(plan) == {a.seq_id: 40}


def test_fine_tune_pieces_fit_the_activation_memory(core_factory):
    model = CostModel(COSTS)
    model.finetune_bytes_per_token = 1000.0  # 0.9 x 100 kB: 90 tokens at once
    core, now = core_factory(finetune_memory_bytes=100_000, tau_mem=0.9, cost_model=model)
    core.trainer = FakeTrainer(smallest=30)
    _finish_iteration(core, core.schedule())  # idle: a full piece would be 512 tokens
    core.add_request("a", random_prompts([8], seed=13)[0], PARAMS)
    _finish_iteration(core, core.schedule())  # the 72 ms left after the prompt would take 288
    assert core.trainer.asked == [90, 90]
    core.trainer = FakeTrainer(smallest=120)  # a unit over the cap does not fit
    assert core.schedule().finetune is None and core.trainer.asked == []


def test_a_no_grad_unit_is_priced_at_a_third(core_factory):
    core, now = core_factory()
    core.add_request("a", random_prompts([16], seed=14)[0], PARAMS)
    _finish_iteration(core, core.schedule())
    core.trainer = FakeTrainer(smallest=300)
    core.trainer.has_grad = False  # a reference pass: 300 x 0.25 ms / 3 = 25 ms
    now[0] += 0.09
    plan = core.schedule()  # 90 - 12 = 78 ms left: the unit (25 ms) fits, plus 212 tokens at full price
    assert core.trainer.asked == [300 + 212] and plan.finetune.num_tokens == 300 + 212


def test_a_fine_tune_chunks_fixed_cost_is_part_of_its_price(core_factory):
    """Two decodes leave 90 - (10 + 2 x 2) = 76 ms. With 55 ms a chunk on top of its tokens a
    100-token unit (25 ms of tokens) no longer fits; at 20 ms it does (45 ms), and the 31 ms left
    go to 124 more tokens. Priced by its tokens alone it would take 304."""
    params = SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True)
    for overhead, asked in ((0.055, []), (0.020, [100 + 124])):
        core, _ = core_factory(cost_model=CostModel([*COSTS, overhead]))
        for i, p in enumerate(random_prompts([8, 8], seed=15)):
            core.add_request(f"r{i}", p, params)
        _finish_iteration(core, core.schedule())  # both prompts: decoding from here, on pace
        core.trainer = FakeTrainer(smallest=100)
        plan = core.schedule()
        assert core.trainer.asked == asked and (plan.finetune is None) == (not asked)


@pytest.mark.parametrize("bank, asked", [(1.0, 100 + 260), (3.0, 512)])
def test_an_idle_engines_piece_is_as_long_as_the_longest_iteration(core_factory, bank, asked):
    """Nothing running or waiting: the piece may take slo_bank_max TBT budgets (90 ms each):
    at 1, 90 ms = 25 ms for the 100-token unit + 260 tokens at 0.25 ms; at 3, the 512 cap."""
    core, _ = core_factory(slo_bank_max=bank)
    core.trainer = FakeTrainer(smallest=100)
    assert core.schedule().finetune is not None and core.trainer.asked == [asked]


def _decoding(core, now, n: int, step_s: float) -> list:
    """``n`` requests of 8-token prompts, run until every one is decoding."""
    seqs = [core.add_request(f"r{i}", p, PARAMS) for i, p in enumerate(random_prompts([8] * n, seed=9))]
    for _ in range(40):  # bounded
        if all(s.num_output_tokens > 0 for s in seqs):
            break
        now[0] += step_s
        _finish_iteration(core, core.schedule())
    assert all(s.num_output_tokens > 0 for s in seqs)
    return seqs


def test_an_overload_caps_the_decodes_at_the_latency_capacity(core_factory):
    # TBT 105 ms, 10% margin: one budget (slo_bank_max 1) of 94.5 ms holds 10 + 42 x 2 ms of decodes
    core, now = core_factory(num_blocks=512, max_num_seqs=64, slo_tbt_ms=1000.0, slo_bank_max=1.0)
    seqs = _decoding(core, now, 60, 0.0945)  # admitted under a looser SLO, which then tightens
    core.policy.slos.tbt_ms = 105.0
    late = core.add_request("late", random_prompts([8], seed=10)[0], PARAMS, RequestOptions(slo_ttft_ms=1.0))
    now[0] += 0.002  # past its deadline: forcing it in would save nothing
    first = core.schedule()
    assert first.capacity_s == pytest.approx(0.0945) and first.predicted_s <= first.capacity_s
    assert len(first.chunks) == 42 and late.seq_id not in _sizes(first)
    _finish_iteration(core, first)
    now[0] += 0.0945
    second = core.schedule()
    left_out = {s.seq_id for s in seqs} - set(_sizes(first))
    assert len(second.chunks) == 42 and left_out <= set(_sizes(second))  # their turn comes next
    _finish_iteration(core, second)
    core.trainer = FakeTrainer(smallest=40)  # 10 ms
    core.policy.weights.finetune_min_every = 1
    now[0] += 0.0945
    guarded = core.schedule()  # the guard's smallest piece comes out of the decodes' share
    assert guarded.finetune is not None and core.trainer.asked == [40]
    assert len(guarded.chunks) == 37 and guarded.predicted_s <= guarded.capacity_s + 1e-12
    _finish_iteration(core, guarded)
    # a prompt still able to make its TTFT is forced in
    soon = core.add_request("soon", random_prompts([8], seed=12)[0], PARAMS, RequestOptions(slo_ttft_ms=150.0))
    now[0] += 0.0945
    plan = core.schedule()
    assert _sizes(plan)[soon.seq_id] == 8 and plan.predicted_s > plan.capacity_s


def test_default_slos_are_learned_from_the_load(core_factory):
    from scheduler.slos import MIN_SAMPLES, Slos

    core, now = core_factory(slo_tbt_ms=None, slo_ttft_ms=None)
    slos = core.policy.slos
    assert core.config.scheduler.learned_slos == ("ttft", "tbt")
    # at the start: one decode (10 + 2 ms a step) and a 256-token prompt (256 ms of prefill)
    assert slos.tbt_ms == pytest.approx(36.0) and slos.ttft_ms == pytest.approx(3 * 256 + 2 * 36)
    _decoding(core, now, 16, 0.02)
    for _ in range(2 * MIN_SAMPLES):
        now[0] += 0.02
        _finish_iteration(core, core.schedule())
    # 16 decodes: 10 + 32 = 42 ms a step; 8-token prompts: 8 ms each
    assert slos.tbt_ms == pytest.approx(3 * 42.0) and slos.ttft_ms == pytest.approx(3 * 8.0 + 2 * 126.0)
    assert core.policy.default_slos_ms() == (slos.ttft_ms, slos.tbt_ms) and not slos.infeasible

    # a TBT SLO set that inference alone does not meet: reported, and the guaranteed share
    config = core.config.scheduler.with_slos((1000.0, 20.0))
    set_slos = Slos(dataclasses.replace(config, slo_tbt_ms=20.0, learned_slos=()), core.cost_model)
    for _ in range(MIN_SAMPLES):
        set_slos.observe_decodes(0.026)
    assert set_slos.infeasible and set_slos.tbt_ms == 20.0


def test_a_tbt_slo_inference_cannot_meet_gives_fine_tune_its_guaranteed_share(core_factory, caplog):
    core, now = core_factory(slo_tbt_ms=20.0, finetune_min_every=50)  # 8 decodes take 26 ms > 18
    _decoding(core, now, 8, 0.05)  # (prompts join when urgent: the decodes fill each budget)
    core.trainer = FakeTrainer(smallest=20)
    with caplog.at_level("WARNING", logger="scheduler.slos"):
        trained = _carries_finetune(core, now, 40, 0.03)
    assert core.policy.slo_infeasible and "past what inference alone takes" in caplog.text
    assert sum(trained[-20:]) == 2  # one piece every 10 iterations, not every 50


def test_the_slowdown_bound_keeps_fine_tune_within_what_inference_alone_takes(core_factory):
    from scheduler.mace import MIN_INFERENCE_SAMPLES

    core, now = core_factory(finetune_max_slowdown=1.2, slo_bank_max=1.0, finetune_min_every=1000)
    core.trainer = FakeTrainer(smallest=4)  # 1 ms
    assert core.schedule().finetune is not None and core.trainer.asked == [360]  # no request yet: 90 ms
    core.trainer.asked.clear()
    seqs = _decoding(core, now, 8, 0.09)
    # requests came: until what inference alone takes is measured, nothing beside it
    trained = _carries_finetune(core, now, MIN_INFERENCE_SAMPLES - len(core.policy._inference_s), 0.09)
    assert not any(trained) and core.policy._inference_quantiles is not None  # measured now
    trained = _carries_finetune(core, now, 32, 0.09)
    median, p90 = core.policy._inference_quantiles
    assert median == p90 == pytest.approx(0.010 + 8 * 0.002)  # every iteration: the 8 decodes
    # beside them, up to 1.2 x 26 ms: 5.2 ms of fine-tune work, 20 tokens; never the SLO's 64 ms
    assert all(trained) and set(core.trainer.asked) == {20}
    # a prompt arriving takes what it needs first; fine-tune work gets what is left
    waiting = core.add_request("new", random_prompts([40], seed=11)[0], PARAMS)
    now[0] += 0.09
    plan = core.schedule()
    assert _sizes(plan)[waiting.seq_id] == 40 and plan.finetune is None  # 26 + 40 ms: past 31.2
    assert all(s.status is SequenceStatus.RUNNING for s in seqs)


def test_the_slowdown_bound_compares_predictions_without_the_safety_factor(core_factory):
    # as above, on a noisy machine: iterations take up to 1.5x their prediction, inference alone
    # as much as with fine-tune work beside it, so the bound (both sides predicted) is not cut
    from scheduler.mace import MIN_INFERENCE_SAMPLES

    core, now = core_factory(finetune_max_slowdown=1.2, slo_bank_max=1.0, finetune_min_every=1000)
    core.cost_model._safety = 1.5  # the reserve it asks of the 90 ms capacity: 30 ms
    _decoding(core, now, 8, 0.09)
    core.trainer = FakeTrainer(smallest=4)
    _carries_finetune(core, now, MIN_INFERENCE_SAMPLES, 0.09)
    core.trainer.asked.clear()
    assert all(_carries_finetune(core, now, 16, 0.09)) and set(core.trainer.asked) == {20}


def test_fine_tune_work_gets_its_guaranteed_share_when_no_slack_is_left(core_factory):
    # 16 decodes fill every 90 ms budget but 48 ms; a 400-token unit (100 ms) never fits
    core, now = core_factory(finetune_min_share=0.05, finetune_min_every=1000)
    _decoding(core, now, 16, 0.09)
    core.trainer = FakeTrainer(smallest=400)
    trained = _carries_finetune(core, now, 100, 0.09)
    # 4.5 ms owed per 90 ms iteration from the first offer on: the first piece once 100 ms are
    # owed (23 iterations later), then one every 22 or 23 (what is left over carries on); from
    # about iteration 50 the pool is short, preempted sequences wait to be recomputed (prompt
    # work), and the piece waits until twice its price is owed
    assert any(s.status is SequenceStatus.WAITING for s in core.queues.waiting)
    assert [i for i, t in enumerate(trained) if t] == [23, 45, 89]
    assert core.trainer.asked == [400] * 3


def test_the_guaranteed_share_waits_for_an_iteration_without_prompt_work(core_factory):
    # as above: the share's first piece is owed at iteration 23; a prompt arrives just before it
    core, now = core_factory(finetune_min_share=0.05, finetune_min_every=1000)
    _decoding(core, now, 15, 0.09)
    core.trainer = FakeTrainer(smallest=400)
    assert not any(_carries_finetune(core, now, 22, 0.09))
    prompt = core.add_request("late", random_prompts([200], seed=12)[0], PARAMS)
    carried = []
    for _ in range(20):  # bounded
        now[0] += 0.09
        plan = core.schedule()
        carried.append((_sizes(plan).get(prompt.seq_id, 0) > 1, plan.finetune is not None))
        _finish_iteration(core, plan)
        if plan.finetune is not None:
            break
    # the piece never shares an iteration with the prompt's prefill, and comes right after it
    assert not any(both for both in carried if both == (True, True))
    prefills = [i for i, (has_prompt, _) in enumerate(carried) if has_prompt]
    assert prefills and carried[-1] == (False, True) and len(carried) - 1 == prefills[-1] + 1
