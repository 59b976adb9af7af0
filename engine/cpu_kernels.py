"""The CPU paged-decode kernel (``csrc/paged_decode.c``), built on first use and loaded with ctypes.

Why C: on CPU the SDPA path must first gather each sequence's keys and values out of the block
pool, which at decode batch 32 costs as much as the attention itself (measured: 18 ms of a 78 ms
iteration on the base demo model). The kernel reads the pool in place.

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

log = logging.getLogger(__name__)
_SOURCE = "csrc/paged_decode.c"


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
    source = resources.files("engine").joinpath(_SOURCE).read_bytes()
    target = _cache_dir() / hashlib.sha256(source).hexdigest()[:16] / "paged_decode.so"
    try:
        if not target.exists():
            _compile(source, target)
        lib = ctypes.CDLL(str(target))
    except (OSError, RuntimeError, subprocess.CalledProcessError) as exc:
        log.warning("CPU paged-decode kernel unavailable (%s); using the SDPA path", exc)
        return None
    fn = lib.paged_decode_attention_f32
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p] * 7 + [ctypes.c_int64] * 7 + [ctypes.c_float, ctypes.c_int]
    return lib


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
