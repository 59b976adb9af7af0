"""Fine-tune chunks on the worker's side: LoRA adapters leave serving unchanged until a step,
reference log-probs equal the base model's, DPO steps move the margin the right way, a
non-finite value changes nothing, and fine-tune work rides in the same iteration as inference."""

import dataclasses
import math

import pytest
import torch

from engine.config import EngineConfig, TrainingConfig
from engine.model_loader import load_model
from engine.plan import FinetuneChunk, IterationPlan, PreferencePair, SequenceChunk
from engine.sampling_params import SamplingParams
from scheduler.builder import build_from_model, generate
from tests.conftest import random_prompts
from trainer.adapters import SERVING, TRAIN, adapter_parameters, attach_adapters
from trainer.dpo import response_logprobs
from trainer.executor import FinetuneExecutor

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


@pytest.fixture
def tiny(demo_model_dir):
    torch.manual_seed(0)
    model, tokenizer = load_model(demo_model_dir, torch.device("cpu"))
    return model, tokenizer


def _pairs(n: int, seed: int = 0) -> list[PreferencePair]:
    prompts = random_prompts([12] * n, seed=seed)
    chosen = random_prompts([6] * n, seed=seed + 1)
    rejected = random_prompts([7] * n, seed=seed + 2)
    return [PreferencePair(f"p{i}", prompts[i], chosen[i], rejected[i]) for i in range(n)]


def _margins(executor, pairs) -> list[float]:
    """chosen - rejected response log-prob under the serving adapter."""
    with torch.no_grad():
        c, r = executor._logprobs(pairs)
    return (c - r).tolist()


def test_adapters_start_as_the_base_model(tiny, demo_model_dir):
    model, tokenizer = tiny
    config = EngineConfig.build(demo_model_dir, kv_cache_bytes=8 << 20)
    prompts = random_prompts([9, 30], seed=3)
    before = generate(*build_from_model(model, tokenizer, config), prompts, GREEDY)
    peft_model = attach_adapters(model, TrainingConfig())
    assert peft_model.active_adapter == SERVING
    assert generate(*build_from_model(model, tokenizer, config), prompts, GREEDY) == before


def test_reference_logprobs_are_the_base_models(tiny):
    model, tokenizer = tiny
    pairs = _pairs(3)
    ids = torch.tensor([pairs[0].prompt_ids + pairs[0].chosen_ids])
    mask = torch.zeros_like(ids, dtype=torch.float)
    mask[0, len(pairs[0].prompt_ids):] = 1
    with torch.no_grad():
        expected = response_logprobs(model(ids).logits, ids, mask).item()
    executor = FinetuneExecutor(attach_adapters(model, TrainingConfig()), TrainingConfig(), pad_id=0)
    executor.run(FinetuneChunk(0, "gradient", [_with_refs(p, -50.0, -50.0) for p in pairs], step=True))  # move `train`
    result = executor.run(FinetuneChunk(1, "reference", pairs))
    assert result.ref_logprobs["p0"][0] == pytest.approx(expected, abs=1e-4)
    assert set(result.ref_logprobs) == {"p0", "p1", "p2"}


def _with_refs(p: PreferencePair, c: float, r: float) -> PreferencePair:
    return PreferencePair(p.pair_id, p.prompt_ids, p.chosen_ids, p.rejected_ids, c, r)


def _referenced(executor: FinetuneExecutor, pairs: list[PreferencePair]) -> list[PreferencePair]:
    """``pairs`` with their reference log-probs, from the executor's reference pass (task 0)."""
    refs = executor.run(FinetuneChunk(0, "reference", pairs)).ref_logprobs
    return [_with_refs(p, *refs[p.pair_id]) for p in pairs]


def test_dpo_steps_raise_the_margin_and_publish_at_the_step(tiny):
    model, _ = tiny
    config = TrainingConfig(lr=5e-3, grad_accum=4)
    executor = FinetuneExecutor(attach_adapters(model, config), config, pad_id=0)
    pairs = _pairs(4)
    pairs = _referenced(executor, pairs)
    start = _margins(executor, pairs)
    serving = [p.detach().clone() for p in adapter_parameters(executor.model, SERVING)]
    # half an accumulation: gradients only, serving untouched, version unchanged
    r = executor.run(FinetuneChunk(1, "gradient", pairs[:2]))
    assert r.stepped is None and r.adapter_version == 0
    assert all(torch.equal(a, b) for a, b in zip(serving, adapter_parameters(executor.model, SERVING)))
    assert all(v == pytest.approx(math.log(2), abs=1e-4) for v in r.losses.values())  # policy == reference
    r = executor.run(FinetuneChunk(2, "gradient", pairs[2:], step=True))
    assert r.stepped is True and r.adapter_version == 1
    for step in range(3, 12):
        executor.run(FinetuneChunk(step, "gradient", pairs, step=True))
    assert executor.version == 10
    after = _margins(executor, pairs)
    assert all(a > s + 0.5 for a, s in zip(after, start))
    train = adapter_parameters(executor.model, TRAIN)
    assert all(torch.equal(a, b) for a, b in zip(train, adapter_parameters(executor.model, SERVING)))


