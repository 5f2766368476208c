"""bench/soak.py in its quick mode (issue 11 part 4): the daemon on the stand-in for 2 minutes
with 3 faults. The soak's own checks must pass (every fault detected with its cause code
within its bound, no false restart, /metrics consistent with the phase), and the history the
daemon wrote must tell the same story when read here, independently of the soak's code.
The second test feeds the soak's checker a history with an unmatched restart and a missed
fault, so the checker is shown to fail when it should."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import Standin

pytestmark = pytest.mark.process

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

import soak  # noqa: E402 - bench/ is not a package

KINDS = ["sigkill", "hang", "frozen"]


def test_quick_soak_detects_every_fault_and_restarts_for_nothing_else(tmp_path: Path) -> None:
    work, out = tmp_path / "soak", tmp_path / "soak.json"
    p = subprocess.run(
        [sys.executable, str(REPO / "bench" / "soak.py"), "--minutes", "2", "--faults", "3",
         "--kinds", ",".join(KINDS), "--seed", "3", "--work", str(work), "--json", str(out)],
        capture_output=True, text=True, timeout=300)
    assert out.exists(), p.stdout[-3000:] + p.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["problems"] == [], r["problems"]
    assert p.returncode == 0 and r["ok"] is True
    faults = r["fault_list"]
    assert sorted(f["kind"] for f in faults) == sorted(KINDS)
    for f in faults:
        assert f["detected"], f
        assert f["matched"] == soak.FAULTS[f["kind"]][0], f
        assert 0 <= f["detect_s"] <= f["bound_s"], f
    assert r["restarts"] == 3 and r["false_restarts"] == 0
    assert r["scrapes"] >= 6 and r["scrapes_bad"] == 0
    # the daemon's own history, read here: one restart per fault, in order, each after it
    hist = [json.loads(line) for line in (work / "state" / "history.jsonl").read_text()
            .splitlines()]
    restarts = [h for h in hist if h["kind"] == "restart"]
    assert [h["code"] for h in restarts] == [soak.FAULTS[f["kind"]][0] for f in faults]
    for h, f in zip(restarts, faults, strict=True):
        assert f["t"] <= h["t"] <= f["t"] + f["bound_s"]
    loads = [h for h in hist if h["kind"] == "load"]
    assert len(loads) == 4  # the first start and one per fault
    assert all(4.5 <= h["load_s"] <= 15 for h in loads), loads  # STANDIN_BIND_DELAY_S 5
    assert r["report_availability"] is not None and 0.5 < r["report_availability"] < 1
    assert r["report_text"].startswith("nika-vllm, last 1h00m")
    assert "restarts: " in r["report_text"]
    assert Standin(work / "standin").alive() == []


def test_the_checker_fails_on_a_false_restart_and_a_missed_fault(tmp_path: Path) -> None:
    s = soak.Soak(tmp_path, 1.0, 1, None, ["sigkill"], (1.0, 2.0))
    t0 = time.time() - 60
    s.t_start, s.t_end = t0, t0 + 60
    s.faults = [soak.Fault("sigkill", t0 + 10, 1, "killed_sigkill", 2.0),
                soak.Fault("hang", t0 + 30, 2, "health", soak.HANG_BOUND)]
    records = [
        {"t": t0, "kind": "daemon.start"},
        {"t": t0 + 10.01, "kind": "restart", "code": "killed_sigkill"},  # the sigkill: found
        {"t": t0 + 20, "kind": "restart", "code": "health"},  # before the hang: false
        # the hang's restart, but past its bound: matched, not detected
        {"t": t0 + 30 + soak.HANG_BOUND + 1, "kind": "restart", "code": "health"},
    ]
    s.state_dir.mkdir(parents=True)
    (s.state_dir / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    r = s.check()
    assert r["ok"] is False
    assert [f["detected"] for f in r["fault_list"]] == [True, False]
    assert r["false_restarts"] == 1
    assert sum("false restart" in p for p in r["problems"]) == 1
    assert any(p.startswith("fault hang") and "not detected" in p for p in r["problems"])
