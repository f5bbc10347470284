"""The pyllama-mtp console tool: ``inspect`` reports what a GGUF holds and warns about
what will go wrong, from the header alone; ``graft`` joins a trunk-only and an MTP-only
file into one file the runtime loads with mtp=True, byte for byte and lossless, and
refuses files that do not belong together without leaving anything behind."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import gguf
import numpy as np
import pytest

from pyllama_mtp import Llama

import factories as testing
from pyllama_mtp.tools.cli import main

SEED = 3
N_GEN = 96


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """The same random step35 weights as one full file and as a trunk-only + MTP-only pair."""
    d = tmp_path_factory.mktemp("tools")
    trunk, mtp = testing.write_step35_pair(d / "pair", seed=SEED, n_swa=8)
    full = testing.write_step35(d / "full.gguf", seed=SEED, n_swa=8)
    return {"full": full, "trunk": trunk, "mtp": mtp}


def inspect_json(capsys, path) -> dict:
    assert main(["inspect", "--json", str(path)]) == 0
    return json.loads(capsys.readouterr().out)


def run_error(capsys, argv) -> str:
    """Run the CLI expecting failure: exit 1, nothing on stdout, one line on stderr."""
    assert main([str(a) for a in argv]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("pyllama-mtp: error: "), err
    return err


def requantize_mtp(src: Path, dst: Path, qtype: gguf.GGMLQuantizationType) -> Path:
    """A copy of the MTP-only file src with the 2-D tensors of its MTP blocks quantized."""
    r = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(dst, r.fields["general.architecture"].contents())
    for f in r.fields.values():
        if not f.name.startswith("GGUF.") and f.name != "general.architecture":
            sub_type = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
            w.add_key_value(f.name, f.contents(), f.types[0], sub_type=sub_type)
    for t in r.tensors:
        data = np.array(t.data)
        if t.name.startswith("blk.") and data.ndim == 2:
            w.add_tensor(t.name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(t.name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def greedy(path, prompt, **kwargs) -> tuple[list[int], int]:
    with Llama(str(path), n_ctx=512, threads=2, **kwargs) as llm:
        got = llm.generate(prompt, max_tokens=N_GEN)
        return got.tokens, got.stats.drafted


PROMPT = [int(t) for t in np.random.default_rng(7).integers(3, 500, size=9)]


# --------------------------------------------------------------------------- inspect

def test_inspect_full_file_matches_gguf_reader(capsys, files):
    r = inspect_json(capsys, files["full"])
    ref = gguf.GGUFReader(files["full"])
    assert r["arch"] == "step35" and r["name"] == "pyllama-mtp tiny step35"
    assert r["file_size"] == files["full"].stat().st_size
    assert r["n_params"] == sum(t.n_elements for t in ref.tensors)
    assert r["layers"] == {"block_count": 7, "trunk": 4, "mtp": 3}
    assert (r["n_embd"], r["n_vocab"], r["context_length"]) == (64, 512, 4096)
    assert r["mtp"] == {"status": "all", "missing": [], "n_missing": 0, "types": {"F32": 51}}
    assert r["sliding_window"] == {"window": 8, "pattern": [False, True, True, True, False, False, False]}
    assert r["chat_template"]["present"] and r["chat_template"]["first_line"].startswith("{% for message in messages")
    assert r["special_tokens"] == {"bos": {"id": 1, "text": "<s>"}, "eos": {"id": 2, "text": "</s>"}}
    groups = r["tensor_groups"]
    assert [g["tensors"] for g in groups.values()] == [63, 51, 3]      # trunk, MTP blocks, embeddings+output
    assert sum(g["bytes"] for g in groups.values()) == sum(t.n_bytes for t in ref.tensors)
    assert groups["mtp"]["types"]["F32"]["count"] == 51
    assert r["warnings"] == []


def test_inspect_trunk_only_file_says_where_the_mtp_layers_are(capsys, files):
    r = inspect_json(capsys, files["trunk"])
    assert r["mtp"]["status"] == "none" and r["tensor_groups"]["mtp"]["tensors"] == 0
    assert r["layers"] == {"block_count": 7, "trunk": 4, "mtp": 3}
    [warning] = r["warnings"]
    assert "declares 3 MTP layers but has none" in warning and "mtp='mtp-only.gguf'" in warning


def test_inspect_mtp_only_file(capsys, files):
    r = inspect_json(capsys, files["mtp"])
    assert r["mtp"]["status"] == "all" and r["tensor_groups"]["trunk"]["tensors"] == 0
    [warning] = r["warnings"]
    assert warning.startswith("MTP-only file") and "mtp='mtp.gguf'" in warning


@pytest.mark.parametrize("kind, status, warning", [
    ("mtp-declared-missing", "none", "declares 3 MTP layers but has none"),
    ("mtp-partial", "partial", "MTP tensors partial: 8 of the 9 required MTP tensors are missing"),
    ("not-text-arch", "none", "no clip.block_count: not a text model"),
])
def test_inspect_broken_but_readable_files(capsys, tmp_path, kind, status, warning):
    r = inspect_json(capsys, testing.write_broken(tmp_path / f"{kind}.gguf", kind))
    assert r["mtp"]["status"] == status
    assert [w for w in r["warnings"] if w.startswith(warning)], r["warnings"]
    if kind == "mtp-partial":
        assert r["mtp"]["missing"][:2] == ["blk.4.nextn.enorm.weight", "blk.4.nextn.hnorm.weight"]
        assert r["mtp"]["n_missing"] == 8


def test_inspect_text_report(capsys, files):
    assert main(["inspect", str(files["trunk"])]) == 0
    out = capsys.readouterr().out
    assert out.startswith(str(files["trunk"]) + "\n")
    for line in ("layers          4 trunk + 3 MTP (block_count 7)", "sliding window  8 tokens; layers FSSSFFF",
                 "special tokens  bos 1 '<s>', eos 2 '</s>'", "MTP tensors     none (trunk-only file)",
                 "warnings\n  ! declares 3 MTP layers"):
        assert line in out, out


@pytest.mark.parametrize("qtype, flagged", [(gguf.GGMLQuantizationType.Q5_0, True),
                                            (gguf.GGMLQuantizationType.Q8_0, False)], ids=["Q5_0", "Q8_0"])
def test_inspect_flags_mtp_tensors_below_q8_0(capsys, tmp_path, files, qtype, flagged):
    path = requantize_mtp(files["mtp"], tmp_path / f"mtp-{qtype.name}.gguf", qtype)
    r = inspect_json(capsys, path)
    assert r["mtp"]["types"] == {qtype.name: 30, "F32": 21}
    low = [w for w in r["warnings"] if w.startswith("MTP tensors below Q8_0")]
    assert bool(low) == flagged
    if flagged:
        assert "30 of 51 MTP tensors are Q5_0" in low[0] and "blk\\.(4|5|6)\\.=q8_0" in low[0]


@pytest.mark.parametrize("kind, words", [
    ("missing", "no such file"),
    ("directory", "is a directory"),
    ("empty", "file is empty"),
    ("random-bytes", "not a GGUF file"),
    ("truncated", "truncated: tensor"),
])
def test_inspect_bad_input_is_one_line_and_exit_1(capsys, tmp_path, kind, words):
    path = {"missing": tmp_path / "nope.gguf", "directory": tmp_path}.get(kind)
    path = path or testing.write_broken(tmp_path / f"{kind}.gguf", kind)
    err = run_error(capsys, ["inspect", path])
    assert str(path) in err and words in err


def test_inspect_reads_only_the_header_of_a_huge_file(capsys, tmp_path):
    """A sparse file claiming 16 GiB of tensor data: reading any of it would take far longer."""
    path = tmp_path / "huge.gguf"
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(1)
    w.add_tensor_info("token_embd.weight", (1 << 18, 1 << 14), np.dtype(np.float32), 1 << 34)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    os.truncate(path, 64 * 1024 + (1 << 34))
    start = time.perf_counter()
    r = inspect_json(capsys, path)
    assert time.perf_counter() - start < 5
    assert r["n_params"] == 1 << 32 and r["tensor_groups"]["embeddings+output"]["bytes"] == 1 << 34


def test_module_entry_point_runs_as_a_subprocess(files, tmp_path):
    cli = [sys.executable, "-m", "pyllama_mtp.tools.cli", "inspect"]
    ok = subprocess.run(cli + ["--json", str(files["full"])], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["mtp"]["status"] == "all"
    bad = subprocess.run(cli + [str(testing.write_broken(tmp_path / "r.gguf", "random-bytes"))],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and bad.stdout == ""
    assert bad.stderr.startswith("pyllama-mtp: error: ") and "Traceback" not in bad.stderr


# --------------------------------------------------------------------------- graft

@pytest.fixture(scope="module")
def grafted(files, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("graft") / "full.gguf"
    assert main(["graft", str(files["trunk"]), str(files["mtp"]), "-o", str(out)]) == 0
    return out


def test_graft_rebuilds_the_full_file_byte_for_byte(files, grafted):
    got, want = gguf.GGUFReader(grafted), gguf.GGUFReader(files["full"])
    assert [(t.name, t.tensor_type, t.shape.tolist()) for t in got.tensors] == \
           [(t.name, t.tensor_type, t.shape.tolist()) for t in want.tensors]
    for a, b in zip(got.tensors, want.tensors):
        assert a.data.tobytes() == b.data.tobytes(), a.name
    assert {k: f.contents() for k, f in got.fields.items()} == {k: f.contents() for k, f in want.fields.items()}
    assert grafted.read_bytes() == files["full"].read_bytes()


def test_grafted_file_is_lossless_with_the_runtime(files, grafted):
    plain, _ = greedy(files["trunk"], PROMPT)
    pair, pair_drafted = greedy(files["trunk"], PROMPT, mtp=str(files["mtp"]), draft=3)
    one, one_drafted = greedy(grafted, PROMPT, mtp=True, draft=3)
    assert len(plain) == N_GEN
    assert one == pair == plain
    assert one_drafted == pair_drafted > 0


def test_graft_copies_quantized_mtp_tensors_as_is(capsys, tmp_path, files):
    """Q5_0: the CPU backend's AMX kernels (Q4_0, Q8_0, ...) crash on this tiny model on AMX
    machines (upstream llama.cpp issue 20824), and the runtime check below needs a run."""
    q5 = requantize_mtp(files["mtp"], tmp_path / "mtp-q5.gguf", gguf.GGMLQuantizationType.Q5_0)
    out = tmp_path / "full-q5.gguf"
    assert main(["graft", str(files["trunk"]), str(q5), "-o", str(out)]) == 0
    capsys.readouterr()
    got = {t.name: t for t in gguf.GGUFReader(out).tensors}
    for t in gguf.GGUFReader(q5).tensors:
        if t.name.startswith("blk."):
            assert got[t.name].tensor_type == t.tensor_type and got[t.name].data.tobytes() == t.data.tobytes()
    assert inspect_json(capsys, out)["mtp"]["types"] == {"Q5_0": 30, "F32": 21}
    plain, _ = greedy(files["trunk"], PROMPT)
    assert greedy(out, PROMPT, mtp=True, draft=3)[0] == plain


@pytest.mark.parametrize("trunk, mtp, words", [
    ("trunk", "mtp96", "n_embd (step35.embedding_length) differs: {trunk} has 64, {mtp} has 96"),
    ("trunk", "trunk", "{mtp}: has no MTP tensors"),
    ("mtp", "trunk", "{trunk}: is an MTP-only file, not a trunk"),
    ("full", "mtp", "{trunk}: already has all its MTP tensors"),
    ("trunk", "partial", "{mtp}: MTP tensors partial"),
    ("llama", "mtp", "{trunk}: declares no MTP layers"),
])
def test_graft_refuses_files_that_do_not_fit(capsys, tmp_path, files, trunk, mtp, words):
    extra = {"mtp96": testing.write_step35_pair(tmp_path / "p96", seed=SEED, n_embd=96)[1],
             "partial": testing.write_broken(tmp_path / "partial.gguf", "mtp-partial"),
             "llama": testing.write_llama(tmp_path / "llama.gguf")}
    paths = {**files, **extra}
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    err = run_error(capsys, ["graft", paths[trunk], paths[mtp], "-o", out_dir / "full.gguf"])
    assert words.format(trunk=paths[trunk], mtp=paths[mtp]) in err
    assert list(out_dir.iterdir()) == []


def test_graft_keeps_an_existing_output_unless_forced(capsys, tmp_path, files):
    out = tmp_path / "full.gguf"
    out.write_bytes(b"keep me")
    argv = ["graft", files["trunk"], files["mtp"], "-o", out]
    assert "already exists; pass --force" in run_error(capsys, argv)
    assert out.read_bytes() == b"keep me"
    assert main([str(a) for a in argv] + ["--force"]) == 0
    assert out.read_bytes() == files["full"].read_bytes()


def test_graft_failing_midway_leaves_nothing(capsys, tmp_path, files, monkeypatch):
    calls = []

    def write_some_then_fail(self, tensor, tensor_endianess=None):
        calls.append(tensor.nbytes)
        if len(calls) == 10:
            raise OSError(28, "No space left on device")
        return real(self, tensor, tensor_endianess)

    real = gguf.GGUFWriter.write_tensor_data
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", write_some_then_fail)
    err = run_error(capsys, ["graft", files["trunk"], files["mtp"], "-o", tmp_path / "full.gguf"])
    assert "No space left on device" in err
    assert list(tmp_path.iterdir()) == []
