"""Publishing what the supervisor knows: STATUS= for `systemctl status`, the state file for
`nika-supervisor status`, both made from the policy's state. No decisions: the text is a
rendering of the state; when to publish is "when it changed" plus a slow refresh of the
elapsed times.
"""

from __future__ import annotations

import os
import time
from typing import Any

from nika_supervisor.config import Config
from nika_supervisor.durations import format_duration
from nika_supervisor.gate import GateStats, UpstreamView
from nika_supervisor.lifecycle import Backoff, Done, Loading, Serving, State, Stopping, Then
from nika_supervisor.notify import Notifier
from nika_supervisor.statefile import write_state
from nika_supervisor.states import Phase

STATUS_REFRESH_S = 5.0  # refresh elapsed times in STATUS while not ready ...
READY_STATUS_REFRESH_S = 60.0  # ... and the uptime while ready


def status_text(s: State, cfg: Config, now: float, gpu_text: str = "",
                loading: str | None = None) -> str:
    v, rec, c = cfg.vllm, s.rec, cfg.cluster
    head = f"{s.phase}: {v.alias} on {v.host}:{v.port}"
    if c is not None and not c.is_head:  # a headless rank serves no address of its own
        head = f"{s.phase}: {v.alias}, rank {c.node_rank} of {c.nnodes} (headless)"
    if isinstance(rec, Loading):
        elapsed = f"loading {format_duration(now - rec.spawned_at)}"
        head += f" ({loading or elapsed})"
    elif isinstance(rec, Serving):
        head += f" (up {format_duration(now - rec.ready_at)})"
    elif isinstance(rec, Backoff):
        head += f" (next start in {format_duration(max(0.0, rec.wake_at - now))})"
    parts = [head, f"restarts={s.life.restarts}"]
    if gpu_text:
        parts.append(gpu_text)
    if s.life.last_failure is not None:
        parts.append(f"last failure: {s.life.last_failure.cause}")
    if s.life.config_error:
        parts.append(f"reload rejected: {s.life.config_error}")
    if s.life.dropped_lines:
        parts.append(f"{s.life.dropped_lines} vLLM output lines dropped (journal too slow)")
    return "; ".join(parts)


def gate_view(s: State, cfg: Config) -> UpstreamView:
    """What the gate needs to know: forward (READY, UNHEALTHY), hold, or answer 503 at once
    because the daemon is on its way out (nothing will come back to hold for)."""
    rec, f = s.rec, s.life.last_failure
    leaving = isinstance(rec, Done) or (isinstance(rec, Stopping) and rec.then is Then.EXIT)
    # A cluster head whose group is not formed (a rank lost, a partition) holds requests:
    # forwarded, they would hang in a group that cannot answer.
    ready = isinstance(rec, Serving) and s.life.group_ready
    return UpstreamView(phase=str(s.phase), ready=ready,
                        upstream=f"{cfg.vllm.host}:{cfg.vllm.port}",
                        cause=f.cause if f is not None else None,
                        last_load_s=s.life.last_load_s, phase_since=s.since, given_up=leaving)


def state_record(s: State, cfg: Config, now: float, gpu_text: str = "",
                 loading: str | None = None, gate: GateStats | None = None,
                 group: dict[str, Any] | None = None) -> dict[str, Any]:
    f = s.life.last_failure
    wall = time.time() - (now - s.since)
    return {
        "phase": str(s.phase), "pid": s.pid, "supervisor_pid": os.getpid(),
        "alias": cfg.vllm.alias, "host": cfg.vllm.host, "port": cfg.vllm.port,
        "since": round(wall, 3), "restarts": s.life.restarts,
        "last_failure": None if f is None else {"cause": f.cause, "hint": f.hint,
                                               "code": f.code, "severity": str(f.severity)},
        "config": cfg.path, "config_error": s.life.config_error,
        "dropped_lines": s.life.dropped_lines,
        "gate": None if gate is None else {"in_flight": gate.in_flight, "held": gate.held,
                                           "rejected": gate.rejected, "served": gate.served,
                                           "retried": gate.retried},
        "cluster": group,  # the group view (cluster/group.py group_status), or None
        "status": status_text(s, cfg, now, gpu_text, loading),
    }


class Publisher:
    """STATUS= when its text changes (elapsed times refresh every few seconds); the state file
    when anything but elapsed time changes."""

    def __init__(self, notifier: Notifier, runtime_dir: str, log: Any) -> None:
        self.notifier = notifier
        self.runtime_dir = runtime_dir
        self.log = log
        self.next_refresh = 0.0
        self._published: tuple[object, ...] = ()

    def publish(self, s: State, cfg: Config, now: float, gpu_text: str = "",
                loading: str | None = None, gate: GateStats | None = None,
                step: str | None = None, group: dict[str, Any] | None = None) -> None:
        """step: the load step (no elapsed time), so each new step is published at once;
        group: a cluster node's group view (its text is in gpu_text)."""
        key = (s.phase, s.pid, s.life.restarts, s.life.last_failure, s.life.config_error,
               s.life.dropped_lines, cfg.path, gate, step, gpu_text if group else None)
        changed = key != self._published
        if not changed and now < self.next_refresh:
            return
        self.next_refresh = now + (READY_STATUS_REFRESH_S if s.phase is Phase.READY
                                   else STATUS_REFRESH_S)
        self.notifier.status(status_text(s, cfg, now, gpu_text, loading))
        if not changed:
            return
        self._published = key
        try:
            write_state(self.runtime_dir,
                        state_record(s, cfg, now, gpu_text, loading, gate, group))
        except OSError as e:
            self.log.warning("supervisor.state_write_failed", dir=self.runtime_dir,
                             error=e.strerror)
