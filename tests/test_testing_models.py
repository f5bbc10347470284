"""The tiny-model factory (pyllama_mtp.testing), checked in pure Python: file layout
against what the pinned step35 loader requires, determinism, split files, the oracle's
construction, and the size knob. No native library needed."""
from __future__ import annotations

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

import factories as testing  # noqa: E402

N_LAYER, N_MTP = 4, 3


def read(path):
    reader = gguf.GGUFReader(str(path))
    fields = {name: f.contents() for name, f in reader.fields.items() if not name.startswith("GGUF.")}
    tensors = {t.name: t for t in reader.tensors}
    return fields, tensors


def as_f32(tensor) -> np.ndarray:
    """Tensor data in numpy order (ggml ne reversed)."""
    return np.asarray(tensor.data, dtype=np.float32).reshape(tuple(reversed(tensor.shape.tolist())))


def rms_norm(x):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + 1e-5)


@pytest.fixture(scope="module")
def step35(tmp_path_factory):
    return read(testing.write_step35(tmp_path_factory.mktemp("s") / "step35.gguf", seed=0))


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    path = testing.write_step35(tmp_path_factory.mktemp("o") / "oracle.gguf", seed=5, oracle=True, acceptance=0.6)
    return read(path)


# ------------------------------------------------------------------------- vocabulary

def test_vocabulary_layout():
    v = testing.vocabulary()
    assert len(v.tokens) == len(set(v.tokens)) == testing.N_VOCAB
    assert [v.tokens[i] for i in (v.unk, v.bos, v.eos, v.im_start, v.im_end)] == \
        ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    byte_ids = [i for i, t in enumerate(v.types) if t == gguf.TokenType.BYTE]
    assert [v.tokens[i] for i in byte_ids] == [f"<0x{b:02X}>" for b in range(256)]
    assert all(v.types[i] == gguf.TokenType.CONTROL for i in (v.bos, v.eos, v.im_start, v.im_end))


def test_word_pieces_are_reachable_by_spm_merges():
    """Every multi-character piece has its prefix in the vocabulary, so llama.cpp's SPM
    merges can build it from single characters."""
    v = testing.vocabulary()
    pieces = {t for t, ty in zip(v.tokens, v.types) if ty == gguf.TokenType.NORMAL}
    assert len(pieces) > 200
    assert all(p[:-1] in pieces for p in pieces if len(p) > 1)
    assert {"▁", "▁the", "a", "Z", "7"} <= pieces


def test_tokenizer_and_chat_metadata(step35):
    fields, _ = step35
    assert fields["tokenizer.ggml.model"] == "llama"
    assert fields["tokenizer.ggml.add_space_prefix"] is False
    assert len(fields["tokenizer.ggml.tokens"]) == len(fields["tokenizer.ggml.scores"]) == testing.N_VOCAB
    assert "<|im_start|>" in fields["tokenizer.chat_template"] and "add_generation_prompt" in fields["tokenizer.chat_template"]


# ------------------------------------------------------------------------- step35 layout

def test_step35_metadata_counts_trunk_and_mtp_blocks(step35):
    fields, _ = step35
    n_all = N_LAYER + N_MTP
    assert fields["general.architecture"] == "step35"
    assert fields["step35.block_count"] == n_all
    assert fields["step35.nextn_predict_layers"] == N_MTP
    assert fields["step35.attention.sliding_window"] == 8
    # 3 SWA : 1 full in the trunk (full first, like Step-3.5-Flash); MTP blocks full
    assert fields["step35.attention.sliding_window_pattern"] == [False, True, True, True, False, False, False]
    assert fields["step35.attention.head_count"] == [4, 6, 6, 6, 4, 4, 4]
    assert len(fields["step35.attention.head_count_kv"]) == n_all
    assert fields["step35.expert_gating_func"] == 2


