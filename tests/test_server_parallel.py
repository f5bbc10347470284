"""``pyllama-mtp-server --parallel N`` on 127.0.0.1, driven by the official openai client:
concurrent requests decode together and each gets exactly its sequential greedy text,
requests beyond N wait, and a client that goes away frees its slot at once."""
from __future__ import annotations

import concurrent.futures
import time

import httpx
import pytest

from conftest import start_server

openai = pytest.importorskip("openai")

PARALLEL = 3



@pytest.fixture(scope="module")
def server(step35_path):
    """A random step35 (window 8, near-ties everywhere) with MTP draft 3 and 3 slots."""
    proc, base = start_server(step35_path, "--mtp", "--draft", "3", "--parallel", str(PARALLEL))
    yield base
    proc.terminate()
    proc.wait(timeout=20)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="none", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def reference(step35_path):
    from pyllama_mtp import Llama
    with Llama(step35_path, n_ctx=512, threads=1) as llm:
        yield llm


def complete(client, prompt, n=120, **extra):
    return client.completions.create(model="tiny", prompt=prompt, max_tokens=n, temperature=0,
                                     extra_body=extra or None).choices[0].text


def metric(server, name) -> float:
    for line in httpx.get(f"{server}/metrics").text.splitlines():
        if line.startswith(f"pyllama_mtp_{name}"):
            return float(line.split()[-1])
    raise AssertionError(f"no metric {name}")


def test_concurrent_clients_get_their_sequential_greedy_text(client, reference):
    prompts = [f"prompt number {i}" for i in range(PARALLEL)]
    sequential = [complete(client, p) for p in prompts]
    with concurrent.futures.ThreadPoolExecutor(PARALLEL) as pool:
        together = list(pool.map(lambda p: complete(client, p), prompts))
    assert together == sequential
    for p, text in zip(prompts, together):
        reference.reset()   # a fresh context: the text alone, decoded plainly
        assert text == reference.generate(p, max_tokens=120).text


def test_requests_beyond_capacity_wait_and_are_served(client, server):
    prompts = [f"queued {i}" for i in range(2 * PARALLEL + 1)]
    sequential = [complete(client, p, n=40) for p in prompts]
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        futures = [pool.submit(complete, client, p, 40) for p in prompts]
        waiting = 0.0
        while not all(f.done() for f in futures):
            waiting = max(waiting, metric(server, "num_requests_waiting"))
            time.sleep(0.01)
        together = [f.result() for f in futures]
    assert together == sequential
    assert waiting > 0
    assert metric(server, "num_requests_running") == 0


def test_mixed_mtp_settings_in_one_batch(client):
    """Slots with MTP off, draft 1 and draft 3 step together; greedy text is the same."""
    settings = [{"mtp": False}, {"draft": 1}, {"draft": 3}]
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        texts = list(pool.map(lambda e: complete(client, "same prompt", 100, **e), settings))
    assert texts[0] == texts[1] == texts[2]


