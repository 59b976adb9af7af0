"""`mace bench cpu`: `mace serve` against llama.cpp's `llama-server` on the CPU, same model, same threads.

Both servers are driven over HTTP the same way (``/v1/completions``, prompts as token ids so
that neither tokenizer plays a part, greedy, EOS ignored, prompt caching off), one after the
other, alternating their order round by round (the machine drifts). Per round and server:

1. throughput: ``--requests`` (16) requests at once, prompts of 32-1024 random token ids, outputs
   of 16-256 tokens (seeded, the same every round): output tokens / wall time.
2. decode: one request alone, a 256-token prompt, 129 tokens out, minus one with 1 token out:
   milliseconds per decoded token at batch 1 (each the best of ``--repeats``; every request has a
   prompt of its own, so no prefix cache plays a part).
3. prefill: one request alone, a 512-token prompt, 1 token out: milliseconds per prompt token
   (the best of ``--repeats``; it includes one sampled token and the HTTP round trip).

The peer, when there is one (``--llama-cpp DIR``; without it `mace` runs alone): llama.cpp built
from the source vendored in the ``llama-cpp-python`` sdist, with the model converted to GGUF by its
converter. The steps, once per machine::

    pip download llama-cpp-python --no-binary :all: --no-deps -d /tmp/llama
    tar xzf /tmp/llama/llama_cpp_python-*.tar.gz -C /tmp/llama
    cd /tmp/llama/llama_cpp_python-*/vendor/llama.cpp
    cmake -B build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \\
          -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
    cmake --build build --target llama-server -j
    mace bench cpu --llama-cpp /tmp/llama/llama_cpp_python-*/vendor/llama.cpp

The bench converts ``--model`` to ``~/.cache/mace-serve/gguf/<name>-<type>.gguf`` with that tree's
``convert_hf_to_gguf.py`` the first time (a tokenizer it does not know gets llama.cpp's default
pre-tokenizer: the prompts are token ids). ``llama-server`` runs with ``--threads``, one slot per
request, a context of ``slots x 1280`` tokens, and its weights read into memory rather than
memory-mapped (``--load-mode none``, ``--no-mmap`` in older builds), as ``mace serve`` copies its own
out of the checkpoint's mapping: with the mapping it decoded 9.2-11.2 ms a token of the base demo
model, without it 7.5-9.2 (one server after the other, twice).

Prints a table and writes JSON; no timing is asserted anywhere.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any

import aiohttp

from bench.common import (
    cpu_name,
    free_port,
    resolve_model,
    save_results,
    serving_process,
    spawned_server,
)

SLOT_CONTEXT = 1280  # the longest request: a 1024-token prompt and 256 out
_CONVERT = """
import runpy, sys
tree = sys.argv[1]
sys.path[:0] = [tree, tree + "/gguf-py"]
import conversion.base as base

get_pre = base.TextModel.get_vocab_base_pre
def vocab_base_pre(self, tokenizer):
    try:
        return get_pre(self, tokenizer)
    except NotImplementedError:  # a tokenizer it does not know: the prompts are token ids anyway
        return "default"
base.TextModel.get_vocab_base_pre = vocab_base_pre

sentencepiece = base.TextModel._set_vocab_sentencepiece
def set_vocab_sentencepiece(self, *args, **kwargs):
    if not (self.dir_model / "tokenizer.model").is_file():
        raise FileNotFoundError("no tokenizer.model")  # the converter then tries the BPE vocab
    return sentencepiece(self, *args, **kwargs)
base.TextModel._set_vocab_sentencepiece = set_vocab_sentencepiece

sys.argv = ["convert_hf_to_gguf.py", *sys.argv[2:]]
runpy.run_path(tree + "/convert_hf_to_gguf.py", run_name="__main__")
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="local checkpoint directory (default: the base demo model)")
    p.add_argument("--llama-cpp", default=None,
                   help="a llama.cpp source tree with build/bin/llama-server built (see above); without it, mace alone")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="both servers' weights: mace --dtype, the GGUF's type (f32 or bf16)")
    p.add_argument("--threads", type=int, default=2, help="math threads, both servers")
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3, help="single-request measurements: the best of this many")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mace-flags", default="", help="more `mace serve` flags, one string")
    p.add_argument("--setups", default=",".join(MACE_SETUPS),
                   help=f"which `mace serve` setups run, comma-separated, of: {', '.join(MACE_SETUPS)}")
    p.add_argument("--profile", action="store_true",
                   help="instead: where one engine step's time goes, in-process (bench/cpu_profile.py)")
    p.add_argument("--out", default="bench-results/cpu.json")


