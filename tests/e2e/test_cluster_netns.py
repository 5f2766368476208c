"""Two "nodes" as two network namespaces joined by a veth pair (issue 12): the control endpoints
of the two supervisors talk across the link with the token; a wrong token is refused and
logged with the peer's address; each endpoint is bound only to its node's cluster address;
with the link down a call returns an error by its deadline, and works again once it is up.

Needs root and iproute2 (`ip netns`); under CI it fails if it cannot run (tests/helpers/tier.py).
It runs no vLLM: the two vLLM ranks forming a TP=2 group across the same kind of link was
verified by hand (docs/ARCHITECTURE.md, "Multi-node (issue 12, design)").
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from helpers.netns import ip, linked_namespaces
from helpers.tier import cannot_run
from helpers.wait import poll_for

pytestmark = pytest.mark.e2e

TIER = "the e2e tier (two network namespaces)"
NODE = str(Path(__file__).with_name("cluster_node.py"))
SECRET = "cluster-token-e2e-7f3a"
PORT = 1108


@dataclass
class Node:
    ns: str
    dev: str
    ip: str
    out: Path
    proc: subprocess.Popen[bytes] | None = None

    def lines(self) -> list[dict[str, Any]]:
        out = []
        for line in self.out.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out

    def call(self, what: str, peer: str, token: Path, deadline: float = 3.0
             ) -> dict[str, Any]:
        r = subprocess.run(["ip", "netns", "exec", self.ns, sys.executable, NODE, what, peer,
                            str(token), str(deadline)], capture_output=True, text=True,
                           timeout=deadline + 30)
        assert r.returncode == 0, r.stderr
        result: dict[str, Any] = json.loads(r.stdout)
        return result


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[tuple[Node, Node, Path]]:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        cannot_run(TIER, "needs root and iproute2 (ip netns)")
    tag = f"nkt{os.getpid() % 100000}"
    a = Node(f"{tag}a", f"{tag}va", "10.77.0.1", tmp_path / "a.out")
    b = Node(f"{tag}b", f"{tag}vb", "10.77.0.2", tmp_path / "b.out")
    token = tmp_path / "token"
    token.write_text(SECRET + "\n")
    token.chmod(0o600)
    with linked_namespaces((a.ns, b.ns), (a.dev, b.dev), (a.ip, b.ip)):
        try:
            for rank, n in enumerate((a, b)):
                n.proc = subprocess.Popen(
                    ["ip", "netns", "exec", n.ns, sys.executable, NODE, "serve",
                     f"{n.ip}:{PORT}", str(token), str(rank), "2"],
                    stdout=n.out.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
            for n in (a, b):
                poll_for(lambda n=n: any("listening" in x for x in n.lines()),  # type: ignore[misc]
                         30, f"{n.ns}'s control endpoint to listen")
            yield a, b, token
        finally:
            for n in (a, b):
                if n.proc is not None:
                    os.killpg(n.proc.pid, signal.SIGTERM)
                    try:
                        n.proc.wait(10)
                    except subprocess.TimeoutExpired:
                        os.killpg(n.proc.pid, signal.SIGKILL)
                        n.proc.wait(10)
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert tag not in left, f"namespaces left behind: {left}"


def test_control_endpoints_across_a_veth_link(nodes: tuple[Node, Node, Path],
                                              tmp_path: Path) -> None:
    a, b, token = nodes
    head, worker = f"{a.ip}:{PORT}", f"{b.ip}:{PORT}"

    # Status both ways, with the token, across the link.
    got = b.call("status", head, token)
    assert (got["type"], got["status"], got["body"]["node_rank"]) == ("Reply", 200, 0)
    assert [r["rank"] for r in got["body"]["ranks"]] == [0, 1]
    got = a.call("status", worker, token)
    assert (got["type"], got["body"]["node_rank"], got["body"]["phase"]) == ("Reply", 1, "down")

    # "Restart the group" from the worker reaches the head, with the worker's address.
    got = b.call("restart", head, token)
    assert got == {"type": "Reply", "status": 200, "body": {"accepted": True}}
    restarts = [x["restart"] for x in a.lines() if "restart" in x]
    assert [(r["epoch"], r["rank"], r["cause"]) for r in restarts] == [
        (1, 1, "rank 1: exited (SIGKILL)")]
    assert restarts[0]["peer"].startswith(f"{b.ip}:")

    # A wrong token: refused, logged on the head with the worker's address, never the token.
    wrong = tmp_path / "wrong"
    wrong.write_text("not-" + SECRET)
    got = b.call("restart", head, wrong)
    assert got["type"] == "PeerError" and got["error"].startswith("401 refused")
    refused = [x for x in a.lines() if x.get("event") == "cluster.control_refused"]
    assert [(r["reason"], r["status"]) for r in refused] == [("bad token", 401)]
    assert refused[0]["peer"].startswith(f"{b.ip}:")
    assert len([x for x in a.lines() if "restart" in x]) == 1  # it changed nothing
    assert SECRET not in a.out.read_text() + b.out.read_text()

    # Bound only to the cluster address: not on the node's own loopback.
    got = a.call("status", f"127.0.0.1:{PORT}", token)
    assert got == {"type": "PeerError", "error": "connection refused"}

    # Link down: the call returns an error by its deadline; link up: it answers again.
    ip("-n", a.ns, "link", "set", a.dev, "down")
    got = b.call("status", head, token, deadline=1.0)
    assert got["type"] == "PeerError" and got["error"] in (
        "timed out", "network error: No route to host", "network error: Network is unreachable")
    ip("-n", a.ns, "link", "set", a.dev, "up")
    poll_for(lambda: b.call("status", head, token, deadline=1.0)["type"] == "Reply", 30,
             "the head to answer again once the link is up")
