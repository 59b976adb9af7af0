"""Fine-tune work cut at decoder layers: a sequence's gradient run a few layers at a time across
chunks equals one whole forward and backward, a pair so cut accumulates the whole pair's
gradient, and a part-done pair is dropped without touching either adapter."""

import pytest
import torch

from engine.config import TrainingConfig
from engine.model_loader import load_model
from engine.plan import FinetuneChunk, FinetuneResult, PreferencePair
from tests.conftest import random_prompts
from trainer.adapters import SERVING, TRAIN, adapter_parameters, attach_adapters
from trainer.executor import FinetuneExecutor
from trainer.feedback import FeedbackStore, NewPair
from trainer.staged import LayerStages, UnitCosts, block_cut
from trainer.trainer import Trainer


@pytest.fixture
def executor(demo_model_dir):
    """An executor whose trainable adapter is off zero (so every LoRA weight gets a gradient),
    with two referenced pairs."""
    torch.manual_seed(0)
    model, _ = load_model(demo_model_dir, torch.device("cpu"))
    config = TrainingConfig(lr=5e-3, grad_accum=2)
    ex = FinetuneExecutor(attach_adapters(model, config), config, pad_id=0)
    with torch.no_grad():
        for p in ex.params:
            p.add_(0.02 * torch.randn_like(p))
    return ex


def _pairs(ex, n: int = 2) -> list[PreferencePair]:
    prompts, chosen, rejected = (random_prompts([12] * n, seed=s) for s in (5, 6, 7))
    pairs = [PreferencePair(f"p{i}", prompts[i], chosen[i][:6], rejected[i][:7]) for i in range(n)]
    result = ex.run(FinetuneChunk(0, "reference", pairs))
    for p in pairs:
        p.ref_chosen, p.ref_rejected = result.ref_logprobs[p.pair_id]
    return pairs


def _grads(ex) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in ex.params]


def _cuts(num_units: int) -> list[list[int]]:
    """Every single cut point, one unit a chunk, and a ragged mix."""
    return [[k, num_units] for k in range(1, num_units)] + [list(range(1, num_units + 1)), [2, 3, num_units - 1, num_units]]


@pytest.mark.parametrize("lengths", [(20, 9), (1, 1)])  # (1, 1): fewer tokens than MLP ranges
@pytest.mark.parametrize("cut_blocks", [True, False])
def test_a_sequence_cut_at_any_unit_gives_the_whole_gradient(executor, cut_blocks, lengths):
    ex = executor
    ex._use(TRAIN)
    prompt, response = (random_prompts([n], seed=s)[0] for n, s in zip(lengths, (1, 2)))
    logp, grads = ex._sequence_gradient(prompt, response)
    ids = torch.tensor([prompt + response])
    mask = torch.zeros(ids.shape)
    mask[0, len(prompt):] = 1.0
    stages = LayerStages(ex.stages.causal_lm, ex.params, UnitCosts.of(ex.stages.causal_lm, cut_blocks))
    # the demo model's layers have the Llama shape: attention, then the MLP in 3 token ranges
    assert stages.parts == (4 if cut_blocks else 1)
    assert stages.num_units == 2 * stages.num_layers * stages.parts + 1
    assert len(stages.costs.weights(*lengths)) == stages.num_units
    for cuts in _cuts(stages.num_units):
        job = stages.start(ids, mask)
        for end in cuts:
            stages.run(job, end)
        assert job.logp == pytest.approx(logp, abs=1e-5) and not job.kept and job.grad is None
        for got, want in zip(job.grads, grads, strict=True):
            assert (got is None) == (want is None)
            if want is not None:
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert all(p.grad is None for p in ex.params)  # nothing reached the accumulation
    with pytest.raises(ValueError):
        stages.run(job, stages.num_units + 1)


def test_a_layer_of_another_shape_is_run_whole(executor):
    """A layer whose parts do not add up to its forward (here: an extra scale on its output) fails
    the check and is one unit."""
    model = executor.stages.causal_lm
    assert block_cut(model)
    layer = model.get_decoder().layers[0]
    forward = layer.forward
    layer.forward = lambda *args, **kwargs: 2.0 * forward(*args, **kwargs)
    try:
        assert not block_cut(model) and UnitCosts.of(model, cut_blocks=True).parts == 1
    finally:
        del layer.forward
    assert UnitCosts.of(model, cut_blocks=True).parts == 4
    assert UnitCosts.of(model).parts == 1  # by default a layer this small runs whole


