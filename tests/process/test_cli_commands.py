"""The command line as operators and packaging use it: `check`, `run` with a bad file,
`print-command`, `status`. Each error class of the config names its PATH:LINE:COL."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from helpers import run_cli, write_config

pytestmark = pytest.mark.process

# (file text, line, column, the message's key path, a fragment of the message)
BAD_FILES = {
    "yaml-syntax": ("vllm:\n  model: m\n  port: [1107\n", 4, 1, "YAML syntax", "expected"),
    "unknown-key": ("vllm:\n  model: m\n  modle: x\n", 3, 3, "vllm.modle",
                    "did you mean 'model'"),
    "wrong-type": ('vllm:\n  model: m\n  port: "abc"\n', 3, 9, "vllm.port", "integer"),
    "port-range": ("vllm:\n  model: m\n  port: 70000\n", 3, 9, "vllm.port", "65535"),
    "gpu-memory-utilization": ("vllm:\n  model: m\n  args:\n    gpu-memory-utilization: 1.5\n",
                               4, 29, "vllm.args.gpu-memory-utilization", "(0, 1]"),
    "missing-model": ("vllm:\n  port: 1107\n", 2, 3, "vllm.model", "missing"),
    "missing-api-key-file": ("vllm:\n  model: m\n  api_key_file: /nonexistent/nika-key\n",
                             3, 17, "vllm.api_key_file", "does not exist"),
    "bad-duration": ("vllm:\n  model: m\nhealth:\n  interval: soon\n", 4, 13,
                     "health.interval", "duration"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_check_reports_each_error_class_with_its_position(case: str, tmp_path: Path) -> None:
    """`check` exits 78 and prints `PATH:LINE:COL: key: message` on stderr for each class of
    error (syntax, unknown key, type, ranges, missing model, missing key file, duration)."""
    text, line, col, key, fragment = BAD_FILES[case]
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    r = run_cli(["check", "--config", str(path)])
    assert r.returncode == 78, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    prefix = f"{path}:{line}:{col}: {key}"
    assert lines[0].startswith(prefix), f"{lines[0]!r} does not start with {prefix!r}"
    assert fragment in lines[0]
    assert r.stdout == ""


def test_bare_python_name_on_path_or_a_78_naming_the_path(tmp_path: Path) -> None:
    """`check` accepts vllm.python: python3 when PATH has one, and `print-command` shows the
    absolute path it found; with a PATH that has none, exit 78 at file:line:col, naming it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").symlink_to(sys.executable)
    cfg = write_config(tmp_path, vllm={"python": "python3"})
    ok = run_cli(["check", "--config", str(cfg)], env={"PATH": str(bin_dir)})
    assert ok.returncode == 0, ok.stderr
    cmd = run_cli(["print-command", "--config", str(cfg)], env={"PATH": str(bin_dir)})
    assert cmd.returncode == 0, cmd.stderr
    assert str(bin_dir / "python3") in cmd.stdout
    empty = tmp_path / "empty"
    empty.mkdir()
    bad = run_cli(["check", "--config", str(cfg)], env={"PATH": str(empty)})
    assert bad.returncode == 78, bad.stderr
    line = next(i for i, t in enumerate(cfg.read_text().splitlines(), 1) if "python: python3" in t)
    assert bad.stderr.startswith(f"{cfg}:{line}:"), bad.stderr
    assert f"vllm.python: python3 was not found on PATH ({empty})" in bad.stderr


def test_check_reports_every_error_not_just_the_first(tmp_path: Path) -> None:
    """All errors of a file come at once, in file order."""
    path = tmp_path / "bad.yaml"
    path.write_text("vllm:\n  model: m\n  port: 0\nhealth:\n  interval: soon\n  timeout: 5x\n")
    r = run_cli(["check", "--config", str(path)])
    assert r.returncode == 78
    positions = [tuple(x.split(":")[1:3]) for x in r.stderr.strip().splitlines()]
    assert positions == [("3", "9"), ("5", "13"), ("6", "12")], r.stderr


