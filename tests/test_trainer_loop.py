"""The trainer loop end to end on the engine: stored pairs are trained inside serving iterations,
the preferred responses gain log-prob, every pair ends up trained, serving goes on."""

import asyncio

import pytest
import torch

from engine.config import TrainingConfig
from engine.plan import FinetuneResult
from engine.sampling_params import SamplingParams
from scheduler.async_engine import AsyncEngine
from trainer.feedback import FeedbackStore, NewPair
from trainer.trainer import Trainer

CHOSEN, REJECTED = " Yes, gladly.", " No."


def _margin(core, runner, prompt: str) -> float:
    ex = runner.finetune_executor
    pair = core.trainer._tokenize(_Stored(prompt))
    with torch.no_grad():
        c, r = ex._logprobs([pair])
    return (c - r).item()


class _Stored:
    def __init__(self, prompt):
        self.id, self.prompt, self.chosen, self.rejected = "x", prompt, CHOSEN, REJECTED
        self.ref_chosen = self.ref_rejected = None
        self.is_chat = False


async def test_pairs_are_trained_while_serving(make_engine, tmp_path):
    store = FeedbackStore(tmp_path / "f.sqlite3")
    config = TrainingConfig(lr=5e-3, grad_accum=4)
    core, runner = make_engine(finetune_tokens_per_iteration=256, training=config, feedback_store=store)
    training, trainer = core.training, core.trainer
    prompts = [f"Question {i}: can you help me with task {i}?" for i in range(8)]
    held_out = "Question 99: can you help me with something else?"
    before = _margin(core, runner, held_out)
    engine = AsyncEngine(core, runner)
    await engine.start()
    try:
        store.add([NewPair(p, CHOSEN, REJECTED, id=f"p{i}") for i, p in enumerate(prompts)])
        assert await trainer.refill() == 8
        served = []
        async for out in engine.generate(core.tokenizer.encode("def f(x):"),
                                         SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)):
            served += out.new_token_ids
        for _ in range(600):  # bounded: until every pair is trained
            await asyncio.sleep(0.02)
            await training.flush()
            if store.stats()["trained"] == 8:
                break
        assert store.stats() == {"received": 8, "trained": 8, "pending": 0, "set_aside": 0}
        assert len(served) == 40
        assert trainer.num_steps == 2 and training.adapter_version == 2 and trainer.num_pairs_stepped == 8
        assert all(store.get(f"p{i}").ref_chosen is not None for i in range(8))  # computed once, stored
    finally:
        await engine.stop()
    assert _margin(core, runner, held_out) > before
    store.close()


async def test_feedback_over_http_trains_the_serving_adapter(start_server, tmp_path):
    import aiohttp

    store = FeedbackStore(tmp_path / "f.sqlite3")
    config = TrainingConfig(lr=5e-3, grad_accum=2)
    async with start_server(feedback_store=store, trainer_config=config) as (url, engine), \
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
        async with http.get(f"{url}/v1/adapters") as r:
            assert (await r.json())["serving"]["version"] == 0
        pairs = [{"messages": [{"role": "user", "content": f"Help me with {i}?"}], "chosen": CHOSEN,
                  "rejected": REJECTED, "id": f"h{i}"} for i in range(4)]
        async with http.post(f"{url}/v1/feedback", json={"pairs": pairs}) as r:
            assert r.status == 200 and (await r.json())["stored"] == 4
        for _ in range(500):  # bounded: until both steps are published
            async with http.get(f"{url}/v1/adapters") as r:
                info = await r.json()
            if info["serving"]["version"] == 2:
                break
            await asyncio.sleep(0.02)
        assert info["serving"]["version"] == 2 and info["steps"] == 2 and info["pairs_stepped"] == 4
        async with http.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 2}) as r:
            assert r.status == 200 and r.headers["x-adapter-version"] == "2"
        async with http.get(f"{url}/metrics") as r:
            metrics = await r.text()
        assert "mace_train_steps_total 2.0" in metrics and "mace_adapter_version 2.0" in metrics
        assert "mace_train_pairs_total 4.0" in metrics
        assert 'mace_feedback_pairs{state="trained"} 4.0' in metrics
        await engine.training.flush()
        assert store.stats()["trained"] == 4


