"""docs/ARCHITECTURE.md cannot drift from the code: its module table lists every module and
only those, and its lists of events and actions are exactly the policy's vocabulary."""

from __future__ import annotations

import re
import typing
from pathlib import Path

from nika_supervisor import actions, events

REPO = Path(__file__).resolve().parents[2]
DOC = (REPO / "docs" / "ARCHITECTURE.md").read_text()
PKG = REPO / "nika_supervisor"


def _table_modules() -> set[str]:
    section = DOC.split("## Modules (who owns what)", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `([^`]+)` \|", section, re.M))


def _code_modules() -> set[str]:
    files = {p.name for p in PKG.glob("*.py") if p.name not in ("__init__.py", "__main__.py")}
    packages = {f"{p.name}/" for p in PKG.iterdir() if (p / "__init__.py").exists()}
    return files | packages


def _bullet(name: str) -> set[str]:
    text = DOC.split(f"- **{name}**:", 1)[1].split("\n- **", 1)[0]
    return set(re.findall(r"`(\w+)`", text))


def test_module_table_lists_every_module() -> None:
    documented, actual = _table_modules(), _code_modules()
    assert documented == actual, (f"in the code, not in docs/ARCHITECTURE.md: "
                                  f"{sorted(actual - documented)}; documented but gone: "
                                  f"{sorted(documented - actual)}")


def test_events_and_actions_are_the_documented_ones() -> None:
    for module, union, name in ((events, events.Event, "events.py"),
                                (actions, actions.Action, "actions.py")):
        actual = {t.__name__ for t in typing.get_args(union)}
        assert _bullet(name) == actual, (name, sorted(_bullet(name) ^ actual))
        assert all(hasattr(module, n) for n in actual)


def test_every_phase_move_in_the_doc_is_the_table() -> None:
    from nika_supervisor.states import ALLOWED, Phase

    block = DOC.split("```\nSTARTING ->", 1)[1].split("```", 1)[0]
    lines = ("STARTING ->" + block).strip().splitlines()
    doc: dict[str, set[str]] = {}
    for line in lines:
        if "->" not in line:
            continue
        src, dst = line.split("->", 1)
        doc[src.strip()] = set(re.findall(r"\b[A-Z]+\b", re.sub(r"\(.*?\)", "", dst)))
    for phase in Phase:
        if ALLOWED[phase]:
            assert doc[phase.name] == {p.name for p in ALLOWED[phase]}, phase
