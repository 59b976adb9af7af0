"""Command-line flags to configuration, in one place.

Every engine flag's ``dest`` is the name of its field in ``engine.config`` (``--retrain-period``
sets ``retrain_period_s``, ``--no-prefix-cache`` clears ``enable_prefix_caching``), so
``engine_config(args)`` takes every field a command's parser defines, whatever the command. A
flag added here, with its field in ``engine/config.py``, reaches ``mace serve`` and every command
that builds its configuration with ``engine_config``.
"""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any

from engine.config import TRAINING_FIELDS, EngineConfig, TrainingConfig
from scheduler.policies import POLICIES, policy_class


def _modules(text: str) -> tuple[str, ...]:
    return tuple(text.split(","))


def add_engine_flags(parser: argparse.ArgumentParser, device_default: str) -> None:
    """The flags of ``EngineConfig``'s groups and of ``TrainingConfig``."""
    g = parser.add_argument_group("model")
    g.add_argument("--model", default=None, help="local Hugging Face checkpoint directory (default: the tiny demo model)")
    g.add_argument("--device", default=device_default)
    g.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--seed", type=int, default=0)
    add_threads_flag(g)

    g = parser.add_argument_group("KV cache")
    g.add_argument("--block-size", type=int, default=16)
    g.add_argument("--kv-cache-bytes", type=int, default=None, help="KV pool size; default: a fraction of free memory")
    g.add_argument("--kv-cache-fraction", type=float, default=0.3)
    g.add_argument("--no-prefix-cache", dest="enable_prefix_caching", action="store_false",
                   help="do not share KV blocks of common prefixes")
    g.add_argument("--kv-prune", choices=["none", "window", "heavy-hitter"], default="none",
                   help="drop KV entries past --kv-budget: attention sinks + recent window, or + heavy hitters (H2O)")
    g.add_argument("--kv-budget", type=float, default=0.5,
                   help="KV entries kept per sequence when pruning: a count (>= 1) or a fraction of its tokens (< 1)")
    g.add_argument("--kv-sink-tokens", type=int, default=4, help="first tokens always kept when pruning")

    g = parser.add_argument_group("scheduling")
    g.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="tokens per iteration (default: 64 on CPU, 2048 on CUDA; mace: 256 and 8192)")
    g.add_argument("--max-num-seqs", type=int, default=64)
    g.add_argument("--max-loras", type=int, default=8,
                   help="distinct LoRA adapters among the running requests (the base model not counted)")
    g.add_argument("--no-chunked-prefill", dest="enable_chunked_prefill", action="store_false")
    g.add_argument("--policy", choices=list(POLICIES), default="mace",
                   help="fine-tune work per iteration: every iteration (SLO-blind), the TBT SLO's slack, "
                        "bursts every --retrain-period, or none")
    g.add_argument("--retrain-period", dest="retrain_period_s", metavar="RETRAIN_PERIOD", type=float, default=60.0,
                   help="seconds between periodic retraining bursts")
    g.add_argument("--finetune-tokens-per-iteration", type=int, default=512)
    g.add_argument("--slo-ttft-ms", type=float, default=None,
                   help="default time-to-first-token SLO (default: from the cost profile, else 1000)")
    g.add_argument("--slo-tbt-ms", type=float, default=None,
                   help="default time-between-tokens SLO the mace policy protects (default: from the cost profile, else 100)")
    g.add_argument("--cost-profile", "--profile", dest="cost_profile", default=None,
                   help="a `mace profile` file (default with --policy mace: a brief profile at start)")
    g.add_argument("--tau-mem", type=float, default=0.9, help="mace: share of free KV blocks one iteration may claim")
    g.add_argument("--pack-top-k", type=int, default=4, help="mace: best fit among this many top-priority candidates")
    g.add_argument("--slo-bank-max", type=float, default=1.0,
                   help="mace: longest iteration, in TBT budgets, that requests ahead of their pace may absorb")
    g.add_argument("--finetune-memory-bytes", type=int, default=None,
                   help="mace: activation memory fine-tune work may hold (default: no cap; the profile measures bytes per token)")
    g.add_argument("--finetune-min-every", type=int, default=50,
                   help="mace: fine-tune work at least once every N iterations (the starvation guard)")
    g.add_argument("--finetune-min-share", type=float, default=0.05,
                   help="mace: the share of time fine-tune work is guaranteed while pairs wait, in its smallest "
                        "pieces, whatever the load (0: none)")
    g.add_argument("--finetune-max-slowdown", type=float, default=1.2,
                   help="mace: fine-tune work keeps an iteration within this many times the p90 of inference-alone "
                        "iterations, and delays a first token by at most (this - 1) of a typical one; 0: the SLO's "
                        "capacity only")

    g = parser.add_argument_group("alignment (DPO on feedback, LoRA)")
    g.add_argument("--no-training", action="store_true", help="store feedback but never train")
    g.add_argument("--keep-versions", type=int, default=4,
                   help="the last K published adapter versions stay loadable: pinned by requests (MODEL@VERSION) "
                        "and returned to by a rollback")
    g.add_argument("--lora-rank", type=int, default=8)
    g.add_argument("--lora-alpha", type=int, default=16)
    g.add_argument("--lora-dropout", type=float, default=0.0)
    g.add_argument("--lora-target-modules", dest="target_modules", metavar="LORA_TARGET_MODULES", type=_modules, default=_modules("q_proj,k_proj,v_proj,o_proj"))
    g.add_argument("--learning-rate", dest="lr", metavar="LEARNING_RATE", type=float, default=5e-4)
    g.add_argument("--grad-accum", type=int, default=4, help="pairs per optimizer step")
    g.add_argument("--dpo-beta", type=float, default=0.1)
    g.add_argument("--rpo-alpha", type=float, default=0.0,
                   help="weight of an NLL term on the chosen answer added to the DPO loss (trl's rpo_alpha; 0: plain DPO)")
    g.add_argument("--checkpoint-every", type=int, default=10, help="adapter checkpoint every N steps (and at shutdown)")
    g.add_argument("--no-layer-cuts", dest="layer_cuts", action="store_false",
                   help="never cut a sequence's forward and backward at decoder layers (the smallest piece is a whole sequence)")
    g.add_argument("--rank-window", type=int, default=8,
                   help="train the pair the adapter gets most wrong among up to N ready pairs (their DPO loss "
                        "estimated beside the reference pass); 0: first come, first served")
    g.add_argument("--max-step-delay", dest="max_step_delay_s", metavar="SECONDS", type=float, default=10.0,
                   help="step at most this long after an accumulation began, with fewer than --grad-accum pairs "
                        "if need be (at that share of the learning rate); 0: full accumulations only")


