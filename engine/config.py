"""Engine configuration: one dataclass, validated once, passed explicitly."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EngineConfig:
    model: str
    device: str = "cpu"
    dtype: str | None = None  # "float32" | "bfloat16" | "float16"; None: fp32 on CPU, bf16 on CUDA
    block_size: int = 16
    # The KV pool: an explicit byte budget, or a fraction of the memory free after loading.
    kv_cache_bytes: int | None = None
    kv_cache_fraction: float = 0.3
    # Per-iteration token budget (prefill chunks + decodes) and concurrent sequences. None: 64 on
    # CPU, where one token costs about a millisecond of a 63M model and the budget bounds TPOT
    # (see the README's benchmark), 2048 on CUDA.
    max_num_batched_tokens: int | None = None
    max_num_seqs: int = 64
    enable_chunked_prefill: bool = True
    # Share full KV blocks of common prefixes between requests (a trie over blocks).
    enable_prefix_caching: bool = True
    max_model_len: int | None = None  # None: the model's own context
    seed: int = 0
    # Decode attention on CPU fp32: "auto" uses the C kernel that reads the pool in place (when a
    # C compiler is at hand), "sdpa" always gathers keys and calls torch SDPA.
    decode_attention: str = "auto"
    vocab_size: int | None = None  # filled from the model; prompt ids are checked against it
    # KV pruning (cache.pruning): "none" | "window" | "heavy-hitter"; the budget per sequence in
    # entries (>= 1) or as a fraction of its tokens (< 1); attention sinks always kept.
    kv_prune: str = "none"
    kv_budget: float = 0.5
    kv_sink_tokens: int = 4
    # Fine-tune tokens (DPO pairs, both responses with their prompts) per iteration when training.
    finetune_tokens_per_iteration: int = 512
    # What decides the fine-tune work of an iteration: "synchronous" (a chunk of up to
    # finetune_tokens_per_iteration in every iteration while pairs wait, SLO-blind),
    # "mace" (only what the TBT SLO's slack leaves, by the cost model; at least one pair every
    # finetune_min_every iterations, so training never starves), "inference-only".
    # "periodic" (Ekya-style): no fine-tune work between bursts; every retrain_period_s a burst
    # trains, a full chunk per iteration, until the pairs waiting run out.
    policy: str = "synchronous"
    retrain_period_s: float = 60.0
    # The server's default SLOs (a request may set its own): time to first token, and time
    # between tokens (TPOT). slo_margin: the share of the TBT budget the planner keeps in reserve.
    slo_ttft_ms: float = 1000.0
    slo_tbt_ms: float = 100.0
    slo_margin: float = 0.1
    finetune_min_every: int = 50
    # The mace planner's knobs (scheduler/mace.py explains each; the README's benchmarks use these).
    tau_mem: float = 0.9  # share of free KV blocks one iteration may claim for new prefill
    pack_top_k: int = 4  # best fit among this many highest-priority candidates that fit
    lambda_mem: float = 0.5  # weight of the memory fit in the best-fit score
    lambda_lat: float = 0.5  # weight of the latency fit
    w_prefill: float = 1.0  # base priority of a prefill chunk
    alpha_wait: float = 1.0  # priority per TTFT SLO waited
    delta_ft: float = 0.5  # base priority of fine-tune work
    alpha_ft: float = 0.05  # priority per second fine-tune work has waited
    gamma_loss: float = 1.0  # priority per unit of DPO loss
    # Longest iteration, in TBT budgets, when every running request has banked the slack for it
    # (TPOT is a mean: a request ahead of its pace can absorb one long iteration). 6 lets a
    # one-sequence DPO part of a 64-token exchange (~130 ms on the CPU base model) fit a 50 ms SLO.
    slo_bank_max: float = 6.0
    # Memory fine-tune work may hold at once (activations for the backward), times tau_mem; the
    # profile measures bytes per token. None: no cap (on CPU activations live in host memory,
    # outside the KV pool).
    finetune_memory_bytes: int | None = None
    cost_profile: str | None = None  # a `mace profile` file; None: a prior corrected online

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.kv_cache_bytes is not None and self.kv_cache_bytes <= 0:
            raise ValueError(f"kv_cache_bytes must be > 0, got {self.kv_cache_bytes}")
        if not 0.0 < self.kv_cache_fraction <= 0.95:
            raise ValueError(f"kv_cache_fraction must be in (0, 0.95], got {self.kv_cache_fraction}")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.decode_attention not in ("auto", "sdpa"):
            raise ValueError(f"decode_attention must be auto or sdpa, got {self.decode_attention}")
        if self.kv_prune not in ("none", "window", "heavy-hitter"):
            raise ValueError(f"kv_prune must be none, window or heavy-hitter, got {self.kv_prune!r}")
        if self.policy not in ("synchronous", "mace", "periodic", "inference-only"):
            raise ValueError(f"policy must be synchronous, mace, periodic or inference-only, got {self.policy!r}")
        if not 0.0 < self.tau_mem <= 1.0:
            raise ValueError(f"tau_mem must be in (0, 1], got {self.tau_mem}")
        if self.pack_top_k < 1:
            raise ValueError(f"pack_top_k must be >= 1, got {self.pack_top_k}")
        if self.slo_bank_max < 1.0:
            raise ValueError(f"slo_bank_max must be >= 1, got {self.slo_bank_max}")
        if not 0.0 <= self.slo_margin < 1.0:
            raise ValueError(f"slo_margin must be in [0, 1), got {self.slo_margin}")
        if self.dtype not in (None, "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype}")
