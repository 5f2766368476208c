"""/proc/meminfo is read by one helper (nika_supervisor/meminfo.py) for both the doctor and the
GPU sampler; no helper is defined twice in the package."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

from nika_supervisor.meminfo import read_meminfo, used_and_total

PACKAGE = Path(__file__).resolve().parents[2] / "nika_supervisor"
MEMINFO = """MemTotal:       125410476 kB
MemFree:         1234567 kB
MemAvailable:   50744608 kB
HugePages_Total:       4
garbage line
Broken:          lots kB
"""


def test_fields_in_bytes(tmp_path: Path) -> None:
    """kB values are bytes x1024, unitless counts stay counts, unparsable lines are left out."""
    f = tmp_path / "meminfo"
    f.write_text(MEMINFO)
    assert read_meminfo(str(f)) == {"MemTotal": 125410476 * 1024, "MemFree": 1234567 * 1024,
                                    "MemAvailable": 50744608 * 1024, "HugePages_Total": 4}


def test_used_is_total_minus_available(tmp_path: Path) -> None:
    """The unified-memory figure: (MemTotal - MemAvailable, MemTotal); None without both."""
    f = tmp_path / "meminfo"
    f.write_text(MEMINFO)
    assert used_and_total(read_meminfo(str(f))) == ((125410476 - 50744608) * 1024,
                                                    125410476 * 1024)
    f.write_text("MemTotal:       125410476 kB\n")
    assert used_and_total(read_meminfo(str(f))) is None


def test_unreadable_file_is_empty(tmp_path: Path) -> None:
    """A missing file reads as no fields (callers report 'cannot read'), never raises."""
    assert read_meminfo(str(tmp_path / "nope")) == {}
    assert used_and_total({}) is None


def test_the_real_proc_meminfo() -> None:
    """This machine's /proc/meminfo has a total and an available figure."""
    used, total = used_and_total(read_meminfo()) or (None, None)
    assert total is not None and used is not None and 0 <= used <= total


def test_no_public_helper_is_defined_in_two_modules() -> None:
    """A helper shared by two modules lives in one (read_meminfo was once in doctor.py and
    gpu/sample.py, with two different answers; backoff_delay in budget.py and history.py): no
    two modules define a public function of the same name and the same parameters. (The
    entry points' `main`, and unrelated functions that share a name only, may repeat.)"""
    where: dict[tuple[str, tuple[str, ...]], list[str]] = defaultdict(list)
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.parse(path.read_text(), str(path)).body:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and \
                    not node.name.startswith("_") and node.name != "main":
                params = tuple(a.arg for a in (*node.args.posonlyargs, *node.args.args))
                where[(node.name, params)].append(str(path.relative_to(PACKAGE)))
    twice = {f"{name}({', '.join(params)})": files for (name, params), files in where.items()
             if len(files) > 1}
    assert not twice, f"defined in more than one module (keep one copy and import it): {twice}"
