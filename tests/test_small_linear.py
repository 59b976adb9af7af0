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
