"""Benchmarks of the gate (issue 10) against the stand-in vLLM (tests/standin/).

- latency added: p50/p99 of the same request direct vs through the gate, at 1 and 64
  concurrent clients, and the throughput; optionally other HTTP stacks for the same proxy
  (--stacks: uvicorn+httpx), which is how the gate's stack was chosen;
- streaming: how long after the stand-in wrote an SSE chunk the client has it, direct vs
  through the gate (the stand-in stamps each chunk with CLOCK_MONOTONIC);
- the supervisor loop under load: a loop like the daemon's (queue.get with a 50 ms timeout)
  measures how late it wakes while 64 streams go through the gate, with the gate as a child
  process (the design) and, for comparison, as an event loop thread inside the same process;
- idle footprint of the gate process (CPU %, RSS).

Usage: .venv/bin/python bench/gate_bench.py [--quick] [--stacks] [--json docs/bench-gate.json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import queue
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp

REPO = Path(__file__).resolve().parents[1]
STANDIN = REPO / "tests" / "standin"
sys.path.insert(0, str(REPO))

from nika_supervisor.config import parse_config  # noqa: E402
from nika_supervisor.gate import GateProcess, GateStarted, UpstreamView  # noqa: E402

CHAT = {"model": "nika", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    v = sorted(values)
    return v[min(len(v) - 1, round(p / 100 * (len(v) - 1)))]


# ------------------------------------------------------------------------------ processes


def start_standin(work: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(STANDIN), "STANDIN_STATE_DIR": str(work / "s"),
           "STANDIN_ENGINE": "0", "STANDIN_MAX_LIFETIME_S": "3600"}
    p = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server",
                          "--model", "m", "--served-model-name", "nika", "--host", "127.0.0.1",
                          "--port", str(port)], env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)
    wait_http(f"http://127.0.0.1:{port}/health")
    return p, port


def wait_http(url: str, timeout: float = 20.0) -> None:
    import urllib.request
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"{url} never answered")
        time.sleep(0.05)


def start_gate(upstream: int, work: Path) -> tuple[GateProcess, int]:
    port = free_port()
    cfg = parse_config(textwrap.dedent(f"""
        vllm: {{model: m, served_model_name: [nika], port: {upstream}}}
        supervisor: {{log_format: json}}
        gate: {{listen: ["127.0.0.1:{port}"], max_held: 4096}}
        """), "bench.yaml")
    events: queue.SimpleQueue[Any] = queue.SimpleQueue()
    log = open(work / f"gate-{port}.log", "wb")  # noqa: SIM115 (lives as long as the gate)
    g = GateProcess(cfg, emit=events.put, stdout=log)
    g.bind()
    g.start()
    while not isinstance(events.get(timeout=20), GateStarted):
        pass
    g.publish(UpstreamView(phase="ready", ready=True, upstream=f"127.0.0.1:{upstream}"))
    wait_http(f"http://127.0.0.1:{port}/health")
    return g, port


def start_uvicorn_proxy(upstream: int) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    p = subprocess.Popen([sys.executable, __file__, "--serve-uvicorn", str(port), str(upstream)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
    wait_http(f"http://127.0.0.1:{port}/health")
    return p, port


def serve_uvicorn(port: int, upstream: int) -> None:
    """The same passthrough as an ASGI app on uvicorn (httptools, uvloop), with httpx as the
    client: the other stack the issue names."""
    import httpx
    import uvicorn

    client = httpx.AsyncClient(base_url=f"http://127.0.0.1:{upstream}", timeout=None,
                               limits=httpx.Limits(max_connections=None,
                                                   max_keepalive_connections=256))

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in (b"host",)]
        req = client.build_request(scope["method"], scope["path"], headers=headers,
                                   content=body)
        resp = await client.send(req, stream=True)
        await send({"type": "http.response.start", "status": resp.status_code,
                    "headers": [(k, v) for k, v in resp.headers.raw
                                if k.lower() not in (b"transfer-encoding", b"connection")]})
        async for chunk in resp.aiter_raw():
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await resp.aclose()
        await send({"type": "http.response.body", "body": b""})

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="error", access_log=False,
                http="httptools", loop="uvloop")


# ------------------------------------------------------------------------------ load


async def _latency(url: str, concurrency: int, total: int) -> dict[str, float]:
    lat: list[float] = []
    errors = 0
    left = total
    conn = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=conn) as s:
        async def worker() -> None:
            nonlocal left, errors
            while left > 0:
                left -= 1
                t0 = time.perf_counter()
                try:
                    async with s.post(url + "/v1/chat/completions", json=CHAT) as r:
                        await r.read()
                        ok = r.status == 200
                except aiohttp.ClientError:
                    ok = False
                if ok:
                    lat.append(time.perf_counter() - t0)
                else:
                    errors += 1
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return {"p50_ms": pct(lat, 50) * 1e3, "p99_ms": pct(lat, 99) * 1e3,
            "rps": len(lat) / wall, "errors": errors}


def latency(url: str, concurrency: int, total: int) -> dict[str, float]:
    return asyncio.run(_latency(url, concurrency, total))


async def _streams(url: str, n: int, chunks: int, gap: float,
                   duration: float | None = None) -> dict[str, float]:
    """n concurrent streams (repeated until duration, if given): per-chunk delay from the
    stand-in's write to our read."""
    delays: list[float] = []
    count = 0
    body = {**CHAT, "stream": True, "max_tokens": chunks, "standin_chunk_delay_s": gap}
    end = time.monotonic() + duration if duration else None
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        async def one() -> None:
            nonlocal count
            while True:
                async with s.post(url + "/v1/chat/completions", json=body) as r:
                    buf = b""
                    async for data in r.content.iter_any():
                        now = time.monotonic()
                        buf += data
                        *events, buf = buf.split(b"\n\n")
                        for ev in events:
                            if ev.startswith(b"data: {"):
                                sent = json.loads(ev[6:]).get("standin_sent_mono")
                                if sent is not None:
                                    delays.append(now - sent)
                                    count += 1
                if end is None or time.monotonic() >= end:
                    return
        await asyncio.gather(*(one() for _ in range(n)))
    return {"chunks": count, "p50_ms": pct(delays, 50) * 1e3, "p99_ms": pct(delays, 99) * 1e3}


