"""What the pinned converter (conversion/step3.py ``Step35Model`` on conversion/base.py)
makes of a Step-3.5/3.7 Hugging Face checkpoint, for the MTP-only file: which checkpoint
tensors belong to it, their GGUF names, the norm shift, the stored types, and the
``step35.*`` metadata. Written from the converter's rules so that ``extract-mtp`` gives
the same file without torch, transformers or the converter itself.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import ExpertGatingFuncType, GGMLQuantizationType as Q, LlamaFileType

from ..errors import InvalidArgumentError, ModelLoadError, MtpError

ARCHITECTURES = ("Step3p5ForCausalLM", "Step3p7ForConditionalGeneration")
# what the MTP-only file shares with the trunk (the converter's --mtp keeps these three)
SHARED = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
          "lm_head.weight": "output.weight"}
# checkpoint name inside a block -> GGUF name inside blk.N (gguf-py's tensor map for step35)
BLOCK_TENSORS = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "self_attn.g_proj.weight": "attn_gate.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "moe.gate.weight": "ffn_gate_inp.weight",
    "moe.router_bias": "exp_probs_b.bias",
    "moe.gate_proj.weight": "ffn_gate_exps.weight",
    "moe.up_proj.weight": "ffn_up_exps.weight",
    "moe.down_proj.weight": "ffn_down_exps.weight",
    "share_expert.gate_proj.weight": "ffn_gate_shexp.weight",
    "share_expert.up_proj.weight": "ffn_up_shexp.weight",
    "share_expert.down_proj.weight": "ffn_down_shexp.weight",
    "eh_proj.weight": "nextn.eh_proj.weight",
    "enorm.weight": "nextn.enorm.weight",
    "hnorm.weight": "nextn.hnorm.weight",
    "embed_tokens.weight": "nextn.embed_tokens.weight",
    # the checkpoint nests the per-block head as transformer.shared_head.{norm,output}
    "transformer.shared_head.norm.weight": "nextn.shared_head_norm.weight",
    "transformer.shared_head.output.weight": "nextn.shared_head_head.weight",
    "shared_head.norm.weight": "nextn.shared_head_norm.weight",
    "shared_head.head.weight": "nextn.shared_head_head.weight",
}
# stored with a leading 1 dimension that the converter squeezes away
_SQUEEZED = ("self_attn.g_proj.weight", "moe.gate.weight", "moe.up_proj.weight", "moe.gate_proj.weight",
             "moe.down_proj.weight")
_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
# --type -> (general.file_type, the type of the tensors that are not kept F32)
OUT_TYPES = {"f32": (LlamaFileType.ALL_F32, Q.F32), "f16": (LlamaFileType.MOSTLY_F16, Q.F16),
             "bf16": (LlamaFileType.MOSTLY_BF16, Q.BF16), "q8_0": (LlamaFileType.MOSTLY_Q8_0, Q.Q8_0)}


# the config.json keys write_metadata cannot do without
_REQUIRED_INTS = ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_attention_groups", "head_dim",
                  "sliding_window", "moe_num_experts", "moe_top_k", "moe_intermediate_size", "share_expert_dim")


@dataclass(frozen=True)
class MtpTensor:
    source: str              # name in the checkpoint's weight map
    name: str                # GGUF name
    shift_norm: bool         # a zero-centred RMSNorm weight: stored + 1
    squeeze: bool


def read_config(model_dir: Path) -> dict[str, Any]:
    """config.json as shipped, with a Step-3.7 text_config lifted to the top (as the converter does)."""
    path = model_dir / "config.json"
    if not model_dir.is_dir():
        raise InvalidArgumentError(f"{model_dir}: not a directory; pass the Hugging Face checkpoint directory")
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelLoadError(f"{path}: missing; pass a Hugging Face checkpoint directory (config.json + "
                             "safetensors)") from None
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{path}: not valid JSON ({e}); re-download the checkpoint") from None
    if not isinstance(config, dict):
        raise ModelLoadError(f"{path}: not a JSON object; re-download the checkpoint")
    archs = config.get("architectures") or config.get("text_config", {}).get("architectures") or []
    if not any(a in ARCHITECTURES for a in archs):
        raise NotImplementedError(f"{path}: architecture {archs} is not supported by extract-mtp, which knows "
                                  f"{', '.join(ARCHITECTURES)}; convert other models with llama.cpp's "
                                  "convert_hf_to_gguf.py --mtp")
    if isinstance(config.get("text_config"), dict):
        config = {**config, **config["text_config"]}
    for key in _REQUIRED_INTS:
        if type(config.get(key)) is not int:
            raise ModelLoadError(f"{path}: no integer '{key}'; extract-mtp reads the config.json StepFun ships "
                                 "(one saved by transformers renames its keys); re-download the checkpoint")
    if int(config.get("num_nextn_predict_layers", 0) or 0) <= 0:
        raise MtpError(f"{path}: num_nextn_predict_layers is 0 or absent: this checkpoint has no MTP layers")
    return config


def mtp_tensors(config: dict[str, Any], names) -> list[MtpTensor]:
    """The checkpoint tensors of the MTP-only file, in the checkpoint's order."""
    n_layer = config["num_hidden_layers"]
    n_all = n_layer + int(config["num_nextn_predict_layers"])
    out = []
    for source in names:
        name = source.replace("language_model.", "")        # Step-3.7 nests the text model
        if name in SHARED:
            out.append(MtpTensor(source, SHARED[name], name.endswith("norm.weight"), False))
            continue
        m = _LAYER.fullmatch(name)
        if m is None or int(m[1]) < n_layer:
            continue
        il, rest = int(m[1]), m[2]
        if il >= n_all or rest not in BLOCK_TENSORS:
            raise ModelLoadError(f"checkpoint tensor '{source}' is in MTP block {il} but extract-mtp does not know "
                                 "it (nor does the pinned converter); the checkpoint layout is not Step-3.5's")
        shift = rest.endswith("norm.weight")
        out.append(MtpTensor(source, f"blk.{il}.{BLOCK_TENSORS[rest]}", shift, rest in _SQUEEZED))
    _check_complete(out, n_layer, n_all)
    return out


