"""The Qwen3.5 hybrid layout (``qwen35`` / ``qwen35moe``): gated delta net (recurrent) layers
with a gated full-attention layer every 4th block, and one MTP block that drafts
autoregressively; random or oracle like step35."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pyllama_mtp.tiny_models import (
    N_VOCAB, _ORACLE_RESIDUAL, _Tensor, _Weights, _eh_proj, _ones, _shared_tensors, _split_filter, _swiglu,
    _tokenizer_metadata, _write_gguf, vocabulary,
)


# --------------------------------------------------------------------------- qwen35

@dataclass(frozen=True)
class _Qwen35:
    """Shapes of a qwen35 / qwen35moe model: blocks 0..n_layer-1 are the trunk (gated
    delta net layers, every full_attn_interval-th one full attention), block n_layer is
    the single MTP block."""
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_rot: int
    n_ff: int
    full_attn_interval: int
    ssm_d_state: int
    ssm_n_group: int
    ssm_n_v_heads: int
    ssm_d_conv: int
    moe: bool
    n_expert: int
    n_expert_used: int
    n_ff_exp: int
    n_ff_shexp: int
    n_ctx_train: int
    oracle: bool
    acceptance: float
    n_mtp: int = field(init=False, default=1)
    n_layer_all: int = field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "n_layer_all", self.n_layer + self.n_mtp)
        if self.n_head % self.n_head_kv:
            raise ValueError("n_head must be a multiple of n_head_kv")
        if self.n_rot % 2 or not 0 < self.n_rot <= self.head_dim:
            raise ValueError("n_rot must be even and in (0, head_dim]")
        if self.ssm_n_v_heads % self.ssm_n_group:
            raise ValueError("ssm_n_v_heads must be a multiple of ssm_n_group")
        if not any(not self.is_recurrent(il) for il in range(self.n_layer)):
            raise ValueError("the trunk needs at least one full-attention layer (n_layer >= full_attn_interval)")
        if self.moe and not 0 < self.n_expert_used <= self.n_expert:
            raise ValueError("need 0 < n_expert_used <= n_expert")
        if not 0.0 <= self.acceptance <= 1.0:
            raise ValueError(f"acceptance must be in [0, 1], got {self.acceptance}")

    @property
    def arch(self) -> str:
        return "qwen35moe" if self.moe else "qwen35"

    def is_recurrent(self, il: int) -> bool:
        # the pinned loader's default (no attention.recurrent_layers key): trunk layer il is
        # linear attention unless (il + 1) is a multiple of full_attention_interval; MTP is not
        return il < self.n_layer and (il + 1) % self.full_attn_interval != 0

    @property
    def key_dim(self) -> int:        # q and k channels of a gated delta net layer
        return self.ssm_d_state * self.ssm_n_group

    @property
    def value_dim(self) -> int:      # v channels (= ssm.inner_size: head_v_dim == head_k_dim)
        return self.ssm_d_state * self.ssm_n_v_heads

    @property
    def out_std(self) -> float:
        """As _Step35.out_std: large updates for random models, small ones for the oracle."""
        if not self.oracle:
            return 1.0
        return _ORACLE_RESIDUAL / math.sqrt(2 * self.n_layer_all)


def _qwen35_attention(cfg: _Qwen35, w: _Weights, il: int) -> list[_Tensor]:
    """Full attention with the query gate: attn_q [n_head*2*hd, n_embd] holds per head the
    query then its sigmoid gate; q/k RMS norms per head; attn_output [n_embd, n_head*hd]."""
    n, p, hd = cfg.n_embd, f"blk.{il}.", cfg.head_dim
    in_std = 1.0 / math.sqrt(n)
    q, kv, o = (2 * cfg.n_head * hd, n), (cfg.n_head_kv * hd, n), (n, cfg.n_head * hd)
    # the gate (sigmoid, about 0.5) halves the attention output: 2x restores out_std
    o_std = 2.0 * cfg.out_std / math.sqrt(o[1])
    return [
        _Tensor(p + "attn_q.weight", q, lambda: w.normal(p + "attn_q.weight", q, in_std)),
        _Tensor(p + "attn_k.weight", kv, lambda: w.normal(p + "attn_k.weight", kv, in_std)),
        _Tensor(p + "attn_v.weight", kv, lambda: w.normal(p + "attn_v.weight", kv, in_std)),
        _Tensor(p + "attn_output.weight", o, lambda: w.residual_writer(p + "attn_output.weight", o, o_std, axis=0)),
        _Tensor(p + "attn_q_norm.weight", (hd,), _ones(hd)),
        _Tensor(p + "attn_k_norm.weight", (hd,), _ones(hd)),
    ]


def _gated_delta_net(cfg: _Qwen35, w: _Weights, il: int) -> list[_Tensor]:
    """A linear-attention layer as conversion/qwen.py writes it: attn_qkv [2*key_dim +
    value_dim, n_embd] (q, k, v channels), attn_gate (z) [value_dim, n_embd], a causal
    conv over the qkv channels, per-v-head decay (ssm_a = -exp(A_log), ssm_dt bias,
    ssm_alpha) and write strength (ssm_beta), a gated RMS norm per v head and ssm_out."""
    n, p = cfg.n_embd, f"blk.{il}."
    in_std = 1.0 / math.sqrt(n)
    conv_dim = 2 * cfg.key_dim + cfg.value_dim
    nv = cfg.ssm_n_v_heads
    qkv, z, conv = (conv_dim, n), (cfg.value_dim, n), (conv_dim, cfg.ssm_d_conv)
    out = (n, cfg.value_dim)
    # rmsnorm(o) * silu(z) has RMS ~0.6: 1.6 restores out_std per output entry
    out_std = 1.6 * cfg.out_std / math.sqrt(cfg.value_dim)
    return [
        _Tensor(p + "attn_qkv.weight", qkv, lambda: w.normal(p + "attn_qkv.weight", qkv, in_std)),
        _Tensor(p + "attn_gate.weight", z, lambda: w.normal(p + "attn_gate.weight", z, in_std)),
        _Tensor(p + "ssm_conv1d.weight", conv,
                lambda: w.normal(p + "ssm_conv1d.weight", conv, 1.0 / math.sqrt(cfg.ssm_d_conv))),
        _Tensor(p + "ssm_dt.bias", (nv,), lambda: w.normal(p + "ssm_dt.bias", (nv,), 0.5)),
        # decay exp(ssm_a * softplus(alpha + dt)) per token: a in about [-1, -0.1], so the
        # state remembers a few to tens of tokens
        _Tensor(p + "ssm_a", (nv,), lambda: -np.exp(w.normal(p + "ssm_a", (nv,), 0.6) - 1.0)),
        _Tensor(p + "ssm_beta.weight", (nv, n), lambda: w.normal(p + "ssm_beta.weight", (nv, n), in_std)),
        _Tensor(p + "ssm_alpha.weight", (nv, n), lambda: w.normal(p + "ssm_alpha.weight", (nv, n), in_std)),
        _Tensor(p + "ssm_norm.weight", (cfg.ssm_d_state,), _ones(cfg.ssm_d_state)),
        _Tensor(p + "ssm_out.weight", out, lambda: w.residual_writer(p + "ssm_out.weight", out, out_std, axis=0)),
    ]


def _qwen35_ffn(cfg: _Qwen35, w: _Weights, il: int) -> list[_Tensor]:
    """Dense SwiGLU (qwen35), or softmax-routed experts plus a sigmoid-gated shared expert
    (qwen35moe; the router and the shared gate [n_embd] stay F32 like the converters')."""
    n, p = cfg.n_embd, f"blk.{il}."
    if not cfg.moe:
        return _swiglu(w, p, "", cfg.n_ff, cfg.out_std)
    e = cfg.n_expert
    # routed experts and the gated shared expert (gate ~0.5) each contribute about half
    return [
        _Tensor(p + "ffn_gate_inp.weight", (e, n), lambda: w.normal(p + "ffn_gate_inp.weight", (e, n), 1.0 / math.sqrt(n))),
        *_swiglu(w, p, "_exps", cfg.n_ff_exp, cfg.out_std / math.sqrt(2), n_expert=e),
        _Tensor(p + "ffn_gate_inp_shexp.weight", (n,),
                lambda: w.normal(p + "ffn_gate_inp_shexp.weight", (n,), 1.0 / math.sqrt(n))),
        *_swiglu(w, p, "_shexp", cfg.n_ff_shexp, 2.0 * cfg.out_std / math.sqrt(2)),
    ]


def _qwen35_block(cfg: _Qwen35, w: _Weights, il: int) -> list[_Tensor]:
    n, p = cfg.n_embd, f"blk.{il}."
    mixer = _gated_delta_net(cfg, w, il) if cfg.is_recurrent(il) else _qwen35_attention(cfg, w, il)
    return [
        _Tensor(p + "attn_norm.weight", (n,), _ones(n)),
        _Tensor(p + "post_attention_norm.weight", (n,), _ones(n)),
        *mixer,
        *_qwen35_ffn(cfg, w, il),
    ]


def _qwen35_tensors(cfg: _Qwen35, seed: int) -> list[_Tensor]:
    w, head_next, tensors = _shared_tensors(cfg, seed)
    n = cfg.n_embd
    for il in range(cfg.n_layer):
        tensors += _qwen35_block(cfg, w, il)
    il, p = cfg.n_layer, f"blk.{cfg.n_layer}.nextn."
    tensors += _qwen35_block(cfg, w, il) + [
        _Tensor(p + "eh_proj.weight", (n, 2 * n), lambda: _eh_proj(cfg, w, p + "eh_proj.weight")),
        _Tensor(p + "enorm.weight", (n,), _ones(n)),
        _Tensor(p + "hnorm.weight", (n,), _ones(n)),
        _Tensor(p + "shared_head_norm.weight", (n,), _ones(n)),
    ]
    if cfg.oracle:
        # Qwen3.5 checkpoints have no MTP lm head (upstream falls back to output.weight);
        # the oracle needs its own to predict head_next
        tensors.append(_Tensor(p + "shared_head_head.weight", (N_VOCAB, n),
                               lambda: w.lm_head(p + "shared_head_head.weight", head_next)))
    return tensors


def _qwen35_metadata(cfg: _Qwen35, trunk_only: bool = False) -> dict:
    """The keys the pinned loader reads (llama-model.cpp load_hparams, qwen35.cpp /
    qwen35moe.cpp load_arch_hparams), as conversion/qwen.py writes them. trunk_only: like
    its --no-mtp export, no MTP block at all (the pinned qwen35 loader requires the MTP
    tensors of every declared MTP layer, even when told not to load them)."""
    k = cfg.arch + "."
    metadata = {
        k + "context_length": cfg.n_ctx_train,
        k + "embedding_length": cfg.n_embd,
        k + "block_count": cfg.n_layer if trunk_only else cfg.n_layer_all,   # trunk + the MTP block
        k + "feed_forward_length": cfg.n_ff,
        k + "attention.head_count": cfg.n_head,
        k + "attention.head_count_kv": cfg.n_head_kv,
        k + "attention.key_length": cfg.head_dim,
        k + "attention.value_length": cfg.head_dim,
        k + "attention.layer_norm_rms_epsilon": 1e-6,
        k + "rope.freq_base": 10000.0,
        # partial rotary (Qwen3.5: 1/4 of head_dim) with interleaved M-RoPE sections that
        # cover n_rot / 2 pairs (Qwen3.5: [11, 11, 10, 0] of 32); text uses one position
        k + "rope.dimension_count": cfg.n_rot,
        k + "rope.dimension_sections": _mrope_sections(cfg.n_rot // 2),
        k + "full_attention_interval": cfg.full_attn_interval,
        k + "ssm.conv_kernel": cfg.ssm_d_conv,
        k + "ssm.state_size": cfg.ssm_d_state,
        k + "ssm.group_count": cfg.ssm_n_group,
        k + "ssm.time_step_rank": cfg.ssm_n_v_heads,
        k + "ssm.inner_size": cfg.value_dim,
        **_tokenizer_metadata(vocabulary()),
    }
    if not trunk_only:
        metadata[k + "nextn_predict_layers"] = cfg.n_mtp
    if cfg.moe:
        metadata.update({
            k + "expert_count": cfg.n_expert,
            k + "expert_used_count": cfg.n_expert_used,
            k + "expert_feed_forward_length": cfg.n_ff_exp,
            k + "expert_shared_feed_forward_length": cfg.n_ff_shexp,
        })
    return metadata


def _mrope_sections(n_pairs: int) -> list[int]:
    """[t, h, w, 0] rotary pairs in Qwen3.5's 11:11:10 proportion, summing to n_pairs."""
    t = h = round(n_pairs * 11 / 32) or 1
    return [t, h, max(0, n_pairs - t - h), 0]


def write_qwen35(path, *, seed=0, n_embd=64, n_layer=4, n_head=4, n_head_kv=2, head_dim=16, n_rot=None, n_ff=None,
                 full_attn_interval=4, ssm_d_state=16, ssm_n_group=2, ssm_n_v_heads=4, ssm_d_conv=4,
                 moe=False, n_expert=4, n_expert_used=2, n_ff_exp=None, n_ff_shexp=None, n_ctx_train=4096,
                 oracle=False, acceptance=1.0, split=None, dtype="f32") -> Path:
    """A Qwen3.5-style hybrid model (arch ``qwen35``, or ``qwen35moe`` with ``moe=True``):
    n_layer trunk blocks, linear attention (gated delta net, recurrent state) except every
    ``full_attn_interval``-th block, which is gated full attention; then ONE MTP block
    (blk.{n_layer}, nextn_predict_layers = 1) that drafts autoregressively. Every block
    has a SwiGLU FFN (qwen35) or 4 routed experts + a gated shared expert (qwen35moe).

    Random (default): varied, context-dependent greedy output; the MTP head shares
    output.weight like the real checkpoints and agrees with the trunk now and then.
    ``oracle=True``: greedy output follows ``oracle_maps(seed)[0]`` and the head (with its
    own shared_head_head) predicts ``oracle_maps(seed, acceptance)[1]``, so with draft k
    accepted/drafted is about (a + ... + a^k) / k.

    ``split``: None, "trunk" (as conversion/qwen.py --no-mtp writes it: no MTP block, not
    declared either) or "mtp" (as --mtp writes it: the MTP block plus token_embd,
    output_norm and output), same values as the full file. Defaults: n_rot = head_dim / 2,
    n_ff = 2 n_embd, n_ff_exp = n_ff_shexp = n_embd / 2. Linear-attention heads:
    ssm_n_group key heads and ssm_n_v_heads value heads of ssm_d_state dims.
    """
    cfg = _Qwen35(n_embd=n_embd, n_layer=n_layer, n_head=n_head, n_head_kv=n_head_kv, head_dim=head_dim,
                  n_rot=n_rot or head_dim // 2, n_ff=n_ff or 2 * n_embd, full_attn_interval=full_attn_interval,
                  ssm_d_state=ssm_d_state, ssm_n_group=ssm_n_group, ssm_n_v_heads=ssm_n_v_heads, ssm_d_conv=ssm_d_conv,
                  moe=moe, n_expert=n_expert, n_expert_used=n_expert_used, n_ff_exp=n_ff_exp or n_embd // 2,
                  n_ff_shexp=n_ff_shexp or n_embd // 2, n_ctx_train=n_ctx_train, oracle=oracle, acceptance=acceptance)
    keep = _split_filter(cfg, split)
    tensors = [t for t in _qwen35_tensors(cfg, seed) if keep(t.name)]
    return _write_gguf(path, cfg.arch, _qwen35_metadata(cfg, trunk_only=split == "trunk"), tensors, dtype)
