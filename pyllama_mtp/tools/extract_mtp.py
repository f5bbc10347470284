"""``pyllama-mtp extract-mtp``: the MTP-only GGUF of a Step-3.5/3.7 checkpoint, read from
the Hugging Face directory without converting (or even reading) the trunk.

Only the shards that hold the MTP blocks and the shared embeddings/output are opened, and
each tensor is converted and written on its own, so memory stays at one tensor. Names,
values and metadata follow the pinned converter's ``--mtp`` output (step35_checkpoint.py);
the tokenizer comes from a GGUF of the same model (``--trunk``), because building it from
the Hugging Face tokenizer needs transformers and the converter's tokenizer tables. The
result loads next to that trunk: ``Llama(trunk, mtp=out)``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGML_QUANT_VERSION, GGMLQuantizationType as Q, GGUFWriter, quant_shape_to_byte_shape, quants, size_label

from ..errors import ModelLoadError, MtpError
from .modelfile import ModelFile, open_model
from .outfile import check_output, check_space, partial_path
from .safetensors_file import SafetensorsFile, weight_map
from .step35_checkpoint import OUT_TYPES, MtpTensor, convert, mtp_tensors, read_config, stored_type, write_metadata


@dataclass(frozen=True)
class ExtractResult:
    path: Path
    n_tensors: int
    n_mtp_layers: int
    shards_read: list[str]
    file_size: int


def extract_mtp(src_dir, out_path, *, trunk, out_type: str = "bf16", overwrite: bool = False) -> ExtractResult:
    """Write the MTP-only GGUF of the checkpoint in src_dir to out_path; trunk: a GGUF of
    the same model (trunk-only or full) whose tokenizer the file takes."""
    if out_type not in OUT_TYPES:
        raise MtpError(f"unknown --type {out_type!r}; choose one of: {', '.join(OUT_TYPES)}")
    src = Path(src_dir)
    config = read_config(src)
    trunk_file = open_model(trunk)
    _check_trunk(trunk_file, config)
    shards = weight_map(src)
    tensors = mtp_tensors(config, shards)
    out = Path(out_path)
    check_output(out, (trunk_file.path,), overwrite)
    files = {name: SafetensorsFile(src / name) for name in sorted({shards[t.source] for t in tensors})}
    plan = [(t, files[shards[t.source]], _out_shape(t, files[shards[t.source]])) for t in tensors]
    check_space(out, sum(_n_bytes(shape, stored_type(t.name, len(shape), out_type)) for t, _, shape in plan))
    partial = partial_path(out)
    try:
        _write(partial, src.name, config, trunk_file, plan, out_type)
        os.replace(partial, out)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return ExtractResult(out, len(tensors), int(config["num_nextn_predict_layers"]), list(files),
                         out.stat().st_size)


def _check_trunk(trunk: ModelFile, config: dict) -> None:
    """The tokenizer must be this model's: same arch, width and vocabulary rows."""
    same = _SAME_MODEL.format(trunk=trunk.path)
    if trunk.arch != "step35":
        raise MtpError(f"{trunk.path}: is a {trunk.arch} model, not step35; {same}")
    if trunk.n_embd != config["hidden_size"]:
        raise MtpError(f"{trunk.path}: n_embd {trunk.n_embd} but the checkpoint's hidden_size is "
                       f"{config['hidden_size']}; {same}")
    if trunk.n_layer != config["num_hidden_layers"]:
        raise MtpError(f"{trunk.path}: {trunk.n_layer} trunk layers but the checkpoint has "
                       f"{config['num_hidden_layers']}; {same}")
    if trunk.header.get("tokenizer.ggml.tokens") is None:
        raise MtpError(f"{trunk.path}: has no tokenizer (tokenizer.ggml.tokens); {same}")


_SAME_MODEL = "pass --trunk the GGUF converted from this checkpoint (its trunk-only or full file)"


def _out_shape(t: MtpTensor, f: SafetensorsFile) -> tuple[int, ...]:
    """numpy-order shape as written (squeezed like the data)."""
    entry = f.entries.get(t.source)
    if entry is None:
        f.read(t.source)            # raises the missing-tensor error
    shape = entry.shape
    return tuple(d for d in shape if d != 1) if t.squeeze else shape


def _final_type(name: str, shape: tuple[int, ...], out_type: str) -> Q:
    qtype = stored_type(name, len(shape), out_type)
    # Q8_0 needs whole 32-blocks per row; the converter falls back to F16 otherwise
    if qtype == Q.Q8_0 and shape[-1] % GGML_QUANT_SIZES[Q.Q8_0][0]:
        return Q.F16
    return qtype


def _n_bytes(shape: tuple[int, ...], qtype: Q) -> int:
    block, size = GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape, dtype=np.int64)) // block * size


def _write(path: Path, name: str, config: dict, trunk: ModelFile, plan, out_type: str) -> None:
    w = GGUFWriter(path, "step35")
    for t, _, shape in plan:
        qtype = _final_type(t.name, shape, out_type)
        if qtype in (Q.F32, Q.F16):
            w.add_tensor_info(t.name, shape, np.dtype(np.float32 if qtype == Q.F32 else np.float16),
                              _n_bytes(shape, qtype))
        else:
            w.add_tensor_info(t.name, quant_shape_to_byte_shape(shape, qtype), np.dtype(np.uint8),
                              _n_bytes(shape, qtype), raw_dtype=qtype)
    w.add_type("model")
    w.add_name(trunk.header.get("general.name") or name)
    w.add_size_label(size_label(*w.get_total_parameter_count()))   # of this file's tensors, as the converter
    try:
        write_metadata(w, config, out_type)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
        # a config.json whose values have other types or shapes than StepFun's
        raise ModelLoadError(f"config.json: unexpected value ({type(e).__name__}: {e}); extract-mtp reads the "
                             "config.json StepFun ships; re-download the checkpoint") from None
    w.add_quantization_version(GGML_QUANT_VERSION)
    for key, field in trunk.header.fields.items():
        if key.startswith("tokenizer."):
            w.add_key_value(key, field.value, field.type, sub_type=field.sub_type)
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for t, f, shape in plan:
            data = convert(t, f.read(t.source))
            w.write_tensor_data(quants.quantize(data, _final_type(t.name, shape, out_type)))
    finally:
        w.close()
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())
