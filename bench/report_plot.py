"""How much the report and its picture cost: build + text from a 48-hour history, the SVG
written directly, and the PNG through matplotlib (import time measured in a fresh process).

    .venv/bin/python bench/report_plot.py [--runs 15]

Prints medians; the numbers in docs/BENCHMARKS.md come from this script.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1] / "tests"),
                str(Path(__file__).resolve().parents[1] / "tests" / "unit")]

from test_report import NOW, H, scripted  # noqa: E402 - the scripted history of the tests

from nika_supervisor import plot, report  # noqa: E402

IMPORT = ("import time; t = time.perf_counter(); import matplotlib; matplotlib.use('Agg'); "
          "import matplotlib.pyplot; print(time.perf_counter() - t)")


def median_ms(fn: object, runs: int) -> float:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=15)
    runs = ap.parse_args().runs
    recs = scripted(NOW)
    r = report.build(recs, NOW, 48 * H)
    print(f"history: {len(recs)} records over 50 h")
    text_ms = median_ms(lambda: report.text(report.build(recs, NOW, 48 * H)), runs)
    print(f"build + text: {text_ms:.1f} ms")
    svg = plot.svg(r)
    print(f"svg: {median_ms(lambda: plot.svg(r), runs):.1f} ms, {len(svg) / 1024:.0f} KiB")
    imports = [float(subprocess.run([sys.executable, "-c", IMPORT], capture_output=True,
                                    text=True, check=True).stdout) for _ in range(5)]
    print("matplotlib import (fresh process, median of 5): "
          f"{1000 * statistics.median(imports):.0f} ms")
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "r.png"
        print(f"png: {median_ms(lambda: plot.png(r, str(out)), max(3, runs // 3)):.0f} ms "
              f"(after import), {out.stat().st_size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
