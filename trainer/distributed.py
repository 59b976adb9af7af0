"""One adapter trained by several serving replicas: a coordinator owns the feedback, the
optimizer and the checkpoints; every replica computes DPO gradients in its own slack.

    replica (any number)                       coordinator (one; a Ray actor under Ray Serve)
    POST /v1/feedback --------- add ---------> SQLite (WAL), committed before the answer
    trainer.refill ------------ lease -------> pending pairs, a fair share, leased to it
    reference log-probs ------- set_reference> stored with the pair (the base model's: any replica's)
    executor accumulates grads
      a "step" ---------------- submit ------> summed; at grad_accum pairs (or nothing else
                                               out, or max_step_delay_s): clip, AdamW step,
                                               version + 1, checkpoint, pairs trained
    sync loop ----------------- poll --------> returns at a new version (its weights) or new
                                               pending pairs; also the replica's heartbeat
    adopt the weights at the next iteration boundary

Stale gradients. A replica keeps serving and computing gradients while a step lands: a gradient
accumulated from weights ``g`` changes old (the coordinator's ``generation`` counts every change
of the weights: steps and rollbacks) is summed into the next step when ``g <= max_staleness``
(default 1: bounded-staleness asynchronous SGD, as in parameter servers), else dropped, and its
pairs go back to pending for a replica to train on fresh weights (nothing is lost; the work is
redone). A gradient from weights older than a rollback is always dropped. A replica serves a
new version from its next iteration; its trainable adapter takes it too, unless a pass cut at
decoder layers is part-way (its autograd graph holds the trainable weights: then when that pass
ends), and what it hands over is labelled with the oldest weights any of its pieces saw.

Leases. A replica that stops polling for ``lease_s`` (killed, or stuck) loses its leases and
those pairs are handed to the others. Leases and accumulated gradients live in the coordinator's
memory only: a restarted coordinator resumes from its store and its latest checkpoint, every
pair not yet checkpointed as trained is pending again (at least once, as on one machine), and
the replicas adopt the checkpoint's version at their next poll.

The ``Coordinator`` is plain Python (tests drive it in-process); ``server.ray_serve`` makes it an
actor. Its methods are thread-safe (one lock); ``poll`` waits on its own event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import logging
import math
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engine.config import TrainingConfig
from trainer.checkpoint import (adapter_config_json, checkpoints, latest_checkpoint, load_checkpoint_state, max_version_on_disk,
                                rollback_name, write_checkpoint)
from trainer.optim import make_adamw
from trainer.feedback import FeedbackPair, FeedbackStore, NewPair, StoreUnavailable

log = logging.getLogger(__name__)


@dataclass
class Update:
    """What ``poll`` answers: the serving version (with its weights when the caller's differs)
    and the count of pairs ever made leasable (new or released), which moves when there is
    work to lease."""

    version: int
    weights: object  # the weights (dict of tensors), or an awaitable of them (a Ray object ref); None: unchanged
    work_seq: int
    training_enabled: bool = True
    generation: int = 0  # changes of the weights so far (steps and rollbacks)
    rolled_back: bool = False  # these weights come from a rollback: drop gradients of older ones
    registered: bool = True  # False: the coordinator restarted with no weights; register again


@dataclass
class _Accumulation:
    grads: dict[str, torch.Tensor] = field(default_factory=dict)
    pair_ids: list[str] = field(default_factory=list)
    since: float | None = None


class Coordinator:
    def __init__(self, state_dir: str | Path, config: TrainingConfig, *, lease_s: float = 10.0,
                 max_staleness: int = 1, clock: Callable[[], float] = time.monotonic) -> None:
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.config = config
        self.lease_s = lease_s
        self.max_staleness = max_staleness
        self.clock = clock
        self.store = FeedbackStore(self.state_dir / "feedback.sqlite3")
        self._lock = threading.RLock()
        self.version = self.max_version = 0
        self.weights: dict[str, torch.Tensor] | None = None  # the serving version's (CPU, keyed as a checkpoint)
        latest = latest_checkpoint(self.state_dir)
        self.config_json: str | None = None  # adapter_config.json: the checkpoint's, else the first replica's
        if latest is not None:
            self.weights = load_checkpoint_state(latest[0])
            self.config_json = (latest[0] / "adapter_config.json").read_text()
            self.version, self.max_version = latest[1], max_version_on_disk(self.state_dir)
            log.info("coordinator resumed the adapter from %s (version %d)", latest[0], self.version)
        self._params: dict[str, torch.nn.Parameter] = {}
        self._optimizer: torch.optim.Optimizer | None = None
        if self.weights is not None:
            self._ensure_optimizer()
        self._leases: dict[str, tuple[str, float]] = {}  # pair id -> (replica, leased at)
        self._submitted: set[str] = set()  # in the accumulation or a step not yet on disk
        self._acc = _Accumulation()
        self._seen: dict[str, float] = {}  # replica -> last poll
        self.work_seq = 0
        # Every change of the weights (steps, rollbacks) adds one. It starts at this start's time
        # in milliseconds, so gradients from before a restart are far behind (dropped as stale)
        # and no replica's generation equals a restarted coordinator's by chance.
        self.generation = self._start_generation = int(time.time() * 1000)
        self._rollback_generation = self.generation  # the generation the last rollback made
        self.training_enabled = True
        self._stepped_at: dict[int, float] = {}  # generation -> wall time of the change
        self._replica_versions: dict[str, tuple[int, int]] = {}  # replica -> (generation, version) it serves
        self._replica_stats: dict[str, dict] = {}  # replica -> its counters, as of its last poll
        self._shared: tuple[int, object] | None = None  # (generation, share(weights)) of the last change
        self.broadcast_s: list[float] = []  # change -> a replica serving it, recent
        self._changed: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="mace-coordinator-ckpt")  # in order, off the caller
        # counters (the coordinator's /metrics and /v1/adapters)
        self.num_steps = 0
        self.num_skipped_steps = 0
        self.num_stale = 0  # gradients dropped as too stale
        self.pairs_by_replica: dict[str, int] = {}
        self.step_s: list[float] = []  # recent step times (seconds)
        self.submit_s: list[float] = []  # recent times to add a replica's gradients (seconds)

    # -- replicas joining -------------------------------------------------------------------------

    def register(self, replica: str, weights: dict[str, torch.Tensor], config_json: str) -> Update:
        """A replica starting: the first one's initial adapter seeds version 0 when no checkpoint
        exists; every replica gets the serving version's weights back."""
        with self._lock:
            if self.weights is None:
                self.weights = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in weights.items()}
                self._ensure_optimizer()  # now, not inside the first step
            if self.config_json is None:
                self.config_json = config_json
            self._seen[replica] = self.clock()
            return self._update(None)

    def _update(self, generation: int | None) -> Update:
        """The state for a replica that serves ``generation`` (None: nothing yet)."""
        rolled_back = self._rollback_generation == self.generation != self._start_generation
        weights = None
        if generation != self.generation and self.weights is not None:
            if self._shared is None or self._shared[0] != self.generation:
                self._shared = (self.generation, self.share(self.weights))
            weights = self._shared[1]
        return Update(self.version, weights, self.work_seq, self.training_enabled, self.generation, rolled_back,
                      self.weights is not None)

    def share(self, weights: dict[str, torch.Tensor]) -> object:
        """What updates carry for ``weights``, made once per change: the weights themselves here;
        the Ray actor puts them in the object store once, and every replica's update carries the
        reference (one serialization per step, not one per replica)."""
        return weights

    # -- the feedback store -----------------------------------------------------------------------

    def add(self, pairs: Sequence[NewPair]) -> list[tuple[str, bool]]:
        """Store pairs (committed before returning: the replica acknowledges after this)."""
        results = self.store.add(pairs)
        if any(is_new for _, is_new in results):
            self._work_changed()
        return results

    def lease(self, replica: str, limit: int, exclude: Iterable[str] = ()) -> list[FeedbackPair]:
        """Pending pairs for ``replica`` to train: none leased to a live replica or submitted,
        at most its fair share of what is out or waiting (so every replica's slack gets work)."""
        with self._lock:
            now = self.clock()
            self._seen[replica] = now
            self._expire(now)
            busy = set(self._leases) | self._submitted | set(exclude)
            free = self.store.pending(limit + len(busy), busy)
            live = max(1, sum(now - seen < self.lease_s for seen in self._seen.values()))
            mine = sum(r == replica for r, _ in self._leases.values())
            share = max(1, math.ceil((len(free) + len(self._leases)) / live) - mine)
            pairs = free[: min(limit, share)]
            for p in pairs:
                self._leases[p.id] = (replica, now)
            return pairs

    def _expire(self, now: float) -> None:
        """Leases of replicas not heard from for lease_s go back."""
        dead = {r for r, seen in self._seen.items() if now - seen >= self.lease_s}
        if not dead:
            return
        released = [i for i, (r, _) in self._leases.items() if r in dead]
        for i in released:
            del self._leases[i]
        for r in dead:
            del self._seen[r]
        if released:
            log.warning("released %d pairs leased to replicas gone quiet: %s", len(released), sorted(dead))
            self._work_changed()

    def set_reference(self, pair_id: str, ref_chosen: float, ref_rejected: float) -> None:
        self.store.set_reference(pair_id, ref_chosen, ref_rejected)

    def record_attempt(self, pair_id: str, loss: float) -> int:
        return self.store.record_attempt(pair_id, loss)

    def set_aside(self, pair_id: str) -> bool:
        with self._lock:
            self._leases.pop(pair_id, None)
        return self.store.set_aside(pair_id)

    def release(self, replica: str, pair_ids: Iterable[str]) -> None:
        """A replica gives leased pairs back (its accumulation was dropped)."""
        with self._lock:
            released = [i for i in pair_ids if self._leases.get(i, ("",))[0] == replica]
            for i in released:
                del self._leases[i]
        if released:
            self._work_changed()

    def stats(self) -> dict[str, int]:
        return self.store.stats()

    def trained_ids(self) -> set[str]:
        return self.store.ids("trained")

    # -- gradients and steps ----------------------------------------------------------------------

    def submit(self, replica: str, base_generation: int, pair_ids: Sequence[str],
               grads: dict[str, torch.Tensor]) -> bool:
        """A replica's accumulated gradient over ``pair_ids`` (a sum over pairs, computed from
        weights of generation ``base_generation`` or later). False: too stale (or from before a
        rollback), dropped, the pairs are pending again. A step follows when one is due."""
        t0 = time.perf_counter()
        with self._lock:
            for i in pair_ids:
                self._leases.pop(i, None)
            behind = self.generation - base_generation
            stale = not 0 <= behind <= self.max_staleness or base_generation < self._rollback_generation
            if stale or not self.training_enabled or self.weights is None:
                self.num_stale += 1
                self._work_changed()
                return False
            acc = self._acc
            for key, g in grads.items():
                if key in acc.grads:
                    acc.grads[key] += g
                else:
                    acc.grads[key] = g.to(torch.float32, copy=True)
            acc.pair_ids.extend(pair_ids)
            self._submitted.update(pair_ids)
            if acc.since is None:
                acc.since = self.clock()
            self.pairs_by_replica[replica] = self.pairs_by_replica.get(replica, 0) + len(pair_ids)
            self.submit_s.append(time.perf_counter() - t0)  # the sum, before any step
            del self.submit_s[:-256]
            self.maybe_step()
            return True

    def maybe_step(self) -> bool:
        """Step when the accumulation holds ``grad_accum`` pairs, when no pair is leased (no
        more gradient is on its way), or when it began ``max_step_delay_s`` ago."""
        with self._lock:
            acc = self._acc
            if not acc.pair_ids:
                return False
            delay = self.config.max_step_delay_s
            due = (len(acc.pair_ids) >= self.config.grad_accum or not self._leases
                   or (delay and self.clock() - acc.since >= delay))
            if not due:
                return False
            self._step()
            return True

    def _ensure_optimizer(self) -> None:
        if self._optimizer is not None:
            return
        self._params = {k: torch.nn.Parameter(v.clone()) for k, v in self.weights.items()}
        self._optimizer = make_adamw(list(self._params.values()), self.config)

    @torch.no_grad()
    def _step(self) -> None:
        t0 = time.perf_counter()
        acc, self._acc = self._acc, _Accumulation()
        self._ensure_optimizer()
        params = list(self._params.values())
        for key, p in self._params.items():
            p.copy_(self.weights[key])
            g = acc.grads.get(key)
            p.grad = None if g is None else g
        ok = bool(torch.isfinite(torch.nn.utils.clip_grad_norm_(params, self.config.max_grad_norm)))
        if ok:
            share = min(1.0, len(acc.pair_ids) / self.config.grad_accum)
            for group in self._optimizer.param_groups:
                group["lr"] = self.config.lr * share
            self._optimizer.step()
            ok = bool(torch.isfinite(torch.nn.utils.get_total_norm(params)))
        self._optimizer.zero_grad(set_to_none=True)
        if not ok:  # the serving weights stay; the pairs go round again
            self.num_skipped_steps += 1
            self._optimizer.state.clear()
            self._submitted.difference_update(acc.pair_ids)
            self._work_changed()
            return
        self.weights = {k: p.detach().clone() for k, p in self._params.items()}
        self.version = self.max_version = self.max_version + 1
        self._changed_weights()
        self.num_steps += 1
        self.step_s.append(time.perf_counter() - t0)
        del self.step_s[:-64]
        self._checkpoint(self.version, self.weights, acc.pair_ids)
        self._notify()

    def _checkpoint(self, version: int, weights: dict[str, torch.Tensor], pair_ids: list[str]) -> None:
        """Write the step's checkpoint on a thread, then mark its pairs trained (a crash before
        that trains them again)."""
        max_version = self.max_version

        def write() -> None:
            try:
                write_checkpoint(weights, self.config_json, self.state_dir, version,
                                 max(3, self.config.keep_versions), max_version)
                self.store.mark_trained(pair_ids)
            except Exception:  # noqa: BLE001 - the pairs stay pending and train again
                log.exception("checkpoint of version %d failed", version)
            finally:
                with self._lock:
                    self._submitted.difference_update(pair_ids)

        self._writer.submit(write)

    def flush(self) -> None:
        """Wait for the checkpoint writes started so far."""
        self._writer.submit(lambda: None).result()

    # -- control ----------------------------------------------------------------------------------

    def set_training(self, enabled: bool) -> None:
        with self._lock:
            self.training_enabled = enabled
        self._notify()

    def rollback(self, version: int) -> bool:
        """Serve and train from kept version ``version`` (its checkpoint) again; False: not kept."""
        state = None
        for path, v in checkpoints(self.state_dir):
            if v == version:
                state = load_checkpoint_state(path)
        if state is None:
            return False
        self.flush()
        with self._lock:
            write_checkpoint(state, self.config_json, self.state_dir, version, max(3, self.config.keep_versions),
                                 self.max_version, rollback_name(self.state_dir, self.max_version))
            self.weights, self.version = state, version
            self._changed_weights()
            self._rollback_generation = self.generation
            self._acc = _Accumulation()
            self._submitted.clear()
            if self._optimizer is not None:
                self._optimizer.state.clear()
        self._notify()
        self._work_changed()
        return True

    def _changed_weights(self) -> None:
        self.generation += 1
        self._stepped_at[self.generation] = time.time()
        for g in [g for g in self._stepped_at if g < self.generation - 64]:
            del self._stepped_at[g]

    def versions(self) -> list[int]:
        return sorted({v for _, v in checkpoints(self.state_dir)})

    # -- the replicas' sync loop ------------------------------------------------------------------

    async def poll(self, replica: str, generation: int, work_seq: int, version: int = 0,
                   timeout_s: float = 5.0, stats: dict | None = None) -> Update:
        """Wait (up to ``timeout_s``) until the weights are not ``generation`` or the work count
        is not ``work_seq``; the update (with weights when the generation differs). ``version``
        and ``stats`` (the replica's own counters): what ``status`` reports of it."""
        loop = asyncio.get_running_loop()
        event = asyncio.Event()
        with self._lock:
            self._seen[replica] = self.clock()
            if stats is not None:
                self._replica_stats[replica] = stats
            self._note_serving(replica, generation, version)
            self._expire(self.clock())
            if self.generation == generation and self.work_seq == work_seq:
                self._changed.append((loop, event))
            else:
                event.set()
        try:
            await asyncio.wait_for(event.wait(), timeout_s)
        except TimeoutError:
            pass
        with self._lock:
            self._seen[replica] = self.clock()
            self.maybe_step()  # a delayed step comes due while replicas poll
            return self._update(generation)

    def _note_serving(self, replica: str, generation: int, version: int) -> None:
        """A replica's poll says what it serves: the broadcast delay of a change is from the
        change to the first poll that reports it (a replica polls again right after adopting)."""
        if self._replica_versions.get(replica) != (generation, version):
            stepped = self._stepped_at.get(generation)
            if stepped is not None:
                self.broadcast_s.append(max(0.0, time.time() - stepped))
                del self.broadcast_s[:-256]
            self._replica_versions[replica] = (generation, version)

    def _work_changed(self) -> None:
        with self._lock:
            self.work_seq += 1
        self._notify()

    def _notify(self) -> None:
        with self._lock:
            waiters, self._changed = self._changed, []
        for loop, event in waiters:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # that loop closed
                pass

    def status(self) -> dict:
        with self._lock:
            steps = sorted(self.step_s)
            submits = sorted(self.submit_s)
            broadcast = sorted(self.broadcast_s)
            return {
                "version": self.version, "max_version": self.max_version, "steps": self.num_steps,
                "skipped_steps": self.num_skipped_steps, "stale_gradients": self.num_stale,
                "pairs_by_replica": dict(self.pairs_by_replica), "leased": len(self._leases),
                "accumulated": len(self._acc.pair_ids), "training_enabled": self.training_enabled,
                "step_ms_p50": _quantile(steps, 0.5) * 1e3 if steps else None,
                "step_ms_p99": _quantile(steps, 0.99) * 1e3 if steps else None,
                "submit_ms_p50": _quantile(submits, 0.5) * 1e3 if submits else None,
                "adapter_bytes": sum(t.numel() * t.element_size() for t in self.weights.values()) if self.weights else 0,
                "broadcast_ms_p50": _quantile(broadcast, 0.5) * 1e3 if broadcast else None,
                "broadcast_ms_p99": _quantile(broadcast, 0.99) * 1e3 if broadcast else None,
                "generation": self.generation,
                "replicas": [{"id": r, "version": v, **self._replica_stats.get(r, {})}
                             for r, (_, v) in sorted(self._replica_versions.items()) if r in self._seen],
            }

    def close(self) -> None:
        self.flush()
        self._writer.shutdown()
        self.store.close()


