"""The stand-in vLLM server on its own: it must behave as the process tests assume."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from helpers import STANDIN_PATH, pid_alive, poll_for, proc_state

pytestmark = pytest.mark.process


def get(port: int, path: str, headers: dict[str, str] | None = None,
        timeout: float = 2.0) -> tuple[int, bytes]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def post(port: int, path: str, body: dict[str, object], timeout: float = 2.0,
         headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def connectable(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


def listed(port: int) -> list[str]:
    status, body = get(port, "/v1/models")
    assert status == 200
    return [m["id"] for m in json.loads(body)["data"]]


def test_binds_without_a_loading_phase_when_no_delay_is_set(run_standin,
                                                            tmp_path: Path) -> None:
    """With no delay set, the port is bound straight after start-up, with no 'loading' log
    lines. (How soon, in ms, is measured by bench/component_bench.py.)"""
    run = run_standin()
    bound = poll_for(lambda: (run.state.info() or {}).get("bound_mono"), 5,
                     "the stand-in to bind")
    assert connectable(run.port)
    assert bound >= run.state.info()["started_mono"]  # type: ignore[index]
    out = poll_for(lambda: (o := (tmp_path / "standin0.out").read_text())
                   and "Application startup complete." in o and o, 5, "the startup line")
    assert "Loading weights" not in out and "Resolved architecture" not in out


def test_the_bind_is_recorded_before_the_port_accepts(monkeypatch: pytest.MonkeyPatch) -> None:
    """The stand-in publishes bound_mono/bound_at while its socket is bound but not yet
    listening, so whoever can connect finds the bind recorded (listening first was a race)."""
    monkeypatch.syspath_prepend(STANDIN_PATH)
    import standin_http

    seen: list[bool] = []

    def publish(server: object) -> None:
        seen.append(connectable(server.server_address[1]))  # type: ignore[attr-defined]

    server = standin_http.open_server("127.0.0.1", 0, standin_http.Handler, publish)
    try:
        assert seen == [False], "the port accepted connections before the bind was published"
        assert connectable(server.server_address[1])
    finally:
        server.server_close()


def test_binds_only_after_the_bind_delay(run_standin) -> None:
    """STANDIN_BIND_DELAY_S: connections are refused while 'loading', accepted after."""
    run = run_standin(env={"STANDIN_BIND_DELAY_S": "0.8"})
    poll_for(run.state.info, 5, "api.json")
    assert not connectable(run.port)
    poll_for(lambda: connectable(run.port), 5, "the port to accept connections")
    info = run.state.info()
    assert info is not None and info["bound_mono"] - info["started_mono"] >= 0.8


def test_lists_the_names_only_after_the_list_delay(run_standin) -> None:
    """STANDIN_LIST_DELAY_S: /v1/models is 200 with an empty list, then lists every name."""
    run = run_standin(env={"STANDIN_LIST_DELAY_S": "0.7"}, names=("nika", "qwen"))
    poll_for(lambda: connectable(run.port), 5, "the port")
    assert listed(run.port) == []
    assert poll_for(lambda: listed(run.port), 5, "the names to be listed") == ["nika", "qwen"]
    info = run.state.info()
    assert info is not None
    state = run.state.state()
    assert state["first_listed_mono"] >= info["lists_from_mono"] >= info["bound_mono"] + 0.7


def test_models_answer_in_openai_format(run_standin) -> None:
    """/v1/models has the OpenAI list shape; /health is 200 with an empty body."""
    run = run_standin()
    poll_for(lambda: connectable(run.port), 5, "the port")
    status, body = get(run.port, "/v1/models")
    data = json.loads(body)
    assert status == 200 and data["object"] == "list"
    assert data["data"][0]["id"] == "nika" and data["data"][0]["object"] == "model"
    assert get(run.port, "/health") == (200, b"")


def test_engine_survives_a_sigkill_of_the_api_server(run_standin) -> None:
    """The EngineCore child is in the API server's group, named VLLM::EngineCore, and lives on
    (re-parented) after the API server is SIGKILLed, as vLLM's does."""
    run = run_standin(env={"STANDIN_WORKERS": "1"})
    poll_for(lambda: connectable(run.port), 5, "the port")
    engine = run.state.engine_pid
    assert engine is not None
    st = proc_state(engine)
    assert st is not None and st[1] == run.pid and st[2] == "VLLM::EngineCor"
    workers = [p for r, p in run.state.started() if r == "worker"]
    assert len(workers) == 1 and proc_state(workers[0])[2] == "VLLM::Worker"  # type: ignore[index]
    os.kill(run.pid, signal.SIGKILL)
    run.proc.wait(5)
    assert pid_alive(engine) and pid_alive(workers[0])
    assert proc_state(engine)[1] == run.pid  # type: ignore[index]  # still in the old group


