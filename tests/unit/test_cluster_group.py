"""The group policy (nika_supervisor/cluster/group.py) through scripted histories: each case is
the sequence of events one node sees, with the decisions expected after each."""

from __future__ import annotations

from nika_supervisor.cluster.group import (
    DOWN,
    READY,
    STARTING,
    UNREACHABLE,
    AliasAnswered,
    AskGroupRestart,
    Decision,
    Event,
    GroupFailure,
    GroupState,
    LocalGone,
    LocalStarted,
    Note,
    PeerFailed,
    PeerSeen,
    ReadyChanged,
    RestartAsked,
    RestartGroup,
    StartRank,
    StopRank,
    Tick,
    Timing,
    group_status,
    head_step,
    initial,
    worker_step,
)

T = Timing(unreachable_after=15.0)


def run(step, s: GroupState, events: list[Event]) -> tuple[GroupState, list[list[Decision]]]:
    """The decisions after each event, without the log notes (test_notes checks those)."""
    s, seen = run_all(step, s, events)
    return s, [[d for d in out if not isinstance(d, Note)] for out in seen]


def run_all(step, s: GroupState, events: list[Event]
            ) -> tuple[GroupState, list[list[Decision]]]:
    seen = []
    for e in events:
        s, out = step(s, e, T)
        seen.append(out)
    return s, seen


def notes(seen: list[list[Decision]]) -> list[tuple[str, dict[str, object]]]:
    return [(d.event, dict(d.fields)) for out in seen for d in out if isinstance(d, Note)]


def formed_head(now: float = 0.0) -> GroupState:
    """A head whose epoch-1 group is READY with one worker."""
    s, out = run(head_step, initial(2, 0, now), [
        LocalStarted(now + 1),
        PeerSeen(now + 2, 1, 1, STARTING),
        AliasAnswered(now + 3, True),
    ])
    assert out[-1] == [ReadyChanged(True, "group formed and the alias answers")]
    return s


# -- the head ---------------------------------------------------------------------------------


def test_head_bumps_the_epoch_on_every_start() -> None:
    s, _ = run(head_step, initial(2, 0, 0.0), [LocalStarted(1.0)])
    assert (s.epoch, s.phase) == (1, STARTING)
    s, _ = run(head_step, s, [LocalGone(2.0, "exited (SIGKILL)", 1), LocalStarted(3.0)])
    assert (s.epoch, s.phase) == (2, STARTING)
    assert s.last_failure is not None and s.last_failure.cause == "rank 0: exited (SIGKILL)"


def test_head_is_ready_only_when_every_rank_joined_and_the_alias_answers() -> None:
    s, out = run(head_step, initial(3, 0, 0.0), [
        LocalStarted(1.0),
        AliasAnswered(2.0, True),  # the alias answers, but no worker has joined yet
        PeerSeen(3.0, 1, 1, STARTING),
        PeerSeen(4.0, 2, 0, DOWN),  # rank 2 still on no epoch
        PeerSeen(5.0, 2, 1, STARTING),
    ])
    assert out[:4] == [[], [], [], []]
    assert out[4] == [ReadyChanged(True, "group formed and the alias answers")]
    assert s.ready and s.phase == READY
    _, waiting = run(head_step, initial(3, 0, 0.0), [LocalStarted(1.0), AliasAnswered(2.0, True),
                                                     PeerSeen(3.0, 1, 1, STARTING), Tick(10.0)])
    assert waiting[-1] == []  # rank 2 never joined: no ready, and no restart for it either
    # A worker that reports an older epoch has not joined this one.
    s2, out2 = run(head_step, initial(2, 0, 0.0), [
        LocalStarted(1.0), LocalGone(2.0, "exited", 1), LocalStarted(3.0),
        AliasAnswered(4.0, True), PeerSeen(5.0, 1, 1, STARTING)])
    assert not s2.ready and out2[-1] == []