def test_disconnect_frees_the_slot_at_once(server, client):
    """All slots busy with long streams; one client leaves: a new request is served while
    the others still run."""
    def long_stream(i):
        chunks = client.completions.create(model="tiny", prompt=f"long {i}", max_tokens=480, stream=True)
        return sum(1 for _ in chunks)

    with concurrent.futures.ThreadPoolExecutor(PARALLEL) as pool:
        others = [pool.submit(long_stream, i) for i in range(PARALLEL - 1)]
        with httpx.stream("POST", f"{server}/v1/completions", timeout=60,
                          json={"model": "tiny", "prompt": "leaving", "max_tokens": 480, "stream": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data:"):
                    break   # leave after the first chunk
        t0 = time.time()
        assert complete(client, "next", n=4)
        served_in = time.time() - t0
        still_running = sum(not f.done() for f in others)
        for f in others:
            assert f.result() > 0
    assert served_in < 20
    assert still_running > 0, "the long streams ended before the new request: the test proves nothing"


def test_sampling_at_temperature_in_parallel_slots(client):
    """Each slot has its own sampler: two plain slots with one seed draw the same text side
    by side; MTP slots at temperature > 0 (rejection sampling) draft and produce text."""
    def sample(args):
        seed, extra = args
        r = client.completions.create(model="tiny", prompt="t", max_tokens=30, temperature=1.0, seed=seed,
                                      extra_body=extra)
        return r.choices[0].text, r.usage.model_extra["drafted_tokens"]
    jobs = [(1, {"mtp": False}), (1, {"mtp": False}), (2, {})]
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        (a, _), (b, _), (c, drafted) = pool.map(sample, jobs)
    assert a == b and a
    assert c and drafted > 0


def test_usage_and_spec_decode_counters(client, server):
    before = metric(server, "spec_decode_num_drafts_total")
    result = client.completions.create(model="tiny", prompt="u", max_tokens=20)
    assert result.usage.completion_tokens == 20
    assert result.usage.model_extra["drafted_tokens"] > 0
    assert metric(server, "spec_decode_num_drafts_total") > before


def test_parallel_with_a_recurrent_model(tmp_path):
    """qwen35 (recurrent state per slot): concurrent requests get their greedy text alone."""
    from pyllama_mtp import Llama
    import factories as testing
    path = str(testing.write_qwen35(tmp_path / "q.gguf", seed=1))
    proc, base = start_server(path, "--mtp", "--draft", "2", "--parallel", "2")
    try:
        c = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=120)
        prompts = ["first recurrent prompt", "the second one, a bit longer than the first"]
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            together = list(pool.map(lambda p: complete(c, p, 80), prompts))
        # next turns: one extends a finished prompt (its slot's state is reused if its
        # snapshots reach back far enough, else the prompt goes in again), one cuts it short
        follow_ups = [prompts[0] + together[0] + " and more", prompts[1][:20]]
        later = [complete(c, p, 40) for p in follow_ups]
        # a prompt that extends exactly what a finished slot holds (prompt and answer, as a
        # chat's next turn after the answer's end token) needs no rollback: reused
        with Llama(path, n_ctx=512, threads=1) as llm:
            ids = llm.tokenize("an exact extension")
            answer = list(llm.generate(ids, max_tokens=30).tokens)
        first = client_tokens(c, ids, 30)
        before = metric(base, "prompt_tokens_cached_total")
        extended = ids + answer + [5, 6, 7]
        second = client_tokens(c, extended, 30)
        reused = metric(base, "prompt_tokens_cached_total") - before
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    with Llama(path, n_ctx=512, threads=1) as llm:
        assert together == [fresh_text(llm, p, 80) for p in prompts]
        assert later == [fresh_text(llm, p, 40) for p in follow_ups]
        assert first == llm.detokenize(answer)
        llm.reset()
        assert second == llm.generate(extended, max_tokens=30).text
    assert reused == len(ids) + len(answer) - 1


def client_tokens(client, ids, n):
    return client.completions.create(model="tiny", prompt=ids, max_tokens=n, temperature=0).choices[0].text


@pytest.fixture(scope="module")
def chunked_server(step35_path):
    """3 slots, prompts go in 8 tokens at a time while other slots generate."""
    proc, base = start_server(step35_path, "--mtp", "--draft", "3", "--parallel", str(PARALLEL),
                              "--prefill-chunk", "8")
    yield base
    proc.terminate()
    proc.wait(timeout=20)


def fresh_text(reference, prompt, n):
    reference.reset()
    return reference.generate(prompt, max_tokens=n).text


def test_prompt_prefilled_in_chunks_between_steps_gives_the_greedy_text(chunked_server, reference):
    """A long prompt that arrives while another request generates goes in 8 tokens per
    loop, interleaved with the other slot's steps; both texts equal their greedy text
    decoded alone."""
    c = openai.OpenAI(base_url=f"{chunked_server}/v1", api_key="none", max_retries=0, timeout=120)
    short, long_ = "a running stream", " ".join(f"token{i}" for i in range(40))
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        running = pool.submit(complete, c, short, 200)
        time.sleep(0.3)
        joining = pool.submit(complete, c, long_, 60)
        texts = running.result(), joining.result()
    assert texts == (fresh_text(reference, short, 200), fresh_text(reference, long_, 60))


def test_a_prompt_that_extends_a_finished_one_reuses_its_slot_cache(chunked_server, reference):
    """A chat's next turn: the new prompt starts with the previous prompt and its answer.
    The slot that served it still holds those tokens, so only the rest is prefilled
    (counted in /metrics), and the text is still the greedy text decoded alone."""
    c = openai.OpenAI(base_url=f"{chunked_server}/v1", api_key="none", max_retries=0, timeout=120)
    first = "turn one: " + " ".join(f"w{i}" for i in range(30))
    answer = complete(c, first, 40)
    before = metric(chunked_server, "prompt_tokens_cached_total")
    second = first + answer + " and then"
    assert complete(c, second, 40) == fresh_text(reference, second, 40)
    reused = metric(chunked_server, "prompt_tokens_cached_total") - before
    assert reused >= len(reference.tokenize(first)) - 1, reused
    # an unrelated prompt reuses nothing and is still exact
    before = metric(chunked_server, "prompt_tokens_cached_total")
    assert complete(c, "something else entirely", 40) == fresh_text(reference, "something else entirely", 40)
    assert metric(chunked_server, "prompt_tokens_cached_total") == before


def test_running_streams_keep_going_while_a_long_prompt_goes_in(step35_path):
    """The scheduler's own order of events: after a long prompt is submitted, the stream
    already running gets chunks before the new request's first token (its prompt goes in
    8 tokens per loop, with a step of the running slot between chunks)."""
    import threading

    from pyllama_mtp import Llama
    from pyllama_mtp.server.metrics import Metrics
    from pyllama_mtp.server.scheduler import Job, Scheduler

    events, lock, first_b = [], threading.Lock(), threading.Event()

    def emitter(name):
        def emit(item):
            with lock:
                events.append((name, type(item).__name__))
            if name == "b":
                first_b.set()
        return emit

    with Llama(step35_path, n_ctx=512, threads=1, mtp=True, draft=3, parallel=2) as llm:
        worker = Scheduler(llm, Metrics("tiny"), prefill_chunk=8)
        try:
            a_started = threading.Event()
            emit_a = emitter("a")
            worker.submit(Job(llm.prepare(llm.tokenize("a running stream"), 400),
                              lambda item: (emit_a(item), a_started.set())))
            assert a_started.wait(30)
            with lock:
                mark = len(events)
            prompt_b = llm.tokenize(" ".join(f"token{i}" for i in range(60)))
            worker.submit(Job(llm.prepare(prompt_b, 5), emitter("b")))
            assert first_b.wait(60)
            with lock:
                between = events[mark:events.index(next(e for e in events if e[0] == "b"))]
        finally:
            worker.stop()
    assert len([e for e in between if e == ("a", "Chunk")]) >= len(prompt_b) // 8 - 1, between


def test_stream_extension_with_parallel_slots(client):
    """The chat page's figures come from the batch scheduler too: per-token draft flags,
    per-message stats and the prompt tokens a slot's KV cache gave back."""
    messages = [{"role": "user", "content": "parallel slots and the stream extension"}]
    for round_ in range(2):
        chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=24, stream=True))
        flags = [f for c in chunks for f in ((c.model_extra or {}).get("x_pmtp") or {}).get("from_draft", [])]
        stats = chunks[-1].model_extra["x_pmtp"]["stats"]
        assert len(flags) == stats["completion_tokens"] == 24
        assert stats["accepted"] == sum(flags) and stats["drafted"] > 0
        assert len(stats["acceptance_per_position"]) == 3
        if round_ == 1:
            assert stats["prompt_tokens_reused"] >= 16    # the slot kept the same prompt


