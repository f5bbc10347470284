"""Shared fixtures: tiny GGUF models written once per test session by the
package's own model factory (no downloads)."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import factories as testing


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def llama_path(models_dir):
    return str(testing.write_llama(models_dir / "llama.gguf", seed=0))


@pytest.fixture(scope="session")
def step35_path(models_dir):
    """Random step35: MoE trunk, window 8, 3 chained MTP heads (low acceptance)."""
    return str(testing.write_step35(models_dir / "step35.gguf", seed=0, n_swa=8))


@pytest.fixture(scope="session")
def step35_pair(models_dir):
    """The same random step35 weights as a trunk-only and an MTP-only file."""
    trunk, mtp = testing.write_step35_pair(models_dir / "pair", seed=3, n_swa=8)
    return str(trunk), str(mtp)


@pytest.fixture(scope="session")
def oracle_path(models_dir):
    return str(testing.write_step35(models_dir / "oracle.gguf", seed=5, oracle=True, acceptance=1.0))


def run_isolated(code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run code in a fresh interpreter: a crash there cannot take the test run down."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout)


def load_script(name: str):
    """scripts/<name>.py as a module (registered in sys.modules: dataclasses look their module
    up there), for tests of the benchmark and simulation scripts."""
    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def first_diff(a, b) -> int:
    """Index of the first token where two outputs differ (for failure messages)."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def fresh_logits(model, tokens):
    """Next-token logits after ``tokens`` in a context that never saw anything else."""
    from pyllama_mtp.config import ContextConfig
    from pyllama_mtp.engine import Session
    with Session(model, ContextConfig(n_ctx=256, threads=2)) as s:
        s.prefill(tokens)
        return s.logits()


def greedy_continuation(model, tokens, n):
    """The target's own greedy next n + 1 tokens after ``tokens``, one decode at a time."""
    import numpy as np
    from pyllama_mtp.config import ContextConfig
    from pyllama_mtp.engine import Session
    with Session(model, ContextConfig(n_ctx=256, threads=2)) as s:
        s.prefill(tokens)
        out = []
        for _ in range(n + 1):
            out.append(int(np.argmax(s.logits())))
            s.prefill([out[-1]])
        return out


def start_server(model_path, *extra, threads: int = 1):
    """The real server on a free 127.0.0.1 port: (process, base URL) once /health answers."""
    import time

    import httpx

    from factories.rpc_local import free_port
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "pyllama_mtp.server.cli", "--model", model_path, "--port", str(port),
                             "--n-ctx", "512", "--threads", str(threads), "--alias", "tiny", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            time.sleep(0.2)
        if proc.poll() is not None:
            raise AssertionError(proc.stdout.read())
    proc.terminate()
    raise AssertionError("server did not start")


def assert_mtp_file_lossless(trunk, mtp, prompt, max_tokens):
    """A trunk with an MTP-only file drafts (some drafts) and gives the plain greedy tokens."""
    from pyllama_mtp import Llama
    out = {}
    for use_mtp in (False, str(mtp)):
        with Llama(str(trunk), mtp=use_mtp, draft=3, n_ctx=256, threads=2) as llm:
            got = llm.generate(prompt, max_tokens=max_tokens)
            out[bool(use_mtp)] = (got.tokens, got.stats.drafted)
    assert out[True][1] > 0 and out[True][0] == out[False][0]
