"""Qwen3.5-style hybrid models (qwen35, qwen35moe): gated delta net layers with recurrent
state, a gated full-attention layer every 4th block, and ONE MTP block that drafts
autoregressively. Greedy output with MTP equals plain greedy output token for token; the
recurrent state rolls back exactly after every accept/reject pattern; rollbacks the state
snapshots cannot serve are refused instead of corrupting the state."""
from __future__ import annotations

import numpy as np
import pytest

from pyllama_mtp import Llama

import factories as testing
from pyllama_mtp.config import ContextConfig, ModelConfig
from pyllama_mtp.engine import Model, Session

from conftest import first_diff, fresh_logits, greedy_continuation
from pyllama_mtp.errors import InvalidArgumentError

N_GEN = 320
N_LAYER = 4


@pytest.fixture(scope="session")
def qwen35_path(models_dir):
    """Random qwen35: 3 gated delta net layers + 1 full-attention layer, one MTP block
    that shares output.weight (low acceptance: nearly every step rolls the state back)."""
    return str(testing.write_qwen35(models_dir / "qwen35.gguf", seed=0))


@pytest.fixture(scope="session")
def qwen35moe_path(models_dir):
    return str(testing.write_qwen35(models_dir / "qwen35moe.gguf", seed=1, moe=True))


@pytest.fixture(scope="session")
def qwen35_oracle_path(models_dir):
    return str(testing.write_qwen35(models_dir / "qwen35-oracle.gguf", seed=5, oracle=True, acceptance=1.0))


@pytest.fixture(scope="session")
def qwen35_oracle_partial_path(models_dir):
    """Oracle whose head agrees with the trunk on 60% of tokens: every accept/reject
    pattern occurs during generation."""
    return str(testing.write_qwen35(models_dir / "qwen35-oracle-60.gguf", seed=6, oracle=True, acceptance=0.6))


@pytest.fixture(scope="session")
def qwen35_pair(models_dir):
    d = models_dir / "qwen35-pair"
    return (str(testing.write_qwen35(d / "trunk.gguf", seed=2, split="trunk")),
            str(testing.write_qwen35(d / "mtp.gguf", seed=2, split="mtp")))


ARCHS = {"qwen35": "qwen35_path", "qwen35moe": "qwen35moe_path"}


@pytest.fixture(scope="module", params=sorted(ARCHS))
def llms(request):
    """(plain, mtp) Llama pair on one model, per architecture."""
    path = request.getfixturevalue(ARCHS[request.param])
    with Llama(path, n_ctx=1024, threads=2) as plain, Llama(path, n_ctx=1024, threads=2, mtp=True, draft=3) as mtp:
        yield request.param, plain, mtp


def prompt_of(n):
    """A deterministic prompt of exactly n ordinary tokens."""
    rng = np.random.default_rng(n)
    return [int(t) for t in rng.integers(3, testing.N_VOCAB - 8, size=n)]


# ------------------------------------------------------------------------- the model itself

def test_loads_as_a_hybrid_model_with_one_mtp_layer(llms):
    arch, plain, mtp = llms
    info = mtp.info
    assert info.arch == arch
    assert (info.n_layer, info.n_layer_mtp) == (N_LAYER, 1)
    assert info.is_recurrent and info.has_mtp_tensors and info.has_trunk_tensors and info.mtp_loaded
    assert not plain.info.mtp_loaded


def test_greedy_output_is_varied_and_context_dependent(llms):
    _, plain, _ = llms
    out = plain.generate(prompt_of(3), max_tokens=200).tokens
    assert len(out) == 200
    assert len(set(out)) > 80                      # no short loop
    # same last token, different history: the recurrent and attention state both matter
    a = plain.generate([10, 20, 30, 40], max_tokens=16).tokens
    b = plain.generate([99, 98, 97, 40], max_tokens=16).tokens
    assert a != b


# ------------------------------------------------------------------------- lossless MTP

@pytest.mark.parametrize("prompt_len", [1, 4, 25])
def test_greedy_mtp_equals_plain(llms, prompt_len):
    arch, plain, mtp = llms
    prompt = prompt_of(prompt_len)
    expected = plain.generate(prompt, max_tokens=N_GEN).tokens
    assert len(expected) == N_GEN
    for draft in (1, 2, 3):
        got = mtp.generate(prompt, max_tokens=N_GEN, draft=draft)
        assert got.tokens == expected, f"{arch} draft={draft} diverged at {first_diff(got.tokens, expected)}"
        assert got.stats.drafted > 0


