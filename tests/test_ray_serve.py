"""``mace serve --replicas 2`` on a local Ray: the same API through Ray Serve's proxy, one adapter
trained by both replicas, prefix affinity, and the faults (a replica killed under load, the
coordinator killed mid-training). One Ray instance for the module; every wait is bounded."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time

import aiohttp
import pytest

ray = pytest.importorskip("ray")

from server.cli import build_parser  # noqa: E402
from server.ray_serve import COORDINATOR, NAMESPACE, PrefixIndex, prefix_keys, routing_text  # noqa: E402


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, demo_model_dir):
    """Two replicas of the tiny demo model behind Ray Serve's proxy: (base url, args)."""
    from server.ray_serve import start_application, stop_application

    port = _free_port()
    state_dir = tmp_path_factory.mktemp("ray-state")
    args = build_parser().parse_args([
        "serve", "--replicas", "2", "--model", demo_model_dir, "--port", str(port), "--state-dir", str(state_dir),
        "--kv-cache-bytes", str(8 << 20), "--no-ray-dashboard", "--grad-accum", "4", "--learning-rate", "1e-2",
        "--max-step-delay", "0.5", "--shutdown-grace", "1", "--served-model-name", "demo",
    ])
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    app = start_application(args)
    try:
        yield f"http://127.0.0.1:{port}", args
    finally:
        stop_application(app)
        for sig, handler in handlers.items():  # ray.init installs its own
            signal.signal(sig, handler)


def _replica_actors() -> list[str]:
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["namespace"] == "serve" and a["name"].startswith("SERVE_REPLICA::mace#Replica#"))


async def _adapters(http, url) -> dict:
    async with http.get(f"{url}/v1/adapters") as r:
        assert r.status == 200
        return await r.json()


async def _wait_for(predicate, timeout_s: float, what: str, interval_s: float = 0.1):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = await predicate()
        if value:
            return value
        await asyncio.sleep(interval_s)
    raise TimeoutError(f"{what}: not within {timeout_s} s")


def test_routing_text_and_prefix_index():
    chat = b'{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]}'
    assert routing_text("/v1/chat/completions", chat) == "system:Be brief.\nuser:Hi"
    assert routing_text("/v1/completions", b'{"prompt": "Once"}') == "Once"
    assert routing_text("/generate", b'{"inputs": "Tell"}') == "Tell"
    assert routing_text("/v1/feedback", b'{"prompt": "x"}') is None
    assert routing_text("/v1/completions", b"not json") is None
    system = "You are a helpful assistant. " * 5  # 145 characters: two whole blocks
    index = PrefixIndex()
    index.insert(prefix_keys(system + "first question"), "a")
    assert index.match(prefix_keys(system + "another one, longer than the first"), {"a", "b"}) == ("a", 2)
    assert index.match(prefix_keys(system), {"b"}) == (None, 0)  # a holds it, and only b is up
    index.insert(prefix_keys(system), "b")
    assert index.match(prefix_keys(system), {"a", "b"}) == ("b", 2)
    index.forget("b")
    assert index.match(prefix_keys(system), {"a", "b"}) == (None, 0)


async def test_openai_package_through_the_proxy_and_the_same_greedy_answer_from_both(cluster):
    import openai

    url, _ = cluster
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": "Tell me a story"}]
    answer = await client.chat.completions.create(model="demo", messages=messages, max_tokens=12,
                                                  temperature=0)
    assert answer.choices[0].finish_reason == "length"
    streamed = []
    async for chunk in await client.chat.completions.create(model=answer.model, messages=messages, max_tokens=12,
                                                             temperature=0, stream=True):
        streamed.append(chunk.choices[0].delta.content or "")
    assert "".join(streamed) == answer.choices[0].message.content
    # completions that differ in their first characters spread over both replicas; each
    # replica's greedy answer to one prompt is the same
    by_replica: dict[str, set[str]] = {}
    async with aiohttp.ClientSession() as http:
        for i in range(24):
            body = {"prompt": f"{i} The same question", "max_tokens": 8, "temperature": 0}
            async with http.post(f"{url}/v1/completions", json=body) as r:
                assert r.status == 200
                replica = r.headers["x-mace-replica"]
            body = {"prompt": "The same question", "max_tokens": 8, "temperature": 0}
            async with http.post(f"{url}/v1/completions", json=body, headers={"x-request-id": f"same-{i}"}) as r:
                assert r.status == 200 and r.headers["x-request-id"] == f"same-{i}"
                by_replica.setdefault(replica, set())
                by_replica.setdefault(r.headers["x-mace-replica"], set()).add((await r.json())["choices"][0]["text"])
        assert len(by_replica) == 2, by_replica  # both replicas answered
        texts = set().union(*by_replica.values())
        assert len(texts) == 1  # one greedy answer, whichever replica gave it
        # errors keep their shape through the proxy
        async with http.post(f"{url}/generate", json={"inputs": ""}) as r:
            assert r.status == 422 and (await r.json()) == {"error": "`inputs` must not be empty",
                                                            "error_type": "validation"}
        async with http.get(f"{url}/v1/nope") as r:
            assert r.status == 404 and (await r.json())["error"]["code"] == "not_found"
        # what would reach one replica only is refused, not half done
        async with http.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/nowhere"}) as r:
            assert r.status == 400 and (await r.json())["error"]["code"] == "unsupported_with_replicas"


