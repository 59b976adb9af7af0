"""Adapter checkpoints in PEFT's format, written atomically, and resuming from the latest.

``STATE_DIR/adapters/v000042/`` holds ``adapter_config.json`` and ``adapter_model.safetensors``
(so ``peft.PeftModel.from_pretrained(base, that_dir)`` loads it) plus ``mace.json`` with the
version. A checkpoint is written to a temporary directory, fsynced, then renamed into place: a
crash leaves either the old set or the new one, never half a checkpoint. The newest ``keep`` stay.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from peft import PeftModel, set_peft_model_state_dict
from safetensors.torch import load_file

from trainer.executor import SERVING, TRAIN, copy_adapter

_PREFIX = "v"


def save_checkpoint(peft_model: PeftModel, state_dir: str | Path, version: int, keep: int = 3) -> Path:
    """Write the serving adapter as checkpoint ``version``; returns its directory."""
    root = Path(state_dir) / "adapters"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{_PREFIX}{version:06d}"
    if final.exists():
        return final
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    try:
        peft_model.save_pretrained(tmp, selected_adapters=[SERVING])
        saved = tmp / SERVING  # PEFT puts a named adapter in a directory of its name
        (saved / "mace.json").write_text(json.dumps({"version": version}))
        for f in saved.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        os.rename(saved, final)
        _fsync_dir(root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in sorted(p for p in root.iterdir() if p.name.startswith(_PREFIX))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(state_dir: str | Path) -> tuple[Path, int] | None:
    root = Path(state_dir) / "adapters"
    if not root.is_dir():
        return None
    for path in sorted((p for p in root.iterdir() if p.name.startswith(_PREFIX)), reverse=True):
        try:
            return path, json.loads((path / "mace.json").read_text())["version"]
        except (OSError, ValueError, KeyError):
            continue  # not a complete checkpoint
    return None


def load_checkpoint(peft_model: PeftModel, path: str | Path) -> None:
    """Load a checkpoint into both adapters (serving and trainable start equal)."""
    state = load_file(str(Path(path) / "adapter_model.safetensors"))
    set_peft_model_state_dict(peft_model, state, adapter_name=SERVING)
    copy_adapter(peft_model, SERVING, TRAIN)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
