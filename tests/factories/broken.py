"""Files that must fail to load as a text model, each in its own way."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from pyllama_mtp.tiny_models import (
    _SHAPE_ARGS, _Tensor, _Weights, _mtp_block_prefixes, _step35_config, _step35_metadata, _step35_tensors,
    _write_gguf, write_llama, write_step35,
)


# --------------------------------------------------------------------------- broken files

def write_broken(path, kind) -> Path:
    """A file that must not load as a text model:

    * "empty": zero bytes.
    * "random-bytes": 4 KiB of noise (no GGUF magic).
    * "truncated": a valid llama file cut to 60%: the header is intact, tensor data is not.
    * "not-text-arch": a CLIP (vision projector) GGUF, which llama.cpp refuses as a main model.
    * "mtp-declared-missing": step35 declaring 3 MTP layers with none of their tensors.
      Upstream loads it as a trunk-only file (MTP must come from another file); asked to
      draft with its own MTP layers, upstream aborts (GGML_ASSERT on nextn.eh_proj).
    * "mtp-partial": step35 declaring 3 MTP layers with only blk.{n_layer}.nextn.eh_proj of
      them. Upstream then requires the rest and refuses the file, with or without MTP.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "random-bytes":
        path.write_bytes(b"NOPE" + np.random.default_rng(0).bytes(4092))
    elif kind == "truncated":
        write_llama(path, seed=0)
        os.truncate(path, int(path.stat().st_size * 0.6))
    elif kind == "not-text-arch":
        _write_clip(path)
    elif kind == "mtp-declared-missing":
        write_step35(path, seed=0, split="trunk")
    elif kind == "mtp-partial":
        cfg = _step35_config(**_SHAPE_ARGS)
        mtp = _mtp_block_prefixes(cfg)
        probe = f"blk.{cfg.n_layer}.nextn.eh_proj.weight"
        tensors = [t for t in _step35_tensors(cfg, seed=0) if t.name == probe or not t.name.startswith(mtp)]
        _write_gguf(path, "step35", _step35_metadata(cfg), tensors, "f32")
    else:
        raise ValueError(f"unknown broken kind {kind!r}")
    return path


def _write_clip(path: Path) -> None:
    """A minimal vision-encoder GGUF (general.architecture = "clip")."""
    w = _Weights(0, 32)
    metadata = {
        "clip.has_vision_encoder": True,
        "clip.projector_type": "mlp",
        "clip.vision.image_size": 32,
        "clip.vision.patch_size": 8,
        "clip.vision.embedding_length": 32,
        "clip.vision.feed_forward_length": 64,
        "clip.vision.block_count": 1,
        "clip.vision.attention.head_count": 2,
        "clip.vision.attention.layer_norm_epsilon": 1e-6,
        "clip.vision.projection_dim": 64,
    }
    tensors = [
        _Tensor("v.patch_embd.weight", (32, 3, 8, 8), lambda: w.normal("v.patch_embd.weight", (32, 3, 8, 8), 0.02)),
        _Tensor("v.position_embd.weight", (16, 32), lambda: w.normal("v.position_embd.weight", (16, 32), 0.02)),
    ]
    _write_gguf(path, "clip", metadata, tensors, "f32")
