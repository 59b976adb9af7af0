"""One sequence's log-prob gradient cut at decoder layers, run a piece at a time across iterations.

The gradient of ``logp`` (a sequence's summed response log-prob) with respect to the LoRA weights
is the work of 2U + 1 units, U = L x P for a model of L decoder layers each cut in P parts:

    unit 0 .. U-1      forward through layer i's part j, the graph kept
    unit U             the head: final norm, lm_head, logp, and its gradient at the last hidden state
    unit U+1 .. 2U     backward through the parts in reverse, each fed the gradient of the one above

A layer of the common pre-norm shape (``input_layernorm``, ``self_attn``,
``post_attention_layernorm``, ``mlp``: Llama, Mistral, Qwen and the like) is cut in P = 1 + K
parts: its attention block ``m = x + attn(norm1(x))``, then its MLP block
``y = m + mlp(norm2(m))`` over K token ranges (the MLP and its norm act on each token alone, so a
range needs nothing from the others, and its backward gives the gradient at its own tokens of
``m``). K makes an MLP range about as costly as the attention block (3 for Llama's proportions),
so the smallest unit is about a quarter of a layer. The attention block itself is not cut by
tokens: a range of queries reads every earlier token's keys and values, so its backward would
have to carry their gradients between pieces. Whether a model's layers have that shape is checked
once, numerically, against the layer's own forward (``block_cut``); other layers are one part, and
so are the layers of a small model (``MIN_CUT_LAYER_WEIGHTS``), whose whole layers are small
enough already.

A piece runs any range ``[start, end)`` of units. A forward range starts from the hidden state the
previous range left (detached, ``requires_grad``, so a later backward can hand back its gradient),
runs the decoder layers as the model's own forward calls them (the keyword arguments, rotary
embeddings and mask included, are captured from the model's forward once per sequence), and keeps
``(input, output)`` with the graph between them. The head computes ``logp`` from the last output
(detached) and ``torch.autograd.grad`` gives the gradient at that output and at any trainable
weight in the head. A backward unit calls ``torch.autograd.grad`` on a part's output with the
gradient from above, and gets the gradient at its input and at the part's weights. The weight
gradients are summed in the job's own buffer, never in ``.grad``, so the optimizer's accumulation
is untouched until the caller adds them: what the job ends with equals ``grad logp`` of one whole
forward and backward (up to float rounding), whatever the cuts.

Memory: a job holds the graphs of its forward units until their backward runs (about what a
whole forward keeps for its backward). A job dropped part-way (an iteration failed, shutdown) frees
them; nothing else changed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from trl.trainer.utils import selective_log_softmax

from trainer.dpo import response_logprobs


class _Capture(torch.nn.Module):
    """Stands in for a decoder layer during the capture pass: records how the model calls it."""

    def __init__(self, layer: torch.nn.Module, calls: list) -> None:
        super().__init__()
        self.calls = calls
        for name in ("attention_type", "layer_idx"):  # what model forwards read off their layers
            if hasattr(layer, name):
                setattr(self, name, getattr(layer, name))

    def forward(self, hidden_states, *args, **kwargs):
        self.calls.append((hidden_states, args, kwargs))
        return hidden_states


def _num_params(module: torch.nn.Module) -> int:
    """The module's own weights (LoRA's, small, left out: the same count with adapters or without)."""
    return sum(p.numel() for name, p in module.named_parameters() if "lora_" not in name)


MAX_MLP_RANGES = 8
# A layer of fewer weights runs whole by default: a layer's unit of such a model is already about
# a millisecond for a hundred tokens, and its parts would add per-unit overhead (on the tiny demo
# model, a 56-token sequence's gradient took 28 ms in parts against 24 ms in whole layers).
MIN_CUT_LAYER_WEIGHTS = 1_000_000
_BLOCK = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")


def _token_bounds(num_tokens: int, ranges: int) -> list[int]:
    """Where ``ranges`` near-equal token ranges of a sequence start and end."""
    return [num_tokens * k // ranges for k in range(ranges + 1)]


def _attention_block(layer: torch.nn.Module, x: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = layer.self_attn(hidden_states=layer.input_layernorm(x), **kwargs)
    return x + (out[0] if isinstance(out, tuple) else out)


def _mlp_block(layer: torch.nn.Module, m: torch.Tensor) -> torch.Tensor:
    return m + layer.mlp(layer.post_attention_layernorm(m))


def block_cut(causal_lm: torch.nn.Module) -> bool:
    """Whether the decoder layers compute ``y = m + mlp(norm2(m))`` with ``m = x +
    attn(norm1(x))``, as checked on the first layer over a few tokens against its own forward
    (a layer with other parts, e.g. extra norms, fails the check and is run whole)."""
    decoder = causal_lm.get_decoder()
    layer = decoder.layers[0]
    if not all(hasattr(layer, name) for name in _BLOCK):
        return False
    param = next(causal_lm.parameters())
    ids = torch.arange(1, 9, device=param.device).unsqueeze(0) % causal_lm.config.vocab_size
    try:
        hidden, calls = _capture(decoder, ids, None)
        args, kwargs = calls[0]
        if args:
            return False
        with torch.no_grad():
            whole = layer(hidden, **kwargs)
            whole = whole[0] if isinstance(whole, tuple) else whole
            m = _attention_block(layer, hidden, kwargs)
            cut = torch.cat([_mlp_block(layer, m[:, :3]), _mlp_block(layer, m[:, 3:])], dim=1)
    except (TypeError, ValueError, RuntimeError):  # a layer whose parts take other arguments
        return False
    scale = whole.abs().max().clamp_min(1e-6)
    tolerance = 1e-4 if whole.dtype == torch.float32 else 2e-2
    return bool(((whole - cut).abs().max() / scale) <= tolerance)


def _capture(decoder: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, list]:
    """The embeddings, and how the decoder's forward calls each of its layers on them."""
    calls: list = []
    saved = decoder.layers
    decoder.layers = torch.nn.ModuleList(_Capture(layer, calls) for layer in saved)
    try:
        with torch.no_grad():
            decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    finally:
        decoder.layers = saved
    return calls[0][0], [(args, kwargs) for _, args, kwargs in calls]


