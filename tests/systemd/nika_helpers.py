"""nika-supervisor inside the namespace: install it with scripts/install.sh, point
/etc/nika/nika-vllm.yaml at the stand-in server, and read the unit's state.

The unit under test is the shipped systemd/nika-vllm.service exactly as install.sh installs
it (the default prefix /opt/nika-supervisor needs no path substitution at all). The stand-in
runs as user nika under the unit's hardening: its code is read from the repository (read-only
under ProtectSystem=strict) and it writes its state files under the unit's StateDirectory.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml
from helpers import deep_merge, free_port, poll_for
from systemd_harness import REPO, Namespace

T = TypeVar("T")

UNIT = "nika-vllm.service"
CONFIG = "/etc/nika/nika-vllm.yaml"
PREFIX = "/opt/nika-supervisor"
STANDIN_DIR = "/var/lib/nika-vllm/standin"  # under StateDirectory=: writable by the unit
# The stand-in's code, copied into the namespace's /opt overlay: the sandboxed unit cannot see
# a checkout under /tmp (PrivateTmp=) or /root (ProtectHome=), where CI may clone it.
STANDIN_CODE = "/opt/nika-test/standin"
SHIPPED_UNIT = REPO / "systemd" / UNIT

# Timings the tests rely on, read from the shipped unit (so a change there updates the tests).
_UNIT_TEXT = SHIPPED_UNIT.read_text()


def unit_seconds(key: str) -> float:
    m = re.search(rf"^{key}=(\d+)(s|min)?$", _UNIT_TEXT, re.M)
    assert m, f"{key}= not found in {SHIPPED_UNIT}"
    return float(m.group(1)) * (60 if m.group(2) == "min" else 1)


WATCHDOG_S = unit_seconds("WatchdogSec")
RESTART_S = unit_seconds("RestartSec")
TIMEOUT_STOP_S = unit_seconds("TimeoutStopSec")
START_LIMIT_BURST = int(unit_seconds("StartLimitBurst"))


def copy_standin(ns: Namespace) -> None:
    """Put the stand-in server where the unit's sandbox can read it (STANDIN_CODE)."""
    ns.run(["mkdir", "-p", os.path.dirname(STANDIN_CODE)])
    ns.run(["cp", "-r", str(REPO / "tests" / "standin"), STANDIN_CODE])
    ns.run(["chmod", "-R", "a+rX", os.path.dirname(STANDIN_CODE)])


