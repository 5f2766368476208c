"""Between the group policy (cluster/group.py) and the node policy (policy.py): the group's
decisions become the node policy's events, and the group view becomes a line of STATUS.
A translation only: what each decision means for this node's vLLM is decided in policy.py.
"""

from __future__ import annotations

from typing import Any

from nika_supervisor.cluster import group
from nika_supervisor.events import Event, GroupFailed, GroupReady, RankStart, RankStop
from nika_supervisor.failures import Failure

GROUP_HINT = ("a rank of the group failed or was lost; `nika-supervisor status` on each node "
              "names the ranks, and that node's journal says why")


def node_event(d: group.Decision) -> Event | None:
    """The node policy's event for one of the group policy's local decisions (None: a Note,
    which is logged, or AskGroupRestart, which the agent sends itself)."""
    match d:
        case group.RestartGroup(cause=cause, rank=rank):
            return GroupFailed(Failure(f"group restart: {cause}", GROUP_HINT, code="cluster"),
                               rank)
        case group.StartRank(epoch=epoch):
            return RankStart(epoch)
        case group.StopRank(cause=cause):
            return RankStop(cause)
        case group.ReadyChanged(ready=ready, reason=reason):
            return GroupReady(ready, reason)
    return None


def group_text(view: dict[str, Any]) -> str:
    """One line of STATUS naming the whole group: epoch, each rank's phase, the last failure."""
    ranks = ", ".join(f"{r['rank']} {r['phase']}" + (f" (epoch {r['epoch']})"
                                                      if r["epoch"] != view["epoch"] else "")
                      for r in view["ranks"])
    text = f"group epoch {view['epoch']}, ranks: {ranks}"
    f = view.get("last_failure")
    if f:
        text += f"; last group failure (epoch {f['epoch']}): {f['cause']}"
    return text
