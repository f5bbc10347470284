"""Model metadata, build info, and the load progress callback."""
from __future__ import annotations

import pytest

from pyllama_mtp import ModelLoadError, build_info
from pyllama_mtp.config import ModelConfig
from pyllama_mtp.engine import Model


def test_build_info_lists_cpu_and_rpc_backends():
    info = build_info()
    assert "CPU" in info["backends"]
    assert info["rpc"] is True
    assert info["llama_cpp_commit"] == "0c1e57098"
    assert any(d["name"].startswith("CPU") for d in info["devices"])


def test_step35_model_info(step35_path):
    with Model(ModelConfig(step35_path, load_mtp=True)) as m:
        info = m.info
        assert info.arch == "step35"
        assert (info.n_layer, info.n_layer_mtp) == (4, 3)
        assert info.n_swa == 8
        assert info.has_mtp_tensors and info.has_trunk_tensors and info.mtp_loaded
        assert info.n_vocab == 512 and info.n_embd == 64
        assert info.size_bytes > 0 and info.n_params > 0
        assert "<|im_start|>" in m.chat_template
        assert m.meta("general.architecture") == "step35"
        assert m.meta("no.such.key") is None
        assert m.is_eog(info.token_eos)


def test_split_files_are_told_apart(step35_pair):
    trunk, mtp_only = step35_pair
    with Model(ModelConfig(trunk)) as t:
        assert t.info.has_trunk_tensors and not t.info.has_mtp_tensors and t.info.n_layer_mtp == 3
    with Model(ModelConfig(mtp_only, load_mtp=True)) as m:
        assert m.info.has_mtp_tensors and not m.info.has_trunk_tensors


def test_progress_callback_reports_and_can_cancel(llama_path):
    seen = []
    with Model(ModelConfig(llama_path), progress=seen.append):
        pass
    assert seen and seen[-1] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(seen, seen[1:]))
    with pytest.raises(ModelLoadError):
        Model(ModelConfig(llama_path), progress=lambda p: False)


def test_token_pieces_rebuild_text(llama_path):
    with Model(ModelConfig(llama_path)) as m:
        tokens = m.tokenize("pieces of text, ünïcode", add_special=False)
        assert b"".join(m.token_pieces[t] for t in tokens).decode() == "pieces of text, ünïcode"


def test_engine_limits_have_one_definition_read_by_cffi_and_python():
    # pmtp.h defines them once; cffi's structs and pyllama_mtp.config both follow it
    from pyllama_mtp import _native, config
    ffi, lib = _native.ffi, _native.lib
    assert (lib.PMTP_MAX_DRAFT, lib.PMTP_MAX_SEQUENCES, lib.PMTP_MAX_TOP_LOGPROBS) == \
        (config.MAX_DRAFT, config.MAX_SEQUENCES, config.MAX_TOP_LOGPROBS)
    assert len(ffi.new("pmtp_stats *").drafted_at) == config.MAX_DRAFT
    result = ffi.new("pmtp_step_result *")
    assert len(result.tokens) == config.MAX_DRAFT + 1
    assert len(result.top_tokens[0]) == config.MAX_TOP_LOGPROBS