# How `mace serve` runs: ``mace``, its defaults (the mace policy, which keeps every running
# request's time between tokens within its SLO, so a queue of prompts is prefilled in pieces that
# fit beside the decodes); ``mace-512``, batching as llama-server does (first come first served,
# up to 512 tokens an iteration, prompts prefilled in pieces of up to 512 beside the decodes:
# llama-server's ``-b 512``), the setup for raw throughput.
MACE_SETUPS = {"mace": [], "mace-512": ["--policy", "inference-only", "--max-num-batched-tokens", "512"]}


# -- the workload -----------------------------------------------------------------------------------

def throughput_workload(n: int, vocab: int, seed: int) -> list[tuple[list[int], int]]:
    """``n`` (prompt token ids, output length): prompts 32-1024 tokens, outputs 16-256."""
    rng = random.Random(seed)
    return [([rng.randrange(4, vocab) for _ in range(rng.randint(32, 1024))], rng.randint(16, 256)) for _ in range(n)]


async def _complete(session: aiohttp.ClientSession, url: str, body: dict) -> int:
    """One non-streamed completion; returns its completion token count."""
    async with session.post(f"{url}/v1/completions", json=body) as r:
        data = await r.json(content_type=None)
        if r.status != 200:
            raise RuntimeError(f"{url}: HTTP {r.status}: {data}")
    return int(data["usage"]["completion_tokens"])


class Peer:
    """How one server is asked: its request body's fields beyond the common ones."""

    def __init__(self, name: str, url: str, extra: dict) -> None:
        self.name, self.url, self.extra = name, url, extra

    def body(self, prompt: list[int], max_tokens: int) -> dict:
        # no "model": each server answers with the one it serves
        return {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True, **self.extra}


async def measure(peer: Peer, work: list[tuple[list[int], int]], vocab: int, repeats: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed + 1)
    # a fresh prompt for every single request: nothing may come from a prefix cache
    def prompt(n: int) -> list[int]:
        return [rng.randrange(4, vocab) for _ in range(n)]
    timeout = aiohttp.ClientTimeout(total=1800)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:
        await _complete(session, peer.url, peer.body(prompt(16), 4))  # warm-up

        async def timed(prompt: list[int], max_tokens: int) -> tuple[float, int]:
            start = time.perf_counter()
            tokens = await _complete(session, peer.url, peer.body(prompt, max_tokens))
            return time.perf_counter() - start, tokens

        start = time.perf_counter()
        counts = await asyncio.gather(*(_complete(session, peer.url, peer.body(p, n)) for p, n in work))
        wall = time.perf_counter() - start
        long = min([await timed(prompt(256), 129) for _ in range(repeats)])
        short = min([await timed(prompt(256), 1) for _ in range(repeats)])
        prefill = min([await timed(prompt(512), 1) for _ in range(repeats)])
    if long[1] != 129 or short[1] != 1 or sum(counts) != sum(n for _, n in work):
        raise RuntimeError(f"{peer.name}: asked {sum(n for _, n in work)} tokens, got {sum(counts)}")
    return {"throughput_tok_s": sum(counts) / wall, "throughput_wall_s": wall,
            "decode_ms_per_token": (long[0] - short[0]) / 128 * 1e3, "prefill_ms_per_token": prefill[0] / 512 * 1e3}


# -- the servers ------------------------------------------------------------------------------------

def gguf_for(model: str, tree: Path, dtype: str, out_dir: Path) -> Path:
    """The model converted to GGUF (once; later runs reuse the file)."""
    outtype = {"float32": "f32", "bfloat16": "bf16"}[dtype]
    path = out_dir / f"{Path(model).resolve().name}-{outtype}.gguf"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        print(f"converting {model} to {path}", flush=True)
        subprocess.run([sys.executable, "-c", _CONVERT, str(tree), model, "--outfile", str(path), "--outtype", outtype],
                       check=True, stdout=subprocess.DEVNULL)
    return path


@cache
def no_mmap_flags(binary: Path) -> tuple[str, ...]:
    """The flag that loads the weights into memory instead of mapping the file, as this build of
    llama-server spells it (none if it has neither)."""
    usage = subprocess.run([str(binary), "--help"], capture_output=True, text=True, timeout=60).stdout
    if "--load-mode" in usage:
        return ("--load-mode", "none")
    return ("--no-mmap",) if "--no-mmap" in usage else ()


@contextmanager
def llama_server(binary: Path, gguf: Path, threads: int, slots: int, log_path: Path, ready_timeout_s: float = 120.0):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "--threads", str(threads),
             "--threads-batch", str(threads), "--parallel", str(slots), "--ctx-size", str(slots * SLOT_CONTEXT),
             *no_mmap_flags(binary)],
            stdout=log, stderr=subprocess.STDOUT)
        with serving_process(proc, url, "llama-server", log_path, ready_timeout_s):
            yield url


