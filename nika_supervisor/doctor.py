"""`nika-supervisor doctor --config PATH [--json]`: preflight checks; starts no server.

Longer than most modules (about 550 lines): one function per check, each short, listed in
the order they run so that the report and the code read the same.

Each check gives ok / warn / fail, a one-line detail and, unless ok, a one-line fix. The
exit status is 0 without a fail, 78 (CONFIG) when the configuration itself is invalid, and
1 when any other check failed.

Checks, in order: config, vllm (the interpreter has vLLM; one subprocess of vllm.python
reports the version and ModelRegistry.get_supported_archs()), architecture, checkpoint,
weights.prefix, weights.shared_expert (safetensors headers only: checkpoint.py), cuda,
ptxas, triton_interpret, port, gate_port (one per gate.listen address, with a gate), nvml,
gpu_holders (nika_supervisor.gpu, if importable),
memory (will vLLM's memory request fit, with the weights inside it), and with a `cluster:`
section cluster.token, cluster.peer.R, cluster.model, cluster.vllm_version,
cluster.nccl_ifname, cluster.gloo_ifname (cluster/checks.py).

Everything that touches the host is reachable through `World`, so tests can point it at a
fake meminfo, a fake NVML and a short probe timeout.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from nika_supervisor import checkpoint as ckpt
from nika_supervisor import interpreter, procs
from nika_supervisor.command import MARKER_ENV, build_env, marker_value
from nika_supervisor.config import Config, load_config
from nika_supervisor.durations import parse_size
from nika_supervisor.errors import ConfigError
from nika_supervisor.exitcodes import ExitCode
from nika_supervisor.meminfo import read_meminfo

GiB = 1024**3
# vLLM 0.32's default --gpu-memory-utilization (vllm/config/cache.py: Field(default=0.92));
# earlier releases used 0.9.
DEFAULT_GPU_MEMORY_UTILIZATION = 0.92
# On unified memory (GB10) the page cache and the OS share the pool with the GPU; above
# this, starts fail with "Free memory on device ... less than desired" after a while
# (NVIDIA DGX Spark known issues, "reporting memory resources with unified memory
# architecture"; NVIDIA/xr-ai#440; MiaAI-Lab/GLM-5.3-Flash-EXL3-2x-DGX-Sparks#47).
UNIFIED_UTILIZATION_WARN = 0.87
PROBE_SCRIPT = interpreter.DIST_VERSION_SNIPPET + f"""
import json, sys
out = {{"python": sys.version.split()[0], "vllm_dist": _dist_version()}}
try:
    import vllm
    out["vllm"] = getattr(vllm, "__version__", "unknown")
except BaseException as e:
    out["error"] = f"{{type(e).__name__}}: {{e}}"
else:
    try:
        import torch
        out["torch"] = torch.__version__
        out["torch_cuda"] = torch.version.cuda
    except BaseException as e:
        out["torch_error"] = f"{{type(e).__name__}}: {{e}}"
    try:
        from vllm.model_executor.models import ModelRegistry
        out["archs"] = sorted(ModelRegistry.get_supported_archs())
    except BaseException as e:
        out["archs_error"] = f"{{type(e).__name__}}: {{e}}"
