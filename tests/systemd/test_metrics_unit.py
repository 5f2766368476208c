"""A real Prometheus server (Debian's 2.42, unpacked by scripts/promtool.sh) runs inside the
namespace as a transient unit of its systemd 252, next to the shipped nika-vllm.service with
supervisor.metrics_listen on, and scrapes the daemon every second. Through Prometheus's own
HTTP API (/api/v1/query_range) the stored nika_ready goes 0 -> 1 -> 0 -> 1 across a SIGKILL of
vLLM: loading, ready, the crash, ready again under the same daemon. The scrape target never
went away meanwhile (`up` stayed 1): the daemon's /metrics answers while vLLM is down.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from helpers import free_port, poll_for, promtool
from nika_helpers import (
    UNIT,
    mark,
    props,
    reset,
    standin_config,
    standin_file,
    unit_journal,
    wait_active,
    write_config,
)
from systemd_harness import MEASUREMENTS, Namespace

pytestmark = pytest.mark.systemd

PROM_UNIT = "nika-test-prometheus.service"
PROM_DIR = "/etc/nika-test-prometheus"
PROM_BIN_COPY = "/opt/nika-test/prometheus"
JOB = "nika-vllm"  # monitoring/prometheus.yml's job name (the alert rules match on it)


class Prometheus:
    """Prometheus's HTTP API, as a dashboard or an alert manager would read it."""

    def __init__(self, port: int) -> None:
        self.port = port

    def api(self, path: str, **params: str) -> Any:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=5) as r:
            body = json.loads(r.read())
        assert body["status"] == "success", body
        return body["data"]

    def value(self, query: str) -> float | None:
        result = self.api("query", query=query)["result"]
        assert len(result) <= 1, result
        return float(result[0]["value"][1]) if result else None

    def targets(self) -> list[dict[str, Any]]:
        """The scrape targets as Prometheus reports them (health, lastError)."""
        return [{k: t.get(k) for k in ("scrapeUrl", "health", "lastError")}
                for t in self.api("targets")["activeTargets"]]

    def wait(self, query: str, expected: float, timeout: float,
             ns: Namespace | None = None) -> None:
        try:
            poll_for(lambda: self.value(query) == expected, timeout,
                     f"Prometheus to see {query} == {expected}", interval=0.2)
        except AssertionError as e:
            journal = unit_journal(ns)[-3000:] if ns is not None else ""
            stored = self.api("query_range", query=query.split("{")[0], start=str(
                time.time() - 120), end=str(time.time()), step="1")["result"]
            raise AssertionError(f"{e}\ntargets: {self.targets()}\nstored: {stored}\n"
                                 f"{UNIT}:\n{journal}") from None

    def series(self, query: str, start: float, end: float, step: float = 0.5
               ) -> list[tuple[float, float]]:
        result = self.api("query_range", query=query, start=f"{start:.3f}", end=f"{end:.3f}",
                          step=str(step))["result"]
        assert len(result) == 1, result
        return [(float(t), float(v)) for t, v in result[0]["values"]]


def changes(points: list[tuple[float, float]]) -> list[float]:
    """The values in order, each run of equal values collapsed to one."""
    out: list[float] = []
    for _, v in points:
        if not out or out[-1] != v:
            out.append(v)
    return out


@pytest.fixture
def ns(nika_ns: Namespace) -> Iterator[Namespace]:
    reset(nika_ns)
    # this test's restart budget is its own (the unit's history may hold earlier tests')
    nika_ns.run(["sh", "-c", "rm -f /var/lib/nika-vllm/history.jsonl*"])
    yield nika_ns
    reset(nika_ns)