def test_a_nan_changes_nothing_the_server_reads(tiny):
    model, _ = tiny
    config = TrainingConfig(lr=5e-3, grad_accum=2)
    executor = FinetuneExecutor(attach_adapters(model, config), config, pad_id=0)
    pairs = _pairs(2)
    good = _referenced(executor, pairs)
    executor.run(FinetuneChunk(1, "gradient", good, step=True))
    serving = [p.detach().clone() for p in adapter_parameters(executor.model, SERVING)]
    poisoned = [good[0], _with_refs(good[1], float("nan"), 0.0)]
    r = executor.run(FinetuneChunk(2, "gradient", poisoned, step=True))
    assert r.stepped is False and r.adapter_version == 1 and math.isnan(r.losses["p1"])
    assert all(torch.equal(a, b) for a, b in zip(serving, adapter_parameters(executor.model, SERVING)))
    assert all(torch.equal(a, b) for a, b in zip(serving, adapter_parameters(executor.model, TRAIN)))
    assert executor.run(FinetuneChunk(3, "gradient", good, step=True)).stepped is True  # and it goes on


def test_fine_tune_work_rides_in_the_same_iteration(tiny, demo_model_dir, tmp_path):
    from trainer.feedback import FeedbackStore

    model, tokenizer = tiny
    config = TrainingConfig(lr=5e-3, grad_accum=1)
    core, runner = build_from_model(model, tokenizer, EngineConfig.build(demo_model_dir, kv_cache_bytes=8 << 20), config,
                                    FeedbackStore(tmp_path / "f.sqlite3"))
    executor = runner.finetune_executor
    assert executor is core.training.executor
    pairs = _pairs(2)
    pairs = _referenced(executor, pairs)
    prompt = random_prompts([10], seed=9)[0]
    reference_tokens = generate(core, runner, [prompt], GREEDY)[0]
    chunk = SequenceChunk(seq_id=0, token_ids=prompt, start_pos=0, block_table=[0], sampling=GREEDY)
    result = runner.execute(IterationPlan(0, [chunk], finetune=FinetuneChunk(1, "gradient", pairs, step=True)))
    # the inference half ran before the step, on the serving weights of before
    assert result.outputs[0].token_id == reference_tokens[0]
    assert result.finetune.stepped is True and result.finetune.adapter_version == 1
    assert result.finetune.num_tokens == sum(p.num_tokens for p in pairs)


def test_checkpoints_load_with_plain_peft_and_resume(tiny, demo_model_dir, tmp_path):
    from peft import PeftModel

    from trainer.checkpoint import CheckpointWriter, latest_checkpoint
    from trainer.feedback import FeedbackStore

    model, tokenizer = tiny
    config = TrainingConfig(lr=5e-3, grad_accum=1)
    peft_model = attach_adapters(model, config)
    executor = FinetuneExecutor(peft_model, config, pad_id=0, checkpoints=CheckpointWriter(peft_model, tmp_path),
                                checkpoint_every=2)
    pairs = _pairs(2)
    pairs = _referenced(executor, pairs)
    for step in range(1, 4):
        executor.run(FinetuneChunk(step, "gradient", pairs, step=True))
    executor.checkpoints.flush()  # written on the writer's thread
    path, version = latest_checkpoint(tmp_path)
    assert version == 2 and path.name == "v000002"  # every 2 steps; version 3 not yet written
    executor.checkpoints.submit(executor.version, executor.snapshot())  # what shutdown writes
    assert executor.checkpoints.wait(3)
    path, version = latest_checkpoint(tmp_path)
    assert version == 3
    ids = torch.tensor([pairs[0].prompt_ids + pairs[0].chosen_ids])
    with torch.no_grad():
        served = executor.model(input_ids=ids).logits
        fresh, _ = load_model(demo_model_dir, torch.device("cpu"))
        loaded = PeftModel.from_pretrained(fresh, str(path))(input_ids=ids).logits
    assert torch.allclose(served, loaded, atol=1e-5)
    # a new server process resumes from it
    again, tok = load_model(demo_model_dir, torch.device("cpu"))
    core, runner = build_from_model(again, tok, EngineConfig.build(demo_model_dir, kv_cache_bytes=8 << 20),
                                    dataclasses.replace(config, state_dir=str(tmp_path)), FeedbackStore(tmp_path / "f.sqlite3"))
    assert core.training.adapter_version == 3 and runner.finetune_executor.version == 3
    with torch.no_grad():
        assert torch.allclose(runner.finetune_executor.model(input_ids=ids).logits, served, atol=1e-5)