print({interpreter.MARK!r} + json.dumps(out), flush=True)
"""


class Status(StrEnum):
    OK = "ok"
    WARN = "warn"
    FAIL = "fail"


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    status: Status
    detail: str
    fix: str = ""
    data: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class World:
    """The host as the checks see it; tests replace parts."""

    base_env: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    meminfo_path: str = "/proc/meminfo"
    probe_timeout: float = 120.0  # importing vLLM with CUDA can take a minute on a cold cache
    nvml: Any = None  # a gpu.nvml.Nvml for GpuMonitor (None: the real pynvml)
    device_glob: str | None = None  # for the GPU holder scan (None: /dev/nvidia*)
    peer_timeout: float = 5.0  # each cluster peer's GET /cluster/status, connect included
    net_dir: str = "/sys/class/net"  # the interfaces *_SOCKET_IFNAME may name
    route_path: str = "/proc/net/route"  # for the interface toward master_addr


@dataclass
class _Facts:
    """What earlier checks learned that later ones need."""

    cfg: Config
    env: dict[str, str]
    probe: dict[str, Any] = field(default_factory=dict)
    model_dir: Path | None = None
    info: ckpt.CheckpointInfo | None = None
    unified: bool | None = None  # None: unknown
    gpu_totals: list[int] = field(default_factory=list)
    gpu_used: list[int] = field(default_factory=list)
    running: list[int] = field(default_factory=list)  # pids of this config's running vLLM

    @property
    def cpu_build(self) -> bool:
        return "torch" in self.probe and self.probe.get("torch_cuda") is None

    def arg(self, name: str) -> object:
        return dict(self.cfg.vllm.args).get(name)


def _size(b: float) -> str:
    """1.5MiB / 74.2GiB: sizes for the one-line details."""
    for unit, scale in (("GiB", GiB), ("MiB", 1024**2), ("KiB", 1024)):
        if b >= scale:
            return f"{b / scale:.1f}{unit}"
    return f"{int(b)}B"


# ----------------------------------------------------------------------------- the checks


def check_config(path: str) -> tuple[Check, Config | None]:
    try:
        return Check("config", Status.OK, f"{path} is valid"), load_config(path)
    except ConfigError as e:
        first = str(e.issues[0]) if e.issues else str(e)
        more = f" (+{len(e.issues) - 1} more)" if len(e.issues) > 1 else ""
        fix = "fix the file; `nika-supervisor check --config PATH` lists every issue"
        check = Check("config", Status.FAIL, first + more, fix,
                      {"issues": [str(i) for i in e.issues]})
    try:  # go on with what can still be checked, if only paths were wrong
        return check, load_config(path, check_paths=False)
    except ConfigError:
        return check, None


def run_probe(python: str, env: Mapping[str, str], timeout: float) -> dict[str, Any]:
    """Ask vllm.python what it has (interpreter.ask: own session, killed at the timeout)."""
    return interpreter.ask(python, PROBE_SCRIPT, env, timeout)


def check_vllm(f: _Facts) -> Check:
    p = f.probe
    py = f.cfg.vllm.python
    if "failed" in p:
        return Check("vllm", Status.FAIL, p["failed"],
                     "set vllm.python to the python of the venv that has vLLM installed")
    if "error" in p:
        return Check("vllm", Status.FAIL, f"{py} cannot import vllm: {p['error']}",
                     "install vLLM into that venv, or point vllm.python at the right one")
    torch = p.get("torch", "?")
    cuda = p.get("torch_cuda") or "none (CPU build)"
    return Check("vllm", Status.OK,
                 f"vLLM {p.get('vllm')} (python {p.get('python')}, torch {torch}, CUDA {cuda})",
                 data={k: v for k, v in p.items() if k != "archs"})


def check_architecture(f: _Facts) -> Check:
    model = f.cfg.vllm.model
    if f.model_dir is None:
        return Check("architecture", Status.WARN,
                     f"{model}: no local directory and not in the Hugging Face cache",
                     "download it first (`hf download ORG/NAME`), or vLLM fetches it at start")
    try:
        archs = ckpt.read_config(f.model_dir).get("architectures") or []
    except ckpt.CheckpointError as e:
        return Check("architecture", Status.FAIL, str(e),
                     "the model directory needs a config.json (a Hugging Face model dir)")
    if not isinstance(archs, list) or not archs:
        return Check("architecture", Status.FAIL, "config.json names no architectures",
                     "the model's config.json needs \"architectures\": [\"...ForCausalLM\"]")
    supported = f.probe.get("archs")
    if not isinstance(supported, list):
        why = f.probe.get("archs_error") or "vLLM could not be asked"
        return Check("architecture", Status.WARN, f"{archs}: not verified ({why})",
                     "fix the vllm check first")
    missing = [a for a in archs if a not in supported]
    if missing:
        import difflib

        close = difflib.get_close_matches(str(missing[0]), supported, n=3)
        near = f"; close: {', '.join(close)}" if close else ""
        return Check("architecture", Status.FAIL,
                     f"vLLM {f.probe.get('vllm')} does not support {missing}{near}",
                     "use a vLLM release that supports it, or a model whose architecture it has")
    return Check("architecture", Status.OK,
                 f"{', '.join(archs)} (supported by vLLM {f.probe.get('vllm')})")


def check_checkpoint(f: _Facts) -> list[Check]:
    if f.model_dir is None:
        return [Check("checkpoint", Status.WARN, "no local checkpoint to inspect",
                      "download the model first to have its weights inspected")]
    try:
        info = ckpt.inspect_checkpoint(f.model_dir)
    except ckpt.CheckpointError as e:
        return [Check("checkpoint", Status.FAIL, str(e),
                      "re-download or re-export the checkpoint; the file is damaged or "
                      "incomplete")]
    f.info = info
    dtypes = ", ".join(f"{d} {_size(b)}" for d, b in info.dtypes.items())
    q = info.quantization_config or {}
    quant = "none"
    if q:
        bits = f" {q['bits']}-bit" if "bits" in q else ""
        quant = f"{q.get('quant_method', 'unknown')}{bits}"
    out = [Check("checkpoint", Status.OK,
                 f"{len(info.files)} file(s), {info.tensor_count} tensors, "
                 f"{_size(info.total_bytes)} ({dtypes}); quantization {quant}",
                 data={"files": list(info.files), "total_bytes": info.total_bytes,
                       "dtypes": dict(info.dtypes), "quantization_config": q or None,
                       "key_prefix": info.key_prefix,
                       "shared_expert_tensors": info.shared_expert_tensors})]
    prefix = info.key_prefix
    if prefix == "":
        out.append(Check("weights.prefix", Status.FAIL,
                         "weight names have no `model.` prefix (layers.N... at the top)",
                         "re-save with transformers `save_pretrained` (names model.layers.N...)"))
    elif prefix == "model.model.":
        out.append(Check("weights.prefix", Status.FAIL,
                         "weight names carry `model.` twice (model.model.layers...)",
                         "re-save from the *ForCausalLM model, not a wrapper around it"))
    else:
        out.append(Check("weights.prefix", Status.OK, f"weight names start with `{prefix}`"))
    if info.expects_shared_expert and info.shared_expert_tensors == 0:
        out.append(Check("weights.shared_expert", Status.FAIL,
                         "config.json has a shared expert but the checkpoint has no "
                         "*.shared_expert.* tensors",
                         "use a complete checkpoint (the shared expert was dropped or renamed)"))
    elif info.shared_expert_tensors:
        how = "quantized" if info.quantized_shared_expert else "not quantized"
        out.append(Check("weights.shared_expert", Status.OK,
                         f"{info.shared_expert_tensors} shared-expert tensors ({how})"))
    else:
        out.append(Check("weights.shared_expert", Status.OK, "no shared expert in this model"))
    return out


def _executable(path: str) -> bool:
    return os.path.isfile(path) and os.access(path, os.X_OK)


def check_cuda(f: _Facts) -> list[Check]:
    home = f.cfg.vllm.cuda_home or f.env.get("CUDA_HOME")
    out: list[Check] = []
    if f.cpu_build:
        out.append(Check("cuda", Status.OK, "not needed: CPU build of vLLM (torch without CUDA)"))
    elif not home:
        out.append(Check("cuda", Status.WARN, "vllm.cuda_home is not set and CUDA_HOME is unset",
                         "set vllm.cuda_home (e.g. /usr/local/cuda-13.0): FlashInfer's JIT "
                         "needs its nvcc"))
    else:
        missing = [t for t in ("nvcc", "ptxas") if not _executable(f"{home}/bin/{t}")]
        if missing:
            out.append(Check("cuda", Status.FAIL, f"{home}/bin lacks {', '.join(missing)}",
                             "point vllm.cuda_home at a full CUDA toolkit (bin/nvcc, bin/ptxas)"))
        else:
            out.append(Check("cuda", Status.OK, f"{home}/bin has nvcc and ptxas"))
    ptxas = f.env.get("TRITON_PTXAS_PATH")
    if ptxas is not None and not _executable(ptxas):
        out.append(Check("ptxas", Status.FAIL, f"TRITON_PTXAS_PATH={ptxas} is not an "
                         "executable file", "point it at the CUDA toolkit's bin/ptxas"))
    elif ptxas is not None:
        out.append(Check("ptxas", Status.OK, f"TRITON_PTXAS_PATH={ptxas}"))
    elif f.cpu_build:
        out.append(Check("ptxas", Status.OK, "not needed: CPU build of vLLM"))
    else:
        suggestion = f"{home}/bin/ptxas" if home else "<cuda_home>/bin/ptxas"
        out.append(Check("ptxas", Status.WARN,
                         "TRITON_PTXAS_PATH is unset: Triton uses its bundled ptxas, which "
                         "fails on GB10 ('ptxas fatal: sm_121a', triton-lang/triton#8539)",
                         f"set vllm.env.TRITON_PTXAS_PATH: {suggestion}"))
    interp = f.env.get("TRITON_INTERPRET")
    if interp == "1":
        out.append(Check("triton_interpret", Status.WARN if f.cpu_build else Status.FAIL,
                         "TRITON_INTERPRET=1: Triton kernels run in the Python interpreter "
                         "(about 1 token/s)",
                         "remove TRITON_INTERPRET from vllm.env (and the service environment)"))
    else:
        out.append(Check("triton_interpret", Status.OK,
                         f"TRITON_INTERPRET is {interp!r}" if interp else "TRITON_INTERPRET unset"))
    return out


def check_port(f: _Facts) -> Check:
    v = f.cfg.vllm
    problem = procs.port_holder(v.host, v.port)
    if problem is None:
        return Check("port", Status.OK, f"{v.host}:{v.port} is free")
    if f.running:
        return Check("port", Status.WARN, f"{problem}: by this config's running vLLM "
                     f"(pid {', '.join(map(str, f.running))})",
                     "expected while the service runs; stop it to check a fresh start")
    return Check("port", Status.FAIL, problem,
                 f"stop what holds it (`ss -ltnp 'sport = :{v.port}'`) or change vllm.port")


def check_gate_ports(f: _Facts) -> list[Check]:
    """The gate's public addresses must be free to bind (the daemon binds them at start)."""
    if f.cfg.gate is None:
        return []
    out = []
    for host, port in f.cfg.gate.listen:
        problem = procs.port_holder(host, port)
        if problem is None:
            out.append(Check("gate_port", Status.OK, f"{host}:{port} (gate.listen) is free"))
        elif f.running:
            out.append(Check("gate_port", Status.WARN, f"{problem}: by this config's "
                             "running service", "expected while the service runs"))
        else:
            out.append(Check("gate_port", Status.FAIL, f"{problem} (gate.listen)",
                             f"stop what holds it (`ss -ltnp 'sport = :{port}'`) or change "
                             "gate.listen"))
    return out


