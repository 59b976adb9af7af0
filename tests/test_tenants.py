"""An aligned adapter per tenant: each tenant's feedback trains its own adapter, which serves its
requests; a tenant cannot see, select or train another's; both train under a shared load."""

import asyncio

import aiohttp
import pytest
import torch

from clients import AsyncClient
from clients.sdk import APIError
from engine.config import TrainingConfig
from tests.test_adapters_api import _save_adapter
from trainer.feedback import FeedbackStore
from trainer.tenants import TrainerGroup, read_tenants

KEYS = {"key-alice": "alice", "key-bob": "bob"}
YES, NO = " Yes, gladly.", " No."
HELD_OUT = "Question 99: can you help me?"  # the pairs' form, a prompt none of them has


def test_the_tenants_file_is_checked_line_by_line(tmp_path):
    path = tmp_path / "tenants"
    path.write_text("# key tenant\nk1 alice\n\nk2 bob-2\n")
    assert read_tenants(path) == {"k1": "alice", "k2": "bob-2"}
    for bad, where in (("k1 alice\nk1 bob\n", ":2:"), ("k1 al.ice\n", ":1:"), ("k1\n", ":1:")):
        path.write_text(bad)
        with pytest.raises(ValueError, match=where):
            read_tenants(path)


def test_the_offer_goes_to_the_highest_loss_and_waiting_counts():
    from engine.plan import FinetuneOffer

    class Stub:
        def __init__(self, loss, wait_s):
            self.loss, self.wait_s = loss, wait_s

        def offer(self, now):
            return FinetuneOffer(10, 20, self.loss, self.wait_s)

    a, b = Stub(0.7, 0.0), Stub(0.2, 0.0)
    group = TrainerGroup({"a": a, "b": b})
    assert group.offer(0.0).loss == 0.7
    b.wait_s = 6.0  # 0.2 + 0.6 > 0.7: the low-loss tenant's turn comes
    assert group.offer(0.0).loss == 0.2


async def _margin(engine, tenant: str) -> float:
    """logp(YES) - logp(NO) after the held-out prompt under the tenant's serving adapter, each
    response tokenized as its training pairs are (its end token included): the quantity DPO
    moves. Run on the worker, between iterations, where the executor may switch adapters."""
    from tests.test_trainer_loop import _Stored

    training = engine.core.tenants[tenant]
    executor, pair = training.executor, training.trainer._tokenize(_Stored(HELD_OUT))

    def margin() -> float:
        with torch.no_grad(), executor._serving_active():
            chosen, rejected = executor._logprobs([pair])
        return (chosen - rejected).item()

    return await engine.run_on_worker(margin)


async def _version(client: AsyncClient) -> int:
    return (await client.adapters())["serving"]["version"]


def _pairs(first: int, count: int, prefer_yes: bool) -> list[dict]:
    chosen, rejected = (YES, NO) if prefer_yes else (NO, YES)
    return [{"prompt": f"Question {i}: can you help me?", "chosen": chosen, "rejected": rejected, "id": f"q{i}"}
            for i in range(first, first + count)]


async def _post(http, url, key, pairs):
    async with http.post(f"{url}/v1/feedback", json={"pairs": pairs}, headers={"Authorization": f"Bearer {key}"}) as r:
        assert r.status == 200, await r.text()