def streams(url: str, n: int, chunks: int, gap: float,
            duration: float | None = None) -> dict[str, float]:
    return asyncio.run(_streams(url, n, chunks, gap, duration))


# ------------------------------------------------------------------------------ the loop


def loop_lateness(seconds: float) -> dict[str, float]:
    """A loop shaped like the supervisor's: block on a queue with a 50 ms timeout, and note
    how late each wake-up is (what delays the watchdog)."""
    q: queue.SimpleQueue[int] = queue.SimpleQueue()
    late: list[float] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        t0 = time.monotonic()
        with contextlib.suppress(queue.Empty):
            q.get(timeout=0.05)
        late.append(time.monotonic() - t0 - 0.05)
    return {"ticks": len(late), "p50_ms": pct(late, 50) * 1e3, "p99_ms": pct(late, 99) * 1e3,
            "max_ms": max(late) * 1e3}


def in_process_gate(upstream: int) -> tuple[int, threading.Thread]:
    """The rejected design, for comparison: the same gate app on an event loop thread of the
    daemon's own process."""
    from aiohttp import web

    from nika_supervisor.gate.app import GateApp
    from nika_supervisor.gate.hold import Admission
    from nika_supervisor.gate.protocol import GateSettings

    port = free_port()
    started = threading.Event()

    def run() -> None:
        async def main() -> None:
            adm = Admission(30.0, 4096)
            adm.set_view(UpstreamView("ready", True, f"127.0.0.1:{upstream}"))
            app = GateApp(GateSettings(30.0, 4096, 60.0, True, ("nika",), "m"), adm)
            runner = web.AppRunner(app.build(), handler_cancellation=True, access_log=None)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", port).start()
            started.set()
            await asyncio.Event().wait()
        asyncio.run(main())

    t = threading.Thread(target=run, daemon=True)
    t.start()
    started.wait(10)
    return port, t


def under_load(url: str, seconds: float, n: int) -> tuple[dict[str, float], dict[str, Any]]:
    """Loop lateness here while a separate client process drives n streams through url."""
    client = subprocess.Popen([sys.executable, __file__, "--stream-client", url, str(n),
                               str(seconds + 1.0)], stdout=subprocess.PIPE)
    time.sleep(1.0)  # let the streams ramp up
    lat = loop_lateness(seconds)
    out, _ = client.communicate(timeout=seconds + 60)
    return lat, json.loads(out)


