"""Fixtures of the process tier: the daemon against the stand-in, started and made ready."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import Daemon, NotifySocket, write_config


@pytest.fixture
def ready_daemon(tmp_path: Path, start_daemon: Callable[..., Daemon],
                 notify_socket: NotifySocket) -> Callable[..., Daemon]:
    """ready_daemon(standin_env={...}, daemon_kwargs={...}, **config_overrides) -> a Daemon
    whose vLLM stand-in is ready (vllm.ready seen, READY=1 received)."""

    def start(standin_env: dict[str, str] | None = None,
              daemon_kwargs: dict[str, Any] | None = None, **overrides: Any) -> Daemon:
        vllm = dict(overrides.pop("vllm", {}) or {})
        vllm["env"] = {**(vllm.get("env") or {}), **(standin_env or {})}
        cfg = write_config(tmp_path, vllm=vllm, **overrides)
        d = start_daemon(cfg, notify=notify_socket, **(daemon_kwargs or {}))
        d.wait_event("vllm.ready", timeout=20)
        notify_socket.wait_key("READY", "1", timeout=5)
        return d

    return start
