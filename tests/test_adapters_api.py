"""The adapter a request chooses: the live one, the base model, a pinned version, one loaded at
run time; /v1/models lists them; load and unload with vLLM's routes; TGI's adapter_id."""

import asyncio

import aiohttp
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from engine.config import TrainingConfig
from tests.test_engine_greedy import reference
from trainer.feedback import FeedbackStore

TIMEOUT = aiohttp.ClientTimeout(total=120)
PROMPT = [5, 77, 301, 9, 1200, 45, 8, 610]
MAX_NEW = 10


async def _complete(http, url, model, prompt=PROMPT, max_tokens=MAX_NEW):
    """(status, body, headers) of a greedy /v1/completions of ``prompt`` (token ids) on ``model``."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True}
    async with http.post(f"{url}/v1/completions", json=body) as r:
        return r.status, await r.json(), r.headers


async def _text(http, url, model, prompt=PROMPT) -> str:
    status, body, _ = await _complete(http, url, model, prompt)
    assert status == 200, body
    return body["choices"][0]["text"]


async def _wait_version(http, url, version):
    for _ in range(1500):  # bounded: until the step is published
        async with http.get(f"{url}/v1/adapters") as r:
            info = await r.json()
        if info["serving"]["version"] >= version:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"version {version} was not published: {info}")


async def _feed(http, url, first, count):
    pairs = [{"prompt": f"Question {i}: can you help?", "chosen": " Yes, gladly.", "rejected": " No.", "id": f"p{i}"}
             for i in range(first, first + count)]
    async with http.post(f"{url}/v1/feedback", json={"pairs": pairs}) as r:
        assert r.status == 200, await r.text()


async def _model_ids(http, url) -> dict:
    async with http.get(f"{url}/v1/models") as r:
        return {m["id"]: (m["root"], m["parent"]) for m in (await r.json())["data"]}


async def test_base_live_and_pinned_versions(start_server, reference_models, demo_model_dir, tmp_path):
    torch.manual_seed(0)  # the adapters' LoRA A factors: the same in any test order
    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir)
    base_text = tokenizer.decode(reference(reference_models(demo_model_dir), PROMPT, MAX_NEW))
    store = FeedbackStore(tmp_path / "f.sqlite3")
    config = TrainingConfig(lr=2e-2, grad_accum=1, keep_versions=3, state_dir=str(tmp_path / "state"),
                            checkpoint_every=1)
    async with start_server(model_name="demo", feedback_store=store, trainer_config=config) as (url, engine), \
            aiohttp.ClientSession(timeout=TIMEOUT) as http:
        assert await _text(http, url, "demo:base") == base_text
        await _feed(http, url, 0, 2)
        await _wait_version(http, url, 2)
        live2 = await _text(http, url, "demo")
        status, pinned2, headers = await _complete(http, url, "demo@2")
        assert status == 200 and pinned2["model"] == "demo@2" and headers["x-adapter-version"] == "2"
        assert pinned2["choices"][0]["text"] == live2
        assert live2 != base_text  # two steps at this rate move the greedy tokens
        await _feed(http, url, 2, 3)
        await _wait_version(http, url, 5)
        assert await _text(http, url, "demo@2") == live2  # pinned: training went on, it did not move
        assert await _text(http, url, "demo:base") == base_text
        status, body, headers = await _complete(http, url, "demo")
        assert headers["x-adapter-version"] == "5" and body["model"] == "demo"
        # versions 3, 4, 5 are kept in memory (keep 3), 2 is loaded, the checkpoints on disk
        ids = await _model_ids(http, url)
        assert {"demo", "demo:base", "demo@2", "demo@5"} <= ids.keys()
        assert ids["demo"] == ("demo", None) and ids["demo:base"] == ("demo", "demo")
        status, body, _ = await _complete(http, url, "demo@99")
        assert status == 404 and body["error"]["param"] == "model" and "not kept" in body["error"]["message"]
        status, body, _ = await _complete(http, url, "nothing")
        assert status == 404 and body["error"]["param"] == "model"
        status, _, _ = await _complete(http, url, "demo@1")  # kept neither in memory nor on disk
        assert status == 404
        pinned4, live5 = await _text(http, url, "demo@4"), await _text(http, url, "demo")
        # pins loaded at once stay within --keep-versions (3): pinning 3 then 5 unloads 4, the least
        # recently asked for; 2 has left memory and disk, so it stays loaded (and keeps answering)
        assert await _text(http, url, "demo@3") and await _text(http, url, "demo@5")
        peft_config = engine.training.executor.model.peft_config
        assert sorted(n for n in peft_config if n.startswith("pinned")) == ["pinned2", "pinned3", "pinned5"]
        assert await _text(http, url, "demo@2") == live2
        assert await _text(http, url, "demo@4") == pinned4  # loads again, the same weights
    # after a restart, the versions on disk are there to pin
    store = FeedbackStore(tmp_path / "f.sqlite3")
    async with start_server(model_name="demo", feedback_store=store, trainer_config=config) as (url, engine), \
            aiohttp.ClientSession(timeout=TIMEOUT) as http:
        assert await _text(http, url, "demo") == live5
        status, body, headers = await _complete(http, url, "demo@4")
        assert status == 200 and headers["x-adapter-version"] == "4" and body["choices"][0]["text"] == pinned4
        assert {"demo@3", "demo@4", "demo@5"} <= (await _model_ids(http, url)).keys()


def _save_adapter(demo_model_dir, path, targets, seed) -> str:
    model = AutoModelForCausalLM.from_pretrained(demo_model_dir)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=list(targets)))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    peft_model.save_pretrained(path)
    return str(path)


async def test_adapters_loaded_at_run_time(start_server, demo_model_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir)
    good = _save_adapter(demo_model_dir, tmp_path / "good", ("q_proj", "v_proj"), 1)
    other = _save_adapter(demo_model_dir, tmp_path / "other", ("k_proj", "o_proj"), 2)
    mlp = _save_adapter(demo_model_dir, tmp_path / "mlp", ("gate_proj",), 3)
    expected = {}
    for name, path in (("good", good), ("other", other)):
        ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(demo_model_dir, attn_implementation="sdpa"),
                                        path).eval()
        expected[name] = tokenizer.decode(reference(ref, PROMPT, MAX_NEW))
    store = FeedbackStore(tmp_path / "f.sqlite3")
    async with start_server(model_name="demo", feedback_store=store, trainer_config=TrainingConfig()) as (url, engine), \
            aiohttp.ClientSession(timeout=TIMEOUT) as http:
        for name, path in (("good", good), ("other", other)):
            async with http.post(f"{url}/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path}) as r:
                assert r.status == 200, await r.text()
        ids = await _model_ids(http, url)
        assert ids["good"] == (str((tmp_path / "good").resolve()), "demo")
        # four models at once, in the same iterations: each answers as it does alone
        texts = await asyncio.gather(*(_text(http, url, m) for m in ("good", "demo:base", "other", "demo", "good")))
        assert texts[0] == texts[4] == expected["good"] and texts[2] == expected["other"]
        assert texts[3] == texts[1]  # the live adapter has not stepped: LoRA B is zero
        async with http.post(f"{url}/generate", json={"inputs": "Hello there", "parameters": {
                "adapter_id": "other", "max_new_tokens": 6}}) as r:
            tgi = await r.json()
        assert r.status == 200
        status, body, _ = await _complete(http, url, "other", tokenizer.encode("Hello there"), max_tokens=6)
        assert tgi["generated_text"] == body["choices"][0]["text"]  # TGI's route takes the adapter too
        async with http.post(f"{url}/generate", json={"inputs": "Hi", "parameters": {"adapter_id": "nope"}}) as r:
            assert r.status == 404 and "adapter_id" in (await r.json())["error"]

        bad = [({"lora_name": "x", "lora_path": str(tmp_path / "missing")}, 400, "lora_path"),
               ({"lora_name": "x", "lora_path": mlp}, 400, "lora_path"),  # a layer the served adapter leaves
               ({"lora_name": "good", "lora_path": good}, 400, "lora_name"),  # loaded already
               ({"lora_name": "demo", "lora_path": good}, 400, "lora_name"),
               ({"lora_name": "x"}, 400, "lora_path")]
        for body, status, param in bad:
            async with http.post(f"{url}/v1/load_lora_adapter", json=body) as r:
                answer = await r.json()
                assert r.status == status and answer["error"]["param"] == param, answer
        assert "x" not in await _model_ids(http, url)
        assert await _text(http, url, "good") == expected["good"]  # failed loads changed nothing

        async with http.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "good"}) as r:
            assert r.status == 200
        async with http.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "good"}) as r:
            assert r.status == 404 and (await r.json())["error"]["param"] == "lora_name"
        status, body, _ = await _complete(http, url, "good")
        assert status == 404
        assert await _text(http, url, "other") == expected["other"]
        engine.core.check_integrity()


async def _adapters_info(http, url) -> dict:
    async with http.get(f"{url}/v1/adapters") as r:
        return await r.json()


async def test_rollback_serves_and_trains_from_a_kept_version(start_server, tmp_path):
    torch.manual_seed(0)  # the adapters' LoRA A factors: the same in any test order
    state_dir = tmp_path / "state"
    config = TrainingConfig(lr=2e-2, grad_accum=1, keep_versions=4, state_dir=str(state_dir), checkpoint_every=1)
    store = FeedbackStore(tmp_path / "f.sqlite3")
    async with start_server(model_name="demo", feedback_store=store, trainer_config=config) as (url, engine), \
            aiohttp.ClientSession(timeout=TIMEOUT) as http:
        await _feed(http, url, 0, 3)
        await _wait_version(http, url, 3)
        text1, text3 = await _text(http, url, "demo@1"), await _text(http, url, "demo")
        assert text1 != text3
        async with http.post(f"{url}/v1/adapters/rollback", json={"version": 1}) as r:
            assert r.status == 200 and await r.json() == {"version": 1, "next_version": 4}
        status, body, headers = await _complete(http, url, "demo")
        assert headers["x-adapter-version"] == "1" and body["choices"][0]["text"] == text1
        assert (await _adapters_info(http, url))["serving"]["version"] == 1
        executor = engine.training.executor
        kept = executor.kept(1)
        live = executor.snapshot()
        assert kept.keys() == live.keys() and all(torch.equal(kept[k], live[k]) for k in kept)
        for serving, trainable in executor._publish:  # the trainable adapter starts from v1's weights too
            assert torch.equal(serving, trainable)
        async with http.post(f"{url}/v1/adapters/rollback", json={"version": 99}) as r:
            body = await r.json()
            assert r.status == 404 and body["error"]["param"] == "version"
        async with http.post(f"{url}/v1/adapters/rollback", json={"version": "one"}) as r:
            assert r.status == 400 and (await r.json())["error"]["param"] == "version"
    # the rollback is what a restart resumes
    store = FeedbackStore(tmp_path / "f.sqlite3")
    async with start_server(model_name="demo", feedback_store=store, trainer_config=config) as (url, engine), \
            aiohttp.ClientSession(timeout=TIMEOUT) as http:
        info = await _adapters_info(http, url)
        assert info["serving"]["version"] == 1 and await _text(http, url, "demo") == text1
        await _feed(http, url, 3, 1)
        await _wait_version(http, url, 4)  # above every number used before (3), built on v1
        assert (await _adapters_info(http, url))["serving"]["version"] == 4
        assert await _text(http, url, "demo@3") == text3  # 3 still names the weights it named
        # paused, feedback is stored and nothing trains
        async with http.post(f"{url}/v1/adapters/training", json={"enabled": False}) as r:
            assert r.status == 200 and await r.json() == {"training_enabled": False}
        await _feed(http, url, 4, 1)
        for _ in range(20):  # a few iterations' worth of time
            await _text(http, url, "demo")
        info = await _adapters_info(http, url)
        assert info["serving"]["version"] == 4 and info["training_enabled"] is False
        assert store.stats()["received"] == 5
        async with http.post(f"{url}/v1/adapters/training", json={"enabled": True}) as r:
            assert r.status == 200
        await _wait_version(http, url, 5)


async def test_sigkill_during_a_rollback_or_a_load_restarts_cleanly(demo_model_dir, tmp_path):
    import signal

    from tests.conftest import spawn_server, stop_spawned, wait_ready

    adapter = _save_adapter(demo_model_dir, tmp_path / "lora", ("q_proj",), 4)
    state_dir = tmp_path / "state"

    def start():
        return spawn_server(demo_model_dir, "--state-dir", str(state_dir), "--grad-accum", "1",
                            "--checkpoint-every", "1", "--learning-rate", "1e-2", "--served-model-name", "demo")

    async def version(http, url) -> int:
        return (await _adapters_info(http, url))["serving"]["version"]

    proc, url = start()
    try:
        async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
            await wait_ready(http, url)
            await _feed(http, url, 0, 3)  # acknowledged
            await _wait_version(http, url, 3)
            for _ in range(500):  # bounded: until version 3's checkpoint is on disk (the pairs are trained)
                async with http.get(f"{url}/v1/feedback/stats") as r:
                    if (await r.json())["trained"] == 3:
                        break
                await asyncio.sleep(0.02)
            # killed with the rollback in flight: either state is a clean one
            rollback = asyncio.ensure_future(http.post(f"{url}/v1/adapters/rollback", json={"version": 1}))
            load = asyncio.ensure_future(http.post(f"{url}/v1/load_lora_adapter",
                                                   json={"lora_name": "x", "lora_path": adapter}))
            await asyncio.sleep(0.01)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
            for task in (rollback, load):
                try:
                    (await task).close()
                except aiohttp.ClientError:
                    pass
        proc, url = start()
        async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
            await wait_ready(http, url)
            assert await version(http, url) in (1, 3)
            assert "x" not in await _model_ids(http, url)  # adapters loaded at run time do not persist
            # acknowledged, then killed: the rollback is what the restart serves
            async with http.post(f"{url}/v1/adapters/rollback", json={"version": 2}) as r:
                assert r.status == 200
            text2 = await _text(http, url, "demo")
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        proc, url = start()
        async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
            await wait_ready(http, url)
            assert await version(http, url) == 2 and await _text(http, url, "demo") == text2
            await _feed(http, url, 3, 1)
            await _wait_version(http, url, 4)
            async with http.get(f"{url}/v1/feedback/stats") as r:
                assert (await r.json())["received"] == 4  # nothing acknowledged was lost
    finally:
        stop_spawned(proc)