@dataclass(frozen=True)
class UnitCosts:
    """The relative cost of a sequence's units, from the weights each multiplies. A layer's
    forward and its backward cost about the same (its frozen weights need no gradient of their
    own, only its input and the small LoRA matrices do: measured 16-20 ms each for 128 tokens of
    the base demo model here), per token of the sequence; of a layer cut in parts, the attention
    block ``attention_share`` of it and each of ``mlp_ranges`` MLP token ranges the rest in
    proportion to its tokens; the head's forward and backward cost ``head_ratio`` layers' worth
    per response token (only the positions that predict the response run through it)."""

    num_layers: int
    head_ratio: float
    mlp_ranges: int = 0  # 0: each layer is one part
    attention_share: float = 1.0

    @classmethod
    def of(cls, causal_lm: torch.nn.Module, cut_blocks: bool | None = None) -> UnitCosts:
        """The model's costs, its layers cut in parts when ``block_cut`` holds and ``cut_blocks``
        says so (None: when a layer has at least MIN_CUT_LAYER_WEIGHTS weights)."""
        layers = causal_lm.get_decoder().layers
        layer = sum(_num_params(m) for m in layers) / len(layers)
        head_ratio = 2.0 * _num_params(causal_lm.get_output_embeddings()) / layer
        if cut_blocks is None:
            cut_blocks = layer >= MIN_CUT_LAYER_WEIGHTS
        if not cut_blocks or not block_cut(causal_lm):
            return cls(len(layers), head_ratio)
        first = layers[0]
        share = (_num_params(first.self_attn) + _num_params(first.input_layernorm)) / _num_params(first)
        ranges = min(MAX_MLP_RANGES, max(1, round((1.0 - share) / share)))
        return cls(len(layers), head_ratio, ranges, share)

    @property
    def parts(self) -> int:
        """Units a layer's forward (and its backward) is cut in."""
        return 1 + self.mlp_ranges if self.mlp_ranges else 1

    @property
    def num_units(self) -> int:
        return 2 * self.num_layers * self.parts + 1

    @property
    def num_forward_units(self) -> int:
        """Units of a no-grad pass: the layers' parts, then the head."""
        return self.num_layers * self.parts + 1

    def _layer(self, num_tokens: int) -> list[float]:
        """A layer's parts' costs in layer-tokens, in forward order."""
        if not self.mlp_ranges:
            return [float(num_tokens)]
        bounds = _token_bounds(num_tokens, self.mlp_ranges)
        return [self.attention_share * num_tokens] + [(1.0 - self.attention_share) * (hi - lo)
                                                      for lo, hi in zip(bounds, bounds[1:])]

    def weights(self, prompt_len: int, response_len: int) -> list[float]:
        """Each unit's cost in layer-tokens (a layer's forward over one token is 1)."""
        layer = self._layer(prompt_len + response_len)
        return layer * self.num_layers + [self.head_ratio * response_len] + layer[::-1] * self.num_layers

    def forward_weights(self, num_tokens: int) -> list[float]:
        """A no-grad pass's units over ``num_tokens`` tokens (its head over all of them)."""
        return self._layer(num_tokens) * self.num_layers + [self.head_ratio / 2 * num_tokens]