def _run_mace(args, setup: str, model: str, work, vocab: int, logs: Path, round_: int) -> dict[str, Any]:
    flags = ["--threads", str(args.threads), "--dtype", args.dtype, *MACE_SETUPS[setup], *args.mace_flags.split()]
    with spawned_server(model, *flags, log_path=logs / f"{setup}-{round_}.log", ready_timeout_s=600.0) as url:
        return asyncio.run(measure(Peer("mace", url, {}), work, vocab, args.repeats, args.seed))


def _run_llama(args, binary: Path, gguf: Path, work, vocab: int, logs: Path, round_: int) -> dict[str, Any]:
    with llama_server(binary, gguf, args.threads, args.requests, logs / f"llama-{round_}.log") as url:
        return asyncio.run(measure(Peer("llama", url, {"cache_prompt": False}), work, vocab, args.repeats, args.seed))


# -- the report -------------------------------------------------------------------------------------

FIGURES = (("throughput_tok_s", "16-request throughput tok/s", True),
           ("decode_ms_per_token", "batch-1 decode ms/token", False),
           ("prefill_ms_per_token", "512-token prefill ms/token", False))


def _spread(values: list[float]) -> str:
    return f"{statistics.mean(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def report(rows: list[dict[str, Any]], args, model: str) -> str:
    """A column per system, then each mace setup's ratio to llama's, round by round (mean and
    spread of the ratios; better: > 1 for tok/s, < 1 for ms)."""
    systems = [s for s in (*MACE_SETUPS, "llama") if any(r["system"] == s for r in rows)]
    setups = [s for s in systems if s != "llama"] if "llama" in systems else []
    header = (f"Model `{model}`, {args.dtype}, {args.threads} threads each, {args.requests} requests at once; "
              f"{cpu_name()}; {args.rounds} rounds, alternating. Command: `mace bench cpu {' '.join(sys.argv[3:])}`.")
    lines = [header, "", "| figure | " + " | ".join([*systems, *(f"{s} / llama" for s in setups)]) + " |",
             "|---|" + "---:|" * (len(systems) + len(setups))]
    for key, label, _ in FIGURES:
        cells = [_spread([r[key] for r in rows if r["system"] == s]) for s in systems]
        llama = {r["round"]: r[key] for r in rows if r["system"] == "llama"}
        for s in setups:
            cells.append(_spread([r[key] / llama[r["round"]] for r in rows if r["system"] == s]) + "x")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> dict:
    import json

    model = resolve_model(args.model)
    if args.profile:
        from bench.cpu_profile import profile, table

        result = profile(model, args.threads, args.dtype)
        text = (f"Model `{model}`, {args.dtype}, {args.threads} threads; {cpu_name()}; ms per step, median of "
                f"the steps. Command: `mace bench cpu {' '.join(sys.argv[3:])}`.\n\n" + table(result))
        print(text)
        save_results(Path(args.out).with_name(Path(args.out).stem + "-profile.json"), result, text)
        return result
    vocab = json.loads((Path(model) / "config.json").read_text())["vocab_size"]
    out = Path(args.out)
    logs = out.with_name(out.stem + "-logs")
    logs.mkdir(parents=True, exist_ok=True)
    binary = gguf = None
    if args.llama_cpp:
        tree = Path(args.llama_cpp)
        binary = tree / "build" / "bin" / "llama-server"
        if not binary.exists():
            raise SystemExit(f"{binary} not found: build it first (mace bench cpu --help)")
        cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mace-serve" / "gguf"
        gguf = gguf_for(model, tree, args.dtype, cache)
    work = throughput_workload(args.requests, vocab, args.seed)
    rows = []
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    setups = [s.strip() for s in args.setups.split(",") if s.strip()]
    unknown = [s for s in setups if s not in MACE_SETUPS]
    if unknown or not setups:
        raise SystemExit(f"--setups: unknown {unknown}; known: {', '.join(MACE_SETUPS)}")
    systems = setups + (["llama"] if binary is not None else [])
    for round_ in range(args.rounds):
        shift = round_ % len(systems)  # each system first in turn
        for system in systems[shift:] + systems[:shift]:
            if system == "llama":
                result = _run_llama(args, binary, gguf, work, vocab, logs, round_)
            else:
                result = _run_mace(args, system, model, work, vocab, logs, round_)
            rows.append({"system": system, "round": round_, **result})
            print(rows[-1], flush=True)
    table = report(rows, args, model)
    print(table)
    result = {"command": "mace bench cpu " + " ".join(sys.argv[3:]), "processor": cpu_name(), "model": model,
              "config": {k: v for k, v in vars(args).items() if not callable(v)}, "rows": rows}
    save_results(out, result, table)
    return result
