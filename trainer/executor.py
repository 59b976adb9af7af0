"""Fine-tune chunks on the worker thread: LoRA adapters, reference log-probs, DPO gradients,
AdamW steps and the publish of new weights to the serving adapter.

Two PEFT LoRA adapters sit on the served model: ``trainable`` (what the optimizer updates) and
``serving`` (what inference reads). Inference always runs with ``serving`` active; a gradient
chunk switches to ``trainable`` for its forward and backward and back before the next iteration.
A step that completes copies ``trainable`` into ``serving`` in place, between two iterations, so
serving never pauses and never sees a half-updated adapter; ``version`` counts these publishes.
If a loss or a gradient is not finite the step is skipped, the gradients dropped and
``trainable`` restored from ``serving`` (the last good weights).

Only the worker thread calls ``run`` (the runner does, after its inference forward).
"""

from __future__ import annotations

import contextlib
import time
from collections import OrderedDict

import torch
from peft import PeftModel, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer

from engine.config import TrainingConfig
from engine.plan import FinetuneChunk, FinetuneResult, PreferencePair
from trainer.adapters import SERVING, TRAIN, adapter_pairs, adapter_parameters, adapter_snapshot, serving_weights
from trl.trainer.utils import selective_log_softmax

from trainer.dpo import dpo_loss, response_logprobs
from trainer.optim import make_adamw
from trainer.staged import LayerStages, SequenceJob, UnitCosts

def _has_dropout(model: torch.nn.Module) -> bool:
    """Whether train mode changes what ``model`` computes: any dropout with p > 0 (LoRA's
    included), or an attention dropout in the config (applied inside the attention function)."""
    config = getattr(model, "config", None)
    if getattr(config, "attention_dropout", 0.0):
        return True
    return any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules())


