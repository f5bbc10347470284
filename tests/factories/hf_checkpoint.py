"""Tiny Step-3.5 / Step-3.7 Hugging Face checkpoints for tests: config.json, safetensors
shards and their index, in the original checkpoint layout (``model.layers.N.*`` with the
MTP blocks appended past ``num_hidden_layers``, stacked MoE experts, zero-centred RMSNorm
weights, ``transformer.shared_head.{norm,output}`` per MTP block), written with numpy.

The vocabulary is :func:`pyllama_mtp.testing.vocabulary`'s 512 tokens, so a GGUF made from
one of these checkpoints can take that tokenizer and run in the runtime.
"""
from __future__ import annotations

import json
import math
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pyllama_mtp.tiny_models import N_VOCAB

ARCHS = ("Step3p5ForCausalLM", "Step3p7ForConditionalGeneration")


@dataclass(frozen=True)
class Shape:
    n_embd: int = 64
    n_layer: int = 4
    n_mtp: int = 3
    n_swa: int = 8
    n_expert: int = 4
    n_expert_used: int = 2
    n_dense_lead: int = 1
    n_head: int = 4
    n_head_kv: int = 2
    n_head_swa: int = 6
    head_dim: int = 16
    n_ff: int = 128
    n_ff_exp: int = 32
    n_ff_shexp: int = 32

    @property
    def n_all(self) -> int:
        return self.n_layer + self.n_mtp

    def layer_type(self, il: int) -> str:
        # Step-3.5's layout: full attention on every 4th trunk layer from 0, MTP blocks full
        return "sliding_attention" if il < self.n_layer and il % 4 else "full_attention"


def text_config(s: Shape) -> dict:
    """The keys of Step-3.5-Flash's config.json, at tiny sizes."""
    types = [s.layer_type(il) for il in range(s.n_all)]
    return {
        "architectures": ["Step3p5ForCausalLM"],
        "model_type": "step3p5",
        "hidden_size": s.n_embd,
        "intermediate_size": s.n_ff,
        "num_hidden_layers": s.n_layer,
        "num_nextn_predict_layers": s.n_mtp,
        "num_attention_heads": s.n_head,
        "num_attention_groups": s.n_head_kv,
        "head_dim": s.head_dim,
        "attention_other_setting": {"attention_type": "sliding_attention", "num_attention_heads": s.n_head_swa,
                                    "num_attention_groups": s.n_head_kv, "head_dim": s.head_dim},
        "layer_types": types,
        "partial_rotary_factors": [1.0 if t == "sliding_attention" else 0.5 for t in types],
        "rope_theta": [5000000.0 if t == "full_attention" else 10000.0 for t in types],
        "sliding_window": s.n_swa,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "vocab_size": N_VOCAB,
        "moe_num_experts": s.n_expert,
        "moe_top_k": s.n_expert_used,
        "moe_intermediate_size": s.n_ff_exp,
        "share_expert_dim": s.n_ff_shexp,
        "moe_layers_enum": ",".join(str(il) for il in range(s.n_dense_lead, s.n_layer)),
        "moe_router_activation": "sigmoid",
        "moe_router_scaling_factor": 1.0,
        "norm_expert_weight": True,
        "use_head_wise_attn_gate": True,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }


def config_json(s: Shape, arch: str) -> dict:
    if arch == "Step3p5ForCausalLM":
        return text_config(s)
    if arch == "Step3p7ForConditionalGeneration":
        # a tiny vision tower: transformers builds one (randomly) even for text
        vision = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": 28,
                  "patch_size": 14, "intermediate_size": 64}
        return {"architectures": [arch], "model_type": "step3p7", "tie_word_embeddings": False,
                "text_config": text_config(s), "vision_config": vision}
    raise ValueError(f"arch must be one of {ARCHS}")


class _Weights:
    """One random stream per tensor name, so a tensor's values do not depend on which
    others are written."""

    def __init__(self, seed: int):
        self.seed = seed

    def normal(self, name: str, shape: tuple[int, ...], std: float) -> np.ndarray:
        rng = np.random.default_rng([self.seed, zlib.crc32(name.encode())])
        return (rng.standard_normal(shape) * std).astype(np.float32)


def _block(s: Shape, w: _Weights, il: int) -> dict[str, np.ndarray]:
    n, hd, p = s.n_embd, s.head_dim, f"model.layers.{il}."
    n_head = s.n_head_swa if s.layer_type(il) == "sliding_attention" else s.n_head
    t = {}

    def add(name, shape, std):
        t[p + name] = w.normal(p + name, shape, std)

    for norm in ("input_layernorm.weight", "post_attention_layernorm.weight"):
        add(norm, (n,), 0.1)                       # zero-centred: the model uses 1 + w
    add("self_attn.q_proj.weight", (n_head * hd, n), 1 / math.sqrt(n))
    add("self_attn.k_proj.weight", (s.n_head_kv * hd, n), 1 / math.sqrt(n))
    add("self_attn.v_proj.weight", (s.n_head_kv * hd, n), 1 / math.sqrt(n))
    add("self_attn.o_proj.weight", (n, n_head * hd), 1 / math.sqrt(n_head * hd))
    add("self_attn.q_norm.weight", (hd,), 0.1)
    add("self_attn.k_norm.weight", (hd,), 0.1)
    add("self_attn.g_proj.weight", (n_head, n), 1 / math.sqrt(n))
    if il < s.n_dense_lead or il >= s.n_layer:
        add("mlp.gate_proj.weight", (s.n_ff, n), 1 / math.sqrt(n))
        add("mlp.up_proj.weight", (s.n_ff, n), 1 / math.sqrt(n))
        add("mlp.down_proj.weight", (n, s.n_ff), 1 / math.sqrt(s.n_ff))
        return t
    e = s.n_expert
    add("moe.gate.weight", (e, n), 1 / math.sqrt(n))
    add("moe.router_bias", (e,), 0.1)
    add("moe.gate_proj.weight", (e, s.n_ff_exp, n), 1 / math.sqrt(n))
    add("moe.up_proj.weight", (e, s.n_ff_exp, n), 1 / math.sqrt(n))
    add("moe.down_proj.weight", (e, n, s.n_ff_exp), 1 / math.sqrt(s.n_ff_exp))
    add("share_expert.gate_proj.weight", (s.n_ff_shexp, n), 1 / math.sqrt(n))
    add("share_expert.up_proj.weight", (s.n_ff_shexp, n), 1 / math.sqrt(n))
    add("share_expert.down_proj.weight", (n, s.n_ff_shexp), 1 / math.sqrt(s.n_ff_shexp))
    return t


