"""The stand-in's EngineCore and Workers: forked children in the API server's process group
that, like vLLM's, outlive a SIGKILL of the API server. (See standin_server.py.)"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from typing import Any

from standin_common import StateDir, log, set_comm

# vllm/v1/engine/core.py -> vllm/utils/system_utils.py set_process_title (setproctitle)
ENGINE_COMM = "VLLM::EngineCore"
WORKER_COMM = "VLLM::Worker"


# ----------------------------------------------------------------------------- the engine


def _fork_idle(comm: str, role: str, ignore_term: bool, lifetime: float,
               state: StateDir, on_term: Any = None) -> int:
    """Fork a process that idles until SIGTERM (or SIGKILL). It does not watch its parent:
    like vLLM's EngineCore, it survives when the parent is SIGKILLed."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return pid
    # child: never return into the parent's code
    try:
        set_comm(comm)
        state.record_start(role, os.getpid())
        signal.signal(signal.SIGINT, signal.SIG_IGN)

        def term(_s: int, _f: Any) -> None:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not re-enter
            if on_term is not None:
                on_term()
            log("INFO", "core.py:1", f"{role} exiting on SIGTERM", role=comm.split("::")[-1])
            os._exit(0)

        signal.signal(signal.SIGTERM, signal.SIG_IGN if ignore_term else term)
        deadline = time.monotonic() + lifetime
        while time.monotonic() < deadline:
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
    finally:
        os._exit(0)


class _GpuHold:
    """STANDIN_GPU_GIB=N (the GPU validation run only): the engine holds N GiB of CUDA memory,
    as vLLM's EngineCore holds the model, until the file `gpu_release` appears in the state
    dir; then it frees the memory (the CUDA context stays), like a model that stopped being
    resident. Needs torch with CUDA; imported only here."""

    def __init__(self, state: StateDir) -> None:
        import torch

        self.torch = torch
        self.release = os.path.join(state.path or ".", "gpu_release")
        gib = float(os.environ["STANDIN_GPU_GIB"])
        self.block: Any = torch.empty(int(gib * 2**30), dtype=torch.uint8, device="cuda")
        torch.cuda.synchronize()
        log("INFO", "gpu.py:1", f"holding {gib:g} GiB on cuda:0", role="EngineCore")

    def poll(self) -> None:
        if self.block is not None and os.path.exists(self.release):
            self.block = None
            self.torch.cuda.empty_cache()
            log("INFO", "gpu.py:2", "released the GPU memory", role="EngineCore")


class Engine:
    """The EngineCore child and its Workers (grandchildren), all in our process group."""

    def __init__(self, state: StateDir, workers: int, ignore_term: bool, lifetime: float) -> None:
        self.state = state
        self.worker_pids: list[int] = []
        worker_box: list[int] = []
        r, w = os.pipe()
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:  # EngineCore
            os.close(r)
            try:
                for _ in range(workers):
                    worker_box.append(_fork_idle(WORKER_COMM, "worker", ignore_term, lifetime,
                                                 state))
                # Like vLLM, the API server comes up only once the engine holds the model.
                gpu = _GpuHold(state) if os.environ.get("STANDIN_GPU_GIB") else None
                os.write(w, (json.dumps(worker_box) + "\n").encode())
                os.close(w)

                def end_workers() -> None:
                    for wp in worker_box:
                        with contextlib.suppress(OSError):
                            os.kill(wp, signal.SIGTERM)
                    for wp in worker_box:
                        with contextlib.suppress(OSError):
                            os.waitpid(wp, 0)

                set_comm(ENGINE_COMM)
                state.record_start("engine", os.getpid())
                log("INFO", "core.py:133", "Initializing a V1 LLM engine (v0.32.0) (stand-in)",
                    role="EngineCore")

                def term(_s: int, _f: Any) -> None:
                    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # no re-entry on a 2nd one
                    end_workers()
                    log("INFO", "core.py:1", "EngineCore exiting on SIGTERM", role="EngineCore")
                    os._exit(0)

                signal.signal(signal.SIGINT, signal.SIG_IGN)
                signal.signal(signal.SIGTERM, signal.SIG_IGN if ignore_term else term)
                deadline = time.monotonic() + lifetime
                while time.monotonic() < deadline:
                    time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
                    if gpu is not None:
                        gpu.poll()
            finally:
                os._exit(0)
        os.close(w)
        with os.fdopen(r) as f:
            line = f.readline()
        self.pid = pid
        self.worker_pids = json.loads(line) if line.strip() else []
        state.write("engine.pid", f"{pid}\n")
        state.write("workers.pids", "".join(f"{p}\n" for p in self.worker_pids))

    def terminate(self, timeout: float = 2.0) -> bool:
        """SIGTERM the engine and reap it (bounded: an engine ignoring SIGTERM stays)."""
        with contextlib.suppress(OSError):
            os.kill(self.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                done, _ = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                return True
            if done:
                return True
            time.sleep(0.01)
        return False
