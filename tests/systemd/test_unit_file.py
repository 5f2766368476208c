"""The unit file itself: systemd 252 accepts every line, the hardening scores 2.5 or better,
each directive is explained, and the sandbox still gives vLLM what it needs."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator

import pytest
from helpers.tier import cannot_run
from nika_helpers import PREFIX, SHIPPED_UNIT, UNIT, poll, reset, unit_journal
from systemd_harness import MEASUREMENTS, Namespace

pytestmark = pytest.mark.systemd

MAX_EXPOSURE = 2.5


def test_security_exposure_is_low() -> None:
    """`systemd-analyze security --offline=yes` rates the shipped unit 2.5 or lower."""
    if shutil.which("systemd-analyze") is None:
        cannot_run("the systemd tier's unit check", "systemd-analyze not installed")
    res = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--no-pager",
                          str(SHIPPED_UNIT)], capture_output=True, text=True, check=False)
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", res.stdout)
    assert m, res.stdout + res.stderr
    exposure = float(m.group(1))
    MEASUREMENTS["systemd-analyze security --offline=yes exposure"] = exposure
    assert exposure <= MAX_EXPOSURE, res.stdout


def test_every_service_directive_is_explained() -> None:
    """Each paragraph of [Service] directives carries a comment saying why."""
    section = SHIPPED_UNIT.read_text().split("[Service]", 1)[1].split("[Install]", 1)[0]
    for block in section.strip().split("\n\n"):
        lines = block.strip().splitlines()
        directives = [ln for ln in lines if ln and not ln.startswith("#")]
        comments = [ln for ln in lines if ln.startswith("#")]
        assert not directives or comments, f"uncommented directives: {directives}"


@pytest.fixture
def ns(nika_ns: Namespace) -> Iterator[Namespace]:
    reset(nika_ns)
    yield nika_ns
    reset(nika_ns)


def test_verify_is_clean(ns: Namespace) -> None:
    """`systemd-analyze verify` of the installed unit prints nothing and succeeds."""
    res = ns.run(["systemd-analyze", "verify", f"/etc/systemd/system/{UNIT}"], check=False)
    assert (res.returncode, res.stdout, res.stderr) == (0, "", ""), res


def test_device_acl_allows_the_nvidia_devices(ns: Namespace) -> None:
    """The device cgroup is closed (pseudo devices only) plus every NVIDIA device group
    (nvidia, nvidiactl, nvidia-uvm, nvidia-uvm-tools, nvidia-caps, ...)."""
    p = ns.show(UNIT, "DevicePolicy", "DeviceAllow", "PrivateDevices")
    assert p["DevicePolicy"] == "closed" and p["PrivateDevices"] == "no", p
    assert "char-nvidia* rw" in p["DeviceAllow"], p


PROBE = r'''
"""Runs as the nika-vllm unit's main process, under all of its settings, and reports what
vLLM would find: writable caches, /dev/shm, spawn, the syscalls torch uses; and what it must
not find: a writable /etc or /opt, /root, capabilities, the kernel log."""
import errno, json, multiprocessing as mp, os, socket, tempfile
from multiprocessing import shared_memory


def writable(path):
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path):
            return "ok"
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))


def attempt(fn):
    try:
        fn()
        return "ok"
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))


def child(q):
    q.put(os.getpid())


def main():
    r = {}
    for var in ("HOME", "HF_HOME", "VLLM_CACHE_ROOT", "TRITON_CACHE_DIR", "CUDA_CACHE_PATH",
                "TORCHINDUCTOR_CACHE_DIR", "RUNTIME_DIRECTORY", "XDG_CACHE_HOME"):
        r["write $" + var] = writable(os.environ[var])
    r["write flashinfer"] = writable(
        os.path.join(os.environ["FLASHINFER_WORKSPACE_BASE"], ".cache", "flashinfer"))
    for path in ("/tmp", "/var/tmp", "/dev/shm", "/etc/nika", "/opt/nika-supervisor",
                 "/var/lib/probe", "/usr/local/probe"):
        r["write " + path] = writable(path)
    r["read /root"] = attempt(lambda: os.listdir("/root"))
    r["read /etc/nika/nika-vllm.yaml"] = attempt(lambda: open("/etc/nika/nika-vllm.yaml").close())

    def shm():
        s = shared_memory.SharedMemory(create=True, size=1 << 20)
        s.buf[0] = 1
        s.close()
        s.unlink()
    r["posix shared memory"] = attempt(shm)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=child, args=(q,))
    p.start()
    r["multiprocessing spawn"] = "ok" if q.get(timeout=60) else "no"
    p.join(30)
    r["sched_setaffinity"] = attempt(lambda: os.sched_setaffinity(0, os.sched_getaffinity(0)))
    r["memfd_create"] = attempt(lambda: os.close(os.memfd_create("probe")))
    r["setpriority"] = attempt(lambda: os.setpriority(os.PRIO_PROCESS, 0, 1))
    r["netlink socket"] = attempt(
        lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0).close())
    r["tcp listen 127.0.0.1"] = attempt(
        lambda: socket.create_server(("127.0.0.1", 0)).close())
    r["packet socket"] = attempt(
        lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0).close())
    r["open /dev/null rw"] = attempt(lambda: open("/dev/null", "r+b").close())
    r["open /dev/kmsg"] = attempt(lambda: open("/dev/kmsg", "rb").close())
    r["chown"] = attempt(lambda: os.chown(os.environ["RUNTIME_DIRECTORY"], -1, os.getgid()))
    status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
    for key in ("NoNewPrivs", "Seccomp", "CapEff", "CapBnd", "Groups"):
        r[key] = status[key].strip()
    r["user"] = os.environ.get("USER") or str(os.getuid())
    print("PROBE " + json.dumps(r), flush=True)
    addr = os.environ["NOTIFY_SOCKET"]
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.connect("\0" + addr[1:] if addr.startswith("@") else addr)
    s.send(b"READY=1")


if __name__ == "__main__":
    main()
'''


def test_sandbox_gives_vllm_what_it_needs(ns: Namespace) -> None:
    """A probe run with every setting of the installed unit (only ExecStart= replaced) can
    write all the caches, use /dev/shm, spawn workers and make torch's syscalls, and cannot
    write /etc or /opt, read /root, or open the kernel log; it has no capability."""
    ns.write("/opt/harness/sandbox_probe.py", PROBE)
    unit = ns.path(f"/etc/systemd/system/{UNIT}").read_text()
    probe_unit, n = re.subn(r"^ExecStart=.*$",
                            f"ExecStart={PREFIX}/bin/python /opt/harness/sandbox_probe.py",
                            unit, flags=re.M)
    assert n == 1
    ns.write("/etc/systemd/system/nika-sandbox-probe.service", probe_unit)
    try:
        ns.systemctl("daemon-reload")
        ns.systemctl("start", "nika-sandbox-probe.service", timeout=120)
        out = poll(lambda: [ln for ln in ns.journal("-u", "nika-sandbox-probe.service", "-o",
                                                    "cat").splitlines()
                            if ln.startswith("PROBE ")], 30, "the probe's report")
    finally:
        ns.systemctl("stop", "nika-sandbox-probe.service", check=False)
        ns.path("/etc/systemd/system/nika-sandbox-probe.service").unlink()
        ns.systemctl("daemon-reload")
    r = json.loads(out[-1].split(" ", 1)[1])
    must_work = [k for k in r if k.startswith("write $")] + [
        "write flashinfer", "write /tmp", "write /var/tmp", "write /dev/shm",
        "read /etc/nika/nika-vllm.yaml", "posix shared memory", "multiprocessing spawn",
        "sched_setaffinity", "memfd_create", "setpriority", "netlink socket",
        "tcp listen 127.0.0.1", "open /dev/null rw"]
    failed = {k: r[k] for k in must_work if r[k] != "ok"}
    assert not failed, f"the sandbox blocks what vLLM needs: {failed}\n{r}"
    assert r["write /etc/nika"] in ("EROFS", "EACCES"), r
    assert r["write /opt/nika-supervisor"] == "EROFS", r
    assert r["write /var/lib/probe"] == "EROFS", r
    assert r["write /usr/local/probe"] == "EROFS", r
    assert r["read /root"] in ("EACCES", "EPERM", "ENOENT"), r
    assert r["packet socket"] == "EAFNOSUPPORT", r
    assert r["open /dev/kmsg"] in ("EPERM", "EACCES"), r  # ProtectKernelLogs=
    assert r["chown"] == "EPERM", r  # @privileged (chown family) is filtered
    assert (r["NoNewPrivs"], r["Seccomp"], r["CapEff"], r["CapBnd"]) == \
        ("1", "2", "0000000000000000", "0000000000000000"), r
    assert "44" in r["Groups"].split(), f"not in group video: {r['Groups']}"
    assert "nika-sandbox-probe" not in unit_journal(ns)
