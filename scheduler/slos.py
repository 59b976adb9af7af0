"""The default SLOs a policy that plans by time (mace) plans for, learned from the load.

A server started without SLOs cannot know which ones its machine and its load allow: a start-up
profile predicts a decode step of a batch it may never see. So when neither SLO is given, the
planner learns them from what it measures (the cost model, corrected online by every
iteration's measured time, prices the work it plans):

    TBT  = TBT_FACTOR  x median over recent iterations of the predicted cost of all running decodes
    TTFT = TTFT_FACTOR x median over recent admissions of the predicted cost of the prompt alone
           + 2 x TBT

so the TBT budget is what inference alone takes at the current load with room for a prefill
chunk beside it, and the fine-tune work fills the rest. The decodes' cost is measured before the
planner's decode cap, so a budget too small does not hide the load that outgrew it. Until
``MIN_SAMPLES`` observations, the same formulas on one decode of ``START_CONTEXT`` tokens and a
prompt of that length.

An SLO the user set is kept; if inference alone does not meet it (the recent median decode cost
is past its budget) the SLO is ``infeasible``: logged once when it becomes so, exported as a
metric, and the planner then gives fine-tune work a small guaranteed share (scheduler/mace.py).
"""

from __future__ import annotations

import logging
import statistics
from collections import deque

from engine.config import SchedulerConfig
from scheduler.cost_model import CostModel, IterationShape

log = logging.getLogger(__name__)

TBT_FACTOR = 3.0
TTFT_FACTOR = 3.0
MIN_SAMPLES = 16
WINDOW = 256
START_CONTEXT = 256
MIN_TBT_MS, MIN_TTFT_MS = 5.0, 50.0


class Slos:
    def __init__(self, config: SchedulerConfig, cost_model: CostModel) -> None:
        self.margin = config.slo_margin
        self.learn_ttft = "ttft" in config.learned_slos
        self.learn_tbt = "tbt" in config.learned_slos
        self.cost_model = cost_model
        self.ttft_ms, self.tbt_ms = config.slo_ttft_ms, config.slo_tbt_ms
        self.infeasible = False  # the TBT SLO the user set is past what inference alone takes
        self._decode_s: deque[float] = deque(maxlen=WINDOW)
        self._prompt_s: deque[float] = deque(maxlen=WINDOW)
        self._since_update = 0
        decode = cost_model.predict(IterationShape(num_decodes=1, decode_context=START_CONTEXT))
        self._update(decode, cost_model.prefill_cost(START_CONTEXT, 0))

    def observe_decodes(self, seconds: float) -> None:
        """The predicted cost of one iteration's running decodes, all of them."""
        self._decode_s.append(seconds)
        self._since_update += 1
        if self._since_update >= MIN_SAMPLES and len(self._decode_s) >= MIN_SAMPLES:
            self._since_update = 0
            prompt = statistics.median(self._prompt_s) if len(self._prompt_s) >= MIN_SAMPLES else None
            self._update(statistics.median(self._decode_s), prompt)

    def observe_prompt(self, seconds: float) -> None:
        """The predicted cost of an admitted request's prompt, prefilled alone."""
        self._prompt_s.append(seconds)

    def median_prompt_s(self) -> float | None:
        """The median predicted prefill of recent admitted prompts (None: too few yet)."""
        return statistics.median(self._prompt_s) if len(self._prompt_s) >= MIN_SAMPLES else None

    def _update(self, decode_s: float, prompt_s: float | None) -> None:
        if self.learn_tbt:
            self.tbt_ms = round(max(MIN_TBT_MS, TBT_FACTOR * decode_s * 1e3), 1)
        elif len(self._decode_s) >= MIN_SAMPLES:
            infeasible = decode_s * 1e3 > self.tbt_ms * (1 - self.margin)
            if infeasible and not self.infeasible:
                log.warning("the TBT SLO (%.0f ms) is past what inference alone takes at this load: the running "
                            "decodes cost %.0f ms a step (median of the last %d iterations); fine-tune work gets "
                            "only its guaranteed share", self.tbt_ms, decode_s * 1e3, len(self._decode_s))
            elif self.infeasible and not infeasible:
                log.info("the TBT SLO (%.0f ms) holds again at this load", self.tbt_ms)
            self.infeasible = infeasible
        if self.learn_ttft and prompt_s is not None:
            self.ttft_ms = round(max(MIN_TTFT_MS, TTFT_FACTOR * prompt_s * 1e3 + 2 * self.tbt_ms), 1)
