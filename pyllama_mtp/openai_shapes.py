"""OpenAI-compatible result dicts (completions, chat completions, and their stream
chunks), in the shapes llama-cpp-python returns, so code written against either
(or against the ``openai`` client's types) works unchanged.

Pure functions, so the library and any server built on it share one definition.
"""
from __future__ import annotations

import uuid

_FINISH_REASONS = frozenset({"stop", "length", "tool_calls", "content_filter", "function_call"})
_USAGE_KEYS = frozenset({"prompt_tokens", "completion_tokens", "total_tokens"})


def new_id(prefix: str) -> str:
    """A unique id such as ``cmpl-...`` or ``chatcmpl-...``; clients use the prefix
    to tell the kinds apart and the id to group stream chunks."""
    return f"{prefix}-{uuid.uuid4().hex}"


def _check_finish_reason(finish_reason: str | None, *, final: bool) -> None:
    """Catch a finish reason the OpenAI schema has no value for before a client chokes on it."""
    if finish_reason is None and not final:
        return
    if finish_reason not in _FINISH_REASONS:
        allowed = ", ".join(sorted(_FINISH_REASONS)) + ("" if final else ", or None")
        raise ValueError(f"finish_reason must be one of {allowed}; got {finish_reason!r}")


def usage(prompt_tokens: int, completion_tokens: int, extra: dict | None = None) -> dict:
    """The ``usage`` object; ``total_tokens`` is derived so it cannot disagree with its
    parts, and ``extra`` (e.g. drafted/accepted token counts) may add keys but not
    replace the standard ones."""
    clashing = _USAGE_KEYS & set(extra or {})
    if clashing:
        raise ValueError(f"extra usage fields may not replace {sorted(clashing)}")
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens, **(extra or {})}


def _envelope(id: str, object_type: str, model: str, created: int, choice: dict) -> dict:
    return {"id": id, "object": object_type, "created": created, "model": model, "choices": [choice]}


def completion_response(id: str, model: str, created: int, text: str, finish_reason: str, prompt_tokens: int,
                        completion_tokens: int, logprobs=None, extra_usage: dict | None = None) -> dict:
    """A whole ``/v1/completions`` result (object ``text_completion``)."""
    _check_finish_reason(finish_reason, final=True)
    choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
    return {**_envelope(id, "text_completion", model, created, choice),
            "usage": usage(prompt_tokens, completion_tokens, extra_usage)}


def completions_response(id: str, model: str, created: int, choices: list[tuple[str, str, object]],
                         prompt_tokens: int, completion_tokens: int, extra_usage: dict | None = None) -> dict:
    """A ``/v1/completions`` result for a list of prompts: one choice per (text,
    finish_reason, logprobs), indexed in order; usage sums every prompt's."""
    out = []
    for i, (text, finish_reason, logprobs) in enumerate(choices):
        _check_finish_reason(finish_reason, final=True)
        out.append({"index": i, "text": text, "logprobs": logprobs, "finish_reason": finish_reason})
    return {"id": id, "object": "text_completion", "created": created, "model": model, "choices": out,
            "usage": usage(prompt_tokens, completion_tokens, extra_usage)}


def completion_chunk(id: str, model: str, created: int, text: str, finish_reason: str | None,
                     logprobs: dict | None = None) -> dict:
    """One streamed ``/v1/completions`` piece: the same object type as the whole result,
    with ``finish_reason`` None until the last chunk (and the logprobs of its tokens)."""
    _check_finish_reason(finish_reason, final=False)
    choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
    return _envelope(id, "text_completion", model, created, choice)


def chat_response(id: str, model: str, created: int, text: str, finish_reason: str, prompt_tokens: int,
                  completion_tokens: int, logprobs=None, extra_usage: dict | None = None) -> dict:
    """A whole ``/v1/chat/completions`` result (object ``chat.completion``)."""
    _check_finish_reason(finish_reason, final=True)
    choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
              "finish_reason": finish_reason}
    return {**_envelope(id, "chat.completion", model, created, choice),
            "usage": usage(prompt_tokens, completion_tokens, extra_usage)}


def chat_chunk(id: str, model: str, created: int, delta: dict, finish_reason: str | None,
               logprobs: dict | None = None) -> dict:
    """One streamed chat piece (object ``chat.completion.chunk``). By convention the
    first delta is ``{"role": "assistant", "content": ""}``, then ``{"content": ...}``
    pieces, and the last is ``{}`` with the finish reason."""
    _check_finish_reason(finish_reason, final=False)
    choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
    return _envelope(id, "chat.completion.chunk", model, created, choice)


def completion_logprobs(pieces: list[bytes], logprobs, top_logprobs, offset: int = 0) -> dict:
    """The legacy ``/v1/completions`` logprobs object: token strings, their logprobs,
    the top alternatives per position as {token: logprob} (each a (bytes, logprob)
    pair on input), and text offsets (from ``offset``: a streamed chunk continues the
    offsets of the chunks before it)."""
    texts = [p.decode("utf-8", errors="replace") for p in pieces]
    offsets, pos = [], offset
    for t in texts:
        offsets.append(pos)
        pos += len(t)
    tops = None
    if top_logprobs is not None and any(top_logprobs):
        tops = [{piece.decode("utf-8", errors="replace"): lp for piece, lp in alternatives}
                for alternatives in top_logprobs]
    return {"tokens": texts, "token_logprobs": list(logprobs), "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(pieces: list[bytes], logprobs, top_logprobs) -> dict:
    """The chat ``logprobs`` object: per token its text, logprob, bytes and the top
    alternatives (each a (bytes, logprob) pair)."""
    def entry(piece: bytes, lp: float) -> dict:
        return {"token": piece.decode("utf-8", errors="replace"), "logprob": lp, "bytes": list(piece)}
    content = []
    for i, (piece, lp) in enumerate(zip(pieces, logprobs)):
        alternatives = top_logprobs[i] if top_logprobs is not None else ()
        content.append({**entry(piece, lp), "top_logprobs": [entry(p, alp) for p, alp in alternatives]})
    return {"content": content, "refusal": None}


def logprobs_object(token_pieces: list[bytes], tokens, logprobs, top_logprobs, chat: bool, offset: int = 0) -> dict:
    """The logprobs object of generated ``tokens`` (ids), their logprobs and their top
    alternatives ((id, logprob) per token); ``token_pieces`` maps ids to bytes."""
    pieces = [token_pieces[t] for t in tokens]
    alternatives = [[(token_pieces[t], lp) for t, lp in alts] for alts in top_logprobs]
    if chat:
        return chat_logprobs(pieces, logprobs, alternatives)
    return completion_logprobs(pieces, logprobs, alternatives, offset)


def draft_usage(stats) -> dict:
    """The usage fields a result adds about speculative decoding (``stats``: a
    GenerationStats, or None when none was reported)."""
    return {"drafted_tokens": stats.drafted if stats else 0, "accepted_tokens": stats.accepted if stats else 0}
