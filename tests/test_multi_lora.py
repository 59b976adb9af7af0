"""Requests on different adapters in one packed forward (engine/lora.py, the C step's groups):
each sequence's tokens equal the same sequence run alone with PEFT's own forward on its adapter."""

import pytest
import torch
from peft import LoraConfig
from transformers import AutoModelForCausalLM

from cache.block_pool import BlockPool
from engine.attention import ATTENTION_NAME, register_paged_attention
from engine.config import TrainingConfig
from engine.lora import BASE, segments_of
from engine.plan import IterationPlan, SequenceChunk
from engine.runner import ModelRunner
from engine.sampling_params import SamplingParams
from scheduler.queues import SequenceQueues
from scheduler.request import RequestOptions, Sequence
from trainer.adapters import SERVING, attach_adapters

BLOCK = 4
GREEDY = SamplingParams(temperature=0.0)


def _model(demo_model_dir):
    """The demo model with the serving adapter (Q/K/V/O) and three more: one alike, one of
    another rank on fewer layers, one on the MLP and the LM head. Every LoRA weight random."""
    register_paged_attention()
    model = AutoModelForCausalLM.from_pretrained(demo_model_dir, attn_implementation=ATTENTION_NAME).eval()
    peft_model = attach_adapters(model, TrainingConfig(target_modules=("q_proj", "k_proj", "v_proj", "o_proj",
                                                                        "up_proj", "lm_head")))
    peft_model.add_adapter("a1", LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    peft_model.add_adapter("a2", LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    peft_model.add_adapter("a3", LoraConfig(r=16, lora_alpha=8, target_modules=["up_proj", "lm_head"]))
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.08)
    peft_model.set_adapter(SERVING)
    return peft_model


def _generate(runner: ModelRunner, prompts: list[list[int]], adapters: list[str | None], steps: int):
    """Greedy tokens of every prompt, all in the same iterations: one prefill, then decodes."""
    blocks, tokens, start = [], [[] for _ in prompts], 0
    for p in prompts:
        n = (len(p) + steps) // BLOCK + 1
        blocks.append(list(range(start, start + n)))
        start += n
    chunks = [SequenceChunk(i, p, 0, blocks[i], sampling=GREEDY, adapter=a)
              for i, (p, a) in enumerate(zip(prompts, adapters))]
    for step in range(steps):
        result = runner.execute(IterationPlan(step, chunks))
        out = {o.seq_id: o.token_id for o in result.outputs}
        for i in range(len(prompts)):
            tokens[i].append(out[i])
        chunks = [SequenceChunk(i, [out[i]], len(prompts[i]) + step, blocks[i], sampling=GREEDY, output_index=step + 1,
                                adapter=adapters[i]) for i in range(len(prompts))]
    return tokens


def _alone(model, runner: ModelRunner, prompt: list[int], adapter: str | None, steps: int) -> list[int]:
    """One sequence by itself, PEFT's forward on its adapter (the default path: no segments)."""
    if adapter == BASE:
        with model.disable_adapter():
            return _generate(runner, [prompt], [None], steps)[0]
    model.set_adapter(adapter or SERVING)
    try:
        return _generate(runner, [prompt], [None], steps)[0]
    finally:
        model.set_adapter(SERVING)


def test_segments_are_runs_of_one_name():
    assert segments_of(["a", "a", "b", BASE, BASE, "a"]) == [("a", 0, 2), ("b", 2, 3), (BASE, 3, 5), ("a", 5, 6)]
    assert segments_of([]) == []


@pytest.mark.parametrize("decode_attention", ["auto", "sdpa"])  # the C step for decodes, or the module path
def test_a_batch_of_five_adapters_equals_each_request_alone(decode_attention, demo_model_dir):
    model = _model(demo_model_dir)
    runner = ModelRunner(model, num_blocks=128, block_size=BLOCK, decode_attention=decode_attention)
    assert (runner.decode_step is not None) == (decode_attention == "auto")
    g = torch.Generator().manual_seed(5)
    lengths = [3, 9, 4, 17, 6, 12, 8]
    prompts = [torch.randint(3, 8000, (n,), generator=g).tolist() for n in lengths]
    adapters = [None, "a1", BASE, "a2", "a3", "a1", None]
    mixed = _generate(runner, prompts, adapters, steps=6)
    alone = [_alone(model, runner, p, a, steps=6) for p, a in zip(prompts, adapters)]
    assert mixed == alone
    # the adapters differ: the same prompt's greedy tokens are not all equal across them
    first = [_alone(model, runner, prompts[3], a, steps=6) for a in (None, "a1", "a2", "a3", BASE)]
    assert len({tuple(t) for t in first}) == 5


def test_the_c_step_takes_a_mixed_decode_batch(demo_model_dir):
    model = _model(demo_model_dir)
    runner = ModelRunner(model, num_blocks=64, block_size=BLOCK)
    calls = []
    step = runner.decode_step
    runner.decode_step = type("Counting", (), {
        "covers": step.covers, "covers_adapters": step.covers_adapters,
        "__call__": lambda self, *a: calls.append(a[-2]) or step(*a)})()
    _generate(runner, [[5, 6, 7], [8, 9], [10, 11, 12, 13]], ["a1", BASE, "a3"], steps=3)
    assert calls == [["a1", BASE, "a3"]] * 2  # the two decode iterations, one C call each


def _seq(i: int, adapter: str | None, tokens: list[int]):
    return Sequence(seq_id=i, request_id=f"r{i}", prompt_token_ids=tokens, params=GREEDY, seed=0, max_tokens=4,
                    stop_token_ids=frozenset(), detokenizer=None, arrival_s=0.0,
                    options=RequestOptions(adapter=adapter))


def test_the_prefix_cache_keeps_each_adapters_kv_apart():
    queues = SequenceQueues(BlockPool(32, BLOCK, enable_prefix_cache=True))
    tokens = list(range(3, 3 + 3 * BLOCK + 1))
    first = _seq(0, "a1", tokens)
    queues.add(first)
    queues.take_cached_prefix(first)
    assert queues.grow(first, len(tokens))
    queues.admit(first)
    first.num_computed_tokens = len(tokens)
    queues.cache_computed_blocks(first)
    same, other, default = _seq(1, "a1", tokens), _seq(2, "a2", tokens), _seq(3, None, tokens)
    assert queues.num_cached_prefix_tokens(same) == 3 * BLOCK
    assert queues.num_cached_prefix_tokens(other) == 0
    assert queues.num_cached_prefix_tokens(default) == 0
    queues.pool.trie.check_integrity()


def test_max_loras_bounds_the_adapters_running_at_once():
    queues = SequenceQueues(BlockPool(32, BLOCK), max_loras=2)
    for i, adapter in enumerate([None, "a1"]):
        seq = _seq(i, adapter, [5, 6])
        queues.add(seq)
        assert queues.adapter_fits(seq)
        queues.admit(seq)
    assert not queues.adapter_fits(_seq(5, "a2", [5]))  # a third adapter waits
    assert queues.adapter_fits(_seq(6, "a1", [5]))  # one already running does not
    assert queues.adapter_fits(_seq(7, BASE, [5]))  # the base model is no adapter
    queues.finish(queues.running[1])
    assert queues.adapter_fits(_seq(5, "a2", [5]))
