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


def test_closed_loop_against_real_servers(demo_model_dir, tmp_path):
    """Two tiny closed-loop runs on real `mace serve` subprocesses (127.0.0.1, stopped at the end):
    the SLOs come from inference-only's medians, attainment from each run's records."""
    import json

    import numpy as np

    from bench.policies import main
    from server.cli import build_parser

    out = tmp_path / "closed-loop.json"
    argv = ["bench", "policies", "--closed-loop", "--model", demo_model_dir, "--policies", "synchronous,inference-only",
            "--clients", "2", "--duration", "4", "--output-len", "8", "--max-requests-per-client", "100", "--out", str(out)]
    main(build_parser("policies").parse_args(argv))
    rows = json.loads(out.read_text())["rows"]
    assert [(r["clients"], r["policy"]) for r in rows] == [(2, "inference-only"), (2, "synchronous")]  # baseline first
    base, sync = rows
    ttfts = [r["ttft_ms"] for r in base["records"] if r["ttft_ms"] is not None]
    tpots = [r["tpot_ms"] for r in base["records"] if r["tpot_ms"] is not None]
    for row in rows:
        assert 0 < row["completed"] <= 200 and row["errors"] == 0 and row["pairs_posted"] > 0
        assert row["slo_ttft_ms"] == 3 * float(np.percentile(ttfts, 50))
        assert row["slo_tpot_ms"] == 2 * float(np.percentile(tpots, 50))
        attained = [r["ttft_ms"] is not None and r["ttft_ms"] <= row["slo_ttft_ms"] and r["tpot_ms"] <= row["slo_tpot_ms"]
                    for r in row["records"]]
        assert row["slo_attainment"] == sum(attained) / len(attained)
    assert base["pairs_stepped"] == 0 and base["adapter_version"] == 0  # a trainer, never given work
    assert sync["pairs_stepped"] > 0 and sync["adapter_version"] > 0
    assert sync["pairs_stepped_vs_synchronous"] == 1.0 and base["attainment_vs_inference_only_pts"] == 0.0
