"""``pyllama-mtp quantize``: llama.cpp's quantizer with the MTP blocks kept at Q8_0 (or
F16/BF16/F32).

Why not plain llama-quantize: its mixtures quantize MTP blocks like trunk blocks (e.g.
Q4_K for ``nextn.shared_head_head``), and low-bit heads get fewer drafts accepted; and an
importance matrix never covers MTP tensors (they do not run while it is measured), so
IQ1/IQ2/IQ3_XXS/Q2_K_S refuse such a model. Every tensor of the MTP blocks here gets one
type that needs no importance data. Checks run before llama.cpp sees the file, the output
appears only when complete, and every failure is a typed exception.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gguf import GGMLQuantizationType as Q

from ..errors import InvalidArgumentError, ModelLoadError, MtpError
from .imatrix import load_imatrix
from .modelfile import ModelFile, open_model
from .outfile import check_output, check_space

# llama_ftype values (llama.h) by the names llama-quantize takes; the bare K names are
# its aliases for the _M mixtures.
FILE_TYPES = {
    "Q4_0": 2, "Q4_1": 3, "Q5_0": 8, "Q5_1": 9, "Q8_0": 7, "Q1_0": 40, "Q2_0": 41,
    "Q2_K": 10, "Q2_K_S": 21, "Q3_K": 12, "Q3_K_S": 11, "Q3_K_M": 12, "Q3_K_L": 13,
    "Q4_K": 15, "Q4_K_S": 14, "Q4_K_M": 15, "Q5_K": 17, "Q5_K_S": 16, "Q5_K_M": 17, "Q6_K": 18,
    "IQ1_S": 24, "IQ1_M": 31, "IQ2_XXS": 19, "IQ2_XS": 20, "IQ2_S": 28, "IQ2_M": 29,
    "IQ3_XXS": 23, "IQ3_XS": 22, "IQ3_S": 26, "IQ3_M": 27, "IQ4_NL": 25, "IQ4_XS": 30,
    "TQ1_0": 36, "TQ2_0": 37, "MXFP4_MOE": 38, "F16": 1, "BF16": 32, "F32": 0,
}
# File types that quantize nothing: llama.cpp then keeps every tensor at that one type.
UNQUANTIZED = {"F32": Q.F32, "F16": Q.F16, "BF16": Q.BF16}
# --mtp-type choices; "same" lets llama.cpp pick as for any other block.
MTP_TYPES = {"q8_0": Q.Q8_0, "f16": Q.F16, "bf16": Q.BF16, "f32": Q.F32, "same": None}
_SOURCE_TYPES = {Q.F32, Q.F16, Q.BF16}


@dataclass(frozen=True)
class QuantizeResult:
    path: Path
    file_type: str
    mtp_type: str                 # the MTP blocks' type as asked ("same": llama.cpp's choice)
    mtp_types: dict[str, int]     # types of the MTP tensors written -> count
    file_size: int


def quantize(src, out, file_type: str, *, mtp_type: str | None = None, threads: int = 0, imatrix=None,
             allow_requantize: bool = False, overwrite: bool = False) -> QuantizeResult:
    """Quantize the GGUF at src to out as file_type (e.g. "Q4_K_M").

    mtp_type: "q8_0" (default for quantized file types), "f16", "bf16", "f32" or "same";
    for F32/F16/BF16 file types the default is the file type itself. imatrix: a file from
    llama-imatrix; it needs no entries for the MTP blocks.
    """
    name = _file_type(file_type)
    mtp = _mtp_type(mtp_type, name)
    model = open_model(src)
    if model.n_layer_all is None:
        raise ModelLoadError(f"{model.path}: no {model.arch}.block_count: not a text model; nothing to quantize")
    if model.mtp_status == "partial":
        raise MtpError(f"{model.path}: MTP tensors partial (missing {', '.join(model.mtp_missing[:3])}); llama.cpp "
                       "refuses such a file, quantized or not; re-convert the model with all its MTP layers")
    out = Path(out)
    check_output(out, (model.path,), overwrite)
    if not allow_requantize:
        _check_not_quantized(model)
    check_space(out, model.header.file_size)      # the input's size: more than any output needs
    entries = load_imatrix(imatrix) if imatrix is not None else {}
    _run(model.path, out, FILE_TYPES[name], MTP_TYPES[mtp], threads, entries, allow_requantize, overwrite)
    written = open_model(out)
    types: dict[str, int] = {}
    for t in written.mtp_tensors:
        types[t.type.name] = types.get(t.type.name, 0) + 1
    return QuantizeResult(out, name, mtp, types, written.header.file_size)


def _file_type(file_type: str) -> str:
    name = str(file_type).upper()
    if name not in FILE_TYPES:
        raise InvalidArgumentError(f"unknown quantization type {file_type!r}; choose one of: {', '.join(FILE_TYPES)}")
    return name


def _mtp_type(mtp_type: str | None, file_type: str) -> str:
    if mtp_type is None:
        return file_type.lower() if file_type in UNQUANTIZED else "q8_0"
    mtp = str(mtp_type).lower()
    if mtp not in MTP_TYPES:
        raise InvalidArgumentError(f"unknown --mtp-type {mtp_type!r}; choose one of: {', '.join(MTP_TYPES)}")
    if file_type in UNQUANTIZED and mtp not in ("same", file_type.lower()):
        raise InvalidArgumentError(f"{file_type} keeps every tensor at {file_type}, so the MTP blocks cannot be "
                                   f"{mtp}; drop --mtp-type or use a quantized type such as Q8_0")
    return mtp


def _check_not_quantized(model: ModelFile) -> None:
    """llama.cpp refuses to requantize only when it reaches such a tensor; say it first."""
    for t in model.header.tensors.values():
        if len(t.shape) >= 2 and t.type not in _SOURCE_TYPES:
            raise InvalidArgumentError(
                f"{model.path}: already quantized ({t.name} is {t.type.name}); quantize from the F32/F16/BF16 "
                "file for best quality, or pass --allow-requantize")


def _run(src: Path, out: Path, ftype: int, mtp: Q | None, threads: int, entries, allow_requantize: bool,
         overwrite: bool) -> None:
    from .._native import check, ffi, lib   # the native library only when quantizing

    p = ffi.new("pmtp_quantize_params *", lib.pmtp_quantize_default_params())
    p.ftype = ftype
    p.mtp_type = -1 if mtp is None else int(mtp)
    p.n_threads = threads
    p.allow_requantize = allow_requantize
    p.overwrite = overwrite
    keep = []      # cffi buffers must outlive the call
    if entries:
        names = [ffi.new("char[]", n.encode()) for n in entries]
        values = [ffi.from_buffer("float[]", v) for v in entries.values()]
        keep += [names, values, list(entries.values())]
        p.imatrix_names = c_names = ffi.new("const char *[]", names)
        p.imatrix_values = c_values = ffi.new("const float *[]", values)
        p.imatrix_sizes = c_sizes = ffi.new("size_t[]", [v.size for v in entries.values()])
        keep += [c_names, c_values, c_sizes]
        p.n_imatrix = len(entries)
    check(lib.pmtp_quantize(str(src).encode(), str(out).encode(), p))
    del keep
