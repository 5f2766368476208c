"""`nika-supervisor report` on a scripted 50-hour history with four known outages: the numbers,
the JSON document, the SVG and the PNG (its pixel size), and the CLI's exit codes."""

from __future__ import annotations

import json
import struct
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from nika_supervisor import cli, plot, report
from nika_supervisor.history import History

H, M = 3600.0, 60.0
GIB = 1024**3


def scripted(now: float) -> list[dict[str, Any]]:
    """50 hours: a daemon loads and serves; Xid 13 at -40h (541 s down); the daemon is
    SIGKILLed at -30h (621 s down, no exit record); a failing stretch at -20h that gives up
    and is restarted by systemd (678 s down); stopped on request an hour ago (ongoing)."""
    recs: list[dict[str, Any]] = []

    def at(dt: float, kind: str, **f: Any) -> None:
        recs.append({"t": now + dt, "kind": kind, **f})

    def phase(dt: float, a: str, b: str, reason: str = "") -> None:
        at(dt, "phase", **{"from": a, "to": b, "reason": reason})

    def serve(start: float, end: float) -> None:
        t = start + 300
        while t < end:
            at(t, "heartbeat", phase="ready")
            t += 300

    at(-50 * H, "daemon.start", pid=1)
    phase(-50 * H + 1, "starting", "loading", "spawned")
    at(-50 * H + 540, "load", load_s=540.0)
    phase(-50 * H + 540, "loading", "ready", "model listed")
    serve(-50 * H + 540, -40 * H)
    at(-40 * H, "gpu.finding", code="xid.13", cls="restart", detail="Xid 13 on GPU 0")
    at(-40 * H, "restart", code="xid.13", cause="GPU fault: Xid 13", delay_s=5.0, attempt=1)
    phase(-40 * H, "ready", "stopping", "GPU fault: Xid 13")
    phase(-40 * H + 5, "stopping", "backoff", "group gone")
    phase(-40 * H + 10, "backoff", "starting", "backoff elapsed")
    phase(-40 * H + 11, "starting", "loading", "spawned")
    at(-40 * H + 541, "load", load_s=530.0)
    phase(-40 * H + 541, "loading", "ready", "model listed")
    serve(-40 * H + 541, -30 * H)
    at(-30 * H, "heartbeat", phase="ready")  # then SIGKILL: nothing more from this daemon
    at(-30 * H + 60, "daemon.start", pid=2)
    phase(-30 * H + 61, "starting", "loading", "spawned")
    at(-30 * H + 621, "load", load_s=560.0)
    phase(-30 * H + 621, "loading", "ready", "model listed")
    serve(-30 * H + 621, -20 * H)
    at(-20 * H, "restart", code="health", cause="3 probes failed", delay_s=5.0, attempt=1)
    phase(-20 * H, "ready", "stopping", "3 probes failed")
    phase(-20 * H + 3, "stopping", "backoff", "group gone")
    phase(-20 * H + 8, "backoff", "starting", "backoff elapsed")
    phase(-20 * H + 9, "starting", "loading", "spawned")
    at(-20 * H + 30, "restart", code="exit", cause="vLLM exited with status 1", attempt=2)
    phase(-20 * H + 30, "loading", "stopping", "exit 1")
    phase(-20 * H + 31, "stopping", "backoff", "group gone")
    phase(-20 * H + 40, "backoff", "starting", "backoff elapsed")
    phase(-20 * H + 41, "starting", "loading", "spawned")
    at(-20 * H + 60, "give_up", code=69, cause_code="exit", reason="3 failures within 30m")
    phase(-20 * H + 60, "loading", "stopping", "exit 1")
    phase(-20 * H + 61, "stopping", "failed", "gave up")
    at(-20 * H + 62, "daemon.exit", code=69, reason="gave up")
    at(-20 * H + 77, "daemon.start", pid=3)
    phase(-20 * H + 78, "starting", "loading", "spawned")
    at(-20 * H + 678, "load", load_s=600.0)
    phase(-20 * H + 678, "loading", "ready", "model listed")
    serve(-20 * H + 678, -1 * H)
    phase(-1 * H, "ready", "stopping", "stop requested")
    phase(-1 * H + 5, "stopping", "stopped", "group gone")
    at(-1 * H + 6, "daemon.exit", code=0, reason="stopped on request")
    for i in range(int(47 * H / M)):
        at(-48 * H + i * M, "gpu.sample", temp_c=40 + i % 30, mem_used_bytes=(70 + i % 3) * GIB)
    recs.sort(key=lambda r: r["t"])
    return recs