def test_a_worker_reporting_its_rank_gone_restarts_the_group_once() -> None:
    s = formed_head()
    s, out = run(head_step, s, [
        RestartAsked(10.0, 1, 1, "exited (SIGKILL)"),
        RestartAsked(10.5, 1, 1, "exited (SIGKILL)"),  # a retry of the same request
        PeerSeen(11.0, 1, 1, DOWN),  # and the poll that sees it too
    ])
    assert out[0] == [RestartGroup("rank 1: exited (SIGKILL)", 1),
                      ReadyChanged(False, "group epoch 1 is being restarted")]
    assert out[1] == [] and out[2] == []
    assert s.last_failure is not None
    assert (s.last_failure.rank, s.last_failure.epoch, s.last_failure.cause) == (
        1, 1, "rank 1: exited (SIGKILL)")
    # The daemon stops and restarts rank 0: that failure does not overwrite the cause.
    s, out = run(head_step, s, [LocalGone(12.0, "stopped", 1), LocalStarted(13.0)])
    assert s.epoch == 2 and s.last_failure.cause == "rank 1: exited (SIGKILL)"


def test_a_stale_restart_request_is_ignored() -> None:
    s = formed_head()
    s, out = run(head_step, s, [LocalGone(5.0, "exited", 1), LocalStarted(6.0),
                                RestartAsked(7.0, 1, 1, "old epoch's rank gone")])
    assert s.epoch == 2 and out[-1] == []


def test_a_poll_that_finds_a_worker_down_restarts_a_ready_group() -> None:
    s = formed_head()
    s, out = run(head_step, s, [PeerSeen(5.0, 1, 1, DOWN)])
    assert out[0][0] == RestartGroup("rank 1: reports its rank down", 1)


def test_a_joined_worker_unreachable_past_the_deadline_restarts_the_group_once() -> None:
    s = formed_head()  # the worker last seen at 2.0
    s, out = run(head_step, s, [
        PeerFailed(10.0, 1, "timed out"),  # silent 8 s: still within the deadline
        PeerFailed(17.5, 1, "timed out"),  # silent 15.5 s: unreachable
        PeerFailed(20.0, 1, "timed out"),
    ])
    assert out[0] == []
    assert out[1] == [RestartGroup("rank 1 unreachable for 15s", 1),
                      ReadyChanged(False, "group epoch 1 is being restarted")]
    assert out[2] == []
    assert s.ranks[1].phase == UNREACHABLE and s.ranks[1].error == "timed out"


def test_ticks_alone_find_a_silent_worker() -> None:
    s = formed_head()
    s, out = run(head_step, s, [Tick(16.0), Tick(17.1)])
    assert out[0] == [] and isinstance(out[1][0], RestartGroup)


def test_a_partition_at_start_is_waited_for_not_looped_on() -> None:
    """A worker that never joined the new epoch does not restart it again: the head waits
    (not ready) and the worker joins when the link comes back."""
    s = formed_head()
    s, out = run(head_step, s, [Tick(17.1)])  # link down: restart
    assert isinstance(out[0][0], RestartGroup)
    s, out = run(head_step, s, [LocalGone(18.0, "stopped", 1), LocalStarted(19.0),
                                Tick(40.0), Tick(80.0), AliasAnswered(81.0, False)])
    assert all(d == [] for d in out[2:]) and s.epoch == 2 and not s.ready
    s, out = run(head_step, s, [PeerSeen(90.0, 1, 2, STARTING), AliasAnswered(91.0, True)])
    assert out[1] == [ReadyChanged(True, "group formed and the alias answers")]


def test_the_head_leaves_ready_when_the_alias_stops_answering() -> None:
    s = formed_head()
    s, out = run(head_step, s, [AliasAnswered(5.0, False)])
    assert out[0] == [ReadyChanged(False, "waiting for the alias")]


# -- a worker ---------------------------------------------------------------------------------


def joined_worker() -> GroupState:
    s, out = run(worker_step, initial(2, 1, 0.0), [
        PeerSeen(1.0, 0, 1, STARTING),
        LocalStarted(2.0, 1),
        PeerSeen(3.0, 0, 1, READY),
    ])
    assert out[0] == [StartRank(1)] and out[1] == []
    assert out[2] == [ReadyChanged(True, "joined group epoch 1")]
    return s


def test_a_worker_starts_its_rank_only_for_a_starting_head_epoch() -> None:
    s, out = run(worker_step, initial(2, 1, 0.0), [
        PeerSeen(1.0, 0, 0, DOWN),  # the head has no rank: nothing to join
        PeerSeen(2.0, 0, 1, STARTING),
        PeerSeen(3.0, 0, 1, STARTING),  # the next poll before LocalStarted: no second start
    ])
    assert out == [[], [StartRank(1)], []]
    assert s.phase == STARTING and not s.ready


