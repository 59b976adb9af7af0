"""The two LoRA adapters on the served model: their names, how they are made, copied and read.

``serving`` is what inference reads; ``trainable`` is what the optimizer updates (PEFT registers
adapters as submodule names, and "train" would shadow ``nn.Module.train``). Both start equal; a
step's publish copies ``trainable`` into ``serving`` in place. Snapshots of ``serving`` are what
checkpoints write.
"""

from __future__ import annotations

import contextlib

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer

TRAIN, SERVING = "trainable", "serving"


def attach_adapters(model: torch.nn.Module, config, serving: str = SERVING, train: str = TRAIN) -> PeftModel:
    """Wrap ``model`` (in place) with the ``serving`` and ``trainable`` adapters of ``config``'s
    LoRA shape, equal at start; on a ``PeftModel`` already, add another such pair (a tenant's),
    leaving the active adapter as it was."""
    lora = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=list(config.target_modules), bias="none", task_type="CAUSAL_LM")
    if isinstance(model, PeftModel):
        with _model_state_kept(model):
            model.add_adapter(serving, lora)
            model.add_adapter(train, lora)
        copy_adapter(model, train, serving)
        return model
    peft_model = get_peft_model(model, lora, adapter_name=serving)
    peft_model.add_adapter(train, lora)
    copy_adapter(peft_model, train, serving)
    peft_model.set_adapter(serving)
    return peft_model


@torch.no_grad()
def copy_adapter(peft_model: PeftModel, src: str, dst: str) -> None:
    for module in peft_model.modules():
        if isinstance(module, LoraLayer) and src in module.lora_A:
            module.lora_A[dst].weight.copy_(module.lora_A[src].weight)
            module.lora_B[dst].weight.copy_(module.lora_B[src].weight)


def adapter_parameters(peft_model: PeftModel, name: str) -> list[torch.nn.Parameter]:
    return [p for n, p in peft_model.named_parameters() if f".{name}." in n and "lora_" in n]


def adapter_pairs(peft_model: PeftModel, a: str, b: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(adapter a's tensor, adapter b's) for every LoRA weight, matched by name: what
    ``copy_adapter`` copies, found once instead of walking the modules at every step."""
    params = dict(peft_model.named_parameters())
    return [(p, params[n.replace(f".{a}.", f".{b}.")]) for n, p in params.items() if f".{a}." in n and "lora_" in n]


def serving_weights(peft_model: PeftModel, name: str = SERVING) -> dict[str, torch.Tensor] | None:
    """The serving adapter's live tensors under the keys PEFT saves them by, to be found once
    and kept: ``get_peft_model_state_dict`` walks the whole model's state (7 ms for the tiny
    demo model here), and a step's publish updates these tensors in place. None when the names
    do not line up with PEFT's (a layout this shortcut does not know: use PEFT's view each time)."""
    keys = get_peft_model_state_dict(peft_model, adapter_name=name).keys()
    params = {n.replace(f".{name}.", "."): p for n, p in peft_model.named_parameters() if f".{name}." in n}
    if set(keys) != params.keys():
        return None
    return {k: params[k] for k in keys}


def adapter_snapshot(peft_model: PeftModel, weights: dict[str, torch.Tensor] | None = None,
                     name: str = SERVING) -> dict[str, torch.Tensor]:
    """A copy of the serving adapter's weights, keyed as PEFT saves them, on the CPU; from
    ``weights`` (``serving_weights``) when given."""
    if weights is None:
        weights = get_peft_model_state_dict(peft_model, adapter_name=name)
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in weights.items()}


@contextlib.contextmanager
def _model_state_kept(peft_model: PeftModel):
    """PEFT's add_adapter and delete_adapter reset the active adapter and requires_grad; the
    fine-tune executor set them once (``trainer.executor``): put them back as they were."""
    layers = [m for m in peft_model.modules() if isinstance(m, LoraLayer)]
    saved = [(layer._active_adapter, layer._disable_adapters) for layer in layers]
    active = (peft_model.active_adapter, peft_model.base_model.active_adapter)
    grads = {n: p.requires_grad for n, p in peft_model.named_parameters()}
    try:
        yield
    finally:
        for layer, (names, disabled) in zip(layers, saved):
            layer._active_adapter, layer._disable_adapters = names, disabled
        peft_model.active_adapter, peft_model.base_model.active_adapter = active
        for n, p in peft_model.named_parameters():
            p.requires_grad_(grads.get(n, False))  # a new adapter's weights never train


def add_adapter(peft_model: PeftModel, name: str, config: LoraConfig, state: dict[str, torch.Tensor]) -> None:
    """Adapter ``name`` on the model with ``state``'s weights (keyed as PEFT saves them). Only on
    the worker thread, between iterations. Raises ValueError (the model unchanged) when the
    adapter would wrap a layer the model's adapters do not (its layers are fixed at start:
    the C step and the packed forward hold them) or its weights do not fit."""
    num_layers = sum(isinstance(m, LoraLayer) for m in peft_model.modules())
    with _model_state_kept(peft_model):
        peft_model.add_adapter(name, config)
        try:
            if sum(isinstance(m, LoraLayer) for m in peft_model.modules()) != num_layers:
                raise ValueError("it targets layers that the served adapter does not")
            prefix = f".{name}."
            expected = {k for k, _ in peft_model.named_parameters() if prefix in k}
            result = set_peft_model_state_dict(peft_model, state, adapter_name=name)
            loaded = expected - {k for k in result.missing_keys if prefix in k}
            if result.unexpected_keys or loaded != expected:
                raise ValueError(f"its weights do not match its config ({len(result.unexpected_keys)} unexpected, "
                                 f"{len(expected - loaded)} missing)")
        except Exception:
            peft_model.delete_adapter(name)
            raise


def delete_adapter(peft_model: PeftModel, name: str) -> None:
    """Drop adapter ``name`` (only on the worker thread, between iterations)."""
    with _model_state_kept(peft_model):
        peft_model.delete_adapter(name)
