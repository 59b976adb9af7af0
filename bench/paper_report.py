"""`mace bench paper`'s report: the targets judged, PNG plots (matplotlib, Agg) and the Markdown
section of BENCHMARKS.md (between ``BEGIN``/``END`` markers, so text around it is kept)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

BEGIN = "<!-- mace bench paper: begin (generated; edit outside these markers) -->"
END = "<!-- mace bench paper: end -->"
COLORS = {"mace": "tab:red", "periodic": "tab:blue", "synchronous": "tab:green", "inference-only": "tab:gray",
          "mace-banked": "tab:pink", "mace-fifo": "tab:orange"}


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


# -- targets --------------------------------------------------------------------------------------


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target of the paper's evaluation that the run measured: ``{target, measured, met}`` (none for an
    experiment run without the policies a target compares)."""
    out = []
    if "drift" in results and {"mace", "periodic"} <= results["drift"]["policies"].keys():
        runs = results["drift"]["policies"]
        t_mace, t_per = (runs[p]["recovery"]["time_to_recover_s"] for p in ("mace", "periodic"))
        if t_mace is None:
            met, how = False, "mace did not recover (its plateau is not above its post-switch start)"
        elif t_per is None:
            met, how = True, f"mace {t_mace:.1f} s; periodic did not recover within the run"
        else:
            met, how = 2 * t_mace <= t_per, f"mace {t_mace:.1f} s, periodic {t_per:.1f} s ({t_per / max(t_mace, 1e-9):.2f}x)"
        out.append({"target": "mace reaches 90% of its post-drift win-rate plateau >= 2x sooner than periodic",
                    "measured": how, "met": met})
        # judged on the gain over the base model's CLPD on the same pairs: the held-out responses
        # differ in token count, which offsets the raw CLPD whatever the adapter (clients/drift.py)
        g_mace, g_per = runs["mace"]["final_clpd_gain"], runs["periodic"]["final_clpd_gain"]
        raw = f"; raw CLPD mace {runs['mace']['final_clpd']:.2f}, periodic {runs['periodic']['final_clpd']:.2f}"
        if g_per > 0:
            met = g_mace >= 1.34 * g_per
            how = f"gain over base: mace {g_mace:.2f}, periodic {g_per:.2f} ({g_mace / g_per:.2f}x)"
        else:  # a ratio to a non-positive gain says nothing: mace must at least gain
            met, how = g_mace > 0, f"gain over base: mace {g_mace:.2f}, periodic {g_per:.2f} (not positive: met iff mace's is)"
        out.append({"target": "final CLPD of mace >= 1.34x periodic's (gain over the base model)", "measured": how + raw,
                    "met": met})
    if "latency" in results:
        rows = results["latency"]["rows"]
        top = max(r["retrain_rate"] for r in rows)
        at = {r["policy"]: r["latency"] for r in rows if r["retrain_rate"] == top}
        for name, key in (("TTFT", "ttft_ms"), ("TBT", "itl_ms")) if {"mace", "inference-only"} <= at.keys() else ():
            mace, base = at["mace"][key]["p99"], at["inference-only"][key]["p99"]
            ratio = _ratio(mace, base)
            out.append({"target": f"{name} p99 of mace at {top:.0%} retrain rate within 1.2x of inference-only",
                        "measured": f"mace {_ms(mace)} ms, inference-only {_ms(base)} ms"
                                    + ("" if ratio is None else f" ({ratio:.2f}x)"),
                        "met": ratio is not None and ratio <= 1.2})
    return out


# -- plots ----------------------------------------------------------------------------------------


