"""The keys added for issue 11: health.load_stall, supervisor.state_dir, supervisor.metrics_listen
(defaults, validation with file:line:col)."""

from __future__ import annotations

import textwrap

import pytest

from nika_supervisor.config import parse_config
from nika_supervisor.errors import ConfigError


def errors(text: str) -> list[str]:
    with pytest.raises(ConfigError) as e:
        parse_config(textwrap.dedent(text), "f.yaml", check_paths=False)
    return [str(i) for i in e.value.issues]


def test_defaults() -> None:
    """load_stall 10m; no state_dir (the StateDirectory, resolved at run time); metrics off."""
    cfg = parse_config("vllm:\n  model: m\n", "f.yaml")
    assert cfg.health.load_stall == 600.0
    assert cfg.supervisor.state_dir is None and cfg.supervisor.metrics_listen is None


def test_values() -> None:
    cfg = parse_config(textwrap.dedent("""\
        vllm: {model: m}
        health: {load_stall: 0}
        supervisor: {state_dir: /srv/nika, metrics_listen: "[::1]:9108"}
        """), "f.yaml")
    assert cfg.health.load_stall == 0.0  # off
    assert cfg.supervisor.state_dir == "/srv/nika"
    assert cfg.supervisor.metrics_listen == ("::1", 9108)
    cfg = parse_config("vllm: {model: m}\nsupervisor: {metrics_listen: '0.0.0.0:9108'}\n", "f")
    assert cfg.supervisor.metrics_listen == ("0.0.0.0", 9108)


def test_bad_values_name_the_place() -> None:
    """A stall bound at or past startup_timeout could never fire; a listen address needs an
    explicit host and a port in range."""
    assert errors("""\
        vllm: {model: m}
        health:
          startup_timeout: 5m
          load_stall: 5m
        supervisor:
          metrics_listen: 9108
          state_dir: ""
        """) == [
        "f.yaml:4:15: health.load_stall: must be shorter than health.startup_timeout (300s), "
        "or 0 to turn it off",
        "f.yaml:6:19: supervisor.metrics_listen: expected HOST:PORT like '127.0.0.1:9108', "
        "got 9108",
        "f.yaml:7:14: supervisor.state_dir: expected a non-empty string, got ''",
    ]
    assert errors("vllm: {model: m}\nsupervisor: {metrics_listen: 'h:70000'}\n") == [
        "f.yaml:2:30: supervisor.metrics_listen: expected HOST:PORT like '127.0.0.1:9108', "
        "got 'h:70000'"]
    assert errors("vllm: {model: m}\nhealth: {load_stall: -1}\n")[0].startswith(
        "f.yaml:2:22: health.load_stall: expected a duration")
