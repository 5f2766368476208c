"""The matcher: watches vLLM's output lines and, at exit, names the failure.

`Diagnoser.feed` is called by the log pump's reader threads for every line vLLM prints, so
it is thread-safe and cheap: a line that contains none of the table's prefilter substrings
costs a few substring tests and a deque append. Only lines that pass the prefilter are
matched against the signatures. The first line of each signature is kept (the first is the
root cause; a traceback repeats it), with its sequence number.

`Diagnoser.conclude` runs once per vLLM exit, on the supervisor's thread. It picks the
matched signature that comes first in the table (the table's order is its priority), else
an exit rule, else returns None (the caller describes the bare exit status itself).

A retry-after-cleanup verdict (port taken, memory held by someone else) that repeats on the
next vLLM run becomes give-up: the cleanup did not help.
"""

from __future__ import annotations

import collections
import itertools
import re
import threading
from dataclasses import dataclass
from typing import NamedTuple

from nika_supervisor.diagnosis.table import (
    ExitRule,
    Signature,
    SignatureTable,
    Verdict,
    load_table,
)
from nika_supervisor.failures import Failure, Severity, signal_name

RING_LINES = 200  # recent lines kept for `recent()` (context in STATUS or a bug report)
ERROR_LINES = 64  # exception lines kept, to find the first one of the final failure
RELEVANT_LINES = 5000  # a match older than this many lines before the exit is stale
LINE_CHARS = 300  # a line quoted in a diagnosis is cut to this length

# An exception line of a Python traceback, possibly behind vLLM's log prefixes:
# "(EngineCore pid=1) ERROR 11-27 07:07:20 [core.py:1512] RuntimeError: ..." or a bare
# "OSError: ...". Anchored at the start so that a warning quoting an error in its text
# (vLLM's ulimit warning mentions `OSError: [Errno 24]`) does not count.
_ERROR_LINE = re.compile(
    r"^(?:\(\w+ pid=\d+\) )*"
    r"(?:(?:ERROR|CRITICAL|WARNING) \d\d-\d\d \d\d:\d\d:\d\d \[[^\]]*\] )?"
    r"(?P<error>[A-Za-z_][\w.]*Error: .*)$"
)


@dataclass(frozen=True, slots=True)
class Diagnosis:
    """Why vLLM failed, for `vllm.exited`, STATUS, the state file and `status`."""

    id: str  # a signature or exit-rule id from signatures.yaml
    verdict: Verdict
    cause: str
    hint: str
    line: str | None  # the output line it was recognised by (None: from the exit status)

    @property
    def failure(self) -> Failure:
        """In the one failure vocabulary: give-up is MODEL (exit 79); both retry verdicts are
        RETRY, since every restart follows a cleanup of the whole group and the diagnoser
        itself turns the same cleanup cause twice in a row into give-up."""
        severity = Severity.MODEL if self.verdict is Verdict.GIVE_UP else Severity.RETRY
        return Failure(self.cause, self.hint, severity, self.id)


class _Hit(NamedTuple):
    order: int  # the signature's position in the table
    seq: int  # which output line (1-based) matched
    line: str
    groups: dict[str, str]


def exit_text(returncode: int | None, sig: int | None) -> str:
    """'exited with code 2' / 'was killed by SIGKILL': what `{exit}` renders as.

    Both None: vLLM is still running but its engine is dead (/health answered 503), which
    the supervisor diagnoses before it stops the server: 'stopped serving'."""
    if sig is not None:
        return f"was killed by {signal_name(sig)}"
    if returncode is not None:
        return f"exited with code {returncode}"
    return "stopped serving"


def _cut(line: str) -> str:
    line = line.strip()
    return line if len(line) <= LINE_CHARS else line[:LINE_CHARS - 3] + "..."


