"""Benchmarks of the supervisor's parts in-process, and of the stand-in the process tier uses.

These figures were once asserted in timed tests (tests/diagnosis/test_matcher.py,
tests/gpu/test_sample.py, tests/process/test_standin.py); speed belongs here, where it is
measured with its machine and reported as medians, not where a busy machine makes a test fail.
- diagnoser feed: lines/s of serving output (1 line in 100 passes the prefilter) through
  `Diagnoser.feed`, what the log pump calls for every line (want >= 200k/s, so the pump can
  forward 50k/s);
- GPU sampling pass: one `GpuMonitor.sample()` over one fake device with one process (the
  NVML calls cost nothing, so this is the monitor's own overhead; want well under 1 ms);
- stand-in bind: Popen of the stand-in vLLM server -> its `bound_mono` (the process tier
  assumes well under 0.3 s).

Daemon-level figures (crash detection, ready lag, log forwarding, idle CPU) are in
supervisor_bench.py.

Usage: .venv/bin/python bench/component_bench.py [--runs 7] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the test doubles live in tests/helpers/

from supervisor_bench import free_port, machine  # noqa: E402

from nika_supervisor.diagnosis import Diagnoser  # noqa: E402

INFO = ("(APIServer pid=5299) INFO 11-27 07:07:01 [loggers.py:257] Engine 000: Avg prompt "
        "throughput: 12.0 tokens/s, Avg generation throughput: 31.4 tokens/s, Running: 3 reqs")
ACCESS = 'INFO:     127.0.0.1:51958 - "POST /v1/chat/completions HTTP/1.1" 200 OK'
ULIMIT = ("(APIServer pid=5299) WARNING 11-27 07:07:01 [system_utils.py:255] Found ulimit of "
          "20000 and failed to automatically increase with error current limit exceeds maximum "
          "limit. This can cause fd limit errors like `OSError: [Errno 24] Too many open "
          "files`. Consider increasing with ulimit -n")


def bench_diagnoser(runs: int) -> dict[str, Any]:
    """Lines/s of Diagnoser.feed over 100k lines of serving output, one figure per run."""
    lines = ([INFO, ACCESS] * 49 + [ULIMIT, ACCESS]) * 1_000
    rates = []
    for _ in range(runs):
        d = Diagnoser.load()
        t0 = time.perf_counter()
        for line in lines:
            d.feed(line)
        rates.append(len(lines) / (time.perf_counter() - t0))
        assert d.lines_fed == len(lines)
    return {"lines": len(lines), "lines_per_s": [round(r) for r in rates]}


def bench_gpu_sample(runs: int, passes: int = 500) -> dict[str, Any]:
    """Median duration_s of `passes` sampling passes over one fake device, per run (us)."""
    from helpers.clock import FakeClock
    from helpers.fake_nvml import FakeDevice, FakePynvml, GiB

    from nika_supervisor.config import GpuConfig
    from nika_supervisor.gpu import GpuMonitor, Nvml

    medians = []
    for _ in range(runs):
        fake = FakePynvml([FakeDevice(processes=[(10, GiB)])])
        mon = GpuMonitor(GpuConfig(nvml="required"), {}, lambda _f: None, nvml=Nvml(fake),
                         clock=FakeClock().now, base_env={}, event_timeout_ms=20)
        mon.start()
        try:
            durations = [mon.sample((10,)).duration_s for _ in range(passes)]
        finally:
            mon.close()
        medians.append(statistics.median(durations) * 1e6)
    return {"passes_per_run": passes, "median_us": [round(m, 1) for m in medians]}


def bench_standin_bind(runs: int) -> dict[str, Any]:
    """Popen of the stand-in (no delays) -> the bound_mono it records, per run (ms)."""
    out = []
    standin = REPO / "tests" / "standin"
    with tempfile.TemporaryDirectory(prefix="nika-bench-standin-") as tmp:
        for i in range(runs):
            state = Path(tmp) / f"s{i}"
            env = {k: v for k, v in os.environ.items() if not k.startswith("STANDIN_")}
            env.update({"PYTHONPATH": str(standin), "STANDIN_STATE_DIR": str(state),
                        "STANDIN_MAX_LIFETIME_S": "30"})
            argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model",
                    "standin-model", "--host", "127.0.0.1", "--port", str(free_port())]
            before = time.monotonic()
            proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                    start_new_session=True)
            try:
                deadline = time.monotonic() + 10
                bound = None
                while bound is None and time.monotonic() < deadline:
                    try:
                        bound = float((state / "bound_at").read_text())
                    except (OSError, ValueError):
                        time.sleep(0.005)
                if bound is None:
                    raise TimeoutError("the stand-in did not bind within 10 s")
                out.append((bound - before) * 1000)
            finally:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
    return {"bind_ms": [round(x, 1) for x in out]}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    res: dict[str, Any] = {"machine": machine(),
                           "load_before": os.getloadavg()[0],
                           "diagnoser": bench_diagnoser(args.runs),
                           "gpu_sample": bench_gpu_sample(args.runs),
                           "standin": bench_standin_bind(args.runs)}
    res["load_after"] = os.getloadavg()[0]
    print(json.dumps(res, indent=2))
    d, g, s = res["diagnoser"]["lines_per_s"], res["gpu_sample"]["median_us"], \
        res["standin"]["bind_ms"]
    print(f"\nmachine: {res['machine']}; load average {res['load_before']:.2f} -> "
          f"{res['load_after']:.2f}")
    print(f"diagnoser feed: median {statistics.median(d):,.0f} lines/s, min {min(d):,} "
          f"(n={len(d)})")
    print(f"GPU sampling pass (fake NVML, 1 device): median {statistics.median(g):.1f} us, "
          f"max {max(g):.1f} us (n={len(g)} runs of {res['gpu_sample']['passes_per_run']})")
    print(f"stand-in Popen -> bound: median {statistics.median(s):.0f} ms, max {max(s):.0f} ms "
          f"(n={len(s)})")
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
