"""A real systemd booted as PID 1 of a private namespace, and the ways tests talk to it.

The recipe (issue 4, verified on these machines) and what it protects against:
- `unshare --fork --pid --mount --mount-proc --uts --ipc --cgroup`, started from a cgroup2
  subtree of its own (the host mixes v1 and v2), so the namespace's systemd manages only that
  subtree; the subtree is removed at teardown;
- boot.sh (next to this file) mounts everything else before `exec systemd`: copies of a few
  units, no generators (the SysV generator would start the host's dbus and postgresql), a
  private journald.conf and system.conf (no kernel log, no rate limit, no core files), a
  copy-on-write /etc and /opt, fresh tmpfs on /run, /tmp, /var/tmp, /var/lib and /var/cache;
- PIDs inside are not the host's: `host_pid()` translates them through NSpid.

Tests talk to it only with systemctl and journalctl (`Namespace.systemctl`, `.journal`), run
through nsenter, and read its files through /proc/PID/root. `host_snapshot()` records what the
host must still look like afterwards.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from helpers import poll_for

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
BOOT_SH = HERE / "boot.sh"
HOST_UNITS = Path("/lib/systemd/system")
SYSTEMD = Path("/lib/systemd/systemd")

# Enough of a system to reach multi-user.target: the targets basic.target pulls in, and
# journald with its two sockets (wanted by sockets.target and sysinit.target below).
BOOT_UNITS = (
    "basic.target", "sysinit.target", "shutdown.target", "multi-user.target",
    "network.target", "network-online.target", "network-pre.target", "sockets.target",
    "paths.target", "timers.target", "slices.target", "local-fs.target",
    "local-fs-pre.target", "systemd-journald.service", "systemd-journald.socket",
    "systemd-journald-dev-log.socket",
)
WANTS = {
    "sockets.target.wants": ("systemd-journald.socket", "systemd-journald-dev-log.socket"),
    "sysinit.target.wants": ("systemd-journald.service",),
}
JOURNALD_CONF = """\
# The namespace's journald: RAM only, never the host's kernel log, nothing forwarded
# anywhere, and no rate limit (a burst of vLLM lines must not be dropped).
[Journal]
Storage=volatile
ReadKMsg=no
ForwardToSyslog=no
ForwardToKMsg=no
ForwardToConsole=no
ForwardToWall=no
RateLimitIntervalSec=0
RateLimitBurst=0
"""
SYSTEM_CONF = """\
# No core files: a watchdog SIGABRT would otherwise drop one in the working directory of the
# service, which is the host's / (the root file system is shared).
[Manager]
DefaultLimitCORE=0
"""
BASE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "SYSTEMD_PAGER": "cat",
    "SYSTEMD_COLORS": "0",
    "SYSTEMD_LESS": "",
}


class HarnessError(RuntimeError):
    """The namespace could not be booted or torn down (not a failure of the unit under test)."""


def unavailable_reason() -> str | None:
    """Why this machine cannot run the systemd tier, or None if it can."""
    if os.geteuid() != 0:
        return "needs root (unshare, mounts, cgroups)"
    for tool in ("unshare", "nsenter"):
        if shutil.which(tool) is None:
            return f"{tool} not found"
    if not SYSTEMD.exists():
        return f"{SYSTEMD} not found"
    if cgroup2_root() is None:
        return "no cgroup2 hierarchy mounted"
    return None


def cgroup2_root() -> Path | None:
    """The host's cgroup2 directory that holds this process: mount point + our own path."""
    mount = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            if right.split()[0] == "cgroup2" and left.split()[3] == "/":
                mount = left.split()[4]
                break
    if mount is None:
        return None
    with open("/proc/self/cgroup") as f:
        for line in f:
            if line.startswith("0::"):
                return Path(mount + line[3:].strip().rstrip("/"))
    return None


