"""KV pruning: the window policy equals attention masked to the same tokens, compaction moves
exactly the chosen entries, memory stays within the budget, and shared blocks are never edited."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from cache.pruning import PruningPolicy
from engine.plan import KvPrune
from engine.sampling_params import SamplingParams
from scheduler.builder import generate
from tests.conftest import random_prompts

GREEDY = dict(temperature=0.0, ignore_eos=True)
BS = 16


def _run_recording(core, runner, prompt, max_new):
    """Greedy generation inline, recording each iteration's plan."""
    core.add_request("r", prompt, SamplingParams(max_tokens=max_new, **GREEDY))
    tokens, plans, peak_blocks = [], [], 0
    while core.has_work:
        plan = core.schedule()
        plans.append(plan)
        for out in core.process_result(runner.execute(plan)):
            tokens.extend(out.new_token_ids)
        seq = core.sequences.get("r")
        if seq is not None:
            peak_blocks = max(peak_blocks, len(seq.block_table))
            core.check_integrity()
    return tokens, plans, peak_blocks


@pytest.mark.parametrize("decode_attention", ["auto", "sdpa"])
def test_window_pruning_equals_attention_masked_to_the_kept_tokens(make_engine, reference_models, demo_model_dir,
                                                                    decode_attention):
    core, runner = make_engine(kv_prune="window", kv_budget=40, kv_sink_tokens=4, enable_prefix_caching=False,
                               decode_attention=decode_attention)
    prompt = random_prompts([30], seed=11)[0]
    tokens, plans, _ = _run_recording(core, runner, prompt, 90)
    assert core.queues.num_pruned_tokens > 0
    # Replay which token positions each decode could see, from the plans' prune ops.
    kv = list(range(len(prompt)))  # position held by each KV entry
    visible = {}  # query position -> positions it attends to
    for plan in plans:
        for op in plan.kv_prunes:
            private = kv[op.private_start:]
            keep = list(range(op.num_sinks)) + list(range(len(private) - op.num_recent, len(private)))
            kv = kv[: op.private_start] + [private[i] for i in keep]
        for c in plan.chunks:
            if c.start_pos >= len(prompt):  # a decode
                kv.append(c.start_pos)
                visible[c.start_pos] = list(kv)
    full = prompt + tokens
    n = len(full) - 1  # the last token is never fed back
    mask = torch.ones(n, n, dtype=torch.bool).tril()
    for pos, seen in visible.items():
        mask[pos] = False
        mask[pos, seen] = True
    model = reference_models(demo_model_dir)
    with torch.no_grad():
        logits = model(torch.tensor([full[:n]]), attention_mask=mask[None, None]).logits[0]
    expected = logits.argmax(-1)[len(prompt) - 1 :].tolist()
    assert tokens == expected


def test_unpruned_when_the_budget_is_never_reached(make_engine):
    prompts = random_prompts([20, 45], seed=12)
    params = SamplingParams(max_tokens=30, **GREEDY)
    core, runner = make_engine(kv_prune="heavy-hitter", kv_budget=200)
    pruned = generate(core, runner, prompts, params)
    core2, runner2 = make_engine()
    assert pruned == generate(core2, runner2, prompts, params)
    assert core.queues.num_pruned_tokens == 0


