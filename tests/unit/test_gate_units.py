"""The gate's pure parts: the control protocol, Retry-After, the Ollama mapping."""

from __future__ import annotations

import json

import pytest

from nika_supervisor.gate import ollama_map as om
from nika_supervisor.gate.hold import retry_after
from nika_supervisor.gate.protocol import (
    GateSettings,
    LineBuffer,
    ProtocolError,
    UpstreamView,
    decode,
    settings_from,
    view_from,
)


def view(**kw: object) -> UpstreamView:
    base: dict[str, object] = {"phase": "loading", "ready": False, "upstream": "127.0.0.1:1"}
    return UpstreamView(**{**base, **kw})  # type: ignore[arg-type]


def test_view_and_settings_round_trip() -> None:
    """What the daemon encodes is what the gate decodes."""
    v = view(cause="x", last_load_s=3.5, phase_since=12.0, given_up=True)
    assert view_from(decode(v.to_line())) == v
    s = GateSettings(hold_timeout=1.0, max_held=2, drain_timeout=3.0, ollama=True,
                     aliases=("nika", "n2"), model="m", max_model_len=8192)
    assert settings_from(decode(s.to_line())) == s


@pytest.mark.parametrize(("line", "message"), [
    (b"{oops", "not JSON"),
    (b"[1]", "not a JSON object"),
    (b'{"type": "launch"}', "unknown message type 'launch'"),
    (b'{"ready": true}', "unknown message type None"),
])
def test_malformed_lines_are_protocol_errors(line: bytes, message: str) -> None:
    """Every malformed line is a ProtocolError with a loggable message, never a crash."""
    with pytest.raises(ProtocolError, match=message):
        decode(line)


def test_wrong_field_types_are_refused() -> None:
    """A view whose fields have the wrong types (or miss one) is refused, not half-applied."""
    with pytest.raises(ProtocolError, match=r"view\.ready: unexpected 'yes'"):
        view_from(decode(b'{"type":"view","phase":"ready","ready":"yes","upstream":"a:1"}'))
    with pytest.raises(ProtocolError, match="upstream"):
        view_from(decode(b'{"type":"view","phase":"ready","ready":true}'))


def test_line_buffer_splits_and_drops_overlong_lines() -> None:
    """Lines split across reads are joined; one over the limit is dropped and counted."""
    b = LineBuffer(limit=10)
    assert b.feed(b'ab\ncd') == ([b"ab"], 0)
    assert b.feed(b"e\n" + b"x" * 25) == ([b"cde"], 1)
    assert b.feed(b"yy\nok\n") == ([b"ok"], 0)


def test_retry_after() -> None:
    """Retry-After: what remains of a load as long as the last one; a whole load when none is
    under way; hold_timeout when no load was measured; never below 1."""
    assert retry_after(view(last_load_s=40.0, phase_since=100.0), 110.0, 30.0) == 30
    assert retry_after(view(last_load_s=40.0, phase_since=100.0), 150.0, 30.0) == 1
    assert retry_after(view(phase="backoff", last_load_s=40.0, phase_since=100.0), 150.0,
                       30.0) == 40
    assert retry_after(view(), 0.0, 30.0) == 30
    assert retry_after(None, 0.0, 12.5) == 13


def test_names_resolve_through_the_aliases() -> None:
    """nika and nika:latest are the alias nika; other tags and names are not served."""
    aliases = ("nika", "qwen3")
    assert [om.resolve(n, aliases) for n in ("nika", "nika:latest", "qwen3:latest",
                                              "nika:7b", "llama3", None)] == [
        "nika", "nika", "qwen3", None, None, None]


def test_options_map_to_openai_fields() -> None:
    """Ollama's options and format become vLLM's request fields; num_predict -1 means no
    limit; num_ctx over max-model-len is refused."""
    body = {"options": {"num_predict": 5, "temperature": 0.1, "top_p": 0.9, "top_k": 4,
                        "stop": ["\n"], "seed": 7, "repeat_penalty": 1.1,
                        "presence_penalty": 0.2, "num_ctx": 2048},
            "format": "json"}
    assert om.sampling(body, 4096) == {
        "max_tokens": 5, "temperature": 0.1, "top_p": 0.9, "top_k": 4, "stop": ["\n"],
        "seed": 7, "repetition_penalty": 1.1, "presence_penalty": 0.2,
        "response_format": {"type": "json_object"}}
    assert om.sampling({"options": {"num_predict": -1}}, None) == {}
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    assert om.sampling({"format": schema}, None)["response_format"] == {
        "type": "json_schema", "json_schema": {"name": "format", "schema": schema}}
    with pytest.raises(om.BadRequest, match="max-model-len 4096"):
        om.sampling({"options": {"num_ctx": 8192}}, 4096)


def test_stream_chunks_become_ndjson_lines() -> None:
    """OpenAI chunks -> Ollama chat lines; the final line carries the counts and done."""
    tally = om.Tally()
    chunk = {"choices": [{"index": 0, "delta": {"content": "Hi"}, "finish_reason": None}]}
    assert om.chunk_piece(chunk, tally) == "Hi"
    om.chunk_piece({"choices": [{"delta": {}, "finish_reason": "stop"}]}, tally)
    om.chunk_piece({"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 1}},
                   tally)
    line = json.loads(om.stream_line("nika", True, "", tally.final()))
    assert line["message"] == {"role": "assistant", "content": ""}
    assert (line["done"], line["done_reason"], line["prompt_eval_count"],
            line["eval_count"]) == (True, "stop", 4, 1)
    assert line["created_at"].endswith("Z")


def test_status_text() -> None:
    """The gate's part of STATUS: the counters in fixed words."""
    from nika_supervisor.gate import GateStats, status_text

    assert status_text(GateStats(in_flight=3, held=1, rejected=7, draining=True)) == (
        "gate: 3 in flight, 1 held, 7 rejected (503), draining")


def test_a_view_cannot_be_ready_and_given_up() -> None:
    """Contradictory views are refused where they are made."""
    with pytest.raises(ProtocolError):
        view(ready=True, given_up=True)


def test_upstream_of() -> None:
    """The gate reaches a vLLM bound to a wildcard through loopback."""
    from nika_supervisor.config import parse_config
    from nika_supervisor.gate import upstream_of

    def up(host: str) -> str:
        return upstream_of(parse_config(f"vllm: {{model: m, host: '{host}', port: 11107}}\n",
                                        "f.yaml"))

    assert [up(h) for h in ("127.0.0.1", "0.0.0.0", "::", "10.0.0.2", "::1")] == [
        "127.0.0.1:11107", "127.0.0.1:11107", "[::1]:11107", "10.0.0.2:11107", "[::1]:11107"]


def test_the_published_upstream_is_made_reachable() -> None:
    """A view's upstream straight from vllm.host:vllm.port still gives a connectable URL."""
    from nika_supervisor.gate.proxy import reachable

    assert [reachable(u) for u in ("127.0.0.1:11107", "0.0.0.0:11107", ":::11107",
                                   "::1:11107", "[::1]:11107", "10.1.2.3:80")] == [
        "127.0.0.1:11107", "127.0.0.1:11107", "[::1]:11107", "[::1]:11107", "[::1]:11107",
        "10.1.2.3:80"]
