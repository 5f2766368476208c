"""The shipped unit with the gate on (issue 10), under a real systemd 252, the stand-in vLLM
behind it: the public port answers once the unit is active, never refuses a connect while
vLLM is SIGKILLed and restarted under the same daemon, a `systemctl reload` with a launch
change under a client loop fails no request, and `systemctl stop` closes the port and leaves
nothing running.

One test function: each phase needs the unit started, and a start is the slow part here.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from helpers import ConnectProbe, free_port
from nika_helpers import (
    UNIT,
    alive_in_ns,
    mark,
    poll,
    props,
    reset,
    standin_config,
    standin_file,
    standin_info,
    standin_pids,
    status_line,
    unit_journal,
    wait_active,
    write_config,
)
from systemd_harness import MEASUREMENTS, Namespace

pytestmark = pytest.mark.systemd


@pytest.fixture
def ns(nika_ns: Namespace) -> Iterator[Namespace]:
    reset(nika_ns)
    yield nika_ns
    reset(nika_ns)


def post(port: int, path: str, body: dict[str, Any], timeout: float = 60) -> dict[str, Any]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method="POST",
                                 data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        assert r.status == 200, r.status
        data = json.loads(r.read())
    assert isinstance(data, dict)
    return data


def completion(port: int, delay_s: float = 0.0) -> str:
    body: dict[str, Any] = {"model": "nika", "prompt": "hi", "max_tokens": 3}
    if delay_s:
        body["standin_delay_s"] = delay_s
    text = post(port, "/v1/completions", body)["choices"][0]["text"]
    assert text, "an empty completion"
    return str(text)


def refused(port: int) -> bool:
    s = socket.socket()
    s.settimeout(2)
    try:
        s.connect(("127.0.0.1", port))
        return False
    except OSError as e:
        return e.errno == errno.ECONNREFUSED
    finally:
        s.close()


def test_gate_unit_start_crash_reload_stop(ns: Namespace) -> None:
    gate_port = free_port()
    cfg = standin_config(
        gate={"listen": [f"127.0.0.1:{gate_port}"], "hold_timeout": "30s",
              "drain_timeout": "10s", "ollama": True},
        vllm={"env": {"STANDIN_BIND_DELAY_S": "1.5"}})  # a restart the probe can see
    vllm_port = cfg["vllm"]["port"]
    write_config(ns, cfg)

    # -- start: active means the model answers through the gate -----------------------------
    ns.systemctl("start", UNIT, timeout=120)
    main = wait_active(ns, 5)
    assert ns.systemctl("is-active", UNIT).stdout.strip() == "active"
    assert completion(gate_port)
    with urllib.request.urlopen(f"http://127.0.0.1:{gate_port}/api/tags", timeout=5) as r:
        assert [m["model"] for m in json.loads(r.read())["models"]] == ["nika:latest"]
    poll(lambda: "gate: " in status_line(ns), 10, "STATUS to show the gate")
    assert vllm_port != gate_port

    # -- SIGKILL of vLLM: the port never refuses, the unit stays active ----------------------
    api = int(standin_file(ns, "api.pid") or 0)
    assert api, "no stand-in api.pid"
    c = mark()
    held: dict[str, Any] = {}

    def ask() -> None:
        try:
            held["text"] = completion(gate_port)
        except (OSError, AssertionError) as e:
            held["error"] = f"{type(e).__name__}: {e}"
        held["t"] = time.monotonic()

    states: list[str] = []
    watching = threading.Event()

    def watch_state() -> None:  # systemd's view of the unit all along the restart
        while not watching.is_set():
            states.append(props(ns, "ActiveState")["ActiveState"])
            watching.wait(0.2)

    watcher = threading.Thread(target=watch_state, daemon=True)
    with ConnectProbe(gate_port) as probe:
        poll(lambda: probe.connects > 0, 5, "the probe's first connect")
        watcher.start()
        t0 = time.monotonic()
        os.kill(ns.host_pid(api), signal.SIGKILL)
        asker = threading.Thread(target=ask, daemon=True)
        asker.start()
        poll(lambda: unit_journal(ns, c).count("vllm.ready") >= 1 and
             standin_file(ns, "api.pid") not in (None, str(api)), 60,
             "vLLM restarted under the same daemon")
        asker.join(40)
        poll(lambda: props(ns, "ActiveState")["ActiveState"] == "active", 10, "active")
    watching.set()
    watcher.join(5)
    back = time.monotonic() - t0
    assert probe.refused == 0, f"{probe.refused} of {probe.connects} connects refused"
    assert probe.connects > 50 and not probe.other, (probe.connects, probe.other[:5])
    assert "error" not in held and held.get("text"), held
    assert set(states) <= {"active", "reloading"}, states  # never inactive, never failed
    p = props(ns, "MainPID", "NRestarts")
    assert p == {"MainPID": main, "NRestarts": "0"}, p
    assert "vllm.exited" in unit_journal(ns, c)
    MEASUREMENTS["gate: SIGKILL of vLLM to answering again (s)"] = round(back, 2)
    MEASUREMENTS["gate: connects during the restart, refused"] = (probe.connects,
                                                                  probe.refused)

    # -- reload with a launch change under a client loop: no error --------------------------
    old_api = standin_file(ns, "api.pid")
    errors: list[str] = []
    answered: list[float] = []
    done = threading.Event()

    def load() -> None:
        while not done.is_set():
            try:
                completion(gate_port, delay_s=0.1)
                answered.append(time.monotonic())
            except (OSError, AssertionError, ValueError) as e:
                errors.append(f"{type(e).__name__}: {e}")

    cfg["vllm"]["args"] = {"max-model-len": 4096}
    threads = [threading.Thread(target=load, daemon=True) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        poll(lambda: len(answered) >= 10, 20, "the client loop to run")
        write_config(ns, cfg)
        c = mark()
        ns.systemctl("reload", UNIT)
        poll(lambda: standin_file(ns, "api.pid") not in (None, old_api) and
             "vllm.ready" in unit_journal(ns, c), 60, "vLLM restarted with the new config")
        poll(lambda: props(ns, "ActiveState")["ActiveState"] == "active", 10, "active again")
        after = time.monotonic()
        poll(lambda: sum(1 for t in answered if t > after) >= 10, 20,
             "answers from the new vLLM")
    finally:
        done.set()
        for t in threads:
            t.join(40)
    assert errors == [], errors[:5]
    argv = (standin_info(ns) or {}).get("argv", [])
    assert "--max-model-len" in argv and "4096" in argv, argv
    journal = unit_journal(ns, c)
    assert "restart_vllm=true" in journal and "gate.drained" in journal, journal[-3000:]
    assert journal.index("gate.drained") < journal.index("vllm.signal"), journal[-3000:]
    p = props(ns, "MainPID", "NRestarts")
    assert p == {"MainPID": main, "NRestarts": "0"}, p
    MEASUREMENTS["gate: reload under 3-client load, requests answered / failed"] = (
        len(answered), len(errors))

    # -- stop: the port is closed and nothing is left ---------------------------------------
    spawned = standin_pids(ns)
    ns.systemctl("stop", UNIT, timeout=60)
    p = props(ns, "ActiveState", "Result")
    assert p == {"ActiveState": "inactive", "Result": "success"}, p
    assert refused(gate_port), "the gate port still accepts connections after stop"
    assert refused(vllm_port), "vLLM's port still accepts connections after stop"
    assert not ns.unit_pids(UNIT), ns.unit_pids(UNIT)
    assert not alive_in_ns(ns, spawned), alive_in_ns(ns, spawned)
