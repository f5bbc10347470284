"""OpenAI-compatible dicts: checked against the ``openai`` client's own types and
for exact keys, so clients written for OpenAI or llama-cpp-python accept them."""
from __future__ import annotations

import json

import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from pyllama_mtp import openai_shapes

ENVELOPE_KEYS = {"id", "object", "created", "model", "choices"}
ARGS = dict(id="cmpl-abc", model="tiny.gguf", created=1_700_000_000)
SPEC_USAGE = {"drafted_tokens": 9, "accepted_tokens": 6}


def assert_envelope(d, object_type, with_usage):
    """The exact top-level shape: typos or missing keys fail here even where the
    openai types would tolerate them."""
    assert set(d) == ENVELOPE_KEYS | ({"usage"} if with_usage else set())
    assert d["object"] == object_type
    assert isinstance(d["id"], str) and isinstance(d["model"], str) and isinstance(d["created"], int)
    assert len(d["choices"]) == 1 and d["choices"][0]["index"] == 0
    assert json.loads(json.dumps(d)) == d  # plain JSON, ready to send


# ------------------------------------------------------------------ ids

@pytest.mark.parametrize("prefix", ["cmpl", "chatcmpl"])
def test_new_id_has_the_prefix_and_is_unique(prefix):
    ids = {openai_shapes.new_id(prefix) for _ in range(100)}
    assert len(ids) == 100
    assert all(i.startswith(prefix + "-") and len(i) > len(prefix) + 16 for i in ids)


# ------------------------------------------------------------------ completions

def test_completion_response_matches_the_openai_type_and_merges_extra_usage():
    d = openai_shapes.completion_response(**ARGS, text="Hello", finish_reason="length", prompt_tokens=5,
                                          completion_tokens=7, extra_usage=SPEC_USAGE)
    assert_envelope(d, "text_completion", with_usage=True)
    assert d["choices"][0] == {"index": 0, "text": "Hello", "logprobs": None, "finish_reason": "length"}
    assert d["usage"] == {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12, **SPEC_USAGE}
    parsed = Completion.model_validate(d)
    assert parsed.choices[0].text == "Hello" and parsed.usage.total_tokens == 12
    assert parsed.usage.model_extra == SPEC_USAGE


def test_completion_logprobs_in_llama_cpp_python_shape_pass_through():
    logprobs = {"tokens": ["He", "llo"], "text_offset": [0, 2], "token_logprobs": [-0.1, -0.2],
                "top_logprobs": [{"He": -0.1}, {"llo": -0.2}]}
    d = openai_shapes.completion_response(**ARGS, text="Hello", finish_reason="stop", prompt_tokens=1,
                                          completion_tokens=2, logprobs=logprobs)
    assert Completion.model_validate(d).choices[0].logprobs.token_logprobs == [-0.1, -0.2]


def test_completion_chunks_have_the_completion_shape_with_null_finish_until_the_last():
    middle = openai_shapes.completion_chunk(**ARGS, text="Hel", finish_reason=None)
    last = openai_shapes.completion_chunk(**ARGS, text="lo", finish_reason="stop")
    for chunk in (middle, last):
        assert_envelope(chunk, "text_completion", with_usage=False)
        assert set(chunk["choices"][0]) == {"index", "text", "logprobs", "finish_reason"}
    assert middle["choices"][0]["finish_reason"] is None
    # the openai type (made for whole results) accepts the final chunk as-is
    assert Completion.model_validate(last).choices[0].text == "lo"


# ------------------------------------------------------------------ chat

def test_chat_response_matches_the_openai_type():
    d = openai_shapes.chat_response(**{**ARGS, "id": "chatcmpl-abc"}, text="Hi!", finish_reason="stop",
                                    prompt_tokens=10, completion_tokens=3, extra_usage=SPEC_USAGE)
    assert_envelope(d, "chat.completion", with_usage=True)
    choice = d["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "Hi!"}
    assert set(choice) == {"index", "message", "logprobs", "finish_reason"}
    parsed = ChatCompletion.model_validate(d)
    assert parsed.choices[0].message.content == "Hi!" and parsed.choices[0].finish_reason == "stop"
    assert parsed.usage.total_tokens == 13 and parsed.usage.model_extra == SPEC_USAGE


def test_chat_logprobs_pass_through():
    logprobs = {"content": [{"token": "Hi", "logprob": -0.5, "bytes": [72, 105], "top_logprobs": []}]}
    d = openai_shapes.chat_response(**ARGS, text="Hi", finish_reason="stop", prompt_tokens=1,
                                    completion_tokens=1, logprobs=logprobs)
    assert ChatCompletion.model_validate(d).choices[0].logprobs.content[0].logprob == -0.5


def test_a_conventional_chat_stream_matches_the_openai_chunk_type():
    deltas = [({"role": "assistant", "content": ""}, None), ({"content": "Hi"}, None), ({}, "length")]
    chunks = [openai_shapes.chat_chunk(**ARGS, delta=delta, finish_reason=finish) for delta, finish in deltas]
    for chunk, (delta, finish) in zip(chunks, deltas):
        assert_envelope(chunk, "chat.completion.chunk", with_usage=False)
        assert chunk["choices"][0] == {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        parsed = ChatCompletionChunk.model_validate(chunk)
        assert parsed.choices[0].finish_reason == finish
    assert ChatCompletionChunk.model_validate(chunks[0]).choices[0].delta.role == "assistant"


# ------------------------------------------------------------------ misuse

@pytest.mark.parametrize("build", [
    lambda reason: openai_shapes.completion_response(**ARGS, text="", finish_reason=reason, prompt_tokens=1,
                                                     completion_tokens=0),
    lambda reason: openai_shapes.chat_response(**ARGS, text="", finish_reason=reason, prompt_tokens=1,
                                               completion_tokens=0),
])
@pytest.mark.parametrize("reason", ["eos", "", None])
def test_whole_results_need_a_finish_reason_from_the_schema(build, reason):
    with pytest.raises(ValueError, match="finish_reason must be one of"):
        build(reason)


@pytest.mark.parametrize("build", [
    lambda reason: openai_shapes.completion_chunk(**ARGS, text="", finish_reason=reason),
    lambda reason: openai_shapes.chat_chunk(**ARGS, delta={}, finish_reason=reason),
])
def test_chunks_reject_finish_reasons_outside_the_schema(build):
    with pytest.raises(ValueError, match="or None"):
        build("aborted")


def test_extra_usage_cannot_overwrite_the_standard_counts():
    with pytest.raises(ValueError, match="total_tokens"):
        openai_shapes.completion_response(**ARGS, text="", finish_reason="stop", prompt_tokens=1,
                                          completion_tokens=1, extra_usage={"total_tokens": 99})
