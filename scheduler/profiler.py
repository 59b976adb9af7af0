"""`mace profile`: measure what iterations cost on this machine and model, fit the cost model.

Synthetic plans go straight to the runner (no scheduler, no requests): prefill chunks of several
sizes at several context offsets, decode batches of several sizes and context lengths, and (when
a fine-tune executor is attached) DPO gradient chunks, one-sequence parts and reference passes
of several token counts, each timed a few
times (the median counts). For the gradient chunks it also measures memory: the bytes of the
tensors autograd saves for the backward (``saved_tensors_hooks``, each storage counted once),
which is what a fine-tune token holds beyond the weights while its chunk runs; their ratio to
the tokens is ``finetune_bytes_per_token`` (the largest seen). Least squares over the measurements gives the coefficients
(``scheduler.cost_model``); serving keeps correcting them from measured iterations.

The runner is stateless between iterations, so the plans use block ids directly: sequence ``i``
of a plan owns blocks ``[i * nb, (i + 1) * nb)``. Gradients of profiled fine-tune chunks are
dropped afterwards; no optimizer step is taken.
"""

from __future__ import annotations

import dataclasses
import random
import statistics
import time

from engine.plan import FinetuneChunk, IterationPlan, PreferencePair, SequenceChunk
from engine.runner import ModelRunner
from engine.sampling_params import SamplingParams
from scheduler.cost_model import CostModel, IterationShape, shape_of

GREEDY = SamplingParams(max_tokens=1, temperature=0.0)


def _grid(quick: bool) -> tuple[list[tuple[int, int]], list[tuple[int, int]], list[int]]:
    prefill = [(16, 0), (64, 0), (64, 256), (128, 0), (128, 512)]  # (chunk tokens, context before it)
    decode = [(1, 64), (8, 256), (16, 64), (16, 512), (32, 256)]  # (batch, context)
    # (kind, tokens): whole DPO pairs, one-sequence parts, the first layer units of a part (the
    # planner's smallest gradient pieces: "units:K" runs K of them) and reference passes, small
    # and large, so the fit can tell a chunk's fixed cost from its tokens
    finetune = [("gradient", 64), ("gradient", 128), ("gradient", 256), ("chosen", 24), ("chosen", 48),
                ("units:1", 96), ("units:3", 96), ("reference", 64), ("reference", 256)]
    if not quick:
        prefill += [(32, 0), (256, 0), (256, 768), (512, 0)]
        decode += [(1, 1024), (4, 128), (32, 64), (32, 1024), (64, 512)]
        finetune += [("gradient", 512), ("chosen", 96)]
    return prefill, decode, finetune


def profile(runner: ModelRunner, max_model_len: int, quick: bool = False, repeats: int = 3,
            progress: bool = True) -> tuple[CostModel, list[dict]]:
    """Measure and fit; returns the model and the measurements (shape, median seconds)."""
    bs = runner.block_size
    rng = random.Random(0)
    vocab = runner.model.config.vocab_size
    prefill, decode, finetune = _grid(quick)
    plans: list[IterationPlan] = []
    for n, ctx in prefill:
        if ctx + n <= max_model_len and -(-(ctx + n) // bs) <= runner.num_blocks:
            tokens = [rng.randrange(vocab) for _ in range(ctx + n)]
            table = list(range(-(-(ctx + n) // bs)))
            if ctx:  # the context first, unmeasured, so the chunk attends over real keys
                runner.execute(IterationPlan(0, [SequenceChunk(0, tokens[:ctx], 0, table)]))
            plans.append(IterationPlan(0, [SequenceChunk(0, tokens[ctx:], ctx, table, sampling=GREEDY)]))
    for batch, ctx in decode:
        nb = -(-(ctx + 1) // bs)
        if ctx + 1 <= max_model_len and batch * nb <= runner.num_blocks:
            chunks = [SequenceChunk(i, [rng.randrange(vocab)], ctx, list(range(i * nb, (i + 1) * nb)), sampling=GREEDY)
                      for i in range(batch)]
            plans.append(IterationPlan(0, chunks))
    if runner.finetune_executor is not None:
        for kind, tokens in finetune:
            # a pair: prompt n, chosen 2n, rejected 2n (2n + 2n + 2n tokens); a part: prompt n, chosen 2n
            is_part = kind == "chosen" or kind.startswith("units:")
            n = max(4, tokens // (3 if is_part else 6))
            pair = PreferencePair("profile", [rng.randrange(vocab) for _ in range(n)],
                                  [rng.randrange(vocab) for _ in range(2 * n)], [rng.randrange(vocab) for _ in range(2 * n)],
                                  0.0, 0.0)
            if kind.startswith("units:"):
                weights = runner.finetune_executor.stages.costs.weights(n, 2 * n)
                k = int(kind.split(":")[1])
                chunk = FinetuneChunk(0, "gradient", [pair], part="chosen", units=(0, k),
                                      share=sum(weights[:k]) / sum(weights))
            elif kind == "chosen":
                chunk = FinetuneChunk(0, "gradient", [pair], part="chosen")
            else:
                chunk = FinetuneChunk(0, kind, [pair])
            plans.append(IterationPlan(0, [], finetune=chunk))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(plans) * (repeats + 1), desc="profiling", unit="iteration")
    shapes, times, rows = [], [], []
    bytes_per_token = 0.0
    for plan in plans:
        measured = []
        if plan.finetune is not None and plan.finetune.has_grad:
            saved = saved_bytes(runner.execute, plan)
            bytes_per_token = max(bytes_per_token, saved / plan.finetune.num_tokens)
        for r in range(repeats + 1):  # the first run warms up and is not counted
            t0 = time.perf_counter()
            runner.execute(plan)
            if r:
                measured.append(time.perf_counter() - t0)
            if bar is not None:
                bar.update()
        shape = shape_of(plan.chunks)
        if plan.finetune is not None:
            shape = IterationShape(num_finetune_tokens=plan.finetune.cost_tokens,
                                   num_finetune_chunks=plan.finetune.cost_chunks)
        shapes.append(shape)
        times.append(statistics.median(measured))
        rows.append({"shape": dataclasses.asdict(shape), "seconds": times[-1]})
    if bar is not None:
        bar.close()
    model = CostModel.fit(shapes, times)
    if runner.finetune_executor is not None:
        runner.finetune_executor.optimizer.zero_grad(set_to_none=True)
        runner.finetune_executor._chosen_part = None  # the profiled parts' halves
        runner.finetune_executor._job = runner.finetune_executor._ref_job = None
        model.finetune_bytes_per_token = bytes_per_token
    return model, rows


def saved_bytes(fn, *args) -> int:
    """Bytes of the distinct storages autograd saves for backward while ``fn(*args)`` runs."""
    import torch

    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return sum(seen.values())
