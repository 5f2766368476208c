"""Prometheus metrics: one scrape target that answers while vLLM is down, loading or hung.

The daemon hands a plain `Snapshot` (frozen data, cumulative values) to `MetricsServer.update`;
a custom collector renders the latest one with prometheus_client (the official client, which
vLLM itself depends on) at scrape time. Nothing here touches the supervisor's state, and the
HTTP server runs on its own threads, so a scrape never waits on the main loop or on vLLM.
With `vllm_metrics_url`, vLLM's own /metrics is appended when vLLM answers within
VLLM_SCRAPE_TIMEOUT_S, so one scrape sees both; `nika_vllm_metrics_up` says whether it did.

Naming follows https://prometheus.io/docs/practices/naming/: the `nika_` prefix, base units
(seconds, bytes, celsius), `_total` on counters, `_info` for metadata, a state set for the
phase. Label values with unbounded sources are bounded: a restart cause is a stable failure
code (`exit`, `health`, `xid.79`, a diagnosis signature id ...); anything else, and any cause
past the first MAX_CAUSES, is `other`.

Module size: the metric definitions are one flat list (one block per family) so the exposed
names can be read in one place; that is most of the ~300 lines.
"""

from __future__ import annotations

import http.server
import re
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
    StateSetMetricFamily,
)
from prometheus_client.registry import Collector

from nika_supervisor import __version__

PHASES = ("starting", "loading", "ready", "unhealthy", "stopping", "backoff", "failed",
          "stopped")
LOAD_BUCKETS = (10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 900.0, 1200.0, 1800.0, 3600.0)
PROBE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
HOLD_BUCKETS = (0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
MAX_CAUSES = 64
VLLM_SCRAPE_TIMEOUT_S = 2.0
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Event names (README "Logs").
EVENT_LISTENING = "metrics.listening"  # info: host, port
EVENT_FAILED = "metrics.failed"  # error: host, port, error (the daemon runs on without it)
_CODE = re.compile(r"^[a-z][a-z0-9_]*(?:\.[a-z0-9_]+)?$")
_OURS = re.compile(rb"^(?:# (?:HELP|TYPE) )?nika_")  # a family of ours in vLLM's text: dropped


@dataclass(frozen=True, slots=True)
class Histogram:
    """A cumulative histogram as plain data: counts per bucket (the last is above every bound)
    and the sum. `observe` returns a new value; the daemon keeps it in its own state."""

    bounds: tuple[float, ...]
    counts: tuple[int, ...] = ()
    total: float = 0.0

    def observe(self, value: float) -> Histogram:
        counts = list(self.counts or (0,) * (len(self.bounds) + 1))
        i = next((k for k, b in enumerate(self.bounds) if value <= b), len(self.bounds))
        counts[i] += 1
        return replace(self, counts=tuple(counts), total=self.total + value)

    @property
    def count(self) -> int:
        return sum(self.counts)

    def family(self, name: str, doc: str, labels: Mapping[str, str] | None = None,
               into: HistogramMetricFamily | None = None) -> HistogramMetricFamily:
        fam = into or HistogramMetricFamily(name, doc, labels=list(labels or {}))
        counts = self.counts or (0,) * (len(self.bounds) + 1)
        running, buckets = 0, []
        for bound, n in zip((*self.bounds, float("inf")), counts, strict=True):
            running += n
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), running))
        fam.add_metric(list((labels or {}).values()), buckets, self.total)
        return fam


@dataclass(frozen=True, slots=True)
class GpuReading:
    index: int
    name: str = ""
    temperature_c: float | None = None
    memory_used_bytes: int | None = None
    memory_total_bytes: int | None = None