def test_check_accepts_the_test_config(tmp_path: Path) -> None:
    """`check` exits 0 on a valid file and says so on stdout."""
    r = run_cli(["check", "--config", str(write_config(tmp_path))])
    assert r.returncode == 0, r.stderr
    assert "ok" in r.stdout and r.stderr == ""


def test_check_accepts_the_shipped_reference_config() -> None:
    """etc/nika-vllm.yaml (the DGX Spark deployment) is valid apart from host paths."""
    ref = Path(__file__).resolve().parents[2] / "etc" / "nika-vllm.yaml"
    r = run_cli(["check", "--config", str(ref)])
    # python/cuda_home/api_key_file point at the deployment host; only those may fail here.
    for line in r.stderr.strip().splitlines():
        assert any(k in line for k in ("vllm.python", "vllm.cuda_home", "vllm.api_key_file")), line


def test_run_with_a_bad_file_exits_78_and_starts_nothing(tmp_path: Path) -> None:
    """`run` validates first: exit 78, the errors on stderr, and no vLLM started."""
    cfg = write_config(tmp_path, health={"interval": "soon"})
    r = run_cli(["run", "--config", str(cfg)], timeout=20)
    assert r.returncode == 78, r.stdout + r.stderr
    assert "health.interval" in r.stderr and f"{cfg}:" in r.stderr
    assert not (tmp_path / "standin").exists(), "a stand-in was started"
    assert not (tmp_path / "run" / "state.json").exists()


def test_print_command_redacts_the_key(tmp_path: Path) -> None:
    """`print-command` shows the exact argv and the added environment, with the API key
    redacted, and never the key itself."""
    key = "sk-print-command-5d2e"
    key_file = tmp_path / "key"
    key_file.write_text(key)
    cfg = write_config(tmp_path, vllm={"api_key_file": str(key_file),
                                       "args": {"max-model-len": 8192, "enforce-eager": True,
                                                "disable-log-stats": False}})
    r = run_cli(["print-command", "--config", str(cfg)])
    assert r.returncode == 0, r.stderr
    assert key not in r.stdout + r.stderr
    assert "VLLM_API_KEY=" in r.stdout and "<redacted>" in r.stdout
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith(f"{sys.executable} -m vllm.entrypoints.openai.api_server --model "
                           "standin-model --served-model-name nika --host 127.0.0.1 --port ")
    assert last.endswith("--max-model-len 8192 --enforce-eager")
    j = run_cli(["print-command", "--config", str(cfg), "--json"])
    data = json.loads(j.stdout)
    assert data["env"]["VLLM_API_KEY"] == "<redacted>" and key not in j.stdout
    assert "--disable-log-stats" not in data["argv"]


def test_status_without_a_state_file_exits_4(tmp_path: Path) -> None:
    """`status` with no state file (daemon not running) exits 4 and says where it looked."""
    r = run_cli(["status", "--runtime-dir", str(tmp_path / "none")])
    assert r.returncode == 4
    assert str(tmp_path / "none") in r.stderr


@pytest.mark.parametrize(("phase", "code"), [("ready", 0), ("loading", 3), ("backoff", 3),
                                             ("failed", 3)])
def test_status_exit_code_follows_the_phase(tmp_path: Path, phase: str, code: int) -> None:
    """`status` exits 0 only when the recorded phase is ready, and prints the last failure."""
    (tmp_path / "state.json").write_text(json.dumps({
        "phase": phase, "pid": 42, "alias": "nika", "port": 1107, "restarts": 2,
        "status": f"{phase}: nika on 127.0.0.1:1107; restarts=2",
        "last_failure": {"cause": "killed by SIGKILL while serving", "hint": "see dmesg"}}))
    r = run_cli(["status", "--runtime-dir", str(tmp_path)])
    assert r.returncode == code, r.stdout + r.stderr
    assert phase in r.stdout and "killed by SIGKILL" in r.stdout
