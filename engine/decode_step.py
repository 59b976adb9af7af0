"""A whole decode step in one C call (``csrc/decode_step.c``), for fp32 Llama-family models on CPU.

An iteration whose chunks are all one-token decodes (at most ``MAX_ROWS``) runs through
``DecodeStep`` instead of the model's modules: embedding, every layer with its LoRA deltas, the
paged attention over the block pool and the LM head in one call that releases the GIL. The
module path stays for everything else (prefill chunks, fine-tune work with gradients, models or
adapters this does not cover), and the two compute the same function: the C step reads the same
weight tensors, the adapters PEFT has active at the call, and the model's own rotary embedding.

Covered: ``llama``, ``mistral``, ``qwen2`` (Q/K/V bias) and ``qwen3`` (per-head Q/K norms) with a
SiLU MLP, plain LoRA adapters (PEFT ``Linear`` layers, one active adapter, no DoRA or LoRA bias)
on any projection or the LM head. Not covered, so the module path serves: heavy-hitter pruning's
attention scores, more than one active adapter on a layer, any other layer type in the way.
"""

from __future__ import annotations

import ctypes
import logging

import torch

log = logging.getLogger(__name__)

MAX_ROWS = 64  # the linear tiles' range (engine/cpu_kernels.py SMALL_LINEAR_ROWS)
_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
_PROJECTIONS = (("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"), ("self_attn", "o_proj"),
                ("mlp", "gate_proj"), ("mlp", "up_proj"), ("mlp", "down_proj"))
_ptr = ctypes.c_void_p


class _Lin(ctypes.Structure):
    _fields_ = [("W", _ptr), ("b", _ptr), ("A", _ptr), ("B", _ptr), ("scale", ctypes.c_float),
                ("N", ctypes.c_int64), ("K", ctypes.c_int64), ("r", ctypes.c_int64)]


class _Layer(ctypes.Structure):
    _fields_ = [("input_norm", _ptr), ("post_norm", _ptr), ("q_norm", _ptr), ("k_norm", _ptr),
                *((name, _Lin) for name in ("q", "k", "v", "o", "gate", "up", "down")),
                ("k_cache", _ptr), ("v_cache", _ptr)]


class _Model(ctypes.Structure):
    _fields_ = [("num_layers", ctypes.c_int64), ("hidden", ctypes.c_int64), ("num_heads", ctypes.c_int64),
                ("num_kv_heads", ctypes.c_int64), ("head_dim", ctypes.c_int64), ("intermediate", ctypes.c_int64),
                ("eps", ctypes.c_float), ("attn_scale", ctypes.c_float), ("embed", _ptr), ("final_norm", _ptr),
                ("lm_head", _Lin), ("layers", ctypes.POINTER(_Layer))]


MAX_GROUPS = 16  # adapter groups one step serves (csrc/decode_step.c MAX_GROUPS)


def declare(lib: ctypes.CDLL) -> None:
    fn = lib.mace_decode_step_f32
    fn.restype = ctypes.c_int
    fn.argtypes = ([ctypes.POINTER(ctypes.POINTER(_Model)), ctypes.c_int64, _ptr] + [_ptr] * 6
                   + [ctypes.c_int64] * 3 + [_ptr, ctypes.c_int])


def _fp32_cpu(t: torch.Tensor | None) -> bool:
    return t is None or (t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous())


def _address(t: torch.Tensor | None) -> int | None:
    return t.data_ptr() if t is not None else None


class _Projection:
    """One projection: its ``nn.Linear`` and, when PEFT wraps it, the LoRA layer around it."""

    def __init__(self, module: torch.nn.Module) -> None:
        from peft.tuners.lora import Linear as LoraLinear

        if type(module) is torch.nn.Linear:
            self.base, self.lora = module, None
        elif isinstance(module, LoraLinear) and type(module.base_layer) is torch.nn.Linear:
            self.base, self.lora = module.base_layer, module
        else:
            raise _Unsupported(f"{type(module).__name__} layer")
        if not (_fp32_cpu(self.base.weight) and _fp32_cpu(self.base.bias)):
            raise _Unsupported("a weight that is not contiguous fp32 on the CPU")

    def adapter(self, name: str | None = None) -> tuple | None:
        """(A, B, scale) of the LoRA delta that PEFT would apply now (``name`` None), or of
        adapter ``name`` (``engine.lora.BASE``: none), or None for none; raises _Unsupported
        for what the C step does not compute."""
        lora = self.lora
        if lora is None or lora.merged:
            return None
        if name is None:
            if lora.disable_adapters:
                return None
            active = [n for n in lora.active_adapters if n in lora.lora_A]
            if not active:
                return None
            if len(active) > 1:
                raise _Unsupported("more than one active adapter")
            name = active[0]
        elif name not in lora.lora_A:
            return None  # the base model, or an adapter that leaves this projection alone
        a, b = lora.lora_A[name], lora.lora_B[name]
        if name in getattr(lora, "lora_variant", {}) or b.bias is not None or type(a) is not torch.nn.Linear:
            raise _Unsupported(f"a LoRA variant on adapter {name!r}")
        if not (_fp32_cpu(a.weight) and _fp32_cpu(b.weight)):
            raise _Unsupported("LoRA weights that are not contiguous fp32 on the CPU")
        return a.weight, b.weight, float(lora.scaling[name])

    def fill(self, lin: _Lin, adapter: tuple | None) -> None:
        w = self.base.weight
        lin.W, lin.b, lin.N, lin.K = w.data_ptr(), _address(self.base.bias), w.shape[0], w.shape[1]
        if adapter is None:
            lin.A = lin.B = None
            lin.scale, lin.r = 0.0, 0
        else:
            a, b, scale = adapter
            lin.A, lin.B, lin.scale, lin.r = a.data_ptr(), b.data_ptr(), scale, a.shape[0]


