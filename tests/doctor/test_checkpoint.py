"""checkpoint.py: safetensors header inspection on hand-made and real checkpoints."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any, BinaryIO

import pytest
from crafted import QWEN3_NEXT_CONFIG, make_model, qwen3_next_tensors, write_safetensors
from helpers.tier import TINY_MODEL, require_path

from nika_supervisor import checkpoint as ckpt


def test_good_checkpoint_is_summarised(tmp_path: Path) -> None:
    """A complete Qwen3-Next checkpoint reports its bytes, dtypes, `model.` prefix and
    shared-expert tensors, and config.json's architecture."""
    tensors = qwen3_next_tensors()
    d = make_model(tmp_path / "m", tensors=tensors)
    size = (d / "model.safetensors").stat().st_size
    info = ckpt.inspect_checkpoint(d)
    expected = sum(2 * _numel(shape) for _, shape in tensors.values())
    assert info.total_bytes == expected
    assert expected < size  # the header is not counted
    assert info.dtypes == {"BF16": expected}
    assert info.tensor_count == len(tensors)
    assert info.key_prefix == "model."
    assert info.shared_expert_tensors == 8  # 2 layers x (3 projections + the gate)
    assert info.expects_shared_expert
    assert not info.quantized_shared_expert
    assert info.architectures == ("Qwen3NextForCausalLM",)
    assert info.quantization_config is None


def test_names_without_model_prefix_are_reported(tmp_path: Path) -> None:
    """Weights saved from the inner model (layers.N... at the top) have prefix ''."""
    d = make_model(tmp_path / "m", tensors=qwen3_next_tensors(prefix=""))
    assert ckpt.inspect_checkpoint(d).key_prefix == ""


def test_double_model_prefix_is_reported(tmp_path: Path) -> None:
    """Weights wrapped twice (model.model.layers...) are told apart from the right layout."""
    d = make_model(tmp_path / "m", tensors=qwen3_next_tensors(prefix="model.model."))
    assert ckpt.inspect_checkpoint(d).key_prefix == "model.model."


def test_mtp_side_module_does_not_change_the_prefix(tmp_path: Path) -> None:
    """Qwen3-Next's mtp.* tensors are outvoted by the model.layers.* ones."""
    d = make_model(tmp_path / "m", tensors=qwen3_next_tensors(mtp=True))
    assert ckpt.inspect_checkpoint(d).key_prefix == "model."


def test_missing_shared_expert_is_visible(tmp_path: Path) -> None:
    """A checkpoint without shared-expert tensors, whose config has one, shows the gap."""
    d = make_model(tmp_path / "m", tensors=qwen3_next_tensors(shared_expert=False))
    info = ckpt.inspect_checkpoint(d)
    assert info.shared_expert_tensors == 0
    assert info.expects_shared_expert


def test_quantization_config_and_packed_shared_expert(tmp_path: Path) -> None:
    """quantization_config comes from config.json; packed (qweight) shared experts are seen."""
    tensors = {k: v for k, v in qwen3_next_tensors().items() if "shared_expert." not in k}
    tensors["model.layers.0.mlp.shared_expert.down_proj.qweight"] = ("I32", [16, 128])
    tensors["model.layers.0.mlp.shared_expert.down_proj.scales"] = ("F16", [1, 128])
    quant = {"quant_method": "gptq", "bits": 4, "group_size": 128}
    d = make_model(tmp_path / "m", config={**QWEN3_NEXT_CONFIG, "quantization_config": quant},
                   tensors=tensors)
    info = ckpt.inspect_checkpoint(d)
    assert info.quantization_config == quant
    assert info.quantized_shared_expert
    assert set(info.dtypes) == {"BF16", "I32", "F16"}


def test_sharded_checkpoint_reads_every_shard_of_the_index(tmp_path: Path) -> None:
    """With model.safetensors.index.json, the shards it names are the checkpoint."""
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(QWEN3_NEXT_CONFIG))
    tensors = list(qwen3_next_tensors().items())
    half = len(tensors) // 2
    a = write_safetensors(d / "model-00001-of-00002.safetensors", dict(tensors[:half]))
    b = write_safetensors(d / "model-00002-of-00002.safetensors", dict(tensors[half:]))
    write_safetensors(d / "stray.safetensors", {"x.weight": ("F32", [1000])})  # not indexed
    weight_map = {n: f"model-0000{1 if i < half else 2}-of-00002.safetensors"
                  for i, (n, _) in enumerate(tensors)}
    (d / ckpt.INDEX_FILE).write_text(json.dumps({"weight_map": weight_map}))
    info = ckpt.inspect_checkpoint(d)
    assert info.files == ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
    assert info.total_bytes == a + b
    assert info.tensor_count == len(tensors)


