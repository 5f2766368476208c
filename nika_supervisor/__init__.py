"""nika-supervisor: keeps one vLLM model loaded and answering under systemd."""

__version__ = "0.1.0"