def proc_cpu_rss(pid: int) -> tuple[float, int]:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return ticks, memory(pid)["Rss"]


def memory(pid: int) -> dict[str, int]:
    """Rss, Pss (shared library pages split among their users) and Anonymous, in bytes."""
    out = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("Rss", "Pss", "Anonymous"):
                out[key] = int(rest.split()[0]) * 1024
    return out


# ------------------------------------------------------------------------------ main


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--stacks", action="store_true", help="also uvicorn+httpx")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--serve-uvicorn", nargs=2, type=int, metavar=("PORT", "UPSTREAM"))
    ap.add_argument("--stream-client", nargs=3, metavar=("URL", "N", "SECONDS"))
    a = ap.parse_args()
    if a.serve_uvicorn:
        serve_uvicorn(*a.serve_uvicorn)
        return 0
    if a.stream_client:
        url, n, secs = a.stream_client
        print(json.dumps(streams(url, int(n), 50, 0.01, float(secs))))
        return 0

    n1, n64 = (300, 1000) if a.quick else (1000, 4000)
    load_s = 5.0 if a.quick else 15.0
    result: dict[str, Any] = {
        "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs "
                   f"(load avg {os.getloadavg()[0]:.1f} at start), Python "
                   f"{platform.python_version()}, aiohttp {aiohttp.__version__}",
        "command": " ".join(["bench/gate_bench.py", *sys.argv[1:]]),
    }
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        standin, up = start_standin(work)
        gate, gport = start_gate(up, work)
        targets = {"direct": f"http://127.0.0.1:{up}", "gate": f"http://127.0.0.1:{gport}"}
        extra: list[subprocess.Popen[bytes]] = []
        if a.stacks:
            p, uport = start_uvicorn_proxy(up)
            extra.append(p)
            targets["uvicorn+httpx"] = f"http://127.0.0.1:{uport}"
        try:
            lat: dict[str, Any] = {}
            for c, total in ((1, n1), (64, n64)):
                for name, url in targets.items():
                    latency(url, c, min(total, 200))  # warm up
                    runs = [latency(url, c, total) for _ in range(a.runs)]
                    lat[f"{name} c={c}"] = {k: statistics.median(r[k] for r in runs)
                                            for k in runs[0]}
                    print(f"latency {name:14s} c={c:<3d} " + " ".join(
                        f"{k}={v:.2f}" for k, v in lat[f"{name} c={c}"].items()), flush=True)
            result["latency"] = lat
            st = {name: streams(url, 1, 200, 0.005) for name, url in
                  (("direct", targets["direct"]), ("gate", targets["gate"]))}
            result["stream_chunk_delay"] = st
            print(f"stream chunk delay: {st}", flush=True)

            idle_s = 10.0 if a.quick else 60.0
            pid = gate.pid
            assert pid is not None
            c0, _ = proc_cpu_rss(pid)
            time.sleep(idle_s)
            c1, rss = proc_cpu_rss(pid)
            mem = memory(pid)
            result["gate_idle"] = {"seconds": idle_s, "cpu_pct": 100 * (c1 - c0) / idle_s,
                                   "rss_mb": rss / 2**20, "pss_mb": mem["Pss"] / 2**20,
                                   "anon_mb": mem["Anonymous"] / 2**20}
            print(f"gate idle: {result['gate_idle']}", flush=True)

            result["loop_idle"] = loop_lateness(min(load_s, 5.0))
            lc, sc = under_load(targets["gate"], load_s, 64)
            result["loop_gate_child_64_streams"] = {"loop": lc, "streams": sc}
            print(f"loop, gate as a child, 64 streams: {lc} {sc}", flush=True)
            ip, _t = in_process_gate(up)
            li, si = under_load(f"http://127.0.0.1:{ip}", load_s, 64)
            result["loop_gate_in_process_64_streams"] = {"loop": li, "streams": si}
            print(f"loop, gate in-process, 64 streams: {li} {si}", flush=True)
        finally:
            gate.close()
            for p in [standin, *extra]:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    print(json.dumps(result, indent=1))
    if a.json:
        a.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
