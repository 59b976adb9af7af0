"""Many LoRA adapters in one packed forward: each token reads its own request's adapter.

A request chooses its adapter (the live aligned one by default, the base model, a pinned
version, one loaded at run time); the iteration still runs one forward over every request's
tokens. Each PEFT LoRA ``Linear`` layer computes its base projection once for all rows, then
adds each segment's delta, ``scale * (x[s:e] A^T) B^T``, to that segment's rows: the segmented
form of Punica's and S-LoRA's batched LoRA kernels (SGMV), in torch. The runner orders the
packed rows by adapter, so an adapter's tokens are one or two contiguous segments (its decodes
and its prefill chunks) and a segment is a view, not a gather. Rows of the base model get no
delta at all.

Only the inference forward reads segments; a fine-tune chunk's forward and backward (grad on)
and the reference passes run PEFT's own forward with the adapter the executor made active. The
C decode step (``engine/decode_step.py``) computes the same thing for one-token decodes, one
group of rows per adapter.

An iteration whose rows all read the default adapter sets no segments: PEFT's forward runs
unchanged, so the machinery costs nothing when only the live adapter is in use.
"""

from __future__ import annotations

import contextlib

import torch

# The adapter name of "no adapter": the base model. Not a valid PEFT adapter name (those are
# module names), so it can never collide with one.
BASE = ":base"

Segments = list[tuple[str, int, int]]  # (PEFT adapter name or BASE, first row, end row)


def segments_of(names: list[str]) -> Segments:
    """Runs of equal names, as (name, start, end), over a row-by-row list of adapter names."""
    segments: Segments = []
    for i, name in enumerate(names):
        if segments and segments[-1][0] == name and segments[-1][2] == i:
            segments[-1] = (name, segments[-1][1], i + 1)
        else:
            segments.append((name, i, i + 1))
    return segments


class MultiLora:
    """Installed over a PEFT model's LoRA ``Linear`` layers; ``segments(...)`` scopes one
    forward whose rows read different adapters. Layers PEFT adds later (an adapter loaded at
    run time may only target layers already wrapped; see ``server.adapters``) need no install."""

    def __init__(self, model: torch.nn.Module) -> None:
        from peft.tuners.lora import Linear as LoraLinear

        self._segments: Segments | None = None
        self.layers = [m for m in model.modules() if isinstance(m, LoraLinear)]
        for layer in self.layers:
            layer.forward = self._forward_of(layer, layer.forward)

    @classmethod
    def install(cls, model: torch.nn.Module) -> MultiLora | None:
        """Over ``model``'s LoRA layers; None when it has none."""
        lora = cls(model)
        return lora if lora.layers else None

    def default_adapter(self) -> str:
        """The adapter PEFT has active (what a request on the default adapter reads)."""
        return self.layers[0].active_adapters[0]

    @contextlib.contextmanager
    def segments(self, segments: Segments | None):
        """Row segments for the layers' forward inside this block (None: PEFT's own)."""
        previous, self._segments = self._segments, segments
        try:
            yield
        finally:
            self._segments = previous

    def _forward_of(self, layer, peft_forward):
        def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            segments = self._segments
            if segments is None:
                return peft_forward(x, *args, **kwargs)
            out = layer.base_layer(x, *args, **kwargs)
            rows_in, rows_out = x.reshape(-1, x.shape[-1]), out.view(-1, out.shape[-1])
            for name, start, end in segments:
                if name not in layer.lora_A:
                    continue  # the base model, or an adapter that leaves this layer alone
                a, b, scale = layer.lora_A[name], layer.lora_B[name], layer.scaling[name]
                xs = rows_in[start:end].to(a.weight.dtype)
                delta = torch.mm(torch.mm(xs, a.weight.t()), b.weight.t())
                rows_out[start:end].add_(delta.to(out.dtype), alpha=scale)
            return out

        return forward
