"""Read a GGUF file's metadata and tensor infos, never its tensor data.

Why not ``gguf.GGUFReader``: it builds numpy views for every element of every metadata
array, so opening a file with a 150k-token vocabulary takes about 10 s whatever the model
size. This reader walks the header with ``struct`` over an mmap (a fraction of a second)
and takes the format's constants from the ``gguf`` package. Every problem is a
:class:`~pyllama_mtp.errors.ModelLoadError` naming the file, what is wrong and the fix.
"""
from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGMLQuantizationType, GGUFValueType

from ..errors import ModelLoadError

_MAGIC = b"GGUF"
_VERSIONS = (2, 3)
_MAX_DIMS = 4          # GGML_MAX_DIMS
_SCALAR_FORMATS = {
    GGUFValueType.UINT8: "B", GGUFValueType.INT8: "b", GGUFValueType.UINT16: "H", GGUFValueType.INT16: "h",
    GGUFValueType.UINT32: "I", GGUFValueType.INT32: "i", GGUFValueType.UINT64: "Q", GGUFValueType.INT64: "q",
    GGUFValueType.FLOAT32: "f", GGUFValueType.FLOAT64: "d", GGUFValueType.BOOL: "?",
}


@dataclass(frozen=True)
class Field:
    """One metadata value with its GGUF types, so that a copy writes the same bytes."""
    type: GGUFValueType
    value: Any                          # int, float, bool, str (bytes if not UTF-8), or a list of them
    sub_type: GGUFValueType | None      # the element type of an array


@dataclass(frozen=True)
class TensorInfo:
    name: str
    type: GGMLQuantizationType
    shape: tuple[int, ...]              # ggml order: ne[0] (the row length) first
    offset: int                         # absolute position of the data in the file

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)

    @property
    def n_bytes(self) -> int:
        block_size, type_size = GGML_QUANT_SIZES[self.type]
        return self.n_elements // block_size * type_size


@dataclass(frozen=True)
class GgufHeader:
    path: Path
    file_size: int
    byte_order: str                     # struct prefix: "<" little-endian, ">" big-endian
    alignment: int
    fields: dict[str, Field]            # in file order
    tensors: dict[str, TensorInfo]      # in file order

    def get(self, key: str, default: Any = None) -> Any:
        field = self.fields.get(key)
        return default if field is None else field.value


def read_header(path) -> GgufHeader:
    """The header of the GGUF file at path, checked against the file's size so that a
    truncated download fails here and not when a tensor is first read."""
    path = Path(path)
    _check_file(path)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        header = _Parser(path, mm).header()
    for t in header.tensors.values():
        end = t.offset + t.n_bytes
        if end > header.file_size:
            raise ModelLoadError(f"{path}: truncated: tensor '{t.name}' ends at byte {end} but the file has "
                                 f"{header.file_size} bytes; the download or conversion did not finish")
    return header


def _check_file(path: Path) -> None:
    """The failures a user meets most, each with its own message (as csrc/model.cpp)."""
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file; check the path")
    if path.is_dir():
        raise ModelLoadError(f"{path}: is a directory; pass the path of a .gguf file inside it")
    if path.stat().st_size == 0:
        raise ModelLoadError(f"{path}: file is empty; re-download or re-convert the model")
    with open(path, "rb") as f:
        if f.read(4) != _MAGIC:
            raise ModelLoadError(f"{path}: not a GGUF file (bad magic); convert the model to GGUF first")


