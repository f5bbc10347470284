"""Rendering a GGUF ``tokenizer.chat_template`` (a Jinja template) for a list of
messages.

Templates come from model files, so they run in Jinja's immutable sandbox. The
environment matches what Hugging Face ``transformers`` gives templates (which is
what template authors test against): ``trim_blocks`` and ``lstrip_blocks``, the
loop-controls extension, ``raise_exception``, ``strftime_now`` and a ``tojson``
that neither escapes HTML nor non-ASCII text.
"""
from __future__ import annotations

import functools
import json
from datetime import datetime

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import InvalidArgumentError

# ChatML: used when the model ships no template.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class ChatTemplateError(InvalidArgumentError):
    """The chat template could not be compiled or rendered, or refused the
    messages on purpose through ``raise_exception``. An ``InvalidArgumentError`` (so a
    ``PmtpError`` and a ``ValueError``): the messages or the model's template are at fault."""


def _raise_exception(message: str):
    """Templates call this to reject conversations they cannot format
    (e.g. roles not alternating)."""
    raise ChatTemplateError(f"chat template rejected the messages: {message}")


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    """HF's override of Jinja's ``tojson``: Jinja's escapes <, >, & and ' for HTML,
    which would corrupt tool schemas in a prompt."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    """Lets templates put today's date into the system prompt."""
    return datetime.now().strftime(fmt)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


_ENV = _environment()


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    """Compiled once per template text: a chat session renders the same template every turn."""
    try:
        return _ENV.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template syntax error on line {e.lineno}: {e.message}") from e


def _content_text(content, index: int, allow_missing: bool) -> str:
    """Message content as plain text; the OpenAI list-of-parts form is joined, since
    only text can be rendered."""
    if isinstance(content, str):
        return content
    if content is None and allow_missing:
        return ""
    if isinstance(content, list):
        return "".join(_text_part(part, index, j) for j, part in enumerate(content))
    raise ValueError(f"messages[{index}]['content'] must be a string or a list of text parts, "
                     f"got {type(content).__name__}")


def _text_part(part, index: int, part_index: int) -> str:
    if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
        return part["text"]
    raise ValueError(f"messages[{index}]['content'][{part_index}] must be a text part "
                     f"{{'type': 'text', 'text': str}}, got {part!r:.80}")


def normalize_messages(messages) -> list[dict]:
    """Validate OpenAI-style messages, so that a mistake is reported as what it is
    rather than as an obscure error from inside the template. Content becomes plain
    text; other keys (name, tool_calls, ...) pass through for the template."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    normalized = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"messages[{i}] must be a dict, got {type(message).__name__}")
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise ValueError(f"messages[{i}] needs a non-empty string 'role' (system, user, assistant, tool)")
        # an assistant turn that only calls tools has no content
        has_tool_calls = bool(message.get("tool_calls"))
        if "content" not in message and not has_tool_calls:
            raise ValueError(f"messages[{i}] ({role}) needs 'content'")
        content = _content_text(message.get("content"), i, allow_missing=has_tool_calls)
        normalized.append({**message, "content": content})
    return normalized


def render_chat(template: str, messages, *, bos_token: str = "", eos_token: str = "",
                add_generation_prompt: bool = True, tools=None, **extra) -> str:
    """The prompt text for ``messages`` under ``template``.

    ``add_generation_prompt`` appends the header that opens the assistant's reply;
    ``tools`` and ``extra`` (e.g. ``enable_thinking``) are passed to the template as
    variables, as ``transformers.apply_chat_template`` does."""
    if not isinstance(template, str) or not template:
        raise ValueError("template must be a non-empty string (use DEFAULT_CHAT_TEMPLATE if the model has none)")
    normalized = normalize_messages(messages)
    compiled = _compile(template)
    try:
        return compiled.render(messages=normalized, bos_token=bos_token, eos_token=eos_token,
                               add_generation_prompt=add_generation_prompt, tools=tools, **extra)
    except ChatTemplateError:
        raise
    except Exception as e:  # anything raised while rendering is the template's failure
        raise ChatTemplateError(f"chat template failed to render: {type(e).__name__}: {e}") from e
