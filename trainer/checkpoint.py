"""Adapter checkpoints in PEFT's format, written atomically off the worker, and resuming from the latest.

``STATE_DIR/adapters/v000042/`` holds ``adapter_config.json`` and ``adapter_model.safetensors``
(so ``peft.PeftModel.from_pretrained(base, that_dir)`` loads it) plus ``mace.json`` with the
version and the highest version published so far. The newest directory by name is the one to
resume from: a rollback to version 3 when 7 was the highest writes ``v000007-r001`` holding
version 3's weights, which sorts after ``v000007`` and before ``v000008``, the next step's. A checkpoint is written to a temporary directory, fsynced, then renamed into place: a
crash leaves either the old set or the new one, never half a checkpoint. The newest ``keep`` stay.

Writing one takes 20-35 ms on this machine's disk (three fsyncs), longer than a whole TBT budget,
so the worker does not write: it copies the serving adapter's tensors (a LoRA adapter is small)
and hands them to a ``CheckpointWriter``, whose own thread writes while the next iterations run.
When writes queue up only the newest is written (it holds every step before it).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import torch
from peft import PeftModel, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from trainer.adapters import SERVING, TRAIN, copy_adapter

_PREFIX = "v"

log = logging.getLogger(__name__)


def adapter_config_json(peft_model: PeftModel, adapter: str = SERVING) -> str:
    """The ``adapter_config.json`` that ``save_pretrained`` writes for the serving adapter."""
    config = copy.deepcopy(peft_model.peft_config[adapter])
    config.inference_mode = True
    if config.base_model_name_or_path is None:
        config.base_model_name_or_path = peft_model.base_model.model.__dict__.get("name_or_path") or None
    with tempfile.TemporaryDirectory() as tmp:
        config.save_pretrained(tmp)
        return (Path(tmp) / "adapter_config.json").read_text()


class CheckpointWriter:
    """Writes checkpoints on a thread of its own. ``submit`` (any thread) queues a snapshot and
    returns at once; ``wait(version)`` blocks until a checkpoint of that version or a newer one
    is on disk (False: the writer stopped, or a write failed, before that). ``on_saved`` is
    called on the writer's thread after each checkpoint lands."""

    def __init__(self, peft_model: PeftModel, state_dir: str | Path, keep: int = 3,
                 on_saved: Callable[[int], None] | None = None, adapter: str = SERVING) -> None:
        self.state_dir = Path(state_dir)
        self.keep = keep
        self.config_json = adapter_config_json(peft_model, adapter)
        self._cond = threading.Condition()
        self._next: tuple[int, dict[str, torch.Tensor]] | None = None  # newest snapshot not yet written
        self._writing = False
        self._closed = False
        self.saved_version = 0  # newest checkpoint on disk, written by this writer
        self.failed_version = 0  # newest version whose write failed
        self.on_saved: Callable[[int], None] = on_saved or (lambda version: None)
        self._thread = threading.Thread(target=self._loop, name="mace-checkpoint", daemon=True)
        self._thread.start()

    def submit(self, version: int, state: dict[str, torch.Tensor]) -> None:
        with self._cond:
            if self._closed:
                raise RuntimeError("checkpoint writer is closed")
            if self._next is None or self._next[0] < version:
                self._next = (version, state)  # a queued older one is superseded
            self._cond.notify_all()

    def wait(self, version: int, timeout_s: float | None = None) -> bool:
        """True once a checkpoint of ``version`` or newer is on disk."""
        with self._cond:
            self._cond.wait_for(lambda: self.saved_version >= version or self.failed_version >= version
                                or (self._closed and self._next is None and not self._writing), timeout_s)
            return self.saved_version >= version

    def flush(self) -> None:
        """Block until every submitted checkpoint is written (or failed)."""
        with self._cond:
            self._cond.wait_for(lambda: self._next is None and not self._writing)

    def close(self) -> None:
        """Write what is queued, then end the thread."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join()

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._next is not None or self._closed)
                if self._next is None:
                    return
                (version, state), self._next = self._next, None
                self._writing = True
            ok = False
            try:
                write_checkpoint(state, self.config_json, self.state_dir, version, self.keep)
                ok = True
            except Exception:  # the pairs stay "pending" and go into a later checkpoint
                log.exception("checkpoint v%d failed", version)
            if ok:
                try:
                    self.on_saved(version)  # before flush() or wait() can return
                except Exception:  # a listener's bug must not stop the checkpoints
                    log.exception("checkpoint v%d: on_saved failed", version)
            with self._cond:
                self._writing = False
                if ok:
                    self.saved_version = max(self.saved_version, version)
                else:
                    self.failed_version = max(self.failed_version, version)
                self._cond.notify_all()


def write_checkpoint(state: dict[str, torch.Tensor], config_json: str, state_dir: str | Path, version: int,
                     keep: int = 3, max_version: int | None = None, name: str | None = None) -> Path:
    """Write checkpoint ``version`` from a snapshot (``adapter_snapshot``), atomically, under
    ``name`` (default ``v{version:06d}``)."""
    root = Path(state_dir) / "adapters"
    root.mkdir(parents=True, exist_ok=True)
    final = root / (name or f"{_PREFIX}{version:06d}")
    if final.exists():
        return final
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    try:
        save_file(state, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(config_json)
        (tmp / "mace.json").write_text(json.dumps({"version": version, "max_version": max(version, max_version or 0)}))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        tmp.chmod(0o755)  # mkdtemp's is 0700
        os.rename(tmp, final)
        _fsync_dir(root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in sorted(p for p in root.iterdir() if p.name.startswith(_PREFIX))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoints(state_dir: str | Path) -> list[tuple[Path, int]]:
    """Every complete checkpoint, (directory, version), oldest first."""
    root = Path(state_dir) / "adapters"
    if not root.is_dir():
        return []
    found = []
    for path in sorted(p for p in root.iterdir() if p.name.startswith(_PREFIX)):
        try:
            found.append((path, json.loads((path / "mace.json").read_text())["version"]))
        except (OSError, ValueError, KeyError):
            continue  # not a complete checkpoint
    return found


def max_version_on_disk(state_dir: str | Path) -> int:
    """The highest version number any checkpoint has seen published (0 with none)."""
    highest = 0
    for path, version in checkpoints(state_dir):
        try:
            highest = max(highest, version, json.loads((path / "mace.json").read_text()).get("max_version", 0))
        except (OSError, ValueError):
            continue
    return highest


def rollback_name(state_dir: str | Path, max_version: int) -> str:
    """A directory name for a rollback's checkpoint: after every name written so far."""
    root = Path(state_dir) / "adapters"
    taken = {p.name for p in root.iterdir()} if root.is_dir() else set()
    n = 1
    while f"{_PREFIX}{max_version:06d}-r{n:03d}" in taken:
        n += 1
    return f"{_PREFIX}{max_version:06d}-r{n:03d}"


def latest_checkpoint(state_dir: str | Path) -> tuple[Path, int] | None:
    found = checkpoints(state_dir)
    return found[-1] if found else None


def load_checkpoint_state(path: str | Path) -> dict[str, torch.Tensor]:
    """A checkpoint's weights, keyed as PEFT saves them."""
    return load_file(str(Path(path) / "adapter_model.safetensors"))


def load_checkpoint(peft_model: PeftModel, path: str | Path, serving: str = SERVING, train: str = TRAIN) -> None:
    """Load a checkpoint into both adapters (serving and trainable start equal)."""
    state = load_checkpoint_state(path)
    set_peft_model_state_dict(peft_model, state, adapter_name=serving)
    copy_adapter(peft_model, serving, train)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
