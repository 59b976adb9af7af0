"""The preference oracle: letter-share scores, preferences per phase, the switch at its scheduled
time, ties, and held-out pairs of the taste in force."""

from __future__ import annotations

import pytest

from clients.oracle import CONSONANTS, VOWELS, Phase, PreferenceOracle, default_words, drift_oracle

VOWEL_PHASE = Phase("vowels", frozenset(VOWELS))


def test_score_is_the_share_of_liked_letters():
    assert VOWEL_PHASE.score("aei") == 1.0
    assert VOWEL_PHASE.score("Hello, World!") == pytest.approx(3 / 10)  # e o o of h e l l o w o r l d
    assert Phase("c", frozenset(CONSONANTS)).score("Hello, World!") == pytest.approx(7 / 10)
    assert VOWEL_PHASE.score("123 !? ") == 0.0 and VOWEL_PHASE.score("") == 0.0
    assert VOWEL_PHASE.score("ÉA") == 1.0  # case folded; the É is not an ASCII letter
    with pytest.raises(ValueError, match="lowercase ASCII"):
        Phase("bad", frozenset("aB"))


def test_preference_follows_the_phase_and_switches_at_its_start():
    oracle = drift_oracle(10.0)
    assert oracle.prefer("idea", "strength", 0.0) == ("idea", "strength")
    assert oracle.prefer("strength", "idea", 9.999) == ("idea", "strength")
    assert oracle.prefer("idea", "strength", 10.0) == ("strength", "idea")  # the start belongs to the new phase
    assert oracle.prefer("idea", "strength", 1e6) == ("strength", "idea")
    assert [oracle.phase_at(t).name for t in (-1.0, 0.0, 9.9, 10.0)] == ["vowels", "vowels", "vowels", "consonants"]
    assert oracle.score("strength", 11.0) == pytest.approx(7 / 8)
    assert drift_oracle(None).phase_at(1e9).name == "vowels"


def test_three_phases():
    oracle = PreferenceOracle([(0, Phase("x", frozenset("x"))), (5, Phase("y", frozenset("y"))),
                               (7.5, Phase("x again", frozenset("x")))])
    assert [oracle.prefer("xa", "ya", t) for t in (4.9, 5.0, 7.4, 7.5)] == [
        ("xa", "ya"), ("ya", "xa"), ("ya", "xa"), ("xa", "ya")]


def test_ties_give_no_preference():
    oracle = drift_oracle(10.0)
    assert oracle.prefer("area", "idea", 0.0) is None  # 3 vowels of 4 each
    assert oracle.prefer("ab", "ba", 0.0) is None
    assert oracle.prefer("", "123", 20.0) is None  # no letters: 0 and 0
    assert oracle.prefer("ae", "aeae", 20.0) is None  # 1/5 == 2/10 compare equal
    assert oracle.prefer("a b", "a b", 0.0) is None


@pytest.mark.parametrize("schedule", [[], [(1.0, VOWEL_PHASE)], [(0.0, VOWEL_PHASE), (0.0, VOWEL_PHASE)],
                                      [(0.0, VOWEL_PHASE), (5.0, VOWEL_PHASE), (3.0, VOWEL_PHASE)]])
def test_bad_schedules_are_refused(schedule):
    with pytest.raises(ValueError):
        PreferenceOracle(schedule)


def test_heldout_pairs_respect_the_phase_in_force():
    oracle = drift_oracle(10.0)
    prompts = [f"Question {i}:" for i in range(20)]
    before, after = oracle.heldout_pairs(prompts, 5.0, seed=1), oracle.heldout_pairs(prompts, 10.0, seed=1)
    assert [p.prompt for p in before] == prompts and [p.prompt for p in after] == prompts
    for pair in before:
        assert oracle.score(pair.chosen, 5.0) > oracle.score(pair.rejected, 5.0)
        assert oracle.prefer(pair.chosen, pair.rejected, 5.0) == (pair.chosen, pair.rejected)
        assert pair.chosen.startswith(" ") and len(pair.chosen.split()) == 8 and len(pair.rejected.split()) == 8
    for pair in after:
        assert oracle.prefer(pair.rejected, pair.chosen, 10.0) == (pair.chosen, pair.rejected)
    # under the other taste the pairs are the wrong way round
    assert sum(oracle.score(p.chosen, 20.0) < oracle.score(p.rejected, 20.0) for p in before) == len(before)
    words = set(default_words())
    assert all(w in words for p in before for w in (p.chosen + p.rejected).split())
    assert oracle.heldout_pairs(prompts, 5.0, seed=1) == before  # seeded
    assert oracle.heldout_pairs(prompts, 5.0, seed=2) != before


def test_heldout_pairs_need_separable_words():
    with pytest.raises(ValueError, match="do not separate"):
        drift_oracle(None).heldout_pairs(["p"], 0.0, words=["aaa", "eee", "ooo"])