NOW = 1_800_000_000.0
DOWN_S = 541 + 621 + 678 + 3600


def test_numbers_of_a_scripted_history() -> None:
    """Availability, every outage with start, length and cause, restarts by cause, loads,
    give-ups, findings and the GPU figures: all as scripted."""
    r = report.build(scripted(NOW), NOW, 48 * H)
    assert r.covered_s == 48 * H
    assert r.ready_s == pytest.approx(48 * H - DOWN_S)
    assert r.availability == pytest.approx((48 * H - DOWN_S) / (48 * H))
    got = [(o.start - NOW, o.seconds, o.cause, o.code, o.ongoing) for o in r.outages]
    assert got == [
        (-40 * H, 541.0, "GPU fault: Xid 13", "xid.13", False),
        (-30 * H, 621.0, "the daemon died without a record (SIGKILL, watchdog, power loss?)",
         "", False),
        (-20 * H, 678.0, "3 probes failed", "health", False),
        (-1 * H, 3600.0, "stop requested", "", True),
    ]
    doc = report.as_json(r)
    assert doc["restarts"] == {"total": 3, "by_cause": {"xid.13": 1, "health": 1, "exit": 1}}
    assert doc["loads"] == {"count": 3, "median_s": 560.0, "max_s": 600.0}
    assert [(g["code"], g["reason"]) for g in doc["give_ups"]] == [
        (69, "3 failures within 30m")]
    assert doc["gpu"]["findings"] == {"xid.13": 1}
    assert doc["gpu"]["temperature_c"] == {"min": 40.0, "median": 54.5, "max": 69.0}
    assert doc["gpu"]["memory_used_bytes"] == {"min": 70.0 * GIB, "median": 71.0 * GIB,
                                               "max": 72.0 * GIB}
    states = [s["state"] for s in doc["timeline"]]
    assert states[0] == "ready" and states[-1] == "down" and "failed" in states


def test_json_schema() -> None:
    """The --json document's keys and types (schema nika-report/1, documented in README)."""
    doc = report.as_json(report.build(scripted(NOW), NOW, 48 * H))
    assert doc["schema"] == "nika-report/1"
    spec: dict[str, Any] = {
        "window": dict, "records": int, "covered_s": float, "ready_s": float,
        "availability": float, "outages": list, "restarts": dict, "loads": dict,
        "give_ups": list, "gpu": dict, "timeline": list, "schema": str}
    assert set(doc) == set(spec)
    for key, typ in spec.items():
        assert isinstance(doc[key], typ), key
    assert set(doc["window"]) == {"since", "until", "seconds"}
    assert doc["window"]["since"].endswith("Z")
    for o in doc["outages"]:
        assert set(o) == {"start", "end", "seconds", "cause", "code", "ongoing"}
    for s in doc["timeline"]:
        assert set(s) == {"start", "end", "state"}
    assert set(doc["gpu"]) == {"findings", "temperature_c", "memory_used_bytes"}
    json.dumps(doc)  # serialisable as is


def test_unknown_time_is_left_out_of_availability() -> None:
    """With heartbeats in the history, a daemon silent for longer than the grace is unknown,
    not up; availability is over the time the history covers."""
    recs = [{"t": NOW - 10 * H, "kind": "daemon.start"},
            {"t": NOW - 10 * H, "kind": "phase", "to": "ready"},
            {"t": NOW - 10 * H + 300, "kind": "heartbeat"}]
    r = report.build(recs, NOW, 10 * H)
    assert r.ready_s == pytest.approx(300 + report.HEARTBEAT_GRACE_S)
    assert r.covered_s == pytest.approx(r.ready_s)
    assert r.availability == 1.0 and [o.cause for o in r.outages] == []
    assert report.build([], NOW, H).availability is None


