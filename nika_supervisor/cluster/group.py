"""The group policy: when a vLLM group across nodes restarts, and when it is READY (issue 12).

About 450 lines, one piece: the head's and the worker's steps answer each other (epochs,
restarts, READY), and reading them side by side is how the protocol is checked.

Pure: no I/O, no clock. The daemon feeds events (each carries `now`) into `head_step` or
`worker_step` with the current state and carries out the decisions it gets back. States,
events and decisions are small frozen dataclasses, so a scripted history is a test.

The protocol (docs/ARCHITECTURE.md, "Multi-node (issue 12, design)"):
- The head (rank 0) owns the group epoch and bumps it each time its own vLLM rank starts.
- A worker starts its rank only for the head's current epoch, and only while the head says
  that epoch is `starting` (its rank is up and waiting for the others to join).
- A worker stops its rank when the head's epoch moves past the one it runs (the group it
  belonged to is gone), and when the head has been unreachable past `unreachable_after`
  (a rank of a group nobody can reach must not keep holding memory).
- A worker whose rank dies (or that has no rank while the head runs the current epoch) asks
  the head to restart the group; the head restarts it for a request about its current epoch,
  without waiting for a request to fail. Requests about an older epoch are stale and ignored.
- The head restarts the group too when a worker stays unreachable past `unreachable_after`,
  once per epoch, so that the group re-forms by itself when the link comes back.
- READY on the head: its rank runs, the alias answers, and every worker reports its rank
  running for the current epoch. READY on a worker: its rank runs for the current epoch and
  the head reports that epoch READY.

Restarting the head's own rank goes through the daemon's existing restart policy (backoff,
budget): `RestartGroup` is for the daemon a failure of its local vLLM with that cause.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

# Phases a node reports for its rank (STATUS and GET /cluster/status).
DOWN = "down"  # no rank running on this node
STARTING = "starting"  # rank running for `epoch`, group not yet formed
READY = "ready"  # rank running for `epoch`, group formed and (head) answering
UNREACHABLE = "unreachable"  # (in a view of a peer) no answer past the deadline
UNKNOWN = "unknown"  # (in a view of a peer) not heard from yet


# -- state ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GroupFailure:
    at: float
    epoch: int
    rank: int  # the rank whose failure it was
    cause: str  # e.g. "rank 1: exited (SIGKILL)", "rank 1 unreachable for 15s"


@dataclass(frozen=True, slots=True)
class RankView:
    rank: int
    phase: str = UNKNOWN
    epoch: int = 0
    last_seen: float | None = None
    error: str | None = None  # the last poll's error, while it is failing


@dataclass(frozen=True, slots=True)
class GroupState:
    """One node's view of the group. `ranks` holds every rank, this node's own included."""

    node_rank: int
    epoch: int  # head: the group epoch; worker: the head's epoch as last seen
    ranks: tuple[RankView, ...]
    since: float  # when this node's view started (the deadline's origin before any answer)
    local_epoch: int | None = None  # the epoch this node's rank runs for; None: no rank
    alias_ok: bool = False  # head: the alias answered a completion for this epoch
    ready: bool = False
    last_failure: GroupFailure | None = None
    restart_sent_for: int = 0  # the epoch whose restart this node already asked for / decided
    formed: bool = False  # head: the current epoch's group has been READY

    @property
    def phase(self) -> str:
        # A head whose group restart is decided reports DOWN at once: a worker must not
        # start a rank for an epoch that is going away (its rank could never join it).
        if self.local_epoch is None or (self.node_rank == 0
                                        and self.restart_sent_for == self.epoch):
            return DOWN
        return READY if self.ready else STARTING

    def view(self, rank: int) -> RankView:
        return self.ranks[rank]


def initial(nnodes: int, node_rank: int, now: float, epoch_base: int = 0) -> GroupState:
    """A node's view at its daemon's start. The head's first start makes epoch_base + 1: the
    daemon must pass a base above any epoch of its previous life (a counter kept in the state
    directory, or the wall clock in whole seconds at start), so that a worker's request about
    an epoch of a previous head daemon can never match a new one."""
    ranks = tuple(RankView(r, DOWN if r == node_rank else UNKNOWN) for r in range(nnodes))
    return GroupState(node_rank=node_rank, epoch=epoch_base, ranks=ranks, since=now)


# -- events -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LocalStarted:
    """The daemon started this node's vLLM rank (worker: for the epoch it was told)."""

    now: float
    epoch: int = 0  # worker: the epoch of the StartRank it carried out; head: ignored


