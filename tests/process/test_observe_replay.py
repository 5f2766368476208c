"""The Observer against what the daemon really logs today: a daemon on the stand-in gets
ready, its API server is SIGKILLed, it restarts and is stopped; its JSON log (event names and
fields as the policy emits them, vLLM's output lines included) is replayed into an Observer.
The history it writes must tell that story, and `report` must find the crash and its cause.
This pins the event names and fields observe.py relies on to the running code."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from nika_supervisor import report
from nika_supervisor.config import parse_config
from nika_supervisor.history import read_history
from nika_supervisor.observe import Observer

pytestmark = pytest.mark.process

T0 = 1_800_000_000.0
NOT_FIELDS = ("event", "level", "timestamp")


def test_a_real_daemon_log_replayed_into_the_observer(ready_daemon, tmp_path: Path) -> None:
    d = ready_daemon()
    info = d.standin.info()
    assert info is not None
    t0 = d.events[-1].t
    os.kill(info["pid"], signal.SIGKILL)
    exited = d.wait_event("vllm.exited", since=t0, pid=info["pid"])
    d.wait_event("vllm.ready", since=t0, timeout=20)
    assert d.close() == []
    events = [e for e in d.events if e.name]
    assert events[-1].name == "supervisor.stopped"

    clock = {"t": T0}
    cfg = parse_config(json.dumps({"vllm": {"model": "/m", "env": {"HF_HUB_OFFLINE": "1"}},
                                   "supervisor": {"state_dir": str(tmp_path / "replay")}}),
                       "t.yaml", check_paths=False)
    obs = Observer(cfg, wall=lambda: clock["t"])
    base = events[0].t
    obs.start(0.0)
    for e in events:
        clock["t"] = T0 + (e.t - base)
        now = e.t - base
        fields = {k: v for k, v in e.fields.items() if k not in NOT_FIELDS}
        if e.name == "vllm.output":
            obs.on_output(str(fields.get("line", "")), now)
        else:
            assert e.name is not None
            obs.on_event(e.name, fields, now)
        obs.tick(now)

    # The daemon itself (its Observer is wired into the executor) wrote the same story.
    own = [r["kind"] for r in read_history(str(tmp_path / "state"))]
    assert own.count("vllm.start") == 2 and own.count("load") == 2
    assert own.count("restart") == 1 and own[-1] == "daemon.exit"

    recs = read_history(str(tmp_path / "replay"))
    kinds = [r["kind"] for r in recs]
    assert kinds.count("vllm.start") == 2 and kinds.count("load") == 2
    assert [r["to"] for r in recs if r["kind"] == "phase"].count("ready") == 2
    restart = next(r for r in recs if r["kind"] == "restart")
    assert exited["diagnosis"], "the exit was diagnosed"
    assert restart["code"] == exited["diagnosis"] and "SIGKILL" in restart["cause"]
    assert recs[-1]["kind"] == "daemon.exit" and recs[-1]["code"] == 0

    now = clock["t"]
    rep = report.build(recs, now, now - T0 + 1)
    causes = [o.cause for o in rep.outages]
    assert sum("SIGKILL" in c for c in causes) == 1, causes
    assert rep.availability is not None and 0 < rep.availability < 1
    doc = report.as_json(rep)
    assert doc["restarts"]["by_cause"] == {exited["diagnosis"]: 1}
    assert doc["loads"]["count"] == 2