def test_a_worker_restarts_its_rank_when_the_epoch_changes() -> None:
    s = joined_worker()
    s, out = run(worker_step, s, [PeerSeen(10.0, 0, 2, STARTING)])
    assert out[0] == [StopRank("group epoch moved from 1 to 2"), StartRank(2),
                      ReadyChanged(False, "not in a formed group (head: starting, epoch 2)")]


def test_a_worker_whose_rank_dies_asks_the_head_once() -> None:
    s = joined_worker()
    s, out = run(worker_step, s, [LocalGone(10.0, "exited (SIGKILL)", 1),
                                  PeerSeen(11.0, 0, 1, READY)])
    assert out[0] == [AskGroupRestart(1, "exited (SIGKILL)"),
                      ReadyChanged(False, "not in a formed group (head: ready, epoch 1)")]
    assert out[1] == []  # already asked for epoch 1
    assert s.last_failure is not None and s.last_failure.cause == "rank 1: exited (SIGKILL)"
    assert group_status(s)["phase"] == DOWN


def test_a_restarted_worker_daemon_asks_a_formed_group_to_restart() -> None:
    _, out = run(worker_step, initial(2, 1, 100.0), [PeerSeen(101.0, 0, 3, READY)])
    assert out[0] == [AskGroupRestart(3, "rank 1 is not in epoch 3")]


def test_a_worker_stops_its_rank_when_the_head_is_unreachable_and_rejoins_later() -> None:
    s = joined_worker()  # head last seen at 3.0
    s, out = run(worker_step, s, [PeerFailed(10.0, 0, "connection refused"),
                                  PeerFailed(18.5, 0, "timed out")])
    assert out[0] == []
    assert out[1] == [StopRank("the head unreachable for 15s"),
                      ReadyChanged(False, "not in a formed group (head: unreachable, epoch 1)")]
    assert s.phase == DOWN
    s, out = run(worker_step, s, [LocalGone(19.0, "stopped", 1),  # our own stop: no request
                                  PeerSeen(60.0, 0, 2, STARTING)])
    assert out == [[], [StartRank(2)]]


def test_a_stopped_stop_is_not_a_failure() -> None:
    s = joined_worker()
    s, out = run(worker_step, s, [RestartAsked(5.0, 0, 1, "rank 0: exited"),
                                  LocalGone(6.0, "stopped", 1)])
    assert out[0][0] == StopRank("the head restarts the group (epoch 1)")
    assert out[1] == [] and s.last_failure is None


def test_status_names_the_whole_group_and_no_secret() -> None:
    s = formed_head()
    st = group_status(s)
    assert st["epoch"] == 1 and st["phase"] == READY and st["ready"] is True
    assert [(r["rank"], r["phase"], r["epoch"]) for r in st["ranks"]] == [  # type: ignore[index,union-attr]
        (0, READY, 1), (1, STARTING, 1)]
    assert st["last_failure"] is None


def test_a_restarted_head_daemon_starts_above_its_previous_epochs() -> None:
    """A worker still running epoch 5 of the head's previous life, and its stale request about
    epoch 5, against a head daemon restarted with a base above its old epochs."""
    head, out = run(head_step, initial(2, 0, 0.0, epoch_base=1_700_000_000), [
        LocalStarted(1.0), RestartAsked(2.0, 1, 5, "old")])
    assert head.epoch == 1_700_000_001 and out[1] == []
    _, out = run(worker_step, joined_worker(), [PeerSeen(10.0, 0, head.epoch, STARTING)])
    assert out[0][:2] == [StopRank("group epoch moved from 1 to 1700000001"),
                          StartRank(1_700_000_001)]


