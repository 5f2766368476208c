"""A CUDA workload that stands in for vLLM under the shipped unit (issue 13).

Reached through the argv the daemon builds for vLLM (`<python> -m
vllm.entrypoints.openai.api_server --model M --served-model-name A --host H --port P ...`,
routed here by the `vllm` shim package next to this file), it does what vLLM does that the
unit's hardening could break, in vLLM's order:

- the API server (stdlib only) starts an EngineCore child in its own process group; like
  vLLM's, the engine outlives a SIGKILL of the API server (it idles, holding the GPU, until
  the daemon ends the group);
- the engine: initialises CUDA; opens NVML (driver, memory, the compute processes it lists);
  JIT-compiles a Triton kernel (TRITON_CACHE_DIR); runs a torch.compile'd function
  (TORCHINDUCTOR_CACHE_DIR); initialises NCCL on one rank (torch.distributed, world_size 1,
  backend nccl) and all-reduces; then takes most of the free GPU memory with one plain
  allocation (cudaMalloc through torch's caching allocator, never managed memory), as vLLM
  allocates its KV cache after the profiling run;
- only then the API server binds and answers /health, /v1/models (the alias), /metrics and
  /v1/completions (each completion runs the compiled function and the Triton kernel on the
  GPU).

Every step's outcome and time goes to WORKLOAD_STATE_DIR/engine-<pid>.json; a failed step is
recorded with its error and the engine exits 1 (the API server then exits 1 as well).
WORKLOAD_NO_GPU=1 skips the CUDA steps (a dry run of the plumbing on a machine without a GPU).

Environment: WORKLOAD_STATE_DIR (required), WORKLOAD_GPU_FRACTION (of the free memory, default
0.85), WORKLOAD_MAX_LIFETIME_S (every process exits after this long, default 900), WORKLOAD_SELFTEST
(`personality`: a first step that LockPersonality= refuses, to test the bisection).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

STATE = Path(os.environ.get("WORKLOAD_STATE_DIR", "."))
NO_GPU = os.environ.get("WORKLOAD_NO_GPU", "") == "1"
LIFETIME = float(os.environ.get("WORKLOAD_MAX_LIFETIME_S", "900"))
# "cpu" (with TRITON_INTERPRET=1) only to check the Triton and compile steps without a GPU.
DEVICE = os.environ.get("WORKLOAD_DEVICE", "cuda")


def log(role: str, message: str, level: str = "INFO") -> None:
    """A vLLM-style line: `(Role pid=N) LEVEL mm-dd HH:MM:SS [file:line] message`."""
    stamp = time.strftime("%m-%d %H:%M:%S")
    sys.stderr.write(f"({role} pid={os.getpid()}) {level} {stamp} [gpu_workload.py:1] "
                     f"{message}\n")
    sys.stderr.flush()


def write_json(name: str, data: Any) -> None:
    tmp = STATE / f".{name}.tmp"
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, STATE / name)


def files_under(path: str | None) -> int:
    if not path or not os.path.isdir(path):
        return 0
    return sum(len(files) for _, _, files in os.walk(path))


# ------------------------------------------------------------------------------ the engine


class Engine:
    """The GPU side. Steps run in order; each records ok/seconds/details in `report`."""

    def __init__(self) -> None:
        self.report: dict[str, Any] = {"pid": os.getpid(), "no_gpu": NO_GPU, "steps": {}}
        self.torch: Any = None
        self.fn: Any = None
        self.kernel: Any = None
        self.kv: Any = None

    def step(self, name: str, func: Any) -> None:
        start = time.monotonic()
        try:
            details = func() or {}
        except BaseException as e:
            self.report["steps"][name] = {"ok": False, "error": f"{type(e).__name__}: {e}",
                                          "s": round(time.monotonic() - start, 3)}
            self.report["failed"] = name
            write_json(f"engine-{os.getpid()}.json", self.report)
            log("EngineCore", f"step {name} FAILED: {type(e).__name__}: {e}", "ERROR")
            raise
        self.report["steps"][name] = {"ok": True, "s": round(time.monotonic() - start, 3),
                                      **details}
        log("EngineCore", f"step {name} ok in {time.monotonic() - start:.2f}s {details}")

    def cuda_init(self) -> dict[str, Any]:
        import torch

        self.torch = torch
        torch.cuda.init()
        free, total = torch.cuda.mem_get_info()
        return {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
                "cuda": torch.version.cuda, "free_gib": round(free / 2**30, 2),
                "total_gib": round(total / 2**30, 2)}

    def nvml(self) -> dict[str, Any]:
        import pynvml

        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(0)
        mem = pynvml.nvmlDeviceGetMemoryInfo(h)
        procs = pynvml.nvmlDeviceGetComputeRunningProcesses(h)
        return {"driver": pynvml.nvmlSystemGetDriverVersion(),
                "name": pynvml.nvmlDeviceGetName(h), "used_gib": round(mem.used / 2**30, 2),
                "temp_c": pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU),
                "compute_pids": [p.pid for p in procs], "my_pid": os.getpid()}

    def triton(self) -> dict[str, Any]:
        import triton
        import triton.language as tl

        @triton.jit
        def axpy(x_ptr, y_ptr, out_ptr, a, n, BLOCK: tl.constexpr):  # type: ignore[no-untyped-def]
            offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
            mask = offs < n
            x = tl.load(x_ptr + offs, mask=mask)
            y = tl.load(y_ptr + offs, mask=mask)
            tl.store(out_ptr + offs, a * x + y, mask=mask)

        torch = self.torch
        cache = os.environ.get("TRITON_CACHE_DIR")
        before = files_under(cache)

        def run(n: int = 4096) -> float:
            x = torch.arange(n, device=DEVICE, dtype=torch.float32)
            y = torch.ones(n, device=DEVICE, dtype=torch.float32)
            out = torch.empty_like(x)
            axpy[(triton.cdiv(n, 1024),)](x, y, out, 2.0, n, BLOCK=1024)
            return float((out - (2 * x + y)).abs().max())

        self.kernel = run
        err = run()
        assert err == 0.0, f"Triton kernel result off by {err}"
        return {"triton": triton.__version__, "cache_dir": cache,
                "cache_files_before": before, "cache_files_after": files_under(cache)}

    def compile(self) -> dict[str, Any]:
        torch = self.torch
        cache = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
        before = files_under(cache)

        def f(x: Any) -> Any:
            return torch.nn.functional.gelu(x @ x.T) * torch.sin(x).sum(-1, keepdim=True)

        self.fn = torch.compile(f)
        x = torch.randn(256, 256, device=DEVICE)
        got, want = self.fn(x), f(x)
        torch.cuda.synchronize()
        assert torch.allclose(got, want, rtol=1e-2, atol=1e-2), "compiled result differs"
        return {"cache_dir": cache, "cache_files_before": before,
                "cache_files_after": files_under(cache)}

    def nccl(self) -> dict[str, Any]:
        torch = self.torch
        import torch.distributed as dist

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0,
                                world_size=1, device_id=torch.device("cuda:0"))
        t = torch.full((1024,), 3.0, device=DEVICE)
        dist.all_reduce(t)
        torch.cuda.synchronize()
        assert float(t[0]) == 3.0, f"all_reduce gave {float(t[0])}"
        return {"nccl": ".".join(map(str, torch.cuda.nccl.version())),
                "backend": dist.get_backend()}

    def allocate(self) -> dict[str, Any]:
        torch = self.torch
        frac = float(os.environ.get("WORKLOAD_GPU_FRACTION", "0.85"))
        free, total = torch.cuda.mem_get_info()
        size = int(free * frac)
        self.kv = torch.empty(size, dtype=torch.uint8, device=DEVICE)
        self.kv[:: 1 << 20].fill_(1)  # touch it: one byte in every MiB
        torch.cuda.synchronize()
        free_after, _ = torch.cuda.mem_get_info()
        return {"allocated_gib": round(size / 2**30, 2), "fraction_of_free": frac,
                "free_after_gib": round(free_after / 2**30, 2),
                "total_gib": round(total / 2**30, 2)}

    def personality(self) -> dict[str, Any]:
        """WORKLOAD_SELFTEST=personality: a step that LockPersonality=yes refuses (and nothing
        else in the unit does), to check that the bisection names the line that breaks."""
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        rc = libc.personality(0x0040000)  # ADDR_NO_RANDOMIZE
        assert rc != -1, f"personality(2) refused: errno {ctypes.get_errno()}"
        return {}

    def start(self) -> None:
        if os.environ.get("WORKLOAD_SELFTEST") == "personality":
            self.step("selftest_personality", self.personality)
        if NO_GPU:
            self.report["steps"]["cuda_init"] = {"ok": True, "skipped": "WORKLOAD_NO_GPU=1"}
        else:
            for name, func in (("cuda_init", self.cuda_init), ("nvml", self.nvml),
                               ("triton", self.triton), ("compile", self.compile),
                               ("nccl", self.nccl), ("allocate", self.allocate),
                               ("nvml_after", self.nvml)):
                self.step(name, func)
        self.report["ready"] = True
        write_json(f"engine-{os.getpid()}.json", self.report)

    def generate(self, tokens: int) -> str:
        if NO_GPU:
            return "x" * tokens
        torch = self.torch
        x = torch.randn(256, 256, device=DEVICE)
        for _ in range(tokens):
            x = torch.tanh(self.fn(x))  # bounded: repeated x @ x.T would overflow to inf/nan
        assert self.kernel() == 0.0
        torch.cuda.synchronize()
        vals = torch.nan_to_num(x[0, :tokens]).abs().mul(1000).tolist()
        return " ".join(f"t{int(v) % 97}" for v in vals)


def engine_main() -> int:
    """stdin: one JSON request a line ({"tokens": N}); stdout: the first line is the ready
    report, then one JSON answer a request. At stdin's end (the API server died) the engine
    keeps its GPU memory and idles, like an orphaned vLLM EngineCore."""
    with contextlib.suppress(OSError), open("/proc/self/comm", "w") as f:
        f.write("VLLM::EngineCor")
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    started = time.monotonic()
    eng = Engine()
    try:
        eng.start()
    except BaseException:
        return 1
    out = sys.stdout
    out.write(json.dumps({"ready": True, "pid": os.getpid()}) + "\n")
    out.flush()
    for line in sys.stdin:
        try:
            req = json.loads(line)
            text = eng.generate(int(req.get("tokens", 1)))
            out.write(json.dumps({"ok": True, "text": text}) + "\n")
        except Exception as e:
            log("EngineCore", f"generate failed: {e!r}", "ERROR")
            out.write(json.dumps({"ok": False, "error": repr(e)}) + "\n")
        out.flush()
    log("EngineCore", "the API server is gone; holding the GPU until killed", "WARNING")
    while time.monotonic() - started < LIFETIME:
        time.sleep(1)
    return 0


# -------------------------------------------------------------------------- the API server


class Api:
    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.lock = threading.Lock()
        self.tokens = 0
        self.requests = 0
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.engine = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--engine"],
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                       text=True, env=env)
        write_json("engine.pid", self.engine.pid)
        assert self.engine.stdout is not None
        first = self.engine.stdout.readline()
        if not first:
            rc = self.engine.wait()
            log("APIServer", f"EngineCore failed to start (exit {rc})", "ERROR")
            raise SystemExit(1)

    def complete(self, tokens: int) -> dict[str, Any]:
        assert self.engine.stdin is not None and self.engine.stdout is not None
        with self.lock:
            self.engine.stdin.write(json.dumps({"tokens": tokens}) + "\n")
            self.engine.stdin.flush()
            answer = json.loads(self.engine.stdout.readline() or '{"ok": false}')
            self.requests += 1
            if answer.get("ok"):
                self.tokens += tokens
        return dict(answer)

    def metrics(self) -> str:
        label = f'model_name="{self.names[0]}"'
        return (f'vllm:num_requests_running{{engine="0",{label}}} 0.0\n'
                f'vllm:num_requests_waiting{{engine="0",{label}}} 0.0\n'
                f'vllm:generation_tokens_total{{engine="0",{label}}} {float(self.tokens)}\n')


def make_handler(api: Api) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def send(self, code: int, body: Any, ctype: str = "application/json") -> None:
            data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            dead = api.engine.poll() is not None
            if self.path == "/health":
                self.send(503 if dead else 200, "", "text/plain")
            elif self.path == "/v1/models":
                self.send(200, {"object": "list", "data": [
                    {"id": n, "object": "model", "owned_by": "vllm"} for n in api.names]})
            elif self.path == "/metrics":
                self.send(200, api.metrics(), "text/plain; version=0.0.4")
            else:
                self.send(404, {"error": "not found"})

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            try:
                body = json.loads(self.rfile.read(length) or b"{}")
            except ValueError:
                self.send(400, {"error": "bad json"})
                return
            if self.path != "/v1/completions":
                self.send(404, {"error": "not found"})
                return
            if body.get("model") not in api.names:
                self.send(404, {"error": f"model {body.get('model')!r} not served"})
                return
            n = max(1, min(int(body.get("max_tokens") or 16), 64))
            answer = api.complete(n)
            if not answer.get("ok"):
                self.send(500, {"error": answer.get("error", "EngineDeadError")})
                return
            self.send(200, {"id": f"cmpl-{api.requests}", "object": "text_completion",
                            "model": body["model"],
                            "choices": [{"index": 0, "text": answer["text"],
                                         "finish_reason": "length"}],
                            "usage": {"prompt_tokens": 1, "completion_tokens": n,
                                      "total_tokens": n + 1}})

    return Handler


def api_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="api_server.py")
    ap.add_argument("--model", required=True)
    ap.add_argument("--served-model-name", nargs="+")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    args, unknown = ap.parse_known_args(argv)
    STATE.mkdir(parents=True, exist_ok=True)
    write_json("api.pid", os.getpid())
    log("APIServer", f"gpu_workload for {args.model}; ignored flags {unknown}")

    def term(_s: int, _f: Any) -> None:
        log("APIServer", "SIGTERM: stopping the engine")
        with contextlib.suppress(OSError):
            os.kill(api.engine.pid, signal.SIGTERM)
        os._exit(0)

    api = Api(args.served_model_name or [args.model])
    signal.signal(signal.SIGTERM, term)
    server = ThreadingHTTPServer((args.host, args.port), make_handler(api))
    write_json("bound_at", time.monotonic())
    log("APIServer", f"Uvicorn running on http://{args.host}:{args.port} (gpu_workload)")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    deadline = time.monotonic() + LIFETIME
    while time.monotonic() < deadline:
        if api.engine.poll() is not None:
            log("APIServer", f"EngineCore died (exit {api.engine.returncode})", "ERROR")
            time.sleep(30)  # /health answers 503 meanwhile, as vLLM's EngineDeadError does
            return 1
        time.sleep(0.2)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--engine"]:
        raise SystemExit(engine_main())
    raise SystemExit(api_main(sys.argv[1:]))