class Diagnoser:
    """One per supervisor; `reset()` at every vLLM start, `feed()` every line, `conclude()`."""

    def __init__(self, table: SignatureTable) -> None:
        self.table = table
        self._order = {s.id: i for i, s in enumerate(table.signatures)}
        self._prefilter = table.prefilter
        self._lock = threading.Lock()
        self._ring: collections.deque[str] = collections.deque(maxlen=RING_LINES)
        self._counter = itertools.count(1)  # next() is atomic under the GIL
        self._hits: dict[str, _Hit] = {}
        self._errors: collections.deque[tuple[int, str]] = collections.deque(maxlen=ERROR_LINES)
        self._last: Diagnosis | None = None  # the previous run's diagnosis (kept by reset)

    @classmethod
    def load(cls, text: str | None = None) -> Diagnoser:
        """The packaged signatures.yaml (or `text`), validated; raises SignatureTableError."""
        return cls(load_table(text))

    def reset(self) -> None:
        """A new vLLM child starts: forget the previous child's lines and matches."""
        with self._lock:
            self._ring.clear()
            self._counter = itertools.count(1)
            self._hits = {}
            self._errors.clear()

    def feed(self, line: str) -> None:
        """One line of vLLM's output. Called from the log pump's reader threads.

        The common path takes no lock: next() on itertools.count and deque.append are
        atomic in CPython. Only a line that passes the prefilter is matched under the lock.
        """
        seq = next(self._counter)
        self._ring.append(line)
        for p in self._prefilter:
            if p in line:
                break
        else:
            return
        with self._lock:
            self._match(line, seq)

    def _match(self, line: str, seq: int) -> None:
        # Only lines that passed the prefilter get here; the lock is held.
        m = _ERROR_LINE.match(line, 0, 4096)
        if m is not None:
            self._errors.append((seq, _cut(m.group("error"))))
        for sig in self.table.signatures:
            if sig.id in self._hits:
                continue
            m = sig.match(line)
            if m is not None:
                groups = {k: v for k, v in m.groupdict().items() if v is not None}
                self._hits[sig.id] = _Hit(self._order[sig.id], seq, _cut(line), groups)

    def _tell(self) -> int:
        """How many lines were fed since the last reset (lock held)."""
        # count() has no peek: take one number and start the next count after it. (A feed
        # racing with this may reuse a number; sequence numbers only bound staleness.)
        n = next(self._counter)
        self._counter = itertools.count(n + 1)
        return n - 1

    @property
    def lines_fed(self) -> int:
        with self._lock:
            return self._tell()

    def recent(self, n: int = 20) -> list[str]:
        """The last n lines fed since the last reset (for context in a report)."""
        with self._lock:
            return list(self._ring)[-n:]

    def matched(self) -> list[str]:
        """Ids of the signatures seen since the last reset, in table (priority) order."""
        with self._lock:
            return [i for i, _ in sorted(self._hits.items(), key=lambda kv: kv[1].order)]

    def conclude(self, returncode: int | None, signal: int | None,
                 during_startup: bool) -> Diagnosis | None:
        """At vLLM's exit (one not asked for): the best diagnosis, or None if nothing fits.

        during_startup: vLLM had not become ready. A signature's verdict_after_ready applies
        otherwise (CUDA OOM while serving is retried; while loading it needs a cleanup).
        """
        with self._lock:
            horizon = self._tell() - RELEVANT_LINES
            hits = [h for h in self._hits.values() if h.seq > horizon]
            first_error = next((e for seq, e in self._errors if seq > horizon), None)
            previous = self._last
        exit_desc = exit_text(returncode, signal)
        extras = {"exit": exit_desc, "first_error": first_error or "no error line seen"}
        result: Diagnosis | None = None
        if hits:
            best = min(hits, key=lambda h: h.order)
            sig = self.table.signatures[best.order]
            result = self._from_signature(sig, best, extras, during_startup)
        else:
            rule = self._exit_rule(returncode, signal, first_error is not None)
            if rule is not None:
                fields = _Fields({**extras})
                result = Diagnosis(rule.id, rule.verdict, rule.cause.format_map(fields),
                                   rule.hint.format_map(fields), None)
        if (result is not None and result.verdict is Verdict.RETRY_AFTER_CLEANUP
                and previous is not None and previous.id == result.id):
            result = Diagnosis(result.id, Verdict.GIVE_UP,
                               f"{result.cause} (again, after a cleanup and restart)",
                               result.hint, result.line)
        with self._lock:
            self._last = result
        return result

    @staticmethod
    def _from_signature(sig: Signature, hit: _Hit, extras: dict[str, str],
                        during_startup: bool) -> Diagnosis:
        fields = _Fields({**hit.groups, **extras})
        verdict = sig.verdict
        if not during_startup and sig.verdict_after_ready is not None:
            verdict = sig.verdict_after_ready
        return Diagnosis(sig.id, verdict, sig.cause.format_map(fields),
                         sig.hint.format_map(fields), hit.line)

    def _exit_rule(self, returncode: int | None, sig: int | None,
                   has_error: bool) -> ExitRule | None:
        for rule in self.table.exit_rules:
            if rule.applies(returncode, sig, has_error):
                return rule
        return None


class _Fields(dict[str, str]):
    """Template fields; a group that did not take part in the match renders empty."""

    def __missing__(self, key: str) -> str:
        return ""
