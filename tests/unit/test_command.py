"""argv and environment for vLLM: flags, CUDA paths, the secret, the supervisor's own env."""

from __future__ import annotations

from pathlib import Path

from nika_supervisor.command import MARKER_ENV, REDACTED, build_launch
from nika_supervisor.config import parse_config


def cfg(tmp_path: Path, extra: str = "") -> object:
    text = ("vllm:\n  model: /m\n  python: /usr/bin/python3\n  served_model_name: [nika, n2]\n"
            f"  port: 1107\n{extra}")
    return parse_config(text, str(tmp_path / "c.yaml"))


def test_api_server_argv(tmp_path: Path) -> None:
    """api_server entrypoint: --model, names, host, port, then args in order."""
    c = parse_config("vllm:\n  model: /m\n  python: /usr/bin/python3\n  entrypoint: api_server\n"
                     "  served_model_name: nika\n  args: {enforce-eager: true, x: false,"
                     " max-model-len: 256, allowed-origins: [a, b]}\n", "c.yaml")
    spec = build_launch(c, {})
    assert spec.argv == ("/usr/bin/python3", "-m", "vllm.entrypoints.openai.api_server",
                         "--model", "/m", "--served-model-name", "nika", "--host", "127.0.0.1",
                         "--port", "1107", "--enforce-eager", "--max-model-len", "256",
                         "--allowed-origins", "a", "b")


def test_serve_argv(tmp_path: Path) -> None:
    """serve entrypoint: vLLM's CLI module with the model positional."""
    spec = build_launch(cfg(tmp_path), {})  # type: ignore[arg-type]
    assert spec.argv[:5] == ("/usr/bin/python3", "-m", "vllm.entrypoints.cli.main", "serve", "/m")
    assert spec.argv[5:8] == ("--served-model-name", "nika", "n2")


def test_env_strips_notify_and_adds_cuda_and_marker(tmp_path: Path) -> None:
    """NOTIFY_SOCKET/WATCHDOG_* never reach vLLM; cuda_home paths are prepended; marker set."""
    (tmp_path / "cuda").mkdir()
    c = cfg(tmp_path, f"  cuda_home: {tmp_path}/cuda\n  env: {{TRITON_INTERPRET: 0}}\n")
    base = {"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "1", "WATCHDOG_PID": "2",
            "PATH": "/usr/bin", "HOME": "/root"}
    spec = build_launch(c, base)  # type: ignore[arg-type]
    env = spec.env
    assert "NOTIFY_SOCKET" not in env and "WATCHDOG_USEC" not in env and "WATCHDOG_PID" not in env
    assert env["PATH"] == f"{tmp_path}/cuda/bin:/usr/bin"
    assert env["LD_LIBRARY_PATH"] == f"{tmp_path}/cuda/lib64"
    assert env["C_INCLUDE_PATH"] == env["CPLUS_INCLUDE_PATH"] == f"{tmp_path}/cuda/include"
    assert env["CUDA_HOME"] == env["CUDA_PATH"] == f"{tmp_path}/cuda"
    assert env["TRITON_INTERPRET"] == "0" and env["HOME"] == "/root"
    assert env[MARKER_ENV] == f"nika-vllm:{tmp_path}/c.yaml"


def test_secret_only_in_env_and_redacted_for_display(tmp_path: Path) -> None:
    """The API key is VLLM_API_KEY in the child's env, never on argv, redacted for display."""
    (tmp_path / "key").write_text("s3cret-key\n")
    c = cfg(tmp_path, f"  api_key_file: {tmp_path}/key\n")
    spec = build_launch(c, {})  # type: ignore[arg-type]
    assert spec.env["VLLM_API_KEY"] == "s3cret-key"
    assert not any("s3cret" in a for a in spec.argv)
    assert spec.redacted_added()["VLLM_API_KEY"] == REDACTED
    shown = build_launch(c, {}, read_secret=False)  # type: ignore[arg-type]
    assert "s3cret" not in repr(shown)
