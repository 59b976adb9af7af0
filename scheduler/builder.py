"""Assembling an engine from its configuration: load the model, attach training, size the KV pool,
price iterations, and wire core and runner together, every part at construction."""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from cache.memory import available_memory_bytes, kv_bytes_per_block
from engine.config import EngineConfig, TrainingConfig
from engine.model_loader import eos_token_ids, load_model, max_context_len
from engine.runner import ModelRunner
from engine.sampling_params import SamplingParams
from scheduler.core import EngineCore, RequestOutput
from scheduler.cost_model import CostModel, suggest_slos
from scheduler.policies import policy_class

log = logging.getLogger(__name__)


def build_engine(config: EngineConfig, training: TrainingConfig | None = None,
                 feedback_store=None, tenants: Sequence[str] = ()) -> tuple[EngineCore, ModelRunner]:
    """Load ``config.model`` and build the engine on it (see ``build_from_model``)."""
    device = torch.device(config.model.device)
    dtype = getattr(torch, config.model.dtype) if config.model.dtype else None
    model, tokenizer = load_model(config.model.path, device, dtype)
    return build_from_model(model, tokenizer, config, training, feedback_store, tenants)


def build_from_model(model: torch.nn.Module, tokenizer, config: EngineConfig, training: TrainingConfig | None = None,
                     feedback_store=None, tenants: Sequence[str] = ()) -> tuple[EngineCore, ModelRunner]:
    """Wire an already-loaded model (with the paged attention selected) into core and runner.

    With ``training``, LoRA adapters go on the model and a ``trainer.training.Training`` trains
    them on ``feedback_store``'s pairs (a ``trainer.feedback.FeedbackStore``): its executor runs
    on the runner, its trainer feeds the core (``core.training``). Settings left open are filled
    in here: the context, the token budget, the SLOs (from a measured cost profile, when one is
    loaded or ``profile_on_start`` measures it). Each of ``tenants`` gets an adapter of its
    own, trained on its own store under ``STATE_DIR/tenants/TENANT`` (trainer/tenants.py)."""
    config = _resolve(model, config)
    owner = None
    tenant_trainings = {}
    if tenants and (training is None or training.state_dir is None):
        raise ValueError("tenants need training on and a state directory")
    if training is not None:
        if feedback_store is None:
            raise ValueError("training needs a feedback store")
        from trainer.feedback import FeedbackStore
        from trainer.training import Training  # (peft is imported only when training)

        task_ids = itertools.count()  # one sequence for every trainer's chunks
        owner = Training(model, tokenizer, feedback_store, training, task_ids=task_ids)
        for tenant in tenants:
            state_dir = Path(training.state_dir) / "tenants" / tenant
            state_dir.mkdir(parents=True, exist_ok=True)
            tenant_trainings[tenant] = Training(
                owner.executor.model, tokenizer, FeedbackStore(state_dir / "feedback.sqlite3"),
                dataclasses.replace(training, state_dir=str(state_dir)), tenant=tenant, task_ids=task_ids)
    num_blocks = _num_blocks(model, config)
    cache = config.cache
    runner = ModelRunner(model, num_blocks, cache.block_size, config.model.decode_attention,
                         collect_attention_scores=cache.kv_prune == "heavy-hitter",
                         finetune_executor=owner.executor if owner is not None else None)
    cost_model = _cost_model(runner, config)
    suggested = suggest_slos(cost_model, config.scheduler.max_num_seqs) if cost_model is not None else None
    config = dataclasses.replace(config, scheduler=config.scheduler.with_slos(suggested))
    core = EngineCore(config, tokenizer, eos_token_ids(model, tokenizer), num_blocks, cost_model=cost_model,
                      training=owner)
    if tenant_trainings:
        from trainer.tenants import ExecutorGroup, TrainerGroup

        core.tenants = tenant_trainings
        core.trainer = TrainerGroup({None: owner.trainer, **{t: tr.trainer for t, tr in tenant_trainings.items()}})
        runner.finetune_executor = ExecutorGroup({None: owner.executor,
                                                  **{t: tr.executor for t, tr in tenant_trainings.items()}})
    return core, runner


def _resolve(model: torch.nn.Module, config: EngineConfig) -> EngineConfig:
    """The context, the vocabulary and the token budget, from the model and the device."""
    mcfg = model.config
    context = max_context_len(mcfg)
    max_model_len = min(config.model.max_model_len or context, context)
    sched = config.scheduler
    budget = sched.max_num_batched_tokens
    if budget is None:
        budget = policy_class(sched.policy).default_max_num_batched_tokens(next(model.parameters()).device.type == "cpu")
    if not sched.enable_chunked_prefill and budget < max_model_len:
        # Without chunking a whole prompt must fit one iteration's budget.
        log.info("chunked prefill off: raising max_num_batched_tokens to %d", max_model_len)
        budget = max_model_len
    return config.replace(max_model_len=max_model_len, vocab_size=mcfg.vocab_size, max_num_batched_tokens=budget)


def _num_blocks(model: torch.nn.Module, config: EngineConfig) -> int:
    """KV blocks in the pool: the byte budget's worth, but no more than every sequence slot at
    full context can use (more is memory taken for nothing)."""
    mcfg, cache = model.config, config.cache
    param = next(model.parameters())
    head_dim = getattr(mcfg, "head_dim", None) or mcfg.hidden_size // mcfg.num_attention_heads
    block_bytes = kv_bytes_per_block(
        mcfg.num_hidden_layers, mcfg.num_key_value_heads, head_dim, cache.block_size, param.dtype
    )
    budget = cache.kv_cache_bytes or int(cache.kv_cache_fraction * available_memory_bytes(param.device))
    blocks_per_seq = -(-config.model.max_model_len // cache.block_size)
    num_blocks = min(budget // block_bytes, config.scheduler.max_num_seqs * blocks_per_seq)
    if num_blocks < 1:
        raise ValueError(f"the KV budget of {budget} bytes holds no block of {block_bytes} bytes")
    log.info("KV pool: %d blocks of %d tokens (%.1f MiB)", num_blocks, cache.block_size, num_blocks * block_bytes / 2**20)
    return num_blocks


def _cost_model(runner: ModelRunner, config: EngineConfig) -> CostModel | None:
    """A measured cost model: the profile file, or a brief profile of this machine now; None:
    none measured (the core starts from a prior)."""
    sched = config.scheduler
    if sched.cost_profile:
        return CostModel.load(sched.cost_profile)
    if not sched.profile_on_start:
        return None
    from scheduler.profiler import profile

    log.info("no cost profile: profiling this machine briefly")
    model, _ = profile(runner, config.model.max_model_len, quick=True, progress=False)
    return model


def generate(
    core: EngineCore, runner: ModelRunner, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]
) -> list[list[int]]:
    """Run prompts to completion inline (no thread) and return each one's output token ids."""
    if isinstance(params, SamplingParams):
        params = [params] * len(prompts)
    ids = [f"gen-{i}" for i in range(len(prompts))]
    for rid, prompt, p in zip(ids, prompts, params):
        core.add_request(rid, prompt, p)
    tokens: dict[str, list[int]] = {rid: [] for rid in ids}
    while core.has_work:
        out: RequestOutput
        for out in core.step(runner):
            tokens[out.request_id].extend(out.new_token_ids)
    return [tokens[rid] for rid in ids]