def _quantile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# -- the replica's side ---------------------------------------------------------------------------


class CoordinatorStore:
    """The ``FeedbackStore`` a replica's server and trainer use: every call goes to the
    coordinator. ``call(name, *args)`` runs the coordinator's method and returns its result,
    blocking (the server and the trainer call the store from threads, never on the loop). A
    coordinator that does not answer (restarting) is retried for ``retry_s``, then
    ``StoreUnavailable`` (the feedback route answers 503 with Retry-After: nothing was stored,
    or what was is a duplicate of the retry)."""

    def __init__(self, call: Callable[..., object], replica: str, retry_s: float = 10.0) -> None:
        self._raw_call = call
        self.replica = replica
        self.retry_s = retry_s

    def _call(self, name: str, *args):
        deadline = time.monotonic() + self.retry_s
        while True:
            try:
                return self._raw_call(name, *args)
            except Exception as exc:  # noqa: BLE001 - the coordinator's transport failed
                if time.monotonic() >= deadline:
                    raise StoreUnavailable(f"the feedback coordinator is unavailable ({type(exc).__name__}); "
                                           "retry shortly") from exc
                time.sleep(0.2)

    def add(self, pairs: Sequence[NewPair]) -> list[tuple[str, bool]]:
        # ids fixed here, so a retry after a lost answer stores nothing twice
        pairs = [p if p.id is not None else dataclasses.replace(p, id=uuid.uuid4().hex) for p in pairs]
        return self._call("add", pairs)

    def pending(self, limit: int, exclude: Iterable[str] = ()) -> list[FeedbackPair]:
        return self._call("lease", self.replica, limit, list(exclude))

    def set_reference(self, pair_id: str, ref_chosen: float, ref_rejected: float) -> None:
        self._call("set_reference", pair_id, ref_chosen, ref_rejected)

    def record_attempt(self, pair_id: str, loss: float) -> int:
        return self._call("record_attempt", pair_id, loss)

    def set_aside(self, pair_id: str) -> bool:
        return self._call("set_aside", pair_id)

    def mark_trained(self, pair_ids: Iterable[str]) -> int:
        """Nothing here: the coordinator marks a step's pairs once its checkpoint holds it."""
        return 0

    def stats(self) -> dict[str, int]:
        return self._call("stats")

    def close(self) -> None:
        pass