def _check_complete(tensors: list[MtpTensor], n_layer: int, n_all: int) -> None:
    have = {t.name for t in tensors}
    need = list(SHARED.values()) + [f"blk.{il}.nextn.{s}.weight" for il in range(n_layer, n_all)
                                     for s in ("eh_proj", "enorm", "hnorm")]
    missing = [n for n in need if n not in have]
    if missing:
        raise MtpError(f"the checkpoint lacks {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''} "
                       f"(MTP blocks {n_layer}..{n_all - 1}); it was saved without its MTP layers")


def convert(t: MtpTensor, data: np.ndarray) -> np.ndarray:
    """The converter's arithmetic: anything but F16/F32 becomes F32 first, zero-centred
    norms get +1 in that type, stacked routers/gates lose their leading 1."""
    if data.dtype not in (np.float16, np.float32):
        data = data.astype(np.float32)
    if t.shift_norm:
        data = data + data.dtype.type(1)
    if t.squeeze:
        data = np.squeeze(data)
    return np.ascontiguousarray(data)


def stored_type(name: str, n_dims: int, out_type: str) -> Q:
    """The GGUF type the converter stores a tensor as (prepare_tensors' rules for step35)."""
    if n_dims <= 1 or name.endswith("_norm.weight") or name.endswith("ffn_gate_inp.weight") \
            or not name.endswith(".weight"):
        return Q.F32
    return OUT_TYPES[out_type][1]


def _first(config: dict[str, Any], keys: tuple[str, ...]) -> Any:
    return next((config[k] for k in keys if k in config), None)


def _pad(values, n: int, default) -> list:
    values = list(values)
    return (values + [default] * (n - len(values)))[:n]


def _rope(config: dict[str, Any]) -> tuple[float | None, float | None]:
    """(full-attention theta, sliding-window theta): a list rope_theta holds both."""
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = (params.get("full_attention", params).get("rope_type") or params.get("type") or "default")
    if str(rope_type).lower() != "default":
        raise NotImplementedError(f"rope type {rope_type!r}: extract-mtp writes unscaled RoPE only; convert this "
                                  "checkpoint with llama.cpp's convert_hf_to_gguf.py --mtp")
    theta = _first(config, ("global_rope_theta", "rope_global_theta", "rope_theta_global", "rope_theta",
                            "rotary_emb_base"))
    local = _first(config, ("local_rope_theta", "rope_local_theta", "rope_theta_local", "swa_rope_theta",
                            "rope_local_base_freq"))
    if isinstance(theta, list):
        theta, local = float(theta[0]), float(theta[1])
    if isinstance(params.get("full_attention"), dict):      # per-layer-type parameters
        theta = params["full_attention"].get("rope_theta", theta)
        local = (params.get("sliding_attention") or {}).get("rope_theta", local)
    return theta, local


