"""Config parsing: every error class is reported as `file:line:col: message`, all at once."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from nika_supervisor.config import load_config, parse_config
from nika_supervisor.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def errors(text: str, **kw: object) -> list[str]:
    with pytest.raises(ConfigError) as e:
        parse_config(textwrap.dedent(text), "f.yaml", **kw)  # type: ignore[arg-type]
    return [str(i) for i in e.value.issues]


def test_minimal_config_gets_the_documented_defaults() -> None:
    """Only vllm.model is required; the rest takes the documented defaults."""
    cfg = parse_config("vllm:\n  model: m\n", "f.yaml")
    assert (cfg.vllm.host, cfg.vllm.port, cfg.vllm.entrypoint, cfg.vllm.alias) == (
        "127.0.0.1", 1107, "serve", "m")
    assert (cfg.health.interval, cfg.health.timeout, cfg.health.failure_threshold,
            cfg.health.startup_timeout) == (5.0, 10.0, 3, 1800.0)
    assert (cfg.restart.backoff_initial, cfg.restart.backoff_max, cfg.restart.max_restarts,
            cfg.restart.window, cfg.restart.stop_timeout) == (5.0, 300.0, 5, 1800.0, 30.0)
    assert cfg.gpu.nvml == "optional"


def test_yaml_syntax_error_has_line_and_column() -> None:
    """A YAML syntax error names where the parser stopped."""
    assert errors("vllm:\n  model: [a, b\n  port: 1\n") == [
        "f.yaml:3:7: YAML syntax: expected ',' or ']', but got ':'"]


def test_unknown_key_suggests_the_close_one() -> None:
    """A typo is an error with the closest known key, never silently ignored."""
    assert errors("vllm:\n  model: m\n  prot: 1\n") == [
        "f.yaml:3:3: vllm.prot: unknown key (did you mean 'port'?)"]


def test_wrong_types_and_ranges() -> None:
    """Types and ranges: port, gpu-memory-utilization, durations, counts, choices."""
    got = errors("""
        vllm:
          model: m
          port: 70000
          entrypoint: fast
          served_model_name: []
          args:
            gpu-memory-utilization: 1.2
            tensor-parallel-size: 0
        health:
          interval: soon
          failure_threshold: 0
        restart:
          backoff_initial: 10s
          backoff_max: 5s
        gpu:
          nvml: maybe
        """)
    assert got == [
        "f.yaml:4:9: vllm.port: must be between 1 and 65535, got 70000",
        "f.yaml:5:15: vllm.entrypoint: expected one of serve, api_server, serve_cpu, got 'fast'",
        "f.yaml:6:22: vllm.served_model_name: expected a name or a non-empty list of names,"
        " got []",
        "f.yaml:8:29: vllm.args.gpu-memory-utilization: must be a number in (0, 1], got 1.2",
        "f.yaml:9:27: vllm.args.tensor-parallel-size: must be an integer >= 1, got 0",
        "f.yaml:11:13: health.interval: expected a duration like '500ms', '10s', '5m' or"
        " '2h', got 'soon'",
        "f.yaml:12:22: health.failure_threshold: must be >= 1, got 0",
        "f.yaml:15:16: restart.backoff_max: must be >= restart.backoff_initial (10s)",
        "f.yaml:17:9: gpu.nvml: expected one of required, optional, off, got 'maybe'",
    ]


def test_missing_model_points_at_the_vllm_section() -> None:
    """A missing required key is reported at its parent mapping."""
    assert errors("vllm:\n  port: 1107\n") == ["f.yaml:2:3: vllm.model: required key is missing"]


def test_missing_api_key_file_and_interpreter(tmp_path: Path) -> None:
    """Paths that must exist on this host are checked (and skipped with check_paths=False)."""
    text = f"vllm:\n  model: m\n  python: {tmp_path}/nope\n  api_key_file: {tmp_path}/k\n"
    assert errors(text) == [
        f"f.yaml:3:11: vllm.python: {tmp_path}/nope does not exist or is not executable",
        f"f.yaml:4:17: vllm.api_key_file: {tmp_path}/k does not exist",
    ]
    parse_config(text, "f.yaml", check_paths=False)
    (tmp_path / "k").write_text("  \n")
    assert errors(f"vllm:\n  model: m\n  api_key_file: {tmp_path}/k\n") == [
        f"f.yaml:3:17: vllm.api_key_file: {tmp_path}/k is empty"]


def fake_interpreter(directory: Path, name: str = "python3", mode: int = 0o755) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    exe = directory / name
    exe.write_text("#!/bin/sh\n")
    exe.chmod(mode)
    return exe


def test_bare_python_name_is_resolved_on_path(tmp_path: Path) -> None:
    """vllm.python: python3 is looked up on PATH (first match wins, a non-executable file is
    passed over, as execvp does) and the absolute path found is what runs."""
    fake_interpreter(tmp_path / "a", mode=0o644)
    found = fake_interpreter(tmp_path / "b")
    fake_interpreter(tmp_path / "c")
    search = f"{tmp_path}/a:{tmp_path}/b:{tmp_path}/c"
    cfg = parse_config("vllm:\n  model: m\n  python: python3\n", "f.yaml",
                       search_path=search)
    assert cfg.vllm.python == str(found)


def test_bare_python_name_uses_this_process_path_by_default(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without search_path, the daemon's own PATH is searched."""
    found = fake_interpreter(tmp_path / "bin", "my-python")
    monkeypatch.setenv("PATH", f"{tmp_path}/bin")
    cfg = parse_config("vllm:\n  model: m\n  python: my-python\n", "f.yaml")
    assert cfg.vllm.python == str(found)


