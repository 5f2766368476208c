#!/usr/bin/env python3
"""Capture real vLLM output while it loads, for the load-progress parser's tests.

    scripts/capture-vllm-load.py --python VENV/bin/python --model DIR --shards 4 \
        --out tests/data/vllm_output/load_4shards.txt

Runs vLLM's OpenAI server (the api_server entrypoint, as scripts/demo.sh does) with stdout and
stderr on ONE pipe, records the bytes exactly as they arrive (tqdm's carriage returns kept),
polls GET /v1/models until the alias is listed, then ends vLLM's process group with SIGTERM.

`--shards N` first writes a copy of the model whose safetensors are split into N files with a
model.safetensors.index.json, so that vLLM prints a multi-shard progress bar. The split uses the
vLLM venv's own safetensors (the copy lives in a temporary directory).

The file written starts with '# ' header lines (command, date, versions, when the alias was
listed, the exit status), then the raw output. `# at +S.Ss byte N` lines in the header record
when each chunk arrived, so a test can replay the capture with real timing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

SPLIT = r"""
import json, sys
from safetensors.torch import load_file, save_file
src, dst, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
tensors = load_file(f"{src}/model.safetensors")
names = sorted(tensors)
per = -(-len(names) // n)
weight_map, total = {}, 0
for i in range(n):
    part = names[i * per:(i + 1) * per]
    fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
    part_tensors = {k: tensors[k].contiguous() for k in part}
    save_file(part_tensors, f"{dst}/{fname}", metadata={"format": "pt"})
    for k in part:
        weight_map[k] = fname
        total += tensors[k].numel() * tensors[k].element_size()
with open(f"{dst}/model.safetensors.index.json", "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def sharded_copy(python: str, model: Path, shards: int, where: Path) -> Path:
    dst = where / f"{model.name}-{shards}shards"
    dst.mkdir()
    for f in model.iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, dst / f.name)
    subprocess.run([python, "-c", SPLIT, str(model), str(dst), str(shards)], check=True)
    return dst


def listed(port: int, alias: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2) as r:
            data = json.loads(r.read())
    except (OSError, ValueError):
        return False
    return any(m.get("id") == alias for m in data.get("data", []))


def save_metrics(port: int, out: Path) -> None:
    body = json.dumps({"model": "nika", "messages": [{"role": "user", "content": "Hello!"}],
                       "max_tokens": 4, "temperature": 0}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        r.read()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
        text = r.read()
    stamp = (f"# vLLM's GET /metrics after one 4-token chat completion "
             f"(scripts/capture-vllm-load.py, {datetime.now(UTC).date()})\n").encode()
    out.write_bytes(stamp + text)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--python", required=True, help="the vLLM venv's python")
    ap.add_argument("--model", required=True, type=Path)
    ap.add_argument("--shards", type=int, default=0, help="split the weights into N files")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--timeout", type=float, default=300.0)
    ap.add_argument("--metrics-out", type=Path,
                    help="once ready, send one chat completion and save GET /metrics here")
    ap.add_argument("--arg", action="append", default=[],
                    help="an extra vLLM flag, e.g. --arg=--enforce-eager (repeatable)")
    a = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="nika-capture-"))
    try:
        model = sharded_copy(a.python, a.model, a.shards, tmp) if a.shards else a.model
        port = free_port()
        argv = [a.python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
                "--served-model-name", "nika", "--host", "127.0.0.1", "--port", str(port),
                "--max-model-len", "256", "--dtype", "bfloat16", *a.arg]
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1",
               "PYTHONUNBUFFERED": "1"}
        r, w = os.pipe()
        start = time.monotonic()
        proc = subprocess.Popen(argv, stdout=w, stderr=w, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True)
        os.close(w)
        chunks: list[tuple[float, bytes]] = []

        def pump() -> None:
            while data := os.read(r, 65536):
                chunks.append((time.monotonic() - start, data))

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        ready_at = None
        while time.monotonic() - start < a.timeout and proc.poll() is None:
            if listed(port, "nika"):
                ready_at = time.monotonic() - start
                break
            time.sleep(0.25)
        if ready_at is not None and a.metrics_out is not None:
            save_metrics(port, a.metrics_out)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            status = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            status = proc.wait()
        reader.join(timeout=30)
        os.close(r)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    version = subprocess.run([a.python, "-c", "import vllm, torch; print(vllm.__version__, "
                              "torch.__version__)"], capture_output=True, text=True).stdout
    shown = " ".join(argv).replace(str(tmp), "$TMP").replace(a.python, "$VLLM_PY")
    head = [
        f"# command: VLLM_CPU_KVCACHE_SPACE=1 {shown}",
        f"# date: {datetime.now(UTC).isoformat(timespec='seconds')}; vllm {version.strip()}; "
        f"{os.cpu_count()} CPUs; stdout+stderr on one pipe, bytes as they arrived",
        f"# alias listed: {f't+{ready_at:.1f}s' if ready_at is not None else 'never'}",
        "# then SIGTERM to the process group",
    ]
    offset = 0
    for t, data in chunks:
        head.append(f"# at +{t:.2f}s byte {offset}")
        offset += len(data)
    head.append(f"# exit status: {status}")
    body = b"".join(d for _, d in chunks).replace(str(tmp).encode(), b"$TMP")
    a.out.write_bytes(("\n".join(head) + "\n").encode() + body)
    print(f"wrote {a.out}: {len(body)} bytes, alias listed at "
          f"{ready_at if ready_at is None else round(ready_at, 1)}s, exit {status}")
    return 0 if ready_at is not None else 1


if __name__ == "__main__":
    sys.exit(main())
