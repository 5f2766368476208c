"""The doctor's checks for a `cluster:` section (issue 12), in the order they run:

- `cluster.token`: cluster.token_file exists, is readable and non-empty (warn when group or
  others may read it);
- `cluster.peer.R`: each other node's control endpoint answers GET /cluster/status with this
  node's token, within a deadline (all peers are asked at once);
- `cluster.model`, `cluster.vllm_version`: what the peers that answered report
  (cluster/identity.py on their side) equals this node's vllm.model and installed vLLM version;
- `cluster.nccl_ifname`, `cluster.gloo_ifname`: NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME name
  interfaces this node has; unset, vLLM guesses (a warning with the interface toward
  master_addr as the hint).

A separate module so that doctor.py stays one screenful per concern; doctor imports it when a
config has a `cluster:` section (it imports Check and Status from doctor, hence not at the top
of doctor.py).
"""

from __future__ import annotations

import ipaddress
import os
import socket
import stat
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nika_supervisor.cluster.endpoint import ControlClient, PeerError, Reply
from nika_supervisor.cluster.token import Token
from nika_supervisor.config import ClusterConfig, Config
from nika_supervisor.doctor import Check, Status


@dataclass(frozen=True, slots=True)
class PeerAnswer:
    rank: int
    address: tuple[str, int]
    reply: Reply | PeerError
    elapsed_s: float

    @property
    def where(self) -> str:
        host, port = self.address
        return f"rank {self.rank} at {f'[{host}]' if ':' in host else host}:{port}"

    @property
    def body(self) -> dict[str, Any] | None:
        """The status body of a peer that answered 200, else None."""
        return self.reply.body if isinstance(self.reply, Reply) and self.reply.status == 200 \
            else None


def check_token(cluster: ClusterConfig) -> tuple[Check, Token | None]:
    path = cluster.token_file
    try:
        mode = os.stat(path).st_mode
        secret = Path(path).read_bytes().strip()
    except FileNotFoundError:
        return Check("cluster.token", Status.FAIL, f"{path} does not exist",
                     f"put the group's shared secret there, the same on every node "
                     f"(`umask 077; openssl rand -hex 32 > {path}` on one, then copy it)"), None
    except OSError as e:
        return Check("cluster.token", Status.FAIL, f"{path} cannot be read: {e.strerror}",
                     "make it a file readable by the service's user (and run doctor as that "
                     "user or root)"), None
    if not secret:
        return Check("cluster.token", Status.FAIL, f"{path} is empty",
                     "write the group's shared secret into it, the same on every node"), None
    token = Token(secret)
    if mode & 0o077:
        return Check("cluster.token", Status.WARN, f"{path} is open to group/others "
                     f"(mode {stat.S_IMODE(mode):04o})",
                     f"chmod 600 {path} (owned by the service's user)"), token
    return Check("cluster.token", Status.OK,
                 f"{path} is present, non-empty, mode {stat.S_IMODE(mode):04o}"), token


def ask_peers(cluster: ClusterConfig, token: Token, timeout: float) -> list[PeerAnswer]:
    """GET /cluster/status from every other node at once; done within about `timeout`."""
    client = ControlClient(token, connect_timeout=timeout, deadline=timeout)
    others = [(r, a) for r, a in enumerate(cluster.peers) if r != cluster.node_rank]

    def ask(rank: int, address: tuple[str, int]) -> PeerAnswer:
        t0 = time.monotonic()
        reply = client.status(address)
        return PeerAnswer(rank, address, reply, time.monotonic() - t0)

    if not others:
        return []
    with ThreadPoolExecutor(max_workers=len(others), thread_name_prefix="doctor-peer") as pool:
        return list(pool.map(lambda ra: ask(*ra), others))


