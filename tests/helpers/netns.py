"""Two "nodes" as two network namespaces joined by a veth pair, for the tiers that need them
(tests/e2e/test_cluster_netns.py, test_cluster_supervised.py, tests/systemd/test_cluster_units.py).
Needs root and iproute2; the namespaces are deleted on the way out, whatever happened inside.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@contextmanager
def linked_namespaces(names: Sequence[str], devs: Sequence[str],
                      addrs: Sequence[str]) -> Iterator[None]:
    """Namespaces names[0] and names[1], joined by the veth pair devs[0] <-> devs[1], each end
    up with its address addrs[i]/24, loopback up."""
    made: list[str] = []
    try:
        for name in names:
            ip("netns", "add", name)
            made.append(name)
        ip("link", "add", devs[0], "type", "veth", "peer", "name", devs[1])
        for name, dev, addr in zip(names, devs, addrs, strict=True):
            ip("link", "set", dev, "netns", name)
            ip("-n", name, "addr", "add", f"{addr}/24", "dev", dev)
            ip("-n", name, "link", "set", dev, "up")
            ip("-n", name, "link", "set", "lo", "up")
        yield
    finally:
        for name in made:
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
