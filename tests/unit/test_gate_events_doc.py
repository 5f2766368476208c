"""The gate's log events are a contract: README's event table lists exactly the `gate.*`
names the code emits."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_readme_lists_exactly_the_gate_events() -> None:
    """Every gate.* name in a log call is in README's table, and the table has no other."""
    code = set()
    for path in (REPO / "nika_supervisor" / "gate").glob("*.py"):
        text = path.read_text()
        code |= set(re.findall(r"\.(?:info|warning|error|debug|critical|log)\(\s*"
                               r"(?:\d+ if \w+ else \d+,\s*)?\"(gate\.[a-z_]+)\"", text))
    table = [line for line in (REPO / "README.md").read_text().splitlines()
             if line.startswith("| `gate.")]
    documented = set()
    for line in table:
        documented |= set(re.findall(r"`(gate\.[a-z_]+)`", line.split("|")[1]))
    assert code, "no gate events found in the code: the pattern is stale"
    assert documented == code