@dataclass(frozen=True, slots=True)
class LocalGone:
    """This node's rank ended or was found failed (exit, hang, GPU fault): `cause` says which.
    Also sent after a StopRank was carried out (then it changes nothing).

    `epoch` names the instance that ended: the epoch it was started for (a worker: its
    StartRank's; the head: `state.local_epoch` right after its LocalStarted). The end of an
    earlier instance, reported after a newer one was decided, changes nothing: without it, a
    slow stop that finished after the next StartRank looked like the new rank dying (seen with
    real vLLM ranks: a worker's 8 s stop caused two needless group restarts)."""

    now: float
    cause: str
    epoch: int


@dataclass(frozen=True, slots=True)
class AliasAnswered:
    """Head only: the readiness probe (a completion through the alias) answered, or not."""

    now: float
    ok: bool


@dataclass(frozen=True, slots=True)
class PeerSeen:
    """A peer's GET /cluster/status answered."""

    now: float
    rank: int
    epoch: int
    phase: str
    failure: GroupFailure | None = None  # the peer's last group failure (`at` is our `now`)


@dataclass(frozen=True, slots=True)
class PeerFailed:
    """A peer's GET /cluster/status failed: refused, timed out, garbage, 401."""

    now: float
    rank: int
    error: str


@dataclass(frozen=True, slots=True)
class RestartAsked:
    """An authenticated POST /cluster/restart arrived from `rank`, about `epoch`."""

    now: float
    rank: int
    epoch: int
    cause: str


@dataclass(frozen=True, slots=True)
class Tick:
    now: float


Event = LocalStarted | LocalGone | AliasAnswered | PeerSeen | PeerFailed | RestartAsked | Tick


# -- decisions --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RestartGroup:
    """Head: restart the group. The daemon stops its rank and starts it again through its
    restart policy; the start bumps the epoch (LocalStarted), which every worker follows."""

    cause: str
    rank: int


@dataclass(frozen=True, slots=True)
class StartRank:
    """Worker: start this node's rank for `epoch` (the head's rank is up and waiting)."""

    epoch: int


@dataclass(frozen=True, slots=True)
class StopRank:
    """Worker: stop this node's rank (its group is gone, or the head cannot be reached)."""

    cause: str


@dataclass(frozen=True, slots=True)
class AskGroupRestart:
    """Worker: POST /cluster/restart to the head about `epoch` (this node's rank is gone)."""

    epoch: int
    cause: str


@dataclass(frozen=True, slots=True)
class ReadyChanged:
    ready: bool
    reason: str


@dataclass(frozen=True, slots=True)
class Note:
    """Log `event` with `fields`: what the group policy saw (a new epoch, a peer lost or back,
    a restart asked for). The daemon logs it like its own events."""

    event: str
    level: str
    fields: tuple[tuple[str, object], ...] = ()


def note(event: str, level: str = "info", **fields: object) -> Note:
    return Note(event, level, tuple(fields.items()))


Decision = RestartGroup | StartRank | StopRank | AskGroupRestart | ReadyChanged | Note


@dataclass(frozen=True, slots=True)
class Timing:
    unreachable_after: float = 15.0  # a peer silent this long is unreachable


# -- shared helpers ---------------------------------------------------------------------------


def _set_rank(s: GroupState, rank: int, **changes: object) -> GroupState:
    ranks = list(s.ranks)
    ranks[rank] = replace(ranks[rank], **changes)  # type: ignore[arg-type]
    return replace(s, ranks=tuple(ranks))


def _own(s: GroupState) -> GroupState:
    return _set_rank(s, s.node_rank, phase=s.phase, epoch=s.local_epoch or 0)


def _silent_for(s: GroupState, rank: int, now: float) -> float:
    seen = s.ranks[rank].last_seen
    return now - (seen if seen is not None else s.since)


def _with_ready(s: GroupState, ready: bool, reason: str,
                out: list[Decision]) -> GroupState:
    if ready != s.ready:
        out.append(ReadyChanged(ready, reason))
        s = replace(s, ready=ready, formed=s.formed or ready)
    return _own(s)


def _peer_seen(s: GroupState, e: PeerSeen, out: list[Decision]) -> GroupState:
    if s.ranks[e.rank].phase == UNREACHABLE:
        out.append(note("cluster.peer_back", rank=e.rank,
                        silent_s=round(_silent_for(s, e.rank, e.now), 1), epoch=e.epoch,
                        phase=e.phase))
    return _set_rank(s, e.rank, phase=e.phase, epoch=e.epoch, last_seen=e.now, error=None)




