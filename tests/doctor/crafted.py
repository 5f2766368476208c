"""Hand-made checkpoints and a fake vLLM interpreter for the doctor tests.

Checkpoints are written byte by byte in the safetensors layout (8-byte little-endian header
length, JSON header, zero bytes for the data), so no torch is needed. The names and shapes
follow the tiny Qwen3-Next of nika_supervisor/demo/tinymodel.py.

The fake vLLM is a package directory put on PYTHONPATH through vllm.env: `vllm` with a
version and `vllm.model_executor.models.ModelRegistry.get_supported_archs()`, and a `torch`
whose `version.cuda` says whether it is a CPU or a CUDA build.
"""

from __future__ import annotations

import json
import struct
import textwrap
from pathlib import Path
from typing import Any

DTYPE_BYTES = {"BF16": 2, "F16": 2, "F32": 4, "I32": 4, "I8": 1, "U8": 1}
QWEN3_NEXT_CONFIG: dict[str, Any] = {
    "architectures": ["Qwen3NextForCausalLM"],
    "model_type": "qwen3_next",
    "hidden_size": 128,
    "num_hidden_layers": 2,
    "num_experts": 2,
    "shared_expert_intermediate_size": 64,
    "head_dim": 64,
    "dtype": "bfloat16",
}


def qwen3_next_tensors(prefix: str = "model.", layers: int = 2, experts: int = 2,
                       shared_expert: bool = True, mtp: bool = False
                       ) -> dict[str, tuple[str, list[int]]]:
    """name -> (dtype, shape) in the Hugging Face Qwen3-Next layout."""
    t: dict[str, tuple[str, list[int]]] = {
        "lm_head.weight": ("BF16", [704, 128]),
        f"{prefix}embed_tokens.weight": ("BF16", [704, 128]),
        f"{prefix}norm.weight": ("BF16", [128]),
    }
    for i in range(layers):
        lp = f"{prefix}layers.{i}."
        t[lp + "input_layernorm.weight"] = ("BF16", [128])
        t[lp + "linear_attn.in_proj_qkvz.weight"] = ("BF16", [512, 128])
        t[lp + "mlp.gate.weight"] = ("BF16", [experts, 128])
        for e in range(experts):
            for proj, shape in (("gate_proj", [32, 128]), ("up_proj", [32, 128]),
                                ("down_proj", [128, 32])):
                t[f"{lp}mlp.experts.{e}.{proj}.weight"] = ("BF16", shape)
        if shared_expert:
            for proj, shape in (("gate_proj", [64, 128]), ("up_proj", [64, 128]),
                                ("down_proj", [128, 64])):
                t[f"{lp}mlp.shared_expert.{proj}.weight"] = ("BF16", shape)
            t[lp + "mlp.shared_expert_gate.weight"] = ("BF16", [1, 128])
    if mtp:
        t["mtp.layers.0.input_layernorm.weight"] = ("BF16", [128])
        t["mtp.fc.weight"] = ("BF16", [128, 256])
    return t


def write_safetensors(path: Path, tensors: dict[str, tuple[str, list[int]]],
                      metadata: dict[str, str] | None = None) -> int:
    """Write a valid safetensors file with zero data; return the data size in bytes."""
    header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, (dtype, shape) in tensors.items():
        n = DTYPE_BYTES[dtype]
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)  # the reference writer pads the header to 8 bytes
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        f.truncate(8 + len(raw) + offset)  # zero-filled data region
    return offset


def make_model(root: Path, *, config: dict[str, Any] | None = None,
               tensors: dict[str, tuple[str, list[int]]] | None = None) -> Path:
    """A model directory: config.json + model.safetensors."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(config or QWEN3_NEXT_CONFIG))
    write_safetensors(root / "model.safetensors",
                      tensors if tensors is not None else qwen3_next_tensors())
    return root


def make_fake_vllm(root: Path, *, version: str = "0.32.0+fake", cuda: str | None = None,
                   archs: tuple[str, ...] = ("Qwen3NextForCausalLM", "LlamaForCausalLM"),
                   import_sleep: float = 0.0) -> Path:
    """A PYTHONPATH directory holding fake `vllm` and `torch` packages."""
    models = root / "vllm" / "model_executor" / "models"
    models.mkdir(parents=True, exist_ok=True)
    sleep = f"import time\ntime.sleep({import_sleep})\n" if import_sleep else ""
    (root / "vllm" / "__init__.py").write_text(f"{sleep}__version__ = {version!r}\n")
    (root / "vllm" / "model_executor" / "__init__.py").write_text("")
    (models / "__init__.py").write_text(textwrap.dedent(f"""
        class _Registry:
            def get_supported_archs(self):
                return set({list(archs)!r})
        ModelRegistry = _Registry()
        """))
    (root / "torch").mkdir(exist_ok=True)
    (root / "torch" / "__init__.py").write_text(textwrap.dedent(f"""
        __version__ = "2.13.0+{'cpu' if cuda is None else 'cu' + cuda.replace('.', '')}"
        class version:
            cuda = {cuda!r}
        """))
    return root


def meminfo(path: Path, total_gib: float, available_gib: float,
            free_gib: float | None = None) -> Path:
    kib = 1024 * 1024
    free = available_gib if free_gib is None else free_gib
    path.write_text(f"MemTotal:       {int(total_gib * kib)} kB\n"
                    f"MemFree:        {int(free * kib)} kB\n"
                    f"MemAvailable:   {int(available_gib * kib)} kB\n"
                    f"Cached:         {int((available_gib - free) * kib)} kB\n")
    return path
