"""Assembling an engine from a config: load the model, size the KV pool, wire core and runner."""

from __future__ import annotations

import dataclasses
import logging

import torch

from cache.memory import available_memory_bytes, kv_bytes_per_block
from engine.config import EngineConfig
from engine.model_loader import eos_token_ids, load_model, max_context_len
from engine.runner import ModelRunner
from engine.sampling_params import SamplingParams
from scheduler.core import EngineCore, RequestOutput

log = logging.getLogger(__name__)


def build_engine(config: EngineConfig) -> tuple[EngineCore, ModelRunner]:
    device = torch.device(config.device)
    dtype = getattr(torch, config.dtype) if config.dtype else None
    model, tokenizer = load_model(config.model, device, dtype)
    return build_from_model(model, tokenizer, config)


def build_from_model(model: torch.nn.Module, tokenizer, config: EngineConfig) -> tuple[EngineCore, ModelRunner]:
    """Wire an already-loaded model (with the paged attention selected) into core and runner."""
    mcfg = model.config
    context = max_context_len(mcfg)
    max_model_len = min(config.max_model_len or context, context)
    if config.max_num_batched_tokens is None:
        # FCFS plans bound an iteration's time by its tokens; mace bounds it by the TBT SLO
        # through the cost model, and the token cap only stops pathological plans.
        cpu = next(model.parameters()).device.type == "cpu"
        budget = (256 if cpu else 8192) if config.policy == "mace" else (64 if cpu else 2048)
        config = dataclasses.replace(config, max_num_batched_tokens=budget)
    if not config.enable_chunked_prefill and config.max_num_batched_tokens < max_model_len:
        # Without chunking a whole prompt must fit one iteration's budget.
        log.info("chunked prefill off: raising max_num_batched_tokens to %d", max_model_len)
        config = dataclasses.replace(config, max_num_batched_tokens=max_model_len)
    config = dataclasses.replace(config, max_model_len=max_model_len, vocab_size=mcfg.vocab_size)

    param = next(model.parameters())
    head_dim = getattr(mcfg, "head_dim", None) or mcfg.hidden_size // mcfg.num_attention_heads
    block_bytes = kv_bytes_per_block(
        mcfg.num_hidden_layers, mcfg.num_key_value_heads, head_dim, config.block_size, param.dtype
    )
    budget = config.kv_cache_bytes or int(config.kv_cache_fraction * available_memory_bytes(param.device))
    blocks_per_seq = -(-max_model_len // config.block_size)
    # More blocks than every slot at full context can use is memory taken for nothing.
    num_blocks = min(budget // block_bytes, config.max_num_seqs * blocks_per_seq)
    if num_blocks < 1:
        raise ValueError(f"the KV budget of {budget} bytes holds no block of {block_bytes} bytes")
    log.info("KV pool: %d blocks of %d tokens (%.1f MiB)", num_blocks, config.block_size, num_blocks * block_bytes / 2**20)
    core = EngineCore(config, tokenizer, eos_token_ids(model, tokenizer), num_blocks)
    runner = ModelRunner(model, num_blocks, config.block_size, config.decode_attention,
                         collect_attention_scores=config.kv_prune == "heavy-hitter")
    return core, runner


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


def attach_trainer(core: EngineCore, runner: ModelRunner, store, config=None, state_dir: str | None = None,
                   checkpoint_every: int = 10):
    """Put LoRA adapters on the served model and wire the DPO trainer: the executor runs on the
    worker (``runner.finetune_executor``), the trainer feeds the scheduler (``core.trainer``).
    With ``state_dir``, resume from its latest adapter checkpoint and write new ones there."""
    from trainer.adapters import attach_adapters
    from trainer.checkpoint import CheckpointWriter, latest_checkpoint, load_checkpoint
    from trainer.executor import FinetuneExecutor, TrainerConfig
    from trainer.trainer import Trainer

    config = config or TrainerConfig()
    tokenizer = core.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    peft_model = attach_adapters(runner.model, config)
    version = 0
    latest = latest_checkpoint(state_dir) if state_dir is not None else None
    if latest is not None:
        load_checkpoint(peft_model, latest[0])
        version = latest[1]
        log.info("resumed the adapter from %s (version %d)", latest[0], version)
    checkpoints = CheckpointWriter(peft_model, state_dir) if state_dir is not None else None
    runner.finetune_executor = FinetuneExecutor(peft_model, config, pad_id, version, checkpoints, checkpoint_every)
    core.trainer = Trainer(store, tokenizer, config, tokenizer.eos_token_id, checkpointing=state_dir is not None)
    core.trainer.adapter_version = version
    if runner.finetune_executor.checkpoints is not None:
        core.trainer.attach_checkpoints(runner.finetune_executor.checkpoints)
    return core.trainer