async def test_sigkill_mid_training_loses_no_acknowledged_pair(demo_model_dir, tmp_path):
    import signal

    import aiohttp

    from tests.conftest import spawn_server, stop_spawned, wait_ready

    def start():
        return spawn_server(demo_model_dir, "--state-dir", str(tmp_path), "--grad-accum", "1",
                            "--checkpoint-every", "3", "--learning-rate", "1e-3")

    async def poll(http, url, done, limit_s=60.0):
        for _ in range(int(limit_s / 0.05)):
            async with http.get(f"{url}/v1/adapters") as r:
                adapters = await r.json()
            async with http.get(f"{url}/v1/feedback/stats") as r:
                stats = await r.json()
            if done(adapters, stats):
                return adapters, stats
            await asyncio.sleep(0.05)
        raise TimeoutError((adapters, stats))

    pairs = [{"prompt": f"Say something about {i}.", "chosen": CHOSEN, "rejected": REJECTED, "id": f"k{i}"}
             for i in range(40)]
    proc, url = start()
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
            await wait_ready(http, url)
            async with http.post(f"{url}/v1/feedback", json={"pairs": pairs}) as r:
                assert r.status == 200 and (await r.json())["stored"] == 40  # acknowledged
            _, stats = await poll(http, url, lambda a, s: a["serving"]["version"] >= 4)
            proc.send_signal(signal.SIGKILL)  # mid-training: 40 pairs at one per step
            proc.wait(timeout=30)
            assert stats["trained"] < 40
        proc, url = start()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
            await wait_ready(http, url)
            async with http.get(f"{url}/v1/adapters") as r:
                assert (await r.json())["serving"]["version"] >= 3  # resumed from a checkpoint
            adapters, stats = await poll(http, url, lambda a, s: s["trained"] == 40)
            assert stats == {"received": 40, "trained": 40, "pending": 0, "set_aside": 0}
    finally:
        stop_spawned(proc)


async def test_feedback_raises_held_out_clpd_while_the_server_streams(start_server, tmp_path):
    from clients import AsyncClient

    store = FeedbackStore(tmp_path / "f.sqlite3")
    config = TrainingConfig(lr=5e-3, grad_accum=2)
    held_out = [f"Q: could you look at item {i}? A:" for i in (101, 202, 303)]

    async def clpd(client) -> float:
        diffs = []
        for prompt in held_out:
            chosen, rejected = await client.score(prompt, CHOSEN), await client.score(prompt, REJECTED)
            diffs.append(chosen.logprob - rejected.logprob)
        return sum(diffs) / len(diffs)

    import aiohttp

    async with start_server(feedback_store=store, trainer_config=config) as (url, engine), \
            AsyncClient(url, timeout_s=60) as client, aiohttp.ClientSession() as http:
        before = await clpd(client)

        async def stream() -> int:
            n = 0
            async for delta in client.stream_chat([{"role": "user", "content": "Tell me a story."}],
                                                  max_tokens=150, ignore_eos=True, temperature=0):
                n += bool(delta.content) or delta.finish_reason is not None
            return n

        streaming = asyncio.create_task(stream())
        pairs = [{"prompt": f"Q: could you look at item {i}? A:", "chosen": CHOSEN, "rejected": REJECTED}
                 for i in range(8)]
        async with http.post(f"{url}/v1/feedback", json={"pairs": pairs}) as r:
            assert r.status == 200
        for _ in range(500):  # bounded: until the 4 steps are published
            if (await _adapters(http, url))["serving"]["version"] == 4:
                break
            await asyncio.sleep(0.02)
        assert (await _adapters(http, url))["serving"]["version"] == 4
        assert not streaming.done() or streaming.exception() is None  # serving went on meanwhile
        assert await asyncio.wait_for(streaming, 60) > 0
        after = await clpd(client)
    assert after > before + 0.5


async def _adapters(http, url) -> dict:
    async with http.get(f"{url}/v1/adapters") as r:
        return await r.json()


