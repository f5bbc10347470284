"""``pyllama-mtp quantize``: the trunk gets llama.cpp's mixture for the file type, every
tensor of the MTP blocks gets --mtp-type (Q8_0 by default) and needs no importance data,
the quantized model still decodes losslessly with MTP, and bad input fails with a typed
exception before anything is written."""
from __future__ import annotations

import struct

import gguf
import numpy as np
import pytest

from conftest import assert_mtp_file_lossless
from pyllama_mtp import Llama

import factories as testing
from pyllama_mtp.errors import InvalidArgumentError, ModelLoadError, MtpError
from pyllama_mtp.tools.cli import main
from pyllama_mtp.tools.gguf_header import read_header
from pyllama_mtp.tools.modelfile import open_model
from pyllama_mtp.tools.quantize import quantize

Q = gguf.GGMLQuantizationType
N_EMBD = 256            # k-quants and IQ2 need rows of whole 256-blocks
SOURCE = (Q.F32, Q.F16, Q.BF16)


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return testing.write_step35(tmp_path_factory.mktemp("quantize") / "f32.gguf", seed=11, n_embd=N_EMBD, n_swa=8)


def types_by_group(path) -> dict[str, dict[str, str]]:
    """{"trunk": {name: type}, "mtp": {...}} for the tensors llama.cpp may quantize
    (2-D and 3-D weights other than norms and the expert router)."""
    m = open_model(path)
    groups: dict[str, dict[str, str]] = {"trunk": {}, "mtp": {}}
    for t in m.header.tensors.values():
        quantizable = len(t.shape) >= 2 and not t.name.endswith(("_norm.weight", "ffn_gate_inp.weight"))
        if quantizable and m.group_of(t.name) in groups:
            groups[m.group_of(t.name)][t.name] = t.type.name
    return groups


def greedy_tokens(path, mtp: bool) -> tuple[list[int], int]:
    prompt = [int(t) for t in np.random.default_rng(5).integers(3, 500, size=12)]
    with Llama(str(path), mtp=mtp, draft=3, n_ctx=256, threads=2) as llm:
        got = llm.generate(prompt, max_tokens=64)
        return got.tokens, got.stats.drafted


def test_q4_k_m_keeps_every_mtp_tensor_at_q8_0_and_stays_lossless(src, tmp_path):
    out = tmp_path / "q4_k_m.gguf"
    r = quantize(src, out, "q4_k_m", threads=2)
    groups = types_by_group(out)
    assert len(groups["mtp"]) == 30 and set(groups["mtp"].values()) == {"Q8_0"}, groups["mtp"]
    assert "Q4_K" in set(groups["trunk"].values())
    assert not {"F32", "F16", "Q8_0"} & {groups["trunk"][n] for n in groups["trunk"] if "ffn_down" not in n}
    # the nextn.* tensors are among them, shared head included
    assert groups["mtp"]["blk.6.nextn.shared_head_head.weight"] == "Q8_0"
    assert groups["mtp"]["blk.4.nextn.eh_proj.weight"] == "Q8_0"
    assert r.mtp_types == {"Q8_0": 30, "F32": 21} and r.file_type == "Q4_K_M" and r.mtp_type == "q8_0"
    plain, _ = greedy_tokens(out, mtp=False)
    with_mtp, drafted = greedy_tokens(out, mtp=True)
    assert drafted > 0
    assert with_mtp == plain


def test_q4_0_with_mtp_type_same_lets_llama_cpp_choose(src, tmp_path):
    out = tmp_path / "q4_0.gguf"
    quantize(src, out, "Q4_0", mtp_type="same", threads=2)
    assert set(types_by_group(out)["mtp"].values()) == {"Q4_0"}
    plain, _ = greedy_tokens(out, mtp=False)
    assert greedy_tokens(out, mtp=True)[0] == plain


@pytest.mark.parametrize("mtp_type", ["f16", "bf16"])
def test_mtp_type_f16_and_bf16(src, tmp_path, mtp_type):
    out = tmp_path / f"q4_0-{mtp_type}.gguf"
    quantize(src, out, "Q4_0", mtp_type=mtp_type, threads=2)
    groups = types_by_group(out)
    assert set(groups["mtp"].values()) == {mtp_type.upper()}
    assert set(groups["trunk"].values()) <= {"Q4_0", "Q4_1", "Q5_0", "Q6_K", "Q8_0"}


def test_unquantized_file_type_keeps_mtp_at_that_type(src, tmp_path):
    out = tmp_path / "f16.gguf"
    r = quantize(src, out, "f16", threads=2)
    assert r.mtp_type == "f16"
    assert set(types_by_group(out)["mtp"].values()) == {"F16"}


