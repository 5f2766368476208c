"""The README's event table lists exactly the log events the code can emit.

Event names are a contract (operators grep the journal for them), so the table is checked
against a static scan of nika_supervisor/. The scan finds an event name (a dotted lower-case
string literal) where it is:
- the first argument of a logger method: `<x>log<y>.info("vllm.ready", ...)` (any receiver
  whose name contains "log": self.log, logger, log, get_logger(); any of debug/info/
  warning/error/critical/exception/msg), or the second of `<x>log<y>.log(level, name)`;
- the first argument, or `event=`, of a call to a function whose name matches EMITTER (the
  policy's `log(...)`, `log_fields(...)` and `Log(...)` actions: log, Log, log_*, _log);
- the value of an "event" key in a dict literal (log.py's fast path for `vllm.output`).
The name may also be a module-level constant holding the literal (`EVENT_STALLED =
"load.stalled"`, then `log(EVENT_STALLED, ...)`). A logger method called with any other
non-literal name cannot be checked, so it fails the test too.

AWAITING_WIRING lists documented events whose name is declared in the package (a constant) but
that nothing emits yet, because the executor does not call their emitter yet; the test fails
once one of them is emitted (drop it from the list) or its declaration is gone.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "nika_supervisor"
README = REPO / "README.md"

EVENT = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z0-9_]+)+$")
LOGGER_METHODS = {"debug", "info", "warning", "error", "critical", "exception", "msg"}
# callables that turn (event, level, fields) into a log line: log, Log, log_fields, _log, and
# the group policy's note (a Note decision the daemon logs)
EMITTER = re.compile(r"^_?([Ll]og(_\w+)?|note)$")
TABLE_HEADER = "| event | level | fields |"

# Documented, declared as a constant by its module, not emitted by anything yet (an event
# whose emitter the executor does not call yet): name -> where it is declared. Empty now.
AWAITING_WIRING: dict[str, str] = {}


def _name(node: ast.expr) -> str:
    """The last name of a callee or receiver: `self.log` -> 'log', `Log` -> 'Log',
    `get_logger()` -> 'get_logger'."""
    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Call):
        return _name(node.func)
    return ""


def _literal(node: ast.expr | None) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def _rel(path: Path, root: Path) -> str:
    return str(path.relative_to(root.parent) if root == PACKAGE else path.relative_to(root))


def declared(root: Path) -> dict[str, str]:
    """Module-level string constants that hold an event name: NAME -> the event name."""
    out: dict[str, str] = {}
    for path in sorted(root.rglob("*.py")):
        for node in ast.parse(path.read_text(), str(path)).body:
            if (isinstance(node, ast.Assign) and len(node.targets) == 1
                    and isinstance(node.targets[0], ast.Name)):
                value = _literal(node.value)
                if value is not None and EVENT.match(value):
                    out[node.targets[0].id] = value
    return out


def emitted(root: Path) -> tuple[dict[str, list[str]], list[str]]:
    """(event name -> ['file:line', ...], logger calls whose name is not a literal)."""
    found: dict[str, list[str]] = {}
    unchecked: list[str] = []
    constants = declared(root)

    def value(node: ast.expr | None) -> str | None:
        """A literal, or a module constant (by name or as module.NAME) holding one."""
        if node is not None and isinstance(node, ast.Name | ast.Attribute):
            return constants.get(_name(node))
        return _literal(node)

    def add(name: str | None, where: str) -> None:
        if name is not None and EVENT.match(name):
            found.setdefault(name, []).append(where)

    for path in sorted(root.rglob("*.py")):
        rel = _rel(path, root)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            where = f"{rel}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Call):
                func = node.func
                first = node.args[0] if node.args else None
                if (isinstance(func, ast.Attribute) and func.attr == "log"
                        and "log" in _name(func.value).lower()):  # logger.log(level, name)
                    first = node.args[1] if len(node.args) > 1 else None
                if (isinstance(func, ast.Attribute) and func.attr in {*LOGGER_METHODS, "log"}
                        and "log" in _name(func.value).lower()):
                    name = value(first)
                    if name is None:
                        unchecked.append(f"{where}: {ast.unparse(node)[:80]}")
                    add(name, where)
                elif EMITTER.match(_name(func)):
                    kw = next((k.value for k in node.keywords if k.arg == "event"), None)
                    add(value(first) or value(kw), where)
            elif isinstance(node, ast.Dict):
                for key, val in zip(node.keys, node.values, strict=True):
                    if key is not None and _literal(key) == "event":
                        add(value(val), where)
    return found, unchecked


def documented(text: str) -> dict[str, int]:
    """Event name -> README line, from the first column of the event table."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == TABLE_HEADER), None)
    assert start is not None, f"README.md has no event table (a line '{TABLE_HEADER}')"
    out: dict[str, int] = {}
    for i in range(start + 2, len(lines)):  # past the header and the | --- | line
        if not lines[i].startswith("|"):
            break
        first_cell = lines[i].split("|")[1]
        for name in re.findall(r"`([^`]+)`", first_cell):
            assert EVENT.match(name), f"README.md:{i + 1}: `{name}` is not an event name"
            assert name not in out, f"README.md:{i + 1}: `{name}` has a row already " \
                f"(README.md:{out[name]})"
            out[name] = i + 1
    return out


