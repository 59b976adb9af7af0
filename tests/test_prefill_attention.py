"""The C causal attention of a fresh prefill chunk, against torch's SDPA."""

import shutil

import pytest
import torch
import torch.nn.functional as F

from engine import cpu_kernels

pytestmark = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler")


def _avx512() -> bool:
    with open("/proc/cpuinfo") as f:
        return "avx512f" in f.read()


# chunk lengths around the 16-row items and the 8-key steps; GQA groups of 1, 3 and 4
@pytest.mark.parametrize("tokens, heads, kv_heads", [(1, 6, 2), (7, 12, 4), (16, 4, 4), (17, 8, 2), (100, 12, 4),
                                                     (333, 6, 2)])
def test_it_matches_sdpa_on_the_layouts_the_model_hands_it(tokens, heads, kv_heads):
    lib = cpu_kernels.load()
    assert lib is not None
    g = torch.Generator().manual_seed(tokens)
    # as the attention receives them: (1, H, T, D) views of (1, T, H, D) projections
    q = torch.randn(1, tokens, heads, 64, generator=g).transpose(1, 2)
    k = torch.randn(1, tokens, kv_heads, 64, generator=g).transpose(1, 2)
    v = torch.randn(1, tokens, kv_heads, 64, generator=g).transpose(1, 2)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.11, enable_gqa=heads != kv_heads)
    out = torch.full((tokens, heads, 64), float("nan"))
    covered = cpu_kernels.prefill_attention(lib, q[0], k[0], v[0], out, 0.11)
    if not _avx512():
        assert not covered and out.isnan().all()
        return
    assert covered
    torch.testing.assert_close(out, want[0].transpose(0, 1), rtol=1e-5, atol=1e-5)


def test_other_head_dims_and_layouts_are_left_to_sdpa():
    lib = cpu_kernels.load()
    q, k = torch.randn(8, 20, 32), torch.randn(2, 20, 32)
    out = torch.full((20, 8, 32), float("nan"))
    assert not cpu_kernels.prefill_attention(lib, q, k, k.clone(), out, 0.2)  # head dim 32
    q, k, v = torch.randn(8, 20, 64), torch.randn(2, 20, 64), torch.randn(20, 2, 64).transpose(0, 1)
    out = torch.full((20, 8, 64), float("nan"))
    assert not cpu_kernels.prefill_attention(lib, q, k, v, out, 0.2)  # k and v laid out differently
    assert out.isnan().all()
