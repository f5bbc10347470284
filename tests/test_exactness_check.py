"""The load-time exactness check (pyllama_mtp/exactness.py): a Llama with MTP compares its
own verify batch with one-token decoding before anything uses the session.

On this build's CPU backend the check passes and leaves nothing behind. Against a device
whose kernels depend on the batch size it must refuse: upstream llama.cpp's own RPC worker
(``ggml-rpc-server`` of the same pinned tree, without our patches) speaks our protocol and
is such a device. Where cmake, ninja and the pinned sdist are at hand, the slow test builds
it with scripts/build_upstream.sh (into build/upstream, which the benchmarks share).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from source_build import build_blocker
from factories.rpc_local import LocalWorker, free_port, wait_listening
from pyllama_mtp import InexactVerifyError, Llama, MtpError, build_info
from pyllama_mtp.errors import InvalidArgumentError
from pyllama_mtp.config import ContextConfig, ModelConfig
from pyllama_mtp.engine import Model, Session
from pyllama_mtp.exactness import _first_difference, check_session

ROOT = Path(__file__).resolve().parent.parent
UPSTREAM = Path(os.environ.get("UPSTREAM_BUILD", ROOT / "build" / "upstream"))
PROMPT = "the quick brown fox"


def test_a_cpu_session_passes_and_is_left_empty(step35_path):
    with Llama(step35_path, mtp=True, draft=3, n_ctx=256, threads=1) as llm:
        check = llm.exactness
        assert (check.verify_rows, check.sequences, check.exact, check.difference) == (4, 1, True, None)
        assert llm.session.n_past == 0
        stats = llm.session.stats()
        assert stats["n_steps"] == 0 and stats["n_target_decodes"] == 0
        assert llm.stats.n_generated == 0
        assert llm.session.sampling.n_logprobs == -1        # the probe's greedy+logprobs sampler is gone
        with_mtp = llm.generate(PROMPT, max_tokens=32).tokens
    with Llama(step35_path, n_ctx=256, threads=1) as plain:
        assert plain.exactness is None                       # nothing to check without MTP
        assert plain.generate(PROMPT, max_tokens=32).tokens == with_mtp


def test_several_sequences_are_checked_together(step35_path):
    with Llama(step35_path, mtp=True, draft="auto", n_ctx=256, threads=1, parallel=10) as llm:
        assert llm.exactness.exact and llm.exactness.sequences == 8
        assert llm.exactness.verify_rows == llm.draft_max + 1
        assert all(llm.session.seq_n_past(seq) == 0 for seq in range(10))


def test_check_exact_false_skips_the_check(step35_path):
    with Llama(step35_path, mtp=True, draft=2, n_ctx=256, threads=1, check_exact=False) as llm:
        assert llm.exactness is None


def test_a_bare_session_gives_the_same_verdict_every_time(step35_path):
    with Model(ModelConfig(step35_path, load_mtp=True)) as model:
        with Session(model, ContextConfig(n_ctx=64, draft_max=1, threads=1)) as session:
            first = check_session(session, [1, 2, 3])
            again = check_session(session, [1, 2, 3])
            assert session.n_past == 0
    verdict = lambda c: (c.verify_rows, c.sequences, c.exact, c.difference, c.seed.accepted)   # noqa: E731
    assert verdict(first) == verdict(again) == (2, 1, True, None, first.seed.accepted)


def test_the_checks_mtp_steps_give_draft_auto_its_start(tmp_path):
    """On the way the check runs two real MTP steps (the heads' drafts): their rows must be
    the plain rows too, and their figures start draft="auto" (StepSeed): the plain steps'
    and the second MTP step's seconds, the drafts accepted, and those of one MTP step on
    each of two other texts. On an oracle whose heads agree
    with the trunk every draft is accepted, with heads that never agree none is; a Llama's
    policy for one sequence starts from those figures (which length they favour depends on
    this machine's timings: see test_draft_policy for the decisions)."""
    import factories as testing
    for acceptance, accepted in ((1.0, 3), (0.0, 0)):
        path = str(testing.write_step35(tmp_path / f"a{acceptance}.gguf", seed=5, oracle=True,
                                        acceptance=acceptance))
        with Llama(path, mtp=True, draft="auto", n_ctx=256, threads=1) as llm:
            seed = llm.exactness.seed
            assert seed.draft == 3 and seed.accepted == (accepted,) * 2 and seed.other_texts == (accepted,) * 2
            assert len(seed.plain_s) == 3 and min(seed.plain_s) > 0 and seed.draft_s > 0
            assert llm.session.n_past == 0 and llm.session.stats()["n_steps"] == 0
            policy = llm._policy.policy(1)
            assert set(policy.costs.points(0)) == {0, 3}       # provisional: the first steady steps replace them
            assert (policy.acceptance.rate(0) > 0.5) == (acceptance > 0.5)
            assert llm.generate(PROMPT, max_tokens=24).tokens == _plain_tokens(path)
        with Llama(path, mtp=True, draft="auto", n_ctx=256, threads=1, check_exact=False) as unchecked:
            assert unchecked.exactness is None       # nothing measured: a cold start
            assert not unchecked._policy.policy(1).costs.points(0)


def _plain_tokens(path):
    with Llama(path, n_ctx=256, threads=1) as plain:
        return plain.generate(PROMPT, max_tokens=24).tokens


def test_the_first_differing_row_is_named():
    top = ((7, -0.5), (9, -1.25))
    plain = [(7, -0.5, top), (3, -0.1, ((3, -0.1), (4, -2.5)))]
    assert _first_difference(plain, list(plain)) is None
    assert _first_difference(plain, [plain[0], (4, -0.2, top)]) == \
        "row 1: token 4 where one-token decoding gives 3"
    assert _first_difference(plain, [(7, -0.5000001, top), plain[1]]) == \
        "row 0: logprob -0.5000001 where one-token decoding gives -0.5"
    assert _first_difference(plain, [(7, -0.5, ((7, -0.5), (9, -1.2500001))), plain[1]]) == \
        "row 0: top-20 logprobs differ (by up to 1e-07)"
    assert _first_difference(plain, plain[:1]) == "1 rows where one-token decoding gives 2"


def test_a_tiny_context_still_fits_the_probe(step35_path):
    with Llama(step35_path, mtp=True, draft=3, n_ctx=8, threads=1) as llm:
        assert llm.exactness.exact


def test_the_error_is_an_mtp_error():
    assert issubclass(InexactVerifyError, MtpError)


def _upstream_rpc_server() -> Path | str:
    """upstream's RPC worker, built here if needed; a str says why it cannot be had."""
    binary = UPSTREAM / "bin" / "ggml-rpc-server"
    if binary.exists():
        return binary
    blocker = build_blocker(needs=ROOT / "scripts" / "build_upstream.sh", hint="to build upstream's rpc-server")
    if blocker is not None:
        return blocker
    build = subprocess.run(["bash", "scripts/build_upstream.sh"], cwd=ROOT, capture_output=True, text=True,
                           timeout=3600, env={**os.environ, "UPSTREAM_BUILD": str(UPSTREAM),
                                              "UPSTREAM_TARGETS": "ggml-rpc-server"})
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    return binary


@pytest.mark.slow
@pytest.mark.skipif(not build_info().get("rpc"), reason="this build has no RPC backend")
def test_upstreams_rpc_worker_is_refused_and_ours_is_not(step35_path, tmp_path):
    binary = _upstream_rpc_server()
    if isinstance(binary, str):
        pytest.skip(binary)
    port = free_port()
    log = open(tmp_path / "upstream-rpc.log", "wb")
    proc = subprocess.Popen([str(binary), "--port", str(port), "--threads", "1"], stdout=log,
                            stderr=subprocess.STDOUT, env={**os.environ, "LD_LIBRARY_PATH": str(binary.parent)})
    try:
        wait_listening(port, proc=proc)
        endpoint = f"127.0.0.1:{port}"
        remote = dict(rpc=[endpoint], n_gpu_layers=99, n_ctx=256, threads=1)
        with pytest.raises(InexactVerifyError) as refused:
            Llama(step35_path, mtp=True, draft=3, **remote)
        message = str(refused.value)
        assert endpoint in message and "verify of 4 rows" in message and "check_exact=False" in message
        server = subprocess.run([sys.executable, "-m", "pyllama_mtp.server.cli", "--model", step35_path, "--mtp",
                                 "--draft", "3", "--rpc", endpoint, "-ngl", "99", "--n-ctx", "256", "--port", "0",
                                 "--threads", "1"], capture_output=True, text=True, timeout=120)
        assert server.returncode == 1 and "is not exact" in server.stderr and "--no-check-exact" in server.stderr
        # the process lives on, and the same worker still serves: plainly, and with MTP when asked to
        with Llama(step35_path, **remote) as plain:
            assert len(plain.generate(PROMPT, max_tokens=8).tokens) == 8
        with Llama(step35_path, mtp=True, draft=3, check_exact=False, **remote) as unchecked:
            assert unchecked.exactness is None
            assert len(unchecked.generate(PROMPT, max_tokens=8).tokens) == 8
    finally:
        proc.kill()
        proc.wait()
        log.close()
    with LocalWorker() as ours:
        with Llama(step35_path, mtp=True, draft=3, rpc=[ours.endpoint], n_gpu_layers=99, n_ctx=256,
                   threads=1) as llm:
            assert llm.exactness.exact


def test_the_bench_runs_the_same_check(step35_path):
    from pyllama_mtp.bench.params import Instance
    from pyllama_mtp.bench.runner import InstanceRunner
    inst = Instance(model=step35_path, threads=1, n_gpu_layers=0, n_batch=512, n_ubatch=512, type_k="f16",
                    type_v="f16", flash_attn=-1)
    for draft_max, verdict in ((2, (3, 1, True, None)), (0, None)):
        runner = InstanceRunner(step35_path, inst, 128, draft_max, seed=0)
        try:
            check = runner.check_exactness()
            assert (check and (check.verify_rows, check.sequences, check.exact, check.difference)) == verdict
        finally:
            runner.close()


def test_the_check_decodes_on_a_thread_of_its_own(step35_path):
    """The CPU backend's OpenMP runtime keeps a pool of workers for each thread that ran a
    decode while that thread lives; with more pool threads than cores they sleep between
    the graph's steps instead of spinning. A server loads on its main thread and decodes
    on another, so the check must leave no decoding behind on the caller's thread."""
    import threading

    class Recording:
        def __init__(self, session):
            self.session, self.threads = session, set()

        def __getattr__(self, name):
            attr = getattr(self.session, name)
            if not callable(attr):
                return attr

            def call(*args, **kwargs):
                self.threads.add(threading.get_ident())
                return attr(*args, **kwargs)
            return call

    with Model(ModelConfig(step35_path, load_mtp=True)) as model:
        with Session(model, ContextConfig(n_ctx=64, draft_max=2, threads=1)) as session:
            recording = Recording(session)
            assert check_session(recording, [1, 2, 3]).exact
    assert recording.threads and threading.get_ident() not in recording.threads


def test_a_failing_check_raises_on_the_callers_thread(step35_path):
    with Model(ModelConfig(step35_path, load_mtp=True)) as model:
        with Session(model, ContextConfig(n_ctx=64, draft_max=2, threads=1)) as session:
            with pytest.raises(InvalidArgumentError):
                check_session(session, [10 ** 9])          # a token id outside the vocabulary
            assert session.n_past == 0