class ReplicaSync:
    """A replica's side of the shared adapter, on its event loop: its trainer hands gradients
    over (``submit``), a loop polls the coordinator for new versions (adopted at the next
    iteration boundary) and for work to lease (the trainer refills).

    ``poll`` and ``submit`` are the coordinator's methods, awaited (an actor's, under Ray)."""

    def __init__(self, training, engine, replica: str, poll, submit, register, *,
                 poll_timeout_s: float = 5.0, stats: Callable[[], dict] | None = None) -> None:
        self.training = training
        self.engine = engine
        self.replica = replica
        self._poll = poll
        self._submit = submit
        self._register_call = register
        self._stats = stats  # this replica's counters, sent with each poll
        self.poll_timeout_s = poll_timeout_s
        self.work_seq = -1
        self.generation = -1  # the coordinator's weights this replica serves (-1: none yet)
        self.adopted_at: dict[int, float] = {}  # version -> when this replica served it (time.time)
        self.num_submitted = 0
        self.num_stale = 0
        self._sends: set[asyncio.Task] = set()
        self._task: asyncio.Task | None = None
        training.executor.hands_over_gradients = True
        training.trainer.gradient_sink = self._on_gradient

    @property
    def version(self) -> int:
        return self.training.adapter_version

    async def adopt(self, update: Update) -> None:
        """Serve ``update``'s weights from the next iteration on (``FinetuneExecutor.adopt``)."""
        executor, trainer = self.training.executor, self.training.trainer
        weights = update.weights
        if inspect.isawaitable(weights):  # a Ray object ref
            weights = await weights
        await self.engine.run_on_worker(lambda: executor.adopt(update.version, weights, update.generation))
        if update.rolled_back:  # the accumulation's gradients are of weights left behind
            trainer.drop_accumulation()
        trainer.adapter_version = update.version
        self.generation = update.generation
        self.adopted_at[update.version] = time.time()
        while len(self.adopted_at) > 64:
            del self.adopted_at[min(self.adopted_at)]

    async def _register(self) -> Update:
        executor = self.training.executor
        snapshot = await self.engine.run_on_worker(executor.snapshot)
        return await self._register_call(self.replica, snapshot, adapter_config_json(executor.model, executor.serving_name))

    async def start(self) -> None:
        """Join: register (the first replica's adapter seeds a coordinator without one), serve
        the coordinator's weights, then poll."""
        await self.apply(await self._register())
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._sends:
            await asyncio.gather(*self._sends, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            try:
                update = await self._poll(self.replica, self.generation, self.work_seq, self.version,
                                          self.poll_timeout_s, self._stats() if self._stats else None)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the coordinator restarting: poll again shortly
                log.warning("coordinator poll failed; retrying", exc_info=True)
                await asyncio.sleep(0.5)
                continue
            try:
                await self.apply(update)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001
                log.warning("applying the coordinator's update failed; retrying", exc_info=True)
                await asyncio.sleep(0.5)

    async def apply(self, update: Update) -> None:
        if not update.registered:
            update = await self._register()
        if update.weights is not None and update.generation != self.generation:
            await self.adopt(update)
        trainer = self.training.trainer
        if update.training_enabled == trainer.paused:
            trainer.set_paused(not update.training_enabled)
        if update.work_seq != self.work_seq:
            self.work_seq = update.work_seq
            await trainer.refill()

    def _on_gradient(self, pair_ids: list[str], result) -> None:
        task = asyncio.get_running_loop().create_task(
            self._send(result.gradients_generation, pair_ids, result.gradients))
        self._sends.add(task)
        task.add_done_callback(self._sends.discard)

    async def _send(self, base_version: int, pair_ids: list[str], grads: dict) -> None:
        try:
            accepted = await self._submit(self.replica, base_version, pair_ids, grads)
        except Exception:  # noqa: BLE001 - lost with the coordinator: its leases lapse, the pairs train again
            log.warning("handing gradients over failed; those pairs will train again", exc_info=True)
            return
        self.num_submitted += 1
        if not accepted:
            self.num_stale += 1
