"""The failure-signature table: its types, and loading plus validating signatures.yaml.

The table is data (signatures.yaml, next to this file). A table that does not validate is a
bug in this package, caught by tests/diagnosis; `load_table` raises SignatureTableError
naming every problem, never returns a half-usable table.

Each signature is one regular expression searched in single lines of vLLM's output, with
a verdict (retry / retry-after-cleanup / give-up), a cause template (named groups of the
regex, plus `{exit}` and `{first_error}`), a one-line fix hint, the source the line was
taken from, and example lines that must match it (and be diagnosed as it: an earlier
signature must not shadow it). The file order is the priority order: when several
signatures matched the output of one vLLM run, the earliest in the file is the diagnosis,
so the specific root causes come before generic ones such as EngineDeadError.

Exit rules apply when no line signature matched: they look at the exit status only.
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from importlib import resources
from typing import Any

import yaml

MAX_MATCH_CHARS = 4096  # a line is matched on its first 4 KiB (vLLM lists 400 archs on one)
TEMPLATE_EXTRAS = frozenset({"exit", "first_error"})


class Verdict(StrEnum):
    RETRY = "retry"  # restart with backoff, within the restart budget
    # a leftover of an earlier run may be the cause (port holder, stale GPU process, page
    # cache): restart after the orphan/stale-holder cleanup; the same cause twice in a row
    # gives up
    RETRY_AFTER_CLEANUP = "retry-after-cleanup"
    GIVE_UP = "give-up"  # deterministic: retrying cannot help (exit 79, MODEL_PROBLEM)


class SignatureTableError(ValueError):
    """signatures.yaml is malformed; lists every problem found."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid signature table:\n  " + "\n  ".join(problems))


@dataclass(frozen=True, slots=True)
class Signature:
    id: str
    verdict: Verdict
    regex: re.Pattern[str]
    cause: str
    hint: str
    source: str
    examples: tuple[str, ...]
    unless: re.Pattern[str] | None = None  # a matching line that also matches this is ignored
    verdict_after_ready: Verdict | None = None  # when vLLM had been ready (not during startup)
    counter_examples: tuple[str, ...] = ()

    def match(self, line: str) -> re.Match[str] | None:
        m = self.regex.search(line, 0, MAX_MATCH_CHARS)
        if m is None or (self.unless is not None and self.unless.search(line)):
            return None
        return m


@dataclass(frozen=True, slots=True)
class ExitRule:
    """A diagnosis from the exit status alone, used when no line signature matched."""

    id: str
    verdict: Verdict
    cause: str
    hint: str
    returncode: int | str | None = None  # an int, "nonzero", or None (any)
    signal: int | str | None = None  # an int, "any", or None (must have exited, not signalled)
    needs_error_line: bool = False  # only if an exception line was seen ({first_error})

    def applies(self, returncode: int | None, sig: int | None, has_error_line: bool) -> bool:
        if self.needs_error_line and not has_error_line:
            return False
        if self.signal is not None:
            return sig is not None and (self.signal == "any" or sig == self.signal)
        if sig is not None or returncode is None:
            return False
        if self.returncode == "nonzero":
            return returncode != 0
        return self.returncode is None or returncode == self.returncode


@dataclass(frozen=True, slots=True)
class SignatureTable:
    prefilter: tuple[str, ...]  # a line is matched only if it contains one of these
    signatures: tuple[Signature, ...]
    exit_rules: tuple[ExitRule, ...]

    def gate(self, line: str) -> bool:
        return any(p in line for p in self.prefilter)

    def first_match(self, line: str) -> tuple[Signature, re.Match[str]] | None:
        if not self.gate(line):
            return None
        for sig in self.signatures:
            m = sig.match(line)
            if m is not None:
                return sig, m
        return None


# ------------------------------------------------------------------------------ loading


def default_table_text() -> str:
    return resources.files("nika_supervisor.diagnosis").joinpath("signatures.yaml").read_text(
        encoding="utf-8")


def load_table(text: str | None = None) -> SignatureTable:
    """Parse and validate a table (the packaged signatures.yaml by default)."""
    raw = yaml.safe_load(default_table_text() if text is None else text)
    problems: list[str] = []
    if not isinstance(raw, dict) or raw.get("version") != 1:
        raise SignatureTableError(["the top level must be a mapping with version: 1"])
    unknown = set(raw) - {"version", "prefilter", "signatures", "exit_rules"}
    if unknown:
        problems.append(f"unknown top-level keys: {sorted(unknown)}")
    prefilter = raw.get("prefilter")
    if not (isinstance(prefilter, list) and prefilter
            and all(isinstance(p, str) and p for p in prefilter)):
        problems.append("prefilter must be a non-empty list of non-empty strings")
        prefilter = []
    sigs = [s for i, e in enumerate(_list(raw, "signatures", problems))
            if (s := _signature(i, e, problems)) is not None]
    rules = [r for i, e in enumerate(_list(raw, "exit_rules", problems))
             if (r := _exit_rule(i, e, problems)) is not None]
    ids = [s.id for s in sigs] + [r.id for r in rules]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        problems.append(f"duplicate ids: {dupes}")
    table = SignatureTable(tuple(prefilter), tuple(sigs), tuple(rules))
    problems.extend(_check_examples(table))
    if problems:
        raise SignatureTableError(problems)
    return table


def _list(raw: Mapping[str, Any], key: str, problems: list[str]) -> list[Any]:
    value = raw.get(key)
    if not isinstance(value, list) or not value:
        problems.append(f"{key} must be a non-empty list")
        return []
    return value