class FinetuneExecutor:
    def __init__(self, peft_model: PeftModel, config: TrainingConfig, pad_id: int, version: int = 0,
                 checkpoints=None, checkpoint_every: int = 10, unit_costs: UnitCosts | None = None,
                 max_version: int | None = None, serving: str = SERVING, train: str = TRAIN,
                 default: str = SERVING) -> None:
        """``serving`` and ``train`` name this executor's adapters (a tenant's pair, or the
        default one); ``default`` is the adapter inference reads when a request names none,
        active again after every chunk."""
        self.model = peft_model
        self.serving_name, self.train_name, self.default_name = serving, train, default
        self.config = config
        self.pad_id = pad_id
        self.version = version
        # The highest version number ever published (a rollback returns to a lower one): the
        # next publish takes the number after it, so a number never names two weights.
        self.max_version = max(version, max_version or 0)
        # A snapshot of the serving adapter goes to ``checkpoints`` (a CheckpointWriter, which
        # writes off the worker) every ``checkpoint_every`` published steps; None: no checkpoints.
        self.checkpoints = checkpoints
        self.checkpoint_every = checkpoint_every
        self._serving_weights = serving_weights(peft_model, serving)
        # The last config.keep_versions published versions' weights (CPU copies), for pinned
        # requests and rollbacks; ``kept_versions`` lists them for other threads to read.
        self._kept: OrderedDict[int, dict[str, torch.Tensor]] = OrderedDict()
        self.kept_versions: tuple[int, ...] = ()
        self._keep(self.version)
        self.params = adapter_parameters(peft_model, train)
        self.optimizer = make_adamw(self.params, config)
        self._publish = adapter_pairs(peft_model, serving, train)  # (serving, trainable) per weight
        # Fixed costs of every fine-tune chunk, kept small (they are most of a small chunk's time
        # on a small model, whose layer units run in a millisecond or two): the adapter switch
        # and the adapters-off toggle set the LoRA layers' active adapter and disabled flag
        # directly, not through PEFT's set_adapter / disable_adapter, which also walk every
        # adapter weight to reset requires_grad (1 ms a switch for the tiny demo model here,
        # half of a one-unit chunk); so requires_grad is set once: the trainable adapter's
        # weights on, the serving adapter's off. Train mode, which only dropout reads, is set only
        # for a model that has dropout (2.8 ms there and back).
        self._lora_layers = [m for m in peft_model.modules() if isinstance(m, BaseTunerLayer)]
        for p in adapter_parameters(peft_model, serving):
            p.requires_grad_(False)
        for p in self.params:
            p.requires_grad_(True)
        self._needs_train_mode = _has_dropout(peft_model)
        peft_model.eval()  # inference's mode, between gradient chunks
        self._device = self.params[0].device
        self._bad_accumulation = False
        self._num_accumulated = 0  # pairs whose gradients the next step takes
        # A pair cut in two: (pair id, logp_c, grad logp_c per parameter) until its rejected part.
        self._chosen_part: tuple[str, float, list[torch.Tensor | None]] | None = None
        # A part cut at decoder layers, part-way: ((pair id, part), its job) until its last unit.
        # cut as the trainer prices it (``unit_costs``, else the model's default)
        self.stages = LayerStages(peft_model.base_model.model, self.params, unit_costs)
        self._job: tuple[tuple[str, str], SequenceJob] | None = None
        # a reference pass cut at layers: (pair id, which pass, its job), and the first pass's result
        self._ref_job: tuple[str, int, SequenceJob] | None = None
        self._ref_logps: tuple[float, float] | None = None
        # Replicas (trainer/distributed.py): a step hands the accumulated gradients over in the
        # result instead of stepping here; the coordinator steps, and its weights come back
        # through ``adopt``. The gradients are keyed as a checkpoint keys the weights.
        self.hands_over_gradients = False
        # the coordinator's change number of the serving and of the trainable weights, and of the
        # oldest trainable weights the accumulation in progress saw (None: nothing accumulated)
        self._serving_generation = self._trainable_generation = 0
        self._accumulated_generation: int | None = None
        self._grad_keys = [n.replace(f".{train}.", ".") for n, p in peft_model.named_parameters()
                           if f".{train}." in n and "lora_" in n]

    def run(self, chunk: FinetuneChunk) -> FinetuneResult:
        t0 = time.perf_counter()
        if chunk.reset:
            self.optimizer.zero_grad(set_to_none=True)
            self._bad_accumulation = False
            self._num_accumulated = 0
            self._chosen_part = None
            self._job = None
            self._accumulated_generation = None
        self._sync_trainable()  # weights adopted while a layer pass was part-way
        if chunk.kind == "reference":
            result = self._reference(chunk)
        elif chunk.kind == "gradient":
            result = self._gradient(chunk)
        else:
            raise ValueError(f"unknown fine-tune chunk kind {chunk.kind!r}")
        result.num_tokens = chunk.num_tokens
        result.adapter_version = self.version
        result.elapsed_s = time.perf_counter() - t0
        return result

    # -- the two kinds ----------------------------------------------------------------------------

    def _batch(self, pairs: list[PreferencePair]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rows: every pair's chosen, then every pair's rejected, right-padded.
        Returns input ids (2P, T), attention mask (2P, T), response mask (2P, T)."""
        rows = [(p.prompt_ids, p.chosen_ids) for p in pairs] + [(p.prompt_ids, p.rejected_ids) for p in pairs]
        width = max(len(a) + len(b) for a, b in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attn = torch.zeros(len(rows), width, dtype=torch.long)
        resp = torch.zeros(len(rows), width)
        for i, (prompt, response) in enumerate(rows):
            n = len(prompt) + len(response)
            ids[i, :n] = torch.tensor(prompt + response)
            attn[i, :n] = 1
            resp[i, len(prompt) : n] = 1.0
        return ids.to(self._device), attn.to(self._device), resp.to(self._device)

    def _logprobs(self, pairs: list[PreferencePair]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, attn, resp = self._batch(pairs)
        logits = self.model(input_ids=ids, attention_mask=attn, use_cache=False).logits  # (2P, T, V)
        lp = response_logprobs(logits, ids, resp)  # (2P,)
        return lp[: len(pairs)], lp[len(pairs) :]

    @torch.no_grad()
    def _reference(self, chunk: FinetuneChunk) -> FinetuneResult:
        if chunk.units is not None:
            return self._reference_units(chunk)
        with self._adapters_off():
            chosen, rejected = self._logprobs(chunk.pairs)
        result = FinetuneResult(chunk.task_id, "reference",
                                ref_logprobs={p.pair_id: (c, r) for p, c, r in zip(chunk.pairs, chosen.tolist(), rejected.tolist())})
        if chunk.estimate:  # under this executor's serving adapter
            with self._serving_active():
                chosen, rejected = self._logprobs(chunk.pairs)
            result.policy_logprobs = {p.pair_id: (c, r) for p, c, r in zip(chunk.pairs, chosen.tolist(), rejected.tolist())}
        return result

    def _reference_units(self, chunk: FinetuneChunk) -> FinetuneResult:
        """Units [start, end) of one pair's reference pass (both sequences as one batch), cut at
        decoder layers (and layer parts): its units with the adapter off, then (``estimate``) as
        many more under the serving adapter; the log-probs once the last has run."""
        (p,) = chunk.pairs
        start, end = chunk.units
        per_pass = self.stages.num_forward_units
        result = FinetuneResult(chunk.task_id, "reference")
        unit = start
        while unit < end:
            which, local = divmod(unit, per_pass)
            stop = min(end, (which + 1) * per_pass)
            with self._adapters_off() if which == 0 else self._serving_active():
                if local == 0:
                    self._ref_job = (p.pair_id, which, self.stages.start_forward(*self._batch([p])))
                if self._ref_job is None or self._ref_job[:2] != (p.pair_id, which) or self._ref_job[2].next_unit != local:
                    raise RuntimeError(f"reference units [{start}, {end}) of pair {p.pair_id} came out of order")
                job = self._ref_job[2]
                self.stages.run_forward(job, stop - which * per_pass)
            if job.logps is not None:
                logps = (job.logps[0], job.logps[1])
                if which == 0:
                    self._ref_logps = logps
                else:
                    result.policy_logprobs = {p.pair_id: logps}
            unit = stop
        if end == per_pass * (2 if chunk.estimate else 1):
            self._ref_job = None
            result.ref_logprobs = {p.pair_id: self._ref_logps}
        return result

    def _sequence_logprob(self, prompt: list[int], response: list[int]) -> torch.Tensor:
        ids = torch.tensor([prompt + response], device=self._device)
        # the head runs only over the positions that predict the response (and the last one)
        logits = self.model(input_ids=ids, use_cache=False, logits_to_keep=len(response) + 1).logits  # (1, R + 1, V)
        return selective_log_softmax(logits[:, :-1].float(), ids[:, len(prompt) :]).sum()

    def _sequence_gradient(self, prompt: list[int], response: list[int]) -> tuple[float, list[torch.Tensor | None]]:
        """``logp`` of one sequence and its gradient, kept apart from the accumulation."""
        accumulated = [p.grad for p in self.params]
        for p in self.params:
            p.grad = None
        try:
            logp = self._sequence_logprob(prompt, response)
            logp.backward()
            grads = [p.grad for p in self.params]
        finally:  # the accumulation is back in place, whatever happened
            for p, g in zip(self.params, accumulated):
                p.grad = g
        return logp.item(), grads

    def _part_gradient(self, chunk: FinetuneChunk) -> tuple[float, list[torch.Tensor | None]] | None:
        """``(logp, grad logp)`` of the part's sequence once its last unit has run; None while
        units remain (they run in later chunks)."""
        (p,) = chunk.pairs
        response = p.chosen_ids if chunk.part == "chosen" else p.rejected_ids
        start, end = chunk.units or (0, self.stages.num_units)
        if start == 0 and end == self.stages.num_units:  # the whole part: one forward and backward
            self._job = None
            return self._sequence_gradient(p.prompt_ids, response)
        key = (p.pair_id, chunk.part)
        if start == 0:
            ids = torch.tensor([p.prompt_ids + response], device=self._device)
            mask = torch.zeros(ids.shape, device=self._device)
            mask[0, len(p.prompt_ids) :] = 1.0
            self._job = (key, self.stages.start(ids, mask))
        if self._job is None or self._job[0] != key or self._job[1].next_unit != start:
            raise RuntimeError(f"units [{start}, {end}) of pair {p.pair_id}'s {chunk.part} part came out of order")
        job = self._job[1]
        self.stages.run(job, end)
        if end < self.stages.num_units:
            return None
        self._job = None
        return job.logp, job.grads

    def _part(self, chunk: FinetuneChunk, result: FinetuneResult) -> None:
        """One sequence of a pair cut in two (see FinetuneChunk), or some of its layer units;
        under the train adapter."""
        (p,) = chunk.pairs
        if chunk.part not in ("chosen", "rejected"):
            raise ValueError(f"unknown fine-tune chunk part {chunk.part!r}")
        if chunk.part == "rejected" and (self._chosen_part is None or self._chosen_part[0] != p.pair_id):
            raise RuntimeError(f"the rejected part of pair {p.pair_id} came without its chosen part")
        gradient = self._part_gradient(chunk)
        if gradient is None:
            return
        if chunk.part == "chosen":
            self._chosen_part = (p.pair_id, *gradient)
            return
        _, logp_c, grads_c = self._chosen_part
        self._chosen_part = None
        logp_r, grads_r = gradient
        beta, scale = self.config.dpo_beta, 1.0 / self.config.grad_accum
        loss, margin = dpo_loss(*(torch.tensor([v], dtype=torch.float64) for v in (logp_c, logp_r, p.ref_chosen, p.ref_rejected)), beta)
        result.losses = {p.pair_id: loss.item()}
        if not torch.isfinite(loss).all():
            self._bad_accumulation = True
            return
        self._num_accumulated += 1
        w = scale * beta * torch.sigmoid(-margin[0]).item()
        w_c = w + scale * self.config.rpo_alpha / len(p.chosen_ids)  # the NLL term pulls on logp_c too
        for param, g_c, g_r in zip(self.params, grads_c, grads_r):
            if g_c is None and g_r is None:
                continue
            delta = w * (g_r if g_r is not None else 0) - w_c * (g_c if g_c is not None else 0)
            param.grad = delta if param.grad is None else param.grad + delta

    def _whole(self, chunk: FinetuneChunk, result: FinetuneResult) -> None:
        chosen, rejected = self._logprobs(chunk.pairs)
        ref_c = torch.tensor([p.ref_chosen for p in chunk.pairs], device=self._device)
        ref_r = torch.tensor([p.ref_rejected for p in chunk.pairs], device=self._device)
        losses, _ = dpo_loss(chosen, rejected, ref_c, ref_r, self.config.dpo_beta)
        result.losses = {p.pair_id: v for p, v in zip(chunk.pairs, losses.tolist())}
        if self.config.rpo_alpha:
            num_chosen = torch.tensor([len(p.chosen_ids) for p in chunk.pairs], device=self._device)
            losses = losses - self.config.rpo_alpha * chosen / num_chosen
        if torch.isfinite(losses).all():
            (losses.sum() / self.config.grad_accum).backward()
            self._num_accumulated += len(chunk.pairs)
        else:
            self._bad_accumulation = True

    def _gradient(self, chunk: FinetuneChunk) -> FinetuneResult:
        result = FinetuneResult(chunk.task_id, "gradient")
        if self._accumulated_generation is None:
            self._accumulated_generation = self._trainable_generation
        self._use(self.train_name)
        if self._needs_train_mode:
            self.model.train()
        try:
            if chunk.part is not None:
                self._part(chunk, result)
            else:
                self._whole(chunk, result)
        finally:
            self._use(self.default_name)
            if self._needs_train_mode:
                self.model.eval()
        return self._maybe_step(chunk, result)

    def _use(self, name: str) -> None:
        """The adapter ``name`` active, as ``PeftModel.set_adapter(name)`` leaves it, but
        requires_grad (set once at start)."""
        for layer in self._lora_layers:
            layer._active_adapter = [name]
        self.model.active_adapter = self.model.base_model.active_adapter = name

    @contextlib.contextmanager
    def _serving_active(self):
        """This executor's serving adapter active (between chunks the default one is)."""
        if self.serving_name == self.default_name:
            yield
            return
        self._use(self.serving_name)
        try:
            yield
        finally:
            self._use(self.default_name)

    @contextlib.contextmanager
    def _adapters_off(self):
        """The base model alone, as ``PeftModel.disable_adapter()`` gives it, but requires_grad."""
        for layer in self._lora_layers:
            layer._disable_adapters = True
        try:
            yield
        finally:
            for layer in self._lora_layers:
                layer._disable_adapters = False

    def _maybe_step(self, chunk: FinetuneChunk, result: FinetuneResult) -> FinetuneResult:
        if chunk.step and self.hands_over_gradients:
            result.gradients_generation = self._accumulated_generation
            result.gradients = self._hand_over()
            result.stepped = result.gradients is not None
        elif chunk.step:
            result.stepped = self._step()
            due = self.version % self.checkpoint_every == 0 or chunk.checkpoint
            if result.stepped and self.checkpoints is not None and due:
                # a copy of the weights now; the writer's thread does the disk work
                self.checkpoints.submit(self.version, self.snapshot())
                result.checkpoint_version = self.version
        return result

    @torch.no_grad()
    def rollback(self, version: int, state: dict[str, torch.Tensor]) -> None:
        """Serve and train from ``state`` (version ``version``'s weights, keyed as a checkpoint
        holds them) again: both adapters take it, the gradients, the optimizer's moments and any
        pass in progress are dropped. Only between iterations, with no fine-tune chunk pending
        (``Trainer.rollback`` puts the trainer's side in step)."""
        if self._serving_weights is not None and state.keys() == self._serving_weights.keys():
            for key, tensor in self._serving_weights.items():
                tensor.copy_(state[key])
        else:
            set_peft_model_state_dict(self.model, state, adapter_name=self.serving_name)
        for serving, trainable in self._publish:
            trainable.copy_(serving)
        self.optimizer.zero_grad(set_to_none=True)
        self.optimizer.state.clear()
        self._bad_accumulation = False
        self._num_accumulated = 0
        self._chosen_part = self._job = self._ref_job = self._ref_logps = None
        self.version = version
        if version not in self._kept:
            self._keep(version)

    def _hand_over(self) -> dict[str, torch.Tensor] | None:
        """The accumulated gradients (CPU copies), dropped here; None when any is not finite."""
        ok = not self._bad_accumulation
        grads = [p.grad for p in self.params]
        if ok:
            present = [g for g in grads if g is not None]
            ok = not present or bool(torch.isfinite(torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(g) for g in present]))))
        out = ({k: g.detach().to("cpu", copy=True) for k, g in zip(self._grad_keys, grads) if g is not None}
               if ok else None)
        self.optimizer.zero_grad(set_to_none=True)
        self._bad_accumulation = False
        self._num_accumulated = 0
        self._accumulated_generation = None
        return out

    @torch.no_grad()
    def adopt(self, version: int, state: dict[str, torch.Tensor], generation: int) -> None:
        """Serve version ``version``'s weights (a coordinator's change number ``generation``)
        from the next iteration on; the trainable adapter takes them too, now or, while a pass
        cut at decoder layers is part-way (its graph holds the trainable weights), when it ends.
        The gradients accumulated so far are kept: the hand-over reports the oldest weights any
        of them saw (``_hand_over``). Only between iterations."""
        if self._serving_weights is not None and state.keys() == self._serving_weights.keys():
            for key, tensor in self._serving_weights.items():
                tensor.copy_(state[key])
        else:
            set_peft_model_state_dict(self.model, state, adapter_name=self.serving_name)
        self.version = version
        self.max_version = max(self.max_version, version)
        if version not in self._kept:
            self._keep(version)
        self._serving_generation = generation
        self._sync_trainable()

    @torch.no_grad()
    def _sync_trainable(self) -> None:
        """The trainable adapter takes the adopted serving weights, unless a pass cut at layers
        is part-way or it already has them."""
        if self._job is not None or self._trainable_generation == self._serving_generation:
            return
        for serving, trainable in self._publish:
            trainable.copy_(serving)
        self._trainable_generation = self._serving_generation

    def _keep(self, version: int) -> None:
        self._kept[version] = self.snapshot()
        while len(self._kept) > self.config.keep_versions:
            self._kept.popitem(last=False)
        self.kept_versions = tuple(self._kept)

    def kept(self, version: int) -> dict[str, torch.Tensor] | None:
        """Version ``version``'s weights, keyed as a checkpoint holds them, while it is kept."""
        return self._kept.get(version)

    def snapshot(self) -> dict[str, torch.Tensor]:
        """A CPU copy of the serving adapter, as a checkpoint holds it (on the worker thread, or
        once the worker stopped)."""
        return adapter_snapshot(self.model, self._serving_weights, self.serving_name)

    def _step(self) -> bool:
        """Clip, step and publish, or (a non-finite value anywhere) drop it all; True if stepped.

        A step over n < grad_accum pairs (the trainer steps early rather than sit on gradients
        when no more feedback waits) takes n / grad_accum of the learning rate. Adam's update
        hardly depends on the gradient's scale, so without this a one-pair step would move the
        adapter as far as a full one, and how far the adapter moves per pair, and how noisily,
        would depend on how the load happened to group pairs into steps: a policy that trains
        each pair as it comes (synchronous, or any policy on a quiet server) would take
        grad_accum times the steps of one that trains in batches (periodic)."""
        for p in self.params:
            p.requires_grad_(True)
        grads_ok = not self._bad_accumulation
        if grads_ok:
            # the total norm is finite iff every gradient is (one fused reduction, not one per tensor)
            grads_ok = bool(torch.isfinite(torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm)))
        if grads_ok:
            share = min(1.0, self._num_accumulated / self.config.grad_accum) if self._num_accumulated else 1.0
            for group in self.optimizer.param_groups:
                group["lr"] = self.config.lr * share
            self.optimizer.step()
            grads_ok = bool(torch.isfinite(torch.nn.utils.get_total_norm(self.params)))
        self.optimizer.zero_grad(set_to_none=True)
        self._bad_accumulation = False
        self._num_accumulated = 0
        with torch.no_grad():
            if grads_ok:  # publish: serving takes the new weights
                for serving, trainable in self._publish:
                    serving.copy_(trainable)
                self.version = self.max_version = self.max_version + 1
                self._keep(self.version)
            else:  # back to the last good weights; the serving adapter never saw the bad ones
                for serving, trainable in self._publish:
                    trainable.copy_(serving)
                self.optimizer.state.clear()
        return grads_ok
