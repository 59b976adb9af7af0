"""The paged attention paths against a plain SDPA reference on gathered keys."""

import shutil

import pytest
import torch
import torch.nn.functional as F

from engine import cpu_kernels


def reference(q, kc, vc, tables, lens, block_size):
    num_kv = kc.shape[2]
    out = []
    for b in range(q.shape[0]):
        n = int(lens[b])
        slots = (tables[b][:, None] * block_size + torch.arange(block_size)).view(-1)[:n]
        k = kc.view(-1, num_kv, kc.shape[-1])[slots].transpose(0, 1)  # (Hkv, n, D)
        v = vc.view(-1, num_kv, vc.shape[-1])[slots].transpose(0, 1)
        out.append(F.scaled_dot_product_attention(q[b][:, None], k, v, enable_gqa=True)[:, 0])
    return torch.stack(out)


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler")
# Head dim 64 takes the AVX-512 paths where the CPU has them (G <= 4 for the values), others the
# portable loops.
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(12, 4, 64), (16, 4, 64), (8, 1, 64), (4, 4, 32), (8, 1, 16)])
def test_c_decode_kernel_matches_sdpa(heads, kv_heads, head_dim):
    lib = cpu_kernels.load()
    assert lib is not None, "the C kernel should build where a compiler exists"
    g = torch.Generator().manual_seed(0)
    block_size, num_blocks = 16, 128
    kc = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g)
    vc = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g)
    lens = torch.tensor([1, 16, 17, 100, 250])  # one key, block-aligned, one past, longer
    max_blocks = (int(lens.max()) - 1) // block_size + 1
    tables = torch.randperm(num_blocks, generator=g)[: 5 * max_blocks].view(5, max_blocks)
    q = torch.randn(5, heads, head_dim, generator=g)
    out = cpu_kernels.paged_decode_attention(lib, q, kc, vc, tables, lens, head_dim**-0.5)
    torch.testing.assert_close(out, reference(q, kc, vc, tables, lens, block_size), atol=2e-6, rtol=1e-5)