async def test_an_outlier_pair_is_set_aside_after_k_tries(make_engine, tmp_path):
    from engine.plan import FinetuneResult

    store = FeedbackStore(tmp_path / "f.sqlite3")
    store.add([NewPair(f"prompt {i}", CHOSEN, REJECTED, id=f"p{i}") for i in range(3)])
    core, runner = make_engine(training=TrainingConfig(grad_accum=3), feedback_store=store)
    trainer = core.trainer
    trainer.max_attempts = 2
    await trainer.refill()
    ref = trainer.next_chunk(10_000)
    trainer.on_result(FinetuneResult(ref.task_id, "reference", ref_logprobs={p.pair_id: (-5.0, -6.0) for p in ref.pairs}))
    rounds = [  # (losses, stepped): the first sets the recent mean; then p1 is an outlier, p2 not finite
        ({"p0": 0.7, "p1": 0.8, "p2": 0.6}, False),
        ({"p0": 0.7, "p1": 50.0, "p2": float("nan")}, False),
        ({"p0": 0.7, "p1": 60.0, "p2": float("nan")}, True),
    ]
    for i, (losses, stepped) in enumerate(rounds):
        chunk = trainer.next_chunk(10_000)
        assert [p.pair_id for p in chunk.pairs] == ["p0", "p1", "p2"] and chunk.step  # skipped steps retry all
        trainer.on_result(FinetuneResult(chunk.task_id, "gradient", losses=losses, stepped=stepped,
                                         adapter_version=int(stepped)))
        await trainer.flush()
        if i == 1:
            assert store.get("p1").attempts == 1 and store.get("p1").state == "pending"
    assert store.get("p1").state == "set_aside" and store.get("p2").state == "set_aside"
    assert store.stats() == {"received": 3, "trained": 1, "pending": 0, "set_aside": 2}
    store.close()


async def test_a_pair_too_big_for_the_room_trains_in_two_parts(make_engine, tmp_path):
    store = FeedbackStore(tmp_path / "f.sqlite3")
    core, runner = make_engine(training=TrainingConfig(grad_accum=1, layer_cuts=False), feedback_store=store)
    trainer = core.trainer
    store.add([NewPair("Why is the sky blue?", " Because of Rayleigh scattering.", " No idea.")])
    await trainer.refill()
    ex = runner.finetune_executor

    def step(failed: bool = False) -> tuple:
        chunk = trainer.next_chunk(trainer.next_pair_tokens())  # only ever the smallest room
        if failed:
            trainer.on_failure(chunk.task_id)
        else:
            trainer.on_result(ex.run(chunk))
        return chunk.kind, chunk.part, chunk.step, chunk.reset

    assert [step(), step()] == [("reference", None, False, False), ("gradient", "chosen", False, False)]
    assert step(failed=True) == ("gradient", "rejected", True, False)  # its iteration failed
    # the pair starts over, and the gradients of the failed accumulation are dropped first
    assert [step(), step()] == [("gradient", "chosen", False, True), ("gradient", "rejected", True, False)]
    assert not trainer.has_work and core.training.adapter_version == 1
    await trainer.flush()
    assert store.stats()["trained"] == 1
    store.close()


async def test_a_pair_with_its_reference_trains_before_the_next_reference(make_engine, tmp_path):
    """Depth first, in the smallest room: reference, then that pair's two parts, then the next
    pair's reference; the step comes with the accumulation's last pair."""
    store = FeedbackStore(tmp_path / "f.sqlite3")
    core, runner = make_engine(training=TrainingConfig(grad_accum=2, layer_cuts=False), feedback_store=store)
    trainer = core.trainer
    store.add([NewPair(f"Question {i}?", " A long and careful answer.", " No.", id=f"p{i}") for i in range(2)])
    await trainer.refill()
    ex, order = runner.finetune_executor, []
    while trainer.has_work:
        chunk = trainer.next_chunk(trainer.next_pair_tokens())
        order.append((chunk.kind, chunk.part, [p.pair_id for p in chunk.pairs], chunk.step))
        trainer.on_result(ex.run(chunk))
    assert order == [("reference", None, ["p0"], False), ("gradient", "chosen", ["p0"], False),
                     ("gradient", "rejected", ["p0"], False), ("reference", None, ["p1"], False),
                     ("gradient", "chosen", ["p1"], False), ("gradient", "rejected", ["p1"], True)]
    await trainer.flush()
    assert store.stats()["trained"] == 2 and trainer.num_steps == 1 and trainer.num_pairs_stepped == 2
    store.close()


