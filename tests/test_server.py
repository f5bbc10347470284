"""The real server on 127.0.0.1, driven by the official openai client."""
from __future__ import annotations

import concurrent.futures
import json
import socket
import time

import httpx
import pytest

from conftest import start_server

openai = pytest.importorskip("openai")

API_KEY = "test-key-123"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(oracle_path):
    proc, base = start_server(oracle_path, "--mtp", "--draft", "3", "--api-key", API_KEY,
                              "--max-body-bytes", "20000", threads=2)
    yield base
    proc.terminate()
    proc.wait(timeout=20)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0)


@pytest.fixture(scope="module")
def reference(oracle_path):
    from pyllama_mtp import Llama
    with Llama(oracle_path, n_ctx=512, threads=2) as llm:
        yield llm


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert httpx.get(f"{server}/health").json() == {"status": "ok"}


def test_completion_equals_library_greedy_output(client, reference):
    result = client.completions.create(model="tiny", prompt="a b", max_tokens=40, temperature=0)
    expected = reference.generate("a b", max_tokens=40)
    assert result.choices[0].text == expected.text
    assert result.usage.completion_tokens == len(expected.tokens)
    assert result.usage.model_extra["accepted_tokens"] > 0   # MTP drafts were used


def test_streaming_completion_equals_non_streaming(client):
    whole = client.completions.create(model="tiny", prompt="stream", max_tokens=30)
    parts = [c.choices[0].text for c in client.completions.create(model="tiny", prompt="stream", max_tokens=30,
                                                                  stream=True)]
    assert "".join(parts) == whole.choices[0].text


def test_chat_stream_and_non_stream(client):
    messages = [{"role": "user", "content": "hello"}]
    whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=25)
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=25, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason == "length"


def test_stop_sequence_and_max_tokens(client):
    full = client.completions.create(model="tiny", prompt="q", max_tokens=40).choices[0].text
    stop = full[10:13]
    result = client.completions.create(model="tiny", prompt="q", max_tokens=40, stop=[stop])
    assert result.choices[0].finish_reason == "stop"
    assert result.choices[0].text == full[:full.index(stop)]
    assert client.completions.create(model="tiny", prompt="q", max_tokens=5).usage.completion_tokens == 5


def test_per_request_mtp_and_draft_overrides(client):
    plain = client.completions.create(model="tiny", prompt="x", max_tokens=30, extra_body={"mtp": False})
    short = client.completions.create(model="tiny", prompt="x", max_tokens=30, extra_body={"draft": 1})
    assert plain.usage.model_extra["drafted_tokens"] == 0
    assert 0 < short.usage.model_extra["drafted_tokens"] <= 30
    assert plain.choices[0].text == short.choices[0].text


def test_concurrent_clients_get_their_sequential_output(client):
    prompts = [f"p{i}" for i in range(4)]
    sequential = [client.completions.create(model="tiny", prompt=p, max_tokens=20).choices[0].text for p in prompts]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda p: client.completions.create(model="tiny", prompt=p, max_tokens=20)
                                 .choices[0].text, prompts))
    assert together == sequential


