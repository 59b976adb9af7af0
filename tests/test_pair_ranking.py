"""Pairs trained highest estimated DPO loss first: the reference pass also runs the pair under the
serving adapter once the adapter has stepped, the trainer computes each pair's loss from the four
log-probs and ranks the ready pairs by it."""

import math

import pytest
import torch

from engine.plan import FinetuneChunk, FinetuneResult
from engine.config import TrainingConfig
from tests.test_layer_cuts import _Tok, _pairs, executor  # noqa: F401  (a fixture)
from trainer.feedback import FeedbackStore, NewPair
from trainer.staged import UnitCosts
from trainer.trainer import Trainer


def test_an_estimating_reference_pass_gives_the_serving_adapters_log_probs(executor):  # noqa: F811
    ex = executor
    with torch.no_grad():  # publish the perturbed trainable adapter: serving is off the base now
        for serving, trainable in ex._publish:
            serving.copy_(trainable)
    (p,) = _pairs(ex, 1)
    with torch.no_grad():
        want = tuple(t.item() for t in ex._logprobs([p]))  # the serving adapter is the active one
    assert want != pytest.approx((p.ref_chosen, p.ref_rejected), abs=1e-3)  # the adapter moves them
    whole = ex.run(FinetuneChunk(1, "reference", [p], estimate=True))
    assert whole.ref_logprobs["p0"] == pytest.approx((p.ref_chosen, p.ref_rejected), abs=1e-5)
    assert whole.policy_logprobs["p0"] == pytest.approx(want, abs=1e-4)
    units = 2 * ex.stages.num_forward_units  # the reference pass, then the estimate
    for cuts in ([1, units], [units // 2, units], [units // 2 + 1, units], list(range(1, units + 1))):
        start = 0
        for end in cuts:
            result = ex.run(FinetuneChunk(2, "reference", [p], units=(start, end), estimate=True))
            assert (result.ref_logprobs == {}) == (end < units)
            assert (result.policy_logprobs == {}) == (end < units)
            start = end
        assert result.ref_logprobs["p0"] == pytest.approx((p.ref_chosen, p.ref_rejected), abs=1e-4)
        assert result.policy_logprobs["p0"] == pytest.approx(want, abs=1e-4)
    assert ex._ref_job is None


def _dpo(beta, policy, ref) -> float:
    margin = beta * ((policy[0] - ref[0]) - (policy[1] - ref[1]))
    return -math.log(1 / (1 + math.exp(-margin)))


async def _trainer(tmp_path, ids: str, version: int, **config) -> tuple[Trainer, FeedbackStore]:
    tmp_path.mkdir(exist_ok=True)
    store = FeedbackStore(tmp_path / "f.sqlite3")
    store.add([NewPair("p" * 5, "c" * 3, "r" * 4, id=i) for i in ids])
    trainer = Trainer(store, _Tok(), TrainingConfig(grad_accum=1, **config), None, adapter_version=version)
    await trainer.refill()
    return trainer, store


def _train_one(trainer: Trainer, version: int) -> list[str]:
    chunk = trainer.next_chunk(10_000)
    assert chunk.kind == "gradient" and chunk.step
    trainer.on_result(FinetuneResult(chunk.task_id, "gradient", losses={p.pair_id: 0.5 for p in chunk.pairs},
                                     stepped=True, adapter_version=version))
    return [p.pair_id for p in chunk.pairs]


async def test_ready_pairs_train_highest_estimated_loss_first(tmp_path):
    trainer, store = await _trainer(tmp_path, "abcd", version=1)
    ref = trainer.next_chunk(10_000)  # all four: rank_window 8
    assert ref.kind == "reference" and ref.estimate and [p.pair_id for p in ref.pairs] == list("abcd")
    assert ref.num_tokens == 2 * 4 * (5 + 3 + 5 + 4)  # the estimate is a second pass as big
    refs = {i: (-10.0, -10.0) for i in "abcd"}
    policy = {"a": (-10.0, -10.0),  # unmoved: ln 2
              "b": (-2.0, -30.0),  # the adapter gets it right: near 0
              "c": (-12.0, -8.0),  # wrong: above ln 2
              "d": (-10.0, -10.0)}  # as a: after it
    trainer.on_result(FinetuneResult(ref.task_id, "reference", ref_logprobs=refs, policy_logprobs=policy))
    by_hand = {i: _dpo(0.1, policy[i], refs[i]) for i in "abcd"}
    assert by_hand["c"] == pytest.approx(math.log1p(math.exp(0.4)))
    for i in "abcd":
        assert trainer.estimated_loss(i) == pytest.approx(by_hand[i], rel=1e-12)
    assert trainer.offer(0.0).loss == pytest.approx(by_hand["c"])  # the head's priority
    order = [_train_one(trainer, v) for v in (2, 3, 4, 5)]
    assert order == [["c"], ["a"], ["d"], ["b"]]
    await trainer.flush()
    store.close()


async def test_references_run_ahead_only_up_to_the_window_and_only_once_the_adapter_moved(tmp_path):
    trainer, store = await _trainer(tmp_path, "abcd", version=0, rank_window=2)
    first = trainer.next_chunk(10_000)
    # an unmoved adapter: every loss is ln 2, so no estimate (and, once a pair is ready, it
    # trains before the next reference)
    assert first.kind == "reference" and not first.estimate and len(first.pairs) == 4
    await trainer.flush()
    store.close()

    trainer, store = await _trainer(tmp_path / "moved", "abcd", version=1, rank_window=2)
    kinds = []
    while trainer.has_work:
        chunk = trainer.next_chunk(10_000)
        ids = [p.pair_id for p in chunk.pairs]
        kinds.append((chunk.kind, "".join(ids), chunk.estimate))
        if chunk.kind == "reference":
            trainer.on_result(FinetuneResult(chunk.task_id, "reference",
                                             ref_logprobs={i: (-1.0, -1.0) for i in ids},
                                             policy_logprobs={i: (-1.0, -1.0 + k) for k, i in enumerate(ids)}))
        else:
            trainer.on_result(FinetuneResult(chunk.task_id, "gradient", stepped=True, adapter_version=2))
    # two references ahead, then the pair with the higher loss (the later one here), then one
    # reference to refill the window before each pair trains; equal losses: first come, first served
    assert kinds == [("reference", "ab", True), ("gradient", "b", False), ("reference", "c", True),
                     ("gradient", "a", False), ("reference", "d", True), ("gradient", "c", False),
                     ("gradient", "d", False)]
    await trainer.flush()
    store.close()


async def test_an_estimating_reference_pass_is_cut_at_layers_across_both_passes(tmp_path):
    # 2 layers, the no-grad head 2 layers' worth per token: a 44-token pair's pass weighs
    # [44, 44, 88], and with the estimate [44, 44, 88, 44, 44, 88]: 11, 11, 22, 11, 11, 22 tokens
    store = FeedbackStore(tmp_path / "f.sqlite3")
    store.add([NewPair("p" * 9, "c" * 9, "r" * 17, id=i) for i in "ab"])
    trainer = Trainer(store, _Tok(), TrainingConfig(grad_accum=1), None, adapter_version=1,
                      unit_costs=UnitCosts(2, 4.0))
    await trainer.refill()
    assert trainer.next_pair_tokens() == 11 and trainer.next_whole_tokens() == 88
    pieces = []
    for room in (20, 40, 1000):
        chunk = trainer.next_chunk(room)
        pieces.append((chunk.units, chunk.num_tokens, chunk.estimate))
        done = chunk.units[1] == 6
        trainer.on_result(FinetuneResult(chunk.task_id, "reference",
                                         ref_logprobs={"a": (-1.0, -2.0)} if done else {},
                                         policy_logprobs={"a": (-1.0, -3.0)} if done else {}))
    assert pieces == [((0, 1), 11, True), ((1, 3), 33, True), ((3, 6), 44, True)]
    assert trainer._ref_pair is None and trainer.estimated_loss("a") == pytest.approx(_dpo(0.1, (-1.0, -3.0), (-1.0, -2.0)))
    assert trainer.next_chunk(1000).kind == "reference"  # b's: the window is not full
    await trainer.flush()
    store.close()


async def test_references_stop_running_ahead_once_a_step_is_max_step_delay_overdue(tmp_path):
    trainer, store = await _trainer(tmp_path, "abcde", version=1, rank_window=8, max_step_delay_s=10.0)
    kinds = []
    for now in (0.0, 4.0, 14.5, 15.0, 20.0, 25.0):  # the scheduler's clock at each offer
        assert trainer.offer(now) is not None
        chunk = trainer.next_chunk(34)  # one pair's reference and estimate (2 x 17 tokens)
        ids = [p.pair_id for p in chunk.pairs]
        kinds.append((now, chunk.kind, "".join(ids)))
        if chunk.kind == "reference":
            trainer.on_result(FinetuneResult(chunk.task_id, "reference", ref_logprobs={i: (-1.0, -1.0) for i in ids},
                                             policy_logprobs={i: (-1.0, -1.0 - len(kinds)) for i in ids}))
        else:
            trainer.on_result(FinetuneResult(chunk.task_id, "gradient", losses={i: 0.5 for i in ids}, stepped=True,
                                             adapter_version=2))
    # the window (8) is far from full, but 10 s after a ready pair (a) began to wait behind
    # references the ready pairs train, the highest estimated loss first (the earlier pair here);
    # after that step references run ahead for another 10 s
    assert kinds == [(0.0, "reference", "a"), (4.0, "reference", "b"), (14.5, "gradient", "a"),
                     (15.0, "reference", "c"), (20.0, "reference", "d"), (25.0, "gradient", "b")]
    await trainer.flush()
    store.close()