async def test_feedback_to_both_replicas_trains_one_adapter(cluster):
    url, _ = cluster
    async with aiohttp.ClientSession() as http:
        before = await _adapters(http, url)
        posted_to: list[str] = []  # the replica each post landed on (the router spreads them)
        while len(posted_to) < 8 or (len(set(posted_to)) < 2 and len(posted_to) < 32):
            i = len(posted_to)
            body = {"prompt": f"Is {i} a good number?", "chosen": " Yes.", "rejected": " No.", "id": f"one-{i}"}
            async with http.post(f"{url}/v1/feedback", json=body) as r:
                assert r.status == 200 and (await r.json())["stored"] == 1
                posted_to.append(r.headers["x-mace-replica"])
        assert len(set(posted_to)) == 2

        async def all_trained():
            async with http.get(f"{url}/v1/feedback/stats") as r:
                stats = await r.json()
            return stats["trained"] == len(posted_to) and stats["pending"] == 0

        await _wait_for(all_trained, 90, "every pair trained")
        state = await _adapters(http, url)
        coordinator = state["coordinator"]
        assert coordinator["steps"] >= before["coordinator"]["steps"] + 2  # grad_accum 4
        assert set(coordinator["pairs_by_replica"]) == {r["id"] for r in state["replicas"]}
        assert len(state["replicas"]) == 2

        async def same_version():
            replicas = (await _adapters(http, url))["replicas"]
            return {r["version"] for r in replicas} == {coordinator["version"]}

        await _wait_for(same_version, 5, "both replicas serving the coordinator's version")
        assert coordinator["broadcast_ms_p99"] < 1000.0  # each step reached each replica within 1 s
        async with http.get(f"{url}/metrics") as r:
            text = await r.text()
        assert f'mace_replica_info{{replica="{r.headers["x-mace-replica"]}"}} 1' in text
        steps = float(next(line.split()[1] for line in text.splitlines()
                           if line.startswith("mace_coordinator_steps_total ")))
        assert steps >= coordinator["steps"]
        for replica in state["replicas"]:
            assert f'mace_coordinator_pairs_total{{replica="{replica["id"]}"}}' in text
            assert f'mace_replica_serving_version{{replica="{replica["id"]}"}}' in text
        assert 'mace_coordinator_broadcast_seconds{quantile="0.99"}' in text
        assert "mace_prefix_cache_hits" in text  # the replica's own metrics, as without Ray

        # a rollback through any replica: the coordinator goes back, every replica follows
        target = coordinator["version"] - 1
        async with http.post(f"{url}/v1/adapters/rollback", json={"version": target}) as r:
            assert r.status == 200
            assert await r.json() == {"version": target, "next_version": coordinator["max_version"] + 1}

        async def rolled_back():
            replicas = (await _adapters(http, url))["replicas"]
            return len(replicas) == 2 and {r["version"] for r in replicas} == {target}

        await _wait_for(rolled_back, 5, "both replicas serving the version rolled back to")
        async with http.post(f"{url}/v1/adapters/rollback", json={"version": 999}) as r:
            assert r.status == 404 and (await r.json())["error"]["param"] == "version"


