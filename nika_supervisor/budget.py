"""The restart budget's arithmetic, shared by the policy (vLLM restarts) and the GPU monitor
(NVML re-init): capped exponential backoff and the sliding window. Pure."""

from __future__ import annotations

from nika_supervisor.config import RestartConfig


def capped_backoff(initial: float, maximum: float, attempt: int) -> float:
    """initial * 2**attempt, at most maximum."""
    return float(min(maximum, initial * (2.0 ** min(attempt, 32))))


def backoff_delay(cfg: RestartConfig, attempt: int, jitter: float) -> float:
    """Capped exponential backoff with up to 20 % jitter taken off (stamina's shape).

    jitter is a draw from [0, 1); the result stays within [0.8, 1.0] of the capped value.
    """
    return capped_backoff(cfg.backoff_initial, cfg.backoff_max, attempt) * (1.0 - 0.2 * jitter)


def in_window(times: tuple[float, ...], now: float, window: float) -> tuple[float, ...]:
    """The times that fall inside the last `window` seconds."""
    return tuple(t for t in times if now - t < window)
