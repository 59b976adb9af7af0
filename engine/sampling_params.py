"""Per-request sampling parameters, validated once when the request arrives."""

from __future__ import annotations

from dataclasses import dataclass

MAX_TOP_LOGPROBS = 20
MAX_STOP_SEQUENCES = 16


class InvalidRequestError(ValueError):
    """A request the engine refuses; ``param`` names the offending field for the API's error body,
    ``code`` a machine-readable reason where one applies (OpenAI's ``context_length_exceeded``)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to pick each output token and when to stop.

    ``temperature == 0`` (or ``top_k == 1``) is greedy. ``seed`` makes sampling reproducible:
    the same seed and the same request give the same tokens whatever else shares the batch
    (each output position draws its noise from a generator seeded by ``(seed, position)``).
    ``logprobs`` asks for the sampled token's log-prob plus that many top alternatives;
    ``prompt_logprobs`` the same for every prompt token after the first (scoring). Log-probs are
    the model's raw distribution, before temperature, top-k and top-p (as vLLM reports them).
    ``max_tokens=None`` means "until the context is full"; 0 scores the prompt and stops.
    """

    max_tokens: int | None = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None

    def __post_init__(self) -> None:
        if self.max_tokens is not None and self.max_tokens < 0:
            raise InvalidRequestError(f"max_tokens must be >= 0, got {self.max_tokens}", "max_tokens")
        if not 0.0 <= self.temperature <= 100.0:
            raise InvalidRequestError(
                f"temperature must be in [0, 100], got {self.temperature}", "temperature"
            )
        if self.top_k < 0:
            raise InvalidRequestError(f"top_k must be >= 0 (0 disables it), got {self.top_k}", "top_k")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p}", "top_p")
        if len(self.stop) > MAX_STOP_SEQUENCES:
            raise InvalidRequestError(
                f"at most {MAX_STOP_SEQUENCES} stop sequences, got {len(self.stop)}", "stop"
            )
        if any(not s for s in self.stop):
            raise InvalidRequestError("stop sequences must be non-empty strings", "stop")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= MAX_TOP_LOGPROBS:
                raise InvalidRequestError(
                    f"{name} must be in [0, {MAX_TOP_LOGPROBS}], got {value}", name
                )

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def max_stop_len(self) -> int:
        return max((len(s) for s in self.stop), default=0)
