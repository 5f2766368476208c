"""Test doubles live in tests/helpers/, never in the installed package: nothing under
nika_supervisor/ is a module named fake* or a class named Fake*."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "nika_supervisor"


def doubles_in(root: Path) -> list[str]:
    """Modules named fake* and classes named Fake* (at any depth) under root."""
    found = [str(p.relative_to(root)) for p in sorted(root.rglob("*"))
             if p.name.lower().startswith("fake")]
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ClassDef) and node.name.lower().startswith("fake"):
                found.append(f"{path.relative_to(root)}:{node.lineno} class {node.name}")
    return found


def test_the_package_ships_no_test_doubles() -> None:
    """FakeClock and the fake pynvml moved to tests/helpers/ (clock.py, fake_nvml.py)."""
    assert doubles_in(PACKAGE) == [], "move these to tests/helpers/"


def test_the_scan_finds_fake_modules_and_classes(tmp_path: Path) -> None:
    """The scanner itself: a fake*.py module and a nested Fake* class are both found."""
    (tmp_path / "gpu").mkdir()
    (tmp_path / "gpu" / "fake.py").write_text("x = 1\n")
    (tmp_path / "clock.py").write_text("class Clock:\n    class FakeTick:\n        pass\n")
    assert doubles_in(tmp_path) == ["gpu/fake.py", "clock.py:2 class FakeTick"]