def _plots(results: dict[str, Any], out_dir: Path) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = {}
    if "drift" in results:
        d = results["drift"]
        fig, (ax_w, ax_c) = plt.subplots(1, 2, figsize=(11, 4))
        for policy, run in d["policies"].items():
            t = [p["t_s"] for p in run["series"]]
            ax_w.plot(t, [p["win_rate"] for p in run["series"]], marker=".", label=policy, color=COLORS.get(policy))
            ax_c.plot(t, [p["clpd_gain"] for p in run["series"]], marker=".", label=policy, color=COLORS.get(policy))
        for ax, name in ((ax_w, "win rate vs base"), (ax_c, "CLPD gain over the base model (nats)")):
            ax.axvline(d["settings"]["switch_s"], color="black", linestyle="--", linewidth=1)
            ax.set_xlabel("time (s); dashed: the oracle switches vowels -> consonants")
            ax.set_ylabel(name)
            ax.grid(alpha=0.3)
        ax_w.axhline(0.5, color="gray", linewidth=0.8)
        ax_c.axhline(0.0, color="gray", linewidth=0.8)
        ax_w.legend()
        fig.suptitle("Recovery after drift (MACE Figure 2)")
        fig.tight_layout()
        fig.savefig(out_dir / "drift.png", dpi=110)
        plt.close(fig)
        made["drift"] = "drift.png"
    if "latency" in results:
        rows = results["latency"]["rows"]
        fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharex=True)
        panels = [("ttft_ms", "p50", "TTFT p50"), ("ttft_ms", "p99", "TTFT p99"), ("itl_ms", "p50", "TBT p50"),
                  ("itl_ms", "p99", "TBT p99")]
        for ax, (key, pct, title) in zip(axes.flat, panels):
            for policy in COLORS:
                mine = sorted((r["retrain_rate"], r["latency"][key][pct]) for r in rows if r["policy"] == policy)
                if not mine:
                    continue
                ax.plot([100 * x for x, _ in mine], [y for _, y in mine], marker="o", label=policy, color=COLORS[policy])
            ax.set_title(title + " (ms)")
            ax.grid(alpha=0.3)
        for ax in axes[1]:
            ax.set_xlabel("retrain rate (%)")
        axes[0][0].legend()
        fig.suptitle("Latency vs retrain rate (MACE Figure 11)")
        fig.tight_layout()
        fig.savefig(out_dir / "latency.png", dpi=110)
        plt.close(fig)
        made["latency"] = "latency.png"
    if "ablation" in results:
        rows = results["ablation"]["rows"]
        fig, ax = plt.subplots(figsize=(7, 4))
        values = [100 * (r["latency"]["slo_attainment"] or 0.0) for r in rows]
        bars = ax.bar([r["config"].replace(" without ", "\nwithout ") for r in rows], values,
                      color=["tab:red", "tab:orange", "tab:purple"])
        ax.bar_label(bars, fmt="%.1f%%")
        ax.set_ylabel("SLO attainment (%)")
        ax.set_ylim(0, 105)
        ax.set_title("Ablation: shared system prompt, long generations (MACE Figure 12)")
        fig.tight_layout()
        fig.savefig(out_dir / "ablation.png", dpi=110)
        plt.close(fig)
        made["ablation"] = "ablation.png"
    return made


# -- Markdown -------------------------------------------------------------------------------------


