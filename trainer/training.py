"""The one owner of training while serving: it builds every part, starts and stops them, writes
the last checkpoint, and holds the adapter version the server reports.

    Training(model, tokenizer, store, config)
      adapters on the model (trainer.adapters), resumed from the latest checkpoint in state_dir
      executor: FinetuneExecutor   the worker's side: runs fine-tune chunks, steps, publishes
      trainer: Trainer             the event loop's side: stored pairs -> chunks, results back
      checkpoints: CheckpointWriter | None   writes snapshots on a thread of its own

The engine hands ``executor`` to its runner and ``trainer`` to its core at construction;
``AsyncEngine`` calls ``start`` and ``stop``; the server reads ``adapter_version`` and the
trainer's counters.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import torch

from engine.config import TrainingConfig
from trainer.adapters import SERVING, TRAIN, attach_adapters
from trainer.checkpoint import (CheckpointWriter, checkpoints, latest_checkpoint, load_checkpoint, load_checkpoint_state,
                                max_version_on_disk, rollback_name, write_checkpoint)
from trainer.executor import FinetuneExecutor
from trainer.feedback import FeedbackStore
from trainer.staged import UnitCosts
from trainer.trainer import Trainer

log = logging.getLogger(__name__)


def adapter_names(tenant: str | None) -> tuple[str, str]:
    """(serving, trainable) adapter names of a tenant, or the default pair's."""
    return (SERVING, TRAIN) if tenant is None else (f"{SERVING}_{tenant}", f"{TRAIN}_{tenant}")


class Training:
    def __init__(self, model: torch.nn.Module, tokenizer, store: FeedbackStore, config: TrainingConfig,
                 tenant: str | None = None, task_ids=None) -> None:
        """Put the LoRA adapters on ``model`` (in place) and build the parts; with
        ``config.state_dir``, resume from its latest checkpoint and write new ones there. A
        ``tenant``'s training adds its own adapter pair to the model the default training
        wrapped (a ``PeftModel``), trains it on its own ``store`` and checkpoints it in its own
        ``config.state_dir``; ``task_ids`` (an iterator) numbers the fine-tune chunks of every
        training on the model."""
        self.config = config
        self.store = store
        self.tenant = tenant
        self.serving_name, self.train_name = adapter_names(tenant)
        peft_model = attach_adapters(model, config, self.serving_name, self.train_name)
        version = max_version = 0
        latest = latest_checkpoint(config.state_dir) if config.state_dir is not None else None
        if latest is not None:
            load_checkpoint(peft_model, latest[0], self.serving_name, self.train_name)
            version, max_version = latest[1], max_version_on_disk(config.state_dir)
            log.info("resumed the adapter from %s (version %d)", latest[0], version)
        checkpointing = config.state_dir is not None
        costs = UnitCosts.of(peft_model.base_model.model)  # one check of the layers' shape, for both
        self.trainer = Trainer(store, tokenizer, config, tokenizer.eos_token_id, adapter_version=version, task_ids=task_ids,
                               checkpointing=checkpointing, unit_costs=costs if config.layer_cuts else None)
        self.checkpoints = (CheckpointWriter(peft_model, config.state_dir, keep=max(3, config.keep_versions),
                                             on_saved=self.trainer.on_checkpoint_threadsafe, adapter=self.serving_name)
                            if checkpointing else None)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.executor = FinetuneExecutor(peft_model, config, pad_id, version, self.checkpoints, config.checkpoint_every,
                                         unit_costs=costs, max_version=max_version, serving=self.serving_name,
                                         train=self.train_name)
        self._lock = asyncio.Lock()  # one rollback at a time

    @property
    def adapter_version(self) -> int:
        """The version of the adapter inference reads (0: the base weights, or no step yet)."""
        return self.trainer.adapter_version

    async def start(self, on_new_work: Callable[[], None]) -> None:
        """On the event loop, before the first iteration: load the pairs stored before a restart;
        ``on_new_work`` wakes the engine whenever fine-tune work becomes ready."""
        await self.trainer.start(on_new_work)

    async def stop(self) -> None:
        """After the worker stopped: checkpoint the serving adapter and wait until it is on disk
        (then every pair stepped so far is trained for good; if the write fails they stay pending
        and train again after a restart), let the store writes land, end the writer's thread."""
        if self.checkpoints is not None:
            saved = True
            if self.executor.version > 0:
                saved = await asyncio.to_thread(self._save)  # the worker is stopped: nothing changes now
            if saved:
                self.trainer.on_checkpoint()
        await self.flush()
        if self.checkpoints is not None:
            await asyncio.to_thread(self.checkpoints.close)

    async def rollback(self, version: int, run_on_worker) -> bool:
        """Serve and train from version ``version`` again (False: it is not kept). Training
        pauses, the fine-tune chunks already handed out finish, the weights go to disk as the
        checkpoint to resume from (so an acknowledged rollback survives a crash; a crash before
        it leaves the state before it), then both adapters take them between two iterations.
        ``run_on_worker``: ``AsyncEngine.run_on_worker``."""
        async with self._lock:
            trainer, executor = self.trainer, self.executor
            was_paused, trainer.paused = trainer.paused, True
            try:
                state = await self.version_state(version, run_on_worker)  # after the plans in flight
                if state is None:
                    return False
                if self.checkpoints is not None:
                    await asyncio.to_thread(self.checkpoints.flush)
                    name = rollback_name(self.config.state_dir, executor.max_version)
                    await asyncio.to_thread(write_checkpoint, state, self.checkpoints.config_json, self.config.state_dir,
                                            version, self.checkpoints.keep, executor.max_version, name)
                await run_on_worker(lambda: executor.rollback(version, state))
                trainer.rollback(version)
                log.info("rolled the adapter back to version %d (the next step is version %d)", version,
                         executor.max_version + 1)
                return True
            finally:
                trainer.paused = was_paused

    def set_training(self, enabled: bool) -> None:
        """Pause or resume training; feedback is stored either way."""
        self.trainer.set_paused(not enabled)

    def lora_config(self):
        """The serving adapter's ``LoraConfig`` (what a pinned version is loaded with)."""
        return self.executor.model.peft_config[self.serving_name]

    def checkpoint_versions(self) -> list[int]:
        """Versions with a complete checkpoint on disk."""
        if self.config.state_dir is None:
            return []
        return [version for _, version in checkpoints(self.config.state_dir)]

    async def version_state(self, version: int, run_on_worker) -> dict[str, torch.Tensor] | None:
        """Version ``version``'s weights while it is kept: the executor's copy (read on the
        worker, after the plans queued before), else its checkpoint on disk; None otherwise."""
        state = await run_on_worker(lambda: self.executor.kept(version))
        if state is None:
            state = await asyncio.to_thread(self.checkpoint_state, version)
        return state

    def checkpoint_state(self, version: int) -> dict[str, torch.Tensor] | None:
        """Checkpoint ``version``'s weights from disk, or None without one (any thread)."""
        if self.config.state_dir is None:
            return None
        for path, v in checkpoints(self.config.state_dir):
            if v == version:
                return load_checkpoint_state(path)
        return None

    def _save(self) -> bool:
        version = self.executor.version
        self.checkpoints.submit(version, self.executor.snapshot())
        return self.checkpoints.wait(version)

    async def flush(self) -> None:
        """Wait for the checkpoints queued and the store writes in flight (shutdown, tests)."""
        if self.checkpoints is not None:
            # the writer reports each checkpoint before flush returns, so its marks are queued by now
            await asyncio.to_thread(self.checkpoints.flush)
            await asyncio.sleep(0)
        await self.trainer.flush()