def imatrix_entries(path) -> dict[str, np.ndarray]:
    """Importance data for every trunk weight llama.cpp quantizes, none for the MTP blocks
    (as llama-imatrix measures it): [n_expert, n_per_row] of positive values."""
    m = open_model(path)
    rng = np.random.default_rng(0)
    return {t.name: rng.uniform(0.5, 2.0, size=(t.shape[2] if len(t.shape) == 3 else 1, t.shape[0])).astype(np.float32)
            for t in m.header.tensors.values()
            if len(t.shape) >= 2 and m.group_of(t.name) != "mtp" and not t.name.endswith("ffn_gate_inp.weight")}


def write_gguf_imatrix(path, entries) -> None:
    w = gguf.GGUFWriter(path, "imatrix")
    for name, sums in entries.items():
        counts = np.full((sums.shape[0], 1), 10.0, dtype=np.float32)
        w.add_tensor(name + ".in_sum2", sums * 10.0)     # sums over 10 tokens: the mean is sums
        w.add_tensor(name + ".counts", counts)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_dat_imatrix(path, entries) -> None:
    with open(path, "wb") as f:
        f.write(struct.pack("<i", len(entries)))
        for name, values in entries.items():
            raw = name.encode()
            f.write(struct.pack("<i", len(raw)) + raw + struct.pack("<ii", 4, values.size))
            f.write((values.reshape(-1) * 4).astype("<f4").tobytes())


@pytest.mark.parametrize("fmt", ["gguf", "dat"])
def test_iq2_xxs_needs_imatrix_entries_for_the_trunk_only(src, tmp_path, fmt):
    imatrix = tmp_path / f"imatrix.{fmt}"
    (write_gguf_imatrix if fmt == "gguf" else write_dat_imatrix)(imatrix, imatrix_entries(src))
    out = tmp_path / "iq2_xxs.gguf"
    quantize(src, out, "IQ2_XXS", imatrix=imatrix, threads=2)
    groups = types_by_group(out)
    assert set(groups["mtp"].values()) == {"Q8_0"}
    assert "IQ2_XXS" in set(groups["trunk"].values())
    with Llama(str(out), mtp=True, draft=2, n_ctx=128, threads=2) as llm:
        assert len(llm.generate([5, 6, 7], max_tokens=8).tokens) == 8


def test_qwen35_mtp_block_kept_at_q8_0_and_lossless(tmp_path):
    src = testing.write_qwen35(tmp_path / "qwen35.gguf", seed=2)
    out = tmp_path / "qwen35-q4_0.gguf"
    r = quantize(src, out, "Q4_0", threads=2)
    assert r.mtp_types == {"Q8_0": 8, "F32": 7}
    assert "Q4_0" in set(types_by_group(out)["trunk"].values())
    plain, _ = greedy_tokens(out, mtp=False)
    with_mtp, drafted = greedy_tokens(out, mtp=True)
    assert drafted > 0 and with_mtp == plain


def test_trunk_only_and_mtp_only_files_quantize_separately(tmp_path):
    trunk, mtp = testing.write_step35_pair(tmp_path / "pair", seed=3, n_embd=N_EMBD)
    qt, qm = tmp_path / "trunk-q4_k_m.gguf", tmp_path / "mtp-q4_k_m.gguf"
    assert quantize(trunk, qt, "Q4_K_M", threads=2).mtp_types == {}
    assert quantize(mtp, qm, "Q4_K_M", threads=2).mtp_types == {"Q8_0": 30, "F32": 21}
    prompt = [int(t) for t in np.random.default_rng(6).integers(3, 500, size=12)]
    assert_mtp_file_lossless(qt, qm, prompt, 64)


# --------------------------------------------------------------------------- bad input

def assert_nothing_written(d, keep=()):
    assert sorted(p.name for p in d.iterdir() if p.name not in keep) == []


def test_iq2_xxs_without_imatrix_fails_and_leaves_nothing(src, tmp_path):
    with pytest.raises(InvalidArgumentError, match="importance matrix.*MTP blocks never need one"):
        quantize(src, tmp_path / "out.gguf", "IQ2_XXS", threads=2)
    assert_nothing_written(tmp_path)


@pytest.mark.parametrize("kind", ["empty", "random-bytes", "truncated"])
def test_broken_input_is_a_model_load_error(tmp_path, kind):
    bad = testing.write_broken(tmp_path / f"{kind}.gguf", kind)
    with pytest.raises(ModelLoadError):
        quantize(bad, tmp_path / "out.gguf", "Q4_0")
    assert_nothing_written(tmp_path, keep=(bad.name,))


def test_not_a_text_model(tmp_path):
    clip = testing.write_broken(tmp_path / "clip.gguf", "not-text-arch")
    with pytest.raises(ModelLoadError, match="not a text model"):
        quantize(clip, tmp_path / "out.gguf", "Q4_0")


