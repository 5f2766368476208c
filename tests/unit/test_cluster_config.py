"""The `cluster:` section (issue 12): typed, located errors, exit 78, the argv of each rank, and
the token never on argv or in the printed command."""

from __future__ import annotations

from pathlib import Path

import pytest

from nika_supervisor.cli import main
from nika_supervisor.command import CPU_SERVE_SCRIPT, build_launch, serves_api
from nika_supervisor.config import ClusterConfig, parse_config
from nika_supervisor.errors import ConfigError

TOKEN = "tok-3f9a1107-cluster"


def text(tmp_path: Path, rank: int = 0, extra_vllm: str = "", cluster_extra: str = "",
         tail: str = "") -> str:
    """The file; its line numbers (the errors below name them): vllm: 1, extra_vllm 7..,
    cluster: 7 (+ extra_vllm lines), backend 8, nnodes 9, node_rank 10, master_addr 11,
    master_port 12, peers 13, token_file 14, cluster_extra 15."""
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    lines = ["vllm:", "  model: /m", "  python: /usr/bin/python3", "  served_model_name: nika",
             "  port: 11107",
             f"  env: {{GLOO_SOCKET_IFNAME: cx7, VLLM_HOST_IP: 10.0.0.{rank + 1}}}",
             *[f"  {line}" for line in extra_vllm.splitlines()],
             "cluster:", "  backend: native", "  nnodes: 2", f"  node_rank: {rank}",
             "  master_addr: 10.0.0.1", "  master_port: 29501",
             "  peers: [10.0.0.1:1108, 10.0.0.2:1108]", f"  token_file: {token}",
             *[f"  {line}" for line in cluster_extra.splitlines()],
             *tail.splitlines()]
    return "\n".join(lines) + "\n"


def errors(body: str) -> list[str]:
    with pytest.raises(ConfigError) as e:
        parse_config(body, "f.yaml")
    return [str(i) for i in e.value.issues]


def test_absent_cluster_changes_nothing(tmp_path: Path) -> None:
    c = parse_config("vllm:\n  model: /m\n  python: /usr/bin/python3\n", "f.yaml")
    assert c.cluster is None and serves_api(c)
    assert not any(a in build_launch(c, {}).argv for a in ("--nnodes", "--headless"))


def test_the_section_is_typed_and_frozen(tmp_path: Path) -> None:
    c = parse_config(text(tmp_path, 1), "f.yaml")
    assert c.cluster == ClusterConfig(nnodes=2, node_rank=1, master_addr="10.0.0.1",
                                      master_port=29501,
                                      peers=(("10.0.0.1", 1108), ("10.0.0.2", 1108)),
                                      token_file=str(tmp_path / "token"), backend="native")
    assert c.cluster.control_address == ("10.0.0.2", 1108) and not c.cluster.is_head
    with pytest.raises(AttributeError):
        c.cluster.node_rank = 0  # type: ignore[misc]
    assert TOKEN not in repr(c)


def test_head_argv(tmp_path: Path) -> None:
    c = parse_config(text(tmp_path, 0), "f.yaml")
    argv = build_launch(c, {}).argv
    assert argv == ("/usr/bin/python3", "-m", "vllm.entrypoints.cli.main", "serve", "/m",
                    "--served-model-name", "nika", "--host", "127.0.0.1", "--port", "11107",
                    "--nnodes", "2", "--node-rank", "0", "--master-addr", "10.0.0.1",
                    "--master-port", "29501")
    assert serves_api(c)


def test_worker_argv_is_headless_without_an_api(tmp_path: Path) -> None:
    c = parse_config(text(tmp_path, 1), "f.yaml")
    spec = build_launch(c, {})
    assert spec.argv[-9:] == ("--nnodes", "2", "--node-rank", "1", "--master-addr", "10.0.0.1",
                              "--master-port", "29501", "--headless")
    assert "--host" not in spec.argv and "--port" not in spec.argv
    assert not serves_api(c)  # no OpenAI server on a worker rank: nothing to probe
    # The network is the operator's, through vllm.env; the token is the supervisors' only.
    assert (spec.env["GLOO_SOCKET_IFNAME"], spec.env["VLLM_HOST_IP"]) == ("cx7", "10.0.0.2")
    assert not any(TOKEN in a for a in spec.argv)
    assert not any(TOKEN in v for v in spec.env.values())


