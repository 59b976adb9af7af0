"""An aligned adapter per tenant: each tenant's feedback trains its own adapter pair on the one
served model, in the same iterations as everyone's inference.

``mace serve --tenants FILE`` (one ``API_KEY TENANT`` pair a line) builds one ``Training`` per
tenant beside the default one: the tenant's (serving, trainable) pair on the model, its own
feedback store and checkpoints under ``STATE_DIR/tenants/TENANT/``, its own trainer and
executor. The core still plans one fine-tune offer per iteration: ``TrainerGroup`` asks every
trainer and offers the one whose next pair has the highest estimated DPO loss plus what its
work has waited (``WAIT_WEIGHT`` of loss a second), so the slack goes where the adapters are
most wrong and no tenant starves behind another's losses; ``ExecutorGroup`` runs each chunk with
its tenant's executor (the chunk names the tenant).
"""

from __future__ import annotations

import re
from pathlib import Path

from engine.plan import FinetuneChunk, FinetuneOffer, FinetuneResult

# A second of waiting counts as this much estimated DPO loss (ln 2 ~ 0.69 is a fresh pair's).
WAIT_WEIGHT = 0.1
_TENANT = re.compile(r"[A-Za-z0-9_-]{1,64}")


def read_tenants(path: str | Path) -> dict[str, str]:
    """``API_KEY TENANT`` a line (blank lines and ``#`` comments skipped) -> {key: tenant}.
    Raises ValueError naming the line for a malformed one, a tenant name that is not
    ``[A-Za-z0-9_-]{1,64}``, or a key given twice."""
    tenants: dict[str, str] = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2 or not _TENANT.fullmatch(parts[1]):
            raise ValueError(f"{path}:{number}: expected `API_KEY TENANT` with TENANT of [A-Za-z0-9_-], got {line!r}")
        if parts[0] in tenants:
            raise ValueError(f"{path}:{number}: the key is given twice")
        tenants[parts[0]] = parts[1]
    return tenants


class TrainerGroup:
    """Several trainers behind the interface the core plans with (``offer``, ``next_chunk``,
    ``on_result``, ``on_failure``, ``has_work``). Keys: tenant names, None for the default."""

    def __init__(self, trainers: dict) -> None:
        self.trainers = trainers
        self._chosen = None
        self._owner: dict[int, str | None] = {}  # chunk task id -> its trainer

    @property
    def has_work(self) -> bool:
        return any(t.has_work for t in self.trainers.values())

    def offer(self, now: float) -> FinetuneOffer | None:
        best = None
        for name, trainer in self.trainers.items():
            offer = trainer.offer(now)
            if offer is None:
                continue
            score = offer.loss + WAIT_WEIGHT * offer.wait_s
            if best is None or score > best[0]:
                best = (score, name, offer)
        self._chosen = best[1] if best is not None else None
        return best[2] if best is not None else None

    def next_chunk(self, max_tokens: int) -> FinetuneChunk | None:
        chunk = self.trainers[self._chosen].next_chunk(max_tokens)
        if chunk is not None:
            chunk.tenant = self._chosen
            self._owner[chunk.task_id] = self._chosen
        return chunk

    def on_result(self, result: FinetuneResult) -> None:
        self.trainers[self._owner.pop(result.task_id)].on_result(result)

    def on_failure(self, task_id: int) -> None:
        if task_id in self._owner:
            self.trainers[self._owner.pop(task_id)].on_failure(task_id)


class ExecutorGroup:
    """Runs each fine-tune chunk with its tenant's executor; anything else reads the default's."""

    def __init__(self, executors: dict) -> None:
        self.executors = executors

    def run(self, chunk: FinetuneChunk) -> FinetuneResult:
        return self.executors[chunk.tenant].run(chunk)

    def __getattr__(self, name: str):
        return getattr(self.executors[None], name)
