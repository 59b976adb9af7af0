"""What the benchmark programs share: the model they default to, and the machine they report."""

from __future__ import annotations

import platform
from pathlib import Path

DEFAULT_MODEL = "models/demo-base"  # what `make bench` builds


def resolve_model(model: str | None) -> str:
    """``model``, or the base demo model (built the first time)."""
    if model is not None:
        return model
    if not (Path(DEFAULT_MODEL) / "config.json").exists():
        from engine.demo_model import build_demo_model

        print(f"building the base demo model in {DEFAULT_MODEL}", flush=True)
        build_demo_model(DEFAULT_MODEL, "base")
    return DEFAULT_MODEL


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "unknown")
    except OSError:
        return platform.processor() or "unknown"
