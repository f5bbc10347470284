"""Bad input gets a typed exception that says what to do, never a dead process.
Risky loads run in a subprocess so that an abort inside llama.cpp would show up as
a failed test instead of killing the test run."""
from __future__ import annotations

import json

import pytest

import factories as testing
from conftest import run_isolated

LOAD_AND_REPORT = """
import json, sys
import pyllama_mtp
from pyllama_mtp import Llama
try:
    Llama({path!r}, **{kwargs!r})
    print(json.dumps({{"error": None}}))
except Exception as e:
    print(json.dumps({{"error": type(e).__name__, "mro": [c.__name__ for c in type(e).__mro__], "msg": str(e)}}))
"""


def load_in_subprocess(path, **kwargs):
    kwargs = {"n_ctx": 64, "threads": 1, **kwargs}
    proc = run_isolated(LOAD_AND_REPORT.format(path=str(path), kwargs=kwargs))
    assert proc.returncode == 0, f"interpreter died (rc {proc.returncode}): {proc.stderr[-2000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("kind, words", [
    ("empty", "empty"),
    ("random-bytes", "not a GGUF"),
    ("truncated", "truncated"),
    ("not-text-arch", "could not load"),
])
def test_broken_files_raise_model_load_error(tmp_path, kind, words):
    path = testing.write_broken(tmp_path / f"{kind}.gguf", kind)
    report = load_in_subprocess(path)
    assert report["error"] == "ModelLoadError"
    assert "OSError" in report["mro"]
    assert words in report["msg"] and str(path) in report["msg"]


def test_missing_path_and_directory(tmp_path):
    missing = load_in_subprocess(tmp_path / "nope.gguf")
    assert missing["error"] == "ModelLoadError" and "no such file" in missing["msg"]
    directory = load_in_subprocess(tmp_path)
    assert directory["error"] == "ModelLoadError" and "directory" in directory["msg"]


def test_mtp_on_model_without_mtp_layers(llama_path):
    report = load_in_subprocess(llama_path, mtp=True)
    assert report["error"] == "MtpError"
    assert "no MTP layers" in report["msg"] and "mtp=False" in report["msg"]


def test_mtp_declared_but_tensors_missing(tmp_path):
    path = testing.write_broken(tmp_path / "declared.gguf", "mtp-declared-missing")
    report = load_in_subprocess(path, mtp=True)
    assert report["error"] == "MtpError"
    assert "declares 3 MTP layers" in report["msg"] and "mtp='mtp-only.gguf'" in report["msg"]


def test_mtp_partial_tensors(tmp_path):
    path = testing.write_broken(tmp_path / "partial.gguf", "mtp-partial")
    report = load_in_subprocess(path, mtp=True)
    assert report["error"] == "MtpError"
    assert "missing" in report["msg"] and "nextn" in report["msg"]


@pytest.mark.parametrize("options, words", [
    (dict(n_ctx=0), "n_ctx"),
    (dict(n_ctx=-5), "n_ctx"),
    (dict(threads=0), "threads"),
    (dict(threads=-1), "threads"),
    (dict(n_batch=0), "n_batch"),
    (dict(type_k="q3"), "type_k"),
    (dict(mtp=True, draft=0), "draft"),
    # the step35 test model's heads are 16 wide: a 32-element quantized block does not fit
    # (llama.cpp refuses the context; this was reported as out of memory)
    (dict(mtp=True, type_k="q8_0", type_v="q8_0"), "does not divide n_embd_head_k=16"),
    (dict(mtp=True, type_v="q4_0"), "does not divide n_embd_head_v=16"),
])
def test_bad_context_options_raise_invalid_argument(llama_path, step35_path, options, words):
    path = step35_path if "mtp" in options else llama_path
    report = load_in_subprocess(path, **options)
    assert report["error"] == "InvalidArgumentError", report
    assert "ValueError" in report["mro"] and words in report["msg"]


