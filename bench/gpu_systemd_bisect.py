"""Find which hardening lines of the shipped unit break the GPU workload, by bisection.

Each hardening directive has a relaxed form (a drop-in line that undoes it, nothing else).
A trial writes a drop-in relaxing a subset, starts the unit and asks: does it become active
with every engine step ok? First all of them are relaxed (if that still fails, hardening is
not the cause); then ddmin-style halving (Zeller's delta debugging) drops every relaxation
that is not needed, leaving the smallest set that makes the workload run: the culprits.
"""

from __future__ import annotations

import time
from typing import Any

UNIT = "nika-vllm.service"
DROPIN_DIR = f"/etc/systemd/system/{UNIT}.d"


def relaxations() -> dict[str, str]:
    """directive -> the drop-in lines that undo it (systemd.exec(5), systemd.resource-control(5):
    an empty assignment resets a list setting)."""
    return {
        "NoNewPrivileges": "NoNewPrivileges=no",
        "ProtectSystem": "ProtectSystem=no",
        "ProtectHome": "ProtectHome=no",
        "PrivateTmp": "PrivateTmp=no",
        # closed policy, but every device allowed: independent of ProtectClock's char-rtc entry
        "DevicePolicy": "DeviceAllow=char-* rwm\nDeviceAllow=block-* rwm",
        "ProtectKernelTunables": "ProtectKernelTunables=no",
        "ProtectKernelModules": "ProtectKernelModules=no",
        "ProtectKernelLogs": "ProtectKernelLogs=no",
        "ProtectControlGroups": "ProtectControlGroups=no",
        "ProtectClock": "ProtectClock=no",
        "ProtectHostname": "ProtectHostname=no",
        "ProtectProc": "ProtectProc=default",
        "RestrictAddressFamilies": "RestrictAddressFamilies=",
        "RestrictNamespaces": "RestrictNamespaces=no",
        "RestrictRealtime": "RestrictRealtime=no",
        "LockPersonality": "LockPersonality=no",
        "RestrictSUIDSGID": "RestrictSUIDSGID=no",
        "RemoveIPC": "RemoveIPC=no",
        "SystemCallFilter": "SystemCallFilter=",
        "SystemCallArchitectures": "SystemCallArchitectures=",
        "KeyringMode": "KeyringMode=shared",
        "PrivateMounts": "PrivateMounts=no",
        "UMask": "UMask=0022",
        "CapabilityBoundingSet": "CapabilityBoundingSet=~",
    }


class Trial:
    """One start of the unit with a subset of the hardening relaxed."""

    def __init__(self, ns: Any, run: Any, deadline: float) -> None:
        self.ns, self.run, self.deadline = ns, run, deadline
        self.log: list[dict[str, Any]] = []

    def write_dropin(self, names: list[str], file: str = "zz-bisect.conf") -> None:
        table = relaxations()
        body = "[Service]\n" + "".join(table[n] + "\n" for n in names)
        self.ns.write(f"{DROPIN_DIR}/{file}", body)
        self.ns.systemctl("daemon-reload")

    def __call__(self, names: list[str]) -> bool:
        if time.monotonic() > self.deadline - 90:
            raise TimeoutError("no time left for another trial")
        self.write_dropin(names)
        t0 = time.monotonic()
        res = self.run.start(f"trial{len(self.log)}", timeout=150)
        ok = bool(self.run.ok_start(res))
        eng = res.get("engine") or {}
        self.run.stop()
        self.log.append({"relaxed": names, "ok": ok, "s": round(time.monotonic() - t0, 1),
                         "failed_step": eng.get("failed"), "state": res.get("state"),
                         "error": (eng.get("steps", {}).get(eng.get("failed") or "", {})
                                   .get("error"))})
        self.run.r.pop(f"trial{len(self.log) - 1}", None)
        self.ns.run(["rm", "-f", f"{DROPIN_DIR}/zz-bisect.conf"])
        self.ns.systemctl("daemon-reload")
        return ok


def bisect(trial: Trial, table: dict[str, str]) -> dict[str, Any]:
    names = list(table)
    out: dict[str, Any] = {"trials": trial.log}
    try:
        if not trial(names):
            out["verdict"] = "still failing with every hardening line relaxed: not hardening"
            return out
        needed = names
        n = 2
        while len(needed) >= 2:
            size = -(-len(needed) // n)
            chunks = [needed[i:i + size] for i in range(0, len(needed), size)]
            for chunk in chunks:
                rest = [x for x in needed if x not in chunk]
                if trial(rest):
                    needed, n = rest, max(n - 1, 2)
                    break
            else:
                if n >= len(needed):
                    break
                n = min(len(needed), 2 * n)
        out["culprits"] = needed
    except TimeoutError as e:
        out["verdict"] = f"unfinished: {e}"
    return out