async def test_a_replica_killed_under_a_stream_load_loses_nothing_acknowledged(cluster):
    url, _ = cluster
    acknowledged: list[str] = []
    results: list[str] = []

    async def stream(http, i: int) -> None:
        body = {"messages": [{"role": "user", "content": f"Story number {i}"}], "max_tokens": 48, "stream": True,
                "ignore_eos": True, "temperature": 0}
        try:
            async with http.post(f"{url}/v1/chat/completions", json=body) as r:
                if r.status != 200:
                    results.append(f"status {r.status}")
                    return
                data = await r.read()
        except aiohttp.ClientError as exc:
            results.append(f"client error {exc!r}")
            return
        events = [e for e in data.split(b"\n\n") if e]
        assert events[-1] == b"data: [DONE]"  # every stream ends cleanly
        results.append("error event" if b'"error"' in data else "done")

    async def feedback(http, i: int) -> None:
        body = {"prompt": f"Is {i} fine under load?", "chosen": " Yes.", "rejected": " No.", "id": f"load-{i}"}
        async with http.post(f"{url}/v1/feedback", json=body) as r:
            if r.status == 200:
                acknowledged.append(body["id"])

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:
        before = _replica_actors()
        assert len(before) == 2
        tasks = [asyncio.create_task(stream(http, i)) for i in range(12)]
        tasks += [asyncio.create_task(feedback(http, i)) for i in range(6)]
        await asyncio.sleep(1.0)
        ray.kill(ray.get_actor(before[0], namespace="serve"), no_restart=True)
        tasks += [asyncio.create_task(feedback(http, 6 + i)) for i in range(6)]
        await asyncio.wait_for(asyncio.gather(*tasks), 120)
        assert len(results) == 12
        assert results.count("done") >= 1  # the other replica's requests finished
        assert all(r in ("done", "error event", "status 503") for r in results), results

        async def restarted():
            now = _replica_actors()
            return len(now) == 2 and now != before

        await _wait_for(restarted, 60, "Ray Serve replacing the killed replica", interval_s=0.5)

        async def trained():
            async with http.get(f"{url}/v1/feedback/stats") as r:
                return (await r.json())["pending"] == 0

        await _wait_for(trained, 90, "every acknowledged pair trained")
    coordinator = ray.get_actor(COORDINATOR, namespace=NAMESPACE)
    store_ids = ray.get(coordinator.trained_ids.remote())
    assert set(acknowledged) <= store_ids  # nothing acknowledged lost


async def test_a_killed_coordinator_restarts_from_its_store_and_checkpoint(cluster):
    url, _ = cluster
    coordinator = ray.get_actor(COORDINATOR, namespace=NAMESPACE)
    acknowledged: list[str] = []
    async with aiohttp.ClientSession() as http:
        for i in range(6):
            body = {"prompt": f"Before the crash {i}?", "chosen": " Yes.", "rejected": " No.", "id": f"crash-{i}"}
            async with http.post(f"{url}/v1/feedback", json=body) as r:
                assert r.status == 200
                acknowledged.append(body["id"])
        await asyncio.sleep(0.3)  # training under way
        pid = ray.get(coordinator.__ray_call__.remote(lambda self: os.getpid()))
        os.kill(pid, signal.SIGKILL)  # Ray restarts it (max_restarts=-1)
        for i in range(6, 10):  # posted while it restarts: acknowledged only once stored
            body = {"prompt": f"During the restart {i}?", "chosen": " Yes.", "rejected": " No.", "id": f"crash-{i}"}
            async with http.post(f"{url}/v1/feedback", json=body) as r:
                assert r.status in (200, 503)
                if r.status == 200:
                    acknowledged.append(body["id"])

        async def trained():
            async with http.get(f"{url}/v1/feedback/stats") as r:
                stats = await r.json()
            return stats["pending"] == 0 and stats

        await _wait_for(trained, 120, "every acknowledged pair trained after the restart")
        state = await _adapters(http, url)

        async def same_version():
            replicas = (await _adapters(http, url))["replicas"]
            return len(replicas) == 2 and {r["version"] for r in replicas} == {state["coordinator"]["version"]}

        await _wait_for(same_version, 10, "the replicas serving the restarted coordinator's version")
    assert set(acknowledged) <= ray.get(coordinator.trained_ids.remote())
