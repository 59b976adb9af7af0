"""Iteration latency as a linear function of what the iteration carries, corrected online.

    t = c0 + c1 * prefill tokens + c2 * prefill attention (tokens x context, in thousands)
          + c3 * decodes + c4 * decode context tokens (thousands) + c5 * fine-tune tokens
          + c6 * fine-tune chunks

A fine-tune chunk runs its own forward (and backward) apart from the inference forward, with an
adapter switch and train/eval mode changes around it: a fixed cost per chunk that the tokens do
not explain (on the tiny demo model here, 15-20 ms of a 37-token one-sequence part's 28 ms).
Without ``c6`` the fit folds it into the per-token price, which then under-prices small pieces
(the ones the planner fits into thin slack) by 2-4x and over-prices big ones.

The coefficients start from a profile (``mace profile``) or a prior. While serving, every
measured iteration goes into a window of the last ``window`` iterations, and the coefficients are
the weighted least-squares fit over that window, pulled toward the profile by a ridge term
worth ``prior_weight`` iterations of typical size (so the model follows the machine as it
drifts, which the paper's offline profile does not). An iteration that carried a fine-tune chunk
goes in as two rows, its inference part and its fine-tune part, timed apart by the worker: a
piece of a few milliseconds beside a noisy 40 ms decode step is then priced from its own time
(here the pieces cut at layer parts were priced 4x short from iteration totals). The ridge
keeps a feature the load does not exercise (no fine-tune work for an hour) at its profiled cost, and keeps features the load moves
together (decodes and their context at one prompt length) from trading off into large opposite
values; the fit is projected onto c >= 0 (nothing makes an iteration faster). Weights are
1 / measured time, so small iterations count as much as big ones, relatively. The solve is 7x7:
microseconds per iteration. ``error_ratio`` is a running mean of |predicted - measured| / measured.
"""

from __future__ import annotations

import json
import math
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FEATURES = ("intercept", "prefill_tokens", "prefill_attention_k", "decodes", "decode_context_k", "finetune_tokens",
            "finetune_chunks")
_INDEX = {name: i for i, name in enumerate(FEATURES)}
_FINETUNE = [_INDEX["finetune_tokens"], _INDEX["finetune_chunks"]]
# Profiles written before the per-chunk cost existed have the first six; their c6 is 0.
_LEGACY_FEATURES = FEATURES[:6]


def coefficients(**seconds: float) -> list[float]:
    """A coefficient vector by feature name (seconds per unit of the feature); features not
    named cost nothing."""
    unknown = seconds.keys() - _INDEX.keys()
    if unknown:
        raise ValueError(f"unknown cost features {sorted(unknown)}; the features are {FEATURES}")
    return [seconds.get(name, 0.0) for name in FEATURES]


# A CPU-sized guess (a ~60M model) that the first measured iterations correct.
PRIOR_COSTS = coefficients(intercept=5e-3, prefill_tokens=1e-3, prefill_attention_k=1e-5, decodes=1e-3,
                           decode_context_k=2e-5, finetune_tokens=3e-3, finetune_chunks=2e-2)


@dataclass(frozen=True, slots=True)
class IterationShape:
    num_prefill_tokens: int = 0
    prefill_attention: int = 0  # sum over prefill chunks of chunk tokens x tokens attended
    num_decodes: int = 0
    decode_context: int = 0  # sum of decode context lengths
    num_finetune_tokens: int = 0  # priced tokens: a no-grad chunk's count at NO_GRAD_COST each
    num_finetune_chunks: float = 0.0  # priced chunks: a no-grad one counts NO_GRAD_COST

    def features(self) -> np.ndarray:
        return np.array([1.0, self.num_prefill_tokens, self.prefill_attention / 1e3, self.num_decodes,
                         self.decode_context / 1e3, self.num_finetune_tokens, self.num_finetune_chunks])


def shape_of(chunks) -> IterationShape:
    """What the cost model prices in an iteration's inference part (``engine.plan.SequenceChunk``s)."""
    num_prefill = attention = decodes = context = 0
    for c in chunks:
        n = len(c.token_ids)
        if n == 1:
            decodes += 1
            context += c.kv_offset + 1
        else:
            num_prefill += n
            attention += n * (c.kv_offset + n)
    return IterationShape(num_prefill, attention, decodes, context)


SAFETY_WINDOW, SAFETY_QUANTILE, MAX_SAFETY = 256, 0.9, 3.0