def check_gpu(f: _Facts, world: World) -> list[Check]:
    nvml_mode = f.cfg.gpu.nvml
    if nvml_mode == "off":
        return [Check("nvml", Status.OK, "gpu.nvml is off: GPU checks skipped")]
    if f.cpu_build and nvml_mode != "required":
        return [Check("nvml", Status.OK, "not needed: CPU build of vLLM")]
    try:
        from nika_supervisor.gpu import FailureClass, GpuMonitor
    except ImportError as e:
        return [Check("nvml", Status.WARN, f"GPU checks unavailable ({e})",
                      "install nika-supervisor completely (nika_supervisor.gpu, nvidia-ml-py)")]
    kwargs: dict[str, Any] = {"meminfo_path": world.meminfo_path, "base_env": world.base_env}
    if world.nvml is not None:
        kwargs["nvml"] = world.nvml
    if world.device_glob is not None:
        kwargs["device_glob"] = world.device_glob
    mon = GpuMonitor(f.cfg.gpu, vllm_env=f.cfg.vllm.env_dict, **kwargs)
    try:
        finding = mon.start()
        sample = mon.sample(f.running)
        pf = mon.preflight(MARKER_ENV, marker_value(f.cfg))
    finally:
        mon.close()
    out: list[Check] = []
    if finding is not None and finding.klass is FailureClass.FATAL:
        out.append(Check("nvml", Status.FAIL, finding.reason, finding.hint))
    elif finding is not None:
        out.append(Check("nvml", Status.WARN, finding.reason, finding.hint))
    if sample.devices:
        f.unified = any(d.unified for d in sample.devices)
        f.gpu_totals = [d.memory_total or 0 for d in sample.devices if not d.unified]
        f.gpu_used = [d.memory_used or 0 for d in sample.devices if not d.unified]
        names = ", ".join(f"{d.index}: {d.name}" + (" (unified memory)" if d.unified else "")
                          for d in sample.devices)
        if finding is None:
            out.append(Check("nvml", Status.OK, f"driver {mon.driver_version}; GPUs {names}"))
    elif finding is None:
        out.append(Check("nvml", Status.WARN, "NVML is up but reports no GPU readings",
                         "check `nvidia-smi`"))
    if pf.refuse_reason:
        out.append(Check("gpu_holders", Status.FAIL, pf.refuse_reason,
                         "stop those processes, or set gpu.stale_holders: report"))
    elif pf.stale and not f.running:
        listed = "; ".join(h.describe() for h in pf.stale)
        out.append(Check("gpu_holders", Status.WARN, f"stale processes of an earlier run: "
                         f"{listed}", "they are ended at the next start; or end them now"))
    elif pf.foreign:
        listed = "; ".join(h.describe() for h in pf.foreign)
        out.append(Check("gpu_holders", Status.WARN, f"other GPU users: {listed}",
                         "they take memory that vLLM's gpu-memory-utilization counts on"))
    else:
        out.append(Check("gpu_holders", Status.OK, "no stale or foreign GPU processes"))
    return out


