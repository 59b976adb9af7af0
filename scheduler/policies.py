"""The scheduling policies by name, and the three that plan inference first come first served.

| policy | inference | fine-tune work per iteration |
|---|---|---|
| ``inference-only`` | FCFS | none |
| ``synchronous`` | FCFS | a chunk of ``finetune_tokens_per_iteration`` (at least one whole pair) whenever pairs wait, SLO-blind |
| ``periodic`` | FCFS | none between bursts; every ``retrain_period_s`` a burst of such chunks until no pair waits (Ekya-style) |
| ``mace`` | MACE planner | what the TBT SLO's slack leaves, packed best-fit with prefills (``scheduler/mace.py``) |

A new policy is a ``Policy`` subclass with a ``name``, added to ``POLICIES``.
"""

from __future__ import annotations

from collections.abc import Callable

from engine.config import SchedulerConfig
from scheduler.cost_model import CostModel
from scheduler.fcfs import plan_fcfs
from scheduler.mace import MacePolicy
from scheduler.policy import FinetuneOffer, Policy, SchedulerOutput
from scheduler.queues import SequenceQueues


class _Fcfs(Policy):
    """FCFS inference; subclasses say how many fine-tune tokens ride along."""

    def schedule(self, offer: FinetuneOffer | None) -> SchedulerOutput:
        c = self.config
        scheduled = plan_fcfs(self.queues, c.max_num_batched_tokens, c.max_num_seqs, c.enable_chunked_prefill)
        return SchedulerOutput(scheduled, finetune_tokens=self.finetune_tokens(offer))

    def finetune_tokens(self, offer: FinetuneOffer | None) -> int:
        return 0


class InferenceOnly(_Fcfs):
    name = "inference-only"


class Synchronous(_Fcfs):
    name = "synchronous"

    def finetune_tokens(self, offer: FinetuneOffer | None) -> int:
        if offer is None:
            return 0
        # a fixed chunk, but at least one whole pair (it has no slack to cut it for)
        return max(self.config.finetune_tokens_per_iteration, offer.whole_tokens)


class Periodic(_Fcfs):
    name = "periodic"

    def __init__(self, queues: SequenceQueues, config: SchedulerConfig, cost_model: CostModel,
                 clock: Callable[[], float]) -> None:
        super().__init__(queues, config, cost_model, clock)
        self.next_burst_s = clock() + config.retrain_period_s
        self.burst_started_s: float | None = None

    def finetune_tokens(self, offer: FinetuneOffer | None) -> int:
        now = self.clock()
        if self.burst_started_s is None and offer is not None and now >= self.next_burst_s:
            self.burst_started_s = now
        if self.burst_started_s is not None and offer is None:
            self.burst_started_s = None  # the burst is over: the next one a period after it ended
            self.next_burst_s = now + self.config.retrain_period_s
        if self.burst_started_s is None or offer is None:
            return 0
        return max(self.config.finetune_tokens_per_iteration, offer.whole_tokens)


POLICIES: dict[str, type[Policy]] = {p.name: p for p in (InferenceOnly, Synchronous, Periodic, MacePolicy)}


def policy_class(name: str) -> type[Policy]:
    try:
        return POLICIES[name]
    except KeyError:
        raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {name!r}") from None


def make_policy(queues: SequenceQueues, config: SchedulerConfig, cost_model: CostModel,
                clock: Callable[[], float]) -> Policy:
    return policy_class(config.policy)(queues, config, cost_model, clock)
