"""The control channel between the daemon and the gate: one JSON object per line over a
socketpair. Pure (no I/O); both sides use it. Leaf module of the gate package.

daemon -> gate:
  {"type": "settings", ...GateSettings}   first, and again on a reload
  {"type": "view", ...UpstreamView}       whenever the daemon's picture of vLLM changes
  {"type": "drain", "timeout": S}         stop admitting to this vLLM; report drained
  {"type": "resume"}                      a drain that is no longer wanted
  {"type": "ping", "n": N}                are you alive (every 2 s)
gate -> daemon:
  {"type": "hello", "pid": N}             serving on the inherited sockets
  {"type": "stats", ...GateStats}         when the counters change (at most every 0.2 s)
  {"type": "drained", "in_flight_left": N, "waited_s": S, "timed_out": bool}
  {"type": "pong", "n": N}                the answer to ping N, from the gate's event loop

A line that is not JSON, not an object, of an unknown type or with wrong fields is a
`ProtocolError`; the reader logs it (`gate.control_malformed`) and goes on. A line longer than
MAX_LINE is cut off and dropped, never buffered without bound.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import Any

MAX_LINE = 64 * 1024


class ProtocolError(ValueError):
    """A control line that cannot be understood. Its text is safe to log (truncated)."""


@dataclass(frozen=True, slots=True)
class UpstreamView:
    """What the daemon knows about vLLM, as the gate needs it."""

    phase: str  # states.Phase value: starting, loading, ready, unhealthy, ...
    ready: bool  # forward requests now
    upstream: str  # "127.0.0.1:11107": where vLLM listens
    cause: str | None = None  # why not ready (last failure), for the 503's message
    last_load_s: float | None = None  # how long the last load took, for Retry-After
    phase_since: float | None = None  # CLOCK_MONOTONIC seconds (one clock for all processes)
    given_up: bool = False  # no vLLM is coming (gave up, or the unit stops): 503 at once

    def __post_init__(self) -> None:
        if self.ready and self.given_up:
            raise ProtocolError("a view cannot be both ready and given up")

    def to_line(self) -> bytes:
        return encode({"type": "view", **asdict(self)})


@dataclass(frozen=True, slots=True)
class GateSettings:
    """What the gate child needs from the config. No secret: the key is read from its file."""

    hold_timeout: float
    max_held: int
    drain_timeout: float
    ollama: bool
    aliases: tuple[str, ...]  # served model names; the first is the primary
    model: str  # vllm.model (for /api/show details)
    max_model_len: int | None = None  # from vllm.args, for num_ctx checks
    api_key_file: str | None = None
    # where the daemon serves its own /metrics (nika_* and vLLM's): the gate's /metrics
    # answers from there, so one scrape sees both even while vLLM is down
    metrics_url: str | None = None
    log_format: str = "keyvalue"
    log_level: str = "info"

    def to_line(self) -> bytes:
        return encode({"type": "settings", **asdict(self)})


@dataclass(frozen=True, slots=True)
class GateStats:
    """The gate's counters, for STATUS and `nika-supervisor status`."""

    in_flight: int = 0  # forwarded to vLLM, not finished
    held: int = 0  # waiting for a ready vLLM
    served: int = 0  # finished, any status from vLLM
    rejected: int = 0  # 503s from the gate since it started (hold timeout, max_held, gave up)
    retried: int = 0  # requests sent again after vLLM failed them before any byte
    broken_streams: int = 0  # responses cut by vLLM after bytes were sent (error event sent)
    draining: bool = False
    views: int = 0  # upstream views received (from this gate process's start)

    def to_line(self) -> bytes:
        return encode({"type": "stats", **asdict(self)})


def status_text(stats: GateStats) -> str:
    """The gate's part of STATUS= and `nika-supervisor status`: short, fixed wording."""
    drain = ", draining" if stats.draining else ""
    return (f"gate: {stats.in_flight} in flight, {stats.held} held, "
            f"{stats.rejected} rejected (503){drain}")


def encode(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


def decode(line: bytes) -> dict[str, Any]:
    """One line -> a message with a known `type`; ProtocolError otherwise."""
    try:
        obj = json.loads(line)
    except (ValueError, UnicodeDecodeError) as e:
        raise ProtocolError(f"not JSON ({e}): {_show(line)}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"not a JSON object: {_show(line)}")
    kind = obj.get("type")
    if kind not in _TYPES:
        raise ProtocolError(f"unknown message type {kind!r}: {_show(line)}")
    return obj


def view_from(msg: dict[str, Any]) -> UpstreamView:
    view: UpstreamView = _build(UpstreamView, msg)
    return view


def settings_from(msg: dict[str, Any]) -> GateSettings:
    s = _build(GateSettings, msg)
    return GateSettings(**{**asdict(s), "aliases": tuple(s.aliases)})


def stats_from(msg: dict[str, Any]) -> GateStats:
    stats: GateStats = _build(GateStats, msg)
    return stats


_TYPES = {"settings", "view", "drain", "resume", "ping", "hello", "stats", "drained", "pong"}
_CHECKS: dict[str, tuple[type, ...]] = {
    "phase": (str,), "ready": (bool,), "upstream": (str,), "cause": (str, type(None)),
    "last_load_s": (int, float, type(None)), "phase_since": (int, float, type(None)),
    "given_up": (bool,), "hold_timeout": (int, float), "max_held": (int,),
    "drain_timeout": (int, float), "ollama": (bool,), "aliases": (list, tuple),
    "model": (str,), "max_model_len": (int, type(None)), "api_key_file": (str, type(None)),
    "metrics_url": (str, type(None)),
    "log_format": (str,), "log_level": (str,), "in_flight": (int,), "held": (int,),
    "served": (int,), "rejected": (int,), "retried": (int,), "broken_streams": (int,),
    "draining": (bool,), "views": (int,),
}


def _build(cls: Any, msg: dict[str, Any]) -> Any:
    kwargs = {}
    for f in fields(cls):
        if f.name in msg:
            value = msg[f.name]
            ok = _CHECKS.get(f.name, (object,))
            if not isinstance(value, ok) or (isinstance(value, bool) and bool not in ok):
                raise ProtocolError(f"{msg.get('type')}.{f.name}: unexpected {value!r}")
            kwargs[f.name] = value
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field missing
        raise ProtocolError(f"{msg.get('type')}: {e}") from None


def _show(line: bytes) -> str:
    return repr(line[:120]) + ("..." if len(line) > 120 else "")


class LineBuffer:
    """Splits a byte stream into lines, dropping (and reporting) any over MAX_LINE."""

    def __init__(self, limit: int = MAX_LINE) -> None:
        self.limit = limit
        self._buf = bytearray()
        self._skipping = False

    def feed(self, data: bytes) -> tuple[list[bytes], int]:
        """Return (complete lines, how many over-long lines were dropped)."""
        self._buf += data
        lines: list[bytes] = []
        dropped = 0
        while True:
            nl = self._buf.find(b"\n")
            if nl < 0:
                if len(self._buf) > self.limit:
                    if not self._skipping:
                        dropped += 1
                    self._skipping = True
                    self._buf.clear()
                return lines, dropped
            line = bytes(self._buf[:nl])
            del self._buf[:nl + 1]
            if self._skipping:
                self._skipping = False
                continue
            if len(line) > self.limit:
                dropped += 1
                continue
            if line.strip():
                lines.append(line)