def check_peer(a: PeerAnswer) -> Check:
    name = f"cluster.peer.{a.rank}"
    data = {"rank": a.rank, "address": f"{a.address[0]}:{a.address[1]}",
            "elapsed_s": round(a.elapsed_s, 3)}
    if isinstance(a.reply, PeerError):
        if a.reply.error.startswith("401"):
            fix = "give every node the same cluster.token_file content"
        else:
            fix = (f"start nika-supervisor on rank {a.rank}, check that cluster.peers[{a.rank}] "
                   "is its control address, and that this node can reach it (firewall, route)")
        return Check(name, Status.FAIL, f"{a.where}: {a.reply.error}", fix,
                     {**data, "error": a.reply.error})
    if a.reply.status != 200:
        err = str(a.reply.body.get("error", ""))[:100]
        return Check(name, Status.FAIL, f"{a.where}: HTTP {a.reply.status}"
                     + (f" ({err})" if err else ""),
                     f"check that cluster.peers[{a.rank}] is that node's control address",
                     {**data, "status": a.reply.status})
    body = a.reply.body
    phase = f", phase {body['phase']}" if isinstance(body.get("phase"), str) else ""
    return Check(name, Status.OK,
                 f"{a.where} answers ({a.elapsed_s * 1000:.0f} ms{phase})", data=data)


def _compare(name: str, what: str, local: str | None, key: str,
             answers: list[PeerAnswer], fix: str) -> Check:
    """One value that must be the same on every node: this node's against each peer's."""
    answered = [(a, a.body) for a in answers if a.body is not None]
    unreached = [a.rank for a in answers if a.body is None]
    also = f"; not compared with rank {', '.join(map(str, unreached))} (unreachable)" \
        if unreached else ""
    data: dict[str, Any] = {"local": local,
                            **{f"rank{a.rank}": b.get(key) for a, b in answered}}
    if not answered:
        return Check(name, Status.WARN, "not compared: no peer answered (see cluster.peer.*)",
                     "make the peers reachable first", data)
    different = [(a, b[key]) for a, b in answered
                 if isinstance(b.get(key), str) and local is not None and b[key] != local]
    if different:
        them = "; ".join(f"{a.where} has {v}" for a, v in different)
        return Check(name, Status.FAIL, f"{what}: this node has {local}, {them}", fix, data)
    unknown = [a.where for a, b in answered if not isinstance(b.get(key), str)]
    if local is None:
        return Check(name, Status.WARN, f"{what} of this node is unknown: not compared",
                     "see the vllm check", data)
    if unknown:
        return Check(name, Status.WARN, f"{what}: unknown on {', '.join(unknown)} "
                     f"(this node has {local}){also}",
                     "run the same nika-supervisor and a vLLM with package metadata there", data)
    ranks = ", ".join(str(a.rank) for a, _ in answered)
    return Check(name, Status.OK, f"{what} {local}, the same on rank {ranks}{also}", data=data)


def check_same(cfg: Config, local_version: str | None, answers: list[PeerAnswer]) -> list[Check]:
    return [
        _compare("cluster.model", "model", cfg.vllm.model, "model", answers,
                 "set the same vllm.model on every node (the ranks load one model together)"),
        _compare("cluster.vllm_version", "vLLM", local_version, "vllm_version", answers,
                 "install the same vLLM release on every node"),
    ]


# -- network interfaces -----------------------------------------------------------------------


def route_iface(addr: str, route_path: str = "/proc/net/route") -> str | None:
    """The interface of the most specific non-default IPv4 route to `addr` (None: unknown,
    IPv6, or only the default route, which is rarely the cluster network)."""
    try:
        ip = ipaddress.ip_address(addr)
        lines = Path(route_path).read_text().splitlines()[1:]
    except (ValueError, OSError):
        return None
    if ip.version != 4:
        return None
    target = int.from_bytes(socket.inet_aton(str(ip)), "little")  # the file's byte order
    best: tuple[int, int, str] | None = None  # (-prefix length, metric, iface)
    for line in lines:
        f = line.split()
        try:
            iface, dest, flags, metric, mask = f[0], int(f[1], 16), int(f[3], 16), int(f[6]), \
                int(f[7], 16)
        except (IndexError, ValueError):
            continue
        if not flags & 1 or mask == 0 or target & mask != dest:
            continue
        key = (-mask.bit_count(), metric, iface)
        best = key if best is None or key < best else best
    return best[2] if best else None


def _operstate(net_dir: str, iface: str) -> str:
    try:
        return Path(net_dir, iface, "operstate").read_text().strip()
    except OSError:
        return "unknown"


