"""Log rendering: stable event names, key=value fields, journald priority prefixes."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

from nika_supervisor import log


def test_keyvalue_with_journal_priority_prefix() -> None:
    """Under journald each line starts with <N> from the level, and level= is dropped."""
    r = log.Renderer("keyvalue", journal=True, colors=False)
    assert r.render({"event": "health.failed", "level": "warning", "probe": "health",
                     "reason": "no answer within 10s", "consecutive": 2}) == (
        '<4>health.failed probe=health reason="no answer within 10s" consecutive=2')
    assert r.render({"event": "vllm.ready", "level": "info", "load_s": 1.5}) == (
        "<6>vllm.ready load_s=1.5")


def test_json_lines() -> None:
    """json format is one object per line with event and level."""
    r = log.Renderer("json", journal=False, colors=False)
    d = json.loads(r.render({"event": "vllm.exited", "level": "error", "returncode": 0}))
    assert d["event"] == "vllm.exited" and d["level"] == "error" and d["returncode"] == 0


def test_vllm_output_level_from_its_own_words() -> None:
    """vLLM's INFO/WARNING/ERROR word decides the priority of its forwarded line."""
    assert log.output_level("INFO 11-27 07:00:00 [api_server.py:1] Started") == "info"
    assert log.output_level("(EngineCore_DP0 pid=9) ERROR 11-27 x") == "error"
    assert log.output_level("WARNING 11-27 y") == "warning"
    assert log.output_level("Traceback (most recent call last):") == "error"
    assert log.output_level("plain text") == "info"


def test_journal_stream_must_name_our_stdout(tmp_path: Path) -> None:
    """JOURNAL_STREAM counts only when its device:inode is our stream's."""
    f = open(tmp_path / "out", "w")  # noqa: SIM115
    st = os.fstat(f.fileno())
    assert log.journal_stream_is(f, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
    assert not log.journal_stream_is(f, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"})
    assert not log.journal_stream_is(f, {})
    f.close()


def test_render_output_filters_by_level_and_writes_whole_lines() -> None:
    """The fast path renders a batch of vLLM lines and honours the minimum level."""
    out = io.StringIO()
    log.configure("keyvalue", "warning", stream=out)
    log.render_output([("stdout", "INFO hello"), ("stderr", "ERROR boom")],
                      min_level=log.LEVELS["warning"])
    assert out.getvalue() == 'vllm.output level=error stream=stderr line="ERROR boom"\n'
