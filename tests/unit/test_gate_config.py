"""The `gate:` section: absent means no front door; present, it is typed and validated with
`file:line:col` like every other section."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from nika_supervisor.config import GateConfig, load_config, parse_config
from nika_supervisor.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def errors(text: str) -> list[str]:
    with pytest.raises(ConfigError) as e:
        parse_config(textwrap.dedent(text), "f.yaml")
    return [str(i) for i in e.value.issues]


def test_absent_gate_means_off() -> None:
    """Without `gate:` there is no front door and vLLM keeps vllm.host:vllm.port."""
    cfg = parse_config("vllm:\n  model: m\n", "f.yaml")
    assert cfg.gate is None and cfg.vllm.port == 1107


def test_full_gate_section_is_typed() -> None:
    """Every key of the issue's example parses to its typed value."""
    cfg = parse_config(textwrap.dedent("""
        vllm: {model: m, port: 11107}
        gate:
          listen: [127.0.0.1:1107, "[::1]:11434", localhost:8080]
          hold_timeout: 30s
          max_held: 256
          drain_timeout: 1m
          ollama: false
        """), "f.yaml")
    assert cfg.gate == GateConfig(listen=(("127.0.0.1", 1107), ("::1", 11434),
                                          ("127.0.0.1", 8080)),
                                  hold_timeout=30.0, max_held=256, drain_timeout=60.0,
                                  ollama=False)


def test_empty_gate_section_takes_the_defaults() -> None:
    """`gate:` with nothing under it turns the gate on with the documented defaults."""
    cfg = parse_config("vllm: {model: m, port: 11107}\ngate:\n", "f.yaml")
    assert cfg.gate == GateConfig()
    assert (cfg.gate.listen, cfg.gate.hold_timeout, cfg.gate.max_held, cfg.gate.drain_timeout,
            cfg.gate.ollama) == ((("127.0.0.1", 1107),), 30.0, 256, 60.0, True)


def test_gate_errors_are_located() -> None:
    """Bad addresses, durations, counts and booleans, and typos, each at file:line:col."""
    got = errors("""
        vllm: {model: m, port: 11107}
        gate:
          listen: [127.0.0.1:99999, example.com:80]
          hold_timeout: 0s
          max_held: -1
          drain_timeout: soon
          ollama: maybe
          hold_timout: 3s
        """)
    assert got == [
        "f.yaml:4:11: gate.listen: '127.0.0.1:99999': the port must be between 1 and 65535",
        "f.yaml:5:17: gate.hold_timeout: must be longer than 0, got '0s'",
        "f.yaml:6:13: gate.max_held: must be >= 0, got -1",
        "f.yaml:7:18: gate.drain_timeout: expected a duration like '500ms', '10s', '5m' or "
        "'2h', got 'soon'",
        "f.yaml:8:11: gate.ollama: expected true or false, got 'maybe'",
        "f.yaml:9:3: gate.hold_timout: unknown key (did you mean 'hold_timeout'?)",
    ]


def test_listen_on_vllms_own_address_is_refused() -> None:
    """The public address cannot be vLLM's: the default vllm.port 1107 must move."""
    assert errors("vllm: {model: m}\ngate:\n  listen: 0.0.0.0:1107\n") == [
        "f.yaml:3:11: gate.listen: 0.0.0.0:1107 is where vLLM listens (vllm.host:vllm.port); "
        "with the gate on, give vLLM an internal port (e.g. vllm.port: 11107)"]


def test_duplicate_listen_address() -> None:
    """The same address twice is a mistake, not a no-op."""
    assert errors("vllm: {model: m, port: 2}\ngate:\n  listen: [127.0.0.1:1, 127.0.0.1:1]\n"
                  ) == ["f.yaml:3:11: gate.listen: '127.0.0.1:1' is listed twice"]


def test_shipped_config_turns_the_gate_on() -> None:
    """etc/nika-vllm.yaml: clients on 127.0.0.1:1107 through the gate, vLLM internal."""
    cfg = load_config(REPO / "etc" / "nika-vllm.yaml", check_paths=False)
    assert cfg.gate is not None and cfg.gate.listen == (("127.0.0.1", 1107),)
    assert (cfg.vllm.host, cfg.vllm.port) == ("127.0.0.1", 11107)
