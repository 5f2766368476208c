"""Checkpoint inspection from safetensors headers and config.json; never loads a tensor.

A safetensors file is an 8-byte little-endian unsigned header length N, N bytes of JSON
header ({name: {dtype, shape, data_offsets: [begin, end]}, optional "__metadata__"}),
then the tensor bytes, with offsets relative to the end of the header
(https://github.com/huggingface/safetensors#format). Only the first 8 + N bytes of each
file are read, so inspecting an 80B checkpoint costs a few megabytes of I/O.

Also finds a model directory: a local path, or a hub id's snapshot in the Hugging Face
cache (huggingface_hub's layout: $HF_HUB_CACHE or $HF_HOME/hub or ~/.cache/huggingface/hub,
then models--ORG--NAME/refs/main -> snapshots/<commit>).
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The reference implementation refuses larger headers (safetensors/src/tensor.rs,
# MAX_HEADER_SIZE = 100_000_000); real ones are at most a few MB.
MAX_HEADER_BYTES = 100_000_000
INDEX_FILE = "model.safetensors.index.json"
SHARED_EXPERT_MARKERS = (".shared_expert.", ".shared_experts.", ".shared_expert_gate.")


class CheckpointError(Exception):
    """A checkpoint file or config.json that cannot be read or is malformed."""


@dataclass(frozen=True, slots=True)
class Header:
    path: str
    tensors: Mapping[str, tuple[str, int]]  # name -> (dtype, bytes)
    metadata: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class CheckpointInfo:
    model_dir: str
    files: tuple[str, ...]
    tensor_count: int
    total_bytes: int  # sum of the tensors' data sizes
    dtypes: Mapping[str, int]  # dtype -> bytes
    key_prefix: str  # "model." / "model.model." / "" (none) / another top-level name + "."
    shared_expert_tensors: int  # tensors named *.shared_expert(s).*
    quantized_shared_expert: bool  # shared expert tensors stored packed (qweight/…_packed)
    architectures: tuple[str, ...]
    model_type: str | None
    quantization_config: Mapping[str, Any] | None
    config: Mapping[str, Any] = field(default_factory=dict)

    @property
    def expects_shared_expert(self) -> bool:
        """config.json says the MoE layers have a shared expert (Qwen2-MoE/Qwen3-Next style
        shared_expert_intermediate_size, or DeepSeek style n_shared_experts)."""
        for key in ("shared_expert_intermediate_size", "n_shared_experts",
                    "num_shared_experts"):
            v = self.config.get(key)
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return True
        return False


def read_header(path: str | os.PathLike[str]) -> Header:
    """The header of one safetensors file, checked against the file's size."""
    p = Path(path)
    try:
        size = p.stat().st_size
        with p.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{p}: {len(head)} bytes, too short for a safetensors "
                                      "header length")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or n > size - 8:
                raise CheckpointError(f"{p}: truncated or not safetensors: the header claims "
                                      f"{n} bytes, the file has {size - 8} after the length")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{p}: cannot read: {e.strerror}") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{p}: the header is not valid JSON: {e}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{p}: the header is not a JSON object")
    data_size = size - 8 - n
    tensors: dict[str, tuple[str, int]] = {}
    metadata = header.pop("__metadata__", None) or {}
    for name, entry in header.items():
        dtype, shape, offsets = (entry.get(k) if isinstance(entry, dict) else None
                                 for k in ("dtype", "shape", "data_offsets"))
        if not (isinstance(dtype, str) and isinstance(shape, list) and isinstance(offsets, list)
                and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise CheckpointError(f"{p}: malformed header entry for {name!r}")
        begin, end = offsets
        if not 0 <= begin <= end <= data_size:
            raise CheckpointError(f"{p}: tensor {name!r} lies outside the file "
                                  f"([{begin}, {end}) of {data_size} data bytes): truncated?")
        tensors[name] = (dtype, end - begin)
    return Header(str(p), tensors, {str(k): str(v) for k, v in dict(metadata).items()})


def weight_files(model_dir: str | os.PathLike[str]) -> list[Path]:
    """The checkpoint's safetensors files: from the shard index if present, else *.safetensors."""
    d = Path(model_dir)
    index = d / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            return [d / name for name in sorted(set(weight_map.values()))]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index}: unreadable shard index: {e}") from None
    return sorted(d.glob("*.safetensors"))


