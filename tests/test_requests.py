"""Request lifecycle: context limits, stops, aborts, and the blocks coming back."""

import pytest

from engine.sampling_params import InvalidRequestError, SamplingParams
from scheduler.builder import generate
from tests.conftest import random_prompts

GREEDY = dict(temperature=0.0, ignore_eos=True)


def run(core, runner):
    outputs = []
    while core.has_work:
        outputs.extend(core.step(runner))
    return outputs


def test_prompt_longer_than_the_context_is_refused_and_changes_nothing(make_engine):
    core, runner = make_engine()
    assert core.config.model.max_model_len == 1024  # the tiny demo model's context
    too_long = random_prompts([1024])[0]
    with pytest.raises(InvalidRequestError, match="context is 1024 tokens") as err:
        core.add_request("a", too_long, SamplingParams(max_tokens=1))
    assert err.value.param == "prompt"
    with pytest.raises(InvalidRequestError, match="exceeds the context") as err:
        core.add_request("b", too_long[:1000], SamplingParams(max_tokens=100))
    assert err.value.param == "max_tokens"
    with pytest.raises(InvalidRequestError) as err:
        core.add_request("c", [], SamplingParams())
    assert err.value.param == "prompt"
    with pytest.raises(InvalidRequestError) as err:
        core.add_request("d", [1, 2, 10**6], SamplingParams())
    assert err.value.param == "prompt"
    assert not core.has_work and core.pool.num_free_blocks == core.pool.num_blocks
    # max_tokens=None fills the context exactly.
    seq = core.add_request("e", too_long[:1000], SamplingParams(max_tokens=None))
    assert seq.max_tokens == 24


def test_abort_frees_blocks_at_once_and_the_rest_still_match(make_engine):
    core, runner = make_engine()
    prompts = random_prompts([40, 70, 20], seed=2)
    params = SamplingParams(max_tokens=16, **GREEDY)
    core2, runner2 = make_engine()
    expected = generate(core2, runner2, [prompts[0], prompts[2]], params)

    for i, p in enumerate(prompts):
        core.add_request(f"r{i}", p, params)
    got = {"r0": [], "r2": []}
    for _ in range(6):
        for out in core.step(runner):
            if out.request_id != "r1":
                got[out.request_id].extend(out.new_token_ids)
    held = len(core.sequences["r1"].block_table)
    free_before = core.pool.num_free_blocks
    assert held > 0 and core.abort("r1")
    assert core.pool.num_free_blocks == free_before + held
    assert not core.abort("r1")  # a second abort is a no-op
    core.check_integrity()
    for out in run(core, runner):
        got[out.request_id].extend(out.new_token_ids)
    assert [got["r0"], got["r2"]] == expected
    assert core.pool.num_free_blocks == core.pool.num_blocks


def test_abort_while_waiting(make_engine):
    core, runner = make_engine(max_num_seqs=1)
    core.add_request("a", random_prompts([10])[0], SamplingParams(max_tokens=4, **GREEDY))
    core.add_request("b", random_prompts([10], seed=1)[0], SamplingParams(max_tokens=4, **GREEDY))
    core.step(runner)
    assert core.abort("b")
    outs = run(core, runner)
    assert {o.request_id for o in outs} == {"a"}
    assert core.pool.num_free_blocks == core.pool.num_blocks


def test_stop_string_cuts_the_text_and_is_never_streamed(make_engine):
    prompt = random_prompts([15], seed=21)[0]
    core, runner = make_engine()
    core.add_request("free", prompt, SamplingParams(max_tokens=40, **GREEDY))
    full = "".join(o.new_text for o in run(core, runner))
    assert len(full) > 20
    stop = full[10:14]
    cut = full[: full.index(stop)]

    core.add_request("stop", prompt, SamplingParams(max_tokens=40, stop=(stop,), **GREEDY))
    outs = run(core, runner)
    deltas = [o.new_text for o in outs]
    assert "".join(deltas) == cut
    assert outs[-1].finished and outs[-1].finish_reason == "stop"
    assert all(stop not in d for d in deltas)
    assert core.pool.num_free_blocks == core.pool.num_blocks


def test_stop_token_ids_and_eos(make_engine):
    prompt = random_prompts([15], seed=22)[0]
    core, runner = make_engine()
    free = generate(core, runner, [prompt], SamplingParams(max_tokens=30, **GREEDY))[0]
    stop_id = free[7]
    first = free.index(stop_id)
    core.add_request("s", prompt, SamplingParams(max_tokens=30, stop_token_ids=(stop_id,), **GREEDY))
    outs = run(core, runner)
    assert [t for o in outs for t in o.new_token_ids] == free[: first + 1]
    assert outs[-1].finish_reason == "stop"
    # The same token as EOS: without ignore_eos, generation ends there.
    core.eos_token_ids = frozenset({stop_id})
    outs = generate(core, runner, [prompt], SamplingParams(max_tokens=30, temperature=0.0))[0]
    assert outs == free[: first + 1]


def test_max_tokens_finishes_with_length(make_engine):
    core, runner = make_engine()
    core.add_request("a", random_prompts([9])[0], SamplingParams(max_tokens=3, **GREEDY))
    outs = run(core, runner)
    assert [len(o.new_token_ids) for o in outs] == [1, 1, 1]
    assert outs[-1].finish_reason == "length" and outs[-1].num_output_tokens == 3


def test_duplicate_request_id_is_refused(make_engine):
    core, _ = make_engine()
    core.add_request("a", [5, 6], SamplingParams())
    with pytest.raises(InvalidRequestError) as err:
        core.add_request("a", [5, 6], SamplingParams())
    assert err.value.param == "request_id"