def _kv_bytes(f: _Facts) -> int | None:
    """An explicit KV-cache size: --kv-cache-memory-bytes, or VLLM_CPU_KVCACHE_SPACE (GiB)
    on the CPU backend (vllm/platforms/cpu.py sets kv_cache_memory_bytes from it)."""
    v = f.arg("kv-cache-memory-bytes")
    if v is not None and not isinstance(v, bool | tuple):
        try:
            return parse_size(v if isinstance(v, int) else str(v))
        except ValueError:
            return None
    space = f.env.get("VLLM_CPU_KVCACHE_SPACE", "")
    if f.cpu_build and space.isdigit() and int(space) > 0:
        return int(space) * GiB
    return None


def check_memory(f: _Facts, world: World) -> Check:
    raw_util = f.arg("gpu-memory-utilization")
    util = (float(raw_util) if isinstance(raw_util, int | float) and not isinstance(raw_util, bool)
            else DEFAULT_GPU_MEMORY_UTILIZATION)
    weights = f.info.total_bytes if f.info else None
    kv = _kv_bytes(f)
    data: dict[str, Any] = {"gpu_memory_utilization": util, "weights_bytes": weights,
                            "kv_cache_bytes": kv, "unified": f.unified}
    w_txt = f"weights {_size(weights)}" if weights is not None else "weights unknown"
    if not (f.cpu_build or f.unified):
        if f.unified is False:
            return _discrete_memory(f, util, weights, w_txt, data)
        return Check("memory", Status.WARN, "GPU memory unknown (no NVML readings)",
                     "check with `nvidia-smi` that the weights fit", data)
    mem = read_meminfo(world.meminfo_path)
    total, avail = mem.get("MemTotal"), mem.get("MemAvailable")
    if not total or avail is None:
        return Check("memory", Status.WARN, f"cannot read {world.meminfo_path}",
                     "check the memory budget by hand", data)
    data.update(mem_total=total, mem_available=avail, mem_free=mem.get("MemFree"))
    where = "host memory, CPU build" if f.cpu_build else "unified memory"
    if kv is not None:
        need = (weights or 0) + kv
        if need > avail:
            return Check("memory", Status.FAIL,
                         f"{w_txt} + KV {_size(kv)} > MemAvailable {_size(avail)}",
                         "free memory, or lower the KV-cache size", data)
        return Check("memory", Status.OK, f"{w_txt} + KV {_size(kv)} fit in MemAvailable "
                     f"{_size(avail)} ({where})", data=data)
    wanted = util * total
    data["requested_bytes"] = int(wanted)
    budget = f"gpu-memory-utilization {util:g} x {_size(total)} = {_size(wanted)}"
    if wanted > avail:
        fit = max(0.05, int(avail / total * 100) / 100 - 0.02)
        return Check("memory", Status.FAIL, f"{budget} > MemAvailable {_size(avail)}: "
                     "vLLM will refuse to start ('less than desired ... memory utilization')",
                     f"free memory, or set vllm.args.gpu-memory-utilization <= {fit:.2f}", data)
    if weights is not None and weights >= wanted:
        return Check("memory", Status.FAIL, f"{w_txt} do not fit in {budget}: no room for "
                     "the KV cache", "raise gpu-memory-utilization, or use a smaller model", data)
    kv_left = f", KV budget about {_size(wanted - weights)}" if weights else ""
    detail = f"{budget}{kv_left}; MemAvailable {_size(avail)} ({where})"
    if f.unified and not f.cpu_build and util > UNIFIED_UTILIZATION_WARN:
        return Check("memory", Status.WARN, f"{detail}; above {UNIFIED_UTILIZATION_WARN} the "
                     "page cache competes on unified memory",
                     f"set vllm.args.gpu-memory-utilization <= {UNIFIED_UTILIZATION_WARN}", data)
    free = mem.get("MemFree")
    if f.unified and not f.cpu_build and free is not None and wanted > free:
        return Check("memory", Status.WARN, f"{detail}; but MemFree is only {_size(free)} "
                     "(page cache), which GB10's CUDA may not count as free",
                     "drop the page cache before a start: `sync; echo 3 > "
                     "/proc/sys/vm/drop_caches`", data)
    return Check("memory", Status.OK, detail, data=data)


