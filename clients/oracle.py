"""The preference oracle: a simulated user who judges which of two responses is better, and whose
taste changes at scheduled times (the drift of the drift benchmark).

A taste (``Phase``) is a set of liked letters. A response scores the share of its ASCII letters
(case folded) that are liked, in [0, 1]; a response without letters scores 0. Of two responses
the higher score is preferred; equal scores are a tie (no preference, so no feedback pair).

Why letters: the oracle must be something DPO on a LoRA of a tiny random-weight model can learn
within minutes. A letter share is a sum over the response's tokens, so every token carries its
own signal (its letters), and the adapter can raise it by shifting probability toward tokens
rich in liked letters, whatever the prompt. ``drift_oracle`` likes vowels and then, from the
switch on, consonants: the exact opposite, so an adapter aligned to the first taste is worse than
the base model under the second, and recovery has to undo the first alignment.

It needs a model that has learnt something. On the random-weight demo model the next-token
distribution is flat (log-probs near -ln 8192) and stays so: the final RMSNorm fixes the hidden
state's norm and the random ``lm_head`` rows are small, so an attention LoRA can tilt the logits of a
third of the vocabulary by only ~0.05, and the DPO loss stays at ln 2. Measured here on 2 CPU
cores, 16-token chat answers at temperature 1, retrain rate 0.5, the share of vowels:
- random-weight tiny model, lr 5e-4 or 5e-3: 0.37 -> 0.37 after ~120 pairs (60 s) through the server;
- tiny model pre-trained 400 steps (``engine.demo_training``, seq 64, lr 3e-3; loss 9.1 -> 5.7),
  ``mace serve --learning-rate 5e-3``, 8 requests/s: 0.37 -> 0.53 after ~350 pairs (90 s);
  with the default lr 5e-4, no visible change after ~120 pairs.

And it needs answers sampled from the head of the distribution, and steady DPO steps
(``scripts/dpo_offline.py``: the server's executor without the server, 600 pairs, consonants
liked from pair 200, win rate against the base model over 96 samples; runs in
``bench-results/dpo-offline/``):
- sampled from the whole vocabulary (top_k 0) or top_p 0.9, the pre-trained tiny model's long
  flat tail makes a pair's two answers differ in noise only: the win rate stays within 0.40-0.60
  throughout;
- at top_k 50, 16 pairs a step and an NLL term on the chosen answer (``--rpo-alpha 1``): 0.67 at
  pair 160, 0.25 just after the switch (the vowel learning, judged by the new taste), back to
  0.59 at pair 400 and 0.67-0.73 from pair 440 on;
- at top_k 50, plain DPO at 4 pairs a step hardly learns the first taste (0.50-0.60), then wins
  0.96 on the second by degenerating: from pair 400 on its answers have 4-10 letters. A letter
  share rewards that; the NLL term of RPO keeps the answers' length (22-38 letters).

Times ``t_s`` are seconds on the caller's clock (the load generator's: from its start).
"""

from __future__ import annotations

import bisect
import string
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources

import numpy as np

VOWELS = "aeiou"
CONSONANTS = "".join(c for c in string.ascii_lowercase if c not in VOWELS)


@dataclass(frozen=True, slots=True)
class Phase:
    """One taste: ``liked`` letters (lowercase ASCII)."""

    name: str
    liked: frozenset[str]

    def __post_init__(self) -> None:
        if not self.liked or not self.liked <= set(string.ascii_lowercase):
            raise ValueError(f"liked must be a non-empty set of lowercase ASCII letters, got {sorted(self.liked)}")

    def score(self, text: str) -> float:
        """The share of ``text``'s letters that are liked; 0 without letters."""
        letters = [c for c in text.lower() if c in string.ascii_lowercase]
        return sum(c in self.liked for c in letters) / len(letters) if letters else 0.0


@dataclass(frozen=True, slots=True)
class PreferencePair:
    """A prompt and two responses, ``chosen`` preferred. Responses start with a space, so that
    they start on a token boundary when scored after the prompt (``AsyncClient.score``)."""

    prompt: str
    chosen: str
    rejected: str


class PreferenceOracle:
    """A schedule of tastes: ``[(t_start_s, phase), ...]``, the first starting at 0, the starts
    strictly increasing; each phase holds from its start until the next one's (the last forever)."""

    def __init__(self, schedule: Sequence[tuple[float, Phase]]) -> None:
        if not schedule or schedule[0][0] != 0:
            raise ValueError("the schedule must be non-empty and its first phase must start at 0")
        starts = [float(t) for t, _ in schedule]
        if any(b <= a for a, b in zip(starts, starts[1:])):
            raise ValueError(f"phase starts must strictly increase, got {starts}")
        self.starts_s = starts
        self.phases = [phase for _, phase in schedule]

    def phase_at(self, t_s: float) -> Phase:
        """The phase holding at ``t_s`` (a switch time belongs to the new phase; before 0: the first)."""
        return self.phases[max(0, bisect.bisect_right(self.starts_s, t_s) - 1)]

    def score(self, text: str, t_s: float) -> float:
        return self.phase_at(t_s).score(text)

    def prefer(self, a: str, b: str, t_s: float) -> tuple[str, str] | None:
        """``(chosen, rejected)`` of ``a`` and ``b`` under the taste at ``t_s``, None on a tie.
        (Scores are ratios of small integers, each correctly rounded, so equal shares compare equal.)"""
        phase = self.phase_at(t_s)
        score_a, score_b = phase.score(a), phase.score(b)
        if score_a == score_b:
            return None
        return (a, b) if score_a > score_b else (b, a)

    def heldout_pairs(self, prompts: Sequence[str], t_s: float, *, num_words: int = 8, seed: int = 0,
                      words: Sequence[str] | None = None) -> list[PreferencePair]:
        """One pair per prompt of the taste at ``t_s``, for CLPD: ``chosen`` is ``num_words``
        words (seeded draws) from the third of ``words`` (default: the shipped list) that scores
        highest, ``rejected`` as many from the third that scores lowest. Every chosen word scores
        above every rejected word, so the chosen text always scores above the rejected text."""
        if num_words < 1:
            raise ValueError(f"num_words must be >= 1, got {num_words}")
        phase = self.phase_at(t_s)
        words = list(words) if words is not None else default_words()
        scores = np.array([phase.score(w) for w in words])
        low, high = np.quantile(scores, [1 / 3, 2 / 3])
        top = [w for w, s in zip(words, scores) if s > high]
        bottom = [w for w, s in zip(words, scores) if s < low]
        if not top or not bottom:
            raise ValueError(f"the words do not separate under phase {phase.name!r}: need some above and below")
        rng = np.random.default_rng(seed)
        return [PreferencePair(prompt, " " + " ".join(rng.choice(top, num_words)),
                               " " + " ".join(rng.choice(bottom, num_words))) for prompt in prompts]


def drift_oracle(switch_s: float | None) -> PreferenceOracle:
    """Likes vowels until ``switch_s``, consonants from then on (vowels for ever when None)."""
    schedule = [(0.0, Phase("vowels", frozenset(VOWELS)))]
    if switch_s is not None:
        schedule.append((switch_s, Phase("consonants", frozenset(CONSONANTS))))
    return PreferenceOracle(schedule)


def default_words() -> list[str]:
    """The shipped word list (``clients/data/words.txt``)."""
    text = resources.files("clients").joinpath("data/words.txt").read_text(encoding="utf-8")
    return text.split()
