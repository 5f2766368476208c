"""Shared fixtures of the test tiers. The harness itself lives in tests/helpers/ (importable
as `helpers` because this directory is on sys.path once pytest loads this file)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from helpers import (
    STANDIN_PATH,
    Daemon,
    NotifySocket,
    Standin,
    free_port,
    group_members,
    poll_for,
)


@pytest.fixture
def notify_socket() -> Iterator[NotifySocket]:
    """A real AF_UNIX datagram socket standing in for systemd's NOTIFY_SOCKET."""
    s = NotifySocket()
    yield s
    s.close()


@pytest.fixture
def start_daemon() -> Iterator[Callable[..., Daemon]]:
    """start_daemon(config_path, notify=..., watchdog_usec=..., env=...) -> a running Daemon.

    At teardown every daemon still running gets SIGTERM; then anything left (the daemon, its
    group, any stand-in process recorded in STANDIN_STATE_DIR) is SIGKILLed and the test fails
    loudly, naming it."""
    started: list[Daemon] = []

    def start(config: Path, **kwargs: Any) -> Daemon:
        d = Daemon(config, **kwargs)
        started.append(d)
        return d.start()

    yield start
    leaks: list[str] = []
    for d in reversed(started):
        leaks += d.close()
    if leaks:
        pytest.fail("left running after the test (now killed):\n  " + "\n  ".join(leaks),
                    pytrace=False)


class StandinRun:
    """One stand-in server started directly (no daemon), in a session of its own."""

    def __init__(self, proc: subprocess.Popen[bytes], state: Standin, port: int) -> None:
        self.proc = proc
        self.state = state
        self.port = port

    @property
    def pid(self) -> int:
        return self.proc.pid


@pytest.fixture
def run_standin(tmp_path: Path) -> Iterator[Callable[..., StandinRun]]:
    """run_standin(env={...}, args=[...], mode="api_server"|"serve", names=["nika"]) starts
    the stand-in as the daemon would, with stdout/stderr to files in tmp_path."""
    runs: list[StandinRun] = []

    def start(env: dict[str, str] | None = None, args: list[str] | None = None,
              mode: str = "api_server", names: tuple[str, ...] = ("nika",),
              port: int | None = None, state_dir: Path | None = None) -> StandinRun:
        port = port or free_port()
        state_dir = state_dir or tmp_path / f"standin{len(runs)}"
        module = ("vllm.entrypoints.openai.api_server" if mode == "api_server"
                  else "vllm.entrypoints.cli.main")
        head = ["--model", "standin-model"] if mode == "api_server" else ["serve",
                                                                          "standin-model"]
        argv = [sys.executable, "-m", module, *head, "--served-model-name", *names,
                "--host", "127.0.0.1", "--port", str(port), *(args or [])]
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("STANDIN_")}
        full_env.update({"PYTHONPATH": STANDIN_PATH, "STANDIN_STATE_DIR": str(state_dir),
                         "STANDIN_MAX_LIFETIME_S": "60", **(env or {})})
        n = len(runs)
        with open(tmp_path / f"standin{n}.out", "wb") as out, \
                open(tmp_path / f"standin{n}.err", "wb") as err:
            proc = subprocess.Popen(argv, env=full_env, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=err, start_new_session=True)
        run = StandinRun(proc, Standin(state_dir, port=port), port)
        runs.append(run)
        return run

    yield start
    for run in runs:  # first every group (the engine of a SIGKILLed server is expected) ...
        if run.proc.poll() is None:
            run.proc.kill()
        run.proc.wait(5)
        if group_members(run.pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(run.pid, signal.SIGKILL)
            pgid = run.pid
            poll_for(lambda: not group_members(pgid), 5,  # noqa: B023 (called at once)
                     "the stand-in's group to die")
    leaks = [f"{found}" for run in runs if (found := run.state.kill_leftovers())]
    if leaks:  # ... then anything that escaped its group
        pytest.fail(f"stand-in processes outside their group left running: {leaks}",
                    pytrace=False)