def _drift_md(d: dict[str, Any]) -> list[str]:
    s = d["settings"]
    lines = [f"Poisson chat load at {s['drift_rate_per_s']:g} req/s for {s['drift_duration_s']:g} s, "
             f"{s['drift_max_tokens']} output tokens, retrain rate {s['drift_retrain_rate']:.0%}; the oracle likes vowels, "
             f"then consonants from {s['switch_s']:g} s; `periodic` retrains every {s['retrain_period_s']:g} s. Every "
             f"{s['eval_interval_s']:g} s: win rate over {len(d['eval']['prompts'])} prompts x {d['eval']['num_samples']} "
             f"samples ({d['eval']['max_tokens']} tokens) against the base model's samples taken at t = 0 with the same "
             f"seeds (a tie counts 1/2; the standard error of a win rate of that many independent comparisons at p = 0.5 "
             f"is {math.sqrt(0.25 / (len(d['eval']['prompts']) * d['eval']['num_samples'])):.2f}), and CLPD on "
             f"{len(d['eval']['prompts'])} held-out pairs of 8 words. Time to recover: from the switch to the first "
             "evaluation at 90% of the way from the first post-switch win rate to the plateau (the mean of the last 3).", "",
             "| policy | pairs trained / posted | adapter version at end | win rate after switch | plateau | time to 90% "
             "| final CLPD | its gain over base |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for policy, r in d["policies"].items():
        rec = r["recovery"]
        t90 = "never" if rec["time_to_recover_s"] is None else f"{rec['time_to_recover_s']:.1f} s"
        version = r["adapter_version"] if r["adapter_version"] is not None else "-"
        lines.append(f"| {policy} | {r['pairs_trained'] or 0} / {r['pairs_posted']} | {version} | {rec['start']:.3f} | "
                     f"{rec['plateau']:.3f} | {t90} | {r['final_clpd']:.2f} | {r['final_clpd_gain']:+.2f} |")
    base = ", ".join(f"{phase} {v:.2f}" for phase, v in next(iter(d["policies"].values()))["base_clpd"].items())
    lines += ["", f"The base model's CLPD on the held-out pairs of each taste: {base} (nats; far from 0 because the "
              "chosen and rejected words differ in token count). The gain is CLPD minus the base's on the same pairs."]
    return lines


def _latency_md(d: dict[str, Any]) -> list[str]:
    s = d["settings"]
    rates = ", ".join(f"{r:.0%}" for r in s["retrain_rates"])
    lines = [f"Poisson chat load at {s['latency_rate_per_s']:g} req/s for {s['latency_duration_s']:g} s, "
             f"{s['latency_max_tokens']} output tokens; retrain rates {rates}"
             + (" (quick mode: three of the paper's five)" if d["mode"] == "quick" else "")
             + f"; `periodic` retrains every {s['latency_retrain_period_s']:g} s here (so it does within a cell); a fresh "
             f"server per cell. TBT is the gap between streamed tokens (ITL), pooled over requests; p99 of TTFT is over "
             f"about {s['latency_rate_per_s'] * s['latency_duration_s']:.0f} requests."
             + (" `mace-banked` is `--policy mace --slo-bank-max 6`: it spends slack that fast iterations banked, up "
                "to 6 TBT budgets, on fine-tune work, where `mace` (`--slo-bank-max 1`, the default) plans no "
                "iteration longer than one budget." if any(r["policy"] == "mace-banked" for r in d["rows"]) else ""), "",
             "| retrain rate | policy | TTFT p50 (ms) | TTFT p99 | TBT p50 (ms) | TBT p99 | TPOT p99 (ms) | SLO attainment "
             "| pairs trained / posted |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in d["rows"]:
        s = r["latency"]
        lines.append(f"| {r['retrain_rate']:.0%} | {r['policy']} | {_ms(s['ttft_ms']['p50'])} | {_ms(s['ttft_ms']['p99'])} | "
                     f"{_ms(s['itl_ms']['p50'])} | {_ms(s['itl_ms']['p99'])} | {_ms(s['tpot_ms']['p99'])} | "
                     f"{s['slo_attainment']:.1%} | {r['pairs_trained'] or 0} / {r['pairs_posted']} |")
    return lines


def _ablation_md(d: dict[str, Any]) -> list[str]:
    s = d["settings"]
    lines = [f"Chat requests at {s['ablation_rate_per_s']:g} req/s for {s['ablation_duration_s']:g} s, each opening with "
             f"the same system prompt ({s['system_prompt_words']} words), {s['ablation_max_tokens']} output tokens, "
             f"retrain rate {s['ablation_retrain_rate']:.0%}, `--policy mace`, a KV pool of "
             f"{s['ablation_kv_cache_bytes'] / 2**20:g} MiB; pruning keeps {s['kv_budget']:g} of each sequence's KV "
             "(heavy hitters, H2O).", "",
             "| configuration | flags | SLO attainment | goodput | TTFT p50 (ms) | TTFT p99 | TPOT p50 (ms) | TPOT p99 "
             "| preemptions | prefix hits / queries |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in d["rows"]:
        s, m = r["latency"], r["server_metrics"]
        hits = f"{m.get('mace_prefix_cache_hits_total', 0):.0f} / {m.get('mace_prefix_cache_queries_total', 0):.0f}"
        lines.append(f"| {r['config']} | `{' '.join(r['flags'])}` | {s['slo_attainment']:.1%} | "
                     f"{s['goodput_per_s'] or 0:.2f}/s | "
                     f"{_ms(s['ttft_ms']['p50'])} | {_ms(s['ttft_ms']['p99'])} | {_ms(s['tpot_ms']['p50'])} | "
                     f"{_ms(s['tpot_ms']['p99'])} | {m.get('mace_preemptions_total', 0):.0f} | {hits} |")
    return lines


def section(results: dict[str, Any], verdicts: list[dict[str, Any]], meta: dict[str, Any], plots: dict[str, str],
            rel_dir: str) -> str:
    lines = [BEGIN, "## `mace bench paper`: MACE's evaluation on this machine", "",
             f"Command: `{meta['command']}` ({meta['mode']} mode; `make bench-paper` runs the full one). "
             f"Machine: {meta['processor']}. Took {meta['run_s']:.0f} s. Model `{meta['model']}`, served by `mace serve` "
             f"with `--learning-rate {meta['settings']['learning_rate']:g} --grad-accum {meta['settings']['grad_accum']} "
             f"--rpo-alpha {meta['settings']['rpo_alpha']:g}`; SLOs TTFT {meta['slo_ttft_ms']:g} ms and "
             f"TPOT {meta['slo_tbt_ms']:g} ms, `mace serve`'s floor defaults (this run's `mace profile --quick` suggested "
             f"{meta['profile_suggested_slos_ms'][0]:g} and {meta['profile_suggested_slos_ms'][1]:g} ms). "
             "JSON per experiment, plots and "
             f"server logs in `{rel_dir}/`.", "", "### Targets", "", "| target | measured | met |", "|---|---|---|"]
    lines += [f"| {v['target']} | {v['measured']} | {'yes' if v['met'] else '**no**'} |" for v in verdicts]
    for name, title, body in (("drift", "1. Recovery after drift (Figure 2)", _drift_md),
                              ("latency", "2. Latency vs retrain rate (Figure 11)", _latency_md),
                              ("ablation", "3. Ablation: pruning and prefix sharing (Figure 12)", _ablation_md)):
        if name in results:
            lines += ["", f"### {title}", "", *body(results[name])]
            if name in plots:
                lines += ["", f"![{title}]({rel_dir}/{plots[name]})"]
    return "\n".join([*lines, END]) + "\n"


def write_report(results: dict[str, Any], verdicts: list[dict[str, Any]], meta: dict[str, Any], out_dir: Path,
                 report: Path) -> None:
    import json

    plots = _plots(results, out_dir)
    (out_dir / "targets.json").write_text(json.dumps({"meta": meta, "targets": verdicts}, indent=2) + "\n")
    try:
        rel_dir = out_dir.resolve().relative_to(report.resolve().parent).as_posix()
    except ValueError:
        rel_dir = out_dir.resolve().as_posix()
    text = section(results, verdicts, meta, plots, rel_dir)
    old = report.read_text() if report.exists() else "# Benchmarks\n\n"
    if BEGIN in old and END in old:
        head, rest = old.split(BEGIN, 1)
        text = head + text + rest.split(END, 1)[1].lstrip("\n")
    else:
        text = old.rstrip("\n") + "\n\n" + text
    report.write_text(text)