def test_client_disconnect_frees_the_server(server, client):
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.stream("POST", f"{server}/v1/completions", headers=headers, timeout=30,
                      json={"model": "tiny", "prompt": "long", "max_tokens": 400, "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data:"):
                break   # leave after the first chunk
    t0 = time.time()
    assert client.completions.create(model="tiny", prompt="next", max_tokens=4).choices[0].text
    assert time.time() - t0 < 20


def test_metrics_have_request_and_spec_decode_counters(server, client):
    client.completions.create(model="tiny", prompt="m", max_tokens=10)
    text = httpx.get(f"{server}/metrics").text
    assert "pyllama_mtp_requests_total" in text
    accepted = [line for line in text.splitlines()
                if line.startswith("pyllama_mtp_spec_decode_num_accepted_tokens_total")]
    assert accepted and float(accepted[0].split()[-1]) > 0
    assert 'pyllama_mtp_spec_decode_num_accepted_tokens_per_pos_total{model="tiny",position="0"}' in text
    assert "pyllama_mtp_request_latency_seconds_bucket" in text


@pytest.mark.parametrize("body, status, words", [
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "JSON object"),
    (json.dumps({"model": "tiny", "prompt": 5}).encode(), 400, "prompt"),
    (json.dumps({"model": "tiny", "prompt": "x", "max_tokens": -3}).encode(), 400, "max_tokens"),
    (json.dumps({"model": "tiny", "prompt": "x", "max_tokens": "many"}).encode(), 400, "max_tokens"),
    (json.dumps({"model": "other", "prompt": "x"}).encode(), 404, "not found"),
    (json.dumps({"model": "tiny", "prompt": "word " * 600}).encode(), 400, "context"),
    (json.dumps({"model": "tiny", "prompt": "x", "temperature": -1}).encode(), 400, "temperature"),
    (json.dumps({"model": "tiny", "prompt": "x", "draft": 7}).encode(), 400, "draft"),
    (json.dumps({"model": "tiny", "prompt": "x", "stop": [""]}).encode(), 400, "stop"),
    (json.dumps({"model": "tiny", "prompt": "x" * 30000}).encode(), 413, "larger"),
    # no silent coercion, every range checked
    (json.dumps({"model": "tiny", "prompt": "x", "max_tokens": "16"}).encode(), 400, "max_tokens"),
    (json.dumps({"model": "tiny", "prompt": "x", "mtp": "yes"}).encode(), 400, "mtp"),
    (json.dumps({"model": "tiny", "prompt": "x", "stream": "true"}).encode(), 400, "stream"),
    (json.dumps({"model": "tiny", "prompt": [True, 5]}).encode(), 400, "prompt"),
    (json.dumps({"model": "tiny", "prompt": [["a"], ["b"]]}).encode(), 400, "prompt"),   # lists of texts are not prompts
    (json.dumps({"model": "tiny", "prompt": "x", "temperature": 1e9}).encode(), 400, "temperature"),
    (json.dumps({"model": "tiny", "prompt": "x", "frequency_penalty": 1e308}).encode(), 400, "frequency_penalty"),
    (json.dumps({"model": "tiny", "prompt": "x", "presence_penalty": -3}).encode(), 400, "presence_penalty"),
    (json.dumps({"model": "tiny", "prompt": "x", "top_p": 1.5}).encode(), 400, "top_p"),
    (json.dumps({"model": "tiny", "prompt": "x", "logprobs": -1}).encode(), 400, "logprobs"),
    (json.dumps({"model": "tiny", "prompt": "x", "logprobs": 21}).encode(), 400, "logprobs"),
    (json.dumps({"model": "tiny", "prompt": "x", "seed": -1}).encode(), 400, "seed"),
    (json.dumps({"model": "tiny", "prompt": "x", "draft": "many"}).encode(), 400, "draft"),
    (json.dumps({"model": "tiny", "prompt": "x", "accept": "any"}).encode(), 400, "accept"),
    (json.dumps({"model": "tiny", "prompt": "x", "stream_options": {"include_usage": "yes"}}).encode(), 400,
     "include_usage"),
    (json.dumps({"model": "tiny", "prompt": "x", "max_tokens": 600}).encode(), 400, "max_tokens can be at most"),
    (b"[" * 1000 + b"]" * 1000, 400, "nested deeper"),
    (b'{"model": "tiny", "prompt": "x", "extra": ' + b"[" * 70 + b"]" * 70 + b"}", 400, "nested deeper"),
])
def test_bad_requests_get_openai_style_4xx(server, body, status, words):
    r = httpx.post(f"{server}/v1/completions", content=body, timeout=30,
                   headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert words in error["message"] and error["type"]
    assert httpx.get(f"{server}/health").status_code == 200


@pytest.mark.parametrize("messages, words", [
    ([{"content": "no role"}], "role"),
    ([{"role": "wizard", "content": "abracadabra"}], "role must be one of"),
    ([], "messages"),
    (["just a string"], "messages"),
    ([{"role": "user", "content": 5}], "content"),
])
def test_bad_chat_messages(server, messages, words):
    r = httpx.post(f"{server}/v1/chat/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                   json={"model": "tiny", "messages": messages})
    assert r.status_code == 400 and words in r.json()["error"]["message"], r.text


def test_an_unexpected_error_is_an_openai_500_and_counted(oracle_path):
    """A bug in a handler (here: a route added to the real app that raises) answers an
    OpenAI error object with status 500, and /metrics counts it."""
    from fastapi.testclient import TestClient

    from pyllama_mtp import Llama
    from pyllama_mtp.server.app import ServerSettings, create_app

    with Llama(oracle_path, n_ctx=256, threads=1) as llm:
        app = create_app(llm, ServerSettings(model_name="tiny"))

        @app.get("/v1/broken")
        async def broken():
            raise RuntimeError("a bug")

        with TestClient(app, raise_server_exceptions=False) as http:
            r = http.get("/v1/broken")
            assert r.status_code == 500
            assert r.json()["error"]["type"] == "server_error" and "RuntimeError" in r.json()["error"]["message"]
            assert 'pyllama_mtp_requests_total{endpoint="other",status="500"} 1' in http.get("/metrics").text


def test_api_key_is_required(server):
    no_key = openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        no_key.completions.create(model="tiny", prompt="x", max_tokens=2)
    assert httpx.post(f"{server}/v1/completions", json={"prompt": "x"}).status_code == 401


def test_logprobs_through_the_server(client):
    result = client.completions.create(model="tiny", prompt="a", max_tokens=12, logprobs=3)
    assert len(result.choices[0].logprobs.token_logprobs) == 12
    # keys are token strings: byte tokens that decode to the same U+FFFD share one key
    assert all(1 <= len(alts) <= 3 for alts in result.choices[0].logprobs.top_logprobs)
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "a"}], max_tokens=5,
                                          logprobs=True, top_logprobs=2)
    assert len(chat.choices[0].logprobs.content) == 5


