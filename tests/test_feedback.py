"""The feedback store (durable, deduplicated, at-least-once) and its routes (validated, all or
nothing, answered after the commit)."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import aiohttp
import pytest
from transformers import AutoTokenizer

from trainer.feedback import FeedbackStore, NewPair

TIMEOUT = aiohttp.ClientTimeout(total=60)
JSON = {"Content-Type": "application/json"}
REPO = Path(__file__).resolve().parents[1]


def make_pair(i: int, id: str | None = None) -> NewPair:
    return NewPair(prompt=f"prompt {i}", chosen=f"good {i}", rejected=f"bad {i}", id=id)


@pytest.fixture
def store(tmp_path):
    s = FeedbackStore(tmp_path / "f.sqlite3")
    yield s
    s.close()


# -- the store ----------------------------------------------------------------------------------


def test_add_dedupes_by_id(store):
    out = store.add([make_pair(0, "a"), make_pair(1), make_pair(2, "a")])
    assert out[0] == ("a", True) and out[2] == ("a", False)
    assert out[1][1] is True and len(out[1][0]) == 32 and out[1][0] != "a"  # a uuid4 hex
    assert store.add([make_pair(3, "a"), make_pair(4, "b")]) == [("a", False), ("b", True)]
    kept = store.get("a")
    assert (kept.prompt, kept.chosen, kept.rejected, kept.state, kept.attempts) == ("prompt 0", "good 0", "bad 0", "pending", 0)
    assert kept.ref_chosen is None and kept.last_loss is None and not kept.has_reference
    assert store.stats() == {"received": 3, "trained": 0, "pending": 3, "set_aside": 0}
    assert store.get("missing") is None


def test_pending_is_oldest_first_and_skips_excluded(store):
    store.add([make_pair(0, "p0"), make_pair(1, "p1")])
    store.add([make_pair(2, "p2")])
    store.add([make_pair(3, "p3"), make_pair(4, "p4")])
    assert [p.id for p in store.pending(10)] == ["p0", "p1", "p2", "p3", "p4"]
    assert [p.id for p in store.pending(2)] == ["p0", "p1"]
    assert [p.id for p in store.pending(2, exclude={"p0", "p2"})] == ["p1", "p3"]
    assert store.pending(0) == []


def test_training_bookkeeping_and_stats(store):
    store.add([make_pair(i, f"p{i}") for i in range(4)])
    store.set_reference("p0", -12.5, -20.25)
    assert store.record_attempt("p0", 0.69) == 1
    assert store.record_attempt("p0", 0.5) == 2
    assert store.record_attempt("p1", float("nan")) == 1
    assert store.record_attempt("nope", 1.0) == 0
    p0, p1 = store.get("p0"), store.get("p1")
    assert (p0.ref_chosen, p0.ref_rejected, p0.attempts, p0.last_loss) == (-12.5, -20.25, 2, 0.5)
    assert p0.has_reference and p1.last_loss is None  # SQLite keeps NaN as NULL

    assert store.mark_trained(["p0", "p2", "nope"]) == 2
    assert store.set_aside("p1") is True
    assert store.set_aside("p0") is False  # trained pairs stay trained
    assert store.mark_trained(["p1"]) == 0  # and set-aside ones stay set aside
    assert [p.id for p in store.pending(10)] == ["p3"]
    assert store.stats() == {"received": 4, "trained": 2, "pending": 1, "set_aside": 1}


def test_reopen_after_close_keeps_everything(tmp_path):
    path = tmp_path / "f.sqlite3"
    first = FeedbackStore(path)
    first.add([make_pair(i, f"p{i}") for i in range(3)])
    first.set_reference("p1", -1.0, -2.0)
    first.record_attempt("p1", 0.25)
    first.mark_trained(["p0"])
    before = [first.get(f"p{i}") for i in range(3)]
    first.close()
    first.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        first.stats()

    again = FeedbackStore(path)
    try:
        assert [again.get(f"p{i}") for i in range(3)] == before
        assert [p.id for p in again.pending(10)] == ["p1", "p2"]  # not trained yet: back again
        assert again.stats() == {"received": 3, "trained": 1, "pending": 2, "set_aside": 0}
    finally:
        again.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_acknowledged_pair_survives_a_killed_process(tmp_path):
    path = tmp_path / "f.sqlite3"
    code = textwrap.dedent(f"""
        import os
        from trainer.feedback import FeedbackStore, NewPair
        store = FeedbackStore({str(path)!r})
        print(store.add([NewPair("why?", "because", "no", id="acked")]), flush=True)
        os._exit(1)  # no close, no cleanup
    """)
    proc = subprocess.run([sys.executable, "-c", code], check=False, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout.strip() == "[('acked', True)]"
    store = FeedbackStore(path)
    try:
        pair = store.get("acked")
        assert (pair.prompt, pair.chosen, pair.rejected, pair.state) == ("why?", "because", "no", "pending")
        assert [p.id for p in store.pending(10)] == ["acked"]
    finally:
        store.close()


async def test_store_is_usable_from_other_threads(store):
    results = await asyncio.gather(*(asyncio.to_thread(store.add, [make_pair(i, f"t{i}")]) for i in range(8)))
    assert sorted(r[0] for r in results) == sorted([(f"t{i}", True) for i in range(8)])
    assert (await asyncio.to_thread(store.stats))["received"] == 8


# -- the routes ---------------------------------------------------------------------------------


async def _post(http, url, body):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with http.post(f"{url}/v1/feedback", data=raw, headers=JSON) as r:
        return r.status, await r.json()


async def test_post_single_and_batch_then_stats(start_server, tmp_path):
    store = FeedbackStore(tmp_path / "f.sqlite3")
    async with start_server(feedback_store=store) as (url, _), aiohttp.ClientSession(timeout=TIMEOUT) as http:
        status, body = await _post(http, url, {"prompt": "2+2=", "chosen": "4", "rejected": "5", "id": "one"})
        assert (status, body) == (200, {"ids": ["one"], "stored": 1, "duplicates": 0})
        status, body = await _post(http, url, {"pairs": [
            {"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."},
            {"prompt": "Sky?", "chosen": "Blue.", "rejected": "Green.", "id": "two"},
        ]})
        assert status == 200 and body["stored"] == 2 and body["duplicates"] == 0
        assert len(body["ids"][0]) == 32 and body["ids"][1] == "two"
        pairs = store.pending(10)
        assert [(p.id, p.prompt, p.chosen, p.rejected) for p in pairs] == [
            ("one", "2+2=", "4", "5"), (body["ids"][0], "Hi", "Hello!", "Go away."), ("two", "Sky?", "Blue.", "Green."),
        ]
        store.mark_trained(["one"])
        async with http.get(f"{url}/v1/feedback/stats") as r:
            assert r.status == 200
            assert await r.json() == {"received": 3, "trained": 1, "pending": 2, "set_aside": 0}
    with pytest.raises(RuntimeError, match="closed"):  # the app closed it on cleanup
        store.stats()


async def test_messages_are_stored_as_the_rendered_chat_template(start_server, tmp_path, demo_model_dir):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    parts = [{"role": "user", "content": [{"type": "text", "text": "Name "}, {"type": "text", "text": "a colour."}]}]
    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir)
    store = FeedbackStore(tmp_path / "f.sqlite3")
    async with start_server(feedback_store=store) as (url, _), aiohttp.ClientSession(timeout=TIMEOUT) as http:
        status, _ = await _post(http, url, {"messages": messages, "chosen": "Red.", "rejected": "Colours are a "
                                            "social construct.", "id": "m1"})
        assert status == 200
        status, _ = await _post(http, url, {"pairs": [{"messages": parts, "chosen": "Red.", "rejected": "No.", "id": "m2"}]})
        assert status == 200
        assert store.get("m1").prompt == tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert store.get("m2").prompt == "<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n"
        assert store.get("m1").is_chat and store.get("m2").is_chat
        status, _ = await _post(http, url, {"prompt": "Name a colour:", "chosen": "Red.", "rejected": "No.", "id": "t"})
        assert status == 200 and not store.get("t").is_chat  # encoded with the tokenizer's own special tokens


async def test_duplicate_ids_are_counted_not_stored_twice(start_server, tmp_path):
    store = FeedbackStore(tmp_path / "f.sqlite3")
    pair = {"prompt": "Q", "chosen": "A", "rejected": "B", "id": "dup"}
    async with start_server(feedback_store=store) as (url, _), aiohttp.ClientSession(timeout=TIMEOUT) as http:
        assert await _post(http, url, pair) == (200, {"ids": ["dup"], "stored": 1, "duplicates": 0})
        assert await _post(http, url, {**pair, "chosen": "changed"}) == (200, {"ids": ["dup"], "stored": 0, "duplicates": 1})
        status, body = await _post(http, url, {"pairs": [{**pair, "id": "new"}, pair, {**pair, "id": "new"}]})
        assert (status, body) == (200, {"ids": ["new", "dup", "new"], "stored": 1, "duplicates": 2})
        assert store.get("dup").chosen == "A"
        assert store.stats()["received"] == 2


def _good(i: int) -> dict:
    return {"prompt": f"q{i}", "chosen": "yes", "rejected": "no", "id": f"good{i}"}


LONG = {"prompt": "hello " * 40, "chosen": "world " * 40, "rejected": "no"}
MSG = [{"role": "user", "content": "hi"}]
# (body, param, code or None, substring of the message); the server's context is 64 tokens
BAD_BODIES = [
    (b"{not json", None, None, "malformed JSON"),
    ({"prompt": "", "chosen": "a", "rejected": "b"}, "prompt", None, "must not be empty"),
    ({"prompt": " \n\t", "chosen": "a", "rejected": "b"}, "prompt", None, "must not be empty"),
    ({"prompt": "q", "chosen": "  ", "rejected": "b"}, "chosen", None, "must not be empty"),
    ({"prompt": "q", "chosen": "a", "rejected": ""}, "rejected", None, "must not be empty"),
    ({"prompt": "q", "rejected": "b"}, "chosen", None, "required"),
    ({"prompt": "q", "chosen": "a"}, "rejected", None, "required"),
    ({"prompt": "q", "chosen": 5, "rejected": "b"}, "chosen", None, "Expected `str"),
    ({"prompt": "q", "chosen": "same", "rejected": "same"}, "rejected", None, "the same response"),
    ({"prompt": "q", "messages": MSG, "chosen": "a", "rejected": "b"}, "prompt", None, "exactly one of"),
    ({"chosen": "a", "rejected": "b"}, "prompt", None, "exactly one of"),
    ({"messages": [], "chosen": "a", "rejected": "b"}, "messages", None, "must not be empty"),
    ({"messages": [{"role": "wizard", "content": "hi"}], "chosen": "a", "rejected": "b"},
     "messages[0].role", None, "unknown role"),
    ({**_good(0), "id": "x" * 129}, "id", None, "1 to 128"),
    ({**_good(0), "id": ""}, "id", None, "1 to 128"),
    (LONG, "chosen", "context_length_exceeded", "exceeds the context of 64 tokens"),
    ({"pairs": []}, "pairs", None, "1 to 256"),
    ({"pairs": [_good(i) for i in range(257)]}, "pairs", None, "1 to 256"),
    ({"pairs": [_good(0)], "prompt": "q"}, "prompt", None, "not both"),
    ({"pairs": [_good(0), _good(1), _good(2), {**_good(3), "chosen": ""}]}, "pairs[3].chosen", None, "must not be empty"),
    ({"pairs": [_good(0), {"prompt": "q", "chosen": "a"}]}, "pairs[1].rejected", None, "required"),
    ({"pairs": [_good(0), {**_good(1), "rejected": 1}]}, "pairs[1].rejected", None, "Expected `str"),
    ({"pairs": [_good(0), {**_good(1), "id": "y" * 200}]}, "pairs[1].id", None, "1 to 128"),
    ({"pairs": [{**_good(0), "prompt": None, "messages": [{"role": "x", "content": "hi"}]}]},
     "pairs[0].messages[0].role", None, "unknown role"),
    ({"pairs": [_good(0), _good(1), {**LONG, "chosen": "no", "rejected": "world " * 40}]},
     "pairs[2].rejected", "context_length_exceeded", "exceeds the context"),
]


async def test_bad_bodies_get_400_naming_the_field_and_store_nothing(start_server, tmp_path):
    store = FeedbackStore(tmp_path / "f.sqlite3")
    async with start_server(engine_overrides={"max_model_len": 64}, feedback_store=store) as (url, _), \
            aiohttp.ClientSession(timeout=TIMEOUT) as http:
        for body, param, code, needle in BAD_BODIES:
            status, answer = await _post(http, url, body)
            err = answer["error"]
            assert (status, err["param"], err["code"]) == (400, param, code), (body, answer)
            assert needle in err["message"] and err["type"] == "invalid_request_error", (body, answer)
        assert store.stats()["received"] == 0
        assert (await _post(http, url, _good(0)))[0] == 200  # still takes good ones


async def test_context_limit_is_prompt_plus_longer_response(start_server, tmp_path, demo_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir)
    prompt, chosen = "Tell me a story about a cat.", "Once upon a time a cat sat on a mat and slept."
    max_len = len(tokenizer.encode(prompt)) + len(tokenizer.encode(chosen, add_special_tokens=False))
    store = FeedbackStore(tmp_path / "f.sqlite3")
    async with start_server(engine_overrides={"max_model_len": max_len}, feedback_store=store) as (url, _), \
            aiohttp.ClientSession(timeout=TIMEOUT) as http:
        assert (await _post(http, url, {"prompt": prompt, "chosen": chosen, "rejected": "No."}))[0] == 200
        status, answer = await _post(http, url, {"prompt": prompt, "chosen": "No.", "rejected": chosen + " The end."})
        assert (status, answer["error"]["param"], answer["error"]["code"]) == (400, "rejected", "context_length_exceeded")
        assert store.stats()["received"] == 1


async def test_feedback_routes_answer_503_without_a_store(start_server):
    async with start_server() as (url, _), aiohttp.ClientSession(timeout=TIMEOUT) as http:
        for method, path in (("POST", "/v1/feedback"), ("GET", "/v1/feedback/stats")):
            kwargs = {"json": _good(0)} if method == "POST" else {}
            async with http.request(method, url + path, **kwargs) as r:
                assert r.status == 503
                err = (await r.json())["error"]
                assert err["code"] == "feedback_unavailable" and "--state-dir" in err["message"]
