"""Rendering a GGUF ``tokenizer.chat_template`` (a Jinja template) for a list of
messages, in a sandbox, with the helpers Hugging Face templates expect."""
from __future__ import annotations

import json
from datetime import datetime

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

# ChatML, used when the model ships no template.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class ChatTemplateError(ValueError):
    """The chat template failed to render (or raised on purpose via raise_exception)."""


def _raise_exception(message):
    raise ChatTemplateError(f"chat template refused the messages: {message}")


def _tojson(value, indent=None, ensure_ascii=False, sort_keys=False):
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, undefined=jinja2.Undefined)
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


_ENV = _environment()


def _content_text(content, index: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"messages[{index}].content: only text parts {{'type': 'text', 'text': ...}} "
                                 "are supported")
            parts.append(part["text"])
        return "".join(parts)
    if content is None:
        return ""
    raise ValueError(f"messages[{index}].content must be a string or a list of text parts, "
                     f"got {type(content).__name__}")


def normalize_messages(messages) -> list[dict]:
    """Validate OpenAI-style messages; list-of-parts content becomes plain text."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"messages[{i}] must be a dict, got {type(m).__name__}")
        role = m.get("role")
        if not isinstance(role, str) or not role:
            raise ValueError(f"messages[{i}] needs a string 'role' (system, user, assistant, tool)")
        if "content" not in m and not m.get("tool_calls"):
            raise ValueError(f"messages[{i}] needs 'content'")
        out.append({**m, "content": _content_text(m.get("content"), i)})
    return out


def render_chat(template: str, messages, *, bos_token: str = "", eos_token: str = "",
                add_generation_prompt: bool = True, tools=None, **extra) -> str:
    """The prompt text for ``messages`` under ``template``."""
    msgs = normalize_messages(messages)
    try:
        compiled = _ENV.from_string(template)
        return compiled.render(messages=msgs, bos_token=bos_token, eos_token=eos_token,
                               add_generation_prompt=add_generation_prompt, tools=tools, **extra)
    except ChatTemplateError:
        raise
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"chat template error: {e}") from e