def test_readme_event_table_equals_the_events_the_code_emits() -> None:
    """Every emitted event has a row in README's table, and every row's events are emitted."""
    code, unchecked = emitted(PACKAGE)
    docs = documented(README.read_text())
    assert not unchecked, ("logger calls whose event name is not a string literal (the docs "
                           "check cannot see them; pass the name as a literal):\n  "
                           + "\n  ".join(unchecked))
    constants = set(declared(PACKAGE).values())
    wired = sorted(set(AWAITING_WIRING) & set(code))
    undeclared = sorted(set(AWAITING_WIRING) - constants)
    assert not wired and not undeclared, (
        f"AWAITING_WIRING in {Path(__file__).name} is out of date: now emitted (drop them "
        f"from the list): {wired}; no longer declared anywhere in nika_supervisor/: "
        f"{undeclared}")
    missing = sorted(set(code) - set(docs))
    stale = sorted(set(docs) - set(code) - set(AWAITING_WIRING))
    msg = ["README.md's event table (section Logs) and the code disagree."]
    if missing:
        msg.append("Emitted by the code, missing from the README table (add a row with level "
                   "and fields):")
        msg += [f"  {n}  (emitted at {', '.join(code[n])})" for n in missing]
    if stale:
        msg.append("In the README table, emitted nowhere in nika_supervisor/ (event names are "
                   "a contract: restore the event, or drop the row if it was never emitted):")
        msg += [f"  {n}  (README.md:{docs[n]})" for n in stale]
    assert not missing and not stale, "\n".join(msg)


def test_the_scan_finds_each_way_an_event_is_emitted(tmp_path: Path) -> None:
    """The scanner itself: logger methods, the policy's log()/log_fields()/Log() (positional
    or event=) and {"event": ...} dicts are found; prose, non-dotted strings and other calls
    are not; a module constant holding the name counts; a logger call with a computed name
    is reported."""
    (tmp_path / "m.py").write_text(
        "self.log.info('a.one', x=1)\n"
        "logger.warning(\n    'a.two')\n"
        "acts.append(log('a.three', 'error'))\n"
        "Log(event='a.four')\n"
        "acts.append(log_fields('a.six', 'info', {}))\n"
        "render({'event': 'a.five', 'level': 'info'})\n"
        "parser.error('bad flag')\n"
        "self.log.info('notdotted')\n"
        "condition('gpu.not_an_event')\n"
        "self.log.error(name)\n"
        "EVENT_X = 'a.seven'\n"
        "log(EVENT_X, 'info')\n"
        "self.log.info(mod.EVENT_X)\n"
        "get_logger().warning('a.eight')\n"
        "self.log.log(20 if idle else 30, 'a.nine', x=1)\n")
    found, unchecked = emitted(tmp_path)
    assert found == {"a.one": ["m.py:1"], "a.two": ["m.py:2"], "a.three": ["m.py:4"],
                     "a.four": ["m.py:5"], "a.six": ["m.py:6"], "a.five": ["m.py:7"],
                     "a.seven": ["m.py:13", "m.py:14"], "a.eight": ["m.py:15"],
                     "a.nine": ["m.py:16"]}
    assert unchecked == ["m.py:11: self.log.error(name)"]


def test_the_table_parser_reads_every_name_of_a_row() -> None:
    """Rows with several names ('`a.b` / `a.c`') give each; the table ends at a non-row."""
    text = ("intro\n\n| event | level | fields |\n| --- | --- | --- |\n"
            "| `a.b` / `a.c` | info | `x` |\n| `d.e` | warning | y |\n\n| `f.g` | not | it |\n")
    assert documented(text) == {"a.b": 5, "a.c": 5, "d.e": 6}
    with pytest.raises(AssertionError, match=r"README.md:6: `a.c` has a row already"):
        documented(text.replace("| `d.e` |", "| `a.c` |"))