def _grads(executor) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in executor.params]


@pytest.mark.parametrize("rpo_alpha", [0.0, 1.0])
def test_a_pair_cut_in_two_parts_gives_the_whole_pairs_gradient(tiny, rpo_alpha):
    model, _ = tiny
    config = TrainingConfig(lr=5e-3, grad_accum=2, rpo_alpha=rpo_alpha)
    executor = FinetuneExecutor(attach_adapters(model, config), config, pad_id=0)
    pairs = _pairs(2, seed=4)
    pairs = _referenced(executor, pairs)
    executor.run(FinetuneChunk(1, "gradient", pairs, step=True))  # LoRA B off zero: every grad counts
    p, other = pairs
    # another pair already in the accumulation: the parts must add to it, not replace it
    executor.run(FinetuneChunk(2, "gradient", [other]))
    whole = executor.run(FinetuneChunk(3, "gradient", [p]))
    expected = _grads(executor)
    executor.optimizer.zero_grad(set_to_none=True)

    executor.run(FinetuneChunk(4, "gradient", [other]))
    before = _grads(executor)
    chosen = executor.run(FinetuneChunk(5, "gradient", [p], part="chosen"))
    assert not chosen.losses and chosen.stepped is None
    for got, want in zip(_grads(executor), before, strict=True):  # kept apart until the pair is whole
        assert torch.equal(got, want)
    rejected = executor.run(FinetuneChunk(6, "gradient", [p], part="rejected"))
    assert rejected.losses["p0"] == pytest.approx(whole.losses["p0"], rel=1e-5) and rejected.stepped is None
    for got, want in zip(_grads(executor), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
    assert any(w.abs().max() > 1e-6 for w in expected)
    # a rejected part without its chosen part is refused
    with pytest.raises(RuntimeError, match="without its chosen part"):
        executor.run(FinetuneChunk(7, "gradient", [p], part="rejected"))
    # the chunk sizes the scheduler prices: one sequence each, with a backward
    assert FinetuneChunk(0, "gradient", [p], part="chosen").num_tokens == len(p.prompt_ids) + len(p.chosen_ids)
    assert FinetuneChunk(0, "gradient", [p], part="rejected").cost_tokens == len(p.prompt_ids) + len(p.rejected_ids)


def test_rpo_alpha_adds_the_chosen_answers_mean_nll(tiny):
    """The gradient with ``rpo_alpha`` is plain DPO's plus alpha x grad(-logp_c / len(chosen)) / accum."""
    model, _ = tiny
    config = TrainingConfig(lr=5e-3, grad_accum=2, rpo_alpha=0.5)
    executor = FinetuneExecutor(attach_adapters(model, config), config, pad_id=0)
    pairs = _pairs(2, seed=6)
    pairs = _referenced(executor, pairs)
    executor.run(FinetuneChunk(1, "gradient", pairs, step=True))  # LoRA B off zero: every grad counts
    with_nll = executor.run(FinetuneChunk(2, "gradient", pairs))
    got = _grads(executor)
    executor.optimizer.zero_grad(set_to_none=True)

    plain = FinetuneExecutor(executor.model, TrainingConfig(lr=5e-3, grad_accum=2), pad_id=0)
    dpo_only = plain.run(FinetuneChunk(3, "gradient", pairs))
    assert dpo_only.losses == with_nll.losses  # the reported loss is DPO's (the priority's input)
    dpo_grads = _grads(plain)
    executor.optimizer.zero_grad(set_to_none=True)
    executor.model.set_adapter(TRAIN)
    for prm in executor.params:
        prm.requires_grad_(True)
    nll = sum(-executor._sequence_logprob(p.prompt_ids, p.chosen_ids) / len(p.chosen_ids) for p in pairs)
    (0.5 * nll / 2).backward()
    executor.model.set_adapter(SERVING)
    expected = [d + n.grad for d, n in zip(dpo_grads, executor.params, strict=True)]
    for g, e, d in zip(got, expected, dpo_grads, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-7)
    assert max((g - d).abs().max().item() for g, d in zip(got, dpo_grads)) > 1e-5  # the NLL term counts


def test_a_step_over_fewer_pairs_than_grad_accum_takes_that_share_of_the_learning_rate(demo_model_dir):
    """One pair stepped alone under grad_accum=4 moves the adapter as a step of lr / 4 does with
    grad_accum=1. (The first's gradient is 4x smaller; a tight clip gives both the same norm, so
    that the learning rate is the only difference left.)"""
    pair = _pairs(1, seed=8)
    deltas = []
    for lr, accum in ((4e-3, 4), (1e-3, 1), (4e-3, 1)):
        torch.manual_seed(0)  # the same LoRA init each time
        model, _ = load_model(demo_model_dir, torch.device("cpu"))
        config = TrainingConfig(lr=lr, grad_accum=accum, max_grad_norm=1e-4)
        executor = FinetuneExecutor(attach_adapters(model, config), config, pad_id=0)
        pairs = _referenced(executor, pair)
        before = [p.detach().clone() for p in executor.params]
        assert executor.run(FinetuneChunk(1, "gradient", pairs, step=True)).stepped
        deltas.append([p.detach() - b for p, b in zip(executor.params, before)])
    partial, quarter_lr, full = deltas
    for got, want in zip(partial, quarter_lr, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-9)
    moved = max(d.abs().max().item() for d in full)
    assert moved > 1e-4 and max(d.abs().max().item() for d in partial) == pytest.approx(moved / 4, rel=1e-3)


def test_the_cached_serving_weights_snapshot_equals_pefts_state_dict(tiny):
    from peft import get_peft_model_state_dict

    from trainer.adapters import adapter_snapshot, serving_weights

    model, _ = tiny
    config = TrainingConfig(lr=5e-3, grad_accum=1)
    executor = FinetuneExecutor(attach_adapters(model, config), config, pad_id=0)
    pairs = _pairs(1)
    pairs = _referenced(executor, pairs)
    weights = serving_weights(executor.model)
    assert weights is not None
    for step in range(1, 3):  # published in place: the kept tensors follow every step
        executor.run(FinetuneChunk(step, "gradient", pairs, step=True))
        fast, peft = adapter_snapshot(executor.model, weights), get_peft_model_state_dict(executor.model, adapter_name="serving")
        assert fast.keys() == peft.keys() and all(torch.equal(fast[k], peft[k]) for k in peft)
        assert any(not torch.equal(fast[k], weights[k].new_zeros(weights[k].shape)) for k in fast)


@pytest.mark.parametrize("lora_dropout", [0.0, 0.1])
def test_the_fast_adapter_switch_leaves_what_pefts_set_adapter_leaves(tiny, lora_dropout):
    """The same active adapter and the same outputs as PEFT's set_adapter and disable_adapter;
    requires_grad stays as set at start (the trainable adapter's weights on, the serving's off)."""
    model, _ = tiny
    config = TrainingConfig(lr=5e-3, grad_accum=1, lora_dropout=lora_dropout)
    executor = FinetuneExecutor(attach_adapters(model, config), config, pad_id=0)
    peft_model = executor.model
    assert executor._needs_train_mode == (lora_dropout > 0)  # the demo model has no dropout of its own
    with torch.no_grad():  # the two adapters apart, so that which one is active shows
        for p in executor.params:
            p.add_(0.05 * torch.randn_like(p))
    ids = torch.tensor([[5, 17, 99, 3, 250]])
    grads = {n: p.requires_grad for n, p in peft_model.named_parameters()}
    assert {n for n, g in grads.items() if g} == {n for n, p in peft_model.named_parameters()
                                                  if any(p is q for q in executor.params)}

    def state():
        with torch.no_grad():
            logits = peft_model(input_ids=ids).logits
        return peft_model.active_adapter, [tuple(m.active_adapters) for m in executor._lora_layers], logits

    for name in (TRAIN, SERVING, TRAIN):
        peft_model.set_adapter(name)
        want = state()
        peft_model.set_adapter(SERVING if name == TRAIN else TRAIN)
        executor._use(name)
        got = state()
        assert got[:2] == want[:2]
        torch.testing.assert_close(got[2], want[2])
    with peft_model.disable_adapter():
        base = state()[2]
    for p, g in zip(peft_model.parameters(), grads.values()):
        p.requires_grad_(g)  # PEFT's calls above moved them
    with executor._adapters_off():
        torch.testing.assert_close(state()[2], base)
    assert {n: p.requires_grad for n, p in peft_model.named_parameters()} == grads
    executor._use(SERVING)
    pairs = _pairs(1)
    executor.run(FinetuneChunk(1, "gradient", _referenced(executor, pairs)))
    assert peft_model.active_adapter == SERVING and not peft_model.training  # back for inference
    assert all(p.grad is not None for p in executor.params)
