"""`python -m vllm.entrypoints.openai.api_server --model M ...` -> the stand-in server."""

from standin_server import main

if __name__ == "__main__":
    main(mode="api_server")