def test_sigterm_ends_the_engine_and_exits_zero(run_standin) -> None:
    """SIGTERM: the API server ends its engine and workers and exits 0."""
    run = run_standin(env={"STANDIN_WORKERS": "2"})
    poll_for(lambda: connectable(run.port), 5, "the port")
    pids = [p for _r, p in run.state.started()]
    assert len(pids) == 4
    os.kill(run.pid, signal.SIGTERM)
    assert run.proc.wait(5) == 0
    poll_for(lambda: not [p for p in pids if pid_alive(p)], 5, "engine and workers to exit")


def test_engine_can_ignore_sigterm(run_standin) -> None:
    """STANDIN_ENGINE_IGNORE_TERM=1: a SIGTERM to the group leaves the engine running."""
    run = run_standin(env={"STANDIN_ENGINE_IGNORE_TERM": "1"})
    poll_for(lambda: connectable(run.port), 5, "the port")
    engine = run.state.engine_pid
    assert engine is not None
    os.killpg(run.pid, signal.SIGTERM)
    poll_for(lambda: run.proc.poll() is not None, 10, "the API server to exit")
    assert pid_alive(engine)


def test_unknown_flags_pass_but_no_such_flag_fails_like_argparse(run_standin,
                                                                 tmp_path: Path) -> None:
    """Unknown flags (with values) are accepted; --no-such-flag exits 2 with argparse's
    message, as real vLLM does."""
    ok = run_standin(args=["--max-model-len", "8192", "--enforce-eager", "--dtype", "bfloat16"])
    poll_for(lambda: connectable(ok.port), 5, "the port")
    assert ok.state.info()["extra_args"] == ["--max-model-len", "8192", "--enforce-eager",  # type: ignore[index]
                                             "--dtype", "bfloat16"]
    bad = run_standin(args=["--enforce-eager", "--no-such-flag"])
    assert bad.proc.wait(5) == 2
    err = (tmp_path / "standin1.err").read_text()
    assert "api_server.py: error: unrecognized arguments: --no-such-flag" in err


def test_serve_entrypoint(run_standin) -> None:
    """`-m vllm.entrypoints.cli.main serve MODEL ...` serves the names too."""
    run = run_standin(mode="serve", names=("nika",))
    poll_for(lambda: connectable(run.port), 5, "the port")
    assert listed(run.port) == ["nika"]
    assert run.state.info()["model"] == "standin-model"  # type: ignore[index]


def test_startup_exit_replays_stderr(run_standin, tmp_path: Path) -> None:
    """STANDIN_STARTUP_EXIT_CODE exits before binding, after writing the replay file's lines
    (without its '# ' header lines) to stderr."""
    replay = tmp_path / "replay.txt"
    replay.write_text("# command: vllm ...\nTraceback (most recent call last):\n"
                      "RuntimeError: boom\n")
    run = run_standin(env={"STANDIN_STARTUP_EXIT_CODE": "3", "STANDIN_STARTUP_STDERR": str(replay)})
    assert run.proc.wait(5) == 3
    err = (tmp_path / "standin0.err").read_text()
    assert "Traceback (most recent call last):\nRuntimeError: boom\n" in err
    assert "# command" not in err
    assert run.state.engine_pid is None


def test_exits_by_itself_after_a_delay(run_standin) -> None:
    """STANDIN_EXIT_AFTER_S + STANDIN_EXIT_CODE=0: an exit 0 nobody asked for, engine ended."""
    run = run_standin(env={"STANDIN_EXIT_AFTER_S": "0.5", "STANDIN_EXIT_CODE": "0"})
    assert run.proc.wait(5) == 0
    engine = run.state.engine_pid
    assert engine is not None
    poll_for(lambda: not pid_alive(engine), 5, "the engine to exit with the server")


def test_control_exit_with_a_code(run_standin) -> None:
    """POST /_standin/engine {"exit": 7} makes the server exit 7 at once."""
    run = run_standin()
    poll_for(lambda: connectable(run.port), 5, "the port")
    run.state.control(exit=7)
    assert run.proc.wait(5) == 7


def test_health_turns_503_after_a_delay_or_on_request(run_standin) -> None:
    """STANDIN_HEALTH_503_AFTER_S, or {"dead": true}: /health answers 503."""
    run = run_standin(env={"STANDIN_HEALTH_503_AFTER_S": "0.5"})
    poll_for(lambda: connectable(run.port), 5, "the port")
    poll_for(lambda: get(run.port, "/health")[0] == 503, 5, "/health 503")
    other = run_standin()
    poll_for(lambda: connectable(other.port), 5, "the port")
    assert get(other.port, "/health")[0] == 200
    other.state.control(dead=True)
    assert get(other.port, "/health")[0] == 503
    assert post(other.port, "/v1/completions", {"model": "nika", "prompt": "x"})[0] == 500


