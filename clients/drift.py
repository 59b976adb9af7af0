"""Drift evaluation (DESIGN.md, "Alignment loop and its metrics"): how well the serving adapter
follows the preference oracle's current taste, sampled at a fixed interval while a load runs.

Two measures per evaluation, both at the evaluation's time ``t_s`` (the oracle's taste then):
- Win rate: for each evaluation prompt and sample index j, a sample of the serving model (chat,
  temperature ``temperature``, seed ``seed_i`` so that sample j uses ``seed_i + j``) against the
  base model's sample with the same prompt and seed; the oracle scores both at ``t_s``; a win
  counts 1, a tie 1/2 (``win_rate``). Where the server lists its base model (``<served>:base``
  in /v1/models) the base answers are sampled live, in the same iterations as the serving
  model's, at every evaluation; elsewhere they are taken once, at t = 0 before any training
  (adapter version 0 is the base model), and reused. The same seeds (common random numbers) make
  version 0 tie with the base exactly, so an untrained server scores 0.5 and every departure is
  the adapter's doing.
- CLPD: the mean over held-out pairs of the taste at ``t_s`` (``PreferenceOracle.heldout_pairs``,
  fixed per phase) of ``logp(chosen|x) - logp(rejected|x)`` under the serving model, response
  tokens only, scored through the server's log-prob API (``AsyncClient.score``: an echo of
  prompt + response with ``max_tokens=0``). ``x`` is the chat template's rendering of the prompt,
  the text the trainer sees for chat feedback. The held-out responses differ in length (in
  tokens), which offsets CLPD by an amount that has nothing to do with the preference (the base
  model's CLPD on them is far from 0), so each point also carries ``clpd_gain``: CLPD minus the
  base model's CLPD on the same pairs (measured in ``take_base`` for every phase).

``recovery`` reads a finished series: the time after the switch to recover 90% of the way to the
post-drift plateau.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from clients.oracle import PreferenceOracle, PreferencePair
from clients.sdk import APIError, AsyncClient


def win_rate(serving_scores: Sequence[float], base_scores: Sequence[float]) -> float:
    """Share of pairs where the serving sample scores higher than the base sample; ties 1/2."""
    if len(serving_scores) != len(base_scores) or not serving_scores:
        raise ValueError(f"need two equally long, non-empty score lists, got {len(serving_scores)} and {len(base_scores)}")
    wins = sum(1.0 if s > b else 0.5 if s == b else 0.0 for s, b in zip(serving_scores, base_scores))
    return wins / len(serving_scores)


def clpd(chosen_logprobs: Sequence[float], rejected_logprobs: Sequence[float]) -> float:
    """Mean of ``logp(chosen|x) - logp(rejected|x)`` over pairs (each a response's summed log-prob)."""
    if len(chosen_logprobs) != len(rejected_logprobs) or not chosen_logprobs:
        raise ValueError(f"need two equally long, non-empty lists, got {len(chosen_logprobs)} and {len(rejected_logprobs)}")
    return sum(c - r for c, r in zip(chosen_logprobs, rejected_logprobs)) / len(chosen_logprobs)


@dataclass(frozen=True, slots=True)
class EvalPoint:
    """One evaluation: at ``t_s`` (seconds from the run's start), of the adapter serving then."""

    t_s: float
    adapter_version: int | None  # None: the server does not train
    phase: str  # the oracle's taste at t_s
    win_rate: float
    clpd: float
    clpd_gain: float  # clpd minus the base model's CLPD on the same pairs
    num_comparisons: int
    num_ties: int
    eval_s: float  # how long the evaluation took (under load)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True, slots=True)
class EvalConfig:
    prompts: tuple[str, ...]  # evaluation prompts (one user message each)
    clpd_prompts: tuple[str, ...]  # rendered prompts x of the held-out pairs (chat template applied)
    num_samples: int = 2  # samples per prompt (``n``), each compared with the base's
    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0  # 0: off (not sent)
    seed: int = 1234
    num_pair_words: int = 8  # words per held-out response

    def __post_init__(self) -> None:
        if not self.prompts or not self.clpd_prompts:
            raise ValueError("need evaluation prompts and held-out prompts")
        if not 1 <= self.num_samples <= 16:
            raise ValueError(f"num_samples must be in [1, 16], got {self.num_samples}")


class DriftEvaluator:
    """Evaluates one server against ``oracle``. Call ``take_base`` first, before any training;
    then ``evaluate(t_s)`` any number of times, or ``run`` for a series at a fixed interval.

    ``clock`` (seconds) and ``sleep`` are the time that ``run`` schedules on and ``eval_s`` is
    measured on: ``time.perf_counter`` and ``asyncio.sleep``; tests pass a fake clock."""

    def __init__(self, client: AsyncClient, oracle: PreferenceOracle, config: EvalConfig, *,
                 clock: Callable[[], float] = time.perf_counter,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self.client, self.oracle, self.config = client, oracle, config
        self.clock, self.sleep = clock, sleep
        self.base_samples: list[str] | None = None
        self.base_model: str | None = None  # the server's base model by name, sampled live
        self.base_clpd: dict[str, float] = {}  # per phase name
        self._pairs: dict[str, list[PreferencePair]] = {}  # per phase name: fixed for the run
        # Evaluations ``run`` skipped because the server was full or draining (429 / 503 after
        # the client's retries): (t_s, the error). An overloaded server is a result, not a crash.
        self.skipped: list[tuple[float, str]] = []

    async def _samples(self, model: str | None = None) -> list[str]:
        """Every prompt's ``num_samples`` answers, flattened prompt-major (of ``model``, else the
        client's)."""
        c = self.config
        chosen = {"model": model} if model else {}

        async def one(i: int, prompt: str) -> list[str]:
            answer = await self.client.chat([{"role": "user", "content": prompt}], **chosen, n=c.num_samples,
                                            max_tokens=c.max_tokens, temperature=c.temperature,
                                            **({"top_k": c.top_k} if c.top_k else {}),
                                            seed=c.seed + 100 * i, ignore_eos=True)
            return [choice.message.content or "" for choice in sorted(answer.choices, key=lambda ch: ch.index)]

        per_prompt = await asyncio.gather(*(one(i, p) for i, p in enumerate(c.prompts)))
        return [text for texts in per_prompt for text in texts]

    async def take_base(self) -> list[str]:
        """Sample the base model's answers and score every phase's held-out pairs under it. A
        server that lists its base model is asked for it by name, at any time; elsewhere the
        server must still serve adapter version 0 (and still does after)."""
        listed = [m.id for m in (await self.client.models()).data]
        self.base_model = next((name for name in listed if name.endswith(":base")), None)
        if self.base_model is not None:
            self.base_samples = await self._samples(self.base_model)
            for start_s, phase in zip(self.oracle.starts_s, self.oracle.phases):
                self.base_clpd[phase.name] = await self.clpd(start_s, self.base_model)
            return self.base_samples
        version = await self.adapter_version()
        if version not in (None, 0):
            raise RuntimeError(f"the base samples need adapter version 0, the server serves version {version}")
        self.base_samples = await self._samples()
        for start_s, phase in zip(self.oracle.starts_s, self.oracle.phases):
            self.base_clpd[phase.name] = await self.clpd(start_s)
        if (after := await self.adapter_version()) not in (None, 0):
            raise RuntimeError(f"the adapter moved to version {after} while the base was measured")
        return self.base_samples

    async def adapter_version(self) -> int | None:
        serving = (await self.client.adapters()).get("serving")
        return None if serving is None else int(serving["version"])

    def heldout_pairs(self, t_s: float) -> list[PreferencePair]:
        phase = self.oracle.phase_at(t_s)
        if phase.name not in self._pairs:
            self._pairs[phase.name] = self.oracle.heldout_pairs(
                self.config.clpd_prompts, t_s, num_words=self.config.num_pair_words, seed=self.config.seed)
        return self._pairs[phase.name]

    async def clpd(self, t_s: float, model: str | None = None) -> float:
        pairs = self.heldout_pairs(t_s)
        chosen = {"model": model} if model else {}
        scores = await asyncio.gather(*(self.client.score(p.prompt, text, **chosen)
                                        for p in pairs for text in (p.chosen, p.rejected)))
        return clpd([s.logprob for s in scores[0::2]], [s.logprob for s in scores[1::2]])

    async def evaluate(self, t_s: float) -> EvalPoint:
        """Win rate and CLPD of the adapter serving now, under the taste at ``t_s``."""
        if self.base_samples is None:
            raise RuntimeError("take_base() first")
        started = self.clock()
        version = await self.adapter_version()
        if self.base_model is not None:  # the base's answers now, in the same iterations as ours
            samples, base_samples, value = await asyncio.gather(self._samples(), self._samples(self.base_model),
                                                                self.clpd(t_s))
        else:
            (samples, value), base_samples = await asyncio.gather(self._samples(), self.clpd(t_s)), self.base_samples
        ours = [self.oracle.score(s, t_s) for s in samples]
        base = [self.oracle.score(s, t_s) for s in base_samples]
        phase = self.oracle.phase_at(t_s).name
        return EvalPoint(t_s=t_s, adapter_version=version, phase=phase, win_rate=win_rate(ours, base), clpd=value,
                         clpd_gain=value - self.base_clpd[phase], num_comparisons=len(ours),
                         num_ties=sum(a == b for a, b in zip(ours, base)), eval_s=self.clock() - started)

    async def run(self, start: float, interval_s: float, until_s: float) -> list[EvalPoint]:
        """Evaluate at ``interval_s``, ``2 * interval_s``, ... seconds after ``start`` (a reading
        of ``clock``, by default ``time.perf_counter()``: the load's start) up to ``until_s``; a
        slot missed while an evaluation ran is skipped. Each point's ``t_s`` is when its
        evaluation began. An evaluation the server turned away (429 or 503) is left out and
        noted in ``skipped``."""
        points: list[EvalPoint] = []
        slot = 1
        while slot * interval_s <= until_s:
            await self.sleep(max(0.0, start + slot * interval_s - self.clock()))
            t_s = self.clock() - start
            try:
                points.append(await self.evaluate(t_s))
            except APIError as exc:
                if exc.status not in (429, 503):
                    raise
                self.skipped.append((round(t_s, 3), str(exc)))
            slot = max(slot + 1, int((self.clock() - start) / interval_s) + 1)
        return points


@dataclass(frozen=True, slots=True)
class Recovery:
    """How a win-rate series recovered after the switch at ``switch_s``.

    ``start``: the first evaluation at or after the switch; ``plateau``: the mean of the last
    ``plateau_points`` evaluations; ``time_to_recover_s``: from the switch to the first evaluation
    at or above ``start + fraction * (plateau - start)``, None when the plateau is not above the
    start (nothing recovered, e.g. a server that does not train)."""

    start: float
    plateau: float
    target: float
    time_to_recover_s: float | None


def recovery(points: Sequence[tuple[float, float]], switch_s: float, fraction: float = 0.9,
             plateau_points: int = 3) -> Recovery:
    """``points``: (t_s, win rate), in time order. See ``Recovery``."""
    post = [(t, w) for t, w in points if t >= switch_s]
    if len(post) < plateau_points + 1:
        raise ValueError(f"need more than {plateau_points} evaluations after the switch, got {len(post)}")
    start = post[0][1]
    plateau = sum(w for _, w in post[-plateau_points:]) / plateau_points
    target = start + fraction * (plateau - start)
    if plateau <= start:
        return Recovery(start, plateau, target, None)
    reached = next(t for t, w in post if w >= target - 1e-12)  # the plateau's points reach their mean or more
    return Recovery(start, plateau, target, reached - switch_s)
