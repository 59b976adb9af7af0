"""Iteration latency as a linear function of what the iteration carries, corrected online.

    t = c0 + c1 * prefill tokens + c2 * prefill attention (tokens x context, in thousands)
          + c3 * decodes + c4 * decode context tokens (thousands) + c5 * fine-tune tokens

The coefficients start from a profile (``mace profile``) or a prior, and every measured
iteration refines them by recursive least squares with a forgetting factor, so the model follows
the machine as it drifts (the paper's profile is offline only). ``error_ratio`` is a running mean
of |predicted - measured| / measured.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_MAX_TRACE = 1e3
FEATURES = ("intercept", "prefill_tokens", "prefill_attention_k", "decodes", "decode_context_k", "finetune_tokens")


@dataclass(frozen=True, slots=True)
class IterationShape:
    num_prefill_tokens: int = 0
    prefill_attention: int = 0  # sum over prefill chunks of chunk tokens x tokens attended
    num_decodes: int = 0
    decode_context: int = 0  # sum of decode context lengths
    num_finetune_tokens: int = 0

    def features(self) -> np.ndarray:
        return np.array([1.0, self.num_prefill_tokens, self.prefill_attention / 1e3, self.num_decodes,
                         self.decode_context / 1e3, self.num_finetune_tokens])


class CostModel:
    def __init__(self, coefficients: list[float] | np.ndarray, forgetting: float = 0.995, prior_weight: float = 10.0) -> None:
        self.coefficients = np.asarray(coefficients, dtype=float)
        if self.coefficients.shape != (len(FEATURES),):
            raise ValueError(f"a cost model has {len(FEATURES)} coefficients, got {self.coefficients.shape}")
        self.forgetting = forgetting
        # RLS inverse covariance; the prior weight says how many "observations" the start is worth
        self._p = np.eye(len(FEATURES)) / prior_weight
        self.error_ratio = 0.0
        self.num_observations = 0

    def predict(self, shape: IterationShape) -> float:
        return max(0.0, float(self.coefficients @ shape.features()))

    def cost_per_finetune_token(self) -> float:
        return max(self.coefficients[5], 1e-9)

    def observe(self, shape: IterationShape, measured_s: float) -> None:
        """One measured iteration: update the error ratio, then the coefficients (RLS)."""
        x = shape.features()
        predicted = float(self.coefficients @ x)
        if measured_s > 0:
            err = abs(predicted - measured_s) / measured_s
            self.error_ratio = err if self.num_observations == 0 else 0.95 * self.error_ratio + 0.05 * err
        lam = self.forgetting
        px = self._p @ x
        gain = px / (lam + x @ px)
        coefficients = self.coefficients + gain * (measured_s - predicted)
        p = (self._p - np.outer(gain, px)) / lam
        # Forgetting inflates P along directions the load never excites (no fine-tune work for a
        # while, say) until it overflows ("windup"): cap its trace, keep its shape.
        trace = np.trace(p)
        if trace > _MAX_TRACE:
            p *= _MAX_TRACE / trace
        if np.isfinite(coefficients).all() and np.isfinite(p).all():
            self.coefficients, self._p = coefficients, p
        self.num_observations += 1

    # -- profile files ----------------------------------------------------------------------------

    def to_dict(self) -> dict:
        return {"features": list(FEATURES), "coefficients": self.coefficients.tolist()}

    def save(self, path: str | Path, meta: dict | None = None) -> None:
        Path(path).write_text(json.dumps({**self.to_dict(), **(meta or {})}, indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> CostModel:
        data = json.loads(Path(path).read_text())
        if data.get("features") != list(FEATURES):
            raise ValueError(f"{path}: not a cost profile of this version (features {data.get('features')})")
        return cls(data["coefficients"], prior_weight=1e3)  # a measured profile is trusted more

    @classmethod
    def fit(cls, shapes: list[IterationShape], times_s: list[float]) -> CostModel:
        """Least squares over profiled iterations (non-negative where it matters)."""
        x = np.stack([s.features() for s in shapes])
        coef, *_ = np.linalg.lstsq(x, np.asarray(times_s), rcond=None)
        return cls(np.maximum(coef, 0.0), prior_weight=1e3)