def test_truncated_header_is_an_error(tmp_path: Path) -> None:
    """A header length larger than the file (a cut-off download) is named as truncated."""
    d = make_model(tmp_path / "m")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:200])
    with pytest.raises(ckpt.CheckpointError, match="truncated or not safetensors"):
        ckpt.inspect_checkpoint(d)


def test_data_cut_off_after_the_header_is_an_error(tmp_path: Path) -> None:
    """A complete header whose tensors lie beyond the file's end is truncated too."""
    d = make_model(tmp_path / "m")
    f = d / "model.safetensors"
    (n,) = struct.unpack("<Q", f.read_bytes()[:8])
    os.truncate(f, 8 + n + 100)
    with pytest.raises(ckpt.CheckpointError, match="lies outside the file"):
        ckpt.read_header(f)


def test_file_shorter_than_the_length_field_is_an_error(tmp_path: Path) -> None:
    """Fewer than 8 bytes cannot even hold the header length."""
    f = tmp_path / "x.safetensors"
    f.write_bytes(b"\x01\x02\x03")
    with pytest.raises(ckpt.CheckpointError, match="too short"):
        ckpt.read_header(f)


def test_header_that_is_not_json_is_an_error(tmp_path: Path) -> None:
    """A header of the right length that is not JSON is reported as such."""
    f = tmp_path / "x.safetensors"
    f.write_bytes(struct.pack("<Q", 4) + b"{no}" + b"\0" * 8)
    with pytest.raises(ckpt.CheckpointError, match="not valid JSON"):
        ckpt.read_header(f)


def test_malformed_entry_is_an_error(tmp_path: Path) -> None:
    """An entry without data_offsets is malformed, not silently skipped."""
    raw = json.dumps({"a.weight": {"dtype": "F32", "shape": [1]}}).encode()
    f = tmp_path / "x.safetensors"
    f.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 4)
    with pytest.raises(ckpt.CheckpointError, match=r"malformed header entry for 'a\.weight'"):
        ckpt.read_header(f)


def test_only_the_header_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Inspection reads 8 + N bytes of a file, never its tensor data."""
    d = make_model(tmp_path / "m", tensors={**qwen3_next_tensors(),
                                             "model.big.weight": ("F32", [64, 1024, 1024])})
    f = d / "model.safetensors"
    assert f.stat().st_size > 256 * 1024 * 1024
    with f.open("rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
    reads: list[int] = []
    real_open = Path.open

    class Counting:
        def __init__(self, fh: BinaryIO) -> None:
            self.fh = fh

        def read(self, size: int = -1) -> bytes:
            data = self.fh.read(size)
            reads.append(len(data))
            return data

        def __enter__(self) -> Counting:
            return self

        def __exit__(self, *exc: object) -> None:
            self.fh.close()

    def counting_open(self: Path, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        fh = real_open(self, mode, *args, **kwargs)
        return Counting(fh) if self.suffix == ".safetensors" else fh

    monkeypatch.setattr(Path, "open", counting_open)
    info = ckpt.inspect_checkpoint(d)
    assert info.total_bytes > 256 * 1024 * 1024
    assert sum(reads) == 8 + n


def test_hub_id_resolves_to_its_cached_snapshot(tmp_path: Path) -> None:
    """An org/name model is found in $HF_HOME/hub as huggingface_hub lays it out."""
    repo = tmp_path / "hf" / "hub" / "models--Qwen--Tiny-Next"
    snap = make_model(repo / "snapshots" / "abc123")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    env = {"HF_HOME": str(tmp_path / "hf")}
    assert ckpt.resolve_model_dir("Qwen/Tiny-Next", env) == snap
    assert ckpt.resolve_model_dir("Qwen/Other", env) is None
    assert ckpt.resolve_model_dir(str(snap), {}) == snap
    assert ckpt.resolve_model_dir("/nonexistent/dir", env) is None


def test_real_tiny_qwen3_next_checkpoint() -> None:
    """The tiny Qwen3-Next that the e2e tier serves inspects as a complete bf16 checkpoint."""
    require_path(TINY_MODEL / "model.safetensors", "the tiny Qwen3-Next model",
                 "the real-checkpoint check", build="make tiny-model")
    info = ckpt.inspect_checkpoint(TINY_MODEL)
    assert info.architectures == ("Qwen3NextForCausalLM",)
    assert info.key_prefix == "model."
    assert set(info.dtypes) == {"BF16"}
    assert info.expects_shared_expert and info.shared_expert_tensors > 0
    assert 0 < info.total_bytes < (TINY_MODEL / "model.safetensors").stat().st_size


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
