"""The whole-step C decode (engine/decode_step.py) against the model's module path, on the same pool."""

import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen3Config, Qwen3ForCausalLM

from engine import cpu_kernels
from engine.attention import ATTENTION_NAME, register_paged_attention
from engine.config import TrainingConfig
from engine.decode_step import DecodeStep
from engine.plan import IterationPlan, SequenceChunk
from engine.runner import ModelRunner
from engine.sampling_params import SamplingParams
from trainer.adapters import SERVING, TRAIN, attach_adapters

pytestmark = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler")

BLOCK = 4


def _qwen3(vocab: int) -> torch.nn.Module:
    torch.manual_seed(3)
    # head dim 64 takes the AVX-512 attention where the CPU has it; 6 heads a kv head: two groups
    config = Qwen3Config(vocab_size=vocab, hidden_size=64, intermediate_size=100,  # up's LoRA: 100 = 6 x 16 + 4 num_hidden_layers=2,
                         num_attention_heads=6, num_key_value_heads=1, head_dim=64, max_position_embeddings=256,
                         rope_theta=500.0, attn_implementation=ATTENTION_NAME)
    return Qwen3ForCausalLM(config).eval()


def _model(kind: str, demo_model_dir, qwen2_model_dir, targets) -> torch.nn.Module:
    register_paged_attention()
    if kind == "qwen3":
        model = _qwen3(512)
    else:
        path = demo_model_dir if kind == "llama" else qwen2_model_dir
        model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=ATTENTION_NAME).eval()
    if targets is None:
        return model
    peft_model = attach_adapters(model, TrainingConfig(target_modules=targets))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():  # LoRA B starts at zero: give both adapters weights that move the logits
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return peft_model


def _runner(model) -> ModelRunner:
    return ModelRunner(model, num_blocks=64, block_size=BLOCK)


