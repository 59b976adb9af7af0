"""`mace bench adapters`: decode throughput with a batch's requests spread over several LoRA adapters.

In-process, no HTTP: the engine is built as `mace serve` builds it (LoRA on, ``--threads``), then
extra adapters of the served adapter's shape (random weights) are added the way
``/v1/load_lora_adapter`` adds them. A batch of ``--batch`` sequences is prefilled once; each case
then runs ``--steps`` decode iterations of the whole batch from the same positions, its rows
spread round-robin over its adapters:

- ``1 (default)``: every row on the live adapter, as a request that names the served model: the
  path that existed before per-request adapters (PEFT's forward, the C step's single field set);
- ``1 (by name)``: the same rows naming the live adapter explicitly, so the per-row machinery runs
  with one group: what the machinery costs when only the live adapter is in use;
- ``N``: rows over N adapters (the live one and N - 1 loaded).

Each case runs on the whole-step C decode and on the module path (the model's modules, where
each LoRA layer adds every segment's delta). Rounds interleave the cases; each reports output
tokens/s (mean and spread over rounds) and its ratio to ``1 (default)`` in the same round.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from bench.common import cpu_name, resolve_model, save_results


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="default: the base demo model (built if missing)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--adapters", default="4,8", help="adapter counts to spread the batch over, besides 1")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=16, help="decode iterations per case and round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default="bench-results/adapters.json")


def _add_adapters(training, runner, count: int) -> list[str]:
    """``count`` adapters of the served adapter's shape, random weights; their names."""
    import torch

    from trainer.adapters import add_adapter

    model, config = training.executor.model, training.lora_config()
    template = training.executor.snapshot()
    g = torch.Generator().manual_seed(0)
    names = []
    for i in range(count):
        state = {k: torch.randn(v.shape, generator=g) * 0.05 for k, v in template.items()}
        add_adapter(model, f"bench{i}", config, state)
        names.append(f"bench{i}")
    runner.adapters_changed()
    return names


def _decode(runner, prompts, blocks, adapters: list[str | None], steps: int) -> float:
    """Seconds for ``steps`` decode iterations of every sequence, row i on ``adapters[i]``."""
    from engine.plan import IterationPlan, SequenceChunk
    from engine.sampling_params import SamplingParams

    greedy = SamplingParams(temperature=0.0)
    tokens = [p[-1] for p in prompts]
    t0 = time.perf_counter()
    for step in range(steps):
        chunks = [SequenceChunk(i, [tokens[i]], len(p) + step, blocks[i], sampling=greedy, output_index=step + 1,
                                adapter=adapters[i]) for i, p in enumerate(prompts)]
        out = runner.execute(IterationPlan(step, chunks))
        tokens = [o.token_id for o in sorted(out.outputs, key=lambda o: o.seq_id)]
    return time.perf_counter() - t0


def run(args: argparse.Namespace) -> dict:
    import torch

    from bench.cpu_profile import _engine
    from engine.plan import IterationPlan, SequenceChunk
    from engine.sampling_params import SamplingParams
    from server.flags import default_threads

    threads = args.threads or default_threads()
    core, runner = _engine(resolve_model(args.model), threads, "float32", max_num_batched_tokens=512)
    counts = sorted({int(c) for c in args.adapters.split(",")} - {1})
    loaded = _add_adapters(core.training, runner, max(counts) - 1 if counts else 0)
    live = runner.lora.default_adapter()
    cases = {"1 (default)": [None] * args.batch, "1 (by name)": [live] * args.batch}
    for n in counts:
        names = [live] + loaded[: n - 1]
        cases[str(n)] = [names[i % n] for i in range(args.batch)]

    vocab, bs = runner.model.config.vocab_size, runner.block_size
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(4, vocab, (args.prompt_len,), generator=g).tolist() for _ in range(args.batch)]
    per_seq = -(-(args.prompt_len + args.steps + 1) // bs)
    if per_seq * args.batch > runner.num_blocks:
        raise SystemExit(f"the KV pool holds {runner.num_blocks} blocks; the batch needs {per_seq * args.batch}")
    blocks = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(args.batch)]
    greedy = SamplingParams(temperature=0.0)
    for i, p in enumerate(prompts):  # prefill once, a sequence at a time (not timed)
        runner.execute(IterationPlan(0, [SequenceChunk(i, p, 0, blocks[i], sampling=greedy)]))

    paths = {"C step": runner.decode_step, "module path": None}
    rows: dict[tuple[str, str], list[float]] = {(path, case): [] for path in paths for case in cases}
    ratios: dict[tuple[str, str], list[float]] = {key: [] for key in rows}
    step = runner.decode_step
    try:
        for path, decode_step in paths.items():
            runner.decode_step = decode_step
            _decode(runner, prompts, blocks, cases["1 (default)"], 2)  # warm-up
            for _ in range(args.rounds):
                base = None
                for case, adapters in cases.items():
                    tok_s = args.batch * args.steps / _decode(runner, prompts, blocks, adapters, args.steps)
                    rows[(path, case)].append(tok_s)
                    base = tok_s if base is None else base
                    ratios[(path, case)].append(tok_s / base)
    finally:
        runner.decode_step = step
    out = []
    for (path, case), values in rows.items():
        out.append({"path": path, "adapters": case, "tok_s": values, "mean_tok_s": statistics.mean(values),
                    "ratio": ratios[(path, case)], "mean_ratio": statistics.mean(ratios[(path, case)])})
    return {"command": "mace " + " ".join(sys.argv[1:]), "processor": cpu_name(), "threads": threads,
            "batch": args.batch, "prompt_len": args.prompt_len, "steps": args.steps, "rounds": args.rounds,
            "rows": out}


def table(report: dict) -> str:
    lines = [f"Decode, batch {report['batch']} (prompts {report['prompt_len']} tokens), rows spread over N LoRA "
             f"adapters; {report['processor']}, {report['threads']} threads; {report['rounds']} rounds of "
             f"{report['steps']} steps. Command: `{report['command']}`.", "",
             "| path | adapters | output tok/s, mean (min-max) | vs 1 (default), mean (min-max) |",
             "|---|---|---:|---:|"]
    for r in report["rows"]:
        lines.append(f"| {r['path']} | {r['adapters']} | {r['mean_tok_s']:.0f} ({min(r['tok_s']):.0f}-"
                     f"{max(r['tok_s']):.0f}) | {r['mean_ratio']:.2f}x ({min(r['ratio']):.2f}-{max(r['ratio']):.2f}) |")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> dict:
    report = run(args)
    markdown = table(report)
    save_results(args.out, report, markdown)
    print(markdown)
    return report