def add_threads_flag(group) -> None:
    group.add_argument("--threads", type=int, default=None,
                       help="CPU threads for the model's math (default on CPU: the cores this process may use, "
                            "less one for the HTTP front end and the scheduler)")


def default_threads() -> int:
    """The cores this process may use, less one (at least one): the front end's event loop and
    the scheduler run beside the worker's math, and math threads that share a core with them
    wait on each other at every barrier. Measured here (2 cores, the tiny demo model serving 8
    chat requests/s with the load generator on the same machine): a decode step of 2-3 sequences
    took 16 ms at the median with 2 threads, 5 ms with 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores - 1)


def apply_threads(args: argparse.Namespace) -> None:
    """``torch.set_num_threads`` for ``--threads``, or on CPU the default; on CUDA, torch's own."""
    threads = getattr(args, "threads", None)
    if threads is None and getattr(args, "device", "cpu") != "cpu":
        return
    import torch

    threads = threads or default_threads()
    torch.set_num_threads(threads)
    logging.getLogger(__name__).info("%d CPU thread%s for the model", threads, "" if threads == 1 else "s")


def engine_config(args: argparse.Namespace, **overrides: Any) -> EngineConfig:
    """The engine's configuration from every field ``args`` holds (then ``overrides``). Without a
    cost profile, a policy that plans by time (mace) profiles the machine briefly at start."""
    fields = {name: getattr(args, name) for name in EngineConfig.field_names() if hasattr(args, name)}
    fields.update(overrides)
    if "policy" in fields and policy_class(fields["policy"]).plans_by_time and not fields.get("cost_profile"):
        fields.setdefault("profile_on_start", True)
    return EngineConfig.build(args.model, **fields)


def training_config(args: argparse.Namespace, state_dir: str | None) -> TrainingConfig | None:
    """The training configuration from ``args`` (None with ``--no-training``); checkpoints go to
    ``state_dir``."""
    if getattr(args, "no_training", False):
        return None
    return TrainingConfig(state_dir=state_dir, **{name: getattr(args, name) for name in TRAINING_FIELDS
                                                   if hasattr(args, name) and name != "state_dir"})
