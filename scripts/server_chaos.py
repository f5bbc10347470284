"""The server under hostile load: bench_server_load.py --chaos.

Many client threads send requests one after another to a real pyllama-mtp-server
(--parallel 4 by default, MTP with --draft auto): most are well-formed greedy completions
(streaming or not) whose text must equal the model's output for that prompt alone; 20%
leave early (half streams read a chunk or two and hang up, half non-streaming requests
give up after a fraction of a second); 10% are malformed and must get a 4xx. Reported:
responses by status, 5xx count, stream error events, whether the server process is alive,
outputs that differ from solo, throughput of the first and last third of the run, how
long the queue takes to empty after the last client leaves, and the server's RSS growth
over the run (measured after a warm-up round of the same load, so growth means a leak).
"""
from __future__ import annotations

import json
import random
import statistics
import threading
import time
from pathlib import Path

BAD_BODIES = [
    b"{not json", b"[1, 2]", b'{"prompt": 5}', b'{"prompt": "x", "max_tokens": "16"}',
    b'{"prompt": "x", "temperature": 1e9}', b'{"prompt": [true, 5]}', b'{"prompt": "x", "mtp": "yes"}',
    b'{"prompt": "x", "logprobs": -1}', b"[" * 2000 + b"]" * 2000, b'{"prompt": "x", "max_tokens": 100000}',
    b'{"prompt": "x", "stop": [""]}', b'{"prompt": "x", "draft": "many"}',
]


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def metric(base: str, name: str) -> float:
    import httpx
    for line in httpx.get(f"{base}/metrics", timeout=10).text.splitlines():
        if line.startswith(f"pyllama_mtp_{name}"):
            return float(line.split()[-1])
    return 0.0


def server_5xx(base: str) -> int:
    """5xx answers the server counted, including those to clients that had already left."""
    import httpx
    n = 0
    for line in httpx.get(f"{base}/metrics", timeout=10).text.splitlines():
        if line.startswith("pyllama_mtp_requests_total{") and 'status="5' in line:
            n += int(float(line.split()[-1]))
    return n


def solo_outputs(model: Path, prompts: list[list[int]], n_gen: int, threads: int, n_ctx: int) -> list[str]:
    from pyllama_mtp import Llama
    with Llama(str(model), n_ctx=n_ctx, threads=threads) as llm:
        return [llm.generate(p, max_tokens=n_gen).text for p in prompts]


