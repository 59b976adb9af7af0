"""Prefix sharing: outputs equal to computing everything, exact reuse and eviction order, and a
randomized check of the pool's invariants under allocate / share / free / evict."""

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cache.block_pool import BlockPool
from engine.sampling_params import SamplingParams
from scheduler.builder import generate
from tests.conftest import random_prompts

GREEDY = dict(temperature=0.0, ignore_eos=True)
BS = 16


def _run(core, runner, prompts, max_new, arrive_at):
    """Greedy outputs of requests joining at given iterations; checks integrity every step."""
    got = {}
    iteration = 0
    while iteration <= max(arrive_at) or core.has_work:
        for i, at in enumerate(arrive_at):
            if at == iteration:
                core.add_request(f"r{i}", prompts[i], SamplingParams(max_tokens=max_new, **GREEDY))
                got[f"r{i}"] = []
        for out in core.step(runner):
            got[out.request_id].extend(out.new_token_ids)
        core.check_integrity()
        iteration += 1
    return [got[f"r{i}"] for i in range(len(prompts))]


def _computed_prompt_tokens(core) -> int:
    return core.queues.num_prefix_query_tokens - core.queues.num_prefix_hit_tokens


@pytest.mark.parametrize("system_len", [32, 37, 48, 50, 100])  # block-aligned and not
@pytest.mark.parametrize("arrive_at", [[0, 0, 0, 0], [0, 40, 80, 120], [0, 1, 2, 60]])  # together, apart, mixed
def test_sharing_gives_the_same_tokens(make_engine, system_len, arrive_at):
    system = random_prompts([system_len], seed=1)[0]
    users = random_prompts([5, 23, 16, 40], seed=2)
    prompts = [system + u for u in users]
    outputs = {}
    for enabled in (False, True):
        core, runner = make_engine(enable_prefix_caching=enabled, max_num_batched_tokens=48)
        outputs[enabled] = _run(core, runner, prompts, 12, arrive_at)
        if enabled:
            hits = core.queues.num_prefix_hit_tokens
            if arrive_at[1] >= 40:  # the first request was done: every later one reuses the system prompt
                assert hits >= 3 * (system_len // BS) * BS
            assert core.pool.num_used_blocks == 0 and core.pool.num_cached_blocks > 0
    assert outputs[True] == outputs[False]


def test_a_repeated_prompt_reuses_all_but_its_last_token(make_engine):
    core, runner = make_engine()
    prompt = random_prompts([64], seed=3)[0]  # exactly 4 blocks
    first = generate(core, runner, [prompt], SamplingParams(max_tokens=8, **GREEDY))
    assert core.queues.num_prefix_hit_tokens == 0
    assert core.queues.num_cached_prefix_tokens(_waiting(core, prompt)) == 48
    second = generate(core, runner, [prompt], SamplingParams(max_tokens=8, **GREEDY))
    assert second == first
    # 3 of the 4 prompt blocks are reused: the last token has to be computed to sample
    assert core.queues.num_prefix_hit_tokens == 48
    core.check_integrity()


def _waiting(core, prompt):
    """A throwaway waiting sequence, for the read-only lookup."""
    seq = core.add_request("probe", prompt, SamplingParams(max_tokens=1))
    core.abort("probe")
    return seq


def test_generated_blocks_are_cached_too(make_engine):
    core, runner = make_engine()
    prompt = random_prompts([20], seed=4)[0]
    out = generate(core, runner, [prompt], SamplingParams(max_tokens=30, **GREEDY))[0]
    follow_up = prompt + out + random_prompts([7], seed=5)[0]  # a second chat turn
    generate(core, runner, [follow_up], SamplingParams(max_tokens=4, **GREEDY))
    assert core.queues.num_prefix_hit_tokens == (20 + 30 - 1) // BS * BS  # 3 full blocks


def test_prompt_logprobs_requests_skip_the_cache(make_engine):
    core, runner = make_engine()
    prompt = random_prompts([40], seed=6)[0]
    generate(core, runner, [prompt], SamplingParams(max_tokens=2, **GREEDY))
    core.add_request("score", prompt, SamplingParams(max_tokens=0, prompt_logprobs=0))
    outs = []
    while core.has_work:
        outs += core.step(runner)
    assert core.queues.num_prefix_hit_tokens == 0
    assert len(outs[-1].prompt_logprobs) == 40 and outs[-1].prompt_logprobs[0] is None


def test_eviction_is_lru_leaves_first_and_never_touches_held_blocks():
    pool = BlockPool(8, 2, enable_prefix_cache=True)
    root = pool.trie.root
    a = pool.allocate(3)  # a chain of 3 blocks: tokens 1..6
    pool.cache_full_blocks(root, [1, 2, 3, 4, 5, 6], a, 0, 3)
    b = pool.allocate(2)  # another chain of 2: tokens 7..10
    pool.cache_full_blocks(root, [7, 8, 9, 10], b, 0, 2)
    held = pool.allocate(2)  # a third holder, not cached, stays held throughout
    pool.free(a)  # cached now; freed tail first, so a[2] is the least recent
    pool.free(b)
    assert pool.num_free_blocks == 1 + 5 and pool.num_cached_blocks == 5 and pool.num_used_blocks == 2
    # A hit on b's first block makes it the most recent, but its child is still a leaf.
    assert [n.block for n in pool.match_prefix([7, 8, 9, 10], 2)] == b
    got = pool.allocate(4)  # 1 free + 3 evicted: a's chain, tail first
    assert got[0] not in a + b and got[1:] == [a[2], a[1], a[0]]
    assert pool.num_evictions == 3 and pool.match_prefix([1, 2], 1) == []
    pool.check_integrity([held, got])
    with_b = pool.allocate(2)  # b's chain: its leaf goes before its root
    assert with_b == [b[1], b[0]]
    assert pool.allocate(1) is None  # everything is held now; nothing changed
    pool.check_integrity([held, got, with_b])


def test_sharing_a_cached_block_revives_it():
    pool = BlockPool(4, 2, enable_prefix_cache=True)
    blocks = pool.allocate(2)
    pool.cache_full_blocks(pool.trie.root, [1, 2, 3, 4], blocks, 0, 2)
    pool.free(blocks)
    path = pool.match_prefix([1, 2, 3, 4, 5], 2)
    pool.share([n.block for n in path])
    assert pool.num_cached_blocks == 0 and pool.num_used_blocks == 2
    assert pool.allocate(3) is None
    pool.check_integrity([blocks])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["new", "hit", "free", "pressure", "prune"]), st.integers(0, 10**6)),
                max_size=60))
