"""Chat template rendering: the ChatML default, HF-compatible template helpers,
the sandbox, and validation of messages."""
from __future__ import annotations

import json
from datetime import datetime

import pytest

from pyllama_mtp.chat import DEFAULT_CHAT_TEMPLATE, ChatTemplateError, render_chat

SYSTEM_AND_USER = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]

# Mistral/Llama-2 style: folds the system prompt into the first user turn and
# insists on alternating roles, which it enforces with raise_exception.
ALTERNATING_TEMPLATE = """\
{{- bos_token -}}
{% if messages[0]['role'] == 'system' %}
    {% set system = messages[0]['content'] + '\\n\\n' %}
    {% set loop_messages = messages[1:] %}
{% else %}
    {% set system = '' %}
    {% set loop_messages = messages %}
{% endif %}
{% for message in loop_messages %}
    {% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') -}}
    {% endif %}
    {% if message['role'] == 'user' %}
        {{- '[INST] ' + (system if loop.first else '') + message['content'] + ' [/INST]' -}}
    {% else %}
        {{- message['content'] + eos_token -}}
    {% endif %}
{% endfor %}
"""


# ------------------------------------------------------------------ default template

def test_default_template_is_chatml_with_generation_prompt():
    assert render_chat(DEFAULT_CHAT_TEMPLATE, SYSTEM_AND_USER) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi there<|im_end|>\n"
        "<|im_start|>assistant\n")


def test_without_generation_prompt_the_assistant_header_is_left_out():
    messages = [*SYSTEM_AND_USER, {"role": "assistant", "content": "Hello."}]
    assert render_chat(DEFAULT_CHAT_TEMPLATE, messages, add_generation_prompt=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi there<|im_end|>\n"
        "<|im_start|>assistant\nHello.<|im_end|>\n")


