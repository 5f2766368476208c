"""Logging: structlog events with stable dotted names, one line each, on stdout.

Formats (supervisor.log_format):
- keyvalue: `vllm.ready pid=4242 load_s=45.1` - the journald default;
- console: structlog's console renderer, for a human at a terminal;
- json: one JSON object per line (`event`, `level`, `ts` and the fields);
- auto: console on a TTY, else keyvalue.

Under systemd (JOURNAL_STREAM names our stdout, see systemd.exec(5)) every line starts with
the sd-daemon priority prefix `<N>` (sd-daemon(3)), so `journalctl -p warning` filters by
level. vLLM's own lines go through a fast path (`render_output`) with the same format, their
priority taken from vLLM's level word.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Mapping, MutableMapping
from typing import Any, TextIO

import structlog

PRIORITY = {"debug": 7, "info": 6, "warning": 4, "error": 3, "critical": 2}
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
          "error": logging.ERROR, "critical": logging.CRITICAL}
_VLLM_LEVEL = re.compile(r"\b(DEBUG|INFO|WARNING|WARN|ERROR|CRITICAL|FATAL)\b")
_BARE = re.compile(r"^[A-Za-z0-9_.:/@+-]+$")
_write_lock = threading.Lock()


def journal_stream_is(stream: TextIO, environ: Mapping[str, str] | None = None) -> bool:
    """True when JOURNAL_STREAM (device:inode) names this very stream."""
    env = os.environ if environ is None else environ
    value = env.get("JOURNAL_STREAM", "")
    if not value:
        return False
    try:
        dev, ino = (int(x) for x in value.split(":"))
        st = os.fstat(stream.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def _kv_value(v: object) -> str:
    if isinstance(v, str):
        return v if v and _BARE.match(v) else json.dumps(v, ensure_ascii=False)
    if v is None or isinstance(v, bool | int | float):
        return json.dumps(v)
    return json.dumps(v, ensure_ascii=False, default=str, separators=(",", ":"))


class Renderer:
    """Turns an event dict into one line, with the journald priority prefix when wanted."""

    def __init__(self, fmt: str, journal: bool, colors: bool) -> None:
        self.fmt = fmt
        self.journal = journal
        self._console = structlog.dev.ConsoleRenderer(colors=colors) if fmt == "console" else None

    def __call__(self, _logger: Any, _name: str, ed: MutableMapping[str, Any]) -> str:
        return self.render(ed)

    def render(self, ed: MutableMapping[str, Any]) -> str:
        level = str(ed.get("level", "info"))
        prefix = f"<{PRIORITY.get(level, 6)}>" if self.journal else ""
        if self._console is not None:
            return prefix + str(self._console(None, "", ed))
        if self.fmt == "json":
            ed.setdefault("ts", round(time.time(), 3))
            return prefix + json.dumps(ed, ensure_ascii=False, default=str,
                                       separators=(",", ":"))
        event = ed.pop("event", "")
        if self.journal:
            ed.pop("level", None)  # the priority prefix carries it
        fields = " ".join(f"{k}={_kv_value(v)}" for k, v in ed.items() if v is not None)
        return f"{prefix}{event} {fields}" if fields else f"{prefix}{event}"


_renderer: Renderer | None = None
_out: TextIO = sys.stdout


class LineLogger:
    """structlog's final logger: whole lines under the same lock as vLLM's output, so the two
    never interleave mid-line."""

    def msg(self, message: str) -> None:
        with _write_lock:
            _out.write(message + "\n")
            _out.flush()

    debug = info = warning = error = critical = exception = log = msg


def _line_logger_factory(*_args: Any) -> LineLogger:
    return LineLogger()


def configure(fmt: str = "auto", level: str = "info", stream: TextIO | None = None) -> Renderer:
    """Configure structlog once, at the daemon's start."""
    global _renderer, _out
    _out = stream or sys.stdout
    tty = bool(getattr(_out, "isatty", lambda: False)())
    if fmt == "auto":
        fmt = "console" if tty else "keyvalue"
    _renderer = Renderer(fmt, journal=journal_stream_is(_out), colors=tty)
    structlog.configure(
        processors=[structlog.processors.add_log_level, _renderer],
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level]),
        logger_factory=_line_logger_factory,
        cache_logger_on_first_use=False,
    )
    return _renderer


def get_logger() -> Any:
    return structlog.get_logger()


def output_level(line: str) -> str:
    """vLLM's own level word near the start of a line ("INFO 11-27 ...", "(EngineCore pid=1)
    ERROR ..."), else info. Tracebacks come as ERROR lines first in vLLM's logging."""
    m = _VLLM_LEVEL.search(line, 0, 64)
    if not m:
        return "error" if line.startswith("Traceback") else "info"
    word = m.group(1)
    return {"WARN": "warning", "FATAL": "critical"}.get(word, word.lower())


def render_output(batch: list[tuple[str, str]], min_level: int = logging.INFO) -> None:
    """The fast path for vLLM's lines (tens of thousands a second): render the batch and
    write it with one call."""
    r = _renderer or Renderer("keyvalue", journal=False, colors=False)
    parts = []
    for stream, line in batch:
        level = output_level(line)
        if LEVELS[level] < min_level:
            continue
        parts.append(r.render({"event": "vllm.output", "level": level, "stream": stream,
                               "line": line}))
    if parts:
        with _write_lock:
            _out.write("\n".join(parts) + "\n")
            _out.flush()