class _Parser:
    """A cursor over the mapped file; every read is bounds-checked, so a corrupted length
    field fails with a message instead of reading garbage."""

    def __init__(self, path: Path, mm: mmap.mmap):
        self.path = path
        self.mm = mm
        self.pos = 4                    # after the magic
        self.order = "<"

    def fail(self, what: str) -> ModelLoadError:
        return ModelLoadError(f"{self.path}: corrupted or truncated GGUF header ({what}); "
                              "re-download or re-convert the model")

    def header(self) -> GgufHeader:
        version = self.scalar("I")
        if version & 0xFFFF == 0:       # written on a big-endian machine
            self.order = ">"
            version = struct.unpack(">I", struct.pack("<I", version))[0]
        if version not in _VERSIONS:
            raise ModelLoadError(f"{self.path}: GGUF version {version} is not supported (only 2 and 3); "
                                 "re-convert the model with a current llama.cpp")
        n_tensors, n_kv = self.scalar("Q"), self.scalar("Q")
        fields = self.fields(n_kv)
        infos = [self.tensor_info() for _ in range(n_tensors)]
        alignment = self.alignment(fields)
        data_offset = -(-self.pos // alignment) * alignment
        tensors = {}
        for name, ggml_type, shape, offset in infos:
            if name in tensors:
                raise self.fail(f"duplicate tensor '{name}'")
            tensors[name] = TensorInfo(name, ggml_type, shape, data_offset + offset)
        return GgufHeader(self.path, len(self.mm), self.order, alignment, fields, tensors)

    def take(self, n: int) -> int:
        """Reserve n bytes at the cursor and return where they start."""
        if n < 0 or self.pos + n > len(self.mm):
            raise self.fail(f"{n} bytes at byte {self.pos} run past the end of the file ({len(self.mm)} bytes)")
        start, self.pos = self.pos, self.pos + n
        return start

    def scalar(self, fmt: str) -> Any:
        fmt = self.order + fmt
        return struct.unpack_from(fmt, self.mm, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str | bytes:
        n = self.scalar("Q")
        start = self.take(n)
        raw = self.mm[start:start + n]
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:      # kept as bytes: llama.cpp does not require UTF-8 either
            return raw

    def value_type(self) -> GGUFValueType:
        raw = self.scalar("I")
        try:
            return GGUFValueType(raw)
        except ValueError:
            raise self.fail(f"unknown metadata type {raw} at byte {self.pos - 4}") from None

    def value(self, vtype: GGUFValueType) -> Field:
        if vtype == GGUFValueType.STRING:
            return Field(vtype, self.string(), None)
        if vtype == GGUFValueType.ARRAY:
            sub_type = self.value_type()
            return Field(vtype, self.array(sub_type, self.scalar("Q")), sub_type)
        return Field(vtype, self.scalar(_SCALAR_FORMATS[vtype]), None)

    def array(self, sub_type: GGUFValueType, n: int) -> list:
        fmt = _SCALAR_FORMATS.get(sub_type)
        if fmt is None:                 # strings and nested arrays: one at a time
            return [self.value(sub_type).value for _ in range(n)]
        dtype = np.dtype(self.order + fmt)
        start = self.take(n * dtype.itemsize)
        return np.frombuffer(self.mm, dtype, n, start).tolist()

    def fields(self, n_kv: int) -> dict[str, Field]:
        fields = {}
        for _ in range(n_kv):
            key = self.string()
            if key in fields:
                raise self.fail(f"duplicate metadata key '{key}'")
            fields[key] = self.value(self.value_type())
        return fields

    def tensor_info(self) -> tuple[str, GGMLQuantizationType, tuple[int, ...], int]:
        name = self.string()
        n_dims = self.scalar("I")
        if not 1 <= n_dims <= _MAX_DIMS:
            raise self.fail(f"tensor '{name}' has {n_dims} dimensions")
        shape = tuple(self.scalar("Q") for _ in range(n_dims))
        raw_type = self.scalar("I")
        try:
            ggml_type = GGMLQuantizationType(raw_type)
        except ValueError:
            raise ModelLoadError(f"{self.path}: tensor '{name}' has type id {raw_type}, unknown to the installed "
                                 "gguf package; upgrade it: pip install -U gguf") from None
        if shape[0] % GGML_QUANT_SIZES[ggml_type][0]:
            raise self.fail(f"tensor '{name}' rows of {shape[0]} are not whole {ggml_type.name} blocks")
        return name, ggml_type, shape, self.scalar("Q")

    def alignment(self, fields: dict[str, Field]) -> int:
        field = fields.get("general.alignment")
        if field is None:
            return GGUF_DEFAULT_ALIGNMENT
        if field.type != GGUFValueType.UINT32 or field.value <= 0 or field.value & (field.value - 1):
            raise self.fail(f"general.alignment {field.value!r} is not a power of two")
        return field.value
