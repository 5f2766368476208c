"""Failure diagnosis: known vLLM failure signatures (data, signatures.yaml) and the matcher.

    d = Diagnoser.load()          # the packaged table, validated
    d.reset()                     # a new vLLM child starts
    d.feed(line)                  # every output line, from the log pump's threads
    d.conclude(returncode, signal, during_startup) -> Diagnosis | None   # at an unasked exit

Verdicts: retry (backoff, within the budget), retry-after-cleanup (a leftover may be the
cause; the same cause twice in a row becomes give-up), give-up (deterministic: exit 79).
"""

from nika_supervisor.diagnosis.matcher import Diagnoser, Diagnosis, exit_text
from nika_supervisor.diagnosis.table import SignatureTableError, Verdict, load_table

__all__ = ["Diagnoser", "Diagnosis", "SignatureTableError", "Verdict", "exit_text",
           "load_table"]
