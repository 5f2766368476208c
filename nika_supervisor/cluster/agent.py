"""One node's side of the group protocol, with its I/O: the control endpoint, the poller, and
the policy state behind one lock. What the daemon wires (docs/ARCHITECTURE.md, "Multi-node"):

- it tells the agent what happens to its own vLLM rank: `rank_started`, `rank_gone`,
  `alias_answered` (LocalStarted, LocalGone, AliasAnswered);
- it gets the local decisions through `emit` (by default the `decisions` queue) and hands them
  to its policy as events (cluster/bridge.py): RestartGroup (a failure of its vLLM with that
  cause, through its restart policy), StartRank, StopRank, ReadyChanged, and the Notes to log;
- `status()` is the group view for STATUS.

The agent itself does the network: it serves GET /cluster/status and POST /cluster/restart,
polls its peers every `poll_interval` (the head every worker, a worker the head) and turns the
answers into PeerSeen / PeerFailed plus a Tick, sends AskGroupRestart to the head (again at
each poll until the head accepts it or moves on), and on RestartGroup tells every worker at
once (best effort; they would see the new epoch at their next poll anyway).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nika_supervisor.cluster import group
from nika_supervisor.cluster.endpoint import (
    ControlClient,
    ControlServer,
    PeerError,
    Reply,
    RestartRequest,
)
from nika_supervisor.cluster.token import Token
from nika_supervisor.config import ClusterConfig


class ClusterAgent:
    def __init__(self, cfg: ClusterConfig, token: Token, clock: Callable[[], float], *,
                 timing: group.Timing | None = None, poll_interval: float = 5.0,
                 client: ControlClient | None = None, epoch_base: int = 0,
                 extra_status: Callable[[], dict[str, Any]] = dict,
                 emit: Callable[[group.Decision], None] | None = None,
                 epoch_file: str | None = None) -> None:
        self.cfg = cfg
        self.clock = clock
        self.timing = timing or group.Timing()
        self.poll_interval = poll_interval
        self.client = client or ControlClient(token)
        self.extra_status = extra_status
        self.decisions: queue.Queue[group.Decision] = queue.Queue()
        self._emit = emit or self.decisions.put
        self._epochs = EpochStore(epoch_file) if epoch_file and cfg.is_head else None
        if self._epochs is not None:
            epoch_base = max(epoch_base, self._epochs.load())
        self._lock = threading.Lock()
        self._state = group.initial(cfg.nnodes, cfg.node_rank, clock(), epoch_base)
        self._step = group.head_step if cfg.is_head else group.worker_step
        self._pending_ask: group.AskGroupRestart | None = None
        self._stop = threading.Event()
        self.server = ControlServer(cfg.control_address, token, self.status, self._on_restart)
        self._poller = threading.Thread(target=self._poll_loop, name="cluster-poll",
                                        daemon=True)

    # -- the daemon's side ----------------------------------------------------------------

    def start(self) -> ClusterAgent:
        self.server.start()
        self._poller.start()
        return self

    def stop(self) -> None:
        """Stop serving and polling. The head first tells every worker that its group is gone
        (each stops its rank at once instead of after the unreachable deadline)."""
        self._stop.set()
        if self.cfg.is_head:
            self._tell_workers(self.state.epoch, "the head's supervisor stopped")
        self.server.stop()
        self._poller.join(self.client.deadline * 2 + self.poll_interval)

    def rank_started(self, epoch: int | None) -> None:
        """This node's vLLM rank was spawned (a worker: for `epoch`; the head bumps its own)."""
        self.feed(group.LocalStarted(self.clock(), epoch or 0))
        if self._epochs is not None:
            self._epochs.save(self.state.epoch)

    def rank_gone(self, cause: str, epoch: int | None) -> None:
        """This node's rank ended or failed. `epoch` names the instance (a worker's StartRank
        epoch); None: the one running now (the head's ranks never overlap in time)."""
        if epoch is None:
            epoch = self.state.local_epoch
            if epoch is None:
                return
        self.feed(group.LocalGone(self.clock(), cause, epoch))

    def alias_answered(self, ok: bool) -> None:
        self.feed(group.AliasAnswered(self.clock(), ok))

    @property
    def state(self) -> group.GroupState:
        with self._lock:
            return self._state

    def status(self) -> dict[str, Any]:
        with self._lock:
            view = group.group_status(self._state)
        return {**self.extra_status(), **view}

    def feed(self, event: group.Event) -> list[group.Decision]:
        """Step the policy; local decisions go to `decisions`, network ones are sent here."""
        with self._lock:
            old_epoch, old_local = self._state.epoch, self._state.local_epoch
            self._state, out = self._step(self._state, event, self.timing)
            lost_head = (self.cfg.is_head and old_local is not None
                         and self._state.local_epoch is None)
        if lost_head and isinstance(event, group.LocalGone):
            # The head's rank is gone: tell the workers now rather than at their next poll.
            threading.Thread(target=self._tell_workers, args=(old_epoch, event.cause),
                             name="cluster-tell", daemon=True).start()
        for d in out:
            if isinstance(d, group.AskGroupRestart):
                # Sent off the caller's thread (the daemon's loop must never wait on a peer);
                # the poller sends it again until the head accepts it or moves on.
                self._pending_ask = d
                threading.Thread(target=self._send_ask, name="cluster-ask",
                                 daemon=True).start()
            else:
                if isinstance(d, group.RestartGroup):
                    # Off this thread: it may be a request handler whose peer awaits a reply.
                    threading.Thread(target=self._tell_workers, args=(old_epoch, d.cause),
                                     name="cluster-tell", daemon=True).start()
                self._emit(d)
        return out

    # -- the network's side ---------------------------------------------------------------

    def _on_restart(self, req: RestartRequest) -> bool:
        if not 0 <= req.rank < self.cfg.nnodes or req.rank == self.cfg.node_rank:
            return False
        with self._lock:
            current = req.epoch == self._state.epoch
        self.feed(group.RestartAsked(self.clock(), req.rank, req.epoch, req.cause))
        return current

    def _send_ask(self) -> None:
        ask = self._pending_ask
        if ask is None:
            return
        if self.state.epoch != ask.epoch:
            self._pending_ask = None  # the head moved on: the request is answered
            return
        r = self.client.ask_restart(self.cfg.peers[0], ask.epoch, self.cfg.node_rank, ask.cause)
        if isinstance(r, Reply) and r.status == 200:
            self._pending_ask = None

    def _tell_workers(self, epoch: int, cause: str) -> None:
        for rank, address in enumerate(self.cfg.peers):
            if rank != self.cfg.node_rank:
                self.client.ask_restart(address, epoch, self.cfg.node_rank, cause)

    def _poll_loop(self) -> None:
        while not self._stop.wait(self.poll_interval):
            peers = (range(1, self.cfg.nnodes) if self.cfg.is_head else (0,))
            for rank in peers:
                self.feed(self._poll(rank))
            self._send_ask()
            self.feed(group.Tick(self.clock()))

    def _poll(self, rank: int) -> group.Event:
        r = self.client.status(self.cfg.peers[rank])
        now = self.clock()
        if isinstance(r, PeerError):
            return group.PeerFailed(now, rank, r.error)
        b = r.body
        if r.status != 200:
            return group.PeerFailed(now, rank, f"HTTP {r.status}")
        if b.get("node_rank") != rank:
            return group.PeerFailed(now, rank, f"the peer at {self.cfg.peers[rank]} says it is "
                                               f"rank {b.get('node_rank')!r}: check cluster.peers")
        epoch, phase = b.get("epoch"), b.get("phase")
        if (isinstance(epoch, bool) or not isinstance(epoch, int)
                or phase not in (group.DOWN, group.STARTING, group.READY)):
            return group.PeerFailed(now, rank, "bad status: epoch or phase missing")
        return group.PeerSeen(now, rank, epoch, str(phase), _failure(b.get("last_failure"), now))


def _failure(raw: object, now: float) -> group.GroupFailure | None:
    """A peer's last_failure from its status, if well formed (anything else: None)."""
    if not isinstance(raw, dict):
        return None
    epoch, rank, cause = raw.get("epoch"), raw.get("rank"), raw.get("cause")
    if (not isinstance(epoch, int) or isinstance(epoch, bool) or not isinstance(rank, int)
            or isinstance(rank, bool) or not isinstance(cause, str)):
        return None
    return group.GroupFailure(now, epoch, rank, cause[:200])


class EpochStore:
    """The head's last epoch, kept across daemon restarts: a new head daemon must never reuse
    an epoch of its previous life, or a worker whose rank still runs that old epoch would take
    the new group for its own. The file lives in supervisor.state_dir (systemd's
    StateDirectory); no file yet means the first life (0); an unreadable one falls back to the
    wall clock in seconds, above any counter a real group reaches."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def load(self) -> int:
        try:
            return int(self.path.read_text().strip())
        except FileNotFoundError:
            return 0
        except (OSError, ValueError):
            return int(time.time())

    def save(self, epoch: int) -> None:
        try:
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(f"{epoch}\n")
            tmp.replace(self.path)
        except OSError:
            pass  # the next load falls back to the wall clock