def test_step35_tensor_names_and_shapes(step35):
    _, tensors = step35
    shape = {name: t.shape.tolist() for name, t in tensors.items()}   # ggml order: ne0 first
    n, v = 64, testing.N_VOCAB
    assert shape["token_embd.weight"] == shape["output.weight"] == [n, v]
    # leading dense block, then MoE blocks with router bias and shared expert
    assert "blk.0.ffn_gate.weight" in shape and "blk.0.ffn_gate_inp.weight" not in shape
    assert shape["blk.1.ffn_gate_exps.weight"] == [n, 32, 4]
    assert shape["blk.1.ffn_down_exps.weight"] == [32, n, 4]
    assert shape["blk.1.exp_probs_b.bias"] == [4]
    assert shape["blk.1.ffn_up_shexp.weight"] == [n, 32]
    assert shape["blk.1.attn_q.weight"] == [n, 6 * 16] and shape["blk.1.attn_gate.weight"] == [n, 6]
    assert shape["blk.3.attn_q_norm.weight"] == [16]
    for il in range(N_LAYER, N_LAYER + N_MTP):
        assert shape[f"blk.{il}.nextn.eh_proj.weight"] == [2 * n, n]
        assert shape[f"blk.{il}.nextn.shared_head_head.weight"] == [n, v]
        for name in ("enorm", "hnorm", "shared_head_norm"):
            assert shape[f"blk.{il}.nextn.{name}.weight"] == [n]
        assert f"blk.{il}.ffn_gate.weight" in shape and f"blk.{il}.ffn_gate_inp.weight" not in shape
    assert not any(name.startswith(f"blk.{N_LAYER + N_MTP}.") for name in shape)


def test_f16_stores_matrices_in_f16_and_vectors_in_f32(tmp_path):
    _, tensors = read(testing.write_step35(tmp_path / "h.gguf", dtype="f16"))
    assert tensors["blk.1.ffn_up_exps.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    assert tensors["blk.1.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path):
    a = testing.write_step35(tmp_path / "a.gguf", seed=7).read_bytes()
    b = testing.write_step35(tmp_path / "b.gguf", seed=7).read_bytes()
    c = testing.write_step35(tmp_path / "c.gguf", seed=8).read_bytes()
    assert a == b and a != c and len(a) == len(c)


def test_pair_holds_the_full_files_weights(tmp_path):
    _, full = read(testing.write_step35(tmp_path / "full.gguf", seed=3))
    trunk_path, mtp_path = testing.write_step35_pair(tmp_path / "pair", seed=3)
    trunk_fields, trunk = read(trunk_path)
    mtp_fields, mtp = read(mtp_path)
    assert trunk_fields["step35.nextn_predict_layers"] == mtp_fields["step35.nextn_predict_layers"] == N_MTP
    is_mtp = [name.startswith(tuple(f"blk.{i}." for i in range(N_LAYER, N_LAYER + N_MTP))) for name in full]
    assert set(trunk) == {name for name, m in zip(full, is_mtp) if not m}
    # MTP-only: upstream tells it by the missing blk.0.attn_norm; it keeps the shared tensors
    assert "blk.0.attn_norm.weight" not in mtp
    assert set(mtp) == {name for name, m in zip(full, is_mtp) if m} | {"token_embd.weight", "output_norm.weight", "output.weight"}
    for part in (trunk, mtp):
        for name, t in part.items():
            assert np.array_equal(as_f32(t), as_f32(full[name])), name


# ------------------------------------------------------------------------- oracle

@pytest.mark.parametrize("acceptance", [1.0, 0.6, 0.3, 0.0])
def test_oracle_maps(acceptance):
    v = testing.vocabulary()
    trunk_next, head_next = testing.oracle_maps(seed=2, acceptance=acceptance)
    ordinary = v.ordinary
    # one cycle through every ordinary token, specials lead into it
    t, seen = ordinary[0], set()
    while t not in seen:
        seen.add(t)
        t = trunk_next[t]
    assert seen == set(ordinary.tolist())
    assert set(trunk_next[v.special]) <= set(ordinary.tolist())
    agree = np.mean(head_next[ordinary] == trunk_next[ordinary])
    assert abs(agree - acceptance) <= 2 / len(ordinary)
    assert sorted(head_next[ordinary]) == sorted(trunk_next[ordinary])     # still a permutation
    assert np.array_equal(testing.oracle_maps(seed=2)[0], trunk_next)      # trunk ignores acceptance


