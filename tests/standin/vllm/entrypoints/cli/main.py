"""`python -m vllm.entrypoints.cli.main serve M ...` -> the stand-in server."""

from standin_server import main

if __name__ == "__main__":
    main(mode="serve")
