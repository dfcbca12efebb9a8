"""Checks on an OpenAI request body before it reaches transformers' handlers.

transformers' serving handlers assume a well-formed body: a missing ``prompt`` becomes an empty
generation, ``max_tokens: 0`` or a string fails deep inside ``generate`` (a 500), and a request
longer than the context overruns the position table. Here each such body gets a 400 or 404 whose
message names the field, the expected and the received value, in OpenAI's error shape.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# Fields whose values sparsekern serve checks; anything else goes to transformers' own schema check.
_NUMBERS = {"temperature": (0.0, 2.0), "top_p": (0.0, 1.0), "frequency_penalty": (-2.0, 2.0)}
_REFUSED = {
    "generation_config": "use max_tokens, temperature and top_p",  # would bypass every check here
    "tools": "tool calls are not served",
}


class RequestError(Exception):
    """A client error: HTTP ``status`` and an OpenAI-style error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = "not_found_error" if self.status == 404 else "invalid_request_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Served:
    """What a request is checked against: the names the model answers to and its context length.
    ``pin``: the name transformers' handlers know the model by (the folder path)."""

    name: str
    aliases: frozenset[str]
    pin: str
    context: int
    tokenizer: object

    def prompt_tokens(self, chat: bool, body: dict) -> int:
        if chat:
            ids = self.tokenizer.apply_chat_template(body["messages"], add_generation_prompt=True, tokenize=True)
            ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        else:
            ids = self.tokenizer(body["prompt"])["input_ids"]
        return len(ids)


def check(body, served: Served, chat: bool) -> dict:
    """The body to hand to transformers (``model`` pinned, ``max_tokens`` set), or RequestError."""
    if not isinstance(body, dict):
        raise RequestError(400, f"body: expected a JSON object, got {type(body).__name__}")
    model = body.get("model")
    if model is None or model not in served.aliases:
        raise RequestError(
            404, f"model: this server serves {served.name!r}, got {model!r}", param="model", code="model_not_found"
        )
    for key, why in _REFUSED.items():
        if key in body:
            raise RequestError(400, f"{key}: not accepted by sparsekern serve ({why})", param=key)
    if chat:
        _check_messages(body.get("messages"))
    else:
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise RequestError(400, f"prompt: expected a non-empty string, got {_short(prompt)}", param="prompt")
    if "stream" in body and not isinstance(body["stream"], bool):
        raise RequestError(400, f"stream: expected true or false, got {_short(body['stream'])}", param="stream")
    if body.get("n") not in (None, 1):
        raise RequestError(400, f"n: only 1 choice per request is served, got {_short(body['n'])}", param="n")
    for key, (lo, hi) in _NUMBERS.items():
        v = body.get(key)
        if v is not None and (not _is_number(v) or not lo <= v <= hi):
            raise RequestError(400, f"{key}: expected a number in [{lo}, {hi}], got {_short(v)}", param=key)
    if body.get("seed") is not None and not _is_int(body["seed"]):
        raise RequestError(400, f"seed: expected an integer, got {_short(body['seed'])}", param="seed")

    try:
        used = served.prompt_tokens(chat, body)
    except Exception as exc:  # noqa: BLE001  (a template or tokenizer refusing the input)
        field = "messages" if chat else "prompt"
        raise RequestError(400, f"{field}: cannot be tokenized ({type(exc).__name__}: {exc})", param=field) from None
    if used == 0:
        raise RequestError(400, "prompt: tokenizes to no tokens", param="prompt")
    room = served.context - used
    if room < 1:
        raise RequestError(
            400, f"prompt: {used} tokens leave no room in the model's context of {served.context}", param="prompt"
        )
    key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    limit = body.get(key)
    if limit is None:
        limit = room  # OpenAI's default: until the context is full (or the model stops)
    elif not _is_int(limit) or limit < 1:
        raise RequestError(400, f"{key}: expected an integer >= 1, got {_short(limit)}", param=key)
    elif limit > room:
        raise RequestError(
            400,
            f"{key}: {limit} new tokens + {used} prompt tokens exceed the model's context of {served.context} "
            f"(at most {room} here)",
            param=key,
        )
    out = dict(body)
    out.pop("max_completion_tokens", None)
    out["max_tokens"] = limit
    out["model"] = served.pin
    return out


def _check_messages(messages) -> None:
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, f"messages: expected a non-empty list, got {_short(messages)}", param="messages")
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise RequestError(400, f"messages[{i}]: expected an object, got {_short(msg)}", param="messages")
        if not isinstance(msg.get("role"), str):
            raise RequestError(400, f"messages[{i}].role: expected a string, got {_short(msg.get('role'))}", "messages")
        content = msg.get("content")
        if not isinstance(content, (str, list)):
            raise RequestError(
                400, f"messages[{i}].content: expected a string or a list of parts, got {_short(content)}", "messages"
            )


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _short(v) -> str:
    text = repr(v)
    return text if len(text) <= 80 else text[:77] + "..."