def install(ns: Namespace, log: Path, *args: str) -> str:
    """Run scripts/install.sh inside the namespace; its output goes to `log` and is returned."""
    res = ns.run(["bash", str(REPO / "scripts" / "install.sh"), *args], check=False,
                 timeout=600, env={"PIP_NO_CACHE_DIR": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    text = f"$ install.sh {' '.join(args)}\nexit {res.returncode}\n{res.stdout}\n{res.stderr}\n"
    with log.open("a") as f:
        f.write(text)
    assert res.returncode == 0, text
    return res.stdout + res.stderr


def standin_config(port: int | None = None, **overrides: Any) -> dict[str, Any]:
    """A complete config for the stand-in, with fast timings (merged with overrides)."""
    base: dict[str, Any] = {
        "vllm": {
            # no `python`: the supervisor's own interpreter (the installed venv) runs it
            "entrypoint": "api_server",
            "model": "standin-model",
            "served_model_name": ["nika"],
            "host": "127.0.0.1",
            "port": port or free_port(),
            "env": {"PYTHONPATH": STANDIN_CODE,
                    "STANDIN_STATE_DIR": STANDIN_DIR,
                    "STANDIN_MAX_LIFETIME_S": "900"},
        },
        "health": {"interval": "500ms", "timeout": "2s", "failure_threshold": 3,
                   "startup_timeout": "60s"},
        "restart": {"backoff_initial": "1s", "backoff_max": "2s", "max_restarts": 3,
                    "window": "5m", "stop_timeout": "5s"},
        "gpu": {"nvml": "off"},
        "supervisor": {"log_format": "auto", "log_level": "info"},
    }
    return deep_merge(base, overrides)


def write_config(ns: Namespace, cfg: dict[str, Any] | str) -> None:
    text = cfg if isinstance(cfg, str) else yaml.safe_dump(cfg, sort_keys=False)
    ns.write(CONFIG, text, mode=0o644)


def read_config(ns: Namespace) -> dict[str, Any]:
    data = yaml.safe_load(ns.path(CONFIG).read_text())
    assert isinstance(data, dict)
    return data


def reset(ns: Namespace) -> None:
    """Stop the unit, forget its failures and restart counter, drop the stand-in's state."""
    ns.systemctl("stop", UNIT, check=False)
    ns.systemctl("reset-failed", UNIT, check=False)
    ns.run(["rm", "-rf", STANDIN_DIR])
    poll_for(lambda: not ns.unit_pids(UNIT), TIMEOUT_STOP_S, "the unit's cgroup to be empty")


def poll(predicate: Callable[[], T | None], timeout: float, what: str) -> T:
    """poll_for at a pace suited to asking systemctl/journalctl (each call is a process)."""
    return poll_for(predicate, timeout, what, interval=0.2)


def props(ns: Namespace, *names: str) -> dict[str, str]:
    return ns.show(UNIT, *names)


def status_line(ns: Namespace) -> str:
    """The STATUS= text as `systemctl show` reports it (StatusText=)."""
    return props(ns, "StatusText")["StatusText"]


@dataclass(frozen=True)
class Mark:
    """A point in time on both clocks: journal entries after it are what a test caused."""

    mono: float
    wall: float


def mark() -> Mark:
    return Mark(time.monotonic(), time.time())


def unit_entries(ns: Namespace, after: Mark | None = None, *args: str) -> list[dict[str, Any]]:
    """The unit's journal entries (JSON) logged after `after`.

    Not `--after-cursor`: with a match such as -u, systemd 252's journalctl skips the first
    matching entry after the cursor when the cursor's own entry does not match (the
    "Starting nika-vllm.service" line went missing that way). --since narrows the read by
    wall clock; the exact cut uses __MONOTONIC_TIMESTAMP, the same CLOCK_MONOTONIC as ours
    (the namespace shares the host's kernel and boot)."""
    since = ["--since", f"@{int(after.wall) - 2}"] if after else []
    entries = ns.journal_json("-u", UNIT, *since, *args)
    if after is None:
        return entries
    cut = int(after.mono * 1_000_000)
    return [e for e in entries if int(e["__MONOTONIC_TIMESTAMP"]) > cut]


def message(entry: dict[str, Any]) -> str:
    m = entry.get("MESSAGE", "")
    if isinstance(m, list):  # journald's JSON gives non-UTF-8 messages as byte arrays
        return bytes(m).decode("utf-8", "replace")
    return str(m)


def unit_journal(ns: Namespace, after: Mark | None = None, *args: str) -> str:
    """The unit's messages after `after`, one per line (args: e.g. "-p", "warning")."""
    return "\n".join(message(e) for e in unit_entries(ns, after, *args))


def standin_file(ns: Namespace, name: str) -> str | None:
    try:
        return ns.path(f"{STANDIN_DIR}/{name}").read_text()
    except OSError:
        return None


def standin_pids(ns: Namespace) -> list[int]:
    """Namespace PIDs of every stand-in process ever started (starts.log)."""
    text = standin_file(ns, "starts.log") or ""
    return [int(p) for _, _, p in (line.partition(" ") for line in text.splitlines())
            if p.strip().isdigit()]


def standin_info(ns: Namespace) -> dict[str, Any] | None:
    import json

    text = standin_file(ns, "api.json")
    if not text:
        return None
    try:
        data = json.loads(text)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def alive_in_ns(ns: Namespace, ns_pids: list[int]) -> list[int]:
    """Which of these namespace PIDs are still alive (zombies count as gone)."""
    out = []
    for pid in ns_pids:
        try:
            stat = ns.path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        if stat[stat.rfind(")") + 2:].split()[0] != "Z":
            out.append(pid)
    return out


def wait_active(ns: Namespace, timeout: float, what: str = "the unit to be active") -> str:
    """Wait for ActiveState=active; returns MainPID (a namespace PID)."""
    def check() -> str | None:
        p = props(ns, "ActiveState", "MainPID", "Result")
        if p["ActiveState"] == "failed":
            raise AssertionError(f"the unit failed: {p}\n{unit_journal(ns)[-3000:]}")
        return p["MainPID"] if p["ActiveState"] == "active" else None
    return poll_for(check, timeout, what, interval=0.1)