def chaos(model: Path, server_cls, args) -> dict:
    import httpx
    rng = random.Random(args.seed)
    from pyllama_mtp.config import ModelConfig
    from pyllama_mtp.engine import Model
    with Model(ModelConfig(str(model), load_mtp=False)) as m:
        n_vocab = m.info.n_vocab
    prompts = [[rng.randrange(3, n_vocab - 8) for _ in range(rng.choice([8, 32, 120, 300]))]
               for _ in range(args.chaos_prompts)]
    expected = solo_outputs(model, prompts, args.n_gen, args.threads, args.n_ctx)
    server = server_cls(model, args.threads, args.parallel, args.n_ctx, args.draft)
    base = server.base
    lock = threading.Lock()
    statuses: dict[str, int] = {}
    wrong, done_at, stream_errors = [], [], [0]

    def count(key):
        with lock:
            statuses[key] = statuses.get(key, 0) + 1

    def client(cid: int, n_requests: int):
        crng = random.Random(args.seed * 1000 + cid + 7919 * n_requests)
        with httpx.Client(base_url=base, timeout=600) as http:
            for _ in range(n_requests):
                roll = crng.random()
                i = crng.randrange(len(prompts))
                body = {"model": "bench", "prompt": prompts[i], "max_tokens": args.n_gen, "temperature": 0}
                try:
                    if roll < 0.10:                                   # malformed
                        r = http.post("/v1/completions", content=crng.choice(BAD_BODIES),
                                      headers={"Content-Type": "application/json"})
                        count(f"bad->{r.status_code}")
                    elif roll < 0.20:                                 # a stream that hangs up
                        with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                            for k, _line in enumerate(r.iter_lines()):
                                if k >= crng.randrange(1, 4):
                                    break
                        count("left-stream")
                    elif roll < 0.30:                                 # a client that gives up
                        try:
                            http.post("/v1/completions", json=body, timeout=crng.uniform(0.05, 0.5))
                            count("left-late")
                        except httpx.TimeoutException:
                            count("left-request")
                    elif roll < 0.65:                                 # a whole stream
                        text, error = [], False
                        with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                            status = r.status_code
                            for line in r.iter_lines():
                                if line.startswith("data: ") and line != "data: [DONE]":
                                    event = json.loads(line[6:])
                                    if "error" in event:
                                        error = True
                                    elif event.get("choices"):
                                        text.append(event["choices"][0]["text"])
                        count(f"stream->{status}")
                        with lock:
                            stream_errors[0] += error
                            done_at.append((time.perf_counter(), args.n_gen))
                            if status == 200 and not error and "".join(text) != expected[i]:
                                wrong.append(i)
                    else:                                             # a whole completion
                        r = http.post("/v1/completions", json=body)
                        count(f"complete->{r.status_code}")
                        if r.status_code == 200:
                            with lock:
                                done_at.append((time.perf_counter(), r.json()["usage"]["completion_tokens"]))
                                if r.json()["choices"][0]["text"] != expected[i]:
                                    wrong.append(i)
                except httpx.HTTPError as e:
                    count(f"client-error:{type(e).__name__}")

    def round_of(n_requests: int) -> None:
        threads = [threading.Thread(target=client, args=(c, n_requests)) for c in range(args.chaos_clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    try:
        rss_idle = rss_kb(server.proc.pid)
        # a warm-up round of the same load (up to two requests per client): connection buffers,
        # thread stacks and the allocator's pools reach their working size; growth after it is a leak
        round_of(min(2, args.requests))
        time.sleep(1.0)
        rss_before = rss_kb(server.proc.pid)
        with lock:
            statuses.clear()
            wrong.clear()
            done_at.clear()
            stream_errors[0] = 0
        n5xx_before = server_5xx(base)
        t0 = time.perf_counter()
        round_of(args.requests)
        t_end = time.perf_counter()
        # the queue empties once nobody is left
        drained = None
        while time.perf_counter() - t_end < 60:
            if metric(base, "num_requests_running") == 0 and metric(base, "num_requests_waiting") == 0:
                drained = time.perf_counter() - t_end
                break
            time.sleep(0.1)
        alive = server.proc.poll() is None
        rss_after = rss_kb(server.proc.pid) if alive else 0
        n5xx = server_5xx(base) - n5xx_before if alive else -1
    finally:
        server.close()
    span = t_end - t0
    thirds = [0, 0, 0]
    for at, n in done_at:
        thirds[min(2, int(3 * (at - t0) / span))] += n
    n5xx = max(n5xx, sum(v for k, v in statuses.items() if "->5" in k))
    return {
        "clients": args.chaos_clients, "requests_per_client": args.requests, "parallel": args.parallel,
        "draft": args.draft, "wall_s": round(span, 1), "statuses": dict(sorted(statuses.items())),
        "server_5xx": n5xx, "stream_error_events": stream_errors[0], "server_alive": alive,
        "outputs_checked": len(done_at), "outputs_differing_from_solo": len(wrong),
        "tok_s_first_third": round(thirds[0] / (span / 3), 1), "tok_s_last_third": round(thirds[2] / (span / 3), 1),
        "last_over_first": round(thirds[2] / thirds[0], 2) if thirds[0] else None,
        "queue_empty_after_s": None if drained is None else round(drained, 2),
        "rss_mb_idle_warm_after": [round(rss_idle / 1024), round(rss_before / 1024), round(rss_after / 1024)],
        "rss_growth": round(rss_after / rss_before - 1, 4) if rss_before and alive else None,
        "median_tokens_per_completed": statistics.median(n for _, n in done_at) if done_at else 0,
    }


def verdict(r: dict) -> list[str]:
    """The targets this run missed."""
    misses = []
    if r["server_5xx"] or r["stream_error_events"]:
        misses.append("5xx answers or stream error events")
    if not r["server_alive"]:
        misses.append("the server died")
    if r["outputs_differing_from_solo"]:
        misses.append("outputs differ from solo")
    if r["last_over_first"] is None or r["last_over_first"] < 0.8:
        misses.append("throughput of the last third < 0.8x the first")
    if r["queue_empty_after_s"] is None or r["queue_empty_after_s"] > 5:
        misses.append("queue not empty within 5 s")
    if r["rss_growth"] is None or r["rss_growth"] >= 0.05:
        misses.append("RSS grew >= 5%")
    return misses
