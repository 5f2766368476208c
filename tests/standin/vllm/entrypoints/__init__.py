"""Fake vllm.entrypoints (stand-in)."""