def test_unknown_architecture_is_llama_cpp_s_error_not_an_abort(tmp_path):
    src = tmp_path / "foo.gguf"
    w = gguf.GGUFWriter(src, "foo")
    w.add_uint32("foo.block_count", 2)
    w.add_tensor("blk.0.attn_q.weight", np.zeros((32, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelLoadError, match="unknown model architecture: 'foo'"):
        quantize(src, tmp_path / "out.gguf", "Q4_0")
    assert_nothing_written(tmp_path, keep=(src.name,))


def test_partial_mtp_tensors_are_refused(tmp_path):
    src = testing.write_broken(tmp_path / "partial.gguf", "mtp-partial")
    with pytest.raises(MtpError, match="MTP tensors partial"):
        quantize(src, tmp_path / "out.gguf", "Q4_0")


@pytest.mark.parametrize("kwargs, match", [
    (dict(file_type="Q4_9"), "unknown quantization type 'Q4_9'"),
    (dict(file_type="Q4_0", mtp_type="q4_0"), "unknown --mtp-type 'q4_0'"),
    (dict(file_type="F16", mtp_type="q8_0"), "F16 keeps every tensor at F16"),
])
def test_bad_types(src, tmp_path, kwargs, match):
    with pytest.raises(InvalidArgumentError, match=match):
        quantize(src, tmp_path / "out.gguf", **kwargs)
    assert_nothing_written(tmp_path)


def test_existing_output_is_kept_unless_forced(src, tmp_path):
    out = tmp_path / "out.gguf"
    out.write_bytes(b"keep me")
    with pytest.raises(InvalidArgumentError, match="already exists; pass --force"):
        quantize(src, out, "Q4_0")
    assert out.read_bytes() == b"keep me"
    with pytest.raises(InvalidArgumentError, match="is one of the input files"):
        quantize(src, src, "Q4_0", overwrite=True)
    quantize(src, out, "Q8_0", overwrite=True, threads=2)
    assert read_header(out).tensors["blk.0.attn_q.weight"].type == Q.Q8_0


def test_requantizing_is_refused_unless_allowed(src, tmp_path):
    q8 = tmp_path / "q8.gguf"
    quantize(src, q8, "Q8_0", threads=2)
    with pytest.raises(InvalidArgumentError, match="already quantized.*--allow-requantize"):
        quantize(q8, tmp_path / "q4.gguf", "Q4_0")
    quantize(q8, tmp_path / "q4.gguf", "Q4_0", allow_requantize=True, threads=2)
    assert set(types_by_group(tmp_path / "q4.gguf")["mtp"].values()) == {"Q8_0"}


def test_imatrix_of_another_model(src, tmp_path):
    imatrix = tmp_path / "imatrix.dat"
    entries = imatrix_entries(src)
    entries["blk.1.attn_q.weight"] = entries["blk.1.attn_q.weight"][:, :128]
    write_dat_imatrix(imatrix, entries)
    with pytest.raises(InvalidArgumentError, match="not computed for this model"):
        quantize(src, tmp_path / "out.gguf", "IQ2_XXS", imatrix=imatrix, threads=2)
    assert_nothing_written(tmp_path, keep=(imatrix.name,))


def test_bad_imatrix_file(src, tmp_path):
    bad = tmp_path / "imatrix.dat"
    bad.write_bytes(b"\x01\x00")
    with pytest.raises(InvalidArgumentError, match="not an importance matrix"):
        quantize(src, tmp_path / "out.gguf", "Q4_0", imatrix=bad)


def test_native_call_rejects_what_python_would(src, tmp_path):
    """The C ABI checks its own arguments: a caller that skips the Python layer gets a
    status, never an abort."""
    from pyllama_mtp._native import ffi, lib, last_error
    p = ffi.new("pmtp_quantize_params *", lib.pmtp_quantize_default_params())
    out = str(tmp_path / "out.gguf").encode()
    p.ftype = 9999
    assert lib.pmtp_quantize(str(src).encode(), out, p) == 1 and "not a llama_ftype" in last_error()
    p.ftype, p.mtp_type = 2, 2
    assert lib.pmtp_quantize(str(src).encode(), out, p) == 1 and "mtp_type 2" in last_error()
    p.mtp_type = 8
    assert lib.pmtp_quantize(b"/nonexistent.gguf", out, p) == 2 and "no such file" in last_error()
    assert lib.pmtp_quantize(ffi.NULL, out, p) == 1
    assert_nothing_written(tmp_path)


def test_cli(src, tmp_path, capsys):
    out = tmp_path / "q.gguf"
    assert main(["quantize", str(src), str(out), "Q4_K_M", "--mtp-type", "q8_0", "-t", "2"]) == 0
    assert "Q4_K_M; MTP tensors: Q8_0 x30, F32 x21" in capsys.readouterr().out
    assert main(["quantize", str(src), str(out), "Q4_K_M"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("pyllama-mtp: error: ") and "already exists" in err and err.count("\n") == 1