def test_text_parts_content_is_joined():
    messages = [{"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]}]
    assert render_chat(DEFAULT_CHAT_TEMPLATE, messages) == (
        "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n")


def test_caller_messages_are_not_modified():
    parts = [{"type": "text", "text": "Hi"}]
    messages = [{"role": "user", "content": parts}]
    render_chat(DEFAULT_CHAT_TEMPLATE, messages)
    assert messages == [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]


# ------------------------------------------------------------------ HF-style templates

def test_system_message_folded_into_first_user_turn_with_bos_and_eos():
    messages = [*SYSTEM_AND_USER, {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]
    text = render_chat(ALTERNATING_TEMPLATE, messages, bos_token="<s>", eos_token="</s>")
    assert text == "<s>[INST] Be brief.\n\nHi there [/INST]Hello.</s>[INST] Bye [/INST]"


def test_block_tags_on_their_own_lines_add_no_whitespace_like_in_transformers():
    """trim_blocks drops the newline after a block tag, lstrip_blocks the indentation
    before one; templates are written for that."""
    template = "{% for m in messages %}\n    {% if m.role == 'user' %}\n{{ m.content }}|\n    {% endif %}\n{% endfor %}"
    assert render_chat(template, SYSTEM_AND_USER) == "Hi there|\n"


def test_raise_exception_in_template_becomes_chat_template_error_with_its_message():
    messages = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        render_chat(ALTERNATING_TEMPLATE, messages)


def test_chat_template_error_is_a_value_error():
    assert issubclass(ChatTemplateError, ValueError)


def test_tojson_keeps_non_ascii_and_html_characters_and_supports_indent():
    tools = [{"name": "café", "description": "x < y && y > z's"}]
    flat = render_chat("{{ tools | tojson }}", SYSTEM_AND_USER, tools=tools)
    assert flat == json.dumps(tools, ensure_ascii=False)
    indented = render_chat("{{ tools | tojson(indent=2) }}", SYSTEM_AND_USER, tools=tools)
    assert indented == json.dumps(tools, ensure_ascii=False, indent=2)
    assert "\n  " in indented


def test_strftime_now_gives_templates_the_current_date():
    text = render_chat("{{ strftime_now('%Y') }}", SYSTEM_AND_USER)
    assert text in {str(datetime.now().year), str(datetime.now().year - 1)}  # tolerate New Year's Eve


def test_extra_variables_reach_the_template():
    template = "{% if enable_thinking is defined and not enable_thinking %}no-think{% endif %}"
    assert render_chat(template, SYSTEM_AND_USER, enable_thinking=False) == "no-think"
    assert render_chat(template, SYSTEM_AND_USER) == ""


def test_loop_controls_are_available():
    template = "{% for m in messages %}{% if m.role == 'user' %}{{ m.content }}{% break %}{% endif %}{% endfor %}"
    assert render_chat(template, [*SYSTEM_AND_USER, {"role": "user", "content": "second"}]) == "Hi there"


def test_assistant_turn_with_only_tool_calls_renders_with_empty_content():
    messages = [{"role": "user", "content": "weather?"},
                {"role": "assistant", "content": None,
                 "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]}]
    template = ("{% for m in messages %}{{ m.role }}:{{ m.content }}"
                "{% for c in m.tool_calls or [] %}[{{ c.function.name }}]{% endfor %};{% endfor %}")
    assert render_chat(template, messages) == "user:weather?;assistant:[get_weather];"


# ------------------------------------------------------------------ template failures

@pytest.mark.parametrize("template, problem", [
    ("{% for m in messages %}{{ m.content }}", "syntax error on line 1"),
    ("{{ messages[0].content + 1 }}", "TypeError"),
    ("{{ missing_variable.attribute }}", "UndefinedError"),
    ("{{ messages.append(1) }}", "SecurityError"),          # immutable sandbox
    ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "SecurityError: access to attribute '__class__'"),
])
def test_broken_or_unsafe_templates_raise_chat_template_error_naming_the_problem(template, problem):
    with pytest.raises(ChatTemplateError, match=problem):
        render_chat(template, SYSTEM_AND_USER)


@pytest.mark.parametrize("template", [None, "", b"{{ x }}"])
def test_template_must_be_a_non_empty_string(template):
    with pytest.raises(ValueError, match="template must be a non-empty string"):
        render_chat(template, SYSTEM_AND_USER)


# ------------------------------------------------------------------ bad messages

@pytest.mark.parametrize("messages, problem", [
    ("hello", "messages must be a non-empty list"),
    ({"role": "user", "content": "hi"}, "messages must be a non-empty list"),
    ([], "messages must be a non-empty list"),
    (["hello"], r"messages\[0\] must be a dict, got str"),
    ([{"content": "hi"}], r"messages\[0\] needs a non-empty string 'role'"),
    ([{"role": 1, "content": "hi"}], r"messages\[0\] needs a non-empty string 'role'"),
    ([{"role": "user", "content": "ok"}, {"role": "user"}], r"messages\[1\] \(user\) needs 'content'"),
    ([{"role": "user", "content": None}], r"messages\[0\]\['content'\] must be a string .* got NoneType"),
    ([{"role": "user", "content": 42}], r"messages\[0\]\['content'\] must be a string .* got int"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
     r"messages\[0\]\['content'\]\[0\] must be a text part"),
    ([{"role": "user", "content": [{"type": "text", "text": "a"}, "b"]}],
     r"messages\[0\]\['content'\]\[1\] must be a text part"),
    ([{"role": "user", "content": [{"type": "text", "text": 3}]}],
     r"messages\[0\]\['content'\]\[0\] must be a text part"),
])
def test_bad_messages_raise_value_error_saying_what_is_wrong(messages, problem):
    with pytest.raises(ValueError, match=problem) as info:
        render_chat(DEFAULT_CHAT_TEMPLATE, messages)
    assert not isinstance(info.value, ChatTemplateError)  # reported before the template runs