_SIG_KEYS = {"id", "verdict", "pattern", "unless", "verdict_after_ready", "cause", "hint",
             "source", "examples", "counter_examples"}
_RULE_KEYS = {"id", "verdict", "cause", "hint", "source", "returncode", "signal",
              "needs_error_line"}


def _text(e: Mapping[str, Any], key: str, where: str, problems: list[str]) -> str:
    v = e.get(key)
    if not isinstance(v, str) or not v.strip():
        problems.append(f"{where}: {key} must be a non-empty string")
        return ""
    return v.strip()


def _verdict(v: object, where: str, problems: list[str]) -> Verdict | None:
    try:
        return Verdict(str(v))
    except ValueError:
        problems.append(f"{where}: verdict must be one of {[x.value for x in Verdict]}, "
                        f"got {v!r}")
        return None


def _regex(v: object, where: str, problems: list[str]) -> re.Pattern[str] | None:
    if not isinstance(v, str) or not v:
        problems.append(f"{where}: must be a non-empty regular expression")
        return None
    try:
        return re.compile(v)
    except re.error as err:
        problems.append(f"{where}: bad regular expression: {err}")
        return None


def _fields(template: str) -> set[str]:
    return {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}


def _signature(i: int, e: object, problems: list[str]) -> Signature | None:
    if not isinstance(e, dict):
        problems.append(f"signatures[{i}]: must be a mapping")
        return None
    where = f"signature {e.get('id', i)!s}"
    n = len(problems)
    if set(e) - _SIG_KEYS:
        problems.append(f"{where}: unknown keys {sorted(set(e) - _SIG_KEYS)}")
    sid, cause = _text(e, "id", where, problems), _text(e, "cause", where, problems)
    hint, source = _text(e, "hint", where, problems), _text(e, "source", where, problems)
    verdict = _verdict(e.get("verdict"), where, problems)
    after = (_verdict(e["verdict_after_ready"], where, problems)
             if "verdict_after_ready" in e else None)
    regex = _regex(e.get("pattern"), f"{where}: pattern", problems)
    unless = _regex(e["unless"], f"{where}: unless", problems) if "unless" in e else None
    examples = e.get("examples")
    if not (isinstance(examples, list) and examples and all(isinstance(x, str) for x in examples)):
        problems.append(f"{where}: examples must be a non-empty list of lines")
        examples = []
    counter = e.get("counter_examples", [])
    if not (isinstance(counter, list) and all(isinstance(x, str) for x in counter)):
        problems.append(f"{where}: counter_examples must be a list of lines")
        counter = []
    if regex is not None:
        for template in (cause, hint):
            missing = _fields(template) - set(regex.groupindex) - TEMPLATE_EXTRAS
            if missing:
                problems.append(f"{where}: template names {sorted(missing)}, which the "
                                "pattern does not capture")
    if len(problems) > n or verdict is None or regex is None:
        return None
    return Signature(sid, verdict, regex, cause, hint, source, tuple(examples), unless, after,
                     tuple(counter))


def _exit_rule(i: int, e: object, problems: list[str]) -> ExitRule | None:
    if not isinstance(e, dict):
        problems.append(f"exit_rules[{i}]: must be a mapping")
        return None
    where = f"exit rule {e.get('id', i)!s}"
    n = len(problems)
    if set(e) - _RULE_KEYS:
        problems.append(f"{where}: unknown keys {sorted(set(e) - _RULE_KEYS)}")
    rid, cause = _text(e, "id", where, problems), _text(e, "cause", where, problems)
    hint = _text(e, "hint", where, problems)
    _text(e, "source", where, problems)
    verdict = _verdict(e.get("verdict"), where, problems)
    rc, sig = e.get("returncode"), e.get("signal")
    if not (rc is None or rc == "nonzero" or (isinstance(rc, int) and not isinstance(rc, bool))):
        problems.append(f"{where}: returncode must be an integer or 'nonzero'")
    if not (sig is None or sig == "any" or (isinstance(sig, int) and not isinstance(sig, bool))):
        problems.append(f"{where}: signal must be an integer or 'any'")
    needs = e.get("needs_error_line", False)
    if not isinstance(needs, bool):
        problems.append(f"{where}: needs_error_line must be true or false")
    for template in (cause, hint):
        extra = _fields(template) - TEMPLATE_EXTRAS
        if extra:
            problems.append(f"{where}: template names unknown fields {sorted(extra)}")
        if "first_error" in _fields(template) and not needs:
            problems.append(f"{where}: uses {{first_error}} without needs_error_line: true")
    if len(problems) > n or verdict is None:
        return None
    return ExitRule(rid, verdict, cause, hint, rc, sig, bool(needs))


def _check_examples(table: SignatureTable) -> list[str]:
    """Every example passes the prefilter and is diagnosed as its own signature."""
    problems = []
    for sig in table.signatures:
        for line in sig.examples:
            if not table.gate(line):
                problems.append(f"signature {sig.id}: example misses the prefilter: {line!r}")
                continue
            hit = table.first_match(line)
            if hit is None:
                problems.append(f"signature {sig.id}: example does not match: {line!r}")
            elif hit[0].id != sig.id:
                problems.append(f"signature {sig.id}: example is shadowed by {hit[0].id}: "
                                f"{line!r}")
        for line in sig.counter_examples:
            if sig.match(line) is not None:
                problems.append(f"signature {sig.id}: counter-example matches: {line!r}")
    return problems
