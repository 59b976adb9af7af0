"""``mace serve --trace-iterations FILE``: one JSON line per iteration, to diagnose the planner.

Each line holds what the policy planned (decodes, prefill tokens, the fine-tune chunk), what the
cost model predicted, the latency it planned against (policies that plan by time), and what the
iteration measured on the worker. Failed iterations are left out.
"""

from __future__ import annotations

import json
from typing import TextIO

from scheduler.async_engine import IterationRecord


class IterationTrace:
    """An ``AsyncEngine`` observer that writes to ``file`` (its owner closes it)."""

    def __init__(self, file: TextIO) -> None:
        self.file = file

    def __call__(self, record: IterationRecord) -> None:
        if record.result is None:
            return
        plan, result = record.plan, record.result
        # A decode feeds one output token back; a prompt's last piece may be one token too (a
        # planner that cuts prompts by time can leave one), but it samples the first output.
        decodes = [len(c.token_ids) == 1 and c.output_index > 0 for c in plan.chunks]
        line = {"iteration": plan.iteration, "t": record.planned_at_s, "plan_s": record.plan_s, "decodes": sum(decodes),
                "prefill_tokens": sum(len(c.token_ids) for c, d in zip(plan.chunks, decodes) if not d),
                "predicted_s": plan.predicted_s}
        if plan.capacity_s is not None:
            line["capacity_s"] = plan.capacity_s
        if plan.finetune is not None:
            ft = plan.finetune
            line["finetune"] = {"kind": ft.kind, "part": ft.part, "tokens": ft.num_tokens, "pairs": len(ft.pairs),
                                "step": ft.step}
        line["measured_s"] = result.total_s
        if result.finetune is not None:
            line["finetune_s"] = result.finetune.elapsed_s
            line["step"] = result.finetune.stepped
        self.file.write(json.dumps(line) + "\n")
