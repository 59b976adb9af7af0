"""One sequence's log-prob gradient cut at decoder layers, run a piece at a time across iterations.

The gradient of ``logp`` (a sequence's summed response log-prob) with respect to the LoRA weights
is the work of 2L + 1 units for a model of L decoder layers:

    unit 0 .. L-1      forward through layer i, the graph kept
    unit L             the head: final norm, lm_head, logp, and its gradient at the last hidden state
    unit L+1 .. 2L     backward through layer L-1 down to 0, each fed the gradient of the one above

A piece runs any range ``[start, end)`` of units. A forward range starts from the hidden state the
previous range left (detached, ``requires_grad``, so a later backward can hand back its gradient),
runs the decoder layers as the model's own forward calls them (the keyword arguments, rotary
embeddings and mask included, are captured from the model's forward once per sequence), and keeps
``(input, output)`` with the graph between them. The head computes ``logp`` from the last output
(detached) and ``torch.autograd.grad`` gives the gradient at that output and at any trainable
weight in the head. A backward unit calls ``torch.autograd.grad`` on a layer's output with the
gradient from above, and gets the gradient at its input and at the layer's weights. The weight
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


class _StopForward(Exception):
    pass


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
    return sum(p.numel() for p in module.parameters())


@dataclass(frozen=True)
class UnitCosts:
    """The relative cost of a sequence's units, from the weights each multiplies. A layer's
    forward and its backward cost about the same (its frozen weights need no gradient of their
    own, only its input and the small LoRA matrices do: measured 16-20 ms each for 128 tokens of
    the base demo model here), per token of the sequence; the head's forward and backward cost
    ``head_ratio`` layers' worth per response token (only the positions that predict the
    response run through it)."""

    num_layers: int
    head_ratio: float

    @classmethod
    def of(cls, causal_lm: torch.nn.Module) -> UnitCosts:
        layers = causal_lm.get_decoder().layers
        layer = sum(_num_params(m) for m in layers) / len(layers)
        return cls(len(layers), 2.0 * _num_params(causal_lm.get_output_embeddings()) / layer)

    @property
    def num_units(self) -> int:
        return 2 * self.num_layers + 1

    def weights(self, prompt_len: int, response_len: int) -> list[float]:
        """Each unit's cost in layer-tokens (a layer's forward over one token is 1)."""
        tokens = prompt_len + response_len
        return [float(tokens)] * self.num_layers + [self.head_ratio * response_len] + [float(tokens)] * self.num_layers

    def forward_weights(self, num_tokens: int) -> list[float]:
        """A no-grad pass's L + 1 units over ``num_tokens`` tokens (its head over all of them)."""
        return [float(num_tokens)] * self.num_layers + [self.head_ratio / 2 * num_tokens]


@dataclass(eq=False)
class SequenceJob:
    """One sequence's gradient in progress (see the module's docstring)."""

    input_ids: torch.Tensor  # (1, T)
    response_mask: torch.Tensor  # (1, T)
    calls: list  # per decoder layer: (args, kwargs) as the model's forward passes them
    next_unit: int = 0
    hidden: torch.Tensor | None = None  # the next forward unit's input
    kept: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # (input, output) per layer run
    grad: torch.Tensor | None = None  # d logp / d output of the layer whose backward runs next
    logp: float | None = None
    grads: list[torch.Tensor | None] | None = None  # per trainable parameter
    logps: list[float] | None = None  # a no-grad job's result: each row's response log-prob


