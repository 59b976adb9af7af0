"""The interface every scheduling policy implements, and the values that cross it.

Once per iteration the engine core hands its policy the trainer's offer (what fine-tune work is
ready, as a value) and gets one ``SchedulerOutput`` back:

    offer = trainer.offer(now)              # FinetuneOffer, or None: nothing ready
    out = policy.schedule(offer)            # the inference work and the fine-tune budget
    chunk = trainer.next_chunk(out.finetune_tokens) if out.finetune_tokens else None

A policy plans over the core's ``SequenceQueues`` (it admits, grows, preempts and prunes
sequences there; the blocks a scheduled sequence needs are allocated before ``schedule``
returns) and prices with the core's ``CostModel``. It never sees tensors, the trainer or the
runner. Policies are registered by name in ``scheduler/policies.py``.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from engine.config import SchedulerConfig
from scheduler.cost_model import CostModel
from scheduler.queues import SequenceQueues
from scheduler.request import Sequence


@dataclass(frozen=True, slots=True)
class FinetuneOffer:
    """What the trainer can add to an iteration. Its sizes are tokens the trainer can cut a piece
    at; the policy decides how many it makes room for."""

    # The smallest piece: the next part of a pair cut in two, one pair's reference pass, or the
    # first sequence of a pair ready to train.
    min_tokens: int
    # The next piece when nothing is cut: one whole pair (or the next part of a cut one).
    whole_tokens: int
    loss: float  # the last DPO loss of the pair trained next (the recent mean, ln 2 at first)
    wait_s: float  # since the work became ready or a piece last ran
    # The smallest piece's price per token relative to a gradient token: 1/3 when it is a
    # forward without backward (a reference pass). Tokens past it price at 1.
    min_cost_factor: float = 1.0


@dataclass(slots=True)
class ScheduledSequence:
    seq: Sequence
    num_new_tokens: int


@dataclass(slots=True)
class SchedulerOutput:
    """One iteration as a policy planned it."""

    # Inference work: the sequences that run and how many new tokens each computes.
    scheduled: list[ScheduledSequence]
    # Tokens of fine-tune work the iteration makes room for (0: none); the trainer cuts the piece.
    finetune_tokens: int = 0
    # Seconds the policy expects the iteration to take by its own pricing (None: it does not price).
    predicted_s: float | None = None
    # The latency the policy planned the iteration against (None: it plans by tokens, not time).
    capacity_s: float | None = None


class Policy(abc.ABC):
    """Decides what each iteration carries: which inference work, and how much fine-tune work."""

    name: ClassVar[str]
    # Whether it plans by time (the cost model's prices against the SLOs) rather than by tokens:
    # such a policy wants a measured cost profile, and its token cap only stops pathological plans.
    plans_by_time: ClassVar[bool] = False

    @classmethod
    def default_max_num_batched_tokens(cls, is_cpu: bool) -> int:
        """The per-iteration token cap when none is configured. By tokens, the cap bounds an
        iteration's time (on CPU a token costs about a millisecond of a 60M model)."""
        if cls.plans_by_time:
            return 256 if is_cpu else 8192
        return 64 if is_cpu else 2048

    def __init__(self, queues: SequenceQueues, config: SchedulerConfig, cost_model: CostModel,
                 clock: Callable[[], float]) -> None:
        if config.max_num_batched_tokens is None:
            raise ValueError("max_num_batched_tokens must be set (the engine builder picks one per device)")
        if config.slo_ttft_ms is None or config.slo_tbt_ms is None:
            raise ValueError("the SLOs must be set (SchedulerConfig.with_slos)")
        self.queues = queues
        self.config = config
        self.cost_model = cost_model
        self.clock = clock

    def default_slos_ms(self) -> tuple[float, float]:
        """(TTFT, TBT) for requests that set none: the configured ones (a policy may learn its own)."""
        return self.config.slo_ttft_ms, self.config.slo_tbt_ms

    @property
    def slo_infeasible(self) -> bool:
        """Whether inference alone takes longer than the TBT SLO set allows (policies that measure it)."""
        return False

    def predicted_ttft_s(self, num_prompt_tokens: int) -> float | None:
        """When a request arriving now would see its first token (None: the policy cannot tell)."""
        return None

    @abc.abstractmethod
    def schedule(self, offer: FinetuneOffer | None) -> SchedulerOutput:
        """Plan the next iteration. ``offer``: the fine-tune work ready now (None: none, or no
        trainer). An output with nothing scheduled and no fine-tune tokens means "nothing to run"."""
