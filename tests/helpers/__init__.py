"""The process-test harness: deadline waits, a real sd_notify socket, /proc checks, stand-in
configs and a runner for the daemon. Shared by tests/process, tests/e2e and tests/systemd."""

from helpers.config import (
    STANDIN_PATH,
    deep_merge,
    free_port,
    read_config,
    rewrite_config,
    standin_state_dir,
    write_config,
)
from helpers.connect import ConnectProbe
from helpers.daemon import Daemon, Event, run_cli
from helpers.notify import Message, NotifySocket
from helpers.procs import group_alive, group_members, pid_alive, proc_state
from helpers.standin import Standin
from helpers.wait import poll_for

__all__ = [
    "STANDIN_PATH",
    "ConnectProbe",
    "Daemon",
    "Event",
    "Message",
    "NotifySocket",
    "Standin",
    "deep_merge",
    "free_port",
    "group_alive",
    "group_members",
    "pid_alive",
    "poll_for",
    "proc_state",
    "read_config",
    "rewrite_config",
    "run_cli",
    "standin_state_dir",
    "write_config",
]