@pytest.mark.parametrize("unsafe_split_verify", [False, True])
def test_n_ubatch_is_raised_past_the_snapshot_tail(qwen35_path, unsafe_split_verify):
    """Upstream's split_equal aborts unless n_ubatch > n_rs_seq + 1 (= draft + 1) on a
    model with recurrent state, for every decode: the session raises n_ubatch to draft + 2."""
    with Llama(qwen35_path, n_ctx=256, threads=2, mtp=True, draft=3, n_ubatch=1, n_batch=1,
               unsafe_split_verify=unsafe_split_verify) as llm:
        assert llm.session.n_ubatch == 5
        assert len(llm.generate(prompt_of(12), max_tokens=20).tokens) == 20


def test_greedy_mtp_equals_plain_with_small_ubatches(qwen35_path):
    """A 25-token prompt prefilled in 5-token decodes; verify batches nearly fill a ubatch."""
    prompt = prompt_of(25)
    with Llama(qwen35_path, n_ctx=1024, threads=2) as plain:
        expected = plain.generate(prompt, max_tokens=N_GEN).tokens
    with Llama(qwen35_path, n_ctx=1024, threads=2, mtp=True, draft=3, n_batch=1, n_ubatch=1) as llm:
        assert llm.session.n_ubatch == 5
        assert llm.generate(prompt, max_tokens=N_GEN).tokens == expected


def test_single_head_drafts_further_than_three(qwen35_path):
    """One head drafts any number of steps (the state keeps draft + 1 snapshots)."""
    prompt = prompt_of(7)
    with Llama(qwen35_path, n_ctx=1024, threads=2) as plain:
        expected = plain.generate(prompt, max_tokens=200).tokens
    with Llama(qwen35_path, n_ctx=1024, threads=2, mtp=True, draft=6) as llm:
        got = llm.generate(prompt, max_tokens=200, draft=6)
    assert got.tokens == expected
    assert got.stats.drafted > 6 * 100


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_drafts_do_not_depend_on_how_the_head_caught_up(request, arch):
    """The head's first draft of a cycle shares its decode with the rows it catches up on,
    and its hidden output feeds the next draft step; a second draft from the same pending
    token runs the draft rows alone. Both must give the same drafts and logits."""
    path = request.getfixturevalue(ARCHS[arch])
    with Model(ModelConfig(path, load_mtp=True)) as model, \
            Session(model, ContextConfig(n_ctx=256, threads=2, draft_max=3), mtp_model=model) as s:
        s.prefill([int(t) for t in np.random.default_rng(3).integers(3, 200, size=13)])
        s.sample()
        first = s.draft(3), s.head_logits(0)
        again = s.draft(3), s.head_logits(0)
    assert first[0] == again[0]
    np.testing.assert_allclose(first[1], again[1], atol=1e-5)


def test_trunk_only_plus_mtp_only_pair_is_lossless(qwen35_pair):
    """The pair as conversion/qwen.py writes it (--no-mtp trunk declares no MTP layer,
    --mtp file holds the MTP block and the shared embeddings/head)."""
    trunk, mtp_only = qwen35_pair
    prompt = prompt_of(11)
    with Llama(trunk, n_ctx=1024, threads=2) as plain:
        expected = plain.generate(prompt, max_tokens=200).tokens
    with Llama(trunk, n_ctx=1024, threads=2, mtp=mtp_only, draft=3) as llm:
        for draft in (1, 3):
            got = llm.generate(prompt, max_tokens=200, draft=draft)
            assert got.tokens == expected
            assert got.stats.drafted > 0


def test_f16_file_keeps_the_conv_kernel_f32_and_is_lossless(tmp_path):
    """ggml_ssm_conv needs an F32 kernel: the factory keeps ssm_conv1d F32 like the converters."""
    gguf = pytest.importorskip("gguf")
    path = testing.write_qwen35(tmp_path / "qwen35-f16.gguf", seed=3, dtype="f16")
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(str(path)).tensors}
    assert types["blk.0.ssm_conv1d.weight"] == gguf.GGMLQuantizationType.F32
    assert types["blk.0.attn_qkv.weight"] == gguf.GGMLQuantizationType.F16
    prompt = prompt_of(5)
    with Llama(str(path), n_ctx=512, threads=2) as plain:
        expected = plain.generate(prompt, max_tokens=120).tokens
    with Llama(str(path), n_ctx=512, threads=2, mtp=True, draft=3) as llm:
        assert llm.generate(prompt, max_tokens=120).tokens == expected


