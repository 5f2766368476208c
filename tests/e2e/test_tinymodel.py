"""The tiny Qwen3-Next builder (nika_supervisor/demo/tinymodel.py), run as the scripts run it:
a plain script under the vLLM venv's python."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

BUILDER = Path(__file__).resolve().parents[2] / "nika_supervisor" / "demo" / "tinymodel.py"


def build(vllm_python: Path, out: Path, *args: str) -> str:
    r = subprocess.run([str(vllm_python), str(BUILDER), str(out), *args], capture_output=True,
                       text=True, timeout=300, check=False,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def digests(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.iterdir()) if p.is_file()}


def test_two_builds_are_byte_identical(vllm_python: Path, tmp_path: Path) -> None:
    """Two builds from the same seed into different directories give the same bytes in every
    file, the safetensors included."""
    a, b = tmp_path / "a", tmp_path / "b"
    build(vllm_python, a)
    build(vllm_python, b)
    assert digests(a) == digests(b)
    assert {"config.json", "model.safetensors", "tokenizer.json",
            "nika-tinymodel.json"} <= digests(a).keys()
    config = json.loads((a / "config.json").read_text())
    assert config["architectures"] == ["Qwen3NextForCausalLM"]
    assert (config["hidden_size"], config["num_hidden_layers"], config["head_dim"]) == (128, 4, 64)
    assert "<|im_start|>" in (a / "chat_template.jinja").read_text()


def test_rebuild_is_skipped_unless_params_differ_or_files_changed(vllm_python: Path,
                                                                  tmp_path: Path) -> None:
    """A complete build with matching parameters is left alone; a damaged file or another
    head_dim makes the builder build again."""
    out = tmp_path / "m"
    build(vllm_python, out)
    weights = out / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert "up to date" in build(vllm_python, out)
    assert weights.stat().st_mtime_ns == before

    good = digests(out)
    with weights.open("r+b") as f:  # flip one byte: the stamp's sha256 no longer matches
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 0xFF]))
    assert "built" in build(vllm_python, out)
    assert digests(out) == good

    build(vllm_python, out, "--head-dim", "16")
    assert json.loads((out / "config.json").read_text())["head_dim"] == 16