@pytest.fixture
def prometheus(ns: Namespace) -> Iterator[tuple[Prometheus, int]]:
    """Prometheus as a transient unit inside the namespace, scraping a port picked here;
    yields its API and that port (the daemon's supervisor.metrics_listen)."""
    binary = promtool.prometheus()
    if not ns.path(binary).exists():  # the cache is under a directory the namespace hides
        ns.run(["mkdir", "-p", os.path.dirname(PROM_BIN_COPY)])
        shutil.copyfile(binary, ns.path(PROM_BIN_COPY))
        ns.path(PROM_BIN_COPY).chmod(0o755)
        binary = PROM_BIN_COPY
    target = free_port()
    ns.write(f"{PROM_DIR}/prometheus.yml", json.dumps({
        "global": {"scrape_interval": "1s", "scrape_timeout": "900ms",
                   "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": JOB,
                            "static_configs": [{"targets": [f"127.0.0.1:{target}"]}]}]}))
    port = free_port()
    ns.run(["systemd-run", f"--unit={PROM_UNIT}", "-p", "StateDirectory=nika-test-prometheus",
            binary, f"--config.file={PROM_DIR}/prometheus.yml",
            "--storage.tsdb.path=/var/lib/nika-test-prometheus",
            f"--web.listen-address=127.0.0.1:{port}"])
    try:
        def ready() -> bool:
            state = ns.show(PROM_UNIT, "ActiveState")["ActiveState"]
            assert state in ("active", "activating"), (
                f"Prometheus {state}:\n{ns.journal('-u', PROM_UNIT)[-3000:]}")
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=2) as r:
                return r.status == 200

        t0 = time.monotonic()
        poll_for(ready, 30, "Prometheus to be ready", interval=0.2)
        prom = Prometheus(port)
        # Scraping already (the target is down: nothing listens yet). Prometheus applies its
        # first target set a few seconds after it is ready; a daemon started before that
        # could finish its load unseen.
        poll_for(lambda: [t for t in prom.targets() if t["health"] == "down"], 30,
                 "Prometheus to scrape the (not yet listening) target", interval=0.2)
        MEASUREMENTS["prometheus in the namespace: start to scraping (s)"] = round(
            time.monotonic() - t0, 2)
        yield prom, target
    finally:
        ns.systemctl("stop", PROM_UNIT, check=False)
        ns.systemctl("reset-failed", PROM_UNIT, check=False)
        poll_for(lambda: not ns.unit_pids(PROM_UNIT), 30, "Prometheus to be gone")


def test_prometheus_sees_ready_0_1_0_1_across_a_sigkill(
        ns: Namespace, prometheus: tuple[Prometheus, int]) -> None:
    prom, metrics_port = prometheus
    ready = f'nika_ready{{job="{JOB}"}}'
    cfg = standin_config(supervisor={"metrics_listen": f"127.0.0.1:{metrics_port}"},
                         vllm={"env": {"STANDIN_BIND_DELAY_S": "4"}})  # loads Prometheus sees
    write_config(ns, cfg)
    start = time.time()
    c = mark()
    ns.systemctl("start", "--no-block", UNIT)

    # -- loading: the target answers, not ready ----------------------------------------------
    prom.wait(ready, 0, 30, ns)
    first_seen = time.time()
    main = wait_active(ns, 60)
    prom.wait(ready, 1, 15, ns)
    assert "metrics.listening" in unit_journal(ns, c)

    # -- SIGKILL of vLLM: not ready, then ready again under the same daemon ------------------
    api = int(standin_file(ns, "api.pid") or 0)
    assert api, "no stand-in api.pid"
    os.kill(ns.host_pid(api), signal.SIGKILL)
    prom.wait(ready, 0, 15, ns)
    prom.wait(ready, 1, 60, ns)

    def stored() -> list[tuple[float, float]] | None:  # the last step may predate the sample
        points = prom.series(ready, start, time.time())
        return points if changes(points)[-1:] == [1] else None

    points = poll_for(stored, 5, "the range query to reach the last sample", interval=0.2)
    end = points[-1][0]
    assert changes(points) == [0, 1, 0, 1], points
    # the target never went away: the daemon's /metrics answered through load and crash
    up = prom.series(f'up{{job="{JOB}"}}', first_seen, end)
    assert {v for _, v in up} == {1.0}, up
    # what Prometheus stored agrees with what the daemon did
    assert prom.value(f'nika_vllm_starts_total{{job="{JOB}"}}') == 2
    assert prom.value(f'nika_restarts_total{{job="{JOB}",cause="killed_sigkill"}}') == 1
    assert prom.value(f'changes(nika_ready{{job="{JOB}"}}[5m])') == 3
    assert prom.value(f'max_over_time(nika_phase{{job="{JOB}",nika_phase="loading"}}[5m])') == 1
    assert prom.value(f'nika_load_duration_seconds_count{{job="{JOB}"}}') == 2
    p = props(ns, "MainPID", "NRestarts", "ActiveState")
    assert p == {"MainPID": main, "NRestarts": "0", "ActiveState": "active"}, p
    ups = [t for t, v in points if v == 1]
    gap = max((b - a for a, b in itertools.pairwise(ups)), default=0.0)
    MEASUREMENTS["prometheus: nika_ready 0 -> 1 -> 0 -> 1 over (s)"] = round(end - start, 1)
    MEASUREMENTS["prometheus: not ready after the SIGKILL, as stored (s, 0.5 s steps)"] = gap
