"""The state file: what `nika-supervisor status` reads. Written atomically (rename), so a
reader never sees half a file.

Location: supervisor.runtime_dir, else $RUNTIME_DIRECTORY (systemd's RuntimeDirectory=), else
/run/nika-vllm as root, else $XDG_RUNTIME_DIR/nika-vllm, else /tmp/nika-vllm-$UID.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

STATE_FILE = "state.json"


def default_runtime_dir(environ: Mapping[str, str] | None = None) -> str:
    env = os.environ if environ is None else environ
    if env.get("RUNTIME_DIRECTORY"):
        return env["RUNTIME_DIRECTORY"].split(":")[0]
    if os.geteuid() == 0:
        return "/run/nika-vllm"
    if env.get("XDG_RUNTIME_DIR"):
        return os.path.join(env["XDG_RUNTIME_DIR"], "nika-vllm")
    return f"/tmp/nika-vllm-{os.geteuid()}"


def state_path(runtime_dir: str) -> Path:
    return Path(runtime_dir) / STATE_FILE


def write_state(runtime_dir: str, state: Mapping[str, Any]) -> None:
    d = Path(runtime_dir)
    d.mkdir(parents=True, exist_ok=True, mode=0o755)
    fd, tmp = tempfile.mkstemp(prefix=".state.", dir=d)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(state, f, indent=2, sort_keys=True, default=str)
            f.write("\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, d / STATE_FILE)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def read_state(runtime_dir: str) -> dict[str, Any] | None:
    try:
        data = json.loads(state_path(runtime_dir).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