# A typical magnitude of each feature in one iteration: scales the ridge toward the prior.
_SCALE = np.array([1.0, 64.0, 8.0, 16.0, 4.0, 256.0, 1.0])


class CostModel:
    def __init__(self, coefficients: list[float] | np.ndarray, window: int = 512, prior_weight: float = 10.0) -> None:
        self.coefficients = np.asarray(coefficients, dtype=float)
        if self.coefficients.shape == (len(_LEGACY_FEATURES),):  # no per-chunk fine-tune cost
            self.coefficients = np.append(self.coefficients, 0.0)
        if self.coefficients.shape != (len(FEATURES),):
            raise ValueError(f"a cost model has {len(FEATURES)} coefficients, got {self.coefficients.shape}")
        self.prior = self.coefficients.copy()
        self.window = window
        # prior_weight iterations, each with one feature at its typical size (weight 1 / its time)
        typical_s = np.maximum(self.prior[0] + self.prior * _SCALE, 1e-4)
        typical_s[0] = max(self.prior[0], 1e-4)
        self._ridge = np.diag(prior_weight * _SCALE**2 / typical_s)
        self._xs = np.zeros((window, len(FEATURES)))
        self._ys = np.zeros(window)
        self._ws = np.zeros(window)
        self._xtx = np.zeros((len(FEATURES), len(FEATURES)))
        self._xty = np.zeros(len(FEATURES))
        self.error_ratio = 0.0
        self.num_observations = 0
        # Memory a fine-tune token holds until its backward (activations saved for the
        # gradient), measured by the profile; None: not measured.
        self.finetune_bytes_per_token: float | None = None
        # measured / predicted of the recent iterations, for safety_factor
        self._ratios: deque[float] = deque(maxlen=SAFETY_WINDOW)
        self._safety: float | None = None

    def safety_factor(self) -> float:
        """How much longer than predicted an iteration may take: the SAFETY_QUANTILE of measured
        over predicted time across the last SAFETY_WINDOW iterations, in [1, MAX_SAFETY] (1 until
        enough have been seen). The fit is a least-squares mean; a planner that must not overrun
        a latency budget divides the budget by this. Measured here: the fit predicted iterations
        of the tiny model serving a chat load 1.3x short at the median, 1.7x at p90 (the load
        generator shares the machine, and an iteration's time is not linear in its features)."""
        if self._safety is None:
            if len(self._ratios) < SAFETY_WINDOW // 8:
                self._safety = 1.0
            else:
                ratios = sorted(self._ratios)
                self._safety = min(MAX_SAFETY, max(1.0, ratios[int(SAFETY_QUANTILE * (len(ratios) - 1))]))
        return self._safety

    def predict(self, shape: IterationShape) -> float:
        return max(0.0, float(self.coefficients @ shape.features()))

    def coefficient(self, feature: str) -> float:
        """Seconds per unit of ``feature`` (one of FEATURES), as the model stands."""
        return float(self.coefficients[_INDEX[feature]])

    def prefill_cost(self, num_new: int, kv_offset: int) -> float:
        """Marginal seconds of a prefill chunk of ``num_new`` tokens after ``kv_offset`` cached ones."""
        attention_k = num_new * (kv_offset + num_new) / 1e3
        return max(0.0, self.coefficient("prefill_tokens") * num_new + self.coefficient("prefill_attention_k") * attention_k)

    def cost_per_finetune_token(self) -> float:
        return max(self.coefficient("finetune_tokens"), 1e-9)

    def finetune_chunk_overhead(self) -> float:
        """Seconds a fine-tune chunk costs whatever its size."""
        return max(self.coefficient("finetune_chunks"), 0.0)

    def observe(self, shape: IterationShape, measured_s: float, finetune_s: float | None = None) -> None:
        """One measured iteration: update the error ratio, then refit over the window. With
        ``finetune_s`` (what its fine-tune chunk took, measured apart), the fit gets the inference
        part and the fine-tune part as two rows, so the small fine-tune share of an iteration is
        priced from its own time, not guessed from the difference between iterations."""
        if not measured_s > 0 or not np.isfinite(measured_s):
            return
        x = shape.features()
        predicted = max(0.0, float(self.coefficients @ x))
        err = abs(predicted - measured_s) / measured_s
        self.error_ratio = err if self.num_observations == 0 else 0.95 * self.error_ratio + 0.05 * err
        if predicted > 0:
            self._ratios.append(measured_s / predicted)
            self._safety = None
        finetune = np.zeros(len(FEATURES))
        finetune[_FINETUNE] = x[_FINETUNE]
        if finetune_s is not None and 0 < finetune_s < measured_s and finetune.any():
            self._add_row(x - finetune, measured_s - finetune_s)
            self._add_row(finetune, finetune_s)
        else:
            self._add_row(x, measured_s)
        try:
            coefficients = np.linalg.solve(self._xtx + self._ridge, self._xty + self._ridge @ self.prior)
        except np.linalg.LinAlgError:
            return
        if np.isfinite(coefficients).all():
            self.coefficients = np.maximum(coefficients, 0.0)

    def _add_row(self, x: np.ndarray, measured_s: float) -> None:
        """One row into the window (the oldest leaves it), weighted 1 / its time."""
        slot = self.num_observations % self.window
        if self.num_observations >= self.window:
            old_x, old_w = self._xs[slot], self._ws[slot]
            self._xtx -= old_w * np.outer(old_x, old_x)
            self._xty -= old_w * old_x * self._ys[slot]
        w = 1.0 / measured_s
        self._xs[slot], self._ys[slot], self._ws[slot] = x, measured_s, w
        self._xtx += w * np.outer(x, x)
        self._xty += w * x * measured_s
        self.num_observations += 1

    # -- profile files ----------------------------------------------------------------------------

    def to_dict(self) -> dict:
        return {"features": list(FEATURES), "coefficients": self.coefficients.tolist(),
                "finetune_bytes_per_token": self.finetune_bytes_per_token}

    def save(self, path: str | Path, meta: dict | None = None) -> None:
        Path(path).write_text(json.dumps({**self.to_dict(), **(meta or {})}, indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> CostModel:
        data = json.loads(Path(path).read_text())
        if data.get("features") not in (list(FEATURES), list(_LEGACY_FEATURES)):
            raise ValueError(f"{path}: not a cost profile of this version (features {data.get('features')})")
        model = cls(data["coefficients"], prior_weight=10.0)
        model.finetune_bytes_per_token = data.get("finetune_bytes_per_token")
        return model

    @classmethod
    def fit(cls, shapes: list[IterationShape], times_s: list[float]) -> CostModel:
        """Non-negative least squares over profiled iterations, in relative terms (each row
        weighted by 1 / its time, so a 5 ms decode step counts as much as a 500 ms prefill)."""
        x = np.stack([s.features() for s in shapes])
        y = np.asarray(times_s, dtype=float)
        w = 1.0 / np.maximum(y, 1e-6)
        return cls(nnls(x * w[:, None], y * w), prior_weight=10.0)


def nnls(a: np.ndarray, b: np.ndarray, max_iter: int = 100) -> np.ndarray:
    """argmin ||a x - b|| subject to x >= 0 (Lawson and Hanson's active-set method; a handful
    of unknowns here, so plain numpy)."""
    n = a.shape[1]
    x = np.zeros(n)
    passive = np.zeros(n, dtype=bool)
    for _ in range(max_iter):
        grad = a.T @ (b - a @ x)
        if passive.all() or grad[~passive].max(initial=-np.inf) <= 1e-12:
            break
        passive[np.argmax(np.where(passive, -np.inf, grad))] = True
        while True:
            z = np.zeros(n)
            z[passive] = np.linalg.lstsq(a[:, passive], b, rcond=None)[0]
            if (z[passive] > 0).all():
                x = z
                break
            # step back toward x until a passive variable hits zero, and drop it
            neg = passive & (z <= 0)
            alpha = np.min(x[neg] / (x[neg] - z[neg]))
            x = x + alpha * (z - x)
            passive &= x > 1e-12
            x[~passive] = 0.0
    return x


def suggest_slos(model: CostModel, max_num_seqs: int) -> tuple[float, float]:
    """Default SLOs (TTFT, TBT; milliseconds) from a profile, for requests and servers that set
    none: twice the predicted time of a decode step of up to 16 sequences at 512 tokens of
    context each (at least 20 ms), and twice that of a 1024-token prompt prefilled in one go
    (at least 200 ms). Generous enough to hold at a load the machine carries, tight enough that
    fine-tune work cannot double the latency unseen."""
    batch = min(16, max_num_seqs)
    tbt = 2 * model.predict(IterationShape(num_decodes=batch, decode_context=512 * batch))
    ttft = 2 * model.predict(IterationShape(num_prefill_tokens=1024, prefill_attention=1024 * 1024 // 2))
    return max(200.0, math.ceil(ttft * 1e3 / 50) * 50), max(20.0, math.ceil(tbt * 1e3 / 5) * 5)