class LayerStages:
    """Runs ``SequenceJob`` units on a causal LM (under whatever adapter is active): the decoder
    layers of ``model.get_decoder()``, then its final norm and ``get_output_embeddings()``."""

    def __init__(self, causal_lm: torch.nn.Module, params: list[torch.nn.Parameter]) -> None:
        self.causal_lm = causal_lm
        self.decoder = causal_lm.get_decoder()
        self.layers = self.decoder.layers
        self.norm = self.decoder.norm
        self.lm_head = causal_lm.get_output_embeddings()
        self.params = params
        self.costs = UnitCosts.of(causal_lm)
        self.num_layers = self.costs.num_layers
        self.num_units = self.costs.num_units

    # -- a job's units --------------------------------------------------------------------------

    def _capture(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, list]:
        """The embeddings, and how the model's forward calls each decoder layer on them."""
        calls: list = []
        saved = self.decoder.layers
        self.decoder.layers = torch.nn.ModuleList(_Capture(layer, calls) for layer in saved)
        try:
            with torch.no_grad():
                self.decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        finally:
            self.decoder.layers = saved
        return calls[0][0], [(args, kwargs) for _, args, kwargs in calls]

    def start(self, input_ids: torch.Tensor, response_mask: torch.Tensor) -> SequenceJob:
        """A gradient job for one sequence (input_ids and response_mask of shape (1, T))."""
        hidden, calls = self._capture(input_ids, None)
        return SequenceJob(input_ids, response_mask, calls, hidden=hidden)

    # -- forward only: log-probs without a gradient (reference passes) --------------------------

    def start_forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      response_mask: torch.Tensor) -> SequenceJob:
        """A no-grad job over right-padded rows (B, T): L layer units, then the head (unit L),
        which leaves each row's summed response log-prob in ``job.logps``."""
        hidden, calls = self._capture(input_ids, attention_mask)
        return SequenceJob(input_ids, response_mask, calls, hidden=hidden)

    @torch.no_grad()
    def run_forward(self, job: SequenceJob, end: int) -> None:
        """Run a no-grad job's units from ``job.next_unit`` up to (not including) ``end``."""
        if not job.next_unit < end <= self.num_layers + 1:
            raise ValueError(f"units [{job.next_unit}, {end}) of {self.num_layers + 1}")
        while job.next_unit < end:
            i = job.next_unit
            if i < self.num_layers:
                args, kwargs = job.calls[i]
                y = self.layers[i](job.hidden, *args, **kwargs)
                job.hidden = y[0] if isinstance(y, tuple) else y
            else:
                logits = self.lm_head(self.norm(job.hidden))  # (B, T, V)
                job.logps = response_logprobs(logits, job.input_ids, job.response_mask).tolist()
                job.hidden = None
            job.next_unit += 1

    def run(self, job: SequenceJob, end: int) -> None:
        """Run the job's units from ``job.next_unit`` up to (not including) ``end``."""
        if not job.next_unit < end <= self.num_units:
            raise ValueError(f"units [{job.next_unit}, {end}) of {self.num_units}")
        while job.next_unit < end:
            unit = job.next_unit
            if unit < self.num_layers:
                self._forward(job, unit)
            elif unit == self.num_layers:
                self._head(job)
            else:
                self._backward(job, 2 * self.num_layers - unit)
            job.next_unit += 1

    def _forward(self, job: SequenceJob, i: int) -> None:
        x = job.hidden.detach().requires_grad_(i > 0)  # the embeddings need no gradient
        args, kwargs = job.calls[i]
        with torch.enable_grad():
            y = self.layers[i](x, *args, **kwargs)
        if isinstance(y, tuple):  # layers of some versions return (hidden_states, ...)
            y = y[0]
        job.kept.append((x, y))
        job.hidden = y

    def _head(self, job: SequenceJob) -> None:
        y = job.hidden.detach().requires_grad_(True)
        first = int(job.response_mask[0].nonzero()[0])  # the response's first token
        with torch.enable_grad():
            # only the positions that predict response tokens: first - 1 .. T - 2 (the gradient
            # at the others is zero)
            logits = self.lm_head(self.norm(y[:, first - 1 : -1]))  # (1, R, V)
            logp = selective_log_softmax(logits.float(), job.input_ids[:, first:]).sum()
        grads = torch.autograd.grad(logp, [y, *self.params], allow_unused=True)
        job.logp, job.grad = logp.item(), grads[0]
        job.grads = list(grads[1:])
        job.hidden = None

    def _backward(self, job: SequenceJob, i: int) -> None:
        x, y = job.kept.pop()
        if len(job.kept) != i:
            raise RuntimeError(f"backward of layer {i} out of order")
        inputs = [x, *self.params] if x.requires_grad else list(self.params)
        grads = torch.autograd.grad(y, inputs, grad_outputs=job.grad, allow_unused=True)
        if x.requires_grad:
            job.grad, grads = grads[0], grads[1:]
        else:
            job.grad = None
        job.grads = [a if b is None else b if a is None else a + b for a, b in zip(job.grads, grads)]
