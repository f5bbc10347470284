"""Mutated GGUF files never kill the process that loads them (scripts/fuzz_gguf.py).

The crashers the fuzzer found are kept as tests of their own, each file written the same
way the fuzzer wrote it; they run in a child process, so a regression fails the test
instead of killing the test run.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import load_script, run_isolated

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "fuzz_gguf.py"


@pytest.fixture(scope="module")
def fuzz():
    return load_script("fuzz_gguf")


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


def to_bf16(g, name: str) -> None:
    """Store one F32 tensor of g as BF16 (a well-formed file: the data is repacked)."""
    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    chunks, offset = [], 0
    for t in g.tensors:
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType(t.type)]
        n_bytes = int(np.prod(t.dims)) // block * size
        raw = g.data[t.offset:t.offset + n_bytes]
        if t.name == name:
            raw = (np.frombuffer(raw, np.float32).view(np.uint32) >> 16).astype(np.uint16).tobytes()
            t.type = int(GGMLQuantizationType.BF16)
        raw += b"\0" * (-len(raw) % g.alignment)
        t.offset = offset
        offset += len(raw)
        chunks.append(raw)
    g.data = b"".join(chunks)


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


def test_a_rope_dimension_count_that_ends_odd_on_some_layers(fuzz, seeds, tmp_path):
    """step35 halves the rope dimensions of its full-attention layers: 2 becomes 1, which the
    rope kernel refused with an assert on a compute thread (patch 0015 checks it when the
    graph is built, which context creation does)."""
    import copy
    g = copy.deepcopy(seeds["step35"][0])
    fuzz._kv(g, "step35.rope.dimension_count").value = 2
    out = load_in_child(write(fuzz, g, tmp_path / "rope.gguf"), mtp=True)
    assert out.startswith("ModelLoadError") and "n_dims" in out


def test_values_that_only_failed_inside_a_kernel_are_refused_before_loading(fuzz, seeds, tmp_path):
    import copy
    cases = {
        "llama.attention.layer_norm_rms_epsilon": -1.0,     # rms_norm asserted eps >= 0 on a compute thread
        "llama.rope.dimension_count": 1000,                 # rope asserted n_dims <= head size
        "tokenizer.ggml.model": "none",                     # the tokenizer asserted it was initialised
    }
    for key, value in cases.items():
        g = copy.deepcopy(seeds["llama"][0])
        fuzz._kv(g, key).value = value
        out = load_in_child(write(fuzz, g, tmp_path / f"{key}.gguf"), mtp=False)
        assert out.startswith("ModelLoadError"), (key, out)
    g = copy.deepcopy(seeds["llama"][0])
    to_bf16(g, next(t.name for t in g.tensors if t.name.endswith("attn_norm.weight")))
    out = load_in_child(write(fuzz, g, tmp_path / "bf16-norm.gguf"), mtp=False)
    assert out.startswith("ModelLoadError") and "must be F32" in out
