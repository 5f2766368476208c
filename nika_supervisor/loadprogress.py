"""Load progress from vLLM's own output: what STATUS says while a model loads, the breakdown
that `vllm.ready` carries, and the load-stall rule. Pure: no I/O; `now` (monotonic seconds) is
passed in.

vLLM prints its own milestones while it loads. The lines recognised here, by phase, are those
of vLLM 0.32 (vllm-project/vllm v0.32.0; file:line in the `vllm` package):

- engine: `Initializing a V1 LLM engine (v0.32.0) with config: ...` (v1/engine/core.py:133)
- weights: `Starting to load model MODEL...` (v1/worker/cpu_model_runner.py:68,
  gpu_model_runner.py:5040); `Checkpoint size: 41.30 GiB.`
  (model_executor/model_loader/weight_utils.py:1108)
- shards: `Loading safetensors checkpoint shards:  45% Completed | 9/20 [...]`
  (weight_utils.py:1094; pt, np_cache, multi-thread, Run:ai and InstantTensor loaders alike)
- loaded: `Loading weights took 0.02 seconds` (model_loader/default_loader.py:502); GPU only:
  `Model loading took 41.2 GiB memory and 312.5 seconds` (v1/worker/gpu_model_runner.py:5150)
- kv_cache: GPU `Available KV cache memory: 12.3 GiB` (v1/worker/gpu_worker.py:760); CPU
  `Explicitly set (1.0/8.21) GiB for KV cache on node 0.` (v1/worker/cpu_worker.py:230);
  both `CPU|GPU KV cache size: 599,186 tokens, ...` (v1/core/kv_cache_utils.py:2328)
- compile: GPU `Starting torch.compile`, `Dynamo bytecode transform time`, `Compiling a graph
  for compile range ... takes`, `Directly load the compiled graph(s)`, `torch.compile took
  41.2 s in total` (compilation/monitor.py:40,62; compilation/backends.py:296,399,1167); CPU
  `Warming up model for the compilation...`, `saved AOT compiled function`, `Warming up done.`
  (v1/worker/cpu_model_runner.py:87,91; compilation/decorators.py:320,744). Every compile
  line is progress, not only the first.
- warmup: `Compile and warming up model for size N` (gpu_worker.py:939), `Initial
  profiling/warmup run took` (compilation/monitor.py:91)
- cuda_graphs (GPU only): `Capturing CUDA graphs (decode, FULL): 100%|...| 67/67`
  (gpu_model_runner.py:6657), `Graph capturing finished in 12 secs, took 0.52 GiB` (:6582)
- engine_init: `init engine (profile, create kv cache, warmup model) took 3.58 s`
  (v1/engine/core.py:386-403)
- server: `Starting vLLM server on http://...` (entrypoints/launchers/api_server/entry.py:140),
  uvicorn's `Application startup complete.`

On a GPU, torch.compile and the warm-up come before the KV cache is sized (the profile run
compiles); on the CPU build, the KV cache is set after the compile warm-up. So phases are not
ordered: the current phase is the one first seen most recently.

The shard bar uses vLLM's own bar format, which ends every refresh with a newline
(weight_utils.py:837), so each refresh reaches us as one line (starting with a carriage return).
The CUDA-graph bar uses tqdm's default format (no newline until it closes), so its refreshes
reach the output pump as one line when capture ends; only the last state is read.

The stall rule: progress is a new phase or a new shard count. A load that shows none for
`health.load_stall` has stalled. Before the first shard, a model that may still be downloading
(a hub id, not offline) is exempt: vLLM downloads with its progress bars disabled
(weight_utils.py:85, DisabledTqdm), so a download prints nothing until it ends.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from nika_supervisor.durations import format_duration

# The phases, roughly in the order vLLM goes through them (on a GPU, torch.compile and the
# warm-up come before the KV cache is sized). The current phase is the one seen first most
# recently; a phase seen again (a worker repeating a line, "Loading weights took" after the
# shards) is neither a new phase nor progress.
PHASES = ("spawned", "engine", "weights", "shards", "loaded", "kv_cache", "compile", "warmup",
          "cuda_graphs", "engine_init", "server")

_LABELS = {
    "spawned": "starting vLLM",
    "engine": "engine starting",
    "weights": "loading weights",
    "shards": "shards",
    "loaded": "weights loaded",
    "kv_cache": "KV cache",
    "compile": "torch.compile",
    "warmup": "warm-up",
    "cuda_graphs": "capturing CUDA graphs",
    "engine_init": "engine ready",
    "server": "API server starting",
}

# Event names (README "Logs"): the executor logs these when it feeds lines in.
EVENT_PROGRESS = "load.progress"  # info: a new phase or shard (step, shards, elapsed_s)
EVENT_STALLED = "load.stalled"  # error: the stall rule fired (step, stalled_s, load_stall_s)

_NUM = r"(\d+(?:\.\d+)?)"
_SHARDS = re.compile(
    r"(?:Loading (?:safetensors|pt|np_cache) checkpoint shards(?: \(eager\))?"
    r"|Multi-thread loading (?:pt checkpoint )?shards"
    r"|Loading safetensors using (?:Runai Model Streamer|InstantTensor loader))"
    r":\s*\d+% Completed \| (\d+)/(\d+)")
_GRAPHS = re.compile(r"Capturing CUDA graphs[^:]*:\s*\d+%\|[^|]*\|\s*(\d+)/(\d+)")
_RULES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("engine", re.compile(r"Initializing a V1 LLM engine")),
    ("weights", re.compile(r"Starting to load model ")),
    ("checkpoint_gib", re.compile(r"Checkpoint size: " + _NUM + r" GiB")),
    ("weights_s", re.compile(r"Loading weights took " + _NUM + r" seconds")),
    ("model_loaded", re.compile(r"Model loading took " + _NUM + r" GiB memory and " + _NUM
                                + r" seconds")),
    ("kv_gib", re.compile(r"Available KV cache memory: " + _NUM + r" GiB")),
    ("kv_gib_cpu", re.compile(r"Explicitly set \(" + _NUM + r"/[\d.]+\) GiB for KV cache")),
    ("kv_tokens", re.compile(r"\b[A-Z]+ KV cache size: ([\d,]+) tokens")),
    ("compile", re.compile(r"Starting torch\.compile|Dynamo bytecode transform time"
                           r"|Compiling a graph for|Directly load (?:the compiled graph|AOT)"
                           r"|Warming up model for the compilation|saved AOT compiled function"
                           r"|Warming up done\.")),
    ("compile_s", re.compile(r"torch\.compile took " + _NUM + r" s in total")),
    ("warmup", re.compile(r"Compile and warming up model for size"
                          r"|Initial profiling/warmup run took")),
    ("graphs_done", re.compile(r"Graph capturing finished in " + _NUM + r" secs, took "
                               + _NUM + r" GiB")),
    ("engine_init_s", re.compile(r"init engine \(profile, create kv cache, warmup model\) took "
                                 + _NUM + r" s")),
    ("server", re.compile(r"Starting vLLM (?:API )?server|Application startup complete")),
)


@dataclass(frozen=True, slots=True)
class Seen:
    """What one line of vLLM output says about the load (None fields: nothing)."""

    phase: str | None = None
    shards: tuple[int, int] | None = None  # done, total
    graphs: tuple[int, int] | None = None
    figures: tuple[tuple[str, float], ...] = ()  # vLLM's own numbers: ("weights_s", 0.02)
    step: bool = False  # progress even within a phase already seen (a compile step)


def parse_line(line: str) -> Seen | None:
    """Read one output line (as the pump hands it on); None when it says nothing of the load."""
    if "\r" in line:  # tqdm: the last non-empty refresh is the current state
        parts = [p for p in line.split("\r") if p.strip()]
        line = parts[-1] if parts else ""
    m = _SHARDS.search(line)
    if m:
        return Seen("shards", shards=(int(m.group(1)), int(m.group(2))))
    m = _GRAPHS.search(line)
    if m:
        return Seen("cuda_graphs", graphs=(int(m.group(1)), int(m.group(2))))
    for key, rx in _RULES:
        m = rx.search(line)
        if not m:
            continue
        match key:
            case "compile":
                return Seen(key, step=True)  # each graph compiled is a step of its own
            case "engine" | "weights" | "warmup" | "server":
                return Seen(key)
            case "checkpoint_gib":
                return Seen("weights", figures=((key, float(m.group(1))),))
            case "weights_s":
                return Seen("loaded", figures=((key, float(m.group(1))),))
            case "model_loaded":
                return Seen("loaded", figures=(("weights_gib", float(m.group(1))),
                                                ("weights_s", float(m.group(2)))))
            case "kv_gib" | "kv_gib_cpu":
                return Seen("kv_cache", figures=(("kv_cache_gib", float(m.group(1))),))
            case "kv_tokens":
                return Seen("kv_cache", figures=(
                    ("kv_cache_tokens", float(m.group(1).replace(",", ""))),))
            case "compile_s":
                return Seen("compile", figures=(("compile_s", float(m.group(1))),))
            case "graphs_done":
                return Seen("cuda_graphs", figures=(("cuda_graphs_s", float(m.group(1))),
                                                    ("cuda_graphs_gib", float(m.group(2)))))
            case "engine_init_s":
                return Seen("engine_init", figures=(("engine_init_s", float(m.group(1))),))
    return None


@dataclass(frozen=True, slots=True)
class LoadProgress:
    """One load of vLLM, folded from its output lines. Times are monotonic seconds."""

    started_at: float
    phase: str = "spawned"
    phase_at: tuple[tuple[str, float], ...] = ()  # when each phase was first seen
    shards: tuple[int, int] | None = None
    graphs: tuple[int, int] | None = None
    figures: tuple[tuple[str, float], ...] = ()  # the latest value of each of vLLM's numbers
    progress_at: float = 0.0  # the last new phase or shard count
    may_download: bool = False  # the model may still be downloading (a hub id, not offline)

    @classmethod
    def start(cls, now: float, may_download: bool = False) -> LoadProgress:
        return cls(started_at=now, phase_at=(("spawned", now),), progress_at=now,
                   may_download=may_download)

    def figure(self, key: str) -> float | None:
        return dict(self.figures).get(key)

    def feed(self, line: str, now: float) -> LoadProgress:
        """The progress after one more output line."""
        seen = parse_line(line)
        return self if seen is None else self.apply(seen, now)

    def apply(self, seen: Seen, now: float) -> LoadProgress:
        p = self
        if seen.figures:
            merged = dict(p.figures)
            merged.update(seen.figures)
            p = replace(p, figures=tuple(merged.items()))
        progressed = False
        if seen.shards is not None and seen.shards != p.shards:
            progressed = p.shards is None or seen.shards[0] > p.shards[0]
            p = replace(p, shards=seen.shards)
        if seen.graphs is not None and seen.graphs != p.graphs:
            progressed = True
            p = replace(p, graphs=seen.graphs)
        phase = seen.phase
        if phase is not None and phase not in dict(p.phase_at):
            progressed = True
            p = replace(p, phase=phase, phase_at=(*p.phase_at, (phase, now)))
        progressed = progressed or seen.step
        return replace(p, progress_at=now) if progressed else p

    # -- what it says ---------------------------------------------------------------------

    def doing(self) -> str:
        """The current step in words: `shards 9/20 (45%)`, `KV cache (12.3 GiB)`, ..."""
        if self.phase == "shards" and self.shards is not None:
            done, total = self.shards
            pct = int(100 * done / total) if total else 0
            return f"shards {done}/{total} ({pct}%)"
        if self.phase == "cuda_graphs" and self.graphs is not None:
            return f"capturing CUDA graphs {self.graphs[0]}/{self.graphs[1]}"
        label = _LABELS[self.phase]
        size = {"weights": self.figure("checkpoint_gib"),
                "loaded": self.figure("weights_gib") or self.figure("checkpoint_gib"),
                "kv_cache": self.figure("kv_cache_gib")}.get(self.phase)
        if self.phase == "weights" and self.shards is None and self.may_download:
            label += " (downloading?)"
        if size:
            label += f" ({size:.1f} GiB)"
        return label

    def status(self, now: float, last_load_s: float | None = None) -> str:
        """STATUS while loading: `loading: shards 9/20 (45%), 3m12s elapsed; last load took
        8m40s`."""
        text = f"loading: {self.doing()}, {format_duration(now - self.started_at)} elapsed"
        if last_load_s is not None:
            text += f"; last load took {format_duration(last_load_s)}"
        return text

    def breakdown(self, now: float) -> dict[str, float | int]:
        """Fields for `vllm.ready`: load_s, seconds spent in each phase seen (`<phase>_s`,
        measured here) and vLLM's own figures (`vllm_weights_s`, `checkpoint_gib`, ...)."""
        out: dict[str, float | int] = {"load_s": round(now - self.started_at, 3)}
        marks = list(self.phase_at)
        for (phase, at), (_, nxt) in zip(marks, [*marks[1:], ("", now)], strict=True):
            out[f"{phase}_s"] = round(nxt - at, 3)
        if self.shards is not None:
            out["shards"] = self.shards[1]
        for key, value in self.figures:
            name = f"vllm_{key}" if key.endswith("_s") else key
            out[name] = int(value) if key == "kv_cache_tokens" else value
        return out

    # -- the stall rule -------------------------------------------------------------------

    def stalled_for(self, now: float) -> float:
        """Seconds without progress; 0 while a possible download is exempt."""
        if self.may_download and self.shards is None and self.phase in ("spawned", "engine",
                                                                          "weights"):
            return 0.0
        return max(0.0, now - self.progress_at)

    def stalled(self, now: float, load_stall: float) -> bool:
        """No new phase and no new shard for `load_stall` seconds (0 = the rule is off)."""
        return load_stall > 0 and self.stalled_for(now) >= load_stall

    def stall_cause(self, load_stall: float) -> str:
        """The failure's cause when the rule fires (for `vllm.exited`/STATUS)."""
        return (f"load stalled: no progress for {format_duration(load_stall)} "
                f"(health.load_stall) while {self.doing()}")


STALL_HINT = ("vLLM printed no new loading step; a hung filesystem or a stuck compile? "
              "Raise health.load_stall if this step is legitimately slow")