def test_streamed_logprobs_equal_the_whole_result(client):
    """Each streamed chunk carries its tokens' logprobs; together they are the
    non-streamed result's (drafted tokens included: the server runs MTP)."""
    whole = client.completions.create(model="tiny", prompt="a b", max_tokens=16, logprobs=2, temperature=0)
    parts = list(client.completions.create(model="tiny", prompt="a b", max_tokens=16, logprobs=2, temperature=0,
                                           stream=True))
    streamed = [c.choices[0].logprobs for c in parts if c.choices[0].logprobs is not None]
    assert [lp for s in streamed for lp in s.token_logprobs] == whole.choices[0].logprobs.token_logprobs
    assert [t for s in streamed for t in s.tokens] == whole.choices[0].logprobs.tokens
    assert [o for s in streamed for o in s.text_offset] == whole.choices[0].logprobs.text_offset
    chat_whole = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=8, logprobs=True, top_logprobs=2, temperature=0)
    chat_parts = list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                     max_tokens=8, logprobs=True, top_logprobs=2, temperature=0,
                                                     stream=True))
    entries = [e for c in chat_parts if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    expected = chat_whole.choices[0].logprobs.content
    assert [(e.token, e.logprob) for e in entries] == [(e.token, e.logprob) for e in expected]
    assert [[a.token for a in e.top_logprobs] for e in entries] == [[a.token for a in e.top_logprobs] for e in expected]


def test_stream_extension_marks_draft_tokens_and_reports_stats(client, reference):
    messages = [{"role": "user", "content": "which tokens were drafted?"}]
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=40, stream=True,
                                                 stream_options={"include_usage": True}))
    expected = reference.chat(messages, max_tokens=40)
    # OpenAI's usage chunk comes last, with no choices
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 40
    content = [c for c in chunks[:-1] if c.choices and c.choices[0].delta.content]
    assert "".join(c.choices[0].delta.content for c in content) == expected.text
    flags, text_spans = [], 0
    for c in chunks[:-1]:
        ext = (c.model_extra or {}).get("x_pmtp")
        if ext is None:
            continue
        flags += ext["from_draft"]
        text = (c.choices[0].delta.content or "") if c.choices else ""
        # the spans partition the chunk's text (UTF-16 lengths)
        assert sum(n for n, _ in ext["spans"]) == len(text.encode("utf-16-le")) // 2
        text_spans += len(ext["spans"])
    assert len(flags) == 40 and flags[0] is False          # the first token never comes from a draft
    stats = chunks[-2].model_extra["x_pmtp"]["stats"]
    assert chunks[-2].choices[0].finish_reason == "length"
    assert stats["accepted"] == sum(flags) == chunks[-1].usage.model_extra["accepted_tokens"] > 0
    assert stats["completion_tokens"] == 40 and stats["tokens_per_second"] > 0
    assert stats["acceptance"] == 1.0 and stats["acceptance_per_position"] == [1.0, 1.0, 1.0]
    assert stats["mean_accepted"] == pytest.approx(stats["accepted"] / stats["verify_steps"], abs=1e-3)
    # the same prompt again: its tokens are found in the KV cache
    again = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=4, stream=True))
    reused = again[-1].model_extra["x_pmtp"]["stats"]
    assert 0 < reused["prompt_tokens_reused"] <= reused["prompt_tokens"]


def test_models_report_the_draft_range(client):
    model = client.models.list().data[0]
    assert model.model_extra["x_pmtp"] == {"mtp": True, "draft_max": 3, "draft_default": 3, "n_ctx": 512}


def test_a_list_of_prompts_runs_one_after_another_without_parallel(client, reference):
    both = client.completions.create(model="tiny", prompt=["one two", "three"], max_tokens=12, temperature=0)
    assert [c.text for c in both.choices] == [reference.generate(p, max_tokens=12).text for p in ("one two", "three")]
    assert [c.index for c in both.choices] == [0, 1]
    with pytest.raises(openai.BadRequestError, match="empty"):
        client.completions.create(model="tiny", prompt=[[7, 8, 9], []], max_tokens=4)   # an empty prompt in the list


def test_mtp_without_a_draft_picks_it_with_the_auto_policy(oracle_path):
    """--mtp alone: the server's default draft is "auto" for a model on this CPU."""
    proc, base = start_server(oracle_path, "--mtp")
    try:
        models = httpx.get(f"{base}/v1/models", timeout=30).json()["data"]
        assert models[0]["x_pmtp"]["draft_default"] == "auto"
        r = httpx.post(f"{base}/v1/completions", json={"model": "tiny", "prompt": "one two", "max_tokens": 8,
                                                        "temperature": 0}, timeout=60)
        assert r.status_code == 200 and 0 < r.json()["usage"]["completion_tokens"] <= 8
    finally:
        proc.terminate()
        proc.wait(timeout=30)
