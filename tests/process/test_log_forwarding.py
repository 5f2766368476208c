"""vLLM's output through the daemon's log: every line, in order, tagged, never blocking."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import write_config

pytestmark = pytest.mark.process

LINES = 20_000


def test_forwards_every_line_in_order(tmp_path: Path, start_daemon) -> None:
    """A burst of 20k lines from vLLM arrives complete and in order as vllm.output events with
    stream=stdout."""
    cfg = write_config(tmp_path, vllm={"env": {"STANDIN_LOG_LINES": str(LINES)}},
                       supervisor={"log_level": "info"})
    d = start_daemon(cfg)
    d.wait_event("vllm.output", timeout=30,
                 line=lambda s: s.endswith(f"standin log done {LINES}"))
    numbered = [e for e in d.events_named("vllm.output") if "standin line " in e["line"]]
    numbers = [int(e["line"].split("standin line ")[1][:6]) for e in numbered]
    gap = next((i for i, n in enumerate(numbers, 1) if n != i), None)
    assert numbers == list(range(1, LINES + 1)), f"{len(numbers)} lines, first gap at {gap}"
    assert all(e["stream"] == "stdout" and e["level"] == "info" for e in numbered)
    info = d.standin.info()
    assert info is not None and info["log_lines_s"] is not None  # the writer got through
    # (Throughput, lines/s, is measured by bench/supervisor_bench.py, not asserted here.)


def test_vllm_levels_map_to_log_levels(tmp_path: Path, start_daemon) -> None:
    """vLLM's own level word decides the level of its forwarded line (WARNING -> warning)."""
    replay = tmp_path / "replay.txt"
    replay.write_text("(APIServer pid=1) WARNING 11-27 07:00:00 [x.py:1] careful\n"
                      "(APIServer pid=1) ERROR 11-27 07:00:00 [x.py:2] broken\n")
    cfg = write_config(tmp_path, vllm={"env": {"STANDIN_STARTUP_EXIT_CODE": "1",
                                               "STANDIN_STARTUP_STDERR": str(replay)}},
                       restart={"max_restarts": 0})
    d = start_daemon(cfg)
    assert d.wait_exit(15) == 69
    by_line = {e["line"]: e for e in d.events_named("vllm.output", stream="stderr")}
    assert by_line["(APIServer pid=1) WARNING 11-27 07:00:00 [x.py:1] careful"]["level"] == \
        "warning"
    assert by_line["(APIServer pid=1) ERROR 11-27 07:00:00 [x.py:2] broken"]["level"] == "error"
