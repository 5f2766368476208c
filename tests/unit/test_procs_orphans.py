"""Finding what an earlier daemon left (procs.scan_marked, procs.recorded_group) with real
process groups: a marked leader, and a member whose environment carries no marker (as vLLM's
renamed EngineCore and Worker processes show none)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.wait import poll_for

from nika_supervisor import procs

# The leader carries the marker and starts a member with an empty environment, in its group.
LEADER = """
import subprocess, sys, time
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], env={})
time.sleep(600)
"""


@pytest.fixture
def group() -> Iterator[tuple[int, str]]:
    token = uuid.uuid4().hex
    p = subprocess.Popen([sys.executable, "-c", LEADER], start_new_session=True,
                         env={**os.environ, "NIKA_TEST_MARK": token})
    try:
        poll_for(lambda: len(procs.group_members(p.pid)) == 2 or None, 10,
                 "the leader and its member")
        yield p.pid, token
    finally:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(10)
        poll_for(lambda: not procs.group_members(p.pid) or None, 10, "the group to end")


def test_the_scan_finds_the_unmarked_members_of_a_marked_group(group) -> None:
    pgid, token = group
    found = {i.pid for i in procs.scan_marked("NIKA_TEST_MARK", token)}
    members = {i.pid for i in procs.group_members(pgid)}
    assert found == members and pgid in found and len(found) == 2


def test_a_recorded_group_is_found_after_its_marked_leader_died(group, tmp_path: Path) -> None:
    pgid, token = group
    record = str(tmp_path / "vllm.pgid")
    procs.record_group(record, pgid)
    os.kill(pgid, signal.SIGKILL)  # the marked leader dies; its unmarked member lives on
    poll_for(lambda: not procs.pid_alive(pgid) or None, 10, "the leader to die")
    assert procs.scan_marked("NIKA_TEST_MARK", token) == []  # nothing carries the marker
    left = procs.recorded_group(record)
    assert [i.pgid for i in left] == [pgid] and left[0].pid != pgid


def test_a_record_whose_pid_is_now_another_process_is_ignored(tmp_path: Path) -> None:
    record = tmp_path / "vllm.pgid"
    record.write_text(f"{os.getpid()} 1\n")  # this pid, with another start time
    assert procs.recorded_group(str(record)) == []
    record.write_text("garbage")
    assert procs.recorded_group(str(record)) == []
    assert procs.recorded_group(str(tmp_path / "missing")) == []
