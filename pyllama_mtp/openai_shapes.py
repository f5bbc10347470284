"""OpenAI-compatible result dicts (completions, chat completions, and their stream
chunks), built by pure functions so the library and the server share them."""
from __future__ import annotations

import uuid


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int, extra: dict | None = None) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens, **(extra or {})}


def completion_response(id: str, model: str, created: int, text: str, finish_reason: str, prompt_tokens: int,
                        completion_tokens: int, logprobs=None, extra_usage: dict | None = None) -> dict:
    return {
        "id": id, "object": "text_completion", "created": created, "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}],
        "usage": usage(prompt_tokens, completion_tokens, extra_usage),
    }


def completion_chunk(id: str, model: str, created: int, text: str, finish_reason: str | None) -> dict:
    return {
        "id": id, "object": "text_completion", "created": created, "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}],
    }


def chat_response(id: str, model: str, created: int, text: str, finish_reason: str, prompt_tokens: int,
                  completion_tokens: int, logprobs=None, extra_usage: dict | None = None) -> dict:
    return {
        "id": id, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                     "finish_reason": finish_reason}],
        "usage": usage(prompt_tokens, completion_tokens, extra_usage),
    }


def chat_chunk(id: str, model: str, created: int, delta: dict, finish_reason: str | None) -> dict:
    return {
        "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
    }
