"""Shared fixtures: the tiny demo model and a tiny random Qwen2 model, built once per session."""

from __future__ import annotations

import contextlib

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from engine.config import EngineConfig
from engine.demo_model import build_demo_model
from scheduler.builder import build_engine

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def demo_model_dir(tmp_path_factory) -> str:
    return str(build_demo_model(tmp_path_factory.mktemp("demo-tiny"), "tiny", seed=0))


def _save_random_model(tmp_path_factory, demo_model_dir: str, name: str, model_cls, config_cls, seed: int,
                       **config) -> str:
    """Build a seeded random ``model_cls`` of ``config_cls(**config)`` (with the demo tokenizer's
    vocabulary and end token) and save it with that tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir)
    torch.manual_seed(seed)
    out = tmp_path_factory.mktemp(name)
    config = config_cls(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id, **config)
    model_cls(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def qwen2_model_dir(tmp_path_factory, demo_model_dir) -> str:
    """A random Qwen2-architecture model (biased q/k/v projections) with the demo tokenizer."""
    return _save_random_model(
        tmp_path_factory, demo_model_dir, "qwen2-tiny", Qwen2ForCausalLM, Qwen2Config, 1,
        hidden_size=96,
        intermediate_size=256,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )


@pytest.fixture(scope="session")
def reference_models(demo_model_dir, qwen2_model_dir):
    """Plain transformers models (SDPA attention) to compare the engine against."""
    cache = {}

    def get(path: str):
        if path not in cache:
            cache[path] = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa").eval()
        return cache[path]

    return get


@pytest.fixture
def make_engine(demo_model_dir):
    """Build (core, runner) on the demo model (or ``model=``) with small, test-sized defaults;
    ``overrides`` are ``EngineConfig`` fields by name; with ``training`` (a TrainingConfig) the
    engine trains on ``feedback_store``'s pairs (``core.training``)."""

    def make(model: str | None = None, training=None, feedback_store=None, tenants=(), **overrides):
        config = EngineConfig.build(
            model or demo_model_dir,
            kv_cache_bytes=8 << 20,
            block_size=16,
            max_num_batched_tokens=64,
            max_num_seqs=16,
        )
        return build_engine(config.replace(**overrides), training, feedback_store, tenants)

    return make


@pytest.fixture
def start_server(make_engine):
    """``async with start_server(engine_overrides={...}, **build_app_kwargs) as (url, engine)``:
    a real server on 127.0.0.1 (a free port), run exactly as ``mace serve`` runs it."""
    from aiohttp import web

    from server.app import build_app, make_runner
    from server.state import STATE

    @contextlib.asynccontextmanager
    async def start(engine_overrides: dict | None = None, trainer_config=None, **app_kwargs):
        # training on (trainer_config, a TrainingConfig) needs feedback_store= too
        core, runner = make_engine(**(engine_overrides or {}), training=trainer_config,
                                   feedback_store=app_kwargs.get("feedback_store"),
                                   tenants=sorted(set((app_kwargs.get("tenant_keys") or {}).values())))
        app = build_app(core, runner, **app_kwargs)
        engine = app[STATE].engine
        runner = make_runner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        try:
            yield f"http://127.0.0.1:{port}", engine
        finally:
            await runner.cleanup()

    return start


def spawn_server(model_dir: str, *args: str):
    """``mace serve`` in a subprocess on a free 127.0.0.1 port: (process, base url)."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "serve", "--model", model_dir, "--port", str(port),
         "--kv-cache-bytes", str(8 << 20), *args],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    return proc, f"http://127.0.0.1:{port}"


def stop_spawned(proc) -> None:
    """End a ``spawn_server`` process still running: SIGTERM, then SIGKILL after 30 s."""
    import signal
    import subprocess

    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


async def wait_ready(http, url: str, timeout_s: float = 120.0) -> None:
    """Poll /health until 200 (bounded: a server that never comes up fails the test; start-up
    profiles the machine, which a busy machine slows down)."""
    import asyncio

    import aiohttp

    for _ in range(int(timeout_s / 0.1)):
        try:
            async with http.get(f"{url}/health") as r:
                if r.status == 200:
                    return
        except aiohttp.ClientConnectionError:
            pass
        await asyncio.sleep(0.1)
    raise TimeoutError(f"{url} did not become ready in {timeout_s} s")


def random_prompts(lengths: list[int], seed: int = 0, vocab: int = 8000) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="session")
def mistral_model_dir(tmp_path_factory, demo_model_dir) -> str:
    """A random Mistral-architecture model whose sliding window (256) is shorter than its
    positions (512): the engine must cap its context at the window."""
    from transformers import MistralConfig, MistralForCausalLM

    return _save_random_model(
        tmp_path_factory, demo_model_dir, "mistral-tiny", MistralForCausalLM, MistralConfig, 2,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        max_position_embeddings=512,
        sliding_window=256,
    )


@pytest.fixture(scope="session")
def head64_model_dir(tmp_path_factory, demo_model_dir) -> str:
    """A random Llama with heads of 64 (the C prefill attention's head size), GQA groups of 2."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return _save_random_model(
        tmp_path_factory, demo_model_dir, "llama-head64", LlamaForCausalLM, LlamaConfig, 4,
        hidden_size=256,
        intermediate_size=384,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )


@pytest.fixture(scope="session")
def qwen3_model_dir(tmp_path_factory, demo_model_dir) -> str:
    """A random Qwen3-architecture model (q/k norms inside attention) with the demo tokenizer."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    return _save_random_model(
        tmp_path_factory, demo_model_dir, "qwen3-tiny", Qwen3ForCausalLM, Qwen3Config, 3,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=512,
    )