def _mark_unreachable(s: GroupState, rank: int, now: float, t: Timing,
                      out: list[Decision]) -> GroupState:
    """A peer silent past the deadline becomes UNREACHABLE (logged once, when it does)."""
    silent = _silent_for(s, rank, now)
    if s.ranks[rank].phase == UNREACHABLE or silent < t.unreachable_after:
        return s
    out.append(note("cluster.peer_unreachable", "warning", rank=rank, silent_s=round(silent, 1),
                    error=s.ranks[rank].error))
    return _set_rank(s, rank, phase=UNREACHABLE)


# -- the head ---------------------------------------------------------------------------------


def head_step(s: GroupState, e: Event, t: Timing) -> tuple[GroupState, list[Decision]]:
    out: list[Decision] = []
    if isinstance(e, LocalStarted):
        epoch = s.epoch + 1
        s = replace(s, epoch=epoch, local_epoch=epoch, alias_ok=False, formed=False)
        out.append(note("cluster.epoch", epoch=epoch))
        return _with_ready(s, False, f"group epoch {epoch} starting", out), out
    if isinstance(e, LocalGone):
        if e.epoch != s.local_epoch:
            return s, out  # an earlier instance's end, or no rank at all: nothing changes
        if s.restart_sent_for != s.epoch:
            s = replace(s, last_failure=GroupFailure(e.now, s.epoch, 0, f"rank 0: {e.cause}"))
        s = replace(s, local_epoch=None, alias_ok=False)
        return _with_ready(s, False, f"rank 0: {e.cause}", out), out
    if isinstance(e, AliasAnswered):
        s = replace(s, alias_ok=e.ok and s.local_epoch is not None)
    elif isinstance(e, PeerSeen):
        s = _peer_seen(s, e, out)
        # Once this epoch's group has formed, a rank that is not in it (down, or running
        # another epoch: its daemon restarted) can never join it again: restart the group.
        if s.formed and s.local_epoch is not None and (e.phase == DOWN or e.epoch != s.epoch):
            why = ("reports its rank down" if e.phase == DOWN
                   else f"runs epoch {e.epoch}, not {s.epoch}")
            s, out = _restart(s, e.now, e.rank, f"rank {e.rank}: {why}", out)
    elif isinstance(e, PeerFailed):
        s = _set_rank(s, e.rank, error=e.error)  # UNREACHABLE, if due, is marked below
    elif isinstance(e, RestartAsked) and e.epoch == s.epoch and s.local_epoch is not None:
        s, out = _restart(s, e.now, e.rank, f"rank {e.rank}: {e.cause}", out)
    now = e.now
    for v in s.ranks[1:]:
        s = _mark_unreachable(s, v.rank, now, t, out)
    # Only a rank that had joined this epoch restarts it by going silent: one that never
    # joined (a partition at start) is waited for, and joins when it comes back; restarting
    # for it would loop once per deadline for as long as the link is down.
    late = [v for v in s.ranks[1:] if v.phase == UNREACHABLE and v.epoch == s.epoch]
    if late and s.local_epoch is not None:
        silent = int(_silent_for(s, late[0].rank, now))
        s, out = _restart(s, now, late[0].rank,
                          f"rank {late[0].rank} unreachable for {silent}s", out)
    joined = all(v.epoch == s.epoch and v.phase in (STARTING, READY) for v in s.ranks[1:])
    ready = s.local_epoch is not None and s.alias_ok and joined and s.restart_sent_for != s.epoch
    return _with_ready(s, ready, _head_reason(s, joined), out), out


def _restart(s: GroupState, now: float, rank: int, cause: str,
             out: list[Decision]) -> tuple[GroupState, list[Decision]]:
    """Decide one group restart per epoch; later causes for the same epoch add nothing."""
    if s.restart_sent_for == s.epoch:
        return s, out
    out.append(RestartGroup(cause, rank))
    s = replace(s, restart_sent_for=s.epoch,
                last_failure=GroupFailure(now, s.epoch, rank, cause))
    return s, out


def _head_reason(s: GroupState, joined: bool) -> str:
    if s.local_epoch is None:
        return "rank 0 is down"
    if s.restart_sent_for == s.epoch:
        return f"group epoch {s.epoch} is being restarted"
    if not joined:
        missing = [str(v.rank) for v in s.ranks[1:]
                   if v.epoch != s.epoch or v.phase not in (STARTING, READY)]
        return f"waiting for rank(s) {', '.join(missing)} to join epoch {s.epoch}"
    return "group formed and the alias answers" if s.alias_ok else "waiting for the alias"


# -- a worker ---------------------------------------------------------------------------------