@pytest.mark.parametrize("cut_blocks", [None, True])  # whole layers (the tiny model's default), layer parts
@pytest.mark.parametrize("cuts", [[3], [1, 4], None])
def test_a_pair_cut_at_layers_on_top_of_an_accumulation_gives_the_whole_pairs_gradient(executor, cuts, cut_blocks):
    """``cuts``: the units the chosen and the rejected part stop at (None: one unit a chunk)."""
    ex = executor
    ex.stages = LayerStages(ex.stages.causal_lm, ex.params, UnitCosts.of(ex.stages.causal_lm, cut_blocks))
    p, other = _pairs(ex)
    ex.run(FinetuneChunk(1, "gradient", [other]))
    whole = ex.run(FinetuneChunk(2, "gradient", [p]))
    expected = _grads(ex)
    ex.optimizer.zero_grad(set_to_none=True)

    n = ex.stages.num_units
    ends = (cuts or list(range(1, n))) + [n]
    ex.run(FinetuneChunk(3, "gradient", [other]))
    before = _grads(ex)
    task = 4
    for part in ("chosen", "rejected"):
        start = 0
        for end in ends:
            result = ex.run(FinetuneChunk(task, "gradient", [p], part=part, units=(start, end)))
            task, start = task + 1, end
            if part == "chosen" or end < n:  # kept apart until the pair is whole
                assert not result.losses
                for got, want in zip(_grads(ex), before, strict=True):
                    assert torch.equal(got, want)
    assert result.losses["p0"] == pytest.approx(whole.losses["p0"], rel=1e-5)
    for got, want in zip(_grads(ex), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
    # out of order is refused
    with pytest.raises(RuntimeError, match="out of order"):
        ex.run(FinetuneChunk(task, "gradient", [p], part="chosen", units=(2, 3)))


def test_a_part_done_pair_is_dropped_without_touching_either_adapter(executor):
    ex = executor
    (p,) = _pairs(ex, 1)
    serving = [t.detach().clone() for t in adapter_parameters(ex.model, SERVING)]
    trainable = [t.detach().clone() for t in ex.params]
    ex.run(FinetuneChunk(1, "gradient", [p], part="chosen", units=(0, 3)))
    assert ex._job is not None and ex._job[1].kept  # the graphs of three layers are held
    # the iteration carrying the next piece failed: the trainer resends with reset
    result = ex.run(FinetuneChunk(2, "gradient", [p], part="chosen", units=(0, 2), reset=True))
    assert ex._job is not None and ex._job[1].next_unit == 2  # started over, the old job gone
    ex.run(FinetuneChunk(3, "gradient", [p], reset=True))  # a whole pair after a reset: no job left
    assert ex._job is None and result.stepped is None
    assert all(torch.equal(a, b) for a, b in zip(serving, adapter_parameters(ex.model, SERVING)))
    assert all(torch.equal(a, b) for a, b in zip(trainable, ex.params))


def test_a_nan_in_a_cut_pair_skips_the_step_and_restores_the_weights(executor):
    ex = executor
    (p,) = _pairs(ex, 1)
    p.ref_chosen = float("nan")
    serving = [t.detach().clone() for t in adapter_parameters(ex.model, SERVING)]
    n = ex.stages.num_units
    ex.run(FinetuneChunk(1, "gradient", [p], part="chosen", units=(0, n - 2)))
    ex.run(FinetuneChunk(2, "gradient", [p], part="chosen", units=(n - 2, n)))
    result = ex.run(FinetuneChunk(3, "gradient", [p], part="rejected", step=True))
    assert result.stepped is False and result.adapter_version == 0
    assert all(torch.equal(a, b) for a, b in zip(serving, adapter_parameters(ex.model, SERVING)))
    assert all(torch.equal(a, b) for a, b in zip(serving, ex.params))  # trainable back to serving's


class _Tok:
    """Token ids are the characters' codes: lengths are easy to count."""

    def encode(self, text, add_special_tokens=True):
        return [ord(c) for c in text]


async def test_the_trainer_cuts_parts_into_the_units_the_room_prices(tmp_path):
    # 2 layers, the head 4 layers' worth per response token: the chosen part (9 + 9 tokens) weighs
    # [18, 18, 36, 18, 18] layer-tokens, 1/6 of a priced token each: 3, 3, 6, 3, 3; the rejected
    # part (9 + 17) [26, 26, 68, 26, 26], 26/172 each: 3.9, 3.9, 10.3, 3.9, 3.9
    store = FeedbackStore(tmp_path / "f.sqlite3")
    store.add([NewPair("p" * 9, "c" * 9, "r" * 17, id="a")])
    trainer = Trainer(store, _Tok(), TrainingConfig(grad_accum=1), None, unit_costs=UnitCosts(2, 4.0))
    await trainer.refill()
    ref = trainer.next_chunk(1000)
    trainer.on_result(FinetuneResult(ref.task_id, "reference", ref_logprobs={"a": (-1.0, -2.0)}))
    assert trainer.next_pair_tokens() == 3  # the chosen part's first unit
    assert trainer.next_whole_tokens() == 9 + 9 + 9 + 17  # the whole pair
    pieces = []
    for room in (3, 9, 3, 1000, 1, 30):
        chunk = trainer.next_chunk(room)
        pieces.append((chunk.part, chunk.units, chunk.num_tokens, chunk.step))
        if chunk.part == "chosen" and chunk.units == (1, 3):
            assert trainer.next_pair_tokens() is None  # one chunk at a time
        trainer.on_result(FinetuneResult(chunk.task_id, "gradient", stepped=True if chunk.step else None,
                                         adapter_version=1 if chunk.step else 0))
        if pieces[-1][:2] == ("chosen", (3, 4)):
            assert trainer.next_pair_tokens() == 3 and trainer.next_whole_tokens() == 3  # the part's last unit
    assert pieces == [
        ("chosen", (0, 1), 3, False),  # the next unit would make 6 > 3
        ("chosen", (1, 3), 9, False),  # 3 + 6 = 9 <= 9
        ("chosen", (3, 4), 3, False),
        ("chosen", (4, 5), 3, False),  # the rest of the part
        ("rejected", (0, 1), 4, False),  # less room than one unit: one unit anyway
        ("rejected", (1, 5), 23, True),  # 22.1 <= 30: the rest, and the pair's step
    ]
    assert not trainer.has_work and trainer.num_steps == 1 and trainer.num_pairs_stepped == 1
    await trainer.flush()
    store.close()


async def test_a_failed_iteration_mid_cut_trains_the_pair_again_from_its_first_unit(make_engine, tmp_path):
    """The smallest room only: the smallest chunk each time (the reference pass's too). The
    iteration carrying the chosen part's second chunk fails; the pair goes back, its next gradient
    chunk drops what was accumulated and the part starts over at unit 0; then it trains to the
    end: one step, one pair trained."""
    store = FeedbackStore(tmp_path / "f.sqlite3")
    core, runner = make_engine(training=TrainingConfig(grad_accum=1), feedback_store=store)
    trainer, ex = core.trainer, runner.finetune_executor
    store.add([NewPair("Why is the sky blue?", " Because of Rayleigh scattering.", " No idea.")])
    await trainer.refill()
    n = ex.stages.num_units
    seen = []
    while trainer.has_work:
        chunk = trainer.next_chunk(trainer.next_pair_tokens())
        failed = chunk.part == "chosen" and chunk.units[0] > 0 and not any(s[-1] for s in seen)
        seen.append((chunk.kind, chunk.part, chunk.units, chunk.reset, failed))
        if failed:
            trainer.on_failure(chunk.task_id)
        else:
            trainer.on_result(ex.run(chunk))
    reference = [s for s in seen if s[0] == "reference"]
    assert seen[:len(reference)] == reference and len(reference) > 1  # the reference pass first, cut too
    assert _covers([s[2] for s in reference], ex.stages.num_forward_units)
    first, fails, again = seen[len(reference):len(reference) + 3]
    assert first[1:] == ("chosen", first[2], False, False) and first[2][0] == 0
    assert fails[1:] == ("chosen", (first[2][1], fails[2][1]), False, True)
    assert again[1:] == ("chosen", first[2], True, False)  # from unit 0, the accumulation dropped
    rest = seen[len(reference) + 3:]
    chosen, rejected = [s[2] for s in rest if s[1] == "chosen"], [s[2] for s in rest if s[1] == "rejected"]
    assert rest == [s for s in rest if s[1] == "chosen"] + [s for s in rest if s[1] == "rejected"]
    assert _covers([first[2]] + chosen, n) and _covers(rejected, n)
    assert ex._job is None and core.training.adapter_version == 1 and trainer.num_pairs_stepped == 1
    await trainer.flush()
    assert store.stats()["trained"] == 1
    store.close()


def _covers(units: list[tuple[int, int]], n: int) -> bool:
    """Whether the chunks' unit ranges run from 0 to ``n``, each from where the last stopped."""
    return units[0][0] == 0 and units[-1][1] == n and all(a[1] == b[0] for a, b in zip(units, units[1:]))


@pytest.mark.parametrize("cut_blocks", [None, True])
def test_a_reference_pass_cut_at_any_layer_gives_the_whole_passs_log_probs(executor, cut_blocks):
    ex = executor
    ex.stages = LayerStages(ex.stages.causal_lm, ex.params, UnitCosts.of(ex.stages.causal_lm, cut_blocks))
    (p,) = _pairs(ex, 1)  # referenced by one whole pass
    want = (p.ref_chosen, p.ref_rejected)
    units = ex.stages.num_forward_units
    for cuts in [[k, units] for k in range(1, units)] + [list(range(1, units + 1))]:
        start = 0
        for end in cuts:
            result = ex.run(FinetuneChunk(1, "reference", [p], units=(start, end)))
            assert (result.ref_logprobs == {}) == (end < units)
            start = end
        got = result.ref_logprobs["p0"]
        assert got == pytest.approx(want, abs=1e-4)
    assert ex._ref_job is None
    with pytest.raises(RuntimeError, match="out of order"):
        ex.run(FinetuneChunk(2, "reference", [p], units=(1, 2)))


async def test_the_trainer_cuts_a_reference_pass_and_starts_it_over_after_a_failure(tmp_path):
    # 2 layers; the no-grad head half the layers' 4 per token: a 44-token pair weighs [44, 44, 88]
    store = FeedbackStore(tmp_path / "f.sqlite3")
    store.add([NewPair("p" * 9, "c" * 9, "r" * 17, id="a")])
    trainer = Trainer(store, _Tok(), TrainingConfig(grad_accum=1), None, unit_costs=UnitCosts(2, 4.0))
    await trainer.refill()
    assert trainer.next_pair_tokens() == 11 and not trainer.next_unit_has_grad()  # 44 x 44/176
    first = trainer.next_chunk(20)
    assert (first.kind, first.units, first.num_tokens) == ("reference", (0, 1), 11)
    trainer.on_result(FinetuneResult(first.task_id, "reference"))
    assert trainer.next_pair_tokens() == 11 and trainer.next_whole_tokens() == 33  # the rest: 44 x 132/176
    second = trainer.next_chunk(100)
    assert second.units == (1, 3)
    trainer.on_failure(second.task_id)  # its iteration failed: the pass starts over
    again = trainer.next_chunk(1000)
    assert again.units == (0, 3) and again.share == 1.0
    trainer.on_result(FinetuneResult(again.task_id, "reference", ref_logprobs={"a": (-1.0, -2.0)}))
    assert trainer._ref_pair is None and trainer.next_unit_has_grad()  # ready to train
    await trainer.flush()
    assert store.get("a").ref_chosen == -1.0
    store.close()


def test_unit_costs_of_cut_layers():
    """A layer cut in its attention block and 3 MLP token ranges: the attention block is its
    share of the layer's tokens, each range the rest over its own tokens; backward in reverse."""
    costs = UnitCosts(2, 4.0, mlp_ranges=3, attention_share=0.25)
    layer = [2.0, 0.75 * 2, 0.75 * 3, 0.75 * 3]  # 8 tokens: ranges [0, 2), [2, 5), [5, 8)
    assert costs.parts == 4 and costs.num_units == 17 and costs.num_forward_units == 9
    assert costs.weights(4, 4) == layer * 2 + [16.0] + layer[::-1] * 2
    assert costs.forward_weights(8) == layer * 2 + [16.0]
