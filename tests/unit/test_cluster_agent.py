"""Two ClusterAgents (nika_supervisor/cluster/agent.py) on loopback, with real control endpoints
and pollers; each node's vLLM rank is a stand-in that carries out the agent's decisions at
once. The protocol end to end: the group forms, a worker's rank dies and the group restarts
as one under a new epoch, a silent worker restarts the group, a wrong token changes nothing."""

from __future__ import annotations

import queue
import socket
import threading
import time
from collections.abc import Iterator

import pytest
from helpers.wait import poll_for

from nika_supervisor.cluster import group
from nika_supervisor.cluster.agent import ClusterAgent
from nika_supervisor.cluster.endpoint import ControlClient, PeerError
from nika_supervisor.cluster.token import Token
from nika_supervisor.config import ClusterConfig

TOKEN = Token(b"agent-test-token")
TIMING = group.Timing(unreachable_after=1.0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class StandInRank:
    """This node's vLLM rank, as far as the agent can tell: it does what it is told."""

    def __init__(self, agent: ClusterAgent) -> None:
        self.agent = agent
        self.ready_changes: list[group.ReadyChanged] = []
        self.stop = threading.Event()
        self.running: int | None = None  # the epoch the running instance was started for
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def start_head(self) -> None:
        self.agent.feed(group.LocalStarted(time.monotonic()))
        self.running = self.agent.state.local_epoch
        self.agent.feed(group.AliasAnswered(time.monotonic(), True))

    def die(self, cause: str) -> None:
        assert self.running is not None
        epoch, self.running = self.running, None
        self.agent.feed(group.LocalGone(time.monotonic(), cause, epoch))

    def _run(self) -> None:
        a = self.agent
        while not self.stop.is_set():
            try:
                d = a.decisions.get(timeout=0.05)
            except queue.Empty:
                continue
            if isinstance(d, group.RestartGroup):  # the head: stop and start again
                self.die("stopped")
                self.start_head()
            elif isinstance(d, group.StartRank):
                self.running = d.epoch
                a.feed(group.LocalStarted(time.monotonic(), d.epoch))
            elif isinstance(d, group.StopRank) and self.running is not None:
                self.die("stopped")
            elif isinstance(d, group.ReadyChanged):
                self.ready_changes.append(d)


@pytest.fixture
def pair() -> Iterator[tuple[ClusterAgent, ClusterAgent, StandInRank, StandInRank]]:
    peers = (("127.0.0.1", free_port()), ("127.0.0.1", free_port()))
    agents = [ClusterAgent(ClusterConfig(nnodes=2, node_rank=r, master_addr="127.0.0.1",
                                         master_port=29501, peers=peers, token_file="-"),
                           TOKEN, time.monotonic, timing=TIMING, poll_interval=0.05,
                           client=ControlClient(TOKEN, connect_timeout=0.5, deadline=0.5),
                           extra_status=lambda: {"pid": 1234}).start()
              for r in (0, 1)]
    ranks = [StandInRank(a) for a in agents]
    try:
        yield agents[0], agents[1], ranks[0], ranks[1]
    finally:
        for r in ranks:
            r.stop.set()
            r.thread.join(5)
        for a in agents:
            a.stop()


def formed(head: ClusterAgent, worker: ClusterAgent, epoch: int) -> bool:
    return (head.state.ready and worker.state.ready and head.state.epoch == epoch
            and worker.state.local_epoch == epoch)


def test_the_group_forms_and_restarts_as_one(pair) -> None:
    head, worker, head_rank, worker_rank = pair
    head_rank.start_head()  # the daemon starts the head's rank
    poll_for(lambda: formed(head, worker, 1), 10, "the group to form at epoch 1")
    st = worker.status()
    assert (st["pid"], st["phase"], st["epoch"]) == (1234, group.READY, 1)

    # The worker's rank dies: the worker asks, the head restarts the group under epoch 2,
    # the worker follows; both READY again, and both name the failure.
    worker_rank.die("exited (SIGKILL)")
    poll_for(lambda: formed(head, worker, 2), 10, "the group to re-form at epoch 2")
    failure = head.state.last_failure
    assert failure is not None and (failure.epoch, failure.rank, failure.cause) == (
        1, 1, "rank 1: exited (SIGKILL)")
    poll_for(lambda: [(r["phase"], r["epoch"]) for r in head.status()["ranks"]] == [
        (group.READY, 2), (group.READY, 2)], 10, "the head's view: both ranks ready at epoch 2")
    assert worker.state.last_failure is not None
    assert [c.ready for c in head_rank.ready_changes] == [True, False, True]
    assert [c.ready for c in worker_rank.ready_changes] == [True, False, True]


def test_a_silent_worker_restarts_the_group(pair) -> None:
    head, worker, head_rank, _ = pair
    head_rank.start_head()
    poll_for(lambda: formed(head, worker, 1), 10, "the group to form at epoch 1")
    worker.stop()  # its endpoint and poller are gone: the head hears nothing more
    poll_for(lambda: head.state.epoch == 2, 10, "the head to restart the group")
    f = head.state.last_failure
    assert f is not None and f.rank == 1 and "unreachable" in f.cause
    assert not head.state.ready


def test_a_wrong_token_changes_nothing(pair) -> None:
    head, worker, head_rank, _ = pair
    head_rank.start_head()
    poll_for(lambda: formed(head, worker, 1), 10, "the group to form at epoch 1")
    intruder = ControlClient(Token(b"guess"), connect_timeout=0.5, deadline=0.5)
    assert isinstance(intruder.ask_restart(head.server.address, 1, 1, "x"), PeerError)
    assert isinstance(intruder.status(worker.server.address), PeerError)
    # Let the worker poll the head twice more after the refusals: a request the head had
    # accepted would have moved the epoch by then.
    for _ in range(2):
        after = time.monotonic()
        poll_for(lambda after=after: (worker.state.ranks[0].last_seen or 0) > after, 10,
                 "the worker's next poll of the head")
    assert formed(head, worker, 1)


def test_a_silent_head_never_holds_up_the_caller_of_feed() -> None:
    """The daemon's loop calls rank_gone(); the ask to the head goes out on its own thread."""
    with socket.socket() as silent:  # accepts connections (backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        peers = (silent.getsockname(), ("127.0.0.1", free_port()))
        agent = ClusterAgent(ClusterConfig(nnodes=2, node_rank=1, master_addr="127.0.0.1",
                                           master_port=29501, peers=peers, token_file="-"),
                             TOKEN, time.monotonic, poll_interval=60.0,
                             client=ControlClient(TOKEN, connect_timeout=3.0, deadline=3.0))
        agent.feed(group.PeerSeen(time.monotonic(), 0, 4, group.STARTING))
        agent.rank_started(4)
        t0 = time.monotonic()
        agent.rank_gone("exited (SIGKILL)", 4)
        took = time.monotonic() - t0
        assert took < 1.0, f"rank_gone waited {took:.2f}s on a silent head"
        notes = []
        while not agent.decisions.empty():
            notes.append(agent.decisions.get())
        assert group.note("cluster.restart_asked", "warning", epoch=4,
                          cause="exited (SIGKILL)") in notes


def test_the_heads_epochs_continue_across_daemon_lives(tmp_path) -> None:
    path = tmp_path / "cluster-epoch"

    def cfg() -> ClusterConfig:  # each agent binds its endpoint: a fresh port for each
        return ClusterConfig(nnodes=2, node_rank=0, master_addr="127.0.0.1", master_port=29501,
                             peers=(("127.0.0.1", free_port()), ("127.0.0.1", free_port())),
                             token_file="-")

    for life, expected in ((1, [1, 2]), (2, [3, 4])):
        agent = ClusterAgent(cfg(), TOKEN, time.monotonic, epoch_file=str(path))
        seen = []
        for _ in range(2):
            agent.rank_started(None)
            seen.append(agent.state.epoch)
            agent.rank_gone("stopped", None)
        assert seen == expected, f"daemon life {life}"
    assert path.read_text() == "4\n"
    path.write_text("garbage")  # unreadable: the wall clock, above any real counter
    agent = ClusterAgent(cfg(), TOKEN, time.monotonic, epoch_file=str(path))
    agent.rank_started(None)
    assert agent.state.epoch > 1_700_000_000
