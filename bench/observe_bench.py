"""What the Observer costs the daemon's loop: tick() (stall rule, heartbeat throttle, a fresh
metrics snapshot), on_event() for an event that is not recorded, and one /metrics render
while vLLM is down (connection refused).

    .venv/bin/python bench/observe_bench.py

Prints medians; docs/BENCHMARKS.md records them.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from collections.abc import Callable

from nika_supervisor.config import parse_config
from nika_supervisor.observe import Observer


def median_us(fn: Callable[[int], object], runs: int) -> float:
    times = []
    for i in range(runs):
        t = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t)
    return 1e6 * statistics.median(times)


def main() -> None:
    with tempfile.TemporaryDirectory() as d:
        cfg = parse_config(json.dumps({
            "vllm": {"model": "/m", "port": 9, "env": {"HF_HUB_OFFLINE": "1"}},
            "supervisor": {"state_dir": d}}), "bench.yaml", check_paths=False)
        obs = Observer(cfg)
        obs.start(0.0)
        obs.on_event("phase.changed", {"from": "loading", "to": "ready"}, 1.0)
        print(f"tick: {median_us(lambda i: obs.tick(float(i)), 2000):.1f} us")
        print(f"on_event (not recorded): "
              f"{median_us(lambda i: obs.on_event('health.recovered', {}, float(i)), 2000):.1f} us")
        print(f"render, vLLM refused: "
              f"{median_us(lambda i: obs.exposition.render(), 200) / 1000:.2f} ms")
        obs.close(0)


if __name__ == "__main__":
    main()
