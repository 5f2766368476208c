"""A vLLM group across nodes (issue 12): one daemon per node, the group restarts as one.

- group.py: the pure group policy (events in, decisions out; no I/O, `now` injected).
- endpoint.py: the control endpoint between supervisors (a token-authenticated HTTP server
  bound to this node's `cluster.peers` address) and its client, with deadlines.
- token.py: reading the shared token and comparing it in constant time.
- agent.py: one node's side with its I/O (endpoint, poller, the policy state behind a lock,
  local decisions on a queue): what the daemon wires.

Not yet wired into the daemon: docs/ARCHITECTURE.md, "Multi-node (issue 12, design)", lists
what remains.
"""