def _discrete_memory(f: _Facts, util: float, weights: int | None, w_txt: str,
                     data: dict[str, Any]) -> Check:
    if not f.gpu_totals:
        return Check("memory", Status.WARN, "GPU memory unknown (no NVML memory readings)",
                     "check with `nvidia-smi` that the weights fit", data)
    tp = f.arg("tensor-parallel-size")
    shards = tp if isinstance(tp, int) and not isinstance(tp, bool) and tp > 0 else 1
    total, used = min(f.gpu_totals), max(f.gpu_used) if f.gpu_used else 0
    wanted = util * total
    data.update(gpu_total=total, gpu_used=used, requested_bytes=int(wanted))
    budget = f"gpu-memory-utilization {util:g} x {_size(total)} = {_size(wanted)}"
    if total - used < wanted and not f.running:
        return Check("memory", Status.FAIL, f"{budget}, but only {_size(total - used)} "
                     "free on a GPU: vLLM will refuse to start",
                     "stop other GPU users, or lower gpu-memory-utilization", data)
    if weights is not None and weights / shards >= wanted:
        return Check("memory", Status.FAIL, f"{w_txt} / {shards} GPU(s) do not fit in {budget}",
                     "raise gpu-memory-utilization or tensor-parallel-size, or use a smaller "
                     "model", data)
    kv_left = (f", KV budget about {_size(wanted - weights / shards)} per GPU"
               if weights is not None else "")
    return Check("memory", Status.OK, f"{budget}{kv_left}", data=data)