def test_file_layout_follows_the_pinned_loader(tmp_path):
    """Linear-attention blocks where (il + 1) % 4 != 0, gated full attention on the others,
    the MTP block blk.{n_layer} as a full-attention block with its nextn tensors."""
    gguf = pytest.importorskip("gguf")
    path = testing.write_qwen35(tmp_path / "layout.gguf", seed=0, n_layer=8)
    reader = gguf.GGUFReader(str(path))
    names = {t.name for t in reader.tensors}
    fields = {name: f.contents() for name, f in reader.fields.items() if not name.startswith("GGUF.")}
    assert fields["qwen35.block_count"] == 9 and fields["qwen35.nextn_predict_layers"] == 1
    for il in range(9):
        recurrent = il < 8 and (il + 1) % 4 != 0
        assert (f"blk.{il}.ssm_conv1d.weight" in names) == recurrent
        assert (f"blk.{il}.attn_q.weight" in names) == (not recurrent)
        assert f"blk.{il}.post_attention_norm.weight" in names
    assert {f"blk.8.nextn.{t}.weight" for t in ("eh_proj", "enorm", "hnorm", "shared_head_norm")} <= names
    assert not any(n.startswith("blk.7.nextn") for n in names)


# ------------------------------------------------------------------------- oracle

@pytest.mark.parametrize("moe", [False, True])
def test_oracle_head_reproduces_the_trunk(qwen35_oracle_path, tmp_path, moe):
    path = testing.write_qwen35(tmp_path / "oracle-moe.gguf", seed=5, oracle=True, moe=True) if moe else qwen35_oracle_path
    trunk_next, _ = testing.oracle_maps(seed=5)
    with Llama(path, n_ctx=512, threads=2) as plain:
        expected = plain.generate("a", max_tokens=150).tokens
    assert all(trunk_next[a] == b for a, b in zip(expected, expected[1:]))
    with Llama(path, n_ctx=512, threads=2, mtp=True, draft=3) as llm:
        for draft in (1, 3):
            got = llm.generate("a", max_tokens=150, draft=draft)
            assert got.tokens == expected
            assert got.stats.acceptance_rate > 0.95
            assert got.stats.mean_accepted_length > draft - 0.2


def test_oracle_partial_acceptance_matches_its_construction(qwen35_oracle_partial_path):
    """With per-token agreement a = 0.6 and draft 3, accepted/drafted is about
    (a + a^2 + a^3) / 3 = 0.39; the output still equals plain greedy."""
    with Llama(qwen35_oracle_partial_path, n_ctx=1024, threads=2) as plain:
        expected = plain.generate("a", max_tokens=N_GEN).tokens
    with Llama(qwen35_oracle_partial_path, n_ctx=1024, threads=2, mtp=True, draft=3) as llm:
        got = llm.generate("a", max_tokens=N_GEN, draft=3)
    assert got.tokens == expected
    assert 0.25 < got.stats.acceptance_rate < 0.55, got.stats


def test_sampling_with_rejection_runs_to_max_tokens(qwen35_oracle_partial_path):
    with Llama(qwen35_oracle_partial_path, n_ctx=512, threads=2, mtp=True, draft=3, seed=7) as llm:
        got = llm.generate("a", max_tokens=100, temperature=0.8, seed=7)
    assert len(got.tokens) == 100
    assert got.stats.drafted > 0


# ------------------------------------------------------------------------- recurrent rollback

