#!/usr/bin/env python3
"""Validate the GPU monitor against a real NVIDIA GPU (or, with --fake, the fake NVML).

What it does, in one run (results as JSON to OUT/gpu_validate.json and stdout):
1. times `import pynvml` and nvmlInit (first, and re-inits after nvmlShutdown);
2. starts a torch process holding --alloc-gib GiB, with this daemon's marker in its
   environment (a "vLLM" of an earlier instance), and a foreign torch process holding 1 GiB;
3. runs GpuMonitor(nvml=required) and checks it reports the marked pid with its memory;
4. checks whether Xid/ECC event registration is supported and times nvmlEventSetWait_v2(500);
5. times one sampling pass (median of --samples) and the CPU it costs;
6. runs preflight (stale vs foreign holders, refuse reason) and the /proc fd scan alone;
7. kills the marked holder and checks the residency rule turns into "model not resident".

Run on the device machine:  python3 bench/gpu_validate.py --out "$OUT"
Run here (no driver):       python3 bench/gpu_validate.py --fake --out /tmp
Exit status 0 when every check passed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
VENDOR = ROOT / ".cache" / "gpu-vendor"  # pynvml/yaml copied here when the host lacks them
if VENDOR.is_dir():
    sys.path.append(str(VENDOR))

GiB = 1024**3
KEY = "NIKA_SUPERVISOR_INSTANCE"

TORCH_HOLDER = """
import sys, torch
n = int(float(sys.argv[1]) * 2**30)
x = torch.empty(n, dtype=torch.uint8, device="cuda")
x.fill_(1)
torch.cuda.synchronize()
print("ready", torch.cuda.memory_allocated(), flush=True)
sys.stdin.read()
"""
PLAIN_HOLDER = """
import sys
print("ready 0", flush=True)
sys.stdin.read()
"""


class Child:
    """A holder process in its own session, ended by its recorded process group."""

    def __init__(self, code: str, gib: float, env: dict[str, str]) -> None:
        self.p = subprocess.Popen([sys.executable, "-c", code, str(gib)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                  env={**os.environ, **env}, start_new_session=True)
        self.pid = self.p.pid
        self.pgid = self.pid
        self.line: str | None = None
        self._ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.p.stdout is not None
        self.line = self.p.stdout.readline().strip()
        self._ready.set()

    def wait_ready(self, timeout: float) -> bool:
        return self._ready.wait(timeout) and bool(self.line and self.line.startswith("ready"))

    def kill(self) -> None:
        if self.p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pgid, signal.SIGKILL)
        self.p.wait(timeout=30)


def poll_for(pred: Any, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v or time.monotonic() > deadline:
            return v
        time.sleep(0.05)


def stats_us(xs: list[float]) -> dict[str, float]:
    xs = sorted(xs)
    return {"n": len(xs), "median_us": round(statistics.median(xs) * 1e6, 2),
            "p90_us": round(xs[int(len(xs) * 0.9)] * 1e6, 2), "max_us": round(xs[-1] * 1e6, 2),
            "min_us": round(xs[0] * 1e6, 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fake", action="store_true", help="use the fake NVML (no driver needed)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--alloc-gib", type=float, default=10.0)
    ap.add_argument("--samples", type=int, default=1000)
    args = ap.parse_args()

    res: dict[str, Any] = {"mode": "fake" if args.fake else "real",
                           "host": platform.node(), "python": sys.version.split()[0]}
    checks: dict[str, bool] = {}
    children: list[Child] = []
    t = time.perf_counter()
    import pynvml  # timed: the daemon pays this once
    res["import_pynvml_ms"] = round((time.perf_counter() - t) * 1000, 2)
    try:
        from importlib.metadata import version
        res["nvidia_ml_py"] = version("nvidia-ml-py")
    except Exception:
        res["nvidia_ml_py"] = getattr(pynvml, "__file__", "?")

    from nika_supervisor.config import GpuConfig
    from nika_supervisor.gpu import GpuMonitor, Nvml, check_residency, residency_threshold
    from nika_supervisor.gpu import nvml as n
    from nika_supervisor.gpu.holders import scan_device_fds

    fake = None
    if args.fake:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from helpers.fake_nvml import FakeDevice, FakePynvml  # the test double
        fake = FakePynvml([FakeDevice()])
        nv = Nvml(fake)
    else:
        nv = Nvml()
    marker = f"validate-{uuid.uuid4().hex[:12]}"
    try:
        # 1. nvmlInit timing
        t = time.perf_counter()
        nv.init()
        res["nvml_init_first_ms"] = round((time.perf_counter() - t) * 1000, 3)
        again = []
        for _ in range(5):
            nv.shutdown()
            t = time.perf_counter()
            nv.init()
            again.append(time.perf_counter() - t)
        res["nvml_reinit_median_ms"] = round(statistics.median(again) * 1000, 3)
        res["driver"] = nv.driver_version()
        count = nv.device_count()
        res["devices"] = [{"index": i, "name": nv.name(nv.handle(i)), "uuid": nv.uuid(nv.handle(i))}
                          for i in range(count)]
        h0 = nv.handle(0)
        try:
            res["device0_memory_info"] = dict(zip(("used", "total"), nv.memory(h0), strict=True))
        except n.NvmlError as e:
            res["device0_memory_info"] = str(e)
        nv.shutdown()

        # 2. holders: a marked "vLLM" and a foreign process
        code = PLAIN_HOLDER if args.fake else TORCH_HOLDER
        t = time.perf_counter()
        mine = Child(code, args.alloc_gib, {KEY: marker})
        other = Child(code, 1.0, {})
        children += [mine, other]
        checks["holders_started"] = mine.wait_ready(240) and other.wait_ready(240)
        res["holders"] = {"marked_pid": mine.pid, "marked_line": mine.line,
                          "foreign_pid": other.pid, "foreign_line": other.line,
                          "start_s": round(time.perf_counter() - t, 1)}
        smi = shutil.which("nvidia-smi")
        if smi and not args.fake:  # the driver's own view, to cross-check NVML's numbers
            q = subprocess.run([smi, "--query-compute-apps=pid,process_name,used_memory",
                                "--format=csv,noheader"], capture_output=True, text=True,
                               timeout=60)
            res["nvidia_smi_compute_apps"] = q.stdout.strip().splitlines()
        if fake is not None:  # what the driver would report: allocation plus CUDA context
            fake.devices[0].processes = [(mine.pid, int(args.alloc_gib * GiB) + 500 * 2**20),
                                         (other.pid, GiB + 500 * 2**20)]

        # 3. the monitor against the device
        found: list[Any] = []
        mon = GpuMonitor(GpuConfig(nvml="required"), {}, found.append, nvml=nv)
        t = time.perf_counter()
        finding = mon.start()
        res["monitor_start_ms"] = round((time.perf_counter() - t) * 1000, 3)
        res["monitor_start_finding"] = None if finding is None else finding.fields()
        checks["monitor_started"] = finding is None and str(mon.state) == "up"
        res["watched_devices"] = list(mon.devices)

        def seen() -> Any:
            s = mon.sample([mine.pid])
            return s if s.vllm_resident_bytes else None

        s = poll_for(seen, 15) or mon.sample([mine.pid])
        res["sample"] = {"status_text": s.status_text(), "fields": s.fields(),
                         "findings": [f.fields() for f in s.findings],
                         "processes": [list(p) for d in s.devices for p in d.processes]}
        resident = s.vllm_resident_bytes
        res["vllm_resident_bytes"] = resident
        listed = {p[0] for d in s.devices for p in d.processes}
        checks["marked_pid_listed_by_nvml"] = mine.pid in listed
        checks["resident_at_least_alloc"] = bool(resident and resident >= args.alloc_gib * GiB)

        # 4. events
        w = mon._watcher
        res["events_supported"] = mon.events_supported
        res["event_masks"] = {} if w is None else {str(k): hex(v) for k, v in w.masks.items()}
        res["supported_event_types"] = {str(i): hex(nv.supported_event_types(h))
                                        for i, h in mon.handles.items()}
        es = nv.event_set_create()
        try:
            nv.register_events(mon.handles[mon.devices[0]],
                               n.EVENT_XID_CRITICAL | n.EVENT_DOUBLE_BIT_ECC, es)
            t = time.perf_counter()
            ev = nv.event_wait(es, 500)
            res["event_wait_500ms"] = {"result": "timeout" if ev is None else repr(ev),
                                       "elapsed_ms": round((time.perf_counter() - t) * 1000, 1)}
        except n.NvmlError as e:
            res["event_wait_500ms"] = {"error": str(e)}
        finally:
            nv.event_set_free(es)
        checks["event_registration_answered"] = mon.events_supported is not None

        # 5. sampling cost
        pids = [mine.pid]
        durs = []
        c0 = time.process_time()
        w0 = time.perf_counter()
        for _ in range(args.samples):
            durs.append(mon.sample(pids).duration_s)
        wall = time.perf_counter() - w0
        cpu = time.process_time() - c0
        res["sample_timing"] = {**stats_us(durs),
                                "cpu_per_pass_us": round(cpu / args.samples * 1e6, 2),
                                "wall_per_pass_us": round(wall / args.samples * 1e6, 2)}
        checks["sample_median_under_1ms"] = statistics.median(durs) < 0.001

        # 6. preflight and the /proc scan
        t = time.perf_counter()
        pf = mon.preflight(KEY, marker)
        res["preflight_ms"] = round((time.perf_counter() - t) * 1000, 2)
        res["preflight"] = {
            "stale": [h.describe() for h in pf.stale],
            "foreign": [h.describe() for h in pf.foreign],
            "refuse_reason": pf.refuse_reason, "nvml": pf.nvml}
        checks["preflight_marked_is_stale"] = [h.pid for h in pf.stale] == [mine.pid]
        checks["preflight_foreign_blocks"] = (
            any(h.pid == other.pid and h.source == "nvml" for h in pf.foreign)
            and pf.refuse_reason is not None and str(other.pid) in pf.refuse_reason)
        glob_ = "/dev/nvidia*"
        if args.fake:
            glob_ = str(Path(args.out) / "no-such-device*")
        t = time.perf_counter()
        fds = scan_device_fds(glob_)
        res["procfs_scan"] = {"ms": round((time.perf_counter() - t) * 1000, 2),
                              "holders": {str(k): list(v) for k, v in fds.items()}}
        if not args.fake:
            checks["procfs_scan_finds_both"] = mine.pid in fds and other.pid in fds

        # 7. residency: kill the marked holder, vLLM's memory must go, the rule must fire
        threshold = residency_threshold(None, resident)
        res["residency_threshold_bytes"] = threshold
        checks["resident_ok_while_held"] = check_residency(threshold, resident) is None
        t = time.perf_counter()
        mine.kill()
        if fake is not None:
            fake.devices[0].processes = [p for p in fake.devices[0].processes if p[0] != mine.pid]
        gone = poll_for(lambda: mon.sample([mine.pid]).vllm_resident_bytes == 0, 30)
        res["nvml_drops_dead_pid_s"] = round(time.perf_counter() - t, 2)
        after = mon.sample([mine.pid])
        verdict = check_residency(threshold, after.vllm_resident_bytes)
        res["residency_after_kill"] = {"resident": after.vllm_resident_bytes,
                                       "finding": None if verdict is None else verdict.fields()}
        checks["not_resident_after_kill"] = bool(gone) and verdict is not None and \
            verdict.code == "gpu.not_resident"
        res["emitted_by_watcher"] = [f.fields() for f in found]
        t = time.perf_counter()
        mon.close()
        res["close_ms"] = round((time.perf_counter() - t) * 1000, 1)
    except Exception as e:  # report what broke, with what was measured so far
        import traceback
        res["error"] = "".join(traceback.format_exception(e))
        checks["no_exception"] = False
    finally:
        for c in children:
            c.kill()
    res["checks"] = checks
    res["ok"] = all(checks.values()) and bool(checks)
    text = json.dumps(res, indent=2, default=str)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_validate.json").write_text(text + "\n")
    print(text)
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