async def test_each_tenant_trains_its_own_adapter_toward_its_own_taste(start_server, demo_model_dir, tmp_path):
    # the adapters' LoRA A factors are drawn from torch's global generator: the same in any test order
    torch.manual_seed(0)
    config = TrainingConfig(lr=5e-3, grad_accum=2, state_dir=str(tmp_path / "state"), max_step_delay_s=1.0)
    (tmp_path / "state").mkdir()
    store = FeedbackStore(tmp_path / "state" / "feedback.sqlite3")
    lora = _save_adapter(demo_model_dir, tmp_path / "lora", ("q_proj",), 5)
    async with start_server(model_name="demo", feedback_store=store, trainer_config=config, tenant_keys=KEYS,
                            api_key="operator") as (url, engine), \
            AsyncClient(url, api_key="key-alice") as alice, AsyncClient(url, api_key="key-bob") as bob, \
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:
        base = await _margin(engine, "alice")
        assert await _margin(engine, "bob") == pytest.approx(base, abs=1e-5)  # both adapters start at the base
        async with AsyncClient(url, api_key="nobody") as nobody:
            with pytest.raises(APIError) as err:
                await nobody.adapters()
        assert err.value.status == 401
        tenants = engine.core.tenants
        bob_before = tenants["bob"].executor.snapshot()
        default_before = engine.training.executor.snapshot()

        # alice trains; bob's weights and the default adapter's do not move by a bit
        await _post(http, url, "key-alice", _pairs(0, 4, prefer_yes=True))
        for _ in range(1500):  # bounded: until alice's second step
            if await _version(alice) >= 2:
                break
            await asyncio.sleep(0.02)
        assert await _version(alice) >= 2 and await _version(bob) == 0
        for before, now in ((bob_before, tenants["bob"].executor.snapshot()),
                            (default_before, engine.training.executor.snapshot())):
            assert all(torch.equal(before[k], now[k]) for k in before)
        assert (await alice.feedback_stats()).received == 4 and (await bob.feedback_stats()).received == 0
        async with AsyncClient(url, api_key="operator") as operator:  # the default adapter's
            assert (await operator.feedback_stats()).received == 0 and await _version(operator) == 0

        # what is alice's is invisible to bob
        async with http.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "mine", "lora_path": lora},
                             headers={"Authorization": "Bearer key-alice"}) as r:
            assert r.status == 200
        assert "mine" in {m.id for m in (await alice.models()).data}
        assert "mine" not in {m.id for m in (await bob.models()).data}
        for model in ("mine", "demo@2"):
            with pytest.raises(APIError) as err:
                await bob.complete("Hi", model=model, max_tokens=2)
            assert err.value.status == 404 and err.value.param == "model"
        assert (await alice.complete("Hi", model="demo@2", max_tokens=2)).choices
        async with http.post(f"{url}/v1/adapters/rollback", json={"version": 1},
                             headers={"Authorization": "Bearer key-bob"}) as r:
            assert r.status == 404  # bob has no version 1

        # both train at once under a load of both tenants' chats: both make progress
        alice_at = await _version(alice)
        await asyncio.gather(_post(http, url, "key-alice", _pairs(4, 4, prefer_yes=True)),
                             _post(http, url, "key-bob", _pairs(100, 8, prefer_yes=False)))

        async def load(client):
            for _ in range(6):
                await client.chat([{"role": "user", "content": "Tell me something."}], max_tokens=12)

        deadline = asyncio.get_running_loop().time() + 90
        while asyncio.get_running_loop().time() < deadline:
            await asyncio.gather(load(alice), load(bob))
            if await _version(alice) >= alice_at + 2 and await _version(bob) >= 4:
                break
        assert await _version(alice) >= alice_at + 2 and await _version(bob) >= 4
        alice_margin, bob_margin = await _margin(engine, "alice"), await _margin(engine, "bob")
        assert alice_margin > base + 0.5  # toward " Yes"
        assert bob_margin < base - 0.5  # toward " No"
        async with http.post(f"{url}/v1/completions", json={"model": "demo", "prompt": "Hi", "max_tokens": 2},
                             headers={"Authorization": "Bearer key-bob"}) as r:
            assert r.headers["x-adapter-version"] == str(await _version(bob))
        async with http.get(f"{url}/metrics", headers={"Authorization": "Bearer operator"}) as r:
            metrics = await r.text()
        bob_version = await _version(bob)
        assert f'mace_tenant_adapter_version{{tenant="bob"}} {float(bob_version)}' in metrics
        assert "mace_adapter_version 0.0" in metrics  # the default adapter never trained
