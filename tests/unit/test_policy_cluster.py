"""The node policy's side of a vLLM group across nodes (issue 12): what the group policy's
decisions (GroupFailed, RankStart, RankStop, GroupReady) do to this node's vLLM, scripted
with an injected clock. The group policy itself: test_cluster_group.py."""

from __future__ import annotations

import signal
from dataclasses import replace

from test_policy import HEALTH, RESTART, Run

from nika_supervisor.actions import (
    AliasAnswered,
    Exit,
    NotifyReady,
    Preflight,
    RankGone,
    RankStarted,
    SignalGroup,
    Spawn,
    StartProbe,
)
from nika_supervisor.events import (
    Boot,
    ChildExited,
    GpuReport,
    GroupFailed,
    GroupGone,
    GroupReady,
    PreflightResult,
    RankStart,
    RankStop,
    ReadyProbe,
    Spawned,
    StopRequested,
    Tick,
)
from nika_supervisor.exitcodes import ExitCode
from nika_supervisor.failures import Failure, Severity
from nika_supervisor.policy import HEAD, WORKER, Policy
from nika_supervisor.states import Phase

TERM = signal.SIGTERM


def run_as(role: str) -> Run:
    r = Run()
    r.policy = replace(Policy(HEALTH, RESTART, jitter=lambda: 0.0), role=role)
    return r


def stopped(r: Run, pid: int) -> None:
    """The stop under way completes: the process exited and its group is gone."""
    r.feed(ChildExited(pid, None, TERM))
    r.feed(GroupGone(pid))


def head_ready(pid: int = 100) -> Run:
    """A head whose alias answered and whose group formed."""
    r = run_as(HEAD)
    r.feed(Boot())
    r.feed(PreflightResult())
    r.feed(Spawned(pid))
    r.feed(ReadyProbe(pid, True))
    r.feed(GroupReady(True, "formed"))
    assert r.state.phase is Phase.READY
    return r


# -- the head --------------------------------------------------------------------------------


def test_the_head_is_ready_only_when_the_alias_answers_and_the_group_is_formed() -> None:
    r = run_as(HEAD)
    r.feed(Boot())
    r.feed(PreflightResult())
    assert RankStarted(None) in r.feed(Spawned(100))
    r.feed(Tick())
    acts = r.feed(ReadyProbe(100, True), after=1.0)
    assert AliasAnswered() in acts and NotifyReady() not in acts
    assert r.state.phase is Phase.LOADING
    # No more probes, only the startup timeout (or the next timeout extension to systemd).
    assert not any(isinstance(a, StartProbe) for a in r.tick_until(r.clock.t + 30.0))
    acts = r.feed(GroupReady(True, "group formed and the alias answers"), after=0.5)
    assert NotifyReady() in acts and r.state.phase is Phase.READY


def test_the_head_leaves_ready_while_its_group_is_not_formed_and_returns() -> None:
    r = head_ready()
    r.feed(GroupReady(False, "waiting for rank(s) 1 to join epoch 1"), after=1.0)
    assert r.state.phase is Phase.UNHEALTHY
    assert r.events("cluster.ready")[-1] == {"ready": False,
                                              "reason": "waiting for rank(s) 1 to join epoch 1"}
    r.feed(GroupReady(True, "formed"), after=1.0)
    assert r.state.phase is Phase.READY


def test_a_group_restart_is_a_failure_of_the_heads_vllm_through_its_budget() -> None:
    r = head_ready()
    acts = r.feed(GroupFailed(Failure("group restart: rank 1: exited", "h", code="cluster"), 1))
    assert RankGone("group restart: rank 1: exited", None) in acts
    assert SignalGroup(100, TERM) in acts
    assert r.events("cluster.group_restart")[0]["rank"] == 1
    assert r.life.restarts == 1 and r.life.last_failure.code == "cluster"
    stopped(r, 100)
    assert r.state.phase is Phase.BACKOFF


def test_a_group_restart_while_nothing_runs_changes_nothing() -> None:
    r = run_as(HEAD)
    r.feed(Boot())
    assert r.feed(GroupFailed(Failure("x", "h", code="cluster"), 1)) == []


# -- a worker --------------------------------------------------------------------------------


def worker_running(epoch: int, pid: int) -> Run:
    """A worker that waited, was told to start its rank for `epoch`, and spawned it."""
    r = run_as(WORKER)
    r.feed(Boot())
    r.feed(PreflightResult())
    r.feed(RankStart(epoch))
    r.feed(PreflightResult())
    r.feed(Spawned(pid))
    assert r.state.phase is Phase.LOADING
    return r