@dataclass(eq=False)
class SequenceJob:
    """One sequence's gradient in progress (see the module's docstring)."""

    input_ids: torch.Tensor  # (1, T)
    response_mask: torch.Tensor  # (1, T)
    calls: list  # per decoder layer: (args, kwargs) as the model's forward passes them
    next_unit: int = 0
    hidden: torch.Tensor | None = None  # the next forward unit's input (within a cut layer: m)
    kept: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # (input, output) per part run
    outputs: list[torch.Tensor] = field(default_factory=list)  # a cut layer's MLP ranges' outputs so far
    grad: torch.Tensor | None = None  # d logp / d output of the layer whose backward runs next
    grad_ranges: list[torch.Tensor] = field(default_factory=list)  # d logp / d m per MLP range, last first
    logp: float | None = None
    grads: list[torch.Tensor | None] | None = None  # per trainable parameter
    logps: list[float] | None = None  # a no-grad job's result: each row's response log-prob


class LayerStages:
    """Runs ``SequenceJob`` units on a causal LM (under whatever adapter is active): the decoder
    layers of ``model.get_decoder()`` (in parts, see ``UnitCosts``), then its final norm and
    ``get_output_embeddings()``."""

    def __init__(self, causal_lm: torch.nn.Module, params: list[torch.nn.Parameter],
                 costs: UnitCosts | None = None) -> None:
        self.causal_lm = causal_lm
        self.decoder = causal_lm.get_decoder()
        self.layers = self.decoder.layers
        self.norm = self.decoder.norm
        self.lm_head = causal_lm.get_output_embeddings()
        self.params = params
        self.costs = costs if costs is not None else UnitCosts.of(causal_lm)  # how its layers are cut
        self.num_layers = self.costs.num_layers
        self.parts = self.costs.parts
        self.num_units = self.costs.num_units
        self.num_forward_units = self.costs.num_forward_units
        # which trainable parameters each part holds (indices into params): a backward asks
        # autograd for those alone, not for every adapter weight of the model
        index = {id(p): k for k, p in enumerate(params)}
        held = lambda *modules: [index[id(p)] for m in modules for p in m.parameters() if id(p) in index]
        self._held = [[held(layer)] if self.parts == 1 else
                      [held(layer.input_layernorm, layer.self_attn)]
                      + [held(layer.post_attention_layernorm, layer.mlp)] * (self.parts - 1)
                      for layer in self.layers]
        self._head_held = held(self.norm, self.lm_head)

    # -- a job's units --------------------------------------------------------------------------

    def start(self, input_ids: torch.Tensor, response_mask: torch.Tensor) -> SequenceJob:
        """A gradient job for one sequence (input_ids and response_mask of shape (1, T))."""
        hidden, calls = _capture(self.decoder, input_ids, None)
        return SequenceJob(input_ids, response_mask, calls, hidden=hidden)

    def _part(self, job: SequenceJob, i: int, part: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``i``'s ``part`` (0: the attention block, or the whole layer; k: the MLP over
        the k-th token range of ``x``, the attention block's output): (its input, its output)."""
        args, kwargs = job.calls[i]
        if self.parts == 1:
            y = self.layers[i](x, *args, **kwargs)
            return x, y[0] if isinstance(y, tuple) else y  # layers of some versions return a tuple
        if part == 0:
            return x, _attention_block(self.layers[i], x, kwargs)
        lo, hi = _token_bounds(x.shape[1], self.costs.mlp_ranges)[part - 1 : part + 1]
        m = x[:, lo:hi]
        if torch.is_grad_enabled():
            m = m.detach().requires_grad_(True)
        return m, _mlp_block(self.layers[i], m)

    def _step_forward(self, job: SequenceJob, unit: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward unit ``unit``: runs its part on ``job.hidden`` and moves ``job.hidden`` on."""
        i, part = divmod(unit, self.parts)
        x = job.hidden
        if part == 0 and torch.is_grad_enabled():
            x = x.detach().requires_grad_(i > 0)  # the embeddings need no gradient
        x, y = self._part(job, i, part, x)
        if part == 0:
            job.hidden = y
        else:
            job.outputs.append(y)
        if part == self.parts - 1 and part > 0:  # the layer's last MLP range: its output whole
            job.hidden = torch.cat([o.detach() for o in job.outputs], dim=1)
            job.outputs = []
        return x, y

    # -- forward only: log-probs without a gradient (reference passes) --------------------------

    def start_forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      response_mask: torch.Tensor) -> SequenceJob:
        """A no-grad job over right-padded rows (B, T): the layers' units, then the head (unit
        ``num_forward_units - 1``), which leaves each row's summed response log-prob in ``job.logps``."""
        hidden, calls = _capture(self.decoder, input_ids, attention_mask)
        return SequenceJob(input_ids, response_mask, calls, hidden=hidden)

    @torch.no_grad()
    def run_forward(self, job: SequenceJob, end: int) -> None:
        """Run a no-grad job's units from ``job.next_unit`` up to (not including) ``end``."""
        if not job.next_unit < end <= self.num_forward_units:
            raise ValueError(f"units [{job.next_unit}, {end}) of {self.num_forward_units}")
        while job.next_unit < end:
            unit = job.next_unit
            if unit < self.num_forward_units - 1:
                self._step_forward(job, unit)
            else:
                logits = self.lm_head(self.norm(job.hidden))  # (B, T, V)
                job.logps = response_logprobs(logits, job.input_ids, job.response_mask).tolist()
                job.hidden = None
            job.next_unit += 1

    def run(self, job: SequenceJob, end: int) -> None:
        """Run the job's units from ``job.next_unit`` up to (not including) ``end``."""
        if not job.next_unit < end <= self.num_units:
            raise ValueError(f"units [{job.next_unit}, {end}) of {self.num_units}")
        forward = self.num_layers * self.parts
        while job.next_unit < end:
            unit = job.next_unit
            if unit < forward:
                with torch.enable_grad():
                    job.kept.append(self._step_forward(job, unit))
            elif unit == forward:
                self._head(job)
            else:
                self._backward(job, 2 * forward - unit)
            job.next_unit += 1

    def _head(self, job: SequenceJob) -> None:
        y = job.hidden.detach().requires_grad_(True)
        first = int(job.response_mask[0].nonzero()[0])  # the response's first token
        with torch.enable_grad():
            # only the positions that predict response tokens: first - 1 .. T - 2 (the gradient
            # at the others is zero)
            logits = self.lm_head(self.norm(y[:, first - 1 : -1]))  # (1, R, V)
            logp = selective_log_softmax(logits.float(), job.input_ids[:, first:]).sum()
        job.grads = [None] * len(self.params)
        job.logp, job.grad = logp.item(), self._grad(job, logp, y, self._head_held, None)
        job.hidden = None

    def _grad(self, job: SequenceJob, y: torch.Tensor, x: torch.Tensor, held: list[int],
              grad_out: torch.Tensor | None) -> torch.Tensor | None:
        """The gradient at ``x`` (None when it needs none) of ``y`` fed ``grad_out``; the gradients
        at the trainable parameters ``held`` are added to ``job.grads``."""
        inputs = ([x] if x.requires_grad else []) + [self.params[k] for k in held]
        grads = list(torch.autograd.grad(y, inputs, grad_outputs=grad_out, allow_unused=True)) if inputs else []
        grad_in = grads.pop(0) if x.requires_grad else None
        for k, g in zip(held, grads):
            if g is not None:
                job.grads[k] = g if job.grads[k] is None else job.grads[k] + g
        return grad_in

    def _backward(self, job: SequenceJob, index: int) -> None:
        """The backward of forward unit ``index`` (layer ``index // parts``, its part ``index % parts``)."""
        x, y = job.kept.pop()
        if len(job.kept) != index:
            raise RuntimeError(f"backward of unit {index} out of order")
        part = index % self.parts
        if part > 0:  # an MLP range: the gradient at its tokens of m, kept until the attention block's
            lo, hi = _token_bounds(job.grad.shape[1], self.costs.mlp_ranges)[part - 1 : part + 1]
            grad_out = job.grad[:, lo:hi]
        elif self.parts > 1:  # the attention block: fed the MLP ranges' gradients at m
            grad_out, job.grad_ranges = torch.cat(job.grad_ranges[::-1], dim=1), []
        else:
            grad_out = job.grad
        grad_in = self._grad(job, y, x, self._held[index // self.parts][part], grad_out)
        if part > 0:
            job.grad_ranges.append(grad_in)
        else:
            job.grad = grad_in
