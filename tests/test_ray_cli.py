"""``mace serve --replicas`` as a user runs it: up behind Ray Serve's proxy, then SIGTERM stops
the application and the local Ray it started (exit 0, the port closed)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

pytest.importorskip("ray")


def test_sigterm_stops_the_application_and_its_local_ray(demo_model_dir, tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "serve", "--replicas", "1", "--no-training", "--model", demo_model_dir,
         "--port", str(port), "--kv-cache-bytes", str(8 << 20), "--state-dir", str(tmp_path / "state"),
         "--no-ray-dashboard", "--api-key", "secret"],
        stdout=subprocess.DEVNULL, stderr=open(tmp_path / "log", "wb"), env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, "mace serve --replicas exited during start-up"
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            assert time.monotonic() < deadline, "not ready in 120 s"
            time.sleep(0.5)
        # the API key guards every route but /health, as without --replicas
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{url}/v1/models", timeout=5)
        assert refused.value.code == 401
        request = urllib.request.Request(f"{url}/v1/models", headers={"Authorization": "Bearer secret"})
        with urllib.request.urlopen(request, timeout=5) as r:
            assert r.status == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        with pytest.raises((urllib.error.URLError, ConnectionError)):
            urllib.request.urlopen(f"{url}/health", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