def _nspid(pid: int) -> list[int]:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("NSpid:"):
                return [int(x) for x in line.split()[1:]]
    return []


@dataclass
class Namespace:
    """One booted systemd. `pid` is its host PID; `cgroup` the host path of its subtree."""

    work: Path
    cgroup: Path
    proc: subprocess.Popen[bytes]
    pid: int = 0
    torn_down: bool = False
    notes: dict[str, Any] = field(default_factory=dict)  # what fixtures saw, for the tests
    _pidns: str = field(default="", repr=False)

    # -- boot and teardown ---------------------------------------------------------------

    @classmethod
    def boot(cls, work: Path, timeout: float = 60.0, netns: str | None = None) -> Namespace:
        """Boot a systemd in `work`; with `netns` (a name from `ip netns add`), as a node of
        its own: inside that network namespace (entered before unshare, so every unit shares
        it) and with a /dev/shm of its own (boot.sh, NIKA_BOOT_PRIVATE_SHM). Tools run
        through `run` stay in the host's network namespace (install.sh's pip needs it)."""
        prepare_workdir(work)
        parent = cgroup2_root()
        if parent is None:
            raise HarnessError("no cgroup2 hierarchy")
        cgroup = parent / f"nika-systemd-test-{os.getpid()}-{time.monotonic_ns()}"
        cgroup.mkdir()
        log = open(work / "boot.log", "wb")  # noqa: SIM115 (kept open for the child's life)
        # The shell joins the new cgroup first, so unshare, systemd and everything it starts
        # are accounted there, and the cgroup namespace's root is that subtree.
        proc = subprocess.Popen(
            ["sh", "-c", 'echo $$ > "$1/cgroup.procs" && shift && exec "$@"', "sh", str(cgroup),
             *(["nsenter", f"--net=/run/netns/{netns}", "--"] if netns else []),
             "unshare", "--fork", "--pid", "--mount", "--mount-proc", "--uts", "--ipc",
             "--cgroup", "--", "bash", str(BOOT_SH), str(work), str(REPO)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd="/",
            start_new_session=True,
            env={**os.environ, "NIKA_BOOT_PRIVATE_SHM": "1"} if netns else None)
        log.close()
        ns = cls(work=work, cgroup=cgroup, proc=proc)
        try:
            ns.pid = poll_for(ns._find_init, 20, "systemd to become PID 1 of the namespace")
            ns._pidns = os.readlink(f"/proc/{ns.pid}/ns/pid")
            poll_for(ns._booted, timeout, "the namespace's systemd to finish booting")
        except AssertionError as e:
            problems = ns.teardown()
            raise HarnessError(f"{e}\nboot.log:\n{ns.boot_log()}\nteardown: {problems}") from e
        return ns

    def _find_init(self) -> int | None:
        if self.proc.poll() is not None:
            raise AssertionError(f"unshare exited {self.proc.returncode}:\n{self.boot_log()}")
        with contextlib.suppress(OSError):
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text()
            for c in children.split():
                if _nspid(int(c))[-1:] == [1] and \
                        Path(f"/proc/{c}/comm").read_text().strip() == "systemd":
                    return int(c)
        return None

    def _booted(self) -> str | None:
        if self.proc.poll() is not None:
            raise AssertionError(f"systemd exited {self.proc.returncode}")
        out = self.run(["systemctl", "is-system-running"], check=False, timeout=10).stdout
        state = out.strip()
        if state in ("running", "degraded"):
            return state
        return None

    def boot_log(self) -> str:
        try:
            return (self.work / "boot.log").read_text(errors="replace")
        except OSError:
            return ""

    def teardown(self) -> list[str]:
        """Kill the namespace's systemd by its host PID (the kernel then kills every process
        of the namespace), wait for the cgroup subtree to empty and remove it. Returns the
        problems found (an empty list when all went well)."""
        if self.torn_down:
            return []
        self.torn_down = True
        problems: list[str] = []
        if self.pid and self._is_ours(self.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            problems.append(f"unshare (pid {self.proc.pid}) still running; killed")
            self.proc.kill()
            self.proc.wait(timeout=5)
        try:
            poll_for(lambda: not self.cgroup_pids(""), 20, "the namespace's cgroup to empty")
        except AssertionError as e:
            problems.append(str(e))
        for d in sorted((p for p in self.cgroup.rglob("*") if p.is_dir()),
                        key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(OSError):
                d.rmdir()
        try:
            self.cgroup.rmdir()
        except FileNotFoundError:
            pass
        except OSError as e:
            problems.append(f"cgroup {self.cgroup} not removed: {e}")
        return problems

    def _is_ours(self, host_pid: int) -> bool:
        try:
            return os.readlink(f"/proc/{host_pid}/ns/pid") == self._pidns
        except OSError:
            return False

    # -- talking to it -------------------------------------------------------------------

    def run(self, argv: Sequence[str], *, input: str | None = None, check: bool = True,
            timeout: float = 60.0, env: Mapping[str, str] | None = None
            ) -> subprocess.CompletedProcess[str]:
        """Run argv inside the namespace (its mounts, PIDs, UTS and IPC), as root, from /."""
        full_env = {**BASE_ENV, **(env or {})}
        cmd = ["nsenter", "-t", str(self.pid), "-m", "-p", "-u", "-i", "--wd=/", "--",
               "env", "-i", *(f"{k}={v}" for k, v in full_env.items()), *argv]
        res = subprocess.run(cmd, input=input, capture_output=True, text=True,
                             timeout=timeout, check=False)
        if check and res.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} exited {res.returncode}\n"
                                 f"stdout:\n{res.stdout}\nstderr:\n{res.stderr}")
        return res

    def systemctl(self, *args: str, check: bool = True,
                  timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        return self.run(["systemctl", "--no-pager", *args], check=check, timeout=timeout)

    def show(self, unit: str, *props: str) -> dict[str, str]:
        """`systemctl show UNIT -p A -p B` as a dict."""
        args = [a for p in props for a in ("-p", p)]
        out = self.systemctl("show", unit, *args).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, *args: str) -> str:
        """`journalctl --no-pager ARGS` (the whole journal of this boot unless ARGS narrow it)."""
        return self.run(["journalctl", "--no-pager", *args], timeout=30).stdout

    def journal_json(self, *args: str) -> list[dict[str, Any]]:
        out = self.journal("-o", "json", *args)
        return [json.loads(line) for line in out.splitlines() if line.startswith("{")]

    def path(self, inside: str) -> Path:
        """A path of the namespace's file system, reachable from the host."""
        return Path(f"/proc/{self.pid}/root") / inside.lstrip("/")

    def write(self, inside: str, text: str, mode: int = 0o644) -> None:
        """Write a file inside the namespace (atomically: the daemon may read it any time)."""
        target = self.path(inside)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.write_text(text)
        tmp.chmod(mode)
        os.replace(tmp, target)

    def host_pid(self, ns_pid: int) -> int:
        """The host PID of a process known inside the namespace as ns_pid (NSpid)."""
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            with contextlib.suppress(OSError):
                ids = _nspid(int(d))
                if len(ids) >= 2 and ids[-1] == ns_pid and self._is_ours(int(d)):
                    return int(d)
        raise LookupError(f"no process {ns_pid} in the namespace of {self.pid}")

    def cgroup_pids(self, relative: str) -> list[int]:
        """Host PIDs of every process in a cgroup of the namespace and below it
        (relative to the namespace's cgroup root, e.g. "system.slice/nika-vllm.service")."""
        top = self.cgroup / relative
        pids: list[int] = []
        if not top.exists():
            return pids
        for procs in [top / "cgroup.procs", *top.rglob("*/cgroup.procs")]:
            with contextlib.suppress(OSError):
                pids += [int(x) for x in procs.read_text().split()]
        return pids

    def unit_pids(self, unit: str) -> list[int]:
        return self.cgroup_pids(f"system.slice/{unit}")


def prepare_workdir(work: Path) -> None:
    """Lay out what boot.sh bind-mounts (see its header)."""
    units = work / "units"
    units.mkdir(parents=True)
    for name in BOOT_UNITS:
        shutil.copy2(HOST_UNITS / name, units / name)
    (units / "default.target").symlink_to("multi-user.target")
    for wants, names in WANTS.items():
        (units / wants).mkdir()
        for name in names:
            (units / wants / name).symlink_to(f"../{name}")
    for d in ("empty", "etc-unit", "varlog", "ovl"):
        (work / d).mkdir()
    (work / "journald.conf").write_text(JOURNALD_CONF)
    (work / "system.conf").write_text(SYSTEM_CONF)


# -- the host must not change ------------------------------------------------------------

HOST_FILES = ("/etc/passwd", "/etc/group", "/etc/shadow", "/etc/gshadow",
              "/etc/systemd/system.conf", "/etc/systemd/journald.conf")
HOST_TREES = ("/etc/systemd/system", "/opt", "/var/lib/systemd", "/run/systemd/system")


def _listing(root: str, depth: int = 3) -> list[str]:
    out: list[str] = []
    base = len(Path(root).parts)
    for dirpath, dirnames, filenames in os.walk(root):
        if len(Path(dirpath).parts) - base >= depth:
            dirnames[:] = []
        out += [os.path.join(dirpath, n) for n in sorted(dirnames + filenames)]
    return sorted(out)


def host_snapshot() -> dict[str, Any]:
    """What the tests must leave exactly as they found it on the host."""
    snap: dict[str, Any] = {}
    for f in HOST_FILES:
        try:
            snap[f] = hashlib.sha256(Path(f).read_bytes()).hexdigest()
        except OSError as e:
            snap[f] = f"unreadable: {e.strerror}"
    for t in HOST_TREES:
        snap[t] = _listing(t)
    snap["/etc/nika exists"] = os.path.exists("/etc/nika")
    snap["core files in /"] = sorted(n for n in os.listdir("/") if n.startswith("core"))
    snap["nika user"] = _has_user("nika")
    snap["host processes"] = sorted(_host_service_processes())
    parent = cgroup2_root()
    # Only this run's namespaces (Namespace.boot names them after our pid): another session's
    # systemd tier may boot and tear down its own at the same time on a shared machine.
    ours = f"nika-systemd-test-{os.getpid()}-"
    snap["test cgroups"] = sorted(p.name for p in parent.iterdir()
                                  if p.name.startswith(ours)) if parent else []
    return snap


def _has_user(name: str) -> bool:
    with open("/etc/passwd") as f:
        return any(line.split(":", 1)[0] == name for line in f)


def _host_service_processes() -> Iterator[str]:
    """Service processes in the host's own PID namespace that a leaky namespace would start
    or leave behind: systemd, journald, dbus, postgres. (The supervisor and the stand-in are
    not listed: other test tiers run them on the host at the same time.)"""
    mine = os.readlink("/proc/self/ns/pid")
    names = ("systemd", "systemd-journal", "dbus-daemon", "postgres")
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{d}/ns/pid") != mine:
                continue  # a namespace of somebody else's: not the host's business
            comm = Path(f"/proc/{d}/comm").read_text().strip()
            if comm in names:
                yield f"{d} {comm}"


def wait_monotonic(seconds: float) -> None:
    """Let time pass on purpose: for negative checks (something must NOT happen meanwhile),
    never as a wait for something to happen (use poll_for)."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        time.sleep(min(0.2, left))


# Numbers the issue asks to report, printed in the terminal summary by conftest.py.
MEASUREMENTS: dict[str, float | int] = {}
