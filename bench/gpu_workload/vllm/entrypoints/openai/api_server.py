"""`python -m vllm.entrypoints.openai.api_server --model M ...` -> the GPU workload's API server
(bench/gpu_workload/gpu_workload.py; PYTHONPATH must hold bench/gpu_workload)."""

import sys

from gpu_workload import api_main

if __name__ == "__main__":
    raise SystemExit(api_main(sys.argv[1:]))