def test_a_list_of_prompts_gives_one_choice_each_in_order(client, reference):
    # OpenAI's /v1/completions takes a list of prompts; with --parallel they run side by side
    def create(prompt, n, **kw):
        return client.completions.create(model="tiny", prompt=prompt, max_tokens=n, temperature=0, **kw)

    prompts = ["one two three", "a", "the quick brown fox", "x y z", "hello there"]
    alone = [reference.generate(p, max_tokens=40) for p in prompts]
    both = create(prompts, 40)
    assert [c.index for c in both.choices] == list(range(len(prompts)))
    assert [c.text for c in both.choices] == [a.text for a in alone]
    assert both.usage.completion_tokens == sum(len(a.tokens) for a in alone)
    assert both.usage.prompt_tokens == sum(a.n_prompt_tokens for a in alone)
    token_lists = [reference.tokenize(p) for p in prompts[:2]]
    assert [c.text for c in create(token_lists, 40).choices] == [a.text for a in alone[:2]]
    assert len(create(token_lists[0], 8).choices) == 1          # token ids alone stay one prompt
    with pytest.raises(openai.BadRequestError, match="one prompt"):
        create(prompts, 8, stream=True)
    with pytest.raises(openai.BadRequestError, match="at most"):
        create(["x"] * 65, 1)
