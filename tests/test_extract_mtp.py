"""``pyllama-mtp extract-mtp``: from a Step-3.5/3.7 Hugging Face checkpoint, the MTP-only
GGUF that the pinned converter's ``--mtp`` writes (every tensor byte for byte, every
metadata key), read from the shards that hold the MTP blocks alone; it runs next to the
trunk with greedy MTP output equal to plain output; bad input is a typed exception and
leaves no file behind."""
from __future__ import annotations

import json

import numpy as np
import pytest

import pinned_converter
from conftest import assert_mtp_file_lossless
from pyllama_mtp import Llama

import factories as testing
from factories import hf_checkpoint as hf_testing
from pyllama_mtp.errors import InvalidArgumentError, ModelLoadError, MtpError
from pyllama_mtp.tools.cli import main
from pyllama_mtp.tools.extract_mtp import extract_mtp
from pyllama_mtp.tools.gguf_header import read_header

SHARDS = [f"model-{i:05d}-of-00003.safetensors" for i in (1, 2, 3)]
needs_converter = pytest.mark.skipif(pinned_converter.missing() is not None,
                                     reason=str(pinned_converter.missing()))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return hf_testing.write_checkpoint(tmp_path_factory.mktemp("hf") / "step35-tiny", seed=4)


@pytest.fixture(scope="module")
def trunk(tmp_path_factory):
    """A trunk-only step35 GGUF of the same shape (testing's defaults are the checkpoint's),
    for tests that do not run the converter."""
    return testing.write_step35(tmp_path_factory.mktemp("trunk") / "trunk.gguf", seed=4, split="trunk")


def same_files(a, b) -> list[str]:
    """What differs between two GGUFs: metadata (key, type, value) and tensors (name,
    type, shape, bytes); the order of either does not matter."""
    ha, hb = read_header(a), read_header(b)
    diffs = [f"key {k}" for k in sorted(set(ha.fields) | set(hb.fields))
             if (f := ha.fields.get(k)) is None or (g := hb.fields.get(k)) is None
             or (f.type, f.sub_type, f.value) != (g.type, g.sub_type, g.value)]
    ma, mb = (np.memmap(p, dtype=np.uint8, mode="r") for p in (a, b))
    for name in sorted(set(ha.tensors) | set(hb.tensors)):
        s, t = ha.tensors.get(name), hb.tensors.get(name)
        if s is None or t is None or (s.type, s.shape) != (t.type, t.shape) \
                or not np.array_equal(ma[s.offset:s.offset + s.n_bytes], mb[t.offset:t.offset + t.n_bytes]):
            diffs.append(f"tensor {name}")
    return diffs


@needs_converter
@pytest.mark.parametrize("arch, out_type", [("Step3p5ForCausalLM", "bf16"), ("Step3p5ForCausalLM", "q8_0"),
                                            ("Step3p7ForConditionalGeneration", "f16")])
def test_same_file_as_the_pinned_converter(tmp_path, arch, out_type):
    src = hf_testing.write_checkpoint(tmp_path / "ckpt", arch=arch, seed=2)
    theirs = pinned_converter.convert(src, tmp_path / "theirs-mtp.gguf", outtype=out_type, split="mtp")
    their_trunk = pinned_converter.convert(src, tmp_path / "trunk.gguf", outtype=out_type, split="trunk")
    r = extract_mtp(src, tmp_path / "ours-mtp.gguf", trunk=their_trunk, out_type=out_type)
    assert r.n_tensors == len(read_header(theirs).tensors) == 3 + 3 * 17
    assert same_files(theirs, r.path) == []


@needs_converter
def test_trunk_plus_extracted_mtp_equals_the_converted_full_file(tmp_path, ckpt):
    full = pinned_converter.convert(ckpt, tmp_path / "full.gguf", outtype="bf16")
    trunk = pinned_converter.convert(ckpt, tmp_path / "trunk.gguf", outtype="bf16", split="trunk")
    mtp = extract_mtp(ckpt, tmp_path / "mtp.gguf", trunk=trunk).path
    prompt = [int(t) for t in np.random.default_rng(1).integers(3, 500, size=10)]
    runs = {}
    for label, path, use_mtp in (("plain", trunk, False), ("pair", trunk, mtp), ("full", full, True)):
        with Llama(str(path), mtp=use_mtp, draft=3, n_ctx=256, threads=2) as llm:
            got = llm.generate(prompt, max_tokens=48)
            runs[label] = (got.tokens, got.stats.drafted, got.stats.accepted)
    assert runs["pair"][0] == runs["plain"][0]          # lossless
    assert runs["pair"] == runs["full"]                 # the same drafts as the converter's MTP blocks
    assert runs["pair"][1] > 0


def test_reads_only_the_shards_with_mtp_blocks(tmp_path, ckpt, trunk):
    src = tmp_path / "ckpt"
    src.mkdir()
    for f in ckpt.iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    (src / SHARDS[0]).write_bytes(b"\xff" * 64)         # the trunk shard is never opened
    r = extract_mtp(src, tmp_path / "mtp.gguf", trunk=trunk)
    assert r.shards_read == SHARDS[1:]
    assert r.n_mtp_layers == 3 and r.n_tensors == 54
    h = read_header(r.path)
    assert h.get("general.architecture") == "step35" and h.get("step35.nextn_predict_layers") == 3
    assert h.get("step35.block_count") == 7 and h.get("tokenizer.ggml.tokens") == read_header(trunk).get(
        "tokenizer.ggml.tokens")
    names = set(h.tensors)
    assert {"token_embd.weight", "output_norm.weight", "output.weight"} <= names
    assert not any(n.startswith(("blk.0.", "blk.3.")) for n in names)
    assert "blk.6.nextn.shared_head_head.weight" in names and "blk.4.attn_gate.weight" in names