@dataclass(frozen=True, slots=True)
class GateReading:
    """What the gate (issue 10) provides: counters since start and the current queue."""

    requests_by_code: Mapping[str, int] = field(default_factory=dict)  # "200", "503", ...
    held: int = 0  # waiting for a model that is not ready
    in_flight: int = 0  # sent to vLLM, not finished
    hold_seconds: Histogram = field(default_factory=lambda: Histogram(HOLD_BUCKETS))


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything /metrics shows, as the daemon last handed it over. Times are unix seconds
    (wall clock: Prometheus compares them with time()); counters are cumulative."""

    phase: str = "starting"
    ready_since: float | None = None
    vllm_starts: int = 0
    restarts_by_cause: Mapping[str, int] = field(default_factory=dict)
    restarts_in_window: int = 0  # carried across daemon restarts (history.boot_budget)
    max_restarts: int = 0
    give_ups: int = 0  # from the history: give-ups end the daemon, so a new one counts them
    last_give_up_code: int | None = None  # 69, 79 or 80 (from the history)
    last_give_up_at: float | None = None
    last_load_s: float | None = None
    load_seconds: Histogram = field(default_factory=lambda: Histogram(LOAD_BUCKETS))
    load_shards: tuple[int, int] | None = None  # done, total while loading
    loading_for_s: float | None = None
    probe_seconds: Mapping[str, Histogram] = field(default_factory=dict)  # health, models, canary
    probe_results: Mapping[tuple[str, str], int] = field(default_factory=dict)  # (probe, ok|fail)
    gpus: tuple[GpuReading, ...] = ()
    vllm_gpu_resident_bytes: int | None = None
    xid_by_code: Mapping[int, int] = field(default_factory=dict)
    gpu_findings_by_code: Mapping[str, int] = field(default_factory=dict)
    gpu_fatal: bool = False  # a fatal-class GPU finding: the daemon is stopping vLLM to exit 80
    log_lines_dropped: int = 0
    history_write_errors: int = 0
    gate: GateReading | None = None
    vllm_version: str = ""


def bounded_causes(counts: Mapping[str, int], limit: int = MAX_CAUSES) -> dict[str, int]:
    """Stable failure codes pass; free text and anything past `limit` distinct codes (in
    order of first appearance) is `other`."""
    out: dict[str, int] = {}
    for code, n in counts.items():
        key = code if _CODE.match(code) and len(code) <= 48 else "other"
        if key not in out and len(out) >= limit - 1:
            key = "other"
        out[key] = out.get(key, 0) + n
    return out


class SnapshotCollector(Collector):
    def __init__(self, source: Callable[[], Snapshot],
                 extra: Callable[[], Iterable[Metric]] | None = None) -> None:
        self.source = source
        self.extra = extra

    def collect(self) -> Iterable[Metric]:
        s = self.source()
        info = InfoMetricFamily("nika_build", "Versions of the supervisor and of vLLM")
        info.add_metric([], {"version": __version__, "vllm_version": s.vllm_version or "unknown"})
        yield info

        phase = StateSetMetricFamily("nika_phase", "The supervisor's phase")
        phase.add_metric([], {p: p == s.phase for p in PHASES})
        yield phase
        ready = s.phase in ("ready", "unhealthy")
        yield GaugeMetricFamily("nika_ready", "1 when the model answers (READY=1 sent)",
                                value=1.0 if ready else 0.0)
        yield GaugeMetricFamily("nika_ready_since_timestamp_seconds",
                                "When the current vLLM became ready (0 when not ready)",
                                value=s.ready_since if ready and s.ready_since else 0.0)

        yield CounterMetricFamily("nika_vllm_starts", "vLLM servers started by this daemon",
                                  value=s.vllm_starts)
        restarts = CounterMetricFamily("nika_restarts", "vLLM restarts by failure cause",
                                       labels=["cause"])
        for cause, n in sorted(bounded_causes(s.restarts_by_cause).items()):
            restarts.add_metric([cause], n)
        yield restarts
        yield GaugeMetricFamily("nika_restarts_in_window",
                                "Restarts within restart.window, carried across daemon restarts",
                                value=s.restarts_in_window)
        yield GaugeMetricFamily("nika_restarts_max", "restart.max_restarts",
                                value=s.max_restarts)
        yield CounterMetricFamily("nika_give_ups", "Times the daemon gave up (exit 69/79/80), "
                                  "as recorded in its history", value=s.give_ups)
        if s.last_give_up_code is not None:
            yield GaugeMetricFamily("nika_last_give_up_exit_code",
                                    "Exit code of the last give-up (69, 79, 80)",
                                    value=s.last_give_up_code)
            yield GaugeMetricFamily("nika_last_give_up_timestamp_seconds",
                                    "When the daemon last gave up", value=s.last_give_up_at or 0)

        if s.last_load_s is not None:
            yield GaugeMetricFamily("nika_load_last_seconds",
                                    "How long the last load took, spawn to ready",
                                    value=s.last_load_s)
        yield s.load_seconds.family("nika_load_duration_seconds",
                                    "Load times, spawn to ready")
        if s.loading_for_s is not None:
            yield GaugeMetricFamily("nika_loading_elapsed_seconds",
                                    "How long the current load has run", value=s.loading_for_s)
        if s.load_shards is not None:
            done, of = s.load_shards
            yield GaugeMetricFamily("nika_loading_shards_ratio",
                                    "Checkpoint shards loaded, as a share of all",
                                    value=done / of if of else 0.0)

        if s.probe_seconds:
            fam = HistogramMetricFamily("nika_probe_duration_seconds",
                                        "Probe and canary latency", labels=["probe"])
            for probe, h in sorted(s.probe_seconds.items()):
                h.family("", "", {"probe": probe}, into=fam)
            yield fam
        results = CounterMetricFamily("nika_probe_results", "Probe and canary outcomes",
                                      labels=["probe", "result"])
        for (probe, result), n in sorted(s.probe_results.items()):
            results.add_metric([probe, result], n)
        yield results

        temp = GaugeMetricFamily("nika_gpu_temperature_celsius", "GPU temperature",
                                 labels=["gpu", "name"])
        used = GaugeMetricFamily("nika_gpu_memory_used_bytes", "GPU memory in use (on unified "
                                 "memory, the shared pool)", labels=["gpu", "name"])
        total = GaugeMetricFamily("nika_gpu_memory_total_bytes", "GPU memory",
                                  labels=["gpu", "name"])
        for gpu in s.gpus:
            lab = [str(gpu.index), gpu.name]
            if gpu.temperature_c is not None:
                temp.add_metric(lab, gpu.temperature_c)
            if gpu.memory_used_bytes is not None:
                used.add_metric(lab, gpu.memory_used_bytes)
            if gpu.memory_total_bytes is not None:
                total.add_metric(lab, gpu.memory_total_bytes)
        yield from (temp, used, total)
        if s.vllm_gpu_resident_bytes is not None:
            yield GaugeMetricFamily("nika_vllm_gpu_resident_bytes",
                                    "GPU memory held by vLLM's process group",
                                    value=s.vllm_gpu_resident_bytes)
        xid = CounterMetricFamily("nika_gpu_xid_events", "Xid events by code", labels=["code"])
        for xid_code, n in sorted(s.xid_by_code.items()):
            xid.add_metric([str(int(xid_code))], n)
        yield xid
        findings = CounterMetricFamily("nika_gpu_findings", "GPU findings by code",
                                       labels=["code"])
        for code, n in sorted(bounded_causes(s.gpu_findings_by_code).items()):
            findings.add_metric([code], n)
        yield findings
        yield GaugeMetricFamily("nika_gpu_fatal", "1 once a GPU fault that needs a reset or a "
                                "reboot was found (the daemon then exits 80)",
                                value=1.0 if s.gpu_fatal else 0.0)

        yield CounterMetricFamily("nika_log_lines_dropped",
                                  "vLLM output lines dropped because the journal was stuck",
                                  value=s.log_lines_dropped)
        yield CounterMetricFamily("nika_history_write_errors",
                                  "History records that could not be written",
                                  value=s.history_write_errors)

        if s.gate is not None:
            g = s.gate
            req = CounterMetricFamily("nika_gate_requests", "Requests answered by the gate, "
                                      "by HTTP status", labels=["code"])
            for code, n in sorted(g.requests_by_code.items()):
                req.add_metric([code if code.isdigit() and len(code) == 3 else "other"], n)
            yield req
            yield GaugeMetricFamily("nika_gate_held_requests",
                                    "Requests held while the model is not ready", value=g.held)
            yield GaugeMetricFamily("nika_gate_requests_in_flight",
                                    "Requests sent to vLLM and not finished", value=g.in_flight)
            yield g.hold_seconds.family("nika_gate_hold_duration_seconds",
                                        "How long held requests waited")
        if self.extra is not None:
            yield from self.extra()


# ------------------------------------------------------------------------------ the server


class Exposition:
    """The latest snapshot and how to render it: what `/metrics` answers, wherever it is served
    (MetricsServer here, or the gate's own `/metrics`; render() may wait up to
    VLLM_SCRAPE_TIMEOUT_S on vLLM, so an event loop should call it in a thread)."""

    def __init__(self, vllm_metrics_url: str | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        self._snapshot = Snapshot()
        self._lock = threading.Lock()
        self.vllm_metrics_url = vllm_metrics_url
        self._headers = dict(headers or {})
        self._vllm_up = 0.0
        # The gate's figures, read at each scrape (they change with every request).
        self.gate: Callable[[], GateReading] | None = None
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(SnapshotCollector(self.snapshot, self._extra))

    def update(self, snapshot: Snapshot) -> None:
        with self._lock:
            self._snapshot = snapshot

    def snapshot(self) -> Snapshot:
        with self._lock:
            snap = self._snapshot
        return snap if self.gate is None else replace(snap, gate=self.gate())

    def _extra(self) -> Iterable[Metric]:
        if self.vllm_metrics_url is not None:
            yield GaugeMetricFamily("nika_vllm_metrics_up", "1 when vLLM's own /metrics was "
                                    "appended to this scrape", value=self._vllm_up)

    def render(self) -> bytes:
        """Our exposition, then vLLM's when it answers (its families never use our prefix)."""
        vllm_text = b""
        if self.vllm_metrics_url is not None:
            vllm_text = self._fetch_vllm()
            self._vllm_up = 1.0 if vllm_text else 0.0
        ours = generate_latest(self.registry)
        return ours + vllm_text

    def _fetch_vllm(self) -> bytes:
        assert self.vllm_metrics_url is not None
        req = urllib.request.Request(self.vllm_metrics_url, headers=self._headers)
        try:
            with urllib.request.urlopen(req, timeout=VLLM_SCRAPE_TIMEOUT_S) as r:
                body: bytes = r.read(16 * 1024 * 1024)
        except (OSError, ValueError, urllib.error.URLError):
            return b""
        lines = [ln for ln in body.splitlines()
                 if not _OURS.match(ln) and ln.strip() != b"# EOF"]
        return b"\n".join(lines) + b"\n" if lines else b""


class MetricsServer:
    """`GET /metrics` on `listen` (host, port), on threads of its own."""

    def __init__(self, listen: tuple[str, int], vllm_metrics_url: str | None = None,
                 headers: Mapping[str, str] | None = None,
                 exposition: Exposition | None = None) -> None:
        self.exposition = exposition or Exposition(vllm_metrics_url, headers)
        self.update = self.exposition.update
        self.snapshot = self.exposition.snapshot
        self.render = self.exposition.render
        host, port = listen
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        server_cls = type("Server", (http.server.ThreadingHTTPServer,),
                          {"address_family": family, "daemon_threads": True})
        self._httpd = server_cls((host, port), self._handler())
        self.port = int(self._httpd.server_address[1])
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="metrics-http",
                                        daemon=True)

    def start(self) -> MetricsServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def _handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.split("?")[0] not in ("/metrics", "/"):
                    self.send_error(404)
                    return
                if self.path == "/":
                    body, ctype = b"nika-supervisor: see /metrics\n", "text/plain"
                else:
                    body, ctype = server.render(), CONTENT_TYPE
                self.send_response(200)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass  # scrapes every 15 s would flood the journal

        return Handler
