"""The policies bench's verdict on its targets, per rate, from hand-made rows."""

from bench.policies import _verdicts


def _row(rate, share, policy, slo, pairs_per_s):
    return {"rate": rate, "share": share, "policy": policy, "slo_attainment": slo, "pairs_per_s": pairs_per_s}


def test_verdicts_per_rate_at_half_feedback():
    rows = [
        _row(1.0, 0.1, "mace", 0.5, 0.0),  # other shares do not count
        _row(1.0, 0.5, "mace", 1.0, 0.39), _row(1.0, 0.5, "synchronous", 0.73, 0.5),
        _row(2.0, 0.5, "mace", 0.99, 0.2), _row(2.0, 0.5, "synchronous", 0.25, 0.5),
        _row(3.0, 0.5, "mace", 0.98, 0.5), _row(3.0, 0.5, "synchronous", 0.25, 0.5),
        _row(4.0, 0.5, "mace", 1.0, 0.5), _row(4.0, 0.5, "synchronous", 0.99, 0.5),
        _row(5.0, 0.5, "mace", 1.0, 0.5),  # no synchronous run: no verdict
    ]
    got = [(v["rate"], v["pairs_ratio"], v["met"]) for v in _verdicts(rows)]
    assert got == [(1.0, 0.78, True), (2.0, 0.4, False), (3.0, 1.0, False), (4.0, 1.0, False)]
