"""A fake `vllm` package: routes vLLM's entry points to the stand-in server (tests only).

Selected with `PYTHONPATH=<repo>/tests/standin`; see tests/standin/standin_server.py.
"""

__version__ = "0.32.0+standin"