async def test_a_pair_stepped_but_not_yet_checkpointed_is_not_loaded_again(make_engine, tmp_path):
    """Between its step and the checkpoint that marks it trained a pair is still pending in the
    store; a refill then must not load it again (it would be trained twice, or more)."""
    store = FeedbackStore(tmp_path / "f.sqlite3")
    config = TrainingConfig(grad_accum=2, state_dir=str(tmp_path / "state"), checkpoint_every=100)
    core, runner = make_engine(training=config, feedback_store=store)
    training, trainer = core.training, core.trainer
    store.add([NewPair(f"Question {i}?", CHOSEN, REJECTED, id=f"p{i}") for i in range(4)])
    assert await trainer.refill() == 4
    ex = runner.finetune_executor
    while trainer.num_steps == 0:  # the first step (p0, p1) is not the last one: no checkpoint
        chunk = trainer.next_chunk(1024)
        trainer.on_result(ex.run(chunk))
    await training.flush()
    assert trainer.num_pairs_stepped == 2 and store.stats()["pending"] == 4  # not checkpointed yet
    assert await trainer.refill() == 0
    while trainer.has_work:  # the last step checkpoints: every pair is trained, each once
        trainer.on_result(ex.run(trainer.next_chunk(1024)))
    await training.flush()
    assert trainer.num_pairs_stepped == 4 and store.stats()["trained"] == 4
    assert await trainer.refill() == 0 and not trainer._known  # forgotten once stored as trained
    store.close()


async def test_overlapping_refills_load_each_pair_once(make_engine, tmp_path):
    """The feedback route refills on every post; refills that overlap load a pair only once."""
    store = FeedbackStore(tmp_path / "f.sqlite3")
    core, runner = make_engine(training=TrainingConfig(grad_accum=4), feedback_store=store)
    trainer = core.trainer
    store.add([NewPair(f"Question {i}?", CHOSEN, REJECTED, id=f"p{i}") for i in range(5)])
    loaded = await asyncio.gather(*(trainer.refill() for _ in range(3)))
    assert sum(loaded) == 5
    queued = [p.pair_id for p in (*trainer._needs_reference, *trainer._ready)]
    assert sorted(queued) == [f"p{i}" for i in range(5)]
    store.close()


async def _checkpointing_trainer(make_engine, tmp_path, num_pairs: int):
    """Training that steps every pair and checkpoints every step, ``num_pairs`` pairs loaded:
    (training, store)."""
    store = FeedbackStore(tmp_path / "f.sqlite3")
    config = TrainingConfig(grad_accum=1, state_dir=str(tmp_path / "state"), checkpoint_every=1)
    core, _ = make_engine(training=config, feedback_store=store)
    store.add([NewPair(f"Question {i}?", CHOSEN, REJECTED, id=f"p{i}") for i in range(num_pairs)])
    assert await core.trainer.refill() == num_pairs
    return core.training, store


async def test_checkpoints_are_written_off_the_worker_and_mark_pairs_trained_when_on_disk(make_engine, tmp_path,
                                                                                          monkeypatch):
    """A step's checkpoint is queued, not written, on the worker: the chunk returns while the
    disk write is still blocked, and its pairs stay pending in the store until the write lands."""
    import threading

    import trainer.checkpoint as ckpt

    gate, taken, started, writes = threading.Event(), threading.Event(), [], []
    real_write = ckpt.write_checkpoint

    def blocked_write(state, config_json, state_dir, version, keep=3):
        started.append(version)
        taken.set()
        gate.wait(30)
        writes.append(version)
        return real_write(state, config_json, state_dir, version, keep)

    monkeypatch.setattr(ckpt, "write_checkpoint", blocked_write)
    training, store = await _checkpointing_trainer(make_engine, tmp_path, 3)
    trainer, ex, writer = training.trainer, training.executor, training.checkpoints
    try:
        while trainer.num_steps < 1:
            trainer.on_result(ex.run(trainer.next_chunk(1024)))
        # the writer has taken v1 and blocks on the disk (bounded: a hang fails here)
        assert await asyncio.to_thread(taken.wait, 30), "the writer never started checkpoint v1"
        while trainer.has_work:  # two more one-pair steps, each with its checkpoint due; none written yet
            trainer.on_result(ex.run(trainer.next_chunk(1024)))
        # the chunks came back while v1's write is still blocked: the worker did not write, and the
        # writer holds v1 in hand and only v3 queued (v2 superseded); nothing landed, nothing marked
        assert started == [1] and writes == [] and ckpt.latest_checkpoint(tmp_path / "state") is None
        assert writer._writing and writer._next[0] == 3 and writer.saved_version == 0
        assert trainer.num_pairs_stepped == 3 and [v for v, _ in trainer._unsaved] == [1, 2, 3]
        assert store.stats()["pending"] == 3
    finally:
        gate.set()
    await training.flush()
    # v1 was being written when v2 and v3 came: v2 is superseded, v3 holds every step
    assert started == writes == [1, 3] and ckpt.latest_checkpoint(tmp_path / "state")[1] == 3
    assert writer.saved_version == 3 and trainer._unsaved == []
    assert store.stats()["trained"] == 3 and not trainer._known
    writer.close()
    store.close()


