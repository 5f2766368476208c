"""Fixtures for the GPU tests (helpers live in gpuhelp.py)."""

from gpuhelp import holders, rig_factory

__all__ = ["holders", "rig_factory"]
