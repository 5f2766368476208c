"""Ollama's API in terms of vLLM's OpenAI API: the pure half (requests in, payloads out,
chunks in, NDJSON objects out). The handlers are in ollama.py.

Sources: ollama docs/api.md and api/types.go; ollama-python _types.py (what the official
client insists on: `message` on every chat chunk, `models` in both lists, a `model_info` key
in /api/show).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

OLLAMA_API_VERSION = "0.12.0"  # the Ollama API level spoken here (for clients that check)
FAR_FUTURE = "2318-01-01T00:00:00Z"  # /api/ps expires_at: the model never unloads

# Ollama option -> OpenAI/vLLM request field (vLLM's sampling extensions take top_k,
# repetition_penalty and seed directly in the JSON body).
OPTION_MAP = {"num_predict": "max_tokens", "temperature": "temperature", "top_p": "top_p",
              "top_k": "top_k", "stop": "stop", "seed": "seed",
              "repeat_penalty": "repetition_penalty", "presence_penalty": "presence_penalty",
              "frequency_penalty": "frequency_penalty", "min_p": "min_p"}


class BadRequest(ValueError):
    """The client's request cannot be served as asked: a 400 with Ollama's {"error"}."""


def now_rfc3339() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def resolve(name: object, aliases: tuple[str, ...]) -> str | None:
    """"nika", "nika:latest" -> the served alias; None for a model not served here."""
    if not isinstance(name, str) or not name:
        return None
    if name in aliases:
        return name
    base = name.removesuffix(":latest")
    return base if base in aliases else None


def tagged(alias: str) -> str:
    return alias if ":" in alias else f"{alias}:latest"


def sampling(body: dict[str, Any], max_model_len: int | None) -> dict[str, Any]:
    """`options` and `format` -> OpenAI request fields."""
    out: dict[str, Any] = {}
    options = body.get("options") or {}
    if not isinstance(options, dict):
        raise BadRequest("options must be an object")
    for key, target in OPTION_MAP.items():
        if options.get(key) is not None:
            out[target] = options[key]
    if out.get("max_tokens") is not None and out["max_tokens"] < 0:
        del out["max_tokens"]  # Ollama's -1: until the context is full
    num_ctx = options.get("num_ctx")
    if num_ctx is not None and max_model_len is not None and num_ctx > max_model_len:
        raise BadRequest(f"num_ctx {num_ctx} is above this server's context length "
                         f"(max-model-len {max_model_len})")
    fmt = body.get("format")
    if fmt == "json":
        out["response_format"] = {"type": "json_object"}
    elif isinstance(fmt, dict):
        out["response_format"] = {"type": "json_schema",
                                  "json_schema": {"name": "format", "schema": fmt}}
    elif fmt not in (None, ""):
        raise BadRequest("format must be \"json\" or a JSON schema object")
    return out


def _content(text: object, images: object) -> Any:
    if not images:
        return text if isinstance(text, str) else ""
    parts: list[dict[str, Any]] = [{"type": "text", "text": text or ""}]
    for img in images if isinstance(images, list) else []:
        parts.append({"type": "image_url", "image_url": {"url": f"data:image/png;base64,{img}"}})
    return parts


def chat_messages(messages: object) -> list[dict[str, Any]]:
    if not isinstance(messages, list):
        raise BadRequest("messages must be a list")
    out = []
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise BadRequest("every message needs a role")
        msg: dict[str, Any] = {"role": m["role"], "content": _content(m.get("content"),
                                                                     m.get("images"))}
        if m.get("tool_calls"):
            msg["tool_calls"] = [
                {"id": f"call_{i}", "type": "function",
                 "function": {"name": c["function"]["name"],
                              "arguments": json.dumps(c["function"].get("arguments") or {})}}
                for i, c in enumerate(m["tool_calls"])]
        out.append(msg)
    return out


def chat_payload(body: dict[str, Any], alias: str, max_model_len: int | None,
                 stream: bool) -> dict[str, Any]:
    payload: dict[str, Any] = {"model": alias, "messages": chat_messages(body.get("messages")),
                               "stream": stream, **sampling(body, max_model_len)}
    if body.get("tools"):
        payload["tools"] = body["tools"]
    if stream:
        payload["stream_options"] = {"include_usage": True}
    return payload


def generate_payload(body: dict[str, Any], alias: str, max_model_len: int | None,
                     stream: bool) -> tuple[str, dict[str, Any]]:
    """(vLLM path, payload). raw: the prompt as is (/v1/completions); otherwise through the
    model's chat template, with `system` first, as Ollama applies its template."""
    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        raise BadRequest("prompt must be a string")
    extra = sampling(body, max_model_len)
    opts = {"stream_options": {"include_usage": True}} if stream else {}
    if body.get("raw"):
        return "/v1/completions", {"model": alias, "prompt": prompt, "stream": stream,
                                   **extra, **opts}
    messages: list[dict[str, Any]] = []
    if isinstance(body.get("system"), str) and body["system"]:
        messages.append({"role": "system", "content": body["system"]})
    messages.append({"role": "user", "content": _content(prompt, body.get("images"))})
    return "/v1/chat/completions", {"model": alias, "messages": messages, "stream": stream,
                                    **extra, **opts}