def test_slow_models_answers(run_standin) -> None:
    """STANDIN_MODELS_DELAY_S delays each /v1/models answer but it still comes."""
    run = run_standin(env={"STANDIN_MODELS_DELAY_S": "0.4"})
    poll_for(lambda: connectable(run.port), 5, "the port")
    start = time.monotonic()
    assert listed(run.port) == ["nika"]
    assert time.monotonic() - start >= 0.4


def test_api_key_guards_v1_only(run_standin) -> None:
    """With VLLM_API_KEY and STANDIN_REQUIRE_KEY=1, /v1/* want the Bearer key; /health and
    /metrics do not."""
    run = run_standin(env={"VLLM_API_KEY": "sekrit", "STANDIN_REQUIRE_KEY": "1"})
    poll_for(lambda: connectable(run.port), 5, "the port")
    assert get(run.port, "/v1/models")[0] == 401
    assert get(run.port, "/v1/models", {"Authorization": "Bearer wrong"})[0] == 401
    assert get(run.port, "/v1/models", {"Authorization": "Bearer sekrit"})[0] == 200
    assert get(run.port, "/health")[0] == 200
    assert get(run.port, "/metrics")[0] == 200


def metric(port: int, name: str) -> float:
    _status, body = get(port, "/metrics")
    for line in body.decode().splitlines():
        if line.startswith(name + "{"):
            assert 'model_name="nika"' in line
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def test_metrics_and_completions(run_standin) -> None:
    """Completions answer one token and bump generation_tokens_total; gauges follow the
    control endpoint; progress mode keeps the counter growing."""
    run = run_standin()
    poll_for(lambda: connectable(run.port), 5, "the port")
    assert metric(run.port, "vllm:generation_tokens_total") == 0
    status, body = post(run.port, "/v1/completions", {"model": "nika", "prompt": "hi",
                                                       "max_tokens": 1})
    assert status == 200 and json.loads(body)["usage"]["completion_tokens"] == 1
    status, body = post(run.port, "/v1/chat/completions",
                        {"model": "nika", "messages": [{"role": "user", "content": "hi"}]})
    assert status == 200 and json.loads(body)["choices"][0]["message"]["role"] == "assistant"
    assert metric(run.port, "vllm:generation_tokens_total") == 2
    run.state.control(running=3, waiting=5)
    assert metric(run.port, "vllm:num_requests_running") == 3
    assert metric(run.port, "vllm:num_requests_waiting") == 5
    run.state.control(progress=True)
    poll_for(lambda: metric(run.port, "vllm:generation_tokens_total") > 10, 5,
             "the token counter to grow")


def test_frozen_engine_hangs_completions_but_answers_health(run_standin) -> None:
    """{"frozen": true}: completions hang and the counter stops, /health and /v1/models
    stay 200 - the case only a canary completion catches."""
    run = run_standin()
    poll_for(lambda: connectable(run.port), 5, "the port")
    run.state.control(progress=True, frozen=True)
    before = metric(run.port, "vllm:generation_tokens_total")
    with pytest.raises(TimeoutError):
        post(run.port, "/v1/completions", {"model": "nika", "prompt": "x"}, timeout=0.5)
    assert get(run.port, "/health")[0] == 200
    assert listed(run.port) == ["nika"]
    assert metric(run.port, "vllm:generation_tokens_total") == before
    run.state.control(frozen=False)
    assert post(run.port, "/v1/completions", {"model": "nika", "prompt": "x"})[0] == 200


def test_numbered_log_lines(run_standin, tmp_path: Path) -> None:
    """STANDIN_LOG_LINES=N prints N numbered lines in order, then the final marker."""
    run = run_standin(env={"STANDIN_LOG_LINES": "5000"})
    poll_for(lambda: connectable(run.port), 5, "the port")
    out = (tmp_path / "standin0.out").read_text().splitlines()
    numbered = [line for line in out if "standin line " in line]
    assert [int(line.split("standin line ")[1][:6]) for line in numbered] == list(range(1, 5001))
    assert any(line.endswith("standin log done 5000") for line in out)


def test_records_survivors_of_an_earlier_start(run_standin, tmp_path: Path) -> None:
    """api.json's `preexisting` lists live stand-in processes of the same state dir: the proof
    a supervisor did (or did not) clean up before starting again."""
    state_dir = tmp_path / "shared"
    first = run_standin(state_dir=state_dir)
    poll_for(lambda: connectable(first.port), 5, "the port")
    engine = first.state.engine_pid
    os.kill(first.pid, signal.SIGKILL)
    first.proc.wait(5)
    second = run_standin(state_dir=state_dir)
    info = poll_for(lambda: (i := second.state.info()) and i["pid"] == second.pid and i,
                    5, "the second start's api.json")
    assert info["preexisting"] == [engine]
