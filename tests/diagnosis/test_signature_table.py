"""signatures.yaml: the packaged table is valid, and a broken table is refused with reasons."""

from __future__ import annotations

import pytest
import yaml

from nika_supervisor.diagnosis import SignatureTableError, Verdict, load_table
from nika_supervisor.diagnosis.table import default_table_text

# What the issue asks for: each deterministic failure it lists gives up at once.
ISSUE_GIVE_UPS = ["bad_flag", "missing_model", "unsupported_arch", "weights_key",
                  "weights_shared_expert", "ptxas_unknown_arch", "no_nvcc", "nvml_init"]


def test_packaged_table_loads_and_validates() -> None:
    """The shipped table parses; every example matches its own signature and no earlier one."""
    table = load_table()
    assert len(table.signatures) >= 15
    assert [r.id for r in table.exit_rules][:2] == ["killed_sigkill", "exit_zero_unasked"]


def test_issue_failures_are_classified() -> None:
    """The issue's deterministic failures give up; memory held by others and a taken port
    retry once after cleanup; a dead engine retries."""
    verdicts = {s.id: s.verdict for s in load_table().signatures}
    for sig_id in ISSUE_GIVE_UPS:
        assert verdicts[sig_id] is Verdict.GIVE_UP, sig_id
    assert verdicts["free_memory_short"] is Verdict.RETRY_AFTER_CLEANUP
    assert verdicts["cuda_oom"] is Verdict.RETRY_AFTER_CLEANUP
    assert verdicts["port_in_use"] is Verdict.RETRY_AFTER_CLEANUP
    assert verdicts["engine_dead"] is Verdict.RETRY


def test_every_signature_cites_a_source() -> None:
    """Each signature says where its line was seen: a capture file or an upstream reference."""
    for sig in load_table().signatures:
        assert ("captured" in sig.source or "#" in sig.source or ".py" in sig.source), sig.id


def test_generic_signatures_come_last() -> None:
    """EngineDeadError is the lowest priority: any root cause printed with it wins."""
    assert load_table().signatures[-1].id == "engine_dead"


def _table(**changes: object) -> str:
    """The packaged table with the first signature's fields replaced."""
    raw = yaml.safe_load(default_table_text())
    raw["signatures"][0].update(changes)
    return yaml.safe_dump(raw)


@pytest.mark.parametrize(("changes", "problem"), [
    ({"verdict": "maybe"}, "verdict must be one of"),
    ({"pattern": "unrecognized (arguments"}, "bad regular expression"),
    ({"examples": ["a line with error in it that the pattern does not match"]},
     "example does not match"),
    ({"examples": ["no gate words here"]}, "example misses the prefilter"),
    ({"cause": "rejected: {flag}"}, "template names ['flag']"),
    ({"counter_examples": ["api_server.py: error: unrecognized arguments: --x"]},
     "counter-example matches"),
    ({"id": "engine_dead"}, "duplicate ids: ['engine_dead']"),
    ({"colour": "red"}, "unknown keys ['colour']"),
    ({"source": ""}, "source must be a non-empty string"),
])
def test_broken_table_is_refused(changes: dict[str, object], problem: str) -> None:
    """A malformed signature is a SignatureTableError naming the signature and the problem."""
    with pytest.raises(SignatureTableError) as e:
        load_table(_table(**changes))
    assert any(problem in p for p in e.value.problems), e.value.problems


def test_shadowed_example_is_refused() -> None:
    """An example that an earlier signature catches first would never be diagnosed as its
    own signature: the table is refused."""
    raw = yaml.safe_load(default_table_text())
    engine_dead = next(s for s in raw["signatures"] if s["id"] == "engine_dead")
    engine_dead["examples"].append("RuntimeError: CUDA error: out of memory; EngineDeadError")
    with pytest.raises(SignatureTableError, match="shadowed by cuda_oom"):
        load_table(yaml.safe_dump(raw))


def test_exit_rule_using_first_error_must_require_it() -> None:
    """An exit rule that renders {first_error} must say needs_error_line: true."""
    raw = yaml.safe_load(default_table_text())
    raw["exit_rules"][0]["cause"] = "killed after {first_error}"
    with pytest.raises(SignatureTableError, match="without needs_error_line"):
        load_table(yaml.safe_dump(raw))


def test_wrong_version_is_refused() -> None:
    """Only version 1 tables are understood."""
    with pytest.raises(SignatureTableError, match="version: 1"):
        load_table("version: 2\nsignatures: []\n")