# ----------------------------------------------------------------------------- running


def run_checks(config_path: str, world: World | None = None) -> list[Check]:
    world = world or World()
    first, cfg = check_config(config_path)
    checks = [first]
    if cfg is None:
        return checks
    env = build_env(cfg, world.base_env, read_secret=False)[0]
    f = _Facts(cfg, env)
    f.running = [p.pid for p in procs.scan_marked(MARKER_ENV, marker_value(cfg))]
    f.probe = run_probe(cfg.vllm.python, env, world.probe_timeout)
    checks.append(check_vllm(f))
    f.model_dir = ckpt.resolve_model_dir(cfg.vllm.model, env)
    checks.append(check_architecture(f))
    checks += check_checkpoint(f)
    checks += check_cuda(f)
    checks.append(check_port(f))
    checks += check_gate_ports(f)
    checks += check_gpu(f, world)
    checks.append(check_memory(f, world))
    if cfg.cluster is not None:
        from nika_supervisor.cluster.checks import cluster_checks  # it imports Check from here

        local = f.probe.get("vllm_dist") if "vllm_dist" in f.probe else \
            interpreter.dist_version(cfg.vllm.python, env, min(20.0, world.probe_timeout))
        checks += cluster_checks(cfg, env, local, peer_timeout=world.peer_timeout,
                                 net_dir=world.net_dir, route_path=world.route_path)
    return checks


def exit_code(checks: list[Check]) -> int:
    if any(c.name == "config" and c.status is Status.FAIL for c in checks):
        return int(ExitCode.CONFIG)
    return 1 if any(c.status is Status.FAIL for c in checks) else 0


def render_text(checks: list[Check]) -> str:
    width = max(len(c.name) for c in checks) + 2
    lines = []
    for c in checks:
        lines.append(f"{c.status.value:<5} {c.name:<{width}}{c.detail}")
        if c.status is not Status.OK and c.fix:
            lines.append(f"{'':<6}{'fix:':<{width}}{c.fix}")
    counts = {s: sum(c.status is s for c in checks) for s in Status}
    lines.append(f"doctor: {counts[Status.FAIL]} fail, {counts[Status.WARN]} warn, "
                 f"{counts[Status.OK]} ok")
    return "\n".join(lines)


def render_json(checks: list[Check], config_path: str) -> str:
    return json.dumps({
        "config": config_path,
        "ok": not any(c.status is Status.FAIL for c in checks),
        "exit_code": exit_code(checks),
        "checks": [{**asdict(c), "status": c.status.value, "data": dict(c.data)}
                   for c in checks],
    }, indent=2, default=str)


def main(config_path: str, as_json: bool) -> int:
    """`nika-supervisor doctor`: print the checks; 0 ok, 78 bad config, 1 another fail."""
    checks = run_checks(config_path)
    out = render_json(checks, config_path) if as_json else render_text(checks)
    sys.stdout.write(out + "\n")
    sys.stdout.flush()
    return exit_code(checks)