def test_a_worker_waits_for_the_heads_group_and_never_starts_by_itself() -> None:
    r = run_as(WORKER)
    assert r.feed(Boot()) == [Preflight()]  # orphans of an earlier life are still ended
    r.feed(PreflightResult())
    assert r.state.phase is Phase.WAITING
    assert r.tick_until(3600.0) == [] or r.state.phase is Phase.WAITING
    assert not any(isinstance(a, Spawn) for a in r.actions)


def test_a_worker_starts_its_rank_for_the_epoch_and_is_ready_with_the_group() -> None:
    r = run_as(WORKER)
    r.feed(Boot())
    r.feed(PreflightResult())
    assert Preflight() in r.feed(RankStart(7))
    assert r.feed(PreflightResult()) == [Spawn()]
    assert RankStarted(7) in r.feed(Spawned(200))
    # No API on a worker: nothing to probe, ever.
    acts = r.tick_until(30.0)
    assert not any(isinstance(a, StartProbe) for a in acts)
    assert NotifyReady() in r.feed(GroupReady(True, "joined group epoch 7"))
    assert r.state.phase is Phase.READY
    acts = r.tick_until(600.0)
    assert not any(isinstance(a, StartProbe) for a in acts)


def test_a_worker_rank_that_dies_goes_back_to_waiting_without_a_restart_of_its_own() -> None:
    r = worker_running(7, 200)
    r.feed(GroupReady(True, "joined"))
    acts = r.feed(ChildExited(200, None, signal.SIGKILL), after=5.0)
    assert any(isinstance(a, RankGone) and a.epoch == 7 for a in acts)
    r.feed(GroupGone(200))
    assert r.state.phase is Phase.WAITING
    assert r.life.restarts == 0 and r.life.rank_epoch is None
    assert r.events("restart.scheduled") == []
    assert not any(isinstance(a, Spawn) for a in r.tick_until(600.0))


def test_a_worker_stops_its_rank_when_told_and_starts_the_next_epoch_after_the_stop() -> None:
    r = worker_running(7, 200)
    acts = r.feed(RankStop("group epoch moved from 7 to 8"))
    assert SignalGroup(200, TERM) in acts
    assert r.events("cluster.rank_stop") == [{"reason": "group epoch moved from 7 to 8"}]
    r.feed(RankStart(8))  # while the old rank is still stopping: start right after it
    assert r.state.phase is Phase.STOPPING
    r.feed(ChildExited(200, None, TERM))
    assert Preflight() in r.feed(GroupGone(200))
    r.feed(PreflightResult())
    assert RankStarted(8) in r.feed(Spawned(201))


def test_a_stop_request_during_a_start_ends_in_waiting_not_a_spawn() -> None:
    r = run_as(WORKER)
    r.feed(Boot())
    r.feed(RankStart(3))  # during the boot preflight
    r.feed(RankStop("the head's rank is down"))
    r.feed(PreflightResult())
    assert r.state.phase is Phase.WAITING


def test_a_worker_stops_for_good_from_waiting() -> None:
    r = run_as(WORKER)
    r.feed(Boot())
    r.feed(PreflightResult())
    acts = r.feed(StopRequested())
    assert Exit(ExitCode.OK) in acts and r.state.phase is Phase.STOPPED


def test_a_fatal_gpu_on_a_waiting_worker_gives_up() -> None:
    r = run_as(WORKER)
    r.feed(Boot())
    r.feed(PreflightResult())
    r.feed(GpuReport(Failure("GPU lost", "reboot", severity=Severity.GPU_FATAL, code="gpu")))
    assert r.state.phase is Phase.FAILED


def test_a_single_node_ignores_group_events() -> None:
    r = Run()
    r.start_ready(100)
    for ev in (RankStart(1), RankStop("x"), GroupReady(False, "x")):
        assert r.feed(ev) == []
    assert r.state.phase is Phase.READY


def test_a_stop_on_request_says_so_not_the_last_failure() -> None:
    r = head_ready()
    r.feed(GroupFailed(Failure("group restart: rank 1: exited", "h", code="cluster"), 1))
    stopped(r, 100)
    r.tick_until(r.clock.t + 60.0)
    r.feed(PreflightResult())
    r.feed(Spawned(101))
    r.feed(ReadyProbe(101, True))
    r.feed(GroupReady(True, "formed"))
    r.feed(StopRequested())
    stopped(r, 101)
    exits = [a for a in r.actions if isinstance(a, Exit)]
    assert [(e.code, e.reason) for e in exits] == [(0, "stopped on request")]
