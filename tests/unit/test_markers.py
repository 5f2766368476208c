"""The pytest markers declared in pyproject.toml are exactly the ones the tests carry, and the
`-m` expressions of the Makefile and scripts/test.sh name only declared markers: a marker
nobody carries makes `-m "not X"` filter nothing while looking as if it did."""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# pytest's own marks and the plugins' (pytest-timeout): not declared in pyproject.
BUILTIN = {"parametrize", "skip", "skipif", "xfail", "usefixtures", "filterwarnings",
           "timeout"}


def declared() -> set[str]:
    ini = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    return {m.split(":", 1)[0].strip() for m in ini["markers"]}


def carried(root: Path) -> dict[str, list[str]]:
    """marker -> the files that use pytest.mark.<marker> (decorator or pytestmark)."""
    out: dict[str, list[str]] = {}
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
                    and node.value.attr == "mark" and isinstance(node.value.value, ast.Name)
                    and node.value.value.id == "pytest" and node.attr not in BUILTIN):
                out.setdefault(node.attr, []).append(str(path.relative_to(root)))
    return out


def selections() -> dict[str, set[str]]:
    """Every `-m "EXPR"` in the Makefile and scripts/test.sh -> the marker names in it."""
    out = {}
    for name in ("Makefile", "scripts/test.sh"):
        for expr in re.findall(r'-m\s+"([^"]*)"', (REPO / name).read_text()):
            out[f"{name}: -m \"{expr}\""] = set(re.findall(r"\w+", expr)) - {"and", "or",
                                                                               "not"}
    return out


def test_every_declared_marker_is_carried_by_a_test() -> None:
    """No declared marker is left unused, and no test carries an undeclared one."""
    used = carried(REPO / "tests")
    assert not declared() - set(used), f"declared in pyproject, carried by no test: " \
        f"{sorted(declared() - set(used))}"
    assert not set(used) - declared(), {m: used[m] for m in set(used) - declared()}


def test_selections_name_only_declared_markers() -> None:
    """`make test-fast` and scripts/test.sh select with markers that exist."""
    bad = {where: sorted(names - declared()) for where, names in selections().items()
           if names - declared()}
    assert not bad, f"-m expressions naming undeclared markers: {bad}"
    assert any("e2e" in names for names in selections().values())  # the scan found test-fast


def test_the_scan_finds_decorators_and_module_marks(tmp_path: Path) -> None:
    """The scanner itself: decorators, pytestmark lists and called marks are found."""
    (tmp_path / "t.py").write_text("import pytest\n"
                                   "pytestmark = [pytest.mark.alpha, pytest.mark.timeout(5)]\n"
                                   "@pytest.mark.beta(reason='x')\n"
                                   "@pytest.mark.parametrize('a', [1])\n"
                                   "def test_a(a): pass\n")
    assert carried(tmp_path) == {"alpha": ["t.py"], "beta": ["t.py"]}
