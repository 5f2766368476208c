"""The output pump: vLLM's pipe is always drained, even when the writer is stuck."""

from __future__ import annotations

import subprocess
import sys
import threading

from helpers import poll_for

from nika_supervisor.child import OutputPump

PRODUCER = ("import sys\nw = sys.stdout.write\n"
            "for i in range(100000): w(f'line {i:06d} ' + 'x' * 60 + '\\n')\n"
            "sys.stdout.flush()\n")


def test_stuck_writer_never_blocks_the_child() -> None:
    """With the sink blocked forever, a child writing 100k lines (7 MB, far beyond a 64 KiB
    pipe) still finishes; the excess is dropped and counted, not back-pressured."""
    release = threading.Event()

    def stuck_sink(batch: list[tuple[str, str]]) -> None:
        release.wait()

    proc = subprocess.Popen([sys.executable, "-c", PRODUCER], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    pump = OutputPump(stuck_sink, capacity=1000)
    pump.start({"stdout": proc.stdout, "stderr": proc.stderr})
    try:
        assert proc.wait(timeout=30) == 0, "the child blocked on a full pipe"
        poll_for(lambda: pump.dropped > 0, 10, "dropped lines to be counted")
        assert pump.dropped <= 100_000
    finally:
        release.set()
        pump.close(timeout=5)


def test_tap_sees_every_line_and_sink_gets_them_in_order() -> None:
    """Every line reaches the tap (diagnosis) and the sink, in order, none lost."""
    seen: list[str] = []
    got: list[str] = []
    proc = subprocess.Popen([sys.executable, "-c", PRODUCER], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    pump = OutputPump(lambda batch: got.extend(line for _, line in batch), tap=seen.append)
    pump.start({"stdout": proc.stdout, "stderr": proc.stderr})
    assert proc.wait(timeout=30) == 0
    pump.close(timeout=10)
    assert len(seen) == len(got) == 100_000 and pump.dropped == 0
    assert got[0].startswith("line 000000") and got[-1].startswith("line 099999")
    assert got == sorted(got)


def test_every_line_is_delivered_or_counted_even_a_last_partial_one() -> None:
    """With a one-line queue and a stuck writer, lines are dropped; each one is counted,
    the last line without a newline too (it used to be dropped silently)."""
    release = threading.Event()
    got: list[str] = []

    def sink(batch: list[tuple[str, str]]) -> None:
        release.wait()
        got.extend(line for _, line in batch)

    proc = subprocess.Popen([sys.executable, "-c",
                             "import sys; sys.stdout.write('a\\nb\\nc\\nd\\nlast, no newline')"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    seen: list[str] = []
    pump = OutputPump(sink, tap=seen.append, capacity=1)
    pump.start({"stdout": proc.stdout, "stderr": proc.stderr})
    assert proc.wait(timeout=30) == 0
    poll_for(lambda: pump.drained(pump.pipes) and len(seen) == 5, 10, "the readers to finish")
    release.set()
    pump.close(timeout=5)
    assert seen[-1] == "last, no newline"
    assert pump.dropped > 0 and len(got) + pump.dropped == 5, (got, pump.dropped)
