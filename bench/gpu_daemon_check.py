"""The whole daemon against real NVML on a lent GPU machine (issue 5's integration check).

The stand-in vLLM server's EngineCore holds real CUDA memory (STANDIN_GPU_GIB), so the
daemon's GPU path runs for real end to end:
1. a foreign torch process holds GPU memory -> the start is refused, naming it (stale_holders:
   refuse), and retried with backoff;
2. the foreign process ends -> vLLM starts, gets READY, the residency floor is derived from
   what its process group holds on the GPU (gpu.residency), gpu.sample carries real readings;
3. the engine frees its memory -> gpu.not_resident -> restart -> READY again;
4. the daemon itself is SIGKILLed -> its engine lives on holding GPU memory (a marked orphan);
   a new daemon kills it in preflight (vllm.orphans_killed) and serves again;
5. SIGTERM -> exit 0, nothing of ours left, NVML lists no compute process of ours.

Run on the device: python3 bench/gpu_daemon_check.py --out $OUT (needs torch with CUDA,
nvidia-ml-py, and the supervisor's deps on PYTHONPATH). Prints a JSON summary; exit 0 only if
every check passed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Daemon:
    def __init__(self, config: Path, log: Path) -> None:
        self.events: list[tuple[float, dict[str, Any]]] = []
        self.log = log.open("a")
        self.proc = subprocess.Popen([sys.executable, "-m", "nika_supervisor", "run",
                                      "--config", str(config)], stdout=subprocess.PIPE,
                                     start_new_session=True)
        self.lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.log.write(raw.decode(errors="replace"))
            self.log.flush()
            try:
                ev = json.loads(raw)
            except ValueError:
                continue
            with self.lock:
                self.events.append((time.monotonic(), ev))

    def wait(self, name: str, since: float = 0.0, timeout: float = 60.0,
             **match: Any) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                for t, ev in self.events:
                    if t >= since and ev.get("event") == name and all(
                            ev.get(k) == v for k, v in match.items()):
                        return ev
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise TimeoutError(f"no {name} {match} (daemon rc={self.proc.poll()})")


def nvml_pids() -> dict[int, int]:
    import pynvml

    pynvml.nvmlInit()
    try:
        h = pynvml.nvmlDeviceGetHandleByIndex(0)
        return {p.pid: int(p.usedGpuMemory or 0)
                for p in pynvml.nvmlDeviceGetComputeRunningProcesses(h)}
    finally:
        pynvml.nvmlShutdown()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path(tempfile.mkdtemp()))
    args = ap.parse_args()
    out: Path = args.out
    work = Path(tempfile.mkdtemp(prefix="nika-gpu-"))
    state_dir = work / "standin"
    state_dir.mkdir()
    port = free_port()
    config = work / "nika.yaml"
    config.write_text(json.dumps({  # JSON is YAML
        "vllm": {"python": sys.executable, "entrypoint": "api_server", "model": "standin",
                 "served_model_name": ["nika"], "port": port,
                 "env": {"PYTHONPATH": str(REPO / "tests" / "standin"),
                         "STANDIN_STATE_DIR": str(state_dir), "STANDIN_GPU_GIB": "4",
                         "STANDIN_BIND_DELAY_S": "1"}},
        "health": {"interval": "1s", "timeout": "3s", "failure_threshold": 3,
                   "startup_timeout": "120s", "stall_after": 0, "canary_interval": 0},
        "restart": {"backoff_initial": "1s", "backoff_max": "2s", "max_restarts": 20,
                    "window": "10m", "stop_timeout": "10s"},
        "gpu": {"nvml": "required", "stale_holders": "refuse", "sample_interval": "2s"},
        "supervisor": {"log_format": "json", "runtime_dir": str(work / "run"),
                       "state_dir": str(work / "state")},
    }))
    checks: dict[str, Any] = {}
    log = out / "daemon-events.jsonl"
    foreign = subprocess.Popen([sys.executable, "-c",
                                "import torch,time;x=torch.empty(2<<30,dtype=torch.uint8,"
                                "device='cuda');torch.cuda.synchronize();print('held',flush=True);"
                                "time.sleep(600)"], stdout=subprocess.PIPE)
    assert foreign.stdout is not None
    foreign.stdout.readline()
    daemons: list[Daemon] = []
    try:
        d = Daemon(config, log)
        daemons.append(d)
        started = d.wait("gpu.started")
        checks["nvml_up"] = started.get("state") == "up"
        blocked = d.wait("vllm.start_blocked", timeout=60)
        checks["foreign_holder_refused"] = f"pid {foreign.pid}" in blocked.get("reason", "")
        checks["refuse_reason"] = blocked.get("reason")
        foreign.terminate()
        foreign.wait(30)
        t = time.monotonic()
        ready = d.wait("vllm.ready", since=t, timeout=120)
        res = d.wait("gpu.residency", since=t, timeout=30)
        checks["residency_at_ready"] = res
        checks["residency_floor_derived"] = (res.get("min_resident") or 0) > 2 << 30
        deadline = time.monotonic() + 30
        sample: dict[str, Any] = {}
        while time.monotonic() < deadline:  # a gpu.sample taken while the model is resident
            sample = d.wait("gpu.sample", since=t, timeout=30)
            if (sample.get("vllm_resident_gib") or 0) > 3.5:
                break
            t = time.monotonic()
        checks["gpu_sample"] = sample
        checks["sample_has_real_readings"] = sample.get("gpu0_temp_c") is not None and (
            sample.get("vllm_resident_gib") or 0) > 3.5
        status = json.loads((work / "run" / "state.json").read_text())["status"]
        checks["status_text"] = status
        # 3. the model stops being resident
        t = time.monotonic()
        (state_dir / "gpu_release").write_text("now")
        finding = d.wait("gpu.finding", since=t, timeout=30, code="gpu.not_resident")
        checks["not_resident_finding"] = finding
        sched = d.wait("restart.scheduled", since=t, timeout=10)
        (state_dir / "gpu_release").unlink()
        t2 = time.monotonic()
        again = d.wait("vllm.ready", since=t2, timeout=120)
        checks["restarted_after_not_resident"] = (
            again.get("pid") != ready.get("pid") and "resident" in sched.get("reason", ""))
        # 4. the daemon itself dies; its engine keeps the GPU memory
        engine = int((state_dir / "engine.pid").read_text())
        os.kill(d.proc.pid, signal.SIGKILL)
        d.proc.wait(10)
        time.sleep(1)
        checks["orphan_holds_gpu_after_daemon_kill"] = engine in nvml_pids()
        d2 = Daemon(config, log)
        daemons.append(d2)
        killed = d2.wait("vllm.orphans_killed", timeout=60)
        checks["orphans_killed"] = engine in killed.get("pids", [])
        d2.wait("vllm.ready", timeout=120)
        # 5. clean stop
        group = int((state_dir / "api.pid").read_text())
        d2.proc.send_signal(signal.SIGTERM)
        rc = d2.proc.wait(60)
        checks["sigterm_exit_code"] = rc
        time.sleep(1)
        left = [p for p in nvml_pids() if p in (engine, group)]
        checks["nothing_left_on_gpu"] = not left
        checks["nvml_compute_pids_after"] = list(nvml_pids())
    except Exception as e:  # report what was reached
        checks["error"] = repr(e)
    finally:
        if foreign.poll() is None:
            foreign.kill()
        for dd in daemons:
            if dd.proc.poll() is None:
                os.killpg(dd.proc.pid, signal.SIGKILL)
        for name in ("api.pid", "engine.pid"):
            with contextlib.suppress(OSError, ValueError):
                os.killpg(int((state_dir / name).read_text()), signal.SIGKILL)
    # doctor's GPU checks on the real device (its vLLM checks fail here: no vLLM installed)
    doc = subprocess.run([sys.executable, "-m", "nika_supervisor", "doctor", "--config",
                          str(config), "--json"], capture_output=True, text=True, timeout=120)
    (out / "doctor.json").write_text(doc.stdout + doc.stderr)
    with contextlib.suppress(ValueError):
        checks["doctor_gpu"] = [c for c in json.loads(doc.stdout)["checks"]
                                if c["name"] in ("nvml", "gpu_holders", "memory")]
    keys = ["nvml_up", "foreign_holder_refused", "residency_floor_derived",
            "sample_has_real_readings", "restarted_after_not_resident",
            "orphan_holds_gpu_after_daemon_kill", "orphans_killed", "nothing_left_on_gpu"]
    ok = all(checks.get(k) is True for k in keys) and checks.get("sigterm_exit_code") == 0
    checks["ok"] = ok
    text = json.dumps(checks, indent=2, default=str)
    (out / "gpu_daemon_check.json").write_text(text)
    print(text)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
