"""One "node" of the two-namespace cluster test: `serve` runs a control endpoint bound to this
node's address (inside its network namespace) and prints each restart request as a JSON line;
`status` / `restart` are one client call to a peer, printing the result as JSON; `chat` is one
chat completion through the official openai client (tests/e2e/test_cluster_supervised.py).

Run with `ip netns exec NS python cluster_node.py ...` by tests/e2e/test_cluster_netns.py.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
from dataclasses import asdict

from nika_supervisor.cluster.endpoint import ControlClient, ControlServer, RestartRequest
from nika_supervisor.cluster.group import group_status, initial
from nika_supervisor.cluster.token import Token
from nika_supervisor.log import configure


def addr(s: str) -> tuple[str, int]:
    host, _, port = s.rpartition(":")
    return host, int(port)


def serve(bind: str, token_file: str, rank: int, nnodes: int) -> None:
    configure("json", "info", sys.stdout)
    state = initial(nnodes, rank, 0.0)

    def on_restart(req: RestartRequest) -> bool:
        print(json.dumps({"restart": asdict(req)}), flush=True)
        return True

    server = ControlServer(addr(bind), Token.from_file(token_file),
                           status=lambda: group_status(state), on_restart=on_restart).start()
    print(json.dumps({"listening": list(server.address)}), flush=True)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    done.wait()
    server.stop()


def call(what: str, peer: str, token_file: str, deadline: float) -> None:
    client = ControlClient(Token.from_file(token_file), connect_timeout=deadline,
                           deadline=deadline)
    result = (client.status(addr(peer)) if what == "status"
              else client.ask_restart(addr(peer), 1, 1, "rank 1: exited (SIGKILL)"))
    print(json.dumps({"type": type(result).__name__, **asdict(result)}), flush=True)


def chat(base_url: str, alias: str, timeout: float) -> None:
    """One chat completion with the official openai client, printed as JSON."""
    import openai

    client = openai.OpenAI(base_url=base_url, api_key="unused", timeout=timeout, max_retries=0)
    try:
        r = client.chat.completions.create(model=alias, max_tokens=4,
                                           messages=[{"role": "user", "content": "hi"}])
        print(json.dumps({"ok": True, "model": r.model,
                          "content": r.choices[0].message.content}), flush=True)
    except openai.OpenAIError as e:
        print(json.dumps({"ok": False, "error": f"{type(e).__name__}: {e}"}), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "chat":
        chat(sys.argv[2], sys.argv[3], float(sys.argv[4]))
    elif sys.argv[1] == "serve":
        serve(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
    else:
        call(sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]))
