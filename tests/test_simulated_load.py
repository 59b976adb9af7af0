"""Hours of synthetic load through the real scheduler, trainer and cost model on a simulated
clock: the runner is replaced by a fixed "true" cost per iteration, so an hour takes seconds.

Checks the mace policy's promises: inference SLO attainment >= 99% at a load that fits, and
fine-tune progress in every simulated minute (the starvation guard), while the cost model learns
the true costs from a wrong prior.
"""

import random

import numpy as np
from transformers import AutoTokenizer

from engine.config import EngineConfig, TrainingConfig
from engine.plan import FinetuneResult, IterationResult, SequenceResult
from engine.sampling_params import SamplingParams
from scheduler.core import EngineCore
from scheduler.cost_model import IterationShape
from trainer.feedback import FeedbackStore, NewPair
from trainer.trainer import Trainer

# The "machine": seconds per iteration feature (like the base model on this CPU), 10 ms per fine-tune chunk
TRUE_COSTS = np.array([0.005, 0.0004, 0.00001, 0.0008, 0.00002, 0.0018, 0.010])
SIM_S = 3600.0
RATE = 0.5  # requests per second
SLO_TTFT_S, SLO_TBT_S = 2.0, 0.050


def _execute(plan, shape: IterationShape, rng: random.Random, version: list[int]) -> IterationResult:
    cost = float(TRUE_COSTS @ shape.features()) * (1 + 0.03 * rng.random())
    outputs = [SequenceResult(c.seq_id, token_id=7 if c.sampling is not None else None) for c in plan.chunks]
    result = IterationResult(plan.iteration, outputs, plan.num_tokens, total_s=cost)
    ft = plan.finetune
    if ft is not None:
        if ft.kind == "reference":
            result.finetune = FinetuneResult(ft.task_id, "reference", ref_logprobs={p.pair_id: (-20.0, -21.0) for p in ft.pairs})
        else:
            version[0] += ft.step
            result.finetune = FinetuneResult(ft.task_id, "gradient", losses={p.pair_id: 0.6 for p in ft.pairs},
                                             stepped=True if ft.step else None, adapter_version=version[0])
        result.finetune.num_tokens = ft.num_tokens
    return result


