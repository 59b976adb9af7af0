"""The C linear kernel for a few rows (a decode step, a small chunk), and its routing under a model's layers."""

import shutil

import pytest
import torch
import torch.nn.functional as F

from engine import cpu_kernels

pytestmark = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler")


# rows in tiles of 3, weight rows in tiles of 8, K in lanes of 16: every remainder, and 64 rows
@pytest.mark.parametrize("rows, k, n", [(1, 768, 768), (5, 64, 256), (7, 100, 33), (16, 2048, 770), (13, 17, 8),
                                         (64, 768, 259)])
@pytest.mark.parametrize("bias", [False, True])
def test_small_linear_matches_torch(rows, k, n, bias):
    lib = cpu_kernels.load()
    assert lib is not None, "the C kernels should build where a compiler exists"
    g = torch.Generator().manual_seed(rows * 1000 + n)
    x, w = torch.randn(2, rows, k, generator=g)[0], torch.randn(n, k, generator=g)
    b = torch.randn(n, generator=g) if bias else None
    got = cpu_kernels.small_linear(lib, x, w, b)
    assert got.shape == (rows, n)
    torch.testing.assert_close(got, F.linear(x, w, b), rtol=1e-5, atol=1e-4)


def test_layers_use_it_only_for_inference_at_a_few_rows(monkeypatch):
    lib = cpu_kernels.load()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.Linear(512, 8))  # the second: too small
    assert cpu_kernels.install_small_linear(model, lib) == 1
    assert cpu_kernels.install_small_linear(model, lib) == 0  # already routed
    calls = []
    real = cpu_kernels.small_linear
    monkeypatch.setattr(cpu_kernels, "small_linear", lambda *a: calls.append(a[1].shape) or real(*a))
    x = torch.randn(2, 3, 256)  # 6 rows
    with torch.inference_mode():
        out = model(x)
    assert calls == [(2, 3, 256)]
    reference = F.linear(F.linear(x, model[0].weight, model[0].bias), model[1].weight, model[1].bias)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        model(torch.randn(65, 256))  # 65 rows: torch's path
    assert len(calls) == 1
    out = model(x)  # gradients on (fine-tune work): torch's path, and the gradient flows
    out.sum().backward()
    assert len(calls) == 1 and model[0].weight.grad is not None


def test_the_fused_mlp_computes_the_same_and_keeps_the_weights_in_place():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    lib = cpu_kernels.load()
    torch.manual_seed(0)
    mlp = LlamaMLP(LlamaConfig(hidden_size=96, intermediate_size=200, hidden_act="silu"))
    gate, up = mlp.gate_proj.weight.detach().clone(), mlp.up_proj.weight.detach().clone()
    inputs = [torch.randn(1, 5, 96), torch.randn(1, 100, 96)]  # the small-linear kernel's rows, then torch's
    with torch.no_grad():
        expected = [mlp(x) for x in inputs]
    assert cpu_kernels.install_fused_mlp(mlp, lib) == 1
    assert cpu_kernels.install_fused_mlp(mlp, lib) == 0  # already fused
    assert torch.equal(mlp.gate_proj.weight, gate) and torch.equal(mlp.up_proj.weight, up)
    # one tensor under both: the up weights follow the gate's in memory
    assert mlp.up_proj.weight.data_ptr() == mlp.gate_proj.weight.data_ptr() + gate.numel() * 4
    with torch.inference_mode():
        for x, want in zip(inputs, expected):
            torch.testing.assert_close(mlp(x), want, rtol=1e-5, atol=1e-5)
    x = torch.randn(1, 7, 96, requires_grad=True)
    mlp(x).sum().backward()  # with gradients: the modules' own path, and the gradient flows
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_the_fused_mlp_leaves_lora_targets_alone():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1)
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=2, target_modules=["gate_proj"]))
    assert cpu_kernels.install_fused_mlp(model, cpu_kernels.load()) == 0
