"""The CPU kernels (``csrc/*.c``), built on first use into one library and loaded with ctypes.

- Paged decode attention (``paged_decode.c``): on CPU the SDPA path must first gather each
  sequence's keys and values out of the block pool, which at decode batch 32 costs as much as the
  attention itself (measured: 18 ms of a 78 ms iteration on the base demo model). The kernel
  reads the pool in place.
- Linear layers at a few rows (``linear.c``, up to ``SMALL_LINEAR_ROWS``): a decode step's
  matrix-vector products are bound by reading the weights, and torch reads them at one core's
  bandwidth whatever its thread count (the base demo model's 226 MB: 18 ms at one row, one or two
  threads); the kernel splits the weights' rows across the threads and reads each row once for
  all the step's rows (7-9 ms at one row, 8.6-11 at four, 18-20 at sixteen, two threads, against
  torch's 18-21, 33 and 30-36; at 32 rows 34 vs 41 ms, at 64 62 vs 65, and from 128 rows torch's
  blocked GEMM is as fast or faster, so it keeps those). ``install_small_linear`` puts it under a
  model's ``nn.Linear`` layers for inference; with gradients on (fine-tune work) or more rows,
  torch's path runs as before.

Built with the system C compiler into ``$XDG_CACHE_HOME/mace-serve/kernels/<source hash>/`` (about a
second), once per machine. Without a compiler, or with ``MACE_NO_C_KERNELS=1``, ``load()`` returns
None and the engine keeps the SDPA path. ctypes releases the GIL for the call, so the event loop
thread keeps running while the worker is in the kernel.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from functools import cache
from importlib import resources
from pathlib import Path

import torch

from engine import host_memory

log = logging.getLogger(__name__)
_SOURCES = ("csrc/paged_decode.c", "csrc/linear.c", "csrc/decode_step.c", "csrc/prefill_attention.c")  # in this order: one unit
SMALL_LINEAR_ROWS = 64
# weights smaller than this stay on torch's path (LoRA's rank-8 factors): the call costs more
MIN_SMALL_LINEAR_WEIGHTS = 1 << 16


def _cache_dir() -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return root / "mace-serve" / "kernels"


def _compile(source: bytes, target: Path) -> None:
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler found")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src = Path(tmp) / "kernel.c"
        src.write_bytes(source)
        out = Path(tmp) / target.name
        cmd = [compiler, "-O3", "-march=native", "-fno-math-errno", "-fopenmp", "-shared", "-fPIC", str(src), "-o", str(out), "-lm"]
        subprocess.run(cmd, check=True, capture_output=True)
        os.replace(out, target)  # atomic: a concurrent builder never sees half a library


@cache
def load() -> ctypes.CDLL | None:
    """The compiled kernel library, or None when it cannot be built here."""
    if os.environ.get("MACE_NO_C_KERNELS") == "1":
        return None
    source = b"\n".join(resources.files("engine").joinpath(name).read_bytes() for name in _SOURCES)
    target = _cache_dir() / hashlib.sha256(source).hexdigest()[:16] / "kernels.so"
    try:
        if not target.exists():
            _compile(source, target)
        lib = ctypes.CDLL(str(target))
    except (OSError, RuntimeError, subprocess.CalledProcessError) as exc:
        log.warning("CPU kernels unavailable (%s); using torch's paths", exc)
        return None
    fn = lib.paged_decode_attention_f32
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p] * 7 + [ctypes.c_int64] * 7 + [ctypes.c_float, ctypes.c_int]
    fn = lib.mace_linear_f32
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3 + [ctypes.c_int]
    fn = lib.mace_silu_mul_f32
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 2 + [ctypes.c_int]
    fn = lib.mace_prefill_attention_f32
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                   ctypes.c_int64, ctypes.c_void_p] + [ctypes.c_int64] * 4 + [ctypes.c_float, ctypes.c_int]
    from engine.decode_step import declare

    declare(lib)
    return lib


def small_linear(lib: ctypes.CDLL, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for fp32 CPU tensors of at most SMALL_LINEAR_ROWS rows
    (all but the last dimension), weight and bias contiguous."""
    k = x.shape[-1]
    rows = x.numel() // k
    x2 = x.reshape(rows, k).contiguous()
    out = torch.empty(rows, weight.shape[0], dtype=x.dtype)
    lib.mace_linear_f32(x2.data_ptr(), weight.data_ptr(), bias.data_ptr() if bias is not None else None,
                        out.data_ptr(), rows, k, weight.shape[0], torch.get_num_threads())
    return out.view(*x.shape[:-1], weight.shape[0])


def install_small_linear(model: torch.nn.Module, lib: ctypes.CDLL) -> int:
    """Route the fp32 CPU ``nn.Linear`` layers of ``model`` (at least MIN_SMALL_LINEAR_WEIGHTS
    weights) through ``small_linear`` when no gradient is recorded and the input has at most
    SMALL_LINEAR_ROWS rows. Returns how many layers it covers. Idempotent."""
    count = 0
    for module in model.modules():
        if type(module) is not torch.nn.Linear or getattr(module, "_mace_small_linear", False):
            continue
        w = module.weight
        if w.dtype != torch.float32 or w.device.type != "cpu" or w.numel() < MIN_SMALL_LINEAR_WEIGHTS:
            continue
        module.forward = _small_linear_forward(module, lib)
        module._mace_small_linear = True
        count += 1
    return count


