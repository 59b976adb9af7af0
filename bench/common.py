"""What the benchmark programs share: the model they default to, and the machine they report."""

from __future__ import annotations

import contextlib
import json
import platform
from pathlib import Path

DEFAULT_MODEL = "models/demo-base"  # what `make bench` builds


def save_results(path: str | Path, report: dict, markdown: str) -> None:
    """A bench's results: ``path`` (JSON) and the same name with ``.md`` (the table)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown if markdown.endswith("\n") else markdown + "\n")
    print(f"wrote {out} and {out.with_suffix('.md')}")


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


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def spawned_server(model: str, *flags: str, log_path: str | Path, ready_timeout_s: float = 120.0):
    """``mace serve --model MODEL FLAGS`` in a subprocess (this interpreter, ``-m server.cli``) on a
    free 127.0.0.1 port with a fresh ``--state-dir``; yields its base URL once /health answers
    200. Its output goes to ``log_path``. The server is stopped on exit, also on an error:
    SIGTERM, then SIGKILL after 15 s."""
    import os
    import subprocess
    import sys
    import tempfile

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="mace-bench-state-") as state_dir, open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "serve", "--model", model, "--host", "127.0.0.1", "--port", str(port),
             "--state-dir", state_dir, *flags],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        with serving_process(proc, url, "mace serve", log_path, ready_timeout_s):
            yield url


@contextlib.contextmanager
def serving_process(proc, url: str, name: str, log_path: str | Path, ready_timeout_s: float):
    """A server subprocess (``subprocess.Popen``) at ``url``: wait until its /health answers
    200, then hand over; on exit, also on an error, SIGTERM, then SIGKILL after 15 s."""
    import subprocess
    import time
    import urllib.request

    try:
        deadline = time.monotonic() + ready_timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode} before it was ready; see {log_path}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=1.0) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} was not ready in {ready_timeout_s} s; see {log_path}")
            time.sleep(0.1)
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
