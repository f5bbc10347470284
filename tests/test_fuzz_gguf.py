"""Mutated GGUF files never kill the process that loads them (scripts/fuzz_gguf.py).

The crashers the fuzzer found are kept as tests of their own, each file written the same
way the fuzzer wrote it; they run in a child process, so a regression fails the test
instead of killing the test run.
"""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_isolated

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "fuzz_gguf.py"


@pytest.fixture(scope="module")
def fuzz():
    spec = importlib.util.spec_from_file_location("fuzz_gguf", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module          # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def seeds(fuzz, tmp_path_factory):
    return {name: (g, mtp) for name, g, mtp in fuzz.seeds(tmp_path_factory.mktemp("seeds"))}


def load_in_child(path, mtp: bool) -> str:
    done = run_isolated(f"""
        from pyllama_mtp import Llama, PmtpError
        try:
            with Llama({str(path)!r}, mtp={mtp!r}, n_ctx=64, threads=1) as llm:
                llm.generate("hi", max_tokens=2)
            print("loaded")
        except PmtpError as e:
            print(type(e).__name__, e)
    """)
    assert done.returncode == 0, f"the loading process died ({done.returncode}): {done.stderr[-2000:]}"
    return done.stdout


def write(fuzz, g, path):
    path.write_bytes(fuzz.encode(g))
    return path


def test_a_token_changed_into_another_existing_token(fuzz, seeds, tmp_path):
    """A one-character change in the token list (the report: '▁p' became '▁j') made two
    tokens equal; llama.cpp asserts that every token is unique."""
    import copy
    g = copy.deepcopy(seeds["llama"][0])
    tokens = fuzz._tokens(g).value
    other = next(t for t in tokens if len(t) == 2 and t.startswith("\u2581") and t != "\u2581p")
    tokens[tokens.index("\u2581p")] = other
    out = load_in_child(write(fuzz, g, tmp_path / "dup-token.gguf"), mtp=False)
    assert out.startswith("ModelLoadError") and "check failed" in out


def test_an_expert_count_beyond_every_limit(fuzz, seeds, tmp_path):
    import copy
    g = copy.deepcopy(seeds["step35"][0])
    fuzz._kv(g, "step35.expert_used_count").value = 2**63
    out = load_in_child(write(fuzz, g, tmp_path / "experts.gguf"), mtp=True)
    assert out.startswith("ModelLoadError")


def test_500_mutants_load_or_are_refused_with_a_typed_error(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--files", "500", "--seed", "20261203", "--jobs", "2",
                           "--timeout", "120", "--out", str(tmp_path / "crashes"), "--strict"],
                          capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "'died'" not in done.stdout and "'hung'" not in done.stdout
