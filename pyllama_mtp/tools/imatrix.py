"""Read an importance matrix as llama-imatrix writes it (GGUF, or the older .dat
layout) into what the quantizer takes: per tensor, the mean squared activation of each
input column, [n_per_row * n_expert] floats.

GGUF files hold ``NAME.in_sum2`` (sums over all tokens, [n_expert, n_per_row]) and
``NAME.counts`` (tokens per expert, [n_expert]); the mean is sum / count, and a column of
an expert that saw no token gets 1 (no preference). The .dat layout stores
int32 n_entries, then per entry int32 name length, the name, int32 ncall, int32 n_values
and n_values float32 that are divided by ncall.
"""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader

from ..errors import InvalidArgumentError

_SUMS, _COUNTS = ".in_sum2", ".counts"


def load_imatrix(path) -> dict[str, np.ndarray]:
    path = Path(path)
    if not path.is_file():
        raise InvalidArgumentError(f"{path}: no such importance-matrix file; check the --imatrix path")
    with open(path, "rb") as f:
        magic = f.read(4)
    entries = _load_gguf(path) if magic == b"GGUF" else _load_dat(path)
    if not entries:
        raise InvalidArgumentError(f"{path}: holds no importance data; re-run llama-imatrix")
    for name, values in entries.items():
        if not np.all(np.isfinite(values)):
            raise InvalidArgumentError(f"{path}: importance data of '{name}' is not finite; re-run llama-imatrix")
    return entries


def _bad(path: Path, what: str) -> InvalidArgumentError:
    return InvalidArgumentError(f"{path}: not an importance matrix ({what}); pass a file written by llama-imatrix")


def _load_gguf(path: Path) -> dict[str, np.ndarray]:
    try:
        reader = GGUFReader(path)
    except Exception as e:   # the gguf package raises bare ValueError/struct errors on bad files
        raise _bad(path, f"unreadable GGUF: {e}") from None
    tensors = {t.name: t for t in reader.tensors}
    entries = {}
    for name, t in tensors.items():
        if not name.endswith(_SUMS):
            continue
        base = name[:-len(_SUMS)]
        counts = tensors.get(base + _COUNTS)
        if counts is None:
            raise _bad(path, f"'{name}' has no matching '{base}{_COUNTS}'")
        if t.tensor_type != GGMLQuantizationType.F32 or counts.tensor_type != GGMLQuantizationType.F32:
            raise _bad(path, f"'{base}' sums and counts must be F32")
        sums = np.asarray(t.data, dtype=np.float32).reshape(-1)
        n = np.asarray(counts.data, dtype=np.float32).reshape(-1)
        if n.size == 0 or sums.size % n.size:
            raise _bad(path, f"'{base}' has {sums.size} sums for {n.size} counts")
        per_expert = sums.reshape(n.size, -1)
        mean = np.where(n[:, None] > 0, per_expert / np.maximum(n[:, None], 1), 1.0)
        entries[base] = mean.astype(np.float32).reshape(-1)
    return entries


def _load_dat(path: Path) -> dict[str, np.ndarray]:
    data = path.read_bytes()
    pos = 0

    def take(n: int) -> bytes:
        nonlocal pos
        if pos + n > len(data):
            raise _bad(path, "truncated")
        pos += n
        return data[pos - n:pos]

    n_entries = struct.unpack("<i", take(4))[0]
    if n_entries < 1:
        raise _bad(path, f"{n_entries} entries")
    entries = {}
    for _ in range(n_entries):
        n_name = struct.unpack("<i", take(4))[0]
        if n_name < 1:
            raise _bad(path, "empty tensor name")
        name = take(n_name).decode("utf-8", "replace")
        ncall, n_values = struct.unpack("<ii", take(8))
        if n_values < 1:
            raise _bad(path, f"'{name}' has {n_values} values")
        values = np.frombuffer(take(4 * n_values), dtype="<f4").astype(np.float32)
        entries[name] = values / ncall if ncall > 0 else values
    return entries