def test_random_operations_keep_the_pool_consistent(ops):
    pool = BlockPool(24, 2, enable_prefix_cache=True)
    holders: list[list[int]] = []
    num_offered: list[int] = []  # leading blocks of each holder offered to the cache
    for op, seed in ops:
        rng = random.Random(seed)
        if op in ("new", "hit"):
            # tokens from a tiny alphabet, so prefixes repeat and collide
            tokens = [rng.randrange(3) for _ in range(2 * rng.randint(1, 5))]
            path = pool.match_prefix(tokens, len(tokens) // 2) if op == "hit" else []
            shared = [n.block for n in path]
            pool.share(shared)
            fresh = pool.allocate(len(tokens) // 2 - len(shared))
            if fresh is None:
                pool.free(shared)
            else:
                table = shared + fresh
                node = path[-1] if path else pool.trie.root
                offered = rng.randint(len(shared), len(table))  # as a pruning sequence: a prefix only
                pool.cache_full_blocks(node, tokens[2 * len(shared) : 2 * offered], table, len(shared), offered)
                holders.append(table)
                num_offered.append(offered)
        elif op == "free" and holders:
            i = rng.randrange(len(holders))
            pool.free(holders.pop(i))
            num_offered.pop(i)
        elif op == "pressure":
            got = pool.allocate(rng.randint(1, 6))
            if got is not None:
                assert not any(b in t for t in holders for b in got), "a held block was handed out"
                holders.append(got)
                num_offered.append(0)
        elif op == "prune" and holders:
            # as the scheduler prunes: give back tail blocks past the part offered to the cache
            i = rng.randrange(len(holders))
            table = holders[i]
            cut = rng.randint(num_offered[i], len(table))
            assert all(b not in pool.trie and pool.ref_count(b) == 1 for b in table[cut:]), "pruning a shared block"
            pool.free(table[cut:])
            del table[cut:]
        pool.check_integrity(holders)
    for table in holders:
        pool.free(table)
    pool.check_integrity([])
    assert pool.num_used_blocks == 0
