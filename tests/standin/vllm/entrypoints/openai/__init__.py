"""Fake vllm.entrypoints.openai (stand-in)."""
