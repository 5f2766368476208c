"""Configs for the daemon under test, pointing at the stand-in server.

`write_config(tmp_path, **overrides)` writes a complete, valid YAML file with fast timings;
overrides merge deeply into it (a value of None deletes that key).
"""

from __future__ import annotations

import contextlib
import copy
import os
import socket
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
STANDIN_PATH = str(REPO / "tests" / "standin")
CONFIG_NAME = "nika-vllm.yaml"


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (the kernel's pick for port 0)."""
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def deep_merge(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(dict(base))
    for key, value in overrides.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def default_config(tmp_path: Path) -> dict[str, Any]:
    return {
        "vllm": {
            "python": sys.executable,
            "entrypoint": "api_server",
            "model": "standin-model",
            "served_model_name": ["nika"],
            "host": "127.0.0.1",
            "port": free_port(),
            "env": {
                "PYTHONPATH": STANDIN_PATH,
                "STANDIN_STATE_DIR": str(tmp_path / "standin"),
                # a leaked stand-in ends itself eventually, whatever happens to the harness
                "STANDIN_MAX_LIFETIME_S": "120",
            },
        },
        "health": {"interval": "200ms", "timeout": "1s", "failure_threshold": 3,
                   "startup_timeout": "20s"},
        "restart": {"backoff_initial": "200ms", "backoff_max": "1s", "max_restarts": 3,
                    "window": "60s", "stop_timeout": "3s"},
        "gpu": {"nvml": "off"},
        "supervisor": {"log_format": "json", "log_level": "debug",
                       "runtime_dir": str(tmp_path / "run"),
                       # the history (restart budget across daemon restarts): never the host's
                       "state_dir": str(tmp_path / "state")},
    }


def write_config(tmp_path: Path, name: str = CONFIG_NAME, **overrides: Any) -> Path:
    """Write the stand-in config (deep-merged with overrides) to tmp_path/name."""
    cfg = deep_merge(default_config(tmp_path), overrides)
    path = tmp_path / name
    _write(path, cfg)
    return path


def read_config(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict), f"{path} is not a mapping"
    return data


def rewrite_config(path: Path, **overrides: Any) -> Path:
    """Merge overrides into an existing config file, replacing it atomically (the daemon may
    read it at any moment, on SIGHUP)."""
    _write(path, deep_merge(read_config(path), overrides))
    return path


def _write(path: Path, cfg: Mapping[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(yaml.safe_dump(dict(cfg), sort_keys=False))
    os.replace(tmp, path)


def standin_state_dir(config_path: Path) -> Path | None:
    """The STANDIN_STATE_DIR a config gives the stand-in, if any."""
    try:
        env = read_config(config_path).get("vllm", {}).get("env", {}) or {}
    except (OSError, yaml.YAMLError, AssertionError):
        return None
    value = env.get("STANDIN_STATE_DIR") if isinstance(env, dict) else None
    return Path(value) if value else None