def test_a_slow_stop_that_ends_after_the_next_start_is_not_a_death() -> None:
    """Seen with real vLLM ranks: the worker's old rank took 8 s to stop; meanwhile its poller
    saw the head starting the new epoch and decided StartRank; the old instance's end, reported
    then, must not read as the new rank dying (it caused two needless group restarts)."""
    s = joined_worker()
    s, out = run(worker_step, s, [
        PeerSeen(10.0, 0, 2, STARTING),  # epoch moved: stop 1, start 2
        LocalGone(18.0, "stopped", 1),  # the old instance's stop finishes only now
        LocalStarted(18.1, 2),
    ])
    assert out[0][:2] == [StopRank("group epoch moved from 1 to 2"), StartRank(2)]
    assert out[1] == [] and out[2] == [] and s.last_failure is None and s.local_epoch == 2
    # The head alike: an earlier instance's end while a newer one runs changes nothing.
    h = formed_head()
    h, out = run(head_step, h, [LocalGone(5.0, "stopped", 1), LocalStarted(6.0),
                                LocalGone(7.0, "stopped", 1)])
    assert h.epoch == 2 and h.local_epoch == 2 and out[2] == []


# -- what the group policy logs -----------------------------------------------------------------


def test_notes_name_each_epoch_and_a_peer_lost_once_and_back_once() -> None:
    _, seen = run_all(head_step, initial(2, 0, 0.0), [
        LocalStarted(1.0),
        PeerSeen(2.0, 1, 1, STARTING),
        PeerFailed(10.0, 1, "timed out"),
        PeerFailed(18.0, 1, "timed out"),  # silent 16 s: unreachable
        PeerFailed(25.0, 1, "timed out"),  # still: not logged again
        PeerSeen(30.0, 1, 1, STARTING),
    ])
    assert notes(seen) == [
        ("cluster.epoch", {"epoch": 1}),
        ("cluster.peer_unreachable", {"rank": 1, "silent_s": 16.0, "error": "timed out"}),
        ("cluster.peer_back", {"rank": 1, "silent_s": 28.0, "epoch": 1, "phase": STARTING}),
    ]


def test_a_worker_notes_the_restart_it_asks_for() -> None:
    s, _ = run(worker_step, initial(2, 1, 0.0), [PeerSeen(1.0, 0, 3, STARTING)])
    _, seen = run_all(worker_step, s, [LocalStarted(2.0, 3), LocalGone(3.0, "exited", 3)])
    assert notes(seen) == [("cluster.restart_asked", {"epoch": 3, "cause": "exited"})]


def test_a_rank_that_left_a_formed_group_restarts_it_and_the_head_reports_down() -> None:
    """A worker daemon restarted (its rank was ended with it) reports no rank: the formed
    group cannot take a new rank in, so the head restarts it, and says DOWN meanwhile so the
    worker does not start a rank for the epoch that is going away (seen with real vLLM: the
    worker joined the dead epoch and the head counted the group formed again)."""
    s = formed_head()
    s, out = run(head_step, s, [PeerSeen(10.0, 1, 0, DOWN)])
    assert out == [[RestartGroup("rank 1: reports its rank down", 1),
                    ReadyChanged(False, "group epoch 1 is being restarted")]]
    assert group_status(s)["phase"] == DOWN


def test_a_rank_of_another_epoch_in_a_formed_group_restarts_it() -> None:
    s = formed_head()
    _, out = run(head_step, s, [PeerSeen(10.0, 1, 7, STARTING)])
    assert out[0][0] == RestartGroup("rank 1: runs epoch 7, not 1", 1)


def test_before_the_group_forms_a_missing_rank_is_waited_for() -> None:
    s, out = run(head_step, initial(2, 0, 0.0), [LocalStarted(1.0), PeerSeen(2.0, 1, 0, DOWN)])
    assert out[1] == [] and group_status(s)["phase"] == STARTING


def test_a_worker_names_the_groups_last_failure_as_the_head_knows_it() -> None:
    head_failure = GroupFailure(5.0, 3, 0, "rank 0: vLLM was killed by SIGKILL")
    s, _ = run(worker_step, initial(2, 1, 0.0), [PeerSeen(1.0, 0, 4, STARTING, head_failure)])
    assert group_status(s)["last_failure"]["cause"] == "rank 0: vLLM was killed by SIGKILL"
    # Its own, about a later epoch, is kept over an older one of the head's.
    s, _ = run(worker_step, s, [LocalStarted(2.0, 4), LocalGone(3.0, "exited", 4),
                                PeerSeen(4.0, 0, 4, STARTING, head_failure)])
    assert group_status(s)["last_failure"]["cause"] == "rank 1: exited"
