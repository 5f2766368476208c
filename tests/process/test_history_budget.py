"""The history in supervisor.state_dir carries the restart budget across daemon restarts:
a daemon that gave up (exit 69) and is started again (as systemd does) does not start over
with a fresh budget and a short backoff."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from helpers import write_config

pytestmark = pytest.mark.process


def test_crash_loop_slows_down_across_daemon_restarts(tmp_path: Path, start_daemon) -> None:
    """A vLLM that always fails at start: the first daemon gives up after max_restarts; the
    next one, on the same state_dir, reads the restarts back, says so, and waits the backoff
    still owed before its first start."""
    cfg = write_config(tmp_path, vllm={"env": {"STANDIN_STARTUP_EXIT_CODE": "1"}},
                       restart={"backoff_initial": "1s", "backoff_max": "4s",
                                "max_restarts": 2, "window": "60s"})
    first = start_daemon(cfg)
    assert first.wait_exit(40) == 69, first.tail()
    spawns_first = len(first.events_named("vllm.spawned"))
    history = (tmp_path / "state" / "history.jsonl").read_text().splitlines()
    kinds = [json.loads(line)["kind"] for line in history]
    assert kinds.count("restart") == 2 and "give_up" in kinds

    t0 = time.monotonic()
    second = start_daemon(cfg)
    carried = second.wait_event("restart.budget_carried", timeout=10)
    assert carried["restarts_in_window"] >= 2 and carried["delay_s"] > 0  # + the give-up
    first_phase = second.wait_event("phase.changed", timeout=10)
    assert first_phase["to"] == "backoff"
    spawned = second.wait_event("vllm.spawned", timeout=20)
    assert spawned.t - t0 >= 0.8 * float(carried["delay_s"])
    # the carried restarts count against the window: this daemon gives up at once
    assert second.wait_exit(40) == 69, second.tail()
    assert len(second.events_named("vllm.spawned")) < spawns_first


def test_a_load_that_stops_making_progress_is_restarted(tmp_path: Path, start_daemon) -> None:
    """vLLM prints its first loading lines and then nothing for longer than health.load_stall:
    a fault with code load_stall, long before health.startup_timeout; STATUS said what the
    load was doing meanwhile."""
    cfg = write_config(tmp_path, vllm={"env": {"STANDIN_BIND_DELAY_S": "30"}},
                       health={"load_stall": "2s", "startup_timeout": "60s"})
    d = start_daemon(cfg)
    fault = d.wait_event("vllm.fault", timeout=20)
    assert fault["code"] == "load_stall"
    stalled = d.wait_event("load.stalled")
    assert stalled["load_stall_s"] == 2.0
    assert d.wait_event("restart.scheduled")["code"] == "load_stall"
    spawned = d.events_named("vllm.spawned")[0]
    assert fault.t - spawned.t < 10


def test_each_load_step_reaches_the_state_file_at_once(tmp_path: Path, start_daemon) -> None:
    """A new load step is news: the state file (and STATUS) show it on the next loop pass,
    not only at a phase change or the 5 s refresh."""
    from helpers import poll_for

    cfg = write_config(tmp_path, vllm={"env": {"STANDIN_BIND_DELAY_S": "20"}},
                       health={"load_stall": "0"})
    d = start_daemon(cfg)
    d.wait_event("load.progress", timeout=10)

    def latest_step_in_file() -> dict | None:
        latest = d.events_named("load.progress")[-1]["status"]  # "loading: <step>, Ns elapsed"
        state = d.state_file() or {}
        step = latest.split(", ")[0]
        return state if step in str(state.get("status")) else None

    state = poll_for(latest_step_in_file, 2.0, "the latest load step in the state file")
    assert state["phase"] == "loading" and "starting vLLM" not in state["status"]
