"""Drift evaluation: win rate (ties count one half), CLPD from given log-probs, recovery time, and
one bounded run of the evaluator against a real tiny server."""

from __future__ import annotations

import asyncio
import dataclasses
import math

import pytest

from clients.drift import DriftEvaluator, EvalConfig, clpd, recovery, win_rate
from clients.oracle import Phase, PreferenceOracle, drift_oracle


class FakeClock:
    """A clock that moves only when slept on (or advanced by hand); records each sleep asked for."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now, self.sleeps = now, []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, delay_s: float) -> None:
        self.sleeps.append(delay_s)
        self.now += delay_s
        await asyncio.sleep(0)


def test_win_rate_counts_ties_one_half():
    # win, tie, loss, win, tie: (1 + 0.5 + 0 + 1 + 0.5) / 5
    assert win_rate([0.5, 0.3, 0.1, 0.9, 0.0], [0.4, 0.3, 0.2, 0.1, 0.0]) == pytest.approx(3 / 5)
    assert win_rate([0.2, 0.2], [0.2, 0.2]) == 0.5  # the base against itself
    assert win_rate([1.0], [0.0]) == 1.0 and win_rate([0.0], [1.0]) == 0.0
    with pytest.raises(ValueError):
        win_rate([0.1], [0.1, 0.2])
    with pytest.raises(ValueError):
        win_rate([], [])


def test_win_rate_on_oracle_scores_by_hand():
    vowels = Phase("vowels", frozenset("aeiou"))
    serving = ["aaa", "bab", "xyz", "ee"]  # scores 1, 1/3, 0, 1
    base = ["bbb", "bab", "aei", "ea"]  # scores 0, 1/3, 1, 1
    # win, tie, loss, tie
    assert win_rate([vowels.score(s) for s in serving], [vowels.score(b) for b in base]) == pytest.approx(2 / 4)


def test_clpd_is_the_mean_chosen_minus_rejected_logprob():
    # pairs: (-3.0) - (-5.0) = 2.0 ; (-4.5) - (-4.0) = -0.5 ; (-1.25) - (-2.0) = 0.75 -> mean 2.25 / 3
    assert clpd([-3.0, -4.5, -1.25], [-5.0, -4.0, -2.0]) == pytest.approx(0.75)
    # per-token log-probs summed first, response tokens only: chosen -1 -2, rejected -0.5 -0.5 -4
    assert clpd([sum([-1.0, -2.0])], [sum([-0.5, -0.5, -4.0])]) == pytest.approx(2.0)
    with pytest.raises(ValueError):
        clpd([], [])


def test_recovery_time_to_90_percent_of_the_rise_to_the_plateau():
    series = [(0, 0.5), (10, 0.7), (20, 0.3), (30, 0.4), (40, 0.55), (50, 0.66), (60, 0.7), (70, 0.68), (80, 0.72)]
    r = recovery(series, switch_s=20)
    # start 0.3 (first point at or after the switch), plateau mean(0.7, 0.68, 0.72) = 0.7, target 0.3 + 0.9 * 0.4 = 0.66
    assert r.start == 0.3 and r.plateau == pytest.approx(0.7) and r.target == pytest.approx(0.66)
    assert r.time_to_recover_s == 30  # 0.66 at t = 50
    flat = recovery([(t, 0.5) for t in range(0, 100, 10)], switch_s=20)
    assert flat.time_to_recover_s is None and flat.plateau == 0.5  # nothing to recover: the base against itself
    worse = recovery([(20, 0.5), (30, 0.4), (40, 0.3), (50, 0.3), (60, 0.3)], switch_s=20)
    assert worse.time_to_recover_s is None
    with pytest.raises(ValueError, match="need more than 3"):
        recovery([(0, 0.5), (25, 0.5), (30, 0.5)], switch_s=20)


def test_heldout_pairs_are_fixed_per_phase():
    oracle = drift_oracle(10.0)
    evaluator = DriftEvaluator(client=None, oracle=oracle, config=EvalConfig(prompts=("a",), clpd_prompts=("x: ", "y: ")))
    first = evaluator.heldout_pairs(1.0)
    assert evaluator.heldout_pairs(9.0) is first and len(first) == 2
    after = evaluator.heldout_pairs(10.0)
    assert after is not first
    assert all(oracle.score(p.chosen, 12.0) > oracle.score(p.rejected, 12.0) for p in after)


async def test_evaluator_against_a_tiny_server(start_server, tmp_path):
    """The base against itself ties everywhere (same seeds: win rate 0.5); CLPD equals the sum of
    the score API's log-probs done by hand; a series keeps to its interval and bound (on a fake
    clock: the evaluations take no time on it, so every slot is taken, at its exact time)."""
    from clients import AsyncClient
    from trainer.feedback import FeedbackStore

    oracle = PreferenceOracle([(0.0, Phase("vowels", frozenset("aeiou")))])
    config = EvalConfig(prompts=("Hello there.", "What is a queue?"), clpd_prompts=("Q: hi\nA:", "Q: why\nA:"),
                        num_samples=2, max_tokens=6)
    async with start_server(feedback_store=FeedbackStore(tmp_path / "f.sqlite3")) as (url, _), AsyncClient(url) as client:
        clock = FakeClock()
        evaluator = DriftEvaluator(client, oracle, config, clock=clock, sleep=clock.sleep)
        base = await evaluator.take_base()
        assert len(base) == 4 and all(base)
        point = await evaluator.evaluate(0.0)
        assert point.adapter_version is None  # this server does not train
        assert (point.win_rate, point.num_ties, point.num_comparisons, point.phase) == (0.5, 4, 4, "vowels")
        pairs = evaluator.heldout_pairs(0.0)
        by_hand = [(await client.score(p.prompt, p.chosen)).logprob - (await client.score(p.prompt, p.rejected)).logprob
                   for p in pairs]
        assert point.clpd == pytest.approx(sum(by_hand) / 2, abs=1e-4) and math.isfinite(point.clpd)
        assert point.clpd_gain == pytest.approx(0.0, abs=1e-4)  # the base against its own CLPD
        series = await evaluator.run(clock(), interval_s=0.5, until_s=1.2)
        assert [p.t_s for p in series] == [0.5, 1.0] and clock.sleeps == [0.5, 0.5]  # 1.5 is past the bound
        assert all(p.win_rate == 0.5 and p.eval_s == 0.0 for p in series)


async def test_a_turned_away_evaluation_is_skipped_and_noted_not_fatal():
    """A full server (429) costs the series one point; any other error still ends the run; a slot
    missed while an evaluation ran is skipped (on a fake clock, where each evaluation takes
    ``durations_s`` of its time)."""
    from clients.drift import EvalPoint
    from clients.sdk import APIError

    class Flaky(DriftEvaluator):
        def __init__(self, failures, durations_s=None):
            self.fake = FakeClock()
            super().__init__(None, PreferenceOracle([(0.0, Phase("vowels", frozenset("aeiou")))]),
                             EvalConfig(prompts=("x",), clpd_prompts=("y",)), clock=self.fake, sleep=self.fake.sleep)
            self.failures, self.durations_s, self.calls = failures, durations_s or {}, 0

        async def evaluate(self, t_s):
            self.calls += 1
            self.fake.now += self.durations_s.get(self.calls, 0.0)
            if self.calls in self.failures:
                raise self.failures[self.calls]
            return EvalPoint(t_s, 0, "vowels", 0.5, 0.0, 0.0, 1, 1, 0.0)

    flaky = Flaky({2: APIError(429, "the queue is full")})
    points = await flaky.run(flaky.fake(), 0.25, 1.25)
    assert flaky.calls == 5 and len(points) == 4
    assert [p.t_s for p in points] == [0.25, 0.75, 1.0, 1.25]
    assert len(flaky.skipped) == 1 and flaky.skipped[0][0] == 0.5 and "429" in flaky.skipped[0][1]
    # the first evaluation runs from 0.25 to 0.875: the slots at 0.5 and 0.75 are gone, 1.0 is next
    slow = Flaky({}, durations_s={1: 0.625})
    assert [p.t_s for p in await slow.run(slow.fake(), 0.25, 1.25)] == [0.25, 1.0, 1.25] and slow.calls == 3
    assert slow.fake.sleeps == [0.25, 0.125, 0.25]
    with pytest.raises(APIError, match="400"):
        await Flaky({1: APIError(400, "bad field")}).run(1000.0, 0.25, 1.25)


async def test_evaluation_samples_honour_top_k(start_server):
    """top_k=1 is greedy: every sample of a prompt is the same text."""
    from clients import AsyncClient

    oracle = PreferenceOracle([(0.0, Phase("vowels", frozenset("aeiou")))])
    config = EvalConfig(prompts=("Hello there.", "What is a queue?"), clpd_prompts=("Q: hi\nA:",), num_samples=3,
                        max_tokens=6, top_k=1)
    async with start_server() as (url, _), AsyncClient(url) as client:
        samples = await DriftEvaluator(client, oracle, config)._samples()
        free = await DriftEvaluator(client, oracle, dataclasses.replace(config, top_k=0))._samples()
    assert len(samples) == 6 and len(set(samples[:3])) == 1 and len(set(samples[3:])) == 1
    assert len(set(free[:3])) > 1  # without top_k, the three seeds differ


async def test_the_base_is_sampled_live_beside_the_trained_adapter(start_server, tmp_path):
    """With the server's `:base` model, take_base works after training has moved the adapter, and
    each evaluation samples the base again in the same batch as the serving model's answers."""
    import asyncio

    from clients import AsyncClient
    from engine.config import TrainingConfig
    from trainer.feedback import FeedbackStore

    oracle = PreferenceOracle([(0.0, Phase("vowels", frozenset("aeiou")))])
    config = EvalConfig(prompts=("Hello there.",), clpd_prompts=("Q: hi\nA:",), num_samples=2, max_tokens=6)
    store = FeedbackStore(tmp_path / "f.sqlite3")
    async with start_server(model_name="demo", feedback_store=store, trainer_config=TrainingConfig(
            lr=2e-2, grad_accum=1)) as (url, engine), AsyncClient(url) as client:
        await client.feedback("Say hi.", " Hi!", " No.")
        for _ in range(500):  # bounded: until the step is published
            if engine.training.adapter_version >= 1:
                break
            await asyncio.sleep(0.02)
        evaluator = DriftEvaluator(client, oracle, config)
        calls = []
        samples = evaluator._samples

        async def recorded(model=None):
            calls.append(model)
            return await samples(model)

        evaluator._samples = recorded
        base = await evaluator.take_base()  # version 1 is serving: fine with a live base
        assert evaluator.base_model == "demo:base" and calls == ["demo:base"]
        point = await evaluator.evaluate(0.0)
        assert calls[1:] == [None, "demo:base"] and point.adapter_version == 1
        assert await samples("demo:base") == base  # the base never moves
        assert point.num_comparisons == 2
