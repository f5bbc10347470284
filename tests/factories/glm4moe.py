"""The GLM-4.5 MoE layout with one MTP (nextn) block."""
from __future__ import annotations

import math
from pathlib import Path


from pyllama_mtp.tiny_models import (
    _Tensor, _Weights, _attention, _embedding_tensors, _ones, _swiglu, _tokenizer_metadata, _write_gguf,
    vocabulary,
)


# --------------------------------------------------------------------------- glm4moe

def write_glm4moe(path, *, seed=0, n_embd=64, n_layer=3, n_head=4, n_head_kv=2, head_dim=16, n_dense_lead=1,
                  n_expert=4, n_expert_used=2, n_ff=None, n_ff_exp=None, n_ctx_train=4096, dtype="f32") -> Path:
    """A GLM-4.5-style MoE model (arch ``glm4moe``) with random weights: n_layer trunk blocks
    (full attention with q/k/v biases and partial RoPE, a dense SwiGLU FFN in the first
    n_dense_lead blocks, then sigmoid-routed experts plus one shared expert), and ONE MTP
    block (blk.{n_layer}, an MoE block with nextn.* tensors) that drafts autoregressively,
    as in GLM-4.5/4.6/4.7 and their llama.cpp conversions."""
    if not 0 < n_expert_used <= n_expert or not 0 <= n_dense_lead <= n_layer:
        raise ValueError("need 0 < n_expert_used <= n_expert and 0 <= n_dense_lead <= n_layer")
    n_ff, n_ff_exp = n_ff or 2 * n_embd, n_ff_exp or n_embd // 2
    n_all = n_layer + 1
    w = _Weights(seed, n_embd)
    tensors = _embedding_tensors(w)
    for il in range(n_all):
        p = f"blk.{il}."
        tensors += _attention(w, il, n_head, n_head_kv, head_dim, 1.0)
        for kind, rows in (("q", n_head * head_dim), ("k", n_head_kv * head_dim), ("v", n_head_kv * head_dim)):
            name = p + f"attn_{kind}.bias"
            tensors.append(_Tensor(name, (rows,), lambda name=name, rows=rows: w.normal(name, (rows,), 0.1)))
        tensors.append(_Tensor(p + "post_attention_norm.weight", (n_embd,), _ones(n_embd)))
        if il < n_dense_lead:
            tensors += _swiglu(w, p, "", n_ff, 1.0)
        else:
            e = n_expert
            tensors += [
                _Tensor(p + "ffn_gate_inp.weight", (e, n_embd),
                        lambda p=p: w.normal(p + "ffn_gate_inp.weight", (e, n_embd), 1.0 / math.sqrt(n_embd))),
                _Tensor(p + "exp_probs_b.bias", (e,), lambda p=p: w.normal(p + "exp_probs_b.bias", (e,), 0.1)),
                *_swiglu(w, p, "_exps", n_ff_exp, 1.0 / math.sqrt(2), n_expert=e),
                *_swiglu(w, p, "_shexp", n_ff_exp, 1.0 / math.sqrt(2)),
            ]
    q = f"blk.{n_layer}.nextn."
    tensors += [
        _Tensor(q + "eh_proj.weight", (n_embd, 2 * n_embd),
                lambda: w.normal(q + "eh_proj.weight", (n_embd, 2 * n_embd), 1.0 / math.sqrt(2 * n_embd))),
        _Tensor(q + "enorm.weight", (n_embd,), _ones(n_embd)),
        _Tensor(q + "hnorm.weight", (n_embd,), _ones(n_embd)),
        _Tensor(q + "shared_head_norm.weight", (n_embd,), _ones(n_embd)),
    ]
    k = "glm4moe."
    metadata = {
        k + "context_length": n_ctx_train,
        k + "embedding_length": n_embd,
        k + "block_count": n_all,
        k + "feed_forward_length": n_ff,
        k + "attention.head_count": n_head,
        k + "attention.head_count_kv": n_head_kv,
        k + "attention.key_length": head_dim,
        k + "attention.value_length": head_dim,
        k + "rope.dimension_count": head_dim // 2,   # GLM-4.5 rotates half of each head
        k + "rope.freq_base": 10000.0,
        k + "attention.layer_norm_rms_epsilon": 1e-5,
        k + "expert_count": n_expert,
        k + "expert_used_count": n_expert_used,
        k + "expert_shared_count": 1,
        k + "expert_feed_forward_length": n_ff_exp,
        k + "expert_weights_scale": 1.0,
        k + "expert_weights_norm": True,
        k + "expert_gating_func": 2,                 # LLAMA_EXPERT_GATING_FUNC_TYPE_SIGMOID
        k + "leading_dense_block_count": n_dense_lead,
        k + "nextn_predict_layers": 1,
        **_tokenizer_metadata(vocabulary()),
    }
    return _write_gguf(path, "glm4moe", metadata, tensors, dtype)
