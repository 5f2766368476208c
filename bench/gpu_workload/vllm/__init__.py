"""Routes the daemon's vLLM argv to gpu_workload.py (see its docstring)."""
