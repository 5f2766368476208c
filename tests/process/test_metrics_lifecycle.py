"""The daemon's own /metrics (supervisor.metrics_listen), scraped from outside while the real
daemon runs the stand-in through its life: loading, ready, a SIGKILL of the API server and its
restart, and a give-up (exit 69) whose traces a second daemon on the same state_dir serves
from the history. Every scrape is parsed with prometheus_client's text parser (the format a
Prometheus server reads) and its values are asserted; the names are those of
nika_supervisor/exposition.py (README "Metrics")."""

from __future__ import annotations

import os
import signal
import time
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest
from helpers import Daemon, NotifySocket, free_port, poll_for, write_config
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.process

Key = tuple[str, frozenset[tuple[str, str]]]


class Scrape:
    """One /metrics answer: every sample by (name, labels)."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples: dict[Key, float] = {}
        self.types: dict[str, str] = {}
        for fam in text_string_to_metric_families(text):
            self.types[fam.name] = fam.type
            for s in fam.samples:
                self.samples[(s.name, frozenset(s.labels.items()))] = s.value

    def get(self, name: str, **labels: str) -> float | None:
        return self.samples.get((name, frozenset(labels.items())))

    def __getitem__(self, name: str) -> float:
        value = self.get(name)
        assert value is not None, f"{name} missing from the scrape:\n{self.text}"
        return value

    def labelled(self, name: str) -> dict[frozenset[tuple[str, str]], float]:
        return {labels: v for (n, labels), v in self.samples.items() if n == name}

    def phase(self) -> str:
        """The one phase the state set says is on (and it must be exactly one)."""
        on = [dict(labels)["nika_phase"] for labels, v in self.labelled("nika_phase").items()
              if v == 1]
        assert len(on) == 1, f"nika_phase must have exactly one state on: {on}\n{self.text}"
        return on[0]


def scrape(port: int) -> Scrape:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        return Scrape(r.read().decode())


def scrape_until(port: int, ok: Callable[[Scrape], bool], what: str,
                 timeout: float = 10.0) -> Scrape:
    def once() -> Scrape | None:
        s = scrape(port)
        return s if ok(s) else None

    return poll_for(once, timeout, f"/metrics to show {what}", interval=0.05)


def metrics_config(tmp_path: Path, env: Mapping[str, str], **overrides: object) -> tuple[Path,
                                                                                        int]:
    port = free_port()
    cfg = write_config(tmp_path, vllm={"env": dict(env)},
                       supervisor={"metrics_listen": f"127.0.0.1:{port}"}, **overrides)
    return cfg, port


def test_metrics_while_loading_ready_and_across_a_sigkill(
        tmp_path: Path, start_daemon: Callable[..., Daemon],
        notify_socket: NotifySocket) -> None:
    """Loading: phase `loading`, not ready, one start, the load's elapsed time growing. Ready:
    nika_ready 1 with its since-timestamp, the load time observed, ready probes counted.
    SIGKILL of the API server: not ready at once, the restart counted under the cause the
    daemon scheduled it with; then ready again on a second start, with a later timestamp."""
    bind_delay = 2.5
    cfg, port = metrics_config(tmp_path, {"STANDIN_BIND_DELAY_S": str(bind_delay)})
    wall0 = time.time()
    d = start_daemon(cfg, notify=notify_socket)
    listening = d.wait_event("metrics.listening", timeout=10)
    assert listening["port"] == port

    # -- loading ---------------------------------------------------------------------------
    loading = scrape_until(port, lambda s: s.phase() == "loading", "phase loading", 10)
    assert not notify_socket.first("READY", "1"), "READY=1 before the load finished"
    assert loading["nika_ready"] == 0
    assert loading["nika_ready_since_timestamp_seconds"] == 0
    assert loading["nika_vllm_starts_total"] == 1
    assert loading.types["nika_vllm_starts"] == "counter"
    assert loading.types["nika_phase"] in ("stateset", "gauge")
    assert loading.get("nika_load_last_seconds") is None  # no load finished yet
    assert loading["nika_load_duration_seconds_count"] == 0
    assert loading.labelled("nika_restarts_total") == {}
    assert loading["nika_give_ups_total"] == 0
    assert loading["nika_restarts_in_window"] == 0
    assert loading["nika_restarts_max"] == 3  # write_config's restart.max_restarts
    first = loading["nika_loading_elapsed_seconds"]
    later = scrape_until(port, lambda s: (s.get("nika_loading_elapsed_seconds") or 0) > first,
                         "the load's elapsed time growing", 5)
    assert later.phase() == "loading"
    build = loading.labelled("nika_build_info")
    assert len(build) == 1 and list(build.values()) == [1.0]

    # -- ready -----------------------------------------------------------------------------
    d.wait_event("vllm.ready", timeout=20)
    notify_socket.wait_key("READY", "1", timeout=5)
    ready = scrape_until(port, lambda s: s["nika_ready"] == 1, "nika_ready 1")
    assert ready.phase() == "ready"
    since1 = ready["nika_ready_since_timestamp_seconds"]
    assert wall0 + bind_delay <= since1 <= time.time()
    load1 = ready["nika_load_last_seconds"]
    assert bind_delay <= load1 < bind_delay + 10
    assert ready["nika_load_duration_seconds_count"] == 1
    assert ready["nika_load_duration_seconds_sum"] == pytest.approx(load1)
    assert ready["nika_vllm_starts_total"] == 1
    assert ready.get("nika_loading_elapsed_seconds") is None  # no load in progress
    assert (ready.get("nika_probe_results_total", probe="ready", result="ok") or 0) >= 1
    assert (ready.get("nika_probe_duration_seconds_count", probe="ready") or 0) >= 1
    # liveness probes run while ready: their count grows and none failed
    live = scrape_until(port, lambda s: (s.get("nika_probe_results_total", probe="live",
                                                result="ok") or 0) >= 2,
                        "live probes counted", 10)
    assert live.get("nika_probe_results_total", probe="live", result="fail") in (None, 0)

    # -- SIGKILL of the API server ---------------------------------------------------------
    api = d.standin.api_pid
    assert api is not None
    t0 = d.events[-1].t
    os.kill(api, signal.SIGKILL)
    exited = d.wait_event("vllm.exited", since=t0, pid=api)
    assert exited["signal"] == "SIGKILL" and exited["requested"] is False
    sched = d.wait_event("restart.scheduled", since=t0)
    down = scrape_until(port, lambda s: s["nika_ready"] == 0, "nika_ready 0 after SIGKILL", 5)
    assert down.phase() in ("stopping", "backoff", "starting", "loading"), down.phase()
    assert down["nika_ready_since_timestamp_seconds"] == 0
    restarts = down.labelled("nika_restarts_total")
    assert sum(restarts.values()) == 1, restarts
    (cause,) = [dict(labels)["cause"] for labels in restarts]
    # the cause label is the failure code the restart was scheduled with (bounded: not free
    # text), and the same code the history recorded
    assert cause == sched["code"] and cause not in ("", "other"), (cause, sched.fields)
    assert "sigkill" in cause, cause  # the diagnosis of the exit, not a generic code
    assert down["nika_restarts_in_window"] == 1

    # -- ready again -----------------------------------------------------------------------
    d.wait_event("vllm.ready", since=exited.t, timeout=20)
    again = scrape_until(port, lambda s: s["nika_ready"] == 1, "nika_ready 1 again", 10)
    assert again.phase() == "ready"
    assert again["nika_vllm_starts_total"] == 2
    assert again["nika_ready_since_timestamp_seconds"] > since1
    assert again["nika_load_duration_seconds_count"] == 2
    assert again.get("nika_restarts_total", cause=cause) == 1
    history = (tmp_path / "state" / "history.jsonl").read_text()
    assert f'"code": "{cause}"' in history or f'"code":"{cause}"' in history, history[-2000:]


def test_give_up_is_served_by_the_next_daemon_from_the_history(
        tmp_path: Path, start_daemon: Callable[..., Daemon]) -> None:
    """A vLLM that always fails at start: the restarts are scraped with their cause while the
    daemon tries; it gives up (exit 69). A second daemon on the same state_dir counts that
    give-up (nika_give_ups_total, its exit code and time) and the restarts still in the
    window, read back from the history, before it has started anything itself."""
    cfg, port = metrics_config(
        tmp_path, {"STANDIN_STARTUP_EXIT_CODE": "1"},
        restart={"backoff_initial": "500ms", "backoff_max": "1s", "max_restarts": 2,
                 "window": "60s"})
    first = start_daemon(cfg)
    first.wait_event("metrics.listening", timeout=10)
    trying = scrape_until(port, lambda s: sum(s.labelled("nika_restarts_total").values()) >= 1,
                          "a restart counted", 20)
    assert trying["nika_ready"] == 0 and trying["nika_give_ups_total"] == 0
    causes = {dict(labels)["cause"] for labels in trying.labelled("nika_restarts_total")}
    assert causes and "other" not in causes, causes
    assert causes <= {e["code"] for e in first.events_named("restart.scheduled")}, causes
    assert first.wait_exit(40) == 69, first.tail()
    gave_up_at = time.time()
    with pytest.raises(OSError):  # the endpoint went with the daemon
        scrape(port)

    second = start_daemon(cfg)
    second.wait_event("metrics.listening", timeout=10)
    after = scrape(port)
    assert after["nika_give_ups_total"] >= 1
    assert after["nika_last_give_up_exit_code"] == 69
    assert gave_up_at - 30 <= after["nika_last_give_up_timestamp_seconds"] <= gave_up_at
    assert after["nika_restarts_in_window"] >= 2  # the first daemon's, from the history
    assert after["nika_restarts_max"] == 2
    assert after["nika_ready"] == 0
    # a fresh process: its own counters start at zero, the history's are carried
    assert after["nika_vllm_starts_total"] <= 1
    assert second.wait_exit(40) == 69, second.tail()
