"""One adapter trained by several replicas (trainer/distributed.py), in one process: the
coordinator's leases, staleness and steps, and two real servers that share it."""

from __future__ import annotations

import asyncio
import contextlib
import time

import aiohttp
import pytest
import torch

from engine.config import TrainingConfig
from trainer.distributed import Coordinator, CoordinatorStore, ReplicaSync
from trainer.feedback import NewPair


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _pairs(n: int, tag: str = "") -> list[NewPair]:
    return [NewPair(prompt=f"Question {tag}{i}?", chosen=" Yes.", rejected=" No.", id=f"{tag}p{i}") for i in range(n)]


def _weights() -> dict[str, torch.Tensor]:
    return {"a.lora_A.weight": torch.zeros(2, 4), "a.lora_B.weight": torch.zeros(4, 2)}


def test_leases_are_fair_shares_and_lapse_with_a_quiet_replica(tmp_path):
    clock = _Clock()
    coord = Coordinator(tmp_path, TrainingConfig(grad_accum=4), lease_s=10.0, clock=clock)
    coord.register("r0", _weights(), "{}")
    coord.register("r1", _weights(), "{}")
    coord.add(_pairs(6))
    first = coord.lease("r0", 256)
    assert [p.id for p in first] == ["p0", "p1", "p2"]  # half of six, two replicas live
    second = coord.lease("r1", 256)
    assert [p.id for p in second] == ["p3", "p4", "p5"]
    assert coord.lease("r1", 256) == []  # all leased
    clock.now += 11.0  # r0 stops polling; r1 goes on
    coord.lease("r1", 0)
    assert [p.id for p in coord.lease("r1", 256)] == ["p0", "p1", "p2"]  # r0's lapsed to r1
    coord.close()


def test_stale_gradients_are_dropped_and_their_pairs_train_again(tmp_path):
    coord = Coordinator(tmp_path, TrainingConfig(grad_accum=2, lr=0.1), max_staleness=1)
    coord.register("r0", _weights(), "{}")
    coord.add(_pairs(6))
    leased = [p.id for p in coord.lease("r0", 6)]
    grad = {"a.lora_A.weight": torch.ones(2, 4), "a.lora_B.weight": torch.ones(4, 2)}
    g0 = coord.generation
    assert not coord.submit("r0", g0 - 1, leased[:1], grad)  # from before this coordinator started
    assert coord.submit("r0", g0, leased[:2], grad)  # two pairs: a full accumulation, a step
    assert coord.version == 1 and coord.generation == g0 + 1
    assert not torch.equal(coord.weights["a.lora_A.weight"], torch.zeros(2, 4))
    assert coord.submit("r0", g0, leased[2:3], grad)  # one change behind: kept
    coord.submit("r0", g0 + 1, leased[3:4], grad)
    assert coord.version == 2
    assert not coord.submit("r0", g0, leased[4:5], grad)  # two behind: dropped
    assert coord.status()["stale_gradients"] == 2
    coord.flush()
    again = [p.id for p in coord.lease("r0", 6)]
    assert leased[4] in again and leased[5] not in again  # p5 is still leased to r0
    stats = coord.stats()
    assert stats["trained"] == 4 and stats["pending"] == 2
    coord.close()


def test_a_restarted_coordinator_resumes_from_its_checkpoint_and_store(tmp_path):
    coord = Coordinator(tmp_path, TrainingConfig(grad_accum=1, lr=0.1))
    coord.register("r0", _weights(), '{"peft_type": "LORA"}')
    coord.add(_pairs(3))
    leased = [p.id for p in coord.lease("r0", 3)]
    coord.submit("r0", coord.generation, leased[:1], {"a.lora_A.weight": torch.ones(2, 4)})
    coord.flush()
    weights = {k: v.clone() for k, v in coord.weights.items()}
    coord.store.close()  # a crash: nothing else is written
    again = Coordinator(tmp_path, TrainingConfig(grad_accum=1, lr=0.1))
    assert again.version == 1
    assert all(torch.equal(again.weights[k], weights[k]) for k in weights)
    assert again.stats() == {"received": 3, "trained": 1, "pending": 2, "set_aside": 0}
    assert [p.id for p in again.lease("r1", 3)] == leased[1:]  # the lost leases are pending again
    assert not again.submit("r0", coord.generation, leased[1:2], {"a.lora_A.weight": torch.ones(2, 4)})
    again.close()