def test_oracle_output_matrices_encode_the_maps(oracle):
    """The logit layer alone, on a token's normed embedding, picks the mapped token with a
    wide margin: the small layer outputs cannot move the argmax."""
    _, tensors = oracle
    trunk_next, head_next = testing.oracle_maps(seed=5, acceptance=0.6)
    embd = rms_norm(as_f32(tensors["token_embd.weight"]))
    for head_name, expected in [("output.weight", trunk_next), (f"blk.{N_LAYER}.nextn.shared_head_head.weight", head_next)]:
        logits = embd @ as_f32(tensors[head_name]).T
        assert np.array_equal(logits.argmax(axis=1), expected)
        top2 = np.sort(logits, axis=1)[:, -2:]
        assert np.min(top2[:, 1] - top2[:, 0]) > 10.0


def test_oracle_eh_proj_passes_the_token_embedding(oracle):
    _, tensors = oracle
    eh = as_f32(tensors[f"blk.{N_LAYER}.nextn.eh_proj.weight"])     # [n_embd, 2 n_embd]
    n = eh.shape[0]
    assert np.array_equal(eh[:, :n], np.eye(n))
    assert 0 < np.abs(eh[:, n:]).max() < 0.1


def test_special_tokens_never_win_on_random_models(step35):
    _, tensors = step35
    special = testing.vocabulary().special
    embd = rms_norm(as_f32(tensors["token_embd.weight"]))
    logits = embd @ as_f32(tensors["output.weight"]).T
    assert logits[:, special].max() < logits.max(axis=1).min() - 10
    assert len(set(logits.argmax(axis=1).tolist())) > 100   # a random map, not a constant


@pytest.mark.parametrize("target", [64e6, 1.1e9, 2.2e9])
def test_oracle_size_for(target):
    kw = testing.oracle_size_for(target)
    assert kw["dtype"] == "f16"
    assert abs(testing._step35_bytes(**kw) - target) / target < 0.15


# ------------------------------------------------------------------------- broken files and CLI

def test_broken_files(tmp_path):
    assert testing.write_broken(tmp_path / "e.gguf", "empty").stat().st_size == 0
    assert testing.write_broken(tmp_path / "r.gguf", "random-bytes").read_bytes()[:4] != b"GGUF"
    full = testing.write_llama(tmp_path / "l.gguf").stat().st_size
    truncated = testing.write_broken(tmp_path / "t.gguf", "truncated")
    assert truncated.read_bytes()[:4] == b"GGUF" and truncated.stat().st_size < full
    assert read(testing.write_broken(tmp_path / "c.gguf", "not-text-arch"))[0]["general.architecture"] == "clip"

    fields, tensors = read(testing.write_broken(tmp_path / "d.gguf", "mtp-declared-missing"))
    assert fields["step35.nextn_predict_layers"] == 3 and not any(n.startswith(f"blk.{N_LAYER}.") for n in tensors)
    fields, tensors = read(testing.write_broken(tmp_path / "p.gguf", "mtp-partial"))
    assert fields["step35.nextn_predict_layers"] == 3
    assert [n for n in tensors if n.startswith(f"blk.{N_LAYER}.")] == [f"blk.{N_LAYER}.nextn.eh_proj.weight"]
    with pytest.raises(ValueError):
        testing.write_broken(tmp_path / "x.gguf", "nonsense")


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="acceptance"):
        testing.write_step35(tmp_path / "a.gguf", oracle=True, acceptance=1.5)
    with pytest.raises(ValueError, match="split"):
        testing.write_step35(tmp_path / "b.gguf", split="both")
    with pytest.raises(ValueError, match="dtype"):
        testing.write_llama(tmp_path / "c.gguf", dtype="q4")


def test_cli_writes_an_oracle(tmp_path, capsys):
    out = tmp_path / "cli.gguf"
    assert testing.main(["oracle", str(out), "--acceptance", "0.5", "--seed", "4"]) == 0
    assert str(out) in capsys.readouterr().out
    reference = testing.write_step35(tmp_path / "ref.gguf", seed=4, oracle=True, acceptance=0.5)
    assert out.read_bytes() == reference.read_bytes()