def write_metadata(w, config: dict[str, Any], out_type: str) -> None:
    """The step35 keys the converter writes (TextModel then Step35Model set_gguf_parameters),
    through the same GGUFWriter calls so that the value types match."""
    n_layer, n_mtp = config["num_hidden_layers"], int(config["num_nextn_predict_layers"])
    n_all = n_layer + n_mtp
    w.add_block_count(n_all)
    if (n_ctx := _first(config, ("max_position_embeddings", "n_ctx", "n_positions", "max_length",
                                 "max_sequence_length", "model_max_length"))) is not None:
        w.add_context_length(n_ctx)
    w.add_embedding_length(config["hidden_size"])
    if (n_ff := _first(config, ("prefix_dense_intermediate_size", "dense_intermediate_size", "intermediate_size",
                                "n_inner", "hidden_dim"))) is not None:
        w.add_feed_forward_length(n_ff)
    theta, local = _rope(config)
    if theta is not None:
        w.add_rope_freq_base(theta)
    if local is not None:
        w.add_rope_freq_base_swa(local)
    score = _first(config, ("score_function", "scoring_func", "score_func", "moe_router_activation",
                            "moe_router_activation_func", "expert_selection_fn"))
    if score is not None:
        # by name: older gguf packages lack the newer functions
        gating = {name.lower(): t for name, t in ExpertGatingFuncType.__members__.items()}
        if score not in gating:
            raise ModelLoadError(f"config.json: unsupported expert score function {score!r}")
        w.add_expert_gating_func(gating[score])
    if (head_dim := config.get("head_dim")) is not None:
        w.add_key_length(head_dim)
    w.add_file_type(OUT_TYPES[out_type][0])

    layer_types = _pad(config.get("layer_types") or [], n_all, "full_attention")
    factors = _pad(config.get("partial_rotary_factors") or [], n_all, 0.5)
    if [1.0 if t == "sliding_attention" else 0.5 for t in layer_types] != [float(f) for f in factors]:
        raise ModelLoadError("config.json: partial_rotary_factors must be 1.0 on sliding and 0.5 on full attention "
                             "layers (Step-3.5's layout)")
    other = config.get("attention_other_setting") or {}
    n_head, n_kv = config["num_attention_heads"], config["num_attention_groups"]
    swa = [t == "sliding_attention" for t in layer_types]
    w.add_head_count([other.get("num_attention_heads", n_head) if s else n_head for s in swa])
    w.add_head_count_kv([other.get("num_attention_groups", n_kv) if s else n_kv for s in swa])
    w.add_sliding_window(config["sliding_window"])
    w.add_sliding_window_pattern(swa)
    w.add_value_length(config["head_dim"])
    w.add_expert_count(config["moe_num_experts"])
    w.add_expert_used_count(config["moe_top_k"])
    w.add_expert_feed_forward_length(config["moe_intermediate_size"])
    w.add_expert_shared_feed_forward_length(config["share_expert_dim"])
    if (scale := config.get("moe_router_scaling_factor")) is not None:
        w.add_expert_weights_scale(scale)
    if (norm := config.get("norm_expert_weight")) is not None:
        w.add_expert_weights_norm(norm)
    w.add_leading_dense_block_count(_leading_dense(config.get("moe_layers_enum")))
    w.add_moe_every_n_layers(int(config.get("moe_every_n_layer", 1)))
    w.add_layer_norm_rms_eps(config.get("rms_norm_eps", 1e-5))   # (the converter writes it twice; this one stays)
    if (limits := config.get("swiglu_limits")) is not None:
        w.add_swiglu_clamp_exp(_pad([0.0 if v is None else float(v) for v in limits], n_all, 0.0))
    if (limits := config.get("swiglu_limits_shared")) is not None:
        w.add_swiglu_clamp_shexp(_pad([0.0 if v is None else float(v) for v in limits], n_all, 0.0))
    w.add_nextn_predict_layers(n_mtp)


def _leading_dense(moe_layers_enum) -> int:
    if isinstance(moe_layers_enum, str) and moe_layers_enum.strip():
        return max(0, min(int(i) for i in moe_layers_enum.strip().split(",")))
    return 0