def test_serve_cpu_runs_the_bootstrap_by_path(tmp_path: Path) -> None:
    c = parse_config(text(tmp_path, 1, "entrypoint: serve_cpu"), "f.yaml")
    argv = build_launch(c, {}).argv
    assert argv[:4] == ("/usr/bin/python3", CPU_SERVE_SCRIPT, "serve", "/m")
    assert Path(CPU_SERVE_SCRIPT).is_file()


def test_errors_are_located(tmp_path: Path) -> None:
    body = text(tmp_path, 2).replace("backend: native", "backend: ray").replace(
        "10.0.0.2:1108]", "10.0.0.2:1108, 10.0.0.3:1108]").replace(
        "master_addr: 10.0.0.1", "master_addr: head.local")
    got = errors(body)
    assert got[0].startswith("f.yaml:8:12: cluster.backend: 'ray' is not supported yet")
    assert got[1:] == [
        "f.yaml:10:14: cluster.node_rank: must be below cluster.nnodes (2)",
        "f.yaml:11:16: cluster.master_addr: 'head.local' is not an IP address",
        "f.yaml:13:10: cluster.peers: lists 3 addresses; it needs one per rank (2), "
        "in rank order",
    ]
    assert errors(text(tmp_path, 2)) == [
        "f.yaml:10:14: cluster.node_rank: must be below cluster.nnodes (2)"]
    assert errors(text(tmp_path, 0).replace("nnodes: 2", "nnodes: 1")) == [
        "f.yaml:9:11: cluster.nnodes: must be >= 2, got 1"]
    assert errors(text(tmp_path).replace("10.0.0.2:1108]", "10.0.0.1:1108]")) == [
        "f.yaml:13:10: cluster.peers: '10.0.0.1:1108' is listed twice"]
    assert errors(text(tmp_path).replace("10.0.0.2:1108]", "0.0.0.0:1108]"))[0].startswith(
        "f.yaml:13:10: cluster.peers: '0.0.0.0:1108': give this node's address")
    assert errors(text(tmp_path).replace("  master_port: 29501\n", "")) == [
        "f.yaml:8:3: cluster.master_port: required key is missing"]
    assert errors(text(tmp_path, cluster_extra="nodes: 3")) == [
        "f.yaml:15:3: cluster.nodes: unknown key (did you mean 'nnodes'?)"]


def test_token_file_must_exist_and_hold_something(tmp_path: Path) -> None:
    body = text(tmp_path)
    (tmp_path / "token").write_text("  \n")
    assert errors(body) == [f"f.yaml:14:15: cluster.token_file: {tmp_path}/token is empty"]
    (tmp_path / "token").unlink()
    assert errors(body) == [
        f"f.yaml:14:15: cluster.token_file: {tmp_path}/token does not exist"]
    assert parse_config(body, "f.yaml", check_paths=False).cluster is not None


def test_conflicts_with_the_rest_of_the_file(tmp_path: Path) -> None:
    got = errors(text(tmp_path, 1, "entrypoint: api_server\nargs: {headless: true, nnodes: 2}",
                      tail="gate:\n  listen: 127.0.0.1:1107\n"))
    assert got == [
        "f.yaml:8:20: vllm.args.headless: set by the cluster section, per rank",
        "f.yaml:8:34: vllm.args.nnodes: set by the cluster section, per rank",
        "f.yaml:10:12: cluster: a cluster needs vllm.entrypoint: serve (or serve_cpu on the CPU "
        "test tier); the api_server entrypoint has no --headless",
        "f.yaml:12:14: cluster.node_rank: a worker rank (node_rank > 0) serves no API; the gate "
        "belongs on the head",
    ]


def test_check_exits_78_and_print_command_hides_the_token(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(text(tmp_path, 5))
    assert main(["check", "--config", str(bad)]) == 78
    assert f"{bad}:10:14: cluster.node_rank" in capsys.readouterr().err
    good = tmp_path / "good.yaml"
    good.write_text(text(tmp_path, 1))
    assert main(["print-command", "--config", str(good)]) == 0
    out = capsys.readouterr().out
    assert "--headless" in out and TOKEN not in out
    assert main(["check", "--config", str(good)]) == 0
    assert capsys.readouterr().out == (
        f"{good}: ok (model '/m', headless rank 1 of 2, head 10.0.0.1:29501; "
        "not yet supervised as a group)\n")