def test_norms_are_shifted_and_f32(tmp_path, ckpt, trunk):
    """The checkpoint stores zero-centred RMSNorm weights; the GGUF holds 1 + w as F32."""
    r = extract_mtp(ckpt, tmp_path / "mtp.gguf", trunk=trunk, out_type="q8_0")
    h = read_header(r.path)
    raw = hf_testing.checkpoint_tensors(hf_testing.Shape(), seed=4)
    t = h.tensors["blk.5.nextn.enorm.weight"]
    stored = np.memmap(r.path, dtype=np.float32, mode="r", offset=t.offset, shape=t.shape)
    bf16 = (hf_testing._to_bf16(raw["model.layers.5.enorm.weight"]).astype(np.uint32) << 16).view(np.float32)
    np.testing.assert_array_equal(stored, bf16 + np.float32(1))
    assert h.tensors["blk.5.attn_q.weight"].type.name == "Q8_0"
    assert h.tensors["blk.5.attn_q_norm.weight"].type.name == "F32"


def test_extracted_mtp_runs_next_to_a_trunk_losslessly(tmp_path, ckpt, trunk):
    mtp = extract_mtp(ckpt, tmp_path / "mtp.gguf", trunk=trunk).path
    prompt = [int(t) for t in np.random.default_rng(2).integers(3, 500, size=10)]
    assert_mtp_file_lossless(trunk, mtp, prompt, 48)


def test_cli(tmp_path, ckpt, trunk, capsys):
    out = tmp_path / "mtp.gguf"
    assert main(["extract-mtp", str(ckpt), "-o", str(out), "--trunk", str(trunk), "--type", "f16"]) == 0
    assert "54 tensors, 3 MTP layers, from 2 shard(s)" in capsys.readouterr().out
    assert main(["extract-mtp", str(ckpt), "-o", str(out), "--trunk", str(trunk)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("pyllama-mtp: error: ") and "already exists" in err and err.count("\n") == 1


# --------------------------------------------------------------------------- bad input

def edited_checkpoint(tmp_path, ckpt, config=None, drop=(), shard_bytes=None):
    """A copy of ckpt with config.json keys changed, tensors dropped from the index and
    the last shard replaced."""
    src = tmp_path / "edited"
    src.mkdir()
    for f in ckpt.iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, **(config or {})}))
    index = json.loads((src / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if k not in drop}
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    if shard_bytes is not None:
        (src / SHARDS[2]).write_bytes(shard_bytes(src / SHARDS[2]))
    return src


@pytest.mark.parametrize("case, error, match", [
    ("arch", NotImplementedError, "not supported by extract-mtp"),
    ("renamed-keys", ModelLoadError, "no integer 'num_attention_groups'"),
    ("odd-values", ModelLoadError, "config.json: unexpected value"),
    ("no-mtp", MtpError, "no MTP layers"),
    ("missing-mtp-tensor", MtpError, "lacks blk.5.nextn.eh_proj.weight"),
    ("truncated-shard", ModelLoadError, "the download did not finish"),
    ("fp8", NotImplementedError, "only unquantized checkpoints"),
])
def test_bad_checkpoints(tmp_path, ckpt, trunk, case, error, match):
    def fp8(path):       # the shard's header says F8_E4M3 for every tensor
        data = path.read_bytes()
        n = int.from_bytes(data[:8], "little")
        return data[:8] + data[8:8 + n].replace(b'"BF16"', b'"F8E4"') + data[8 + n:]
    kwargs = {"arch": dict(config={"architectures": ["LlamaForCausalLM"]}),
              "renamed-keys": dict(config={"num_attention_groups": None, "num_key_value_heads": 2}),
              "odd-values": dict(config={"attention_other_setting": "sliding"}),
              "no-mtp": dict(config={"num_nextn_predict_layers": 0}),
              "missing-mtp-tensor": dict(drop={"model.layers.5.eh_proj.weight"}),
              "truncated-shard": dict(shard_bytes=lambda p: p.read_bytes()[:4096]),
              "fp8": dict(shard_bytes=fp8)}[case]
    src = edited_checkpoint(tmp_path, ckpt, **kwargs)
    with pytest.raises(error, match=match):
        extract_mtp(src, tmp_path / "mtp.gguf", trunk=trunk)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith((".gguf", ".partial"))]


def test_bad_paths_and_options(tmp_path, ckpt, trunk):
    with pytest.raises(InvalidArgumentError, match="not a directory"):
        extract_mtp(tmp_path / "nope", tmp_path / "mtp.gguf", trunk=trunk)
    with pytest.raises(ModelLoadError, match="config.json: missing"):
        extract_mtp(tmp_path, tmp_path / "mtp.gguf", trunk=trunk)
    with pytest.raises(MtpError, match="unknown --type 'q4_0'"):
        extract_mtp(ckpt, tmp_path / "mtp.gguf", trunk=trunk, out_type="q4_0")
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        extract_mtp(ckpt, tmp_path / "mtp.gguf", trunk=ckpt / "config.json")
    wide = testing.write_step35(tmp_path / "wide.gguf", n_embd=128, split="trunk")
    with pytest.raises(MtpError, match="n_embd 128 but the checkpoint's hidden_size is 64"):
        extract_mtp(ckpt, tmp_path / "mtp.gguf", trunk=wide)
    existing = tmp_path / "exists.gguf"
    existing.write_bytes(b"keep")
    with pytest.raises(InvalidArgumentError, match="already exists"):
        extract_mtp(ckpt, existing, trunk=trunk)
    assert existing.read_bytes() == b"keep"
