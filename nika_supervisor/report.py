"""`nika-supervisor report`: "was it up the whole weekend, and if not, why?" from the history.

Pure: `build(records, now, since_s)` turns history records (history.py) into a `Report`;
`text()` and `as_json()` render it; plot.py draws it. `now` is wall-clock unix seconds, like
the records.

The timeline: every record moves the state. `daemon.start` -> starting, `phase` -> its `to`,
`daemon.exit` -> down. A `daemon.start` while the previous daemon never recorded its exit
means that daemon died (SIGKILL, watchdog, power cut): down from its last record. Where the
history has heartbeats, a state not confirmed for HEARTBEAT_GRACE_S is unknown, not up.
Ready and unhealthy count as up (the model answers). Availability is up time over the time
the history covers (unknown time is left out and shown as coverage).
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from nika_supervisor.durations import format_duration
from nika_supervisor.history import THROTTLE_S, Record

UP = frozenset({"ready", "unhealthy"})
DOWN = "down"  # no daemon running
UNKNOWN = "unknown"  # no record covers this time
HEARTBEAT_GRACE_S = 2 * THROTTLE_S["heartbeat"]
CAUSE_SLACK_S = 2.0  # a restart decided this long before the model went down still explains it
SCHEMA = "nika-report/1"


@dataclass(frozen=True, slots=True)
class Segment:
    start: float
    end: float
    state: str


@dataclass(frozen=True, slots=True)
class Outage:
    start: float
    end: float
    cause: str
    code: str = ""
    ongoing: bool = False

    @property
    def seconds(self) -> float:
        return self.end - self.start


@dataclass(frozen=True, slots=True)
class Report:
    since: float
    until: float
    timeline: tuple[Segment, ...]
    outages: tuple[Outage, ...]
    restarts: tuple[tuple[float, str, str], ...]  # t, code, cause
    loads: tuple[float, ...]
    give_ups: tuple[tuple[float, int, str], ...]  # t, exit code, reason
    findings: tuple[tuple[float, str, str], ...]  # t, code, detail
    gpu_samples: tuple[tuple[float, float | None, float | None], ...]  # t, temp_c, mem bytes
    records: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def seconds_in(self, states: Iterable[str]) -> float:
        wanted = set(states)
        return sum(s.end - s.start for s in self.timeline if s.state in wanted)

    @property
    def covered_s(self) -> float:
        return (self.until - self.since) - self.seconds_in([UNKNOWN])

    @property
    def ready_s(self) -> float:
        return self.seconds_in(UP)

    @property
    def availability(self) -> float | None:
        return self.ready_s / self.covered_s if self.covered_s > 0 else None


def timeline(records: Sequence[Record], since: float, until: float) -> tuple[Segment, ...]:
    heartbeats = any(r["kind"] == "heartbeat" for r in records)
    marks: list[tuple[float, str]] = []  # (time, state from then on)
    state, last_seen = UNKNOWN, None
    for r in records:
        t, kind = float(r["t"]), r["kind"]
        if t > until:
            break
        if heartbeats and last_seen is not None and state not in (DOWN, UNKNOWN) \
                and t - last_seen > HEARTBEAT_GRACE_S:
            marks.append((last_seen + HEARTBEAT_GRACE_S, UNKNOWN))
        if kind == "daemon.start":
            if state not in (DOWN, UNKNOWN) and last_seen is not None:
                marks.append((last_seen, DOWN))  # the previous daemon died unrecorded
            state = "starting"
        elif kind == "phase" and isinstance(r.get("to"), str):
            state = r["to"]
        elif kind == "daemon.exit":
            state = DOWN
        marks.append((t, state))
        last_seen = t
    if heartbeats and last_seen is not None and state not in (DOWN, UNKNOWN) \
            and until - last_seen > HEARTBEAT_GRACE_S:
        marks.append((last_seen + HEARTBEAT_GRACE_S, UNKNOWN))
    # Fold the marks into segments clipped to [since, until].
    segs: list[Segment] = []
    current, start = UNKNOWN, since
    for t, st in marks:
        if t <= since:
            current = st
            continue
        if st != current:
            segs.append(Segment(start, t, current))
            current, start = st, t
    segs.append(Segment(start, until, current))
    return tuple(s for s in segs if s.end > s.start)


def _outages(segs: Sequence[Segment], records: Sequence[Record], until: float) -> list[Outage]:
    spans: list[list[float]] = []  # start, end, and where the up time before it began
    up_from = segs[0].start if segs else 0.0
    for s in segs:
        if s.state in UP or s.state == UNKNOWN:
            up_from = s.start
            continue
        if spans and spans[-1][1] == s.start:
            spans[-1][1] = s.end
        else:
            spans.append([s.start, s.end, up_from])
    out = []
    died = {s.start for s in segs if s.state == DOWN}
    for start, end, floor in spans:
        cause, code = _cause(records, max(start - CAUSE_SLACK_S, floor), end)
        if start in died and not any(r["kind"] == "daemon.exit" and float(r["t"]) == start
                                     for r in records) and cause == "daemon started":
            cause = "the daemon died without a record (SIGKILL, watchdog, power loss?)"
        out.append(Outage(start, end, cause, code, ongoing=end >= until))
    return out


def _cause(records: Sequence[Record], start: float, end: float) -> tuple[str, str]:
    """What began an outage: the first restart or give-up from `start` on, else the first
    daemon exit/start or phase change with a reason."""
    window = [r for r in records if start <= float(r["t"]) <= end]
    for r in window:
        if r["kind"] == "restart":
            return str(r.get("cause") or r.get("code") or "restart"), str(r.get("code") or "")
        if r["kind"] == "give_up":
            return f"gave up: {r.get('reason', '')}".strip(), str(r.get("code", ""))
    for r in window:
        if r["kind"] == "daemon.exit":
            return f"daemon exited ({r.get('code')}): {r.get('reason', '')}".rstrip(": "), ""
        if r["kind"] == "daemon.start":
            return "daemon started", ""
        if r["kind"] == "phase" and r.get("reason"):
            return str(r["reason"]), ""
    return "daemon not running (no record)", ""


def build(records: Iterable[Record], now: float, since_s: float) -> Report:
    since = now - since_s
    recs = sorted((r for r in records if float(r["t"]) <= now), key=lambda r: float(r["t"]))
    segs = timeline(recs, since, now)
    inside = [r for r in recs if float(r["t"]) >= since]

    def of(kind: str) -> list[Record]:
        return [r for r in inside if r["kind"] == kind]

    return Report(
        since=since, until=now, timeline=segs, outages=tuple(_outages(segs, recs, now)),
        restarts=tuple((float(r["t"]), str(r.get("code") or "other"), str(r.get("cause", "")))
                       for r in of("restart")),
        loads=tuple(float(r["load_s"]) for r in of("load")
                    if isinstance(r.get("load_s"), int | float)),
        give_ups=tuple((float(r["t"]), int(r.get("code", 0)), str(r.get("reason", "")))
                       for r in of("give_up")),
        findings=tuple((float(r["t"]), str(r.get("code", "")), str(r.get("detail", "")))
                       for r in of("gpu.finding")),
        gpu_samples=tuple((float(r["t"]), _num(r.get("temp_c")), _num(r.get("mem_used_bytes")))
                          for r in of("gpu.sample")),
        records=len(inside),
    )


def _num(v: object) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def _stats(values: Sequence[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def as_json(r: Report) -> dict[str, Any]:
    """The `--json` document (schema `nika-report/1`, README "nika-supervisor report")."""
    temps = [t for _, t, _ in r.gpu_samples if t is not None]
    mems = [m for _, _, m in r.gpu_samples if m is not None]
    return {
        "schema": SCHEMA,
        "window": {"since": _iso(r.since), "until": _iso(r.until),
                   "seconds": round(r.until - r.since, 3)},
        "records": r.records,
        "covered_s": round(r.covered_s, 3),
        "ready_s": round(r.ready_s, 3),
        "availability": None if r.availability is None else round(r.availability, 6),
        "outages": [{"start": _iso(o.start), "end": _iso(o.end), "seconds": round(o.seconds, 3),
                     "cause": o.cause, "code": o.code, "ongoing": o.ongoing}
                    for o in r.outages],
        "restarts": {"total": len(r.restarts),
                     "by_cause": dict(Counter(code for _, code, _ in r.restarts))},
        "loads": {"count": len(r.loads),
                  "median_s": statistics.median(r.loads) if r.loads else None,
                  "max_s": max(r.loads) if r.loads else None},
        "give_ups": [{"at": _iso(t), "code": c, "reason": why} for t, c, why in r.give_ups],
        "gpu": {"findings": dict(Counter(code for _, code, _ in r.findings)),
                "temperature_c": _stats(temps), "memory_used_bytes": _stats(mems)},
        "timeline": [{"start": _iso(s.start), "end": _iso(s.end), "state": s.state}
                     for s in r.timeline],
    }


def text(r: Report) -> str:
    """The one-page answer, for a terminal."""
    fmt = "%Y-%m-%d %H:%M"

    def day(t: float) -> str:
        return datetime.fromtimestamp(t, UTC).strftime(fmt)

    lines = [f"nika-vllm, last {format_duration(r.until - r.since)} "
             f"({day(r.since)} to {day(r.until)} UTC), {r.records} history records"]
    if r.availability is None:
        lines.append("availability: no history in this window")
    else:
        cov = "" if r.covered_s >= r.until - r.since else (
            f"; history covers {format_duration(r.covered_s)}")
        lines.append(f"availability: {100 * r.availability:.2f} % ready "
                     f"({format_duration(r.ready_s)} of {format_duration(r.covered_s)}{cov})")
    lines.append(f"outages: {len(r.outages)}")
    for o in r.outages:
        tail = " (ongoing)" if o.ongoing else ""
        lines.append(f"  {day(o.start)}  {format_duration(o.seconds):>7}  {o.cause}{tail}")
    by_cause = Counter(code for _, code, _ in r.restarts)
    lines.append("restarts: " + (", ".join(f"{c} {n}" for c, n in by_cause.most_common())
                                 or "none"))
    if r.loads:
        lines.append(f"load times: {len(r.loads)} loads, median "
                     f"{format_duration(statistics.median(r.loads))}, max "
                     f"{format_duration(max(r.loads))}")
    else:
        lines.append("load times: no load finished in this window")
    lines.append("give-ups: " + ("none" if not r.give_ups else "; ".join(
        f"{day(t)} exit {c}: {why}" for t, c, why in r.give_ups)))
    found = Counter(code for _, code, _ in r.findings)
    lines.append("GPU findings: " + (", ".join(f"{c} {n}" for c, n in found.most_common())
                                     or "none"))
    temps = _stats([t for _, t, _ in r.gpu_samples if t is not None])
    mems = _stats([m for _, _, m in r.gpu_samples if m is not None])
    if temps:
        lines.append(f"GPU temperature: min {temps['min']:.0f} C, median "
                     f"{temps['median']:.0f} C, max {temps['max']:.0f} C")
    if mems:
        g = 1024**3
        lines.append(f"GPU memory used: min {mems['min'] / g:.1f} GiB, median "
                     f"{mems['median'] / g:.1f} GiB, max {mems['max'] / g:.1f} GiB")
    if not temps and not mems:
        lines.append("GPU samples: none in this window")
    return "\n".join(lines) + "\n"