class TestRollback:
    """Force accept/reject patterns through the granular verbs and compare the target's
    next-token logits with a fresh context that never saw the rejected tokens: the
    recurrent state (conv and delta-net state) must come back exactly."""

    PROMPT = list(range(10, 27))

    @pytest.fixture(scope="class")
    def model(self, qwen35_path):
        with Model(ModelConfig(qwen35_path, load_mtp=True)) as m:
            yield m


    def drafts_for(self, truth, pattern):
        return [t if c == "a" else (t + 1) % testing.N_VOCAB for t, c in zip(truth, pattern)]

    def start(self, model, draft_max=3):
        s = Session(model, ContextConfig(n_ctx=256, threads=2, draft_max=draft_max))
        s.prefill(self.PROMPT)
        return s, self.PROMPT + [s.sample()]

    @pytest.mark.parametrize("pattern", ["rrr", "arr", "aar", "aaa", "ar", "a", "r"])
    def test_every_accept_reject_pattern_leaves_exact_state(self, model, pattern):
        s, history = self.start(model)
        with s:
            truth = greedy_continuation(model, history, len(pattern))
            result = s.verify(self.drafts_for(truth, pattern))
            n_acc = pattern.index("r") if "r" in pattern else len(pattern)
            assert result.n_accepted == n_acc
            assert list(result.tokens) == truth[:n_acc + 1]
            s.step(0)   # decode the pending token: the logits then follow history + accepted + pending
            np.testing.assert_allclose(s.logits(), fresh_logits(model, history + truth[:n_acc + 1]),
                                       rtol=1e-4, atol=1e-4)

    def test_consecutive_verifies_with_mixed_patterns(self, model):
        """Rollbacks back to back (each one restores a snapshot the previous verify wrote)."""
        s, history = self.start(model, draft_max=6)
        with s:
            for pattern in ["arr", "r", "aaaaaa", "aar", "rrrrrr", "aaaar", "a", "ar"]:
                truth = greedy_continuation(model, history, len(pattern))
                result = s.verify(self.drafts_for(truth, pattern))
                assert list(result.tokens) == truth[:result.n_accepted + 1]
                history += list(result.tokens)
            s.step(0)
            np.testing.assert_allclose(s.logits(), fresh_logits(model, history), rtol=1e-4, atol=1e-4)

    @pytest.mark.parametrize("path_fixture", ["qwen35_path", "qwen35moe_path", "qwen35_oracle_partial_path"])
    def test_long_mtp_run_leaves_the_state_of_plain_decoding(self, request, path_fixture):
        """200 tokens of MTP steps (with the partial oracle every accept length occurs),
        then the logits equal those of plain decoding of the same tokens one at a time.
        (One long prefill differs by ~1e-3: the delta net runs chunked there.)"""
        path = request.getfixturevalue(path_fixture)
        with Model(ModelConfig(path, load_mtp=True)) as model:
            with Session(model, ContextConfig(n_ctx=512, threads=2, draft_max=3)) as s:
                s.prefill([5, 6, 7])
                history, pending = [5, 6, 7], s.sample()
                accepted_lengths = set()
                while len(history) < 200:
                    result = s.step(3)
                    accepted_lengths.add(result.n_accepted)
                    history += [pending, *result.tokens[:-1]]
                    pending = result.tokens[-1]
                s.step(0)
                got = s.logits()
            with Session(model, ContextConfig(n_ctx=512, threads=2)) as plain:
                plain.prefill(history[:3])
                for t in history[3:] + [pending]:
                    plain.prefill([t])
                expected = plain.logits()
            fresh = fresh_logits(model, history + [pending])
        if path_fixture == "qwen35_oracle_partial_path":
            assert accepted_lengths == {0, 1, 2, 3}
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got, fresh, rtol=1e-3, atol=1e-2)   # a wrong state is off by ~10

    def test_rollback_within_the_last_decode_is_exact(self, model):
        """Rollback inside the last decoded batch (a prefill of 17 tokens) uses its snapshots."""
        for n_keep in (len(self.PROMPT) - 1, len(self.PROMPT) - 2):
            s, _ = self.start(model)
            with s:
                s.rollback(n_keep)
                assert s.n_past == n_keep
                np.testing.assert_allclose(s.logits(), fresh_logits(model, self.PROMPT[:n_keep]),
                                           rtol=1e-4, atol=1e-4)

    def test_rollback_past_the_snapshots_is_refused_and_keeps_the_state(self, model):
        """After single-token decodes no snapshot holds an older state: rolling back is
        refused (upstream would restore a stale snapshot) and the session stays usable."""
        s, history = self.start(model)
        with s:
            for _ in range(6):
                history += list(s.step(0).tokens)
            n_past = s.n_past
            for n_keep in (n_past - 1, n_past - 2, n_past - 5):
                with pytest.raises(InvalidArgumentError, match="recurrent state"):
                    s.rollback(n_keep)
                assert s.n_past == n_past
            s.step(0)
            np.testing.assert_allclose(s.logits(), fresh_logits(model, history), rtol=1e-4, atol=1e-4)

    def test_llama_generate_after_generate_starts_clean(self, qwen35_path):
        """Consecutive generations on one Llama (prompt reuse falls back to a reset when the
        recurrent state cannot be rolled back) equal fresh ones."""
        prompt = prompt_of(9)
        with Llama(qwen35_path, n_ctx=1024, threads=2, mtp=True, draft=3) as llm:
            first = llm.generate(prompt, max_tokens=40).tokens
            longer = llm.generate(prompt + list(first[:10]), max_tokens=30).tokens
            again = llm.generate(prompt, max_tokens=40).tokens
        with Llama(qwen35_path, n_ctx=1024, threads=2) as plain:
            assert plain.generate(prompt + list(first[:10]), max_tokens=30).tokens == longer
        assert again == first