@dataclass
class Tally:
    """Counts and times for the final chunk (Ollama's durations are nanoseconds)."""

    start_ns: int = field(default_factory=time.monotonic_ns)
    first_ns: int | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    done_reason: str = "stop"
    tool_calls: dict[int, dict[str, Any]] = field(default_factory=dict)

    def token(self) -> None:
        if self.first_ns is None:
            self.first_ns = time.monotonic_ns()

    def usage(self, usage: object) -> None:
        if isinstance(usage, dict):
            self.prompt_tokens = int(usage.get("prompt_tokens") or 0)
            self.completion_tokens = int(usage.get("completion_tokens") or 0)

    def final(self) -> dict[str, Any]:
        end = time.monotonic_ns()
        first = self.first_ns or end
        return {"done": True, "done_reason": self.done_reason,
                "total_duration": end - self.start_ns, "load_duration": 0,
                "prompt_eval_count": self.prompt_tokens,
                "prompt_eval_duration": first - self.start_ns,
                "eval_count": self.completion_tokens, "eval_duration": end - first}


def ollama_tool_calls(calls: object) -> list[dict[str, Any]] | None:
    if not isinstance(calls, list) or not calls:
        return None
    out = []
    for c in calls:
        fn = (c or {}).get("function") or {}
        args = fn.get("arguments")
        try:
            parsed = json.loads(args) if isinstance(args, str) else (args or {})
        except ValueError:
            parsed = {"_raw": args}
        out.append({"function": {"name": fn.get("name", ""), "arguments": parsed}})
    return out


def chunk_piece(chunk: dict[str, Any], tally: Tally) -> str | None:
    """One OpenAI stream chunk: update the tally, return its text (None when it has none)."""
    tally.usage(chunk.get("usage"))
    choices = chunk.get("choices") or []
    if not choices:
        return None
    c = choices[0]
    if c.get("finish_reason"):
        tally.done_reason = c["finish_reason"]
    if "delta" in c:  # a chat completion chunk (/api/chat, and /api/generate unless raw)
        delta = c.get("delta") or {}
        for call in delta.get("tool_calls") or []:
            slot = tally.tool_calls.setdefault(int(call.get("index", 0)),
                                               {"function": {"name": "", "arguments": ""}})
            fn = call.get("function") or {}
            slot["function"]["name"] += fn.get("name") or ""
            slot["function"]["arguments"] += fn.get("arguments") or ""
        text = delta.get("content")
    else:
        text = c.get("text")
    if text:
        tally.token()
        return str(text)
    return None


def stream_line(model: str, chat: bool, text: str, done: dict[str, Any] | None = None,
                tool_calls: list[dict[str, Any]] | None = None) -> bytes:
    obj: dict[str, Any] = {"model": model, "created_at": now_rfc3339()}
    if chat:
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if tool_calls:
            message["tool_calls"] = tool_calls
        obj["message"] = message
    else:
        obj["response"] = text
    obj.update(done or {"done": False})
    return json.dumps(obj).encode() + b"\n"


def whole_answer(model: str, chat: bool, answer: dict[str, Any], tally: Tally) -> dict[str, Any]:
    """A non-streaming OpenAI answer -> Ollama's single object."""
    tally.usage(answer.get("usage"))
    choices = answer.get("choices") or [{}]
    c = choices[0]
    tally.done_reason = c.get("finish_reason") or "stop"
    obj: dict[str, Any] = {"model": model, "created_at": now_rfc3339()}
    if chat:
        msg = c.get("message") or {}
        message: dict[str, Any] = {"role": "assistant", "content": msg.get("content") or ""}
        calls = ollama_tool_calls(msg.get("tool_calls"))
        if calls:
            message["tool_calls"] = calls
        obj["message"] = message
    else:
        obj["response"] = c.get("text") if "text" in c else (c.get("message") or {}).get(
            "content") or ""
    tally.token()
    obj.update(tally.final())
    return obj


def upstream_error_text(status: int, raw: bytes) -> str:
    """vLLM's error body ({"error": {"message"}} or {"message"}) -> one string."""
    try:
        data = json.loads(raw)
    except ValueError:
        return raw.decode("utf-8", "replace")[:500] or f"HTTP {status}"
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if isinstance(err, str):
            return err
        if data.get("message"):
            return str(data["message"])
        if data.get("detail"):
            return str(data["detail"])
    return raw.decode("utf-8", "replace")[:500]


def model_entry(alias: str, model: str, started: str, max_model_len: int | None,
                loaded: bool) -> dict[str, Any]:
    name = tagged(alias)
    entry: dict[str, Any] = {
        "name": name, "model": name, "modified_at": started, "size": 0,
        "digest": hashlib.sha256(f"{alias}\0{model}".encode()).hexdigest(),
        "details": {"parent_model": "", "format": "safetensors", "family": "",
                    "families": None, "parameter_size": "", "quantization_level": ""},
    }
    if loaded:
        entry.update({"expires_at": FAR_FUTURE, "size_vram": 0,
                      "context_length": max_model_len or 0})
    return entry


def show(alias: str, model: str, started: str, max_model_len: int | None) -> dict[str, Any]:
    return {"modelfile": f"# served by vLLM through nika-supervisor\nFROM {model}\n",
            "parameters": "", "template": "", "license": "", "modified_at": started,
            "details": model_entry(alias, model, started, max_model_len, False)["details"],
            "model_info": {"general.basename": model,
                           "general.context_length": max_model_len},
            "capabilities": ["completion"]}