def _prompts(runner: ModelRunner, lengths: list[int]) -> list[SequenceChunk]:
    """Prefill prompts of these lengths through the module path; the decodes that follow."""
    g = torch.Generator().manual_seed(sum(lengths))
    greedy = SamplingParams(temperature=0.0)
    chunks, decodes, next_block = [], [], 0
    for i, n in enumerate(lengths):
        blocks = list(range(next_block, next_block + n // BLOCK + 2))  # room for two more tokens
        next_block += len(blocks)
        ids = torch.randint(3, 500, (n,), generator=g).tolist()
        chunks.append(SequenceChunk(i, ids, 0, blocks, sampling=greedy))
        decodes.append(SequenceChunk(i, [int(ids[-1])], n, blocks, sampling=greedy, output_index=1))
    runner.execute(IterationPlan(0, chunks))
    return decodes


class _Counting:
    """A DecodeStep that counts its calls."""

    def __init__(self, step: DecodeStep) -> None:
        self.step, self.calls = step, 0

    def covers(self) -> bool:
        return self.step.covers()

    def __call__(self, *args):
        self.calls += 1
        return self.step(*args)


def _both_paths(runner: ModelRunner, decodes: list[SequenceChunk]):
    """(whole-step logits, module-path logits, the pools after each)."""
    step = runner.decode_step
    assert step is not None
    runner.capture_logits = True
    before = runner.kv_pool.clone()
    runner.decode_step = counting = _Counting(step)
    runner.execute(IterationPlan(1, decodes))
    assert counting.calls == 1, "the iteration should have run as one C call"
    fast, fast_pool = dict(runner.last_logits), runner.kv_pool.clone()
    runner.kv_pool.copy_(before)
    runner.decode_step = None
    try:
        runner.execute(IterationPlan(1, decodes))
    finally:
        runner.decode_step = step
    return fast, dict(runner.last_logits), fast_pool, runner.kv_pool.clone()


@pytest.mark.parametrize("kind, targets", [
    ("llama", ("q_proj", "k_proj", "v_proj", "o_proj")),
    ("llama", ("q_proj", "v_proj", "gate_proj", "up_proj", "down_proj", "lm_head")),
    ("llama", None),
    ("qwen2", ("q_proj", "k_proj", "v_proj", "o_proj")),  # Q/K/V bias, tied embeddings
    ("qwen3", ("q_proj", "o_proj", "up_proj", "down_proj")),  # per-head Q/K norms, head dim 64
])
def test_whole_step_decode_equals_the_module_path(kind, targets, demo_model_dir, qwen2_model_dir):
    torch.manual_seed(0)
    runner = _runner(_model(kind, demo_model_dir, qwen2_model_dir, targets))
    decodes = _prompts(runner, [1, 4, 5, 13, 30])  # one key, block-aligned, one past, longer
    fast, reference, fast_pool, reference_pool = _both_paths(runner, decodes)
    assert fast.keys() == reference.keys() == {c.seq_id for c in decodes}
    for seq_id in fast:
        torch.testing.assert_close(fast[seq_id], reference[seq_id], rtol=1e-4, atol=1e-4)
        assert fast[seq_id].argmax() == reference[seq_id].argmax()
    torch.testing.assert_close(fast_pool, reference_pool, rtol=1e-5, atol=1e-5)


def test_it_follows_the_adapter_peft_has_active(demo_model_dir, qwen2_model_dir):
    """The fine-tune executor switches active adapters and the disabled flag directly; the C step
    computes whatever PEFT would at that moment."""
    model = _model("llama", demo_model_dir, qwen2_model_dir, ("q_proj", "v_proj"))
    runner = _runner(model)
    decodes = _prompts(runner, [6, 9])
    serving, _, _, _ = _both_paths(runner, decodes)
    layers = [m for m in model.modules() if hasattr(m, "lora_A")]
    for layer in layers:
        layer._active_adapter = [TRAIN]
    trained, reference, _, _ = _both_paths(runner, decodes)
    for seq_id in trained:
        torch.testing.assert_close(trained[seq_id], reference[seq_id], rtol=1e-4, atol=1e-4)
        assert not torch.allclose(trained[seq_id], serving[seq_id])  # the other adapter's weights
    for layer in layers:
        layer._active_adapter = [SERVING]
        layer._disable_adapters = True
    base, reference, _, _ = _both_paths(runner, decodes)
    for seq_id in base:
        torch.testing.assert_close(base[seq_id], reference[seq_id], rtol=1e-4, atol=1e-4)


def test_mixed_iterations_and_uncovered_models_take_the_module_path(demo_model_dir, qwen2_model_dir):
    runner = _runner(_model("llama", demo_model_dir, qwen2_model_dir, ("q_proj",)))
    runner.decode_step = counting = _Counting(runner.decode_step)
    decodes = _prompts(runner, [5, 7])  # a prefill iteration: module path
    assert counting.calls == 0
    runner.execute(IterationPlan(1, decodes))
    assert counting.calls == 1
    prompt = SequenceChunk(5, [4, 5, 6], 0, [40], sampling=SamplingParams(temperature=0.0))
    runner.execute(IterationPlan(2, [*(SequenceChunk(c.seq_id, [9], c.start_pos + 1, c.block_table,
                                                     sampling=c.sampling) for c in decodes), prompt]))
    assert counting.calls == 1  # decodes beside a prompt chunk: one packed module forward

    lib = cpu_kernels.load()
    gelu = _model("llama", demo_model_dir, qwen2_model_dir, None)
    gelu.config.hidden_act = "gelu"
    assert DecodeStep.build(gelu, lib, _runner(_model("llama", demo_model_dir, qwen2_model_dir, None)).kv_caches,
                            BLOCK) is None
    assert ModelRunner(_model("llama", demo_model_dir, qwen2_model_dir, None), num_blocks=8, block_size=BLOCK,
                       collect_attention_scores=True).decode_step is None
