"""``pyllama-mtp graft``: one GGUF from a trunk-only file and the matching MTP-only file,
so that ``Llama(full, mtp=True)`` needs one path instead of two.

The output holds the trunk's metadata and tensors followed by the MTP file's MTP-block
tensors (blk.{n_layer}..), every tensor copied byte for byte whatever its type. It is
written under a temporary name next to the output and renamed when complete, so an
interrupted or failed graft never leaves a file that looks like a model.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from gguf import GGML_QUANT_SIZES, GGUFEndian, GGUFValueType, GGUFWriter

from ..errors import MtpError, PmtpError
from .gguf_header import Field, TensorInfo
from .modelfile import ModelFile, open_model
from .outfile import check_output, check_space, partial_path

_ENDIAN = {"<": GGUFEndian.LITTLE, ">": GGUFEndian.BIG}
_SAME_MODEL = "both files must come from the same model (convert the trunk and MTP files from one checkpoint)"


@dataclass(frozen=True)
class GraftResult:
    path: Path
    n_trunk_tensors: int
    n_mtp_tensors: int
    file_size: int


def graft(trunk_path, mtp_path, out_path, *, overwrite: bool = False) -> GraftResult:
    """Write trunk + MTP blocks to out_path after checking that the two files fit."""
    trunk, mtp = open_model(trunk_path), open_model(mtp_path)
    check_compatible(trunk, mtp)
    out = Path(out_path)
    check_output(out, (trunk.path, mtp.path), overwrite)
    tensors = [(trunk.path, t) for t in trunk.header.tensors.values()] + [(mtp.path, t) for t in mtp.mtp_tensors]
    check_space(out, trunk.header.file_size + sum(t.n_bytes for t in mtp.mtp_tensors))
    partial = partial_path(out)
    try:
        _write(partial, trunk, tensors)
        os.replace(partial, out)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return GraftResult(out, len(trunk.header.tensors), len(mtp.mtp_tensors), out.stat().st_size)


# --------------------------------------------------------------------------- checks

# (what differs, how to read it from a file); compared in this order, arch first because
# the other keys are named after it. A None value (the file lacks it) is not compared.
_MATCHING: tuple[tuple[str, Callable[[ModelFile], Any]], ...] = (
    ("general.architecture", lambda m: m.arch),
    ("{arch}.block_count", lambda m: m.n_layer_all),
    ("{arch}.nextn_predict_layers", lambda m: m.n_layer_mtp),
    ("n_embd ({arch}.embedding_length)", lambda m: m.n_embd),
    ("vocabulary size (tokenizer.ggml.tokens)", lambda m: m.n_vocab),
    ("vocabulary size (token_embd.weight rows)", lambda m: m.n_embd_rows),
    ("byte order", lambda m: m.header.byte_order),
)


def check_compatible(trunk: ModelFile, mtp: ModelFile) -> None:
    """MtpError naming both files and the first field in which they differ, or a file
    that does not play its part (trunk-only first, then one with all MTP tensors)."""
    _check_declares_mtp(trunk, mtp)
    for label, read in _MATCHING:
        a, b = read(trunk), read(mtp)
        if a is not None and b is not None and a != b:
            raise MtpError(f"{label.format(arch=trunk.arch)} differs: {trunk.path} has {a!r}, "
                           f"{mtp.path} has {b!r}; {_SAME_MODEL}")
    _check_trunk(trunk)
    _check_mtp(mtp, trunk)


def _check_declares_mtp(trunk: ModelFile, mtp: ModelFile) -> None:
    """First, because a trunk converted without its MTP layers (e.g. --no-mtp) also has a
    smaller block_count, and "block_count differs" would send the user after the wrong file."""
    if trunk.n_layer_mtp == 0:
        raise MtpError(f"{trunk.path}: declares no MTP layers ({trunk.arch}.nextn_predict_layers is 0 or absent), "
                       "so it has no place for them; graft needs a trunk converted with its MTP layers declared, "
                       f"or load the two files together: Llama({str(trunk.path)!r}, mtp={str(mtp.path)!r})")


def _check_trunk(trunk: ModelFile) -> None:
    if not trunk.has_trunk:
        raise MtpError(f"{trunk.path}: is an MTP-only file, not a trunk; pass the trunk-only file first: "
                       f"pyllama-mtp graft TRUNK.gguf {trunk.path.name} -o FULL.gguf")
    if trunk.mtp_status == "all":
        raise MtpError(f"{trunk.path}: already has all its MTP tensors; load it with mtp=True, nothing to graft")
    if trunk.mtp_status == "partial":
        raise MtpError(f"{trunk.path}: holds some MTP tensors (e.g. {trunk.mtp_tensors[0].name}); graft needs a "
                       f"trunk-only file, one without any of blk.{trunk.n_layer}..blk.{trunk.n_layer_all - 1}")


def _check_mtp(mtp: ModelFile, trunk: ModelFile) -> None:
    if mtp.mtp_status == "none":
        raise MtpError(f"{mtp.path}: has no MTP tensors (none of blk.{mtp.n_layer}..blk.{mtp.n_layer_all - 1}); "
                       f"the second file must be the MTP-only file that goes with {trunk.path}")
    if mtp.mtp_status == "partial":
        raise MtpError(f"{mtp.path}: MTP tensors partial (missing {', '.join(mtp.mtp_missing[:3])}); "
                       "re-convert the MTP-only file with all its MTP layers")


# --------------------------------------------------------------------------- writing

def _write(path: Path, trunk: ModelFile, tensors: list[tuple[Path, TensorInfo]]) -> None:
    """The trunk's metadata (same keys, types and order), then the tensors' bytes straight
    from the memory-mapped inputs, one tensor at a time; synced before the caller renames."""
    endian = _ENDIAN[trunk.header.byte_order]
    writer = GGUFWriter(path, trunk.arch, endianess=endian)
    writer.data_alignment = trunk.header.alignment
    for key, field in trunk.header.fields.items():
        if key != "general.architecture":          # GGUFWriter writes it first itself
            _check_writable(trunk, key, field)
            writer.add_key_value(key, field.value, field.type, sub_type=field.sub_type)
    for _, t in tensors:
        writer.add_tensor_info(t.name, _byte_shape(t), np.dtype(np.uint8), t.n_bytes, raw_dtype=t.type)
    data = {p: np.memmap(p, dtype=np.uint8, mode="r") for p in {p for p, _ in tensors}}
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for p, t in tensors:
            writer.write_tensor_data(data[p][t.offset:t.offset + t.n_bytes], tensor_endianess=endian)
    finally:
        writer.close()
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _check_writable(trunk: ModelFile, key: str, field: Field) -> None:
    """GGUFWriter writes neither empty nor nested arrays (llama.cpp's converters never make them)."""
    if field.type == GGUFValueType.ARRAY and (not field.value or field.sub_type == GGUFValueType.ARRAY):
        raise PmtpError(f"{trunk.path}: metadata key '{key}' is an empty or nested array, which the gguf package "
                        f"cannot write; remove it first (gguf_new_metadata.py --remove-metadata {key})")


def _byte_shape(t: TensorInfo) -> tuple[int, ...]:
    """numpy-order shape with the rows in bytes: how GGUFWriter takes raw (quantized) data."""
    block_size, type_size = GGML_QUANT_SIZES[t.type]
    return (*reversed(t.shape[1:]), t.shape[0] // block_size * type_size)
