"""The engine's configuration: one dataclass per part, each validated once, passed explicitly.

    EngineConfig
      model: ModelConfig          what to load and where: checkpoint, device, dtype, context
      cache: CacheConfig          the KV pool: block size, bytes, prefix sharing, pruning
      scheduler: SchedulerConfig  what each iteration carries: the policy, token and sequence
                                  caps, SLOs, the cost profile
        mace: MaceConfig          the mace planner's weights and guards
    TrainingConfig                LoRA, DPO and the optimizer, checkpoints (None: no training)

Every field has one name, unique across the groups, which is also the ``dest`` of its command-line
flag (``server/flags.py``): ``EngineConfig.build(**fields)`` and ``config.replace(**fields)`` take
those flat names and route each to its group, so a caller need not know which group holds it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ModelConfig:
    path: str  # a local Hugging Face checkpoint directory
    device: str = "cpu"
    dtype: str | None = None  # "float32" | "bfloat16" | "float16"; None: fp32 on CPU, bf16 on CUDA
    max_model_len: int | None = None  # None: the model's own context (the builder fills it in)
    seed: int = 0  # seeds the sampling of requests that bring no seed of their own
    # Decode attention on CPU fp32: "auto" uses the C kernel that reads the pool in place (when a
    # C compiler is at hand), "sdpa" always gathers keys and calls torch SDPA.
    decode_attention: str = "auto"
    vocab_size: int | None = None  # filled from the model; prompt ids are checked against it

    def __post_init__(self) -> None:
        if self.decode_attention not in ("auto", "sdpa"):
            raise ValueError(f"decode_attention must be auto or sdpa, got {self.decode_attention}")
        if self.dtype not in (None, "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype}")


@dataclass
class CacheConfig:
    block_size: int = 16
    # The KV pool: an explicit byte budget, or a fraction of the memory free after loading.
    kv_cache_bytes: int | None = None
    kv_cache_fraction: float = 0.3
    # Share full KV blocks of common prefixes between requests (a trie over blocks).
    enable_prefix_caching: bool = True
    # KV pruning (cache.pruning): "none" | "window" | "heavy-hitter"; the budget per sequence in
    # entries (>= 1) or as a fraction of its tokens (< 1); attention sinks always kept.
    kv_prune: str = "none"
    kv_budget: float = 0.5
    kv_sink_tokens: int = 4

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.kv_cache_bytes is not None and self.kv_cache_bytes <= 0:
            raise ValueError(f"kv_cache_bytes must be > 0, got {self.kv_cache_bytes}")
        if not 0.0 < self.kv_cache_fraction <= 0.95:
            raise ValueError(f"kv_cache_fraction must be in (0, 0.95], got {self.kv_cache_fraction}")
        if self.kv_prune not in ("none", "window", "heavy-hitter"):
            raise ValueError(f"kv_prune must be none, window or heavy-hitter, got {self.kv_prune!r}")


@dataclass
class MaceConfig:
    """The mace planner's knobs (scheduler/mace.py explains each; the benchmarks use these)."""

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
    # (TPOT is a mean: a request ahead of its pace can absorb one long iteration). 1: every gap
    # between two tokens within one budget, which keeps the token gaps' p99 near inference
    # alone's; fine-tune work cut at decoder layers fits that (more banks slack for longer pieces,
    # at the cost of longer gaps: BENCHMARKS.md).
    slo_bank_max: float = 1.0
    # The starvation guard: a fine-tune piece at least once every this many iterations.
    finetune_min_every: int = 50
    # The guaranteed share: fine-tune work's smallest piece whenever it has had less than this
    # share of the time since the pairs began to wait (pieces beyond the latency bounds, so
    # training goes on under any load, as a duty cycle). 0: none.
    finetune_min_share: float = 0.05
    # Fine-tune work never makes an iteration longer than this many times the p90 of what
    # inference alone has taken per iteration lately, and an idle engine's piece is at most
    # (this - 1) times a typical first token alone (the median prompt's prefill after a median
    # iteration), which an arrival may wait behind; within the SLO's capacity either way, and
    # packed after the prefills. 0: the SLO's capacity only, fine-tune work competing with
    # prefills by priority (the paper's planner).
    finetune_max_slowdown: float = 1.2
    # Memory fine-tune work may hold at once (activations for the backward), times tau_mem; the
    # profile measures bytes per token. None: no cap (on CPU activations live in host memory,
    # outside the KV pool).
    finetune_memory_bytes: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.tau_mem <= 1.0:
            raise ValueError(f"tau_mem must be in (0, 1], got {self.tau_mem}")
        if self.pack_top_k < 1:
            raise ValueError(f"pack_top_k must be >= 1, got {self.pack_top_k}")
        if not 0.0 <= self.finetune_min_share < 1.0:
            raise ValueError(f"finetune_min_share must be in [0, 1), got {self.finetune_min_share}")
        if self.finetune_max_slowdown != 0 and self.finetune_max_slowdown < 1.0:
            raise ValueError(f"finetune_max_slowdown must be 0 or >= 1, got {self.finetune_max_slowdown}")
        if self.slo_bank_max < 1.0:
            raise ValueError(f"slo_bank_max must be >= 1, got {self.slo_bank_max}")


