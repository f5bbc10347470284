"""The server under pressure: clients that leave, a full queue, slow requests, SIGTERM.

Each test starts its own real server (a tiny oracle step35 with MTP; a 4,000-token answer
takes seconds on it, long enough to leave, queue behind or shut down during).
"""
from __future__ import annotations

import concurrent.futures
import signal
import threading
import time

import httpx
import pytest

from conftest import start_server

LONG = 3500


def body(max_tokens=LONG, stream=False, prompt="go on"):
    return {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "stream": stream}


def metric(base, name) -> float:
    for line in httpx.get(f"{base}/metrics").text.splitlines():
        if line.startswith(f"pyllama_mtp_{name}"):
            return float(line.split()[-1])
    raise AssertionError(f"no metric {name}")


def statuses(base) -> dict[str, float]:
    """/metrics requests_total summed by HTTP status."""
    out: dict[str, float] = {}
    for line in httpx.get(f"{base}/metrics").text.splitlines():
        if line.startswith("pyllama_mtp_requests_total{"):
            status = line.split('status="')[1].split('"')[0]
            out[status] = out.get(status, 0) + float(line.split()[-1])
    return out


def serve(model, *extra):
    return start_server(model, "--mtp", "--draft", "3", "--n-ctx", "4096", *extra)


def stop(proc):
    if proc.poll() is None:
        proc.terminate()
        proc.wait(timeout=60)


def first_chunk(base, started: threading.Event, outcome: dict):
    """Open a long stream, signal once its first chunk arrived, read it to the end."""
    try:
        with httpx.stream("POST", f"{base}/v1/completions", json=body(stream=True), timeout=120) as r:
            lines = 0
            for line in r.iter_lines():
                if line.startswith("data:"):
                    lines += 1
                    started.set()
            outcome["lines"] = lines
            outcome["status"] = r.status_code
    except httpx.HTTPError as e:
        outcome["error"] = type(e).__name__
    finally:
        started.set()


@pytest.mark.parametrize("parallel", ["1", "4"])
def test_clients_that_leave_are_dropped_from_the_queue_and_their_slot(oracle_path, parallel):
    proc, base = serve(oracle_path, "--parallel", parallel)
    try:
        def impatient(i):
            try:
                httpx.post(f"{base}/v1/completions", json=body(prompt=f"leave {i}"), timeout=0.3)
            except httpx.TimeoutException:
                return "left"
            return "answered"

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            assert list(pool.map(impatient, range(8))) == ["left"] * 8
        # within about a step and a poll, nothing of theirs runs any more
        time.sleep(2.0)
        generated = metric(base, "generation_tokens_total")
        time.sleep(1.0)
        assert metric(base, "generation_tokens_total") == generated
        assert generated < 8 * LONG / 4
        # each is counted as 499 (client closed request), none as a server error
        counted = statuses(base)
        assert counted.get("499") == 8 and not any(s.startswith("5") for s in counted), counted
        t0 = time.monotonic()
        r = httpx.post(f"{base}/v1/completions", json=body(max_tokens=4), timeout=30)
        assert r.status_code == 200 and time.monotonic() - t0 < 5
    finally:
        stop(proc)


def test_a_full_queue_answers_503_with_retry_after(oracle_path):
    proc, base = serve(oracle_path, "--max-queue", "2")
    try:
        started, outcome = threading.Event(), {}
        threading.Thread(target=first_chunk, args=(base, started, outcome), daemon=True).start()
        assert started.wait(60)

        def post(i):
            return httpx.post(f"{base}/v1/completions", json=body(max_tokens=8, prompt=f"q{i}"), timeout=120)

        with concurrent.futures.ThreadPoolExecutor(5) as pool:
            answers = list(pool.map(post, range(5)))
        busy = [r for r in answers if r.status_code == 503]
        assert busy and all(r.json()["error"]["code"] == "server_busy" for r in busy)
        assert all(r.headers["retry-after"] == "1" for r in busy)
        assert all(r.status_code in (200, 503) for r in answers)
        assert sum(r.status_code == 200 for r in answers) >= 2          # the queue's two places were served
        assert metric(base, 'requests_total{endpoint="/v1/completions",status="503"}') == len(busy)
    finally:
        stop(proc)


def test_a_request_over_the_timeout_gets_504_and_a_stream_an_error_event(oracle_path):
    proc, base = serve(oracle_path, "--request-timeout", "1")
    try:
        t0 = time.monotonic()
        r = httpx.post(f"{base}/v1/completions", json=body(), timeout=60)
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
        assert time.monotonic() - t0 < 5
        with httpx.stream("POST", f"{base}/v1/completions", json=body(stream=True), timeout=60) as s:
            events = [line[6:] for line in s.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and '"code": "timeout"' in events[-2]
        assert metric(base, 'stream_errors_total{endpoint="/v1/completions",status="504"}') == 1
        assert httpx.post(f"{base}/v1/completions", json=body(max_tokens=4), timeout=30).status_code == 200
    finally:
        stop(proc)


@pytest.mark.parametrize("parallel", ["1", "4"])
def test_sigterm_refuses_the_queue_cuts_running_streams_and_exits_0(oracle_path, parallel):
    proc, base = serve(oracle_path, "--parallel", parallel, "--shutdown-timeout", "2")
    try:
        started, outcome = threading.Event(), {}
        streamer = threading.Thread(target=first_chunk, args=(base, started, outcome), daemon=True)
        streamer.start()
        assert started.wait(60)
        answers = []

        def post(i):
            try:
                r = httpx.post(f"{base}/v1/completions", json=body(prompt=f"queued {i}"), timeout=60)
                answers.append((r.status_code, r.headers.get("retry-after"), r.json()["error"]["code"]
                                if r.status_code != 200 else None))
            except httpx.HTTPError as e:              # a running request cut at the deadline
                answers.append(("cut", type(e).__name__, None))

        posters = [threading.Thread(target=post, args=(i,), daemon=True) for i in range(8)]
        for t in posters:
            t.start()
        time.sleep(1.0)                                   # all eight are in: running or queued
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert time.monotonic() - t0 < 2 + 6
        for t in posters:
            t.join(timeout=30)
        streamer.join(timeout=30)
        assert len(answers) == 8
        refused = [a for a in answers if a[0] == 503]
        assert refused and all(a[1] == "5" and a[2] == "shutting_down" for a in refused)
        assert all(a[0] in (200, 503) for a in answers), answers     # nobody was cut without an answer
        assert "lines" in outcome or "error" in outcome   # the stream ended (cut or finished), never hung
    finally:
        stop(proc)
