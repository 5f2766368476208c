"""Fake vllm.entrypoints.cli (stand-in)."""