def test_bare_python_name_not_on_path_names_the_path_searched(tmp_path: Path) -> None:
    """A bare name found nowhere is an error at its file:line:col naming the PATH searched."""
    fake_interpreter(tmp_path / "a", "python3", mode=0o644)
    search = f"{tmp_path}/a:{tmp_path}/none"
    assert errors("vllm:\n  model: m\n  python: python3\n", search_path=search) == [
        f"f.yaml:3:11: vllm.python: python3 was not found on PATH ({search}); give the "
        "interpreter's absolute path"]
    # Checking a file meant for another host leaves the name as written.
    cfg = parse_config("vllm:\n  model: m\n  python: python3\n", "f.yaml",
                       check_paths=False, search_path=search)
    assert cfg.vllm.python == "python3"


def test_reserved_args_and_env_are_refused() -> None:
    """Flags with first-class keys, and the supervisor's own or secret env, are refused."""
    assert errors("""
        vllm:
          model: m
          args: {port: 8000, api-key: x}
          env: {NOTIFY_SOCKET: /x, VLLM_API_KEY: s, 9BAD: x}
        """) == [
        "f.yaml:4:16: vllm.args.port: set vllm.port instead",
        "f.yaml:4:31: vllm.args.api-key: set vllm.api_key_file instead",
        "f.yaml:5:24: vllm.env.NOTIFY_SOCKET: not allowed: it belongs to the supervisor,"
        " never to vLLM",
        "f.yaml:5:42: vllm.env.VLLM_API_KEY: not allowed: put the key in a file and set"
        " vllm.api_key_file",
        "f.yaml:5:51: vllm.env.9BAD: not a valid environment variable name",
    ]


def test_duplicate_keys_are_errors() -> None:
    """YAML would silently keep the last of two equal keys; we refuse."""
    assert errors("vllm:\n  model: a\n  model: b\n") == ["f.yaml:3:3: vllm.model: duplicate key"]


def test_empty_and_unreadable_files(tmp_path: Path) -> None:
    """An empty file and a missing file are config errors at 1:1."""
    (tmp_path / "e.yaml").write_text("")
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path / "e.yaml")
    assert str(e.value) == f"{tmp_path}/e.yaml:1:1: the file is empty; it needs vllm.model"
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path / "missing.yaml")
    assert str(e.value) == f"{tmp_path}/missing.yaml:1:1: cannot read: No such file or directory"


def test_args_normalise_and_keep_order() -> None:
    """Underscores become dashes, leading dashes are dropped, order is kept, lists/dicts."""
    cfg = parse_config(textwrap.dedent("""
        vllm:
          model: m
          args:
            max_model_len: 8192
            --enforce-eager: true
            disable-log-stats: false
            allowed-origins: [a, b]
            compilation-config: {level: 0}
        """), "f.yaml")
    assert cfg.vllm.args == (("max-model-len", 8192), ("enforce-eager", True),
                             ("disable-log-stats", False), ("allowed-origins", ("a", "b")),
                             ("compilation-config", '{"level":0}'))


def test_shipped_reference_config_parses() -> None:
    """etc/nika-vllm.yaml is valid (paths belong to the DGX Spark host, not this one)."""
    cfg = load_config(REPO / "etc" / "nika-vllm.yaml", check_paths=False)
    assert cfg.vllm.alias == "nika" and cfg.vllm.port == 11107  # internal: the gate has 1107
    assert cfg.vllm.entrypoint == "api_server"
    assert dict(cfg.vllm.args)["gpu-memory-utilization"] == 0.92
    assert cfg.vllm.env_dict["VLLM_WORKER_MULTIPROC_METHOD"] == "spawn"
    assert cfg.gpu.nvml == "required"


def test_bare_off_means_the_nvml_mode_off() -> None:
    """YAML 1.1 reads `nvml: off` as false; it still means the mode "off"."""
    assert parse_config("vllm: {model: m}\ngpu:\n  nvml: off\n", "f.yaml").gpu.nvml == "off"
    assert errors("vllm: {model: m}\ngpu:\n  nvml: yes\n") == [
        "f.yaml:3:9: gpu.nvml: expected one of required, optional, off, got True"]
