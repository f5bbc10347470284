"""Read tensors from Hugging Face checkpoints (safetensors) with numpy alone.

The format: 8 bytes little-endian header length, a JSON header mapping each tensor name to
its dtype, shape and byte range, then the raw little-endian data. A shard is memory-mapped,
so reading a few tensors of a 100 GB checkpoint touches only their bytes. A directory
names its shards in ``model.safetensors.index.json`` (``weight_map``: tensor -> file), or
holds one ``model.safetensors``.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ModelLoadError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
_MAX_HEADER = 100 * 2**20          # the format's own limit on the JSON header
_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
           "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str                      # safetensors dtype name, e.g. "BF16"
    shape: tuple[int, ...]
    path: Path
    start: int                      # absolute byte range in the file
    end: int


class SafetensorsFile:
    def __init__(self, path):
        self.path = Path(path)
        self.entries = _read_header(self.path)
        self._map: np.memmap | None = None

    def read(self, name: str) -> np.ndarray:
        """The tensor as numpy; BF16 arrives as float32 (exactly), other floats as stored."""
        e = self.entries.get(name)
        if e is None:
            raise ModelLoadError(f"{self.path}: has no tensor '{name}' although the index names this file for it; "
                                 "the checkpoint is incomplete, re-download it")
        if e.dtype not in _DTYPES:
            raise NotImplementedError(f"{self.path}: tensor '{name}' is {e.dtype}; only unquantized checkpoints "
                                      f"({', '.join(_DTYPES)}) can be read, not FP8 or other quantized ones")
        if self._map is None:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        raw = np.frombuffer(self._map[e.start:e.end], dtype=np.dtype(_DTYPES[e.dtype]).newbyteorder("<"))
        if raw.size != int(np.prod(e.shape, dtype=np.int64)):
            raise ModelLoadError(f"{self.path}: tensor '{name}' holds {raw.size} values for shape {list(e.shape)}; "
                                 "the file is corrupted, re-download it")
        data = raw.reshape(e.shape)
        if e.dtype == "BF16":           # bf16 is the top half of a float32
            return (data.astype(np.uint32) << 16).view(np.float32)
        return data.astype(data.dtype.newbyteorder("="), copy=False)


def _read_header(path: Path) -> dict[str, TensorEntry]:
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0] if size >= 8 else -1
            if not 0 < n <= min(_MAX_HEADER, size - 8):
                raise ModelLoadError(f"{path}: not a safetensors file (bad header length); re-download the checkpoint")
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error) as e:
        if isinstance(e, ModelLoadError):
            raise
        raise ModelLoadError(f"{path}: cannot read the safetensors header ({e}); re-download the checkpoint") from None
    base = 8 + n
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            start, end = (int(x) for x in info["data_offsets"])
            entry = TensorEntry(name, str(info["dtype"]), tuple(int(d) for d in info["shape"]), path,
                                base + start, base + end)
        except (KeyError, TypeError, ValueError):
            raise ModelLoadError(f"{path}: malformed header entry for '{name}'; re-download the checkpoint") from None
        if not 0 <= entry.start <= entry.end <= size:
            raise ModelLoadError(f"{path}: tensor '{name}' lies outside the file ({size} bytes); the download "
                                 "did not finish")
        entries[name] = entry
    return entries


def weight_map(model_dir: Path) -> dict[str, str]:
    """tensor name -> shard file name, from the index or the single file's own header."""
    index = model_dir / INDEX
    if index.is_file():
        try:
            data = json.loads(index.read_text())
            mapping = data["weight_map"]
        except (OSError, ValueError, KeyError, TypeError):
            raise ModelLoadError(f"{index}: not a safetensors index (no weight_map); re-download the checkpoint") \
                from None
        if not isinstance(mapping, dict):
            raise ModelLoadError(f"{index}: weight_map is not an object; re-download the checkpoint")
        return {str(k): str(v) for k, v in mapping.items()}
    if (model_dir / SINGLE).is_file():
        return {name: SINGLE for name in _read_header(model_dir / SINGLE)}
    raise ModelLoadError(f"{model_dir}: no {INDEX} and no {SINGLE}; pass a Hugging Face checkpoint directory "
                         "with safetensors weights")
