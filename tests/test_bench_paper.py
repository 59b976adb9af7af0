"""`mace bench paper`'s judgement of the targets and its report, on hand-made results (the
benchmark itself runs servers for minutes: `make bench-paper`)."""

from __future__ import annotations

from bench.paper import QUICK, shared_prefix_requests
from bench.paper_report import BEGIN, END, targets, write_report


def _latency(ttft_p99: float, itl_p99: float) -> dict:
    dist = lambda p99: {"count": 1, "mean": p99, "p50": p99 / 2, "p90": p99, "p99": p99}  # noqa: E731
    return {"ttft_ms": dist(ttft_p99), "itl_ms": dist(itl_p99), "tpot_ms": dist(itl_p99), "slo_attainment": 1.0,
            "goodput_per_s": 1.0}


def _drift_run(t90: float | None, final_clpd: float, series: list[tuple[float, float]]) -> dict:
    return {"recovery": {"start": 0.3, "plateau": 0.7, "target": 0.66, "time_to_recover_s": t90},
            "final_clpd": final_clpd + 5.0, "final_clpd_gain": final_clpd, "base_clpd": {"vowels": 2.0, "consonants": 5.0},
            "pairs_posted": 10, "pairs_trained": 8,
            "adapter_version": 2,
            "series": [{"t_s": t, "win_rate": w, "clpd": final_clpd + 5.0, "clpd_gain": final_clpd} for t, w in series]}


def results(t_mace, t_periodic, clpd_mace, clpd_periodic, mace_ttft=110.0):
    meta = {"mode": "quick", "settings": _settings()}
    series = [(0, 0.5), (10, 0.4), (20, 0.6)]
    drift = {**meta, "eval": {"prompts": ["a", "b"], "num_samples": 2, "max_tokens": 4},
             "policies": {p: _drift_run(t, c, series) for p, t, c in (
                 ("mace", t_mace, clpd_mace), ("periodic", t_periodic, clpd_periodic),
                 ("synchronous", 5.0, 1.0), ("inference-only", None, -0.5))}}
    rows = [{"policy": p, "retrain_rate": r, "latency": _latency(mace_ttft if p == "mace" else 100.0, 10.0),
             "pairs_posted": 1, "pairs_trained": 1} for r in (0.1, 0.5) for p in ("mace", "inference-only")]
    return {"drift": drift, "latency": {**meta, "rows": rows}}


def _settings() -> dict:
    import dataclasses

    return dataclasses.asdict(QUICK)


def test_targets_met_and_missed():
    met = {v["target"]: v["met"] for v in targets(results(10.0, 20.0, 1.34, 1.0))}
    assert list(met.values()) == [True, True, True, True]
    missed = targets(results(10.0, 19.0, 1.3, 1.0, mace_ttft=121.0))
    assert [v["met"] for v in missed] == [False, False, False, True]
    assert missed[0]["measured"] == "mace 10.0 s, periodic 19.0 s (1.90x)"
    assert missed[2]["measured"] == "mace 121.0 ms, inference-only 100.0 ms (1.21x)"
    # periodic never recovered: met; mace never recovered: missed; a non-positive periodic CLPD: mace's sign decides
    assert [v["met"] for v in targets(results(10.0, None, 0.2, -1.0))][:2] == [True, True]
    assert [v["met"] for v in targets(results(None, 5.0, -0.1, -1.0))][:2] == [False, False]


def test_report_section_replaces_only_its_own_text(tmp_path):
    report = tmp_path / "BENCHMARKS.md"
    report.write_text(f"# Benchmarks\n\nkept above\n\n{BEGIN}\nold numbers\n{END}\nkept below\n")
    out = tmp_path / "bench-results" / "paper"
    out.mkdir(parents=True)
    res = results(10.0, 30.0, 2.0, 1.0)
    meta = {"command": "mace bench paper --quick", "mode": "quick", "processor": "cpu", "model": "m", "run_s": 1.0,
            "slo_ttft_ms": 200.0, "slo_tbt_ms": 20.0, "profile_suggested_slos_ms": [200.0, 20.0],
            "settings": _settings()}
    write_report(res, targets(res), meta, out, report)
    text = report.read_text()
    assert "kept above" in text and "kept below" in text and "old numbers" not in text
    assert text.count(BEGIN) == 1 and "![1. Recovery after drift (Figure 2)](bench-results/paper/drift.png)" in text
    assert (out / "drift.png").stat().st_size > 0 and (out / "latency.png").exists() and (out / "targets.json").exists()
    assert "| mace | 8 / 10 | 2 | 0.300 | 0.700 | 10.0 s | 7.00 | +2.00 |" in text
    assert "vowels 2.00, consonants 5.00" in text


def test_shared_prefix_workload():
    specs = shared_prefix_requests(QUICK, seed=0)
    assert len(specs) > 10 and all(s.max_tokens == QUICK.ablation_max_tokens for s in specs)
    systems = {s.messages[0]["content"] for s in specs}
    assert len(systems) == 1 and len(next(iter(systems)).split()) > QUICK.system_prompt_words
    assert all(s.messages[0]["role"] == "system" and s.messages[1]["role"] == "user" for s in specs)


def test_set_overrides_parse_each_fields_type_and_name_bad_input():
    import pytest

    from bench.paper import apply_overrides

    s = apply_overrides(QUICK, ["rpo_alpha=0", "grad_accum=4", "retrain_rates=0.5", "policies=mace,inference-only"])
    assert (s.rpo_alpha, s.grad_accum, s.retrain_rates, s.policies) == (0.0, 4, (0.5,), ("mace", "inference-only"))
    assert s.top_k == QUICK.top_k and apply_overrides(QUICK, []) == QUICK
    assert apply_overrides(QUICK, ["trace_iterations=true"]).trace_iterations
    assert not apply_overrides(QUICK, ["trace_iterations=0"]).trace_iterations
    with pytest.raises(SystemExit, match="'yes' is not a valid bool"):
        apply_overrides(QUICK, ["trace_iterations=yes"])
    with pytest.raises(SystemExit, match="no_such_field"):
        apply_overrides(QUICK, ["no_such_field=1"])
    with pytest.raises(SystemExit, match="'four' is not a valid int"):
        apply_overrides(QUICK, ["grad_accum=four"])
    with pytest.raises(SystemExit, match="unknown fastest"):
        apply_overrides(QUICK, ["policies=mace,fastest"])
    with pytest.raises(SystemExit, match="latency_policies: unknown fastest"):
        apply_overrides(QUICK, ["latency_policies=fastest"])
    assert apply_overrides(QUICK, ["policies=mace-banked"]).policies == ("mace-banked",)


def test_targets_need_the_policies_they_compare():
    r = results(10.0, 30.0, 1.5, 1.0)
    r["drift"]["policies"].pop("periodic")
    r["latency"]["rows"] = [row for row in r["latency"]["rows"] if row["policy"] == "mace"]
    assert targets(r) == []