def _judge_ifname(var: str, value: str, present: list[str], net_dir: str,
                  nccl: bool) -> tuple[Status, str]:
    """(status, what is wrong or what it selects) for one *_SOCKET_IFNAME value."""
    v = value.strip()
    if not nccl and v[:1] in ("^", "="):
        return Status.FAIL, "Gloo takes interface names, not NCCL's ^ or = prefixes"
    exclude = nccl and v.startswith("^")
    v = v[1:] if exclude else v
    exact = not nccl or v.startswith("=")
    v = v[1:] if nccl and v.startswith("=") else v
    # NCCL entries may carry a port (eth0:5000); the name is before the colon.
    names = [n.strip().split(":")[0] if nccl else n.strip() for n in v.split(",")]
    names = [n for n in names if n]
    if not names:
        return Status.FAIL, "names no interface"

    def matches(iface: str, n: str) -> bool:
        return iface == n if exact else iface.startswith(n)

    if exclude:
        left = [i for i in present if not any(matches(i, n) for n in names)]
        if not [i for i in left if i != "lo"]:
            return Status.FAIL, f"excludes every interface but lo (present: {', '.join(present)})"
        return Status.OK, f"NCCL chooses among {', '.join(left)}"
    found = {n: [i for i in present if matches(i, n)] for n in names}
    missing = [n for n, hit in found.items() if not hit]
    kind = "interface" if exact else "interface starting with"
    if missing and (len(missing) == len(names) or not nccl):  # Gloo needs every one
        return Status.FAIL, (f"no {kind} {', '.join(missing)} on this node "
                             f"(present: {', '.join(present) or 'none'})")
    if missing:
        return Status.WARN, f"no {kind} {', '.join(missing)} on this node (the others match)"
    chosen = sorted({i for hit in found.values() for i in hit})
    down = [i for i in chosen if _operstate(net_dir, i) == "down"]
    if down:
        return Status.WARN, f"{', '.join(down)} is down"
    return Status.OK, f"{', '.join(chosen)} present"


def check_ifnames(cfg: Config, env: Mapping[str, str], net_dir: str = "/sys/class/net",
                  route_path: str = "/proc/net/route") -> list[Check]:
    cluster = cfg.cluster
    assert cluster is not None
    try:
        present = sorted(os.listdir(net_dir))
    except OSError:
        present = []
    toward = route_iface(cluster.master_addr, route_path)
    hint_iface = (f"{toward} (the interface toward master_addr {cluster.master_addr})"
                  if toward else f"the cluster interface (`ip -o route get "
                  f"{cluster.master_addr}` names it)")
    in_cfg = cfg.vllm.env_dict
    out = []
    for var, lib, nccl in (("NCCL_SOCKET_IFNAME", "NCCL", True),
                           ("GLOO_SOCKET_IFNAME", "Gloo", False)):
        name = f"cluster.{lib.lower()}_ifname"
        value = env.get(var, "")
        if not value.strip():
            out.append(Check(name, Status.WARN, f"{var} is unset: vLLM and {lib} will guess the "
                             "interface (it may be a management or container network)",
                             f"set vllm.env.{var}: {hint_iface}", {"suggested": toward}))
            continue
        where = "vllm.env" if var in in_cfg else "the environment"
        status, detail = _judge_ifname(var, value, present, net_dir, nccl)
        fix = "" if status is Status.OK else f"set vllm.env.{var}: {hint_iface}"
        out.append(Check(name, status, f"{var}={value} ({where}): {detail}", fix,
                         {"value": value, "interfaces": present, "suggested": toward}))
    return out


def cluster_checks(cfg: Config, env: Mapping[str, str], local_version: str | None, *,
                   peer_timeout: float, net_dir: str, route_path: str) -> list[Check]:
    """All of the above for a config with a `cluster:` section."""
    cluster = cfg.cluster
    assert cluster is not None
    token_check, token = check_token(cluster)
    out = [token_check]
    if token is None:
        out.append(Check("cluster.peer", Status.WARN, "peers not asked: no usable token",
                         "fix cluster.token first"))
    else:
        answers = ask_peers(cluster, token, peer_timeout)
        out += [check_peer(a) for a in answers]
        out += check_same(cfg, local_version, answers)
    out += check_ifnames(cfg, env, net_dir, route_path)
    return out