async def test_an_hour_of_load_keeps_the_slo_and_trains_every_minute(demo_model_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir)
    config = EngineConfig.build(demo_model_dir, policy="mace", slo_tbt_ms=SLO_TBT_S * 1e3, slo_margin=0.1,
                                max_num_batched_tokens=64, max_num_seqs=32, finetune_tokens_per_iteration=512,
                                finetune_min_every=50, max_model_len=1024, vocab_size=8192)
    # arrivals, first tokens and deadlines on the simulated clock
    core = EngineCore(config, tokenizer, frozenset(), num_blocks=2048, clock=lambda: t)
    store = FeedbackStore(tmp_path / "f.sqlite3")
    # the real trainer, without a model: the simulated worker answers its chunks
    core.trainer = Trainer(store, tokenizer, TrainingConfig(grad_accum=4), tokenizer.eos_token_id)
    rng = random.Random(0)
    arrivals = np.cumsum(np.random.default_rng(0).exponential(1 / RATE, int(SIM_S * RATE * 1.2)))
    arrivals = [float(a) for a in arrivals if a < SIM_S]
    params = SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True)
    t, next_arrival, next_pair, version = 0.0, 0, 0.0, [0]
    timings: dict[str, list[float]] = {}
    trained_minutes: set[int] = set()
    while t < SIM_S or core.has_work:
        while next_arrival < len(arrivals) and arrivals[next_arrival] <= t:
            rid = f"r{next_arrival}"
            core.add_request(rid, [rng.randrange(8000) for _ in range(128)], params)
            timings[rid] = [arrivals[next_arrival]]
            next_arrival += 1
        if t >= next_pair and t < SIM_S:  # a feedback pair every 5 s
            store.add([NewPair(f"Question at {t:.0f}s:", " a good answer", " a bad one")])
            await core.trainer.refill()
            next_pair += 5.0
        plan = core.schedule()
        if plan is None:
            t = min(arrivals[next_arrival] if next_arrival < len(arrivals) else SIM_S, next_pair)
            if t >= SIM_S and not core.has_work:
                break
            continue
        shape = core._shapes[plan.iteration]
        result = _execute(plan, shape, rng, version)
        t += result.total_s
        if plan.finetune is not None and plan.finetune.kind == "gradient" and t < SIM_S:
            trained_minutes.add(int(t // 60))
        for out in core.process_result(result):
            timings[out.request_id].append(t)
    await core.trainer.flush()

    attained = 0
    for times in timings.values():
        ttft = times[1] - times[0]
        tpot = (times[-1] - times[1]) / (len(times) - 2)
        attained += ttft <= SLO_TTFT_S and tpot <= SLO_TBT_S
    assert len(timings) > 1500
    assert attained / len(timings) >= 0.99
    assert trained_minutes == set(range(int(SIM_S // 60)))  # progress in every minute
    assert version[0] > 0 and store.stats()["trained"] > 0
    assert core.cost_model.error_ratio < 0.1  # learnt from the wrong prior
    store.close()


async def test_an_overload_keeps_every_iteration_within_the_tbt_budget(demo_model_dir, tmp_path):
    """Requests arrive faster than the machine can prefill them (a minute at 40/s, each 128
    prompt tokens: 2 s of prefill a second): the queue grows, but the planner caps the decodes
    at one budget's worth and no prefill or fine-tune piece runs an iteration past it (the prompts
    at the head of the queue are past their TTFT deadline: nothing is forced in), so the requests
    admitted keep their time per token."""
    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir)
    config = EngineConfig.build(demo_model_dir, policy="mace", slo_tbt_ms=SLO_TBT_S * 1e3, slo_ttft_ms=SLO_TTFT_S * 1e3,
                                slo_margin=0.1, max_num_batched_tokens=256, max_num_seqs=128, finetune_min_every=20,
                                max_model_len=1024, vocab_size=8192)
    core = EngineCore(config, tokenizer, frozenset(), num_blocks=4096, clock=lambda: t)
    store = FeedbackStore(tmp_path / "f.sqlite3")
    store.add([NewPair(f"Question {i}:", " a good answer", " a bad one") for i in range(200)])
    core.trainer = Trainer(store, tokenizer, TrainingConfig(grad_accum=4), tokenizer.eos_token_id)
    await core.trainer.refill()
    rng = random.Random(1)
    sim_s, rate = 60.0, 40.0
    arrivals = [float(a) for a in np.cumsum(np.random.default_rng(1).exponential(1 / rate, int(sim_s * rate * 1.2))) if a < sim_s]
    params = SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True)
    t, next_arrival, version = 0.0, 0, [0]
    timings: dict[str, list[float]] = {}
    costs, decodes, guarded = [], [], 0
    budget = SLO_TBT_S * 0.9
    while t < sim_s:
        while next_arrival < len(arrivals) and arrivals[next_arrival] <= t:
            core.add_request(f"r{next_arrival}", [rng.randrange(8000) for _ in range(128)], params)
            timings[f"r{next_arrival}"] = [arrivals[next_arrival]]
            next_arrival += 1
        plan = core.schedule()
        if plan is None:
            t = arrivals[next_arrival] if next_arrival < len(arrivals) else sim_s
            continue
        result = _execute(plan, core._shapes[plan.iteration], rng, version)
        t += result.total_s
        if t > 10.0:  # the cost model has learnt the machine from its prior
            costs.append(result.total_s)
            decodes.append(sum(c.sampling is not None and len(c.token_ids) == 1 for c in plan.chunks))
            guarded += plan.finetune is not None
        for out in core.process_result(result):
            timings[out.request_id].append(t)
    await core.trainer.flush()
    assert len(core.queues.waiting) > 500  # overloaded: the queue grew all along
    assert max(costs) <= budget * 1.1  # every iteration within the budget (3% noise, the model's error)
    assert 10 < max(decodes) < 128  # admission held the batch to what the budget carries, not the slots
    done = [times for times in timings.values() if len(times) == 49]  # first token + 47 gaps
    tpots = [(times[-1] - times[1]) / 47 for times in done]
    # admitted requests keep their pace, but those the decode cap skips a turn (prompts still able
    # to make their TTFT are still forced in)
    assert len(done) > 100 and np.mean(np.array(tpots) <= SLO_TBT_S) >= 0.9
    assert guarded > 0 and version[0] > 0  # training went on, in the smallest pieces
    store.close()