def worker_step(s: GroupState, e: Event, t: Timing) -> tuple[GroupState, list[Decision]]:
    out: list[Decision] = []
    if isinstance(e, LocalStarted):
        s = replace(s, local_epoch=e.epoch)
    elif isinstance(e, LocalGone):
        # Not a stop we decided (that cleared local_epoch) nor an earlier instance's end:
        # the rank this node runs now died under it.
        if s.local_epoch is not None and e.epoch == s.local_epoch:
            lost = s.local_epoch
            s = replace(s, local_epoch=None, last_failure=GroupFailure(
                e.now, lost, s.node_rank, f"rank {s.node_rank}: {e.cause}"))
            if lost == s.epoch and s.restart_sent_for != lost:
                out.append(note("cluster.restart_asked", "warning", epoch=lost, cause=e.cause))
                out.append(AskGroupRestart(lost, e.cause))
                s = replace(s, restart_sent_for=lost)
    elif isinstance(e, PeerSeen) and e.rank == 0:
        s = _peer_seen(s, e, out)
        s = replace(s, epoch=e.epoch)
        s = _adopt_failure(s, e.failure)
        s = _follow_head(s, e.phase, out)
    elif isinstance(e, PeerFailed) and e.rank == 0:
        s = _set_rank(s, e.rank, error=e.error)  # UNREACHABLE, if due, is marked below
    elif (isinstance(e, RestartAsked) and e.rank == 0 and s.local_epoch is not None
          and e.epoch >= s.local_epoch):
        out.append(StopRank(f"the head restarts the group (epoch {e.epoch})"))
        s = replace(s, local_epoch=None)
    s = _mark_unreachable(s, 0, e.now, t, out)
    if s.ranks[0].phase == UNREACHABLE and s.local_epoch is not None:
        silent = int(_silent_for(s, 0, e.now))
        out.append(StopRank(f"the head unreachable for {silent}s"))
        s = replace(s, local_epoch=None, last_failure=GroupFailure(
            e.now, s.local_epoch, 0, f"rank 0 unreachable for {silent}s"))
    head = s.ranks[0]
    ready = (s.local_epoch is not None and s.local_epoch == s.epoch and head.phase == READY
             and head.epoch == s.epoch)
    reason = (f"joined group epoch {s.epoch}" if ready
              else f"not in a formed group (head: {head.phase}, epoch {head.epoch})")
    return _with_ready(s, ready, reason, out), out


def _adopt_failure(s: GroupState, f: GroupFailure | None) -> GroupState:
    """A worker names the group's last failure as the head knows it (the head decides every
    group restart), unless its own is about a later epoch."""
    mine = s.last_failure
    if f is None or (mine is not None and (mine.epoch > f.epoch or (
            (mine.epoch, mine.rank, mine.cause) == (f.epoch, f.rank, f.cause)))):
        return s
    return replace(s, last_failure=f)


def _follow_head(s: GroupState, head_phase: str, out: list[Decision]) -> GroupState:
    """What a worker does with the head's (epoch, phase) it just read."""
    if s.local_epoch is not None and s.local_epoch != s.epoch:
        out.append(StopRank(f"group epoch moved from {s.local_epoch} to {s.epoch}"))
        s = replace(s, local_epoch=None)
    if head_phase == DOWN and s.local_epoch is not None:
        out.append(StopRank("the head's rank is down"))
        return replace(s, local_epoch=None)
    if s.local_epoch is None:
        if head_phase == STARTING:
            out.append(StartRank(s.epoch))
            # Until LocalStarted arrives this node counts as starting for that epoch, so
            # that the next poll does not decide the same start again.
            return replace(s, local_epoch=s.epoch)
        if head_phase == READY and s.restart_sent_for != s.epoch:
            # A formed group without this rank cannot be (this daemon restarted, its rank
            # was lost with it): the group must restart to take it back.
            cause = f"rank {s.node_rank} is not in epoch {s.epoch}"
            out.append(note("cluster.restart_asked", "warning", epoch=s.epoch, cause=cause))
            out.append(AskGroupRestart(s.epoch, cause))
            return replace(s, restart_sent_for=s.epoch)
    return s


def group_status(s: GroupState) -> dict[str, object]:
    """The group as STATUS and GET /cluster/status show it (no secrets in here)."""
    f = s.last_failure
    return {
        "node_rank": s.node_rank,
        "epoch": s.epoch,
        "phase": s.phase,
        "ready": s.ready,
        "ranks": [{"rank": v.rank, "phase": v.phase, "epoch": v.epoch,
                   "last_seen": v.last_seen, "error": v.error} for v in s.ranks],
        "last_failure": None if f is None else {"at": f.at, "epoch": f.epoch, "rank": f.rank,
                                                "cause": f.cause},
    }