class _Unsupported(Exception):
    pass


class DecodeStep:
    """``step(ids, positions, slots, tables, lens) -> logits`` for one-token decodes; built by
    ``DecodeStep.build`` (None where the model is not covered)."""

    def __init__(self, model: torch.nn.Module, lib: ctypes.CDLL, kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                 block_size: int) -> None:
        config = model.config
        if config.model_type not in _MODEL_TYPES:
            raise _Unsupported(f"model type {config.model_type!r}")
        if getattr(config, "hidden_act", "silu") != "silu":
            raise _Unsupported(f"activation {config.hidden_act!r}")
        decoder = model.get_decoder()
        self._lib, self._block_size = lib, block_size
        self._rotary = decoder.rotary_emb
        self._embed = decoder.embed_tokens.weight
        self._head = _Projection(model.get_output_embeddings())
        if type(decoder.embed_tokens) is not torch.nn.Embedding or not _fp32_cpu(self._embed):
            raise _Unsupported("the embedding")
        self._projections: list[list[_Projection]] = []
        self._layers = (_Layer * len(decoder.layers))()
        for i, layer in enumerate(decoder.layers):
            attn = layer.self_attn
            self._projections.append([_Projection(getattr(getattr(layer, part), name)) for part, name in _PROJECTIONS])
            norms = [layer.input_layernorm, layer.post_attention_layernorm]
            q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
            norms += [n for n in (q_norm, k_norm) if n is not None]
            for norm in norms:
                if getattr(norm, "variance_epsilon", None) != config.rms_norm_eps or not _fp32_cpu(norm.weight):
                    raise _Unsupported(f"the norms of layer {i}")
            spec = self._layers[i]
            spec.input_norm, spec.post_norm = norms[0].weight.data_ptr(), norms[1].weight.data_ptr()
            spec.q_norm, spec.k_norm = _address(q_norm.weight if q_norm else None), _address(k_norm.weight if k_norm else None)
            k_cache, v_cache = kv_caches[i]
            spec.k_cache, spec.v_cache = k_cache.data_ptr(), v_cache.data_ptr()
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        scale = decoder.layers[0].self_attn.scaling
        self._model = _Model(
            num_layers=len(decoder.layers), hidden=config.hidden_size, num_heads=config.num_attention_heads,
            num_kv_heads=config.num_key_value_heads, head_dim=head_dim, intermediate=config.intermediate_size,
            eps=config.rms_norm_eps, attn_scale=scale, embed=self._embed.data_ptr(),
            final_norm=decoder.norm.weight.data_ptr(), layers=self._layers,
        )
        self._vocab = self._head.base.weight.shape[0]
        self._keep = (model, kv_caches)  # the pointers above stay valid while these live
        self._lora_layers = [p.lora for layer in self._projections for p in layer if p.lora is not None]
        if self._head.lora is not None:
            self._lora_layers.append(self._head.lora)
        # one filled copy of the model's fields per adapter state seen (serving, the trainable
        # adapter, adapters off): the fine-tune work switches between them every iteration
        self._specs: dict[tuple, tuple | None] = {}
        # and per adapter by name, for steps whose rows read different adapters
        self._named: dict[str, tuple | None] = {}
        key = self._adapter_state()
        self._specs[key] = self._current = self._fill()  # raises _Unsupported for a state not covered
        self._current_key = key

    @classmethod
    def build(cls, model, lib, kv_caches, block_size) -> DecodeStep | None:
        try:
            return cls(model, lib, kv_caches, block_size)
        except _Unsupported as exc:
            log.info("whole-step decode kernel off for this model (%s); the module path serves", exc)
            return None

    def _adapter_state(self) -> tuple:
        """What decides which LoRA deltas PEFT applies now, read straight off the layers (PEFT's
        properties over them cost a millisecond a step for the base demo model)."""
        state = []
        for layer in self._lora_layers:
            active = layer._active_adapter
            state.append((active if isinstance(active, str) else tuple(active), layer._disable_adapters,
                          len(layer.merged_adapters)))
        return tuple(state)

    def _fill(self, name: str | None = None) -> tuple:
        """A copy of the model's fields with the LoRA fields pointing at the adapters PEFT has
        active now, or at adapter ``name`` (raises _Unsupported for a state the C step does not
        compute), and the tensors it points at, held so that they stay valid. Adapter weights
        are updated in place (the optimizer, publishing, checkpoint loads), so the pointers stay
        current; adding or deleting an adapter calls ``forget_adapters``."""
        adapters = [[p.adapter(name) for p in layer] for layer in self._projections]
        head = self._head.adapter(name)
        layers = (_Layer * len(self._layers))()
        ctypes.memmove(layers, self._layers, ctypes.sizeof(layers))
        model = _Model.from_buffer_copy(self._model)
        model.layers = layers
        names = ("q", "k", "v", "o", "gate", "up", "down")
        for spec, projections, layer_adapters in zip(layers, self._projections, adapters):
            for name, projection, adapter in zip(names, projections, layer_adapters):
                projection.fill(getattr(spec, name), adapter)
        self._head.fill(model.lm_head, head)
        pointer = ctypes.pointer(model)  # what the step takes: an array of these, one per group
        return model, layers, (adapters, head), pointer

    def covers(self) -> bool:
        """Whether the C step computes what PEFT's active adapters would now; selects the
        fields for them (built the first time each adapter state is seen)."""
        key = self._adapter_state()
        if key != self._current_key:
            if key not in self._specs:
                if len(self._specs) >= 16:  # states come and go (adapters added, removed): start over
                    self._specs.clear()
                try:
                    self._specs[key] = self._fill()
                except _Unsupported:
                    self._specs[key] = None
            self._current, self._current_key = self._specs[key], key
        return self._current is not None

    def covers_adapters(self, names: list[str]) -> bool:
        """Whether the C step computes these adapters (PEFT names, or ``engine.lora.BASE``),
        one group each; their fields are built the first time each is asked for."""
        if len(names) > MAX_GROUPS:
            return False
        for name in names:
            if name not in self._named:
                try:
                    self._named[name] = self._fill(name)
                except _Unsupported:
                    self._named[name] = None
            if self._named[name] is None:
                return False
        return True

    def forget_adapters(self) -> None:
        """Adapters were added or deleted: build the fields anew when next asked (and let go of
        deleted adapters' tensors)."""
        self._named.clear()
        self._specs.clear()
        self._specs[self._current_key] = self._current = self._fill_or_none()

    def _fill_or_none(self) -> tuple | None:
        try:
            return self._fill()
        except _Unsupported:
            return None

    def __call__(self, ids: list[int], positions: list[int], slots: list[int], tables: torch.Tensor,
                 lens: torch.Tensor, groups: list[str] | None = None, row_group: list[int] | None = None) -> torch.Tensor:
        """Logits (M, vocab) fp32 of M one-token decodes. ``tables`` (M, max_blocks) and
        ``lens`` (M,) int64 as the paged attention's. Without ``groups``, every row reads the
        adapters PEFT has active (call ``covers()`` first in the same iteration); with them,
        row m reads adapter ``groups[row_group[m]]`` (call ``covers_adapters(groups)`` first)."""
        m = len(ids)
        if groups is None:
            specs = (ctypes.POINTER(_Model) * 1)(self._current[3])
            group_t = None
        else:
            specs = (ctypes.POINTER(_Model) * len(groups))(*(self._named[g][3] for g in groups))
            group_t = torch.tensor(row_group, dtype=torch.long)
        pos = torch.tensor([positions], dtype=torch.long)
        cos, sin = self._rotary(self._embed, pos)  # (1, M, D) each, fp32 like the embedding
        cos, sin = cos[0].contiguous(), sin[0].contiguous()
        ids_t = torch.tensor(ids, dtype=torch.long)
        slots_t = torch.tensor(slots, dtype=torch.long)
        tables, lens = tables.contiguous(), lens.contiguous()
        logits = torch.empty(m, self._vocab, dtype=torch.float32)
        failed = self._lib.mace_decode_step_f32(
            specs, len(specs), group_t.data_ptr() if group_t is not None else None, ids_t.data_ptr(), cos.data_ptr(), sin.data_ptr(), slots_t.data_ptr(),
            tables.data_ptr(), lens.data_ptr(), tables.shape[1], self._block_size, m, logits.data_ptr(),
            torch.get_num_threads(),
        )
        if failed == 2:
            raise ValueError(f"{len(specs)} adapter groups in one decode step (at most {MAX_GROUPS})")
        if failed:
            raise MemoryError("the decode step could not allocate its scratch memory")
        return logits