def test_unknown_keyword_raises_type_error(llama_path):
    from pyllama_mtp import Llama
    with pytest.raises(TypeError):
        Llama(llama_path, n_ctx=64, not_an_option=1)


def test_draft_above_head_count(step35_path):
    report = load_in_subprocess(step35_path, mtp=True, draft=4)
    assert report["error"] == "InvalidArgumentError"
    assert "draft must be <= 3" in report["msg"]


def test_mtp_only_file_as_main_model(step35_pair):
    _, mtp_only = step35_pair
    report = load_in_subprocess(mtp_only)
    assert report["error"] == "InvalidArgumentError"
    assert "MTP-only" in report["msg"]


def test_mismatched_mtp_file(step35_pair, tmp_path):
    trunk, _ = step35_pair
    _, other_mtp = testing.write_step35_pair(tmp_path / "other", seed=9, n_swa=8, n_embd=96)
    report = load_in_subprocess(trunk, mtp=str(other_mtp))
    assert report["error"] == "MtpError"
    assert "does not match" in report["msg"] and "n_embd" in report["msg"]


class TestCallArguments:
    @pytest.fixture(scope="class")
    def llm(self, llama_path):
        from pyllama_mtp import Llama
        with Llama(llama_path, n_ctx=128, threads=2) as llm:
            yield llm

    @pytest.mark.parametrize("kwargs, words", [
        (dict(max_tokens=-1), "max_tokens"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(temperature=-0.5), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(min_p=2.0), "min_p"),
        (dict(top_k=-3), "top_k"),
        (dict(repeat_penalty=0.0), "repeat_penalty"),
        (dict(seed=-1), "seed"),
        (dict(draft=2), "draft"),
    ])
    def test_invalid_sampling_values(self, llm, kwargs, words):
        from pyllama_mtp import InvalidArgumentError
        with pytest.raises(InvalidArgumentError, match=words):
            llm.generate("hello", **kwargs)

    def test_prompt_longer_than_context(self, llm):
        from pyllama_mtp import ContextFullError
        with pytest.raises(ContextFullError, match="n_ctx"):
            llm.generate("word " * 400)
        # the Llama is still usable afterwards
        assert llm.generate("hello", max_tokens=4).tokens

    def test_bad_token_ids(self, llm):
        from pyllama_mtp import InvalidArgumentError
        with pytest.raises(InvalidArgumentError, match="outside"):
            llm.generate([1, 10**6], max_tokens=2)
        with pytest.raises(InvalidArgumentError):
            llm.detokenize([-4])

    def test_empty_prompt_token_list(self, llm):
        from pyllama_mtp import InvalidArgumentError
        with pytest.raises(InvalidArgumentError, match="empty"):
            llm.generate([], max_tokens=2)


def _quantized_copy(src: str, dst: str) -> str:
    """dst: the same model with its 2-D weights stored as Q8_0 (gguf's own quantizer)."""
    import gguf
    import numpy as np
    from gguf.quants import quantize
    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(dst, str(reader.fields["general.architecture"].contents()))
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        writer.add_key_value(field.name, field.contents(), field.types[0], sub_type=field.types[-1])
    for t in reader.tensors:
        data = np.array(t.data, dtype=np.float32).reshape([int(x) for x in reversed(t.shape)])
        if data.ndim == 2 and data.shape[1] % 32 == 0:
            q = quantize(data, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(t.name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(t.name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def test_q8_0_model_generates_without_crashing(tmp_path):
    """Q8_0 weights used to crash the process on AMX CPUs (vendor/patches/0003)."""
    src = testing.write_llama(tmp_path / "f32.gguf", seed=0, n_embd=128, n_ff=256)
    path = _quantized_copy(str(src), str(tmp_path / "q8.gguf"))
    proc = run_isolated(f"""
        from pyllama_mtp import Llama
        with Llama({path!r}, n_ctx=128, threads=2) as llm:
            print(len(llm.generate("hello", max_tokens=8).tokens))
    """)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("8")
