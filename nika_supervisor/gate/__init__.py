"""The gate: the public front door in front of vLLM (issue 10).

A child process of the daemon serves the public sockets the daemon bound once; it holds
requests while vLLM is not ready, drains before planned restarts, passes every route through
and speaks Ollama's API too. The daemon's side is `GateProcess` (process.py); the child's
entry point is `python -m nika_supervisor.gate` (server.py); they talk over protocol.py.
"""

from nika_supervisor.gate.process import (
    GateBindError,
    GateDrained,
    GateEvent,
    GateExited,
    GateProcess,
    GateStarted,
    settings_for,
    upstream_of,
)
from nika_supervisor.gate.protocol import GateSettings, GateStats, UpstreamView, status_text

__all__ = [
    "GateBindError",
    "GateDrained",
    "GateEvent",
    "GateExited",
    "GateProcess",
    "GateSettings",
    "GateStarted",
    "GateStats",
    "UpstreamView",
    "settings_for",
    "status_text",
    "upstream_of",
]