async def test_a_failed_checkpoint_keeps_its_pairs_pending_until_a_later_one_lands(make_engine, tmp_path,
                                                                                   monkeypatch):
    import trainer.checkpoint as ckpt

    real_write, fail = ckpt.write_checkpoint, [True]

    def flaky_write(state, config_json, state_dir, version, keep=3):
        if fail[0]:
            raise OSError(28, "No space left on device")
        return real_write(state, config_json, state_dir, version, keep)

    monkeypatch.setattr(ckpt, "write_checkpoint", flaky_write)
    training, store = await _checkpointing_trainer(make_engine, tmp_path, 2)
    trainer, ex = training.trainer, training.executor
    while trainer.num_steps < 1:
        trainer.on_result(ex.run(trainer.next_chunk(1024)))
    await training.flush()
    assert training.checkpoints.failed_version == 1 and store.stats()["pending"] == 2
    fail[0] = False
    while trainer.has_work:
        trainer.on_result(ex.run(trainer.next_chunk(1024)))
    await training.flush()
    assert ckpt.latest_checkpoint(tmp_path / "state")[1] == 2 and store.stats()["trained"] == 2
    training.checkpoints.close()
    store.close()


@pytest.mark.parametrize("delay", [10.0, 0.0])
async def test_an_accumulation_steps_with_fewer_pairs_once_it_is_overdue(tmp_path, delay):
    """grad_accum 4: pairs a, b, c start training at t = 1, 5, 12 s. With a 10 s delay the third
    pair's chunk steps (11 s after the first began) on three pairs; the next accumulation starts
    afresh and steps when the queue runs dry. Without a delay, steps come at 4 pairs and at the end."""
    from tests.test_layer_cuts import _Tok

    store = FeedbackStore(tmp_path / "f.sqlite3")
    store.add([NewPair("p" * 5, "c" * 3, "r" * 4, id=i) for i in "abcdef"])
    trainer = Trainer(store, _Tok(), TrainingConfig(grad_accum=4, rank_window=0, max_step_delay_s=delay), None)
    await trainer.refill()
    trainer.offer(0.0)
    ref = trainer.next_chunk(10_000)
    assert ref.kind == "reference" and len(ref.pairs) == 6
    trainer.on_result(FinetuneResult(ref.task_id, "reference", ref_logprobs={i: (-1.0, -1.0) for i in "abcdef"}))
    steps = []
    for now in (1.0, 5.0, 12.0, 13.0, 14.0, 15.0):
        assert trainer.offer(now) is not None
        chunk = trainer.next_chunk(17)  # one pair (5 + 3 + 5 + 4 tokens)
        assert chunk.kind == "gradient" and len(chunk.pairs) == 1
        steps.append(chunk.step)
        trainer.on_result(FinetuneResult(chunk.task_id, "gradient", losses={chunk.pairs[0].pair_id: 0.6},
                                         stepped=True if chunk.step else None, adapter_version=trainer.adapter_version + chunk.step))
    if delay:
        assert steps == [False, False, True, False, False, True]
    else:
        assert steps == [False, False, False, True, False, True]
    assert trainer.num_pairs_stepped == 6 and trainer.num_steps == 2
    await trainer.flush()
    store.close()