# The SLOs a server without a measured cost profile defaults to.
DEFAULT_SLO_TTFT_MS, DEFAULT_SLO_TBT_MS = 1000.0, 100.0


@dataclass
class SchedulerConfig:
    # What decides an iteration's fine-tune work (scheduler/policies.py holds the registry):
    # "synchronous" (a chunk of up to finetune_tokens_per_iteration in every iteration while
    # pairs wait, SLO-blind), "mace" (only what the TBT SLO's slack leaves, by the cost model),
    # "periodic" (Ekya-style bursts every retrain_period_s), "inference-only".
    policy: str = "synchronous"
    # Per-iteration token budget (prefill chunks + decodes) and concurrent sequences. None: 64 on
    # CPU, where one token costs about a millisecond of a 63M model and the budget bounds TPOT,
    # 2048 on CUDA (mace: 256 and 8192, as it bounds an iteration by the SLO instead).
    max_num_batched_tokens: int | None = None
    max_num_seqs: int = 64
    # Distinct LoRA adapters among the running requests (the base model not counted), as vLLM's
    # --max-loras: a request on another adapter waits until one of them has no request left.
    max_loras: int = 8
    enable_chunked_prefill: bool = True
    # The default SLOs (a request may set its own): time to first token, and time between tokens
    # (TPOT). None: twice a measured cost profile's prediction (cost_model.suggest_slos), or
    # DEFAULT_SLO_*_MS without a measured profile. slo_margin: the share of the TBT budget the
    # planner keeps in reserve.
    slo_ttft_ms: float | None = None
    slo_tbt_ms: float | None = None
    slo_margin: float = 0.1
    # The SLOs ``with_slos`` filled in (neither given): a policy that plans by time (mace)
    # replaces them with ones learned from the load it measures (scheduler/slos.py).
    learned_slos: tuple[str, ...] = ()
    # Fine-tune tokens (DPO pairs, both responses with their prompts) per iteration when training.
    finetune_tokens_per_iteration: int = 512
    retrain_period_s: float = 60.0  # periodic: seconds from one burst's start to the next's
    cost_profile: str | None = None  # a `mace profile` file; None: a prior corrected online
    profile_on_start: bool = False  # without cost_profile: measure a brief profile at start
    mace: MaceConfig = field(default_factory=MaceConfig)

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_loras < 1:
            raise ValueError(f"max_loras must be >= 1, got {self.max_loras}")
        if not 0.0 <= self.slo_margin < 1.0:
            raise ValueError(f"slo_margin must be in [0, 1), got {self.slo_margin}")
        for name in ("slo_ttft_ms", "slo_tbt_ms"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be > 0, got {value}")

    def with_slos(self, suggested_ms: tuple[float, float] | None = None) -> SchedulerConfig:
        """Both SLOs set: those left None take ``suggested_ms`` (TTFT, TBT) from a measured
        profile, else the defaults."""
        ttft, tbt = suggested_ms or (DEFAULT_SLO_TTFT_MS, DEFAULT_SLO_TBT_MS)
        learned = tuple(name for name in ("ttft", "tbt") if getattr(self, f"slo_{name}_ms") is None)
        return dataclasses.replace(self, slo_ttft_ms=self.slo_ttft_ms if self.slo_ttft_ms is not None else ttft,
                                   slo_tbt_ms=self.slo_tbt_ms if self.slo_tbt_ms is not None else tbt,
                                   learned_slos=self.learned_slos + learned)


@dataclass(frozen=True)
class TrainingConfig:
    """LoRA, DPO and the optimizer of training while serving, and its checkpoints."""

    lora_rank: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    lr: float = 5e-4
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    grad_accum: int = 4  # pairs per optimizer step
    dpo_beta: float = 0.1
    # Weight of an NLL term on the chosen response (mean over its tokens) added to each pair's
    # DPO loss: trl's ``rpo_alpha`` (RPO, Pang et al., arXiv 2404.19733). DPO alone can lower the
    # likelihood of chosen and rejected together and drift to degenerate text; the NLL keeps the
    # chosen answers likely. 0 is plain DPO.
    rpo_alpha: float = 0.0
    # Adapter checkpoints go to STATE_DIR/adapters (and training resumes from the latest there)
    # every checkpoint_every published steps, and at shutdown; None: no checkpoints.
    state_dir: str | None = None
    checkpoint_every: int = 10
    # The last keep_versions published versions of the adapter stay loadable (a request may pin
    # one, `<served>@<version>`, and a rollback may return to one): kept in memory, and on disk
    # as checkpoints (the newest max(3, keep_versions) checkpoints stay).
    keep_versions: int = 4
    # Cut a pair's sequence at decoder layers when the room is smaller than the sequence
    # (trainer/staged.py); off, the smallest piece is one sequence's whole forward and backward.
    layer_cuts: bool = True
    # Pairs trained highest estimated DPO loss first (the paper's P_ft = P + gamma * L_DPO, per
    # pair): once the adapter has stepped, a pair's reference pass also runs it under the serving
    # adapter, and references run ahead until this many pairs are ready to choose from. 0: first
    # come, first served, one pair at a time.
    rank_window: int = 8
    # A step is taken at most this many seconds after its accumulation's first gradient chunk,
    # with fewer than grad_accum pairs if need be (at that share of the learning rate): under a
    # load that leaves training a small share, feedback still reaches the serving adapter within
    # about this long. 0: only full accumulations (and a queue run dry) step.
    max_step_delay_s: float = 10.0

    def __post_init__(self) -> None:
        if self.max_step_delay_s < 0:
            raise ValueError(f"max_step_delay_s must be >= 0, got {self.max_step_delay_s}")
        if self.rank_window < 0:
            raise ValueError(f"rank_window must be >= 0, got {self.rank_window}")
        if self.grad_accum < 1:
            raise ValueError(f"grad_accum must be >= 1, got {self.grad_accum}")
        if self.checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {self.checkpoint_every}")
        if self.keep_versions < 1:
            raise ValueError(f"keep_versions must be >= 1, got {self.keep_versions}")


@dataclass
class EngineConfig:
    model: ModelConfig
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

    @classmethod
    def build(cls, model: str, **fields: Any) -> EngineConfig:
        """A config from flat field names (``kv_cache_bytes=..., policy=..., tau_mem=...``)."""
        return cls(ModelConfig(model)).replace(**fields)

    @staticmethod
    def field_names() -> frozenset[str]:
        """The flat names ``build`` and ``replace`` take."""
        return frozenset(_GROUP_OF)

    def replace(self, **fields: Any) -> EngineConfig:
        """A copy with the named fields changed, wherever their group is; each changed group is
        validated again."""
        changes: dict[str, dict[str, Any]] = {}
        for name, value in fields.items():
            if name not in _GROUP_OF:
                raise TypeError(f"EngineConfig has no field {name!r}")
            changes.setdefault(_GROUP_OF[name], {})[name] = value
        mace = dataclasses.replace(self.scheduler.mace, **changes.pop("mace", {}))
        return EngineConfig(
            model=dataclasses.replace(self.model, **changes.get("model", {})),
            cache=dataclasses.replace(self.cache, **changes.get("cache", {})),
            scheduler=dataclasses.replace(self.scheduler, mace=mace, **changes.get("scheduler", {})),
        )


def _names(cls, exclude: tuple[str, ...] = ()) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.name not in exclude]


_GROUPS = (("model", ModelConfig, ()), ("cache", CacheConfig, ()), ("scheduler", SchedulerConfig, ("mace",)),
           ("mace", MaceConfig, ()))
# The group that holds each field; a name in two groups would be ambiguous.
_GROUP_OF = {name: group for group, cls, exclude in _GROUPS for name in _names(cls, exclude)}
assert len(_GROUP_OF) == sum(len(_names(cls, exclude)) for _, cls, exclude in _GROUPS), "a field name is in two groups"
TRAINING_FIELDS = frozenset(_names(TrainingConfig))  # what a TrainingConfig takes
