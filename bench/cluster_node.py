"""One node of bench/cluster_netns.py: a minimal stand-in for the daemon wired to the group
protocol (issue 12), until supervisor.py is: a ClusterAgent plus this node's real vLLM rank,
started from the config by command.build_launch, run inside the node's network namespace.

It carries out the agent's decisions in queue order (RestartGroup: stop and start again;
StartRank; StopRank), reports its rank's exits as LocalGone with the instance's epoch, and on
the head probes the alias with a 1-token completion every 2 s. Each event is a JSON line on
stdout with a wall-clock `t`, which the driver reads for its timings.

Usage: python bench/cluster_node.py CONFIG VLLM_LOG
"""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

from nika_supervisor.cluster import group
from nika_supervisor.cluster.agent import ClusterAgent
from nika_supervisor.cluster.endpoint import ControlClient
from nika_supervisor.cluster.token import Token
from nika_supervisor.command import build_launch
from nika_supervisor.config import load_config


def out(**fields: object) -> None:
    print(json.dumps({"t": round(time.time(), 2), **fields}), flush=True)


class Node:
    def __init__(self, config: str, vllm_log: str) -> None:
        self.cfg = load_config(config)
        c = self.cfg.cluster
        assert c is not None, "the config needs a cluster: section"
        self.c = c
        self.vllm_log = vllm_log
        token = Token.from_file(c.token_file)
        self.agent = ClusterAgent(c, token, time.monotonic,
                                  timing=group.Timing(unreachable_after=10.0), poll_interval=1.0,
                                  client=ControlClient(token, 1.0, 2.0),
                                  epoch_base=int(time.time()) if c.is_head else 0).start()
        self.proc: subprocess.Popen[bytes] | None = None
        self.proc_epoch = 0
        self.running = True
        self.last_probe = 0.0

    def start(self, epoch: int) -> None:
        spec = build_launch(self.cfg)
        self.proc = subprocess.Popen(list(spec.argv), env=dict(spec.env),
                                     stdout=open(self.vllm_log, "ab"),  # noqa: SIM115
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.agent.feed(group.LocalStarted(time.monotonic(), epoch))
        self.proc_epoch = self.agent.state.local_epoch or 0 if self.c.is_head else epoch
        out(ev="spawned", pid=self.proc.pid, epoch=self.proc_epoch)

    def stop(self, why: str) -> None:
        p, self.proc = self.proc, None
        if p is None:
            return
        os.killpg(p.pid, signal.SIGTERM)
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        out(ev="stopped", why=why)
        self.agent.feed(group.LocalGone(time.monotonic(), "stopped", self.proc_epoch))

    def probe(self) -> bool:
        v = self.cfg.vllm
        body = json.dumps({"model": v.alias, "prompt": "hi", "max_tokens": 1}).encode()
        req = urllib.request.Request(f"http://{v.host}:{v.port}/v1/completions", body,
                                     {"content-type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def turn(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            rc, self.proc = self.proc.returncode, None
            out(ev="exited", rc=rc)
            self.agent.feed(group.LocalGone(time.monotonic(), f"exited ({rc})", self.proc_epoch))
            if self.c.is_head:
                self.start(0)  # the daemon's restart policy, with no backoff here
        while not self.agent.decisions.empty():
            d = self.agent.decisions.get()
            out(ev=type(d).__name__, **{k: getattr(d, k) for k in d.__slots__})
            if isinstance(d, group.RestartGroup):
                self.stop("group restart")
                self.start(0)
            elif isinstance(d, group.StartRank):
                self.start(d.epoch)
            elif isinstance(d, group.StopRank):
                self.stop(d.cause)
        if self.c.is_head and self.proc is not None and time.monotonic() - self.last_probe > 2:
            self.last_probe = time.monotonic()
            self.agent.feed(group.AliasAnswered(time.monotonic(), self.probe()))

    def run(self) -> None:
        signal.signal(signal.SIGTERM, lambda *_: setattr(self, "running", False))
        if self.c.is_head:
            self.start(0)
        while self.running:
            self.turn()
            time.sleep(0.2)
        self.stop("shutdown")
        self.agent.stop()
        out(ev="bye")


if __name__ == "__main__":
    Node(sys.argv[1], sys.argv[2]).run()
