"""One Llama shared by threads: calls take turns, nothing crashes, output stays exact.

The hammering runs in a child process: before the call gate, two threads on one Llama ended
in SIGABRT/SIGFPE inside llama.cpp, which would take the test run down with it.
"""
from __future__ import annotations

import threading

import pytest

from conftest import run_isolated
from pyllama_mtp import ClosedError, ConcurrentUseError, Llama

HAMMER = """
import random, sys, threading
from pyllama_mtp import ClosedError, Llama

path = sys.argv[1] if len(sys.argv) > 1 else {path!r}
prompts = ["a b c", "hello there", "one two three four", [11, 12, 13], "zz"]
with Llama(path, mtp=True, draft=3, n_ctx=256, threads=2) as solo:
    expected = {{i: solo.generate(p, max_tokens=12).tokens for i, p in enumerate(prompts)}}
    chat_expected = solo.chat([{{"role": "user", "content": "hi"}}], max_tokens=8).tokens

llm = Llama(path, mtp=True, draft=3, n_ctx=256, threads=2)
errors, counts = [], {{"generate": 0, "stream": 0, "partial": 0, "chat": 0, "closed": 0}}
lock = threading.Lock()

def worker(seed):
    rng = random.Random(seed)
    for _ in range(20):
        i = rng.randrange(len(prompts))
        kind = rng.choice(["generate", "stream", "partial", "chat"])
        try:
            if kind == "generate":
                got = llm.generate(prompts[i], max_tokens=12, draft=rng.choice([0, 1, 3, "auto"])).tokens
                ok = got == expected[i]
            elif kind == "stream":
                got = tuple(t for c in llm.stream(prompts[i], max_tokens=12) for t in c.tokens)
                ok = got == expected[i]
            elif kind == "partial":          # take two chunks, then drop the stream
                s = llm.stream(prompts[i], max_tokens=12)
                first = [t for _, c in zip(range(2), s) for t in c.tokens]
                s.close()
                ok = tuple(first) == expected[i][:len(first)]
            else:
                ok = llm.chat([{{"role": "user", "content": "hi"}}], max_tokens=8).tokens == chat_expected
            with lock:
                counts[kind] += 1
                if not ok:
                    errors.append((kind, i))
        except ClosedError:
            with lock:
                counts["closed"] += 1

threads = [threading.Thread(target=worker, args=(s,)) for s in range(8)]
for t in threads:
    t.start()
for t in threads:
    t.join()
assert not errors, errors
assert sum(counts.values()) == 160 and counts["closed"] == 0, counts

# close() from another thread while eight threads generate: each call either completes
# exactly or raises ClosedError; the process lives
stop = threading.Event()
def busy(seed):
    while not stop.is_set():
        try:
            i = seed % len(prompts)
            if llm.generate(prompts[i], max_tokens=12).tokens != expected[i]:
                errors.append(("after-close", i))
        except ClosedError:
            with lock:
                counts["closed"] += 1
            return
threads = [threading.Thread(target=busy, args=(s,)) for s in range(8)]
for t in threads:
    t.start()
threading.Timer(0.3, llm.close).start()
for t in threads:
    t.join(timeout=60)
assert not any(t.is_alive() for t in threads)
assert not errors, errors
assert counts["closed"] == 8, counts
print("ok", counts)
"""


def test_eight_threads_share_one_llama_and_a_close_from_another_thread(step35_path):
    done = run_isolated(HAMMER.format(path=step35_path), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("ok")


@pytest.fixture(scope="module")
def llm(step35_path):
    with Llama(step35_path, mtp=True, draft=3, n_ctx=256, threads=2) as llm:
        yield llm


def test_the_thread_holding_an_open_stream_is_refused_and_loses_nothing(llm):
    expected = llm.generate("keep going", max_tokens=16).tokens
    stream = llm.stream("keep going", max_tokens=16)
    first = next(stream)
    with pytest.raises(ConcurrentUseError, match="open stream"):
        llm.generate("something else", max_tokens=4)
    with pytest.raises(ConcurrentUseError):
        next(llm.stream("a third", max_tokens=4))
    rest = [t for c in stream for t in c.tokens]
    assert tuple(first.tokens) + tuple(rest) == expected      # the open stream was not disturbed
    assert llm.generate("keep going", max_tokens=16).tokens == expected   # and the turn came back


def test_another_thread_waits_for_an_open_stream_then_runs(llm):
    expected = llm.generate("waiting", max_tokens=8).tokens
    stream = llm.stream("held", max_tokens=32)
    next(stream)
    result = {}
    other = threading.Thread(target=lambda: result.setdefault("tokens", llm.generate("waiting", max_tokens=8).tokens))
    other.start()
    other.join(timeout=0.5)
    assert other.is_alive() and not result          # its turn has not come: the stream holds the sequence
    stream.close()
    other.join(timeout=60)
    assert result["tokens"] == expected


def test_an_open_stream_raises_closed_error_after_close(step35_path):
    llm = Llama(step35_path, mtp=True, draft=3, n_ctx=256, threads=2)
    stream = llm.stream("closing", max_tokens=32)
    next(stream)
    llm.close()
    with pytest.raises(ClosedError):
        next(stream)
    with pytest.raises(ClosedError):
        llm.generate("x", max_tokens=2)
    assert llm.closed