def _small_linear_forward(module: torch.nn.Linear, lib: ctypes.CDLL):
    linear = torch.nn.functional.linear

    def forward(x: torch.Tensor) -> torch.Tensor:
        w, b = module.weight, module.bias
        if (torch.is_grad_enabled() or x.dtype != torch.float32 or x.numel() > SMALL_LINEAR_ROWS * x.shape[-1]
                or not w.is_contiguous() or w.dtype != torch.float32):
            return linear(x, w, b)
        return small_linear(lib, x, w, b if b is None or b.is_contiguous() else b.contiguous())

    return forward


def install_fused_mlp(model: torch.nn.Module, lib: ctypes.CDLL) -> int:
    """Compute each SwiGLU MLP's gate and up projections as one, for inference: the two weights
    move into one (2I, H) tensor whose halves the two ``nn.Linear`` layers keep as their weights
    (views: no memory more, and every other path reads them as before), and with no gradient the
    MLP runs one matrix product over both and the C kernel's silu(gate) * up. At a 512-token
    prefill of the base demo model, one (512, 768) x (768, 4096) product took 10% less than two
    of half the width, and the C gate 1.5 ms against torch's silu and mul 3 ms, each layer.
    Layers whose gate or up projection is anything but a plain bias-free ``nn.Linear`` (a LoRA
    target, say) are left alone. Returns how many MLPs it covers. Idempotent."""
    count = 0
    for module in model.modules():
        gate, up = getattr(module, "gate_proj", None), getattr(module, "up_proj", None)
        down = getattr(module, "down_proj", None)
        if (getattr(module, "_mace_fused_mlp", False) or type(gate) is not torch.nn.Linear
                or type(up) is not torch.nn.Linear or down is None or gate.bias is not None or up.bias is not None
                or getattr(getattr(module, "config", None), "hidden_act", "silu") != "silu"):
            continue
        w_gate, w_up = gate.weight, up.weight
        if (w_gate.dtype != torch.float32 or w_gate.device.type != "cpu" or w_gate.shape != w_up.shape
                or w_up.dtype != torch.float32):
            continue
        with torch.no_grad():
            fused = host_memory.empty((2 * w_gate.shape[0], w_gate.shape[1]), w_gate.dtype)  # (2I, H)
            torch.cat([w_gate, w_up], out=fused)
        size = w_gate.shape[0]
        gate.weight = torch.nn.Parameter(fused[:size], requires_grad=w_gate.requires_grad)
        up.weight = torch.nn.Parameter(fused[size:], requires_grad=w_up.requires_grad)
        module.forward = _fused_mlp_forward(module, fused, lib)
        module._mace_fused_mlp = True
        count += 1
    return count


def _fused_mlp_forward(mlp: torch.nn.Module, fused: torch.Tensor, lib: ctypes.CDLL):
    unfused = mlp.forward
    size = fused.shape[0] // 2

    def forward(x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() or x.dtype != torch.float32 or x.device.type != "cpu":
            return unfused(x)
        rows = x.numel() // x.shape[-1]
        x2 = x.reshape(rows, x.shape[-1])
        if rows <= SMALL_LINEAR_ROWS:
            gu = small_linear(lib, x2, fused, None)
        else:
            gu = torch.nn.functional.linear(x2, fused)
        h = torch.empty(rows, size, dtype=x.dtype)
        lib.mace_silu_mul_f32(gu.data_ptr(), h.data_ptr(), rows, size, torch.get_num_threads())
        return mlp.down_proj(h).view(*x.shape[:-1], -1)

    return forward


def prefill_attention(lib: ctypes.CDLL, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                      scale: float) -> bool:
    """Causal attention of a fresh chunk into ``out`` (c, H, D), contiguous: q (H, c, D), k and v
    (HKV, c, D), fp32 views with unit stride along D and k, v laid out alike. False (``out``
    untouched) where the kernel does not cover it (head dim other than 64, no AVX-512)."""
    if (q.stride(-1) != 1 or k.stride() != v.stride() or k.stride(-1) != 1 or not out.is_contiguous()
            or q.dtype != torch.float32 or k.dtype != torch.float32 or v.dtype != torch.float32):
        return False
    heads, tokens, head_dim = q.shape
    failed = lib.mace_prefill_attention_f32(
        q.data_ptr(), q.stride(1), q.stride(0), k.data_ptr(), v.data_ptr(), k.stride(1), k.stride(0), out.data_ptr(),
        tokens, heads, k.shape[0], head_dim, scale, torch.get_num_threads(),
    )
    if failed == 2:
        raise MemoryError("prefill attention kernel could not allocate its scratch")
    return failed == 0


def paged_decode_attention(
    lib: ctypes.CDLL,
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    tables: torch.Tensor,
    lens: torch.Tensor,
    scale: float,
    score_acc: torch.Tensor | None = None,
) -> torch.Tensor:
    """q: (B, H, D) fp32; caches (num_blocks, block_size, Hkv, D); tables (B, max_blocks) int64;
    lens (B,) int64. Returns (B, H, D). ``score_acc`` (B, >= max len) fp32, contiguous: each key's
    attention probability, summed over heads, is added to it."""
    q = q.contiguous()
    out = torch.empty_like(q)
    num_blocks, block_size, num_kv_heads, head_dim = k_cache.shape
    batch, num_heads, _ = q.shape
    acc_ptr, acc_stride = (score_acc.data_ptr(), score_acc.shape[1]) if score_acc is not None else (None, 0)
    failed = lib.paged_decode_attention_f32(
        q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), tables.data_ptr(), lens.data_ptr(), out.data_ptr(),
        acc_ptr, acc_stride,
        batch, num_heads, num_kv_heads, head_dim, block_size, tables.shape[1], scale, torch.get_num_threads(),
    )
    if failed:
        raise MemoryError("paged decode kernel could not allocate its scores buffer")
    return out
