"""A GGUF file seen as a model with MTP layers: which blocks are trunk and which are MTP,
which MTP tensors it holds, and the sizes a graft must match. The classification is the
runtime's (csrc/model.cpp), so inspect and graft say what ``Llama()`` will do with the file.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ModelLoadError
from .gguf_header import GgufHeader, TensorInfo, read_header

# The tensors every MTP block needs (csrc/model.cpp MTP_REQUIRED).
MTP_REQUIRED = ("nextn.eh_proj.weight", "nextn.enorm.weight", "nextn.hnorm.weight")

TRUNK, MTP, SHARED = "trunk", "mtp", "embeddings+output"
_BLOCK = re.compile(r"blk\.(\d+)\.")


@dataclass(frozen=True)
class ModelFile:
    header: GgufHeader
    arch: str

    @property
    def path(self) -> Path:
        return self.header.path

    def key(self, name: str, default: Any = None) -> Any:
        """An architecture key: key("block_count") reads "{arch}.block_count"."""
        return self.header.get(f"{self.arch}.{name}", default)

    def count_key(self, name: str, default: int | None = None) -> int | None:
        """A count the block arithmetic relies on: anything but a non-negative integer is
        a corrupted file, reported as such instead of failing later in arithmetic."""
        value = self.key(name, default)
        if value is not None and (type(value) is not int or value < 0):
            raise ModelLoadError(f"{self.path}: {self.arch}.{name} is {value!r}, not a count; the file is "
                                 "corrupted or its converter is broken; re-convert the model")
        return value

    @property
    def n_layer_all(self) -> int | None:
        """Blocks in the file's numbering, trunk and MTP (None: not a text model)."""
        return self.count_key("block_count")

    @property
    def n_layer_mtp(self) -> int:
        return self.count_key("nextn_predict_layers", 0)

    @property
    def n_layer(self) -> int | None:
        """Trunk blocks: the MTP blocks are the last nextn_predict_layers of block_count."""
        if self.n_layer_all is None:
            return None
        if self.n_layer_mtp > self.n_layer_all:
            raise ModelLoadError(f"{self.path}: {self.arch}.nextn_predict_layers ({self.n_layer_mtp}) exceeds "
                                 f"{self.arch}.block_count ({self.n_layer_all}), which counts the MTP layers too; "
                                 "re-convert the model")
        return self.n_layer_all - self.n_layer_mtp

    @property
    def n_embd(self) -> int | None:
        return self.count_key("embedding_length")

    @property
    def n_vocab(self) -> int | None:
        tokens = self.header.get("tokenizer.ggml.tokens")
        return None if tokens is None else len(tokens)

    @property
    def n_embd_rows(self) -> int | None:
        """Rows of token_embd.weight: the vocabulary the weights were trained for."""
        t = self.header.tensors.get("token_embd.weight")
        return None if t is None or len(t.shape) < 2 else t.shape[1]

    def group_of(self, name: str) -> str:
        m = _BLOCK.match(name)
        if m is None:
            return SHARED
        return MTP if self.n_layer is not None and int(m[1]) >= self.n_layer else TRUNK

    @property
    def mtp_tensors(self) -> list[TensorInfo]:
        return [t for t in self.header.tensors.values() if self.group_of(t.name) == MTP]

    @property
    def has_trunk(self) -> bool:
        """False for an MTP-only file, which upstream recognizes by its missing blk.0.attn_norm."""
        return "blk.0.attn_norm.weight" in self.header.tensors or (self.n_layer or 0) <= 0

    @property
    def mtp_missing(self) -> list[str]:
        """The required MTP tensors the file lacks, in block order."""
        if not self.n_layer_mtp or self.n_layer is None:
            return []
        return [f"blk.{il}.{suffix}" for il in range(self.n_layer, self.n_layer_all) for suffix in MTP_REQUIRED
                if f"blk.{il}.{suffix}" not in self.header.tensors]

    @property
    def mtp_status(self) -> str:
        """"all", "partial" (some MTP tensors, not every required one) or "none"."""
        if not self.mtp_tensors:
            return "none"
        return "partial" if self.mtp_missing else "all"


def open_model(path) -> ModelFile:
    header = read_header(path)
    arch = header.get("general.architecture")
    if not isinstance(arch, str):
        raise ModelLoadError(f"{header.path}: GGUF has no general.architecture; it is not a llama.cpp model file")
    return ModelFile(header, arch)