def _mtp_extras(s: Shape, w: _Weights, il: int, lm_head: np.ndarray | None) -> dict[str, np.ndarray]:
    n, p = s.n_embd, f"model.layers.{il}."
    t = {p + "eh_proj.weight": w.normal(p + "eh_proj.weight", (n, 2 * n), 1 / math.sqrt(2 * n)),
         p + "enorm.weight": w.normal(p + "enorm.weight", (n,), 0.1),
         p + "hnorm.weight": w.normal(p + "hnorm.weight", (n,), 0.1),
         p + "transformer.shared_head.norm.weight": w.normal(p + "transformer.shared_head.norm.weight", (n,), 0.1)}
    head = p + "transformer.shared_head.output.weight"
    t[head] = lm_head.copy() if lm_head is not None else w.normal(head, (N_VOCAB, n), 4 / math.sqrt(n))
    return t


def checkpoint_tensors(s: Shape, seed: int = 0, shared_head_is_lm_head: bool = False) -> dict[str, np.ndarray]:
    """Every tensor of the checkpoint, float32, in checkpoint order. shared_head_is_lm_head:
    the MTP blocks' output heads are copies of lm_head (what transformers' MTP forward
    assumes: it projects every MTP block through the main model's lm_head)."""
    w = _Weights(seed)
    n = s.n_embd
    t = {"model.embed_tokens.weight": w.normal("model.embed_tokens.weight", (N_VOCAB, n), 1.0)}
    for il in range(s.n_layer):
        t |= _block(s, w, il)
    t["model.norm.weight"] = w.normal("model.norm.weight", (n,), 0.1)
    t["lm_head.weight"] = w.normal("lm_head.weight", (N_VOCAB, n), 4 / math.sqrt(n))
    for il in range(s.n_layer, s.n_all):
        t |= _block(s, w, il) | _mtp_extras(s, w, il, t["lm_head.weight"] if shared_head_is_lm_head else None)
    return t


def _to_bf16(a: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even float32 -> bfloat16 bits (uint16)."""
    bits = a.astype(np.float32).view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def write_safetensors(path: Path, tensors: dict[str, np.ndarray], dtype: str) -> None:
    header, chunks, offset = {}, [], 0
    for name, a in tensors.items():
        raw = (_to_bf16(a) if dtype == "BF16" else a.astype({"F32": np.float32, "F16": np.float16}[dtype])).tobytes()
        header[name] = {"dtype": dtype, "shape": list(a.shape), "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for raw in chunks:
            f.write(raw)


def _shard_of(name: str, s: Shape) -> int:
    """Shard 1: the trunk blocks; 2: the embeddings and the first MTP block; 3: the other
    MTP blocks, the final norm and lm_head (extract-mtp needs 2 and 3 only)."""
    if name.startswith("model.layers."):
        il = int(name.split(".")[2])
        return 1 if il < s.n_layer else 2 if il == s.n_layer else 3
    return 2 if name == "model.embed_tokens.weight" else 3


def write_checkpoint(dir, *, arch: str = "Step3p5ForCausalLM", seed: int = 0, dtype: str = "BF16",
                     shared_head_is_lm_head: bool = False, **shape) -> Path:
    """A checkpoint directory with config.json, three shards and model.safetensors.index.json."""
    d = Path(dir)
    d.mkdir(parents=True, exist_ok=True)
    s = Shape(**shape)
    tensors = checkpoint_tensors(s, seed, shared_head_is_lm_head)
    names = {i: f"model-{i:05d}-of-00003.safetensors" for i in (1, 2, 3)}
    for i, file in names.items():
        write_safetensors(d / file, {k: v for k, v in tensors.items() if _shard_of(k, s) == i}, dtype)
    index = {"metadata": {"total_size": sum(v.size for v in tensors.values()) * (4 if dtype == "F32" else 2)},
             "weight_map": {k: names[_shard_of(k, s)] for k in tensors}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (d / "config.json").write_text(json.dumps(config_json(s, arch), indent=2))
    return d


def add_tokenizer(writer) -> None:
    """The tokenizer keys of :mod:`pyllama_mtp.tiny_models`'s vocabulary, for a GGUF converted
    from one of these checkpoints."""
    from pyllama_mtp.tiny_models import _add_metadata, _tokenizer_metadata, vocabulary
    _add_metadata(writer, _tokenizer_metadata(vocabulary()))