# -- two servers sharing one coordinator ----------------------------------------------------------


@contextlib.asynccontextmanager
async def _replicas(start_server, coord: Coordinator, config: TrainingConfig, n: int = 2):
    """``n`` servers whose trainers share ``coord`` (called in-process, as the Ray actor would be)."""
    async with contextlib.AsyncExitStack() as stack:
        out = []
        for r in range(n):
            replica = f"r{r}"
            store = CoordinatorStore(lambda name, *args: getattr(coord, name)(*args), replica)
            url, engine = await stack.enter_async_context(start_server(
                engine_overrides={"seed": 0}, trainer_config=config, feedback_store=store, model_name="demo"))
            training = engine.training

            async def submit(*args):
                return coord.submit(*args)

            async def register(*args):
                return coord.register(*args)

            sync = ReplicaSync(training, engine, replica, coord.poll, submit, register, poll_timeout_s=0.5)
            await sync.start()
            stack.push_async_callback(sync.stop)
            out.append((url, engine, sync))
        yield out


async def _post(session, url, path, body):
    async with session.post(url + path, json=body) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json(), resp.headers


async def test_two_servers_train_one_adapter_and_serve_the_same_version(start_server, tmp_path):
    torch.manual_seed(0)
    config = TrainingConfig(lr=1e-2, grad_accum=4, max_step_delay_s=0.5)
    coord = Coordinator(tmp_path / "coordinator", config)
    async with _replicas(start_server, coord, config) as replicas, aiohttp.ClientSession() as session:
        ask = {"model": "demo", "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 8,
               "temperature": 0}
        answers = [await _post(session, url, "/v1/chat/completions", ask) for url, _, _ in replicas]
        assert answers[0][0]["choices"][0]["message"] == answers[1][0]["choices"][0]["message"]
        assert answers[0][1]["x-adapter-version"] == answers[1][1]["x-adapter-version"] == "0"
        # feedback round robin: eight pairs, four to each server
        for i in range(8):
            url = replicas[i % 2][0]
            await _post(session, url, "/v1/feedback", {"prompt": f"Is {i} fine?", "chosen": " Yes.", "rejected": " No."})
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and coord.stats()["trained"] < 8:
            await asyncio.sleep(0.05)
        assert coord.stats()["trained"] == 8
        assert coord.version >= 2  # grad_accum 4: at least two steps over eight pairs
        status = coord.status()
        assert set(status["pairs_by_replica"]) == {"r0", "r1"}  # both replicas' slack trained
        # every replica serves each step's weights within a second of the step
        await asyncio.sleep(1.0)
        assert [sync.version for _, _, sync in replicas] == [coord.version, coord.version]
        for version in range(1, coord.version + 1):
            served = [sync.adopted_at.get(version) for _, _, sync in replicas]
            if None not in served:
                assert max(served) - min(served) < 1.0
        answers = [await _post(session, url, "/v1/chat/completions", ask) for url, _, _ in replicas]
        assert answers[0][0]["choices"][0]["message"] == answers[1][0]["choices"][0]["message"]
        assert answers[0][1]["x-adapter-version"] == answers[1][1]["x-adapter-version"] == str(coord.version)
        weights = [engine.training.executor.snapshot() for _, engine, _ in replicas]
        assert all(torch.equal(weights[0][k], weights[1][k]) and torch.equal(weights[0][k], coord.weights[k])
                   for k in coord.weights)
    coord.close()
