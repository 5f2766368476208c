"""The shipped unit, hardening and all, under a real systemd on a GPU host (issue 13).

One command on a GPU machine (root, no systemd needed): `scripts/gpu-systemd-check.sh`, which
runs this file. It:
1. unpacks Debian's systemd 252 (.deb files fetched beforehand with `apt-get download`) into a
   private root and boots it as PID 1 of a private namespace with the systemd tier's harness
   (tests/systemd/systemd_harness.py) and safety mounts (tests/systemd/boot.sh, reached through
   scripts/gpu-systemd-boot.sh, which adds the /usr overlay);
2. checks that systemd enforces a device policy there (a transient unit is refused /dev/zero);
3. installs the package, the user and the shipped unit with scripts/install.sh (wheels from a
   local folder: the machine has no network), copies the CUDA workload
   (bench/gpu_workload/) where the sandbox can read it and writes /etc/nika/nika-vllm.yaml;
4. starts the unit and measures: `is-active` over time (active only after the model
   answers), every engine step (CUDA, NVML, Triton, torch.compile, NCCL, allocation), the
   process's seccomp/NoNewPrivs/capabilities, gpu.sample and gpu.residency in the journal,
   the cache directories, a completion; then a SIGKILL of the API server and one of the
   engine, each followed by the daemon's restart; then `systemctl stop` leaving nothing
   (cgroup empty, NVML lists no process);
5. `systemd-analyze security` of the installed unit;
6. if the first start fails, bisects the hardening (bench/gpu_systemd_bisect.py) and goes on
   with the culprits relaxed, so one run yields both the culprit and the rest of the checks.

Writes OUT/gpu_systemd.json (exit 0 only when every check passed) and the journal, install
and boot logs. --no-gpu runs the same plumbing with the workload's CUDA steps skipped and NVML
off (a dry run on a machine without a GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests"), str(REPO / "tests" / "systemd"), str(REPO / "bench")]

import systemd_harness as harness  # noqa: E402
from gpu_systemd_bisect import Trial, bisect, relaxations  # noqa: E402
from gpu_systemd_ns import (  # noqa: E402
    UNIT,
    Events,
    device_bpf_programs,
    host_nvml_pids,
    proc_security,
    unpack_debs,
    wait_for,
)
from helpers import free_port  # noqa: E402

STATE = "/var/lib/nika-vllm/workload"  # under the unit's StateDirectory=: writable by nika
CODE = "/opt/nika-test/gpu_workload"  # in the /opt overlay: readable in the sandbox
SHIM = "/opt/nika-test/ensurepip-shim"  # only where the host's Python has no ensurepip


def sh(cmd: str) -> str:
    r = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=60)
    return f"$ {cmd}\n{r.stdout}{r.stderr}"


def workload_python(explicit: str | None) -> str:
    """The interpreter with torch (the machine's own PyTorch venv)."""
    if explicit:
        return explicit
    for cand in (sys.executable, shutil.which("python3") or ""):
        probe = subprocess.run([cand or "false", "-c", "import torch"], capture_output=True)
        if cand and probe.returncode == 0:
            return cand
    return sys.executable


def config(port: int, python: str, no_gpu: bool, selftest: bool) -> dict[str, Any]:
    env = {"PYTHONPATH": CODE, "WORKLOAD_STATE_DIR": STATE, "WORKLOAD_GPU_FRACTION": "0.85",
           "WORKLOAD_MAX_LIFETIME_S": "900",
           # KINDS.md: NVLink multicast stays off on the lent machines
           "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
           "NVSHMEM_DISABLE_NVLS": "1"}
    if no_gpu:
        env["WORKLOAD_NO_GPU"] = "1"
    if selftest:
        env["WORKLOAD_SELFTEST"] = "personality"
    return {
        "vllm": {"python": python, "entrypoint": "api_server", "model": "gpu-workload",
                 "served_model_name": ["nika"], "host": "127.0.0.1", "port": port, "env": env},
        "health": {"interval": "1s", "timeout": "5s", "failure_threshold": 3,
                   "startup_timeout": "300s", "stall_after": 0, "canary_interval": "10s",
                   "canary_timeout": "30s", "min_tokens_per_s": 1},
        "restart": {"backoff_initial": "1s", "backoff_max": "2s", "max_restarts": 10,
                    "window": "10m", "stop_timeout": "20s"},
        "gpu": {"nvml": "off" if no_gpu else "required", "stale_holders": "refuse",
                "sample_interval": "2s", "min_resident_memory": "auto"},
        "supervisor": {"log_format": "json", "log_level": "info"},
    }


class Run:
    def __init__(self, ns: harness.Namespace, out: Path, no_gpu: bool, deadline: float) -> None:
        self.ns, self.out, self.no_gpu, self.deadline = ns, out, no_gpu, deadline
        self.ev = Events(ns)
        self.r: dict[str, Any] = {}

    def json_file(self, name: str) -> Any:
        try:
            return json.loads(self.ns.path(f"{STATE}/{name}").read_text())
        except (OSError, ValueError):
            return None

    def engine_report(self) -> dict[str, Any] | None:
        pid = self.json_file("engine.pid")
        rep = self.json_file(f"engine-{pid}.json") if pid else None
        return rep if isinstance(rep, dict) else None

    def start(self, label: str, timeout: float = 300) -> dict[str, Any]:
        """`systemctl start --no-block`, then poll is-active until active/failed; returns what
        was seen (the first start also records whether `activating` was observed while the
        engine was still loading)."""
        ns = self.ns
        ns.run(["rm", "-rf", STATE])
        mark = self.ev.mark()
        t0 = time.monotonic()
        ns.systemctl("start", "--no-block", UNIT)
        seen: list[tuple[float, str, bool]] = []
        state = ""
        while time.monotonic() - t0 < timeout:
            state = ns.systemctl("is-active", UNIT, check=False).stdout.strip()
            rep = self.engine_report()
            loaded = bool(rep and rep.get("ready"))
            if not seen or seen[-1][1:] != (state, loaded):
                seen.append((round(time.monotonic() - t0, 2), state, loaded))
            if state in ("active", "failed") or (rep and rep.get("failed")):
                break
            if state == "inactive" and time.monotonic() - t0 > 5:
                break
            time.sleep(0.2)
        p = ns.show(UNIT, "ActiveState", "Result", "MainPID", "ExecMainStatus",
                    "InactiveExitTimestampMonotonic", "ActiveEnterTimestampMonotonic")
        bound = self.json_file("bound_at")
        res: dict[str, Any] = {"state": state, "transitions": seen, "props": p,
                               "engine": self.engine_report(), "mark": mark}
        if p.get("ActiveState") == "active":
            t_exit = int(p["InactiveExitTimestampMonotonic"]) / 1e6
            t_active = int(p["ActiveEnterTimestampMonotonic"]) / 1e6
            res["start_to_active_s"] = round(t_active - t_exit, 2)
            if isinstance(bound, float):
                res["bound_to_active_s"] = round(t_active - bound, 3)
            res["activating_while_loading"] = any(
                s == "activating" and not loaded for _, s, loaded in seen)
        self.r[label] = res
        return res

    def ok_start(self, res: dict[str, Any]) -> bool:
        eng = res.get("engine") or {}
        return res.get("state") == "active" and bool(eng.get("ready")) and not eng.get("failed")

    def stop(self) -> None:
        self.ns.systemctl("stop", UNIT, check=False, timeout=120)
        self.ns.systemctl("reset-failed", UNIT, check=False)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--debs", type=Path, default=REPO / ".sysdebs")
    ap.add_argument("--wheels", type=Path, default=REPO / ".whl")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--python", help="interpreter with torch for the workload")
    ap.add_argument("--no-gpu", action="store_true")
    ap.add_argument("--ensurepip-shim", action="store_true",
                    help="use the ensurepip shim even where python3 has ensurepip (dry runs)")
    ap.add_argument("--selftest-bisect", action="store_true",
                    help="the workload does something LockPersonality= refuses: the run must "
                    "fail and the bisection must name LockPersonality")
    ap.add_argument("--budget", type=float, default=540, help="seconds for the whole run")
    args = ap.parse_args()
    t_begin = time.monotonic()
    deadline = t_begin + args.budget
    out: Path = args.out or Path(tempfile.mkdtemp(prefix="nika-gpu-systemd-out-"))
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="nika-gpu-systemd-"))
    py = workload_python(args.python)
    r: dict[str, Any] = {"workload_python": py, "work": str(work), "repo": str(REPO)}
    env_cmds = ["uname -a", "grep PRETTY /etc/os-release", "nvidia-smi -L",
                "nvidia-smi --query-gpu=driver_version,memory.total --format=csv",
                "grep -i nvidia /proc/devices", "ls -l /dev/nvidia* /dev/nvidia-caps",
                "cat /proc/self/cgroup", "findmnt -rn -o TARGET,FSTYPE,OPTIONS | head -60",
                f"{py} -c 'import sys,torch,triton;print(sys.version,sys.base_prefix,"
                "torch.__version__,triton.__version__)'",
                "python3 -c 'import ensurepip, venv' && echo ensurepip ok"]
    (out / "env.txt").write_text("\n".join(sh(c) for c in env_cmds))
    sysroot = work / "sysroot"
    r["debs"] = unpack_debs(args.debs, sysroot)
    harness.BOOT_SH = REPO / "scripts" / "gpu-systemd-boot.sh"
    harness.HOST_UNITS = sysroot / "top" / "usr" / "lib" / "systemd" / "system"
    os.environ["NIKA_SYSROOT"] = str(sysroot)
    checks: dict[str, Any] = {}
    t = time.monotonic()
    try:
        ns = harness.Namespace.boot(work / "ns", timeout=90)
    except harness.HarnessError as e:
        r["boot_error"] = str(e)
        (out / "gpu_systemd.json").write_text(json.dumps(r, indent=1, default=str))
        print(json.dumps(r, indent=1, default=str))
        return 1
    r["boot_s"] = round(time.monotonic() - t, 2)
    run = Run(ns, out, args.no_gpu, deadline)
    try:
        r["systemd_version"] = ns.run(["systemctl", "--version"]).stdout.splitlines()[0]
        r["system_state"] = ns.run(["systemctl", "is-system-running"], check=False).stdout.strip()
        # 2. the device cgroup is enforced here (else DevicePolicy= would prove nothing), and
        # DeviceAllow=char-nvidia* is what opens the NVIDIA nodes (device_policy_probe).
        # (Unit files, not systemd-run: that needs D-Bus, which this system lacks.)
        checks["device_policy_enforced"] = device_policy_probe(ns, r, not args.no_gpu)
        # 3. install as install.sh does (pip offline, from the carried wheels)
        pyarg = install_python(ns, py, args.ensurepip_shim, r)
        r["install_python_arg"] = pyarg
        t = time.monotonic()
        inst = ns.run(["bash", str(REPO / "scripts" / "install.sh"), *pyarg], check=False,
                      timeout=600, env={"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(args.wheels),
                                        "PIP_NO_CACHE_DIR": "1",
                                        "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
        (out / "install.log").write_text(f"exit {inst.returncode}\n{inst.stdout}\n{inst.stderr}")
        r["install_s"] = round(time.monotonic() - t, 2)
        checks["installed"] = inst.returncode == 0
        if inst.returncode != 0:
            raise RuntimeError(f"install.sh exited {inst.returncode}: {inst.stderr[-1500:]}")
        installed = ns.path(f"/etc/systemd/system/{UNIT}").read_text()
        checks["unit_is_the_shipped_one"] = installed == (REPO / "systemd" / UNIT).read_text()
        ns.run(["mkdir", "-p", os.path.dirname(CODE)])
        ns.run(["cp", "-r", str(REPO / "bench" / "gpu_workload"), CODE])
        ns.run(["chmod", "-R", "a+rX", os.path.dirname(CODE)])
        r.setdefault("adjustments", []).extend(adjust_for_host(ns, py))
        port = free_port()
        cfg = config(port, py, args.no_gpu, args.selftest_bisect)
        ns.write("/etc/nika/nika-vllm.yaml", json.dumps(cfg, indent=1))
        check = ns.run(["/opt/nika-supervisor/bin/nika-supervisor", "check", "--config",
                        "/etc/nika/nika-vllm.yaml"], check=False)
        checks["config_valid"] = check.returncode == 0
        # systemd's own debug lines name the device rules it builds for the unit
        ns.run(["systemd-analyze", "log-level", "debug"])
        # 4. the first start, cold caches
        first = run.start("first_start")
        shipped_ok = run.ok_start(first)
        if args.selftest_bisect:  # the shipped unit must refuse the selftest's personality(2)
            eng = first.get("engine") or {}  # ... with EPERM (errno 1), in that step
            err = eng.get("steps", {}).get("selftest_personality", {}).get("error", "")
            checks["selftest_shipped_unit_refuses"] = not shipped_ok and \
                eng.get("failed") == "selftest_personality" and "errno 1" in err
        else:
            checks["first_start_ready"] = shipped_ok
        proceed = shipped_ok
        if not shipped_ok:
            r["first_start_journal_tail"] = run.ev.tail(60)
            run.stop()
            trial = Trial(ns, run, deadline)
            r["bisect"] = bisect(trial, relaxations())
            culprits = r["bisect"].get("culprits")
            if args.selftest_bisect:
                checks["selftest_bisect_names_LockPersonality"] = culprits == ["LockPersonality"]
            if culprits:  # go on with them relaxed: the rest of the checks still say something
                trial.write_dropin(culprits, "zz-bisect-found.conf")
                relaxed = run.start("start_with_culprits_relaxed")
                proceed = checks["ready_with_culprits_relaxed"] = run.ok_start(relaxed)
        if proceed:
            serving_checks(run, port, checks)
            kill_checks(run, checks)
            stop_checks(run, checks)
        sec = ns.run(["systemd-analyze", "security", "--no-pager", UNIT], check=False).stdout
        m = re.search(r"Overall exposure level for \S+: ([\d.]+)", sec)
        r["exposure_installed"] = float(m.group(1)) if m else sec[-500:]
        sec = ns.run(["systemd-analyze", "security", "--no-pager", "--offline=yes",
                      str(REPO / "systemd" / UNIT)], check=False).stdout
        m = re.search(r"Overall exposure level for \S+: ([\d.]+)", sec)
        r["exposure_shipped_offline"] = float(m.group(1)) if m else sec[-500:]
        checks["exposure_at_most_2"] = isinstance(r["exposure_shipped_offline"], float) and \
            r["exposure_shipped_offline"] <= 2.0
        r["denials_in_journal"] = run.ev.grep(
            r"Operation not permitted|Permission denied|EPERM|EACCES|seccomp|audit")[:30]
    except Exception as e:
        r["error"] = f"{type(e).__name__}: {e}"
    finally:
        (out / "journal.txt").write_text(ns.journal("-o", "short-monotonic")[-4_000_000:])
        (out / "boot.log").write_text(ns.boot_log())
        r["teardown_problems"] = ns.teardown()
    r.update(run.r)
    r["checks"] = checks
    r["ok"] = bool(checks) and all(v is True for v in checks.values()) and "error" not in r \
        and not r["teardown_problems"]
    r["wall_s"] = round(time.monotonic() - t_begin, 1)
    text = json.dumps(r, indent=1, default=str)
    (out / "gpu_systemd.json").write_text(text)
    print(text)
    print(f"gpu_systemd: ok={r['ok']} out={out}")
    return 0 if r["ok"] else 1


ENSUREPIP_MAIN = """\
# The host's Python has no ensurepip (Ubuntu ships it in python3.X-venv): bootstrap pip into the
# new venv from the carried wheel, as pip's docs do (python pip.whl/pip install pip.whl).
import glob, os, subprocess, sys
wheels = os.environ["PIP_FIND_LINKS"]
whl = sorted(glob.glob(os.path.join(wheels, "pip-*.whl")))[-1]
sys.exit(subprocess.call([sys.executable, os.path.join(whl, "pip"), "install", "-q",
                          "--no-index", whl]))
"""


def install_python(ns: harness.Namespace, py: str, force_shim: bool,
                   r: dict[str, Any]) -> list[str]:
    """install.sh's --python: none when the host's python3 can make venvs; else the workload's
    interpreter; else (no ensurepip anywhere) that interpreter behind a shim that provides
    ensurepip from the carried pip wheel. Each departure is a test adjustment."""
    can = "import ensurepip, venv"
    if not force_shim and ns.run(["python3", "-c", can], check=False).returncode == 0:
        return []
    if not force_shim and ns.run([py, "-c", can], check=False).returncode == 0:
        r.setdefault("adjustments", []).append(f"install.sh --python {py}: the host's python3 "
                                               "cannot make venvs")
        return ["--python", py]
    base = subprocess.run([py, "-c", "import sys; print(sys._base_executable)"],
                          capture_output=True, text=True, check=True).stdout.strip()
    ns.write(f"{SHIM}/ensurepip/__init__.py", "")
    ns.write(f"{SHIM}/ensurepip/__main__.py", ENSUREPIP_MAIN)
    ns.write(f"{SHIM}/python3", "#!/bin/sh\nPYTHONPATH=" + SHIM +
             '${PYTHONPATH:+:$PYTHONPATH} exec ' + base + ' "$@"\n', mode=0o755)
    r.setdefault("adjustments", []).append(
        f"install.sh --python {SHIM}/python3: {base} has no ensurepip; the shim adds an "
        "ensurepip that installs pip from the carried wheel")
    return ["--python", f"{SHIM}/python3"]


def device_policy_probe(ns: harness.Namespace, r: dict[str, Any], gpu: bool) -> bool:
    """Oneshot units that open device nodes under a device policy; each must succeed or be
    refused as expected. DevicePolicy=closed always allows the pseudo devices (/dev/null,
    zero, full, random, urandom: systemd.resource-control(5)), so the refusal of a plain
    device is shown with strict, and on a GPU host with closed and the NVIDIA nodes."""
    nodes = "/dev/nvidiactl /dev/nvidia0 /dev/nvidia-uvm"
    opens = f"for d in {nodes}; do : < $d || exit 1; done"
    cases = [("strict-null-only", "DevicePolicy=strict\nDeviceAllow=/dev/null rw",
              "head -c1 /dev/zero >/dev/null", False),
             ("no-policy", "", "head -c1 /dev/zero >/dev/null", True)]
    if gpu:
        cases += [("closed-without-nvidia", "DevicePolicy=closed", opens, False),
                  ("closed-char-nvidia", "DevicePolicy=closed\nDeviceAllow=char-nvidia* rw",
                   opens, True)]
    results = {}
    for name, policy, cmd, want in cases:
        unit = f"nika-devprobe-{name}.service"
        ns.write(f"/etc/systemd/system/{unit}",
                 f"[Service]\nType=oneshot\n{policy}\nExecStart=/bin/sh -c '{cmd}'\n")
        ns.systemctl("daemon-reload")
        res = ns.systemctl("start", unit, check=False)
        results[name] = {"ok": res.returncode == 0, "expected_ok": want,
                         "journal": ns.journal("-u", unit)[-300:]}
    r["device_policy_probe"] = results
    return all(v["ok"] == v["expected_ok"] for v in results.values())


def adjust_for_host(ns: harness.Namespace, py: str) -> list[str]:
    """Test adjustments this host needs, each written as a drop-in and returned as a line.
    The workload's interpreter must be readable by user nika inside the sandbox: an
    interpreter under /root or /home is hidden by ProtectHome=yes, so that directory is
    bound back read-only over ProtectHome=tmpfs (systemd.exec(5), ProtectHome=: "tmpfs ...
    useful in combination with BindReadOnlyPaths=")."""
    probe = subprocess.run([py, "-c", "import os,sys;print(os.path.realpath(sys.base_prefix));"
                            "print(os.path.realpath(sys.prefix))"],
                           capture_output=True, text=True, timeout=60).stdout.split()
    hidden = sorted({p for p in probe if re.match(r"^/(root|home)(/|$)", p)})
    if not hidden:
        return []
    lines = ["ProtectHome=tmpfs", *(f"BindReadOnlyPaths={p}" for p in hidden)]
    ns.write(f"/etc/systemd/system/{UNIT}.d/zz-test-python-under-home.conf",
             "[Service]\n" + "\n".join(lines) + "\n")
    ns.systemctl("daemon-reload")
    return [f"drop-in zz-test-python-under-home.conf: {' '.join(lines)} (the workload's "
            f"interpreter lives under {', '.join(hidden)})"]


def serving_checks(run: Run, port: int, checks: dict[str, Any]) -> None:
    ns, r = run.ns, run.r
    first = r["first_start"] if "start_with_culprits_relaxed" not in r else \
        r["start_with_culprits_relaxed"]
    checks["active_only_after_model_answers"] = first.get("activating_while_loading") is True \
        and (first.get("bound_to_active_s") or -1) > 0
    eng = first.get("engine") or {}
    steps = eng.get("steps", {})
    checks["engine_steps_ok"] = bool(steps) and all(s.get("ok") for s in steps.values())
    main_pid = int(ns.show(UNIT, "MainPID")["MainPID"])
    api = run.json_file("api.pid")
    engine = run.json_file("engine.pid")
    r["security_of"] = {name: proc_security(ns, ns.host_pid(pid)) for name, pid in
                        (("daemon", main_pid), ("api_server", api), ("engine", engine)) if pid}
    checks["sandboxed"] = all(s.get("Seccomp") == "2" and s.get("NoNewPrivs") == "1"
                              and int(s.get("CapEff", "1"), 16) == 0 and s.get("user") == "nika"
                              for s in r["security_of"].values())
    r["device_bpf_programs"] = device_bpf_programs(ns.cgroup / "system.slice" / UNIT)
    r["device_rules_logged"] = [ln[:300] for ln in ns.journal().splitlines()
                                if "nvidia" in ln and ("evice" in ln or "BPF" in ln)][:40]
    ready = run.ev.wait("vllm.ready", first["mark"], 30)
    r["vllm_ready_event"] = ready
    if not run.no_gpu:
        res = run.ev.wait("gpu.residency", first["mark"], 30)
        r["gpu_residency_event"] = res
        sample = run.ev.wait("gpu.sample", first["mark"], 30,
                             lambda e: (e.get("vllm_resident_gib") or 0) > 1)
        r["gpu_sample_event"] = sample
        if not sample:
            r["gpu_sample_any"] = run.ev.wait("gpu.sample", first["mark"], 5)
        checks["gpu_sample_real"] = bool(sample and sample.get("gpu0_name")
                                         and sample.get("gpu0_temp_c") is not None)
        checks["residency_floor_derived"] = bool(res) and (res.get("min_resident") or 0) > 0
    body = json.dumps({"model": "nika", "prompt": "hi", "max_tokens": 8}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            answer = json.loads(resp.read())
    except urllib.error.HTTPError as e:
        answer = {"http_error": e.code, "body": e.read().decode(errors="replace")[:500]}
    r["completion"] = answer
    checks["completion_answers"] = answer.get("usage", {}).get("completion_tokens") == 8
    caches = ns.run(["bash", "-c", "cd /var/cache/nika-vllm && for d in . *; do "
                     "echo \"$(stat -c '%U %a' $d) $d $(find $d -type f | wc -l)\"; done"],
                    check=False).stdout
    r["cache_dirs"] = caches.splitlines()
    if not run.no_gpu:
        counts = {ln.split()[2]: int(ln.split()[3]) for ln in r["cache_dirs"]
                  if len(ln.split()) == 4}
        checks["caches_written_by_nika"] = counts.get("triton", 0) > 0 and \
            counts.get("torchinductor", 0) > 0 and all(ln.startswith("nika ")
                                                        for ln in r["cache_dirs"])


def kill_checks(run: Run, checks: dict[str, Any]) -> None:
    """SIGKILL the API server, then the engine: each time the daemon restarts vLLM and the
    unit's main process (the daemon) stays the same."""
    ns, r = run.ns, run.r
    main_before = ns.show(UNIT, "MainPID")["MainPID"]
    for victim in ("api", "engine"):
        api, engine = run.json_file("api.pid"), run.json_file("engine.pid")
        old = {"api": ns.host_pid(api), "engine": ns.host_pid(engine)}
        mark = run.ev.mark()
        t0 = time.monotonic()
        os.kill(old[victim], signal.SIGKILL)
        exited = run.ev.wait("vllm.exited", mark, 60)
        ready = run.ev.wait("vllm.ready", mark, 240)
        took = round(time.monotonic() - t0, 2)
        gone = wait_for(lambda o=old: not any(os.path.exists(f"/proc/{p}") for p in o.values()),
                        30)
        rep = run.engine_report() or {}
        states = ns.show(UNIT, "ActiveState", "MainPID", "NRestarts")
        r[f"sigkill_{victim}"] = {"killed_host_pid": old[victim], "exited": exited,
                                  "ready_again": ready, "kill_to_ready_s": took,
                                  "old_processes_gone": gone, "unit": states,
                                  "new_engine_steps": {k: v.get("s") for k, v in
                                                       rep.get("steps", {}).items()}}
        if not run.no_gpu:
            r[f"sigkill_{victim}"]["host_nvml_pids"] = host_nvml_pids()
        checks[f"sigkill_{victim}_restarted"] = bool(exited) and bool(ready) and gone and \
            states["ActiveState"] == "active" and states["MainPID"] == main_before and \
            bool(rep.get("ready"))


def stop_checks(run: Run, checks: dict[str, Any]) -> None:
    ns, r = run.ns, run.r
    t0 = time.monotonic()
    ns.systemctl("stop", UNIT, timeout=120)
    took = round(time.monotonic() - t0, 2)
    p = ns.show(UNIT, "ActiveState", "Result", "ExecMainStatus")
    left = ns.unit_pids(UNIT)
    shm = ns.run(["find", "/dev/shm", "-user", "nika"], check=False).stdout.split()
    r["stop"] = {"stop_s": took, "props": p, "processes_left": left, "nika_shm_left": shm}
    checks["stop_leaves_nothing"] = p["ActiveState"] == "inactive" and p["Result"] == "success" \
        and not left and not shm
    if not run.no_gpu:
        pids = wait_for(lambda: host_nvml_pids() == [] or None, 20)
        r["stop"]["host_nvml_pids_after"] = host_nvml_pids()
        checks["gpu_free_after_stop"] = bool(pids)


if __name__ == "__main__":
    raise SystemExit(main())
