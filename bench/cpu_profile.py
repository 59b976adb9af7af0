"""`mace bench cpu --profile`: where one engine step's time goes on the CPU, in-process, no HTTP.

The engine is built as `mace serve` builds it (the same flags: LoRA adapters on, the planner,
``--threads``), and driven iteration by iteration through its core and runner. Three cases: a
decode step at batch 1 and at batch 16 (256-token prompts, prefilled first, not counted), and the
prefill of one 512-token prompt (all its chunks). Each is run ``steps`` times; per step:

- plan: ``EngineCore.schedule`` (the policy, block tables, the chunks);
- prepare: packing ids, positions and attention metadata (``ModelRunner._prepare``);
- forward: an iteration of decodes alone runs as one C call (engine/decode_step.py), timed as a
  whole ("C step"); each decode case also runs through the model's modules ("module path"),
  whose forward is split with torch's profiler (a second pass; its overhead is not counted) into
  matmuls (``aten::mm``/``addmm``/``bmm`` self time, LoRA's included, and the C linear kernel's
  calls as a whole), attention (the paged
  attention function, the C decode kernel or SDPA, as a whole), other tensor ops (norms, RoPE,
  activations, adds, copies) and the rest: Python and dispatch (the unprofiled forward minus the
  profiled ops);
- LoRA: the forward with the adapters on minus the same forward with them switched off;
- sampling (logits to token ids), and the results' processing (``EngineCore.process_result``:
  detokenizing, stop checks, freeing what finished).

Times are in milliseconds: for a decode, the median step; for the prefill, the sum over its chunks
(``--max-num-batched-tokens 512`` and SLOs loose enough that the planner does not cut it by
time: one chunk).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from contextlib import contextmanager
from typing import Any

import torch

_MATMUL = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"}
_ATTENTION = "mace::attention"
_LINEAR = "mace::linear"  # the C kernel for a few rows (engine/cpu_kernels.py), invisible to the profiler else
_STEP = "mace::decode_step"  # the whole-step C decode (engine/decode_step.py)


@contextmanager
def _adapters_off(model: torch.nn.Module):
    """Every LoRA layer computes its base layer alone (PEFT's own switch)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    saved = [m._disable_adapters for m in layers]
    for m in layers:
        m._disable_adapters = True
    try:
        yield len(layers)
    finally:
        for m, was in zip(layers, saved):
            m._disable_adapters = was


@contextmanager
def _labelled_kernels():
    """The registered paged attention and the C linear kernel, wrapped in profiler labels."""
    from transformers import AttentionInterface

    from engine import attention, cpu_kernels
    from engine.decode_step import DecodeStep

    def labelled(*args, **kwargs):
        with torch.profiler.record_function(_ATTENTION):
            return attention.paged_attention_forward(*args, **kwargs)

    small_linear = cpu_kernels.small_linear

    def labelled_linear(*args):
        with torch.profiler.record_function(_LINEAR):
            return small_linear(*args)

    whole_step = DecodeStep.__call__

    def labelled_step(*args):
        with torch.profiler.record_function(_STEP):
            return whole_step(*args)

    AttentionInterface.register(attention.ATTENTION_NAME, labelled)
    cpu_kernels.small_linear = labelled_linear
    DecodeStep.__call__ = labelled_step
    try:
        yield
    finally:
        AttentionInterface.register(attention.ATTENTION_NAME, attention.paged_attention_forward)
        cpu_kernels.small_linear = small_linear
        DecodeStep.__call__ = whole_step


def _engine(model: str, threads: int, dtype: str, max_num_batched_tokens: int):
    from scheduler.builder import build_engine
    from server.cli import build_parser
    from server.flags import apply_threads, engine_config, training_config
    from trainer.feedback import FeedbackStore

    state = tempfile.mkdtemp(prefix="mace-profile-")
    args = build_parser().parse_args(["serve", "--model", model, "--threads", str(threads), "--dtype", dtype,
                                      "--state-dir", state, "--max-num-batched-tokens", str(max_num_batched_tokens),
                                      # SLOs loose enough that the planner never cuts the 512-token prompt by time
                                      "--slo-ttft-ms", "100000", "--slo-tbt-ms", "10000"])
    apply_threads(args)
    store = FeedbackStore(f"{state}/feedback.sqlite3")
    return build_engine(engine_config(args), training_config(args, state), store)


def _inside(events, label: str) -> tuple[float, float]:
    """Self time (s) of matmuls and of all aten ops run inside the events named ``label``."""
    matmul = ops = 0.0
    stack = [e for e in events if e.name == label]
    while stack:
        e = stack.pop()
        stack.extend(e.cpu_children)
        if e.name in _MATMUL:
            matmul += e.self_cpu_time_total / 1e6
        if e.name.startswith("aten::"):
            ops += e.self_cpu_time_total / 1e6
    return matmul, ops


def _case(core, runner, vocab: int, batch: int, prompt_len: int, steps: int, decode: bool) -> dict[str, float]:
    from engine.sampling_params import SamplingParams

    g = torch.Generator().manual_seed(batch * 1000 + prompt_len)
    params = SamplingParams(max_tokens=steps * 2 + 8, temperature=0.0, ignore_eos=True)
    seqs = []
    for i in range(batch):
        prompt = torch.randint(4, vocab, (prompt_len,), generator=g).tolist()
        seqs.append(core.add_request(f"p{batch}-{prompt_len}-{i}-{time.perf_counter_ns()}", prompt, params))
    if decode:  # prefill first: not counted
        while any(s.num_output_tokens == 0 for s in seqs):
            core.process_result(runner.execute(core.schedule()))
    rows: dict[str, list[float]] = {k: [] for k in ("plan", "prepare", "forward", "sampling", "results",
                                                    "matmul", "attention", "other_ops", "c_step", "lora", "step")}

    def plans():
        """``steps`` decode steps, or the prompt's chunks up to its first token; each with the
        time its planning took."""
        done = 0
        while done < steps if decode else seqs[0].num_output_tokens == 0:
            done += 1
            t = time.perf_counter()
            plan = core.schedule()
            yield plan, time.perf_counter() - t

    model = runner.model
    for plan, plan_s in plans():
        # the same plan three times: profiled, adapters off, then for real (the state moves once)
        with _labelled_kernels(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            runner._infer(plan)
        events = prof.events()
        attention = sum(e.cpu_time_total for e in events if e.name == _ATTENTION) / 1e6
        c_step = sum(e.cpu_time_total for e in events if e.name == _STEP) / 1e6
        in_step = _inside(events, _STEP)[1]  # its tensors: positions' cos/sin, ids, the logits
        in_matmul, in_ops = _inside(events, _ATTENTION)  # counted in the attention's total
        in_linear = _inside(events, _LINEAR)[1]  # its output's allocation, reshapes
        aten_matmul = sum(e.self_cpu_time_total for e in events if e.name in _MATMUL) / 1e6 - in_matmul
        matmul = aten_matmul + sum(e.cpu_time_total for e in events if e.name == _LINEAR) / 1e6
        # the other tensor ops: outside the attention and the C kernel's calls, not matmuls
        aten = sum(e.self_cpu_time_total for e in events if e.name.startswith("aten::")) / 1e6
        other = aten - in_ops - in_linear - in_step - aten_matmul
        with _adapters_off(model):
            off = runner._infer(plan).forward_s
        t = time.perf_counter()
        result = runner.execute(plan)
        t_results = time.perf_counter()
        core.process_result(result)
        done = time.perf_counter()
        for key, value in (("plan", plan_s), ("prepare", result.prepare_s), ("forward", result.forward_s),
                           ("sampling", result.sample_s), ("results", done - t_results), ("matmul", matmul),
                           ("attention", attention), ("other_ops", max(0.0, other)), ("c_step", c_step),
                           ("lora", result.forward_s - off), ("step", done - t + plan_s)):
            rows[key].append(value)
    for s in seqs:
        core.abort(s.request_id)
    if decode:  # one step is one token per sequence: the median step
        med = {k: statistics.median(v) * 1e3 for k, v in rows.items() if v}
    else:  # the prompt's chunks, all of them
        med = {k: sum(v) * 1e3 for k, v in rows.items() if v}
    # what the profiler did not see inside the forward: Python, module calls, dispatch
    med["python_dispatch"] = max(0.0, med["forward"] - med["matmul"] - med["attention"] - med["other_ops"]
                                 - med["c_step"])
    med["steps"] = len(rows["step"])
    med["tokens"] = prompt_len if not decode else batch
    return med


def profile(model: str, threads: int, dtype: str, steps: int = 20) -> dict[str, Any]:
    core, runner = _engine(model, threads, dtype, max_num_batched_tokens=512)
    vocab = runner.model.config.vocab_size
    cases = {}
    for batch in (1, 16):
        cases[f"decode, batch {batch}"] = _case(core, runner, vocab, batch, 256, steps, decode=True)
        step, runner.decode_step = runner.decode_step, None
        try:
            cases[f"decode, batch {batch}, module path"] = _case(core, runner, vocab, batch, 256, steps, decode=True)
        finally:
            runner.decode_step = step
    cases["prefill, 512 tokens"] = _case(core, runner, vocab, 1, 512, steps, decode=False)
    return {"threads": threads, "dtype": dtype, "cases": cases}


COLUMNS = (("steps", "steps"), ("step", "whole step"), ("plan", "plan"), ("prepare", "prepare"), ("forward", "forward"),
           ("c_step", "C step"), ("matmul", "matmuls"), ("attention", "attention"), ("other_ops", "other ops"),
           ("python_dispatch", "Python + dispatch"), ("lora", "LoRA"), ("sampling", "sampling"),
           ("results", "results + detokenize"))


def table(result: dict[str, Any]) -> str:
    lines = ["| case | " + " | ".join(label for _, label in COLUMNS) + " |", "|---|" + "---:|" * len(COLUMNS)]
    for name, med in result["cases"].items():
        cells = (str(med[key]) if key == "steps" else f"{med[key]:.2f}" for key, _ in COLUMNS)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
