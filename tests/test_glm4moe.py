"""GLM-4.5-style models (arch glm4moe): MoE trunk with one MTP block that drafts
autoregressively, as GLM-4.5/4.6/4.7 ship it. The engine is the same as for the other
MTP architectures: greedy output with MTP equals plain greedy output, and the head's
hidden state that seeds each further draft step is the output row's (patch 0012: the
pinned glm4moe graph keeps every row's hidden state, and the context read back the
first row's)."""
from __future__ import annotations

import numpy as np
import pytest

from pyllama_mtp import Llama

import factories as testing
from pyllama_mtp.config import ContextConfig, ModelConfig
from pyllama_mtp.engine import Model, Session

from conftest import first_diff

N_GEN = 300


@pytest.fixture(scope="module")
def glm_path(tmp_path_factory):
    return str(testing.write_glm4moe(tmp_path_factory.mktemp("glm") / "glm4moe.gguf", seed=0))


@pytest.fixture(scope="module")
def plain(glm_path):
    with Llama(glm_path, n_ctx=1024, threads=2) as llm:
        yield llm


def prompt(n):
    return [int(t) for t in np.random.default_rng(n).integers(3, 500, size=n)]


def test_loads_with_one_mtp_layer_and_varied_output(plain):
    assert plain.info.arch == "glm4moe"
    assert plain.info.n_layer_mtp == 1
    out = plain.generate(prompt(5), max_tokens=100).tokens
    assert len(set(out)) > 30


@pytest.mark.parametrize("prompt_len", [1, 5, 30])
def test_greedy_mtp_equals_plain(glm_path, plain, prompt_len):
    expected = plain.generate(prompt(prompt_len), max_tokens=N_GEN).tokens
    with Llama(glm_path, n_ctx=1024, threads=2, mtp=True, draft=3) as llm:
        for draft in (1, 2, 3):
            got = llm.generate(prompt(prompt_len), max_tokens=N_GEN, draft=draft)
            assert got.tokens == expected, f"draft={draft} diverged at {first_diff(got.tokens, expected)}"
            assert got.stats.drafted > 0


def test_drafts_do_not_depend_on_how_the_head_caught_up(glm_path):
    """The head's first draft of a cycle shares its decode with the rows it catches up on;
    a second draft from the same pending token runs the draft rows alone. Both must give
    the same drafts and logits."""
    with Model(ModelConfig(glm_path, load_mtp=True)) as model, \
            Session(model, ContextConfig(n_ctx=256, threads=2, draft_max=3), mtp_model=model) as s:
        s.prefill(prompt(13))
        s.sample()
        first = s.draft(3), s.head_logits(0)
        again = s.draft(3), s.head_logits(0)
    assert first[0] == again[0]
    np.testing.assert_allclose(first[1], again[1], atol=1e-5)