def read_config(model_dir: str | os.PathLike[str]) -> dict[str, Any]:
    p = Path(model_dir) / "config.json"
    try:
        config = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{p} does not exist") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{p}: {e}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{p} is not a JSON object")
    return config


def key_prefix(names: list[str]) -> str:
    """What the decoder layers' weight names start with, by majority: "model." for the
    Hugging Face *ForCausalLM layout (model.layers.N...), "" when they start at layers.N
    (saved from the inner model), "model.model." when wrapped twice. Side modules such as
    Qwen3-Next's mtp.layers.* are outvoted. Without any *layers.* names, the majority
    top-level name (e.g. "transformer.")."""
    votes: dict[str, int] = {}
    for n in names:
        if n.startswith("layers."):
            prefix: str | None = ""
        elif ".layers." in n:
            prefix = n[:n.index(".layers.") + 1]
        else:
            prefix = None
        if prefix is not None:
            votes[prefix] = votes.get(prefix, 0) + 1
    if not votes:
        for n in names:
            if "." in n and not n.startswith("lm_head."):
                top = n.split(".", 1)[0] + "."
                votes[top] = votes.get(top, 0) + 1
    return max(votes, key=lambda k: votes[k]) if votes else ""


def _quantized_name(name: str) -> bool:
    return name.endswith((".qweight", ".qzeros", ".weight_packed", ".scales", ".g_idx"))


def inspect_checkpoint(model_dir: str | os.PathLike[str]) -> CheckpointInfo:
    """Read config.json and every safetensors header of a local model directory."""
    d = Path(model_dir)
    config = read_config(d)
    files = weight_files(d)
    if not files:
        raise CheckpointError(f"{d}: no *.safetensors files")
    names: list[str] = []
    dtypes: dict[str, int] = {}
    for f in files:
        header = read_header(f)
        for name, (dtype, nbytes) in header.tensors.items():
            names.append(name)
            dtypes[dtype] = dtypes.get(dtype, 0) + nbytes
    shared = [n for n in names if any(m in n for m in SHARED_EXPERT_MARKERS)]
    archs = config.get("architectures") or []
    quant = config.get("quantization_config")
    return CheckpointInfo(
        model_dir=str(d),
        files=tuple(f.name for f in files),
        tensor_count=len(names),
        total_bytes=sum(dtypes.values()),
        dtypes=dict(sorted(dtypes.items())),
        key_prefix=key_prefix(names),
        shared_expert_tensors=len(shared),
        quantized_shared_expert=any(_quantized_name(n) for n in shared),
        architectures=tuple(str(a) for a in archs) if isinstance(archs, list) else (),
        model_type=config.get("model_type") if isinstance(config.get("model_type"), str)
        else None,
        quantization_config=quant if isinstance(quant, dict) else None,
        config=config,
    )


def hf_hub_cache(env: Mapping[str, str]) -> Path:
    """huggingface_hub's cache directory under this environment (constants.py)."""
    if env.get("HF_HUB_CACHE"):
        return Path(env["HF_HUB_CACHE"])
    if env.get("HF_HOME"):
        return Path(env["HF_HOME"]) / "hub"
    xdg = env.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path(env.get("HOME", str(Path.home()))) / ".cache"
    return base / "huggingface" / "hub"


def resolve_model_dir(model: str, env: Mapping[str, str]) -> Path | None:
    """A local directory for vllm.model: the path itself, or the hub id's cached snapshot
    (refs/main, else the only or newest snapshot). None if neither exists."""
    p = Path(model).expanduser()
    if p.is_dir():
        return p
    if model.startswith(("/", ".", "~")) or model.count("/") != 1:
        return None
    repo = hf_hub_cache(env) / ("models--" + model.replace("/", "--"))
    ref = repo / "refs" / "main"
    if ref.is_file():
        snap = repo / "snapshots" / ref.read_text(encoding="utf-8").strip()
        if snap.is_dir():
            return snap
    snaps = [s for s in (repo / "snapshots").glob("*") if s.is_dir()]
    return max(snaps, key=lambda s: s.stat().st_mtime) if snaps else None