def test_text_answers_the_checklist() -> None:
    out = report.text(report.build(scripted(NOW), NOW, 48 * H))
    assert "availability: 96.85 % ready (46h29m of 48h00m)" in out
    assert "outages: 4" in out and "GPU fault: Xid 13" in out and "(ongoing)" in out
    assert "restarts: xid.13 1, health 1, exit 1" in out
    assert "load times: 3 loads, median 9m20s, max 10m00s" in out
    assert "exit 69: 3 failures within 30m" in out
    assert "GPU temperature: min 40 C, median 54 C, max 69 C" in out  # 54.5 rounds to even
    assert "GPU memory used: min 70.0 GiB, median 71.0 GiB, max 72.0 GiB" in out


def test_svg_picture() -> None:
    """Well-formed SVG: one band per timeline segment, a mark and a label per restart, both
    GPU series drawn."""
    r = report.build(scripted(NOW), NOW, 48 * H)
    root = ET.fromstring(plot.svg(r))
    ns = "{http://www.w3.org/2000/svg}"
    assert (root.get("width"), root.get("height")) == (str(plot.WIDTH), str(plot.HEIGHT))
    bands = [e for e in root.iter(ns + "rect") if e.get("class") == "phase"]
    assert [b.get("data-state") for b in bands] == [s.state for s in r.timeline]
    marks = [e for e in root.iter(ns + "line") if e.get("class") == "restart"]
    assert len(marks) == 3
    labels = "".join(e.text or "" for e in root.iter(ns + "text"))
    assert all(code in labels for code in ("xid.13", "health", "exit"))
    assert len([e for e in root.iter(ns + "polyline")]) == 2


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    w, h = struct.unpack(">II", data[16:24])
    return int(w), int(h)


def write_history(tmp: Path) -> Path:
    """The scripted history, ending now, written by the real History writer."""
    now = time.time()
    recs = scripted(now)
    clock = {"t": 0.0}
    h = History(str(tmp), wall=lambda: clock["t"], throttle={})
    for rec in recs:
        clock["t"] = rec["t"]
        fields = {k: v for k, v in rec.items() if k not in ("t", "kind")}
        assert h.record(rec["kind"], **fields)
    return tmp


def test_cli_report_json_svg_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`report --json --plot` on a history dir: exit 0, the JSON on stdout, the SVG and a PNG
    of exactly 1200x620 pixels."""
    d = write_history(tmp_path / "state")
    svg, png = tmp_path / "r.svg", tmp_path / "r.png"
    assert cli.main(["report", "--state-dir", str(d), "--json", "--plot", str(svg)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert len(doc["outages"]) == 4 and doc["restarts"]["total"] == 3
    ET.parse(svg)
    assert cli.main(["report", "--state-dir", str(d), "--since", "6h", "--plot", str(png)]) == 0
    assert "plot: " in capsys.readouterr().out
    assert png_size(png) == (plot.WIDTH, plot.HEIGHT)


def test_cli_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                        monkeypatch: pytest.MonkeyPatch) -> None:
    """No history: 4 (as `status` without a state file). A PNG without matplotlib: 2, with
    the install hint. A bad --since: argparse's 2. A bad config: 78."""
    assert cli.main(["report", "--state-dir", str(tmp_path / "none")]) == 4
    assert "no history" in capsys.readouterr().err
    d = write_history(tmp_path / "state")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert cli.main(["report", "--state-dir", str(d), "--plot", str(tmp_path / "x.png")]) == 2
    assert "pip install 'nika-supervisor[report]'" in capsys.readouterr().err
    assert cli.main(["report", "--state-dir", str(d), "--plot", str(tmp_path / "x.gif")]) == 2
    with pytest.raises(SystemExit) as e:
        cli.main(["report", "--since", "soon"])
    assert e.value.code == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("vllm: {port: 1}\n")
    assert cli.main(["report", "--config", str(bad)]) == 78