@pytest.mark.parametrize("policy", ["window", "heavy-hitter"])
@pytest.mark.parametrize("budget", [0.5, 0.25, 64])
def test_a_long_generation_stays_within_its_budget(make_engine, policy, budget):
    core, runner = make_engine(kv_prune=policy, kv_budget=budget, max_model_len=1024)
    prompt = random_prompts([40], seed=13)[0]
    max_new = 400
    tokens, plans, peak_blocks = _run_recording(core, runner, prompt, max_new)
    assert len(tokens) == max_new
    policy_ = PruningPolicy(policy, budget, BS)
    # at most the budget at the longest, one block of slack, and the entry being written
    assert peak_blocks <= -(-(policy_.budget_tokens(len(prompt) + max_new) + BS + 1) // BS)
    assert peak_blocks < -(-(len(prompt) + max_new) // BS) * (0.75 if budget != 0.25 else 0.5)
    assert core.pool.num_used_blocks == 0
    core.check_integrity()


def test_compaction_moves_exactly_the_chosen_entries(make_engine):
    core, runner = make_engine(kv_prune="heavy-hitter", kv_budget=0.5)
    pool = runner.kv_pool  # (layers, 2, NB, BS, Hkv, D)
    layers, slots = pool.shape[0], pool.shape[2] * BS
    flat = pool.view(layers, 2, slots, *pool.shape[-2:])
    flat.copy_(torch.arange(slots, dtype=pool.dtype)[None, None, :, None, None].expand_as(flat))
    runner.slot_scores.zero_()
    table = [7, 3, 9]  # 48 entries; the first block is shared and stays
    entries = [b * BS + i for b in table for i in range(BS)]
    # layer 0 and the others disagree on the heavy hitters: each keeps its own
    runner.slot_scores[0, [entries[20], entries[25], entries[30]]] = torch.tensor([5.0, 1.0, 3.0])
    runner.slot_scores[1:, [entries[21], entries[25], entries[33]]] = torch.tensor([2.0, 9.0, 1.0])
    runner.slot_scores[:, entries[2]] = 100.0  # in the shared block: not a candidate
    # private entries 16..47: keep 2 sinks, 4 recent, and the 2 heaviest of the middle
    runner._prune(KvPrune(seq_id=0, block_table=table, kv_len=48, private_start=16, num_keep=8, num_sinks=2,
                          num_recent=4, policy="heavy-hitter"))
    kept = {0: (16, 17, 20, 30, 44, 45, 46, 47), 1: (16, 17, 21, 25, 44, 45, 46, 47)}
    for layer in range(layers):
        want = [float(e) for e in entries[:16] + [entries[i] for i in kept[min(layer, 1)]]]
        for kv in (0, 1):
            assert flat[layer, kv, entries[:24], 0, 0].tolist() == want
    assert runner.slot_scores[0, entries[18]].item() == 5.0 and runner.slot_scores[0, entries[19]].item() == 3.0
    assert runner.slot_scores[1, entries[18]].item() == 2.0 and runner.slot_scores[1, entries[19]].item() == 9.0


def test_heavy_hitter_scores_are_collected_by_both_decode_paths(make_engine):
    scores = {}
    for path in ("auto", "sdpa"):
        core, runner = make_engine(kv_prune="heavy-hitter", kv_budget=1000, decode_attention=path)
        prompt = random_prompts([21], seed=14)[0]
        generate(core, runner, [prompt], SamplingParams(max_tokens=5, **GREEDY))
        scores[path] = runner.slot_scores.clone()
    # 21 prompt queries and 4 decodes (the 5th token is sampled by the last), each adds one
    # probability per head over its keys, in each layer's own row: num_heads per query per layer
    config = runner.model.config
    assert scores["auto"].shape[0] == config.num_hidden_layers
    per_layer = scores["auto"].sum(1)
    expected = (21 + 4.0) * config.num_attention_heads
    assert per_layer.tolist() == pytest.approx([expected] * config.num_hidden_layers, rel=1e-4)
    assert torch.allclose(scores["auto"], scores["sdpa"], atol=1e-4)


def test_shared_prefix_blocks_are_never_edited(make_engine):
    core, runner = make_engine(kv_prune="window", kv_budget=48)
    system = random_prompts([64], seed=15)[0]  # four full blocks, cached once computed
    first = generate(core, runner, [system + [5, 6, 7]], SamplingParams(max_tokens=4, **GREEDY))
    cached = [node.block for node in core.pool.match_prefix(system, 4)]
    assert len(cached) == 4
    before = runner.kv_pool[:, :, cached].clone()
    core.add_request("long", system + [8, 9], SamplingParams(max_tokens=120, **GREEDY))
    prunes = []
    while core.has_work:
        plan = core.schedule()
        prunes += plan.kv_prunes
        core.process_result(runner.execute(plan))
    assert prunes and all(op.private_start == 64 for op in prunes)
    assert torch.equal(runner.kv_pool[:, :, cached], before)
    assert generate(core, runner, [system + [5, 6, 7]], SamplingParams(max_tokens=4, **GREEDY)) == first
    core.check_integrity()


@pytest.mark.parametrize("chunk", [64, 16])
def test_heavy_hitter_prefill_scores_equal_the_prompts_attention(make_engine, demo_model_dir, chunk):
    """Each key's score after the prompt is the attention it got from the prompt's queries,
    summed over heads, per layer: what an eager forward's attention maps give, chunked or not."""
    core, runner = make_engine(kv_prune="heavy-hitter", kv_budget=1000, max_num_batched_tokens=chunk,
                               enable_prefix_caching=False)
    prompt = random_prompts([40], seed=16)[0]
    seq = core.add_request("r", prompt, SamplingParams(max_tokens=2, **GREEDY))
    while seq.num_computed_tokens < len(prompt):
        core.process_result(runner.execute(core.schedule()))
    slots = torch.tensor([runner._slot(seq.block_table, p) for p in range(len(prompt))])
    got = runner.slot_scores[:, slots]  # (layers, 40)
    model = AutoModelForCausalLM.from_pretrained(demo_model_dir, attn_implementation="eager").eval()
    with torch.no_grad():
        maps = model(torch.tensor([prompt]), output_attentions=True).attentions  # per layer (1, H, T, T)
    expected = torch.stack([m[0].sum((0, 1)) for m in maps])
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4)
