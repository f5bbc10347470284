"""Frozen, validated configuration objects. Unknown options raise TypeError
(dataclasses do that for us); bad values raise InvalidArgumentError here, before
anything reaches native code."""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InvalidArgumentError

_SPLIT_MODES = {"none": 0, "layer": 1, "row": 2}
_MTP_PLACEMENTS = {"local": 0, "split": 1}
_KV_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8, "bf16": 30}


def _engine_limits() -> dict[str, int]:
    """The ``#define PMTP_MAX_*`` limits of pmtp.h, the one place they are defined (the
    header ships next to the native library; a source tree has it in csrc/). Read as text,
    so this module imports without the native library."""
    here = Path(__file__).resolve().parent
    for header in (here / "lib" / "pmtp.h", here.parent / "csrc" / "pmtp.h"):
        if header.is_file():
            found = re.findall(r"^#define PMTP_(MAX_\w+) (\d+)", header.read_text(), re.MULTILINE)
            return {name: int(value) for name, value in found}
    raise ImportError(f"pmtp.h not found in {here / 'lib'} or {here.parent / 'csrc'}; reinstall pyllama-mtp")


_LIMITS = _engine_limits()
MAX_DRAFT = _LIMITS["MAX_DRAFT"]                  # drafts per step
MAX_SEQUENCES = _LIMITS["MAX_SEQUENCES"]          # sequences decoded together
MAX_TOP_LOGPROBS = _LIMITS["MAX_TOP_LOGPROBS"]    # alternatives per token with logprobs


def default_threads() -> int:
    return max(1, min(os.cpu_count() or 1, 8))


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise InvalidArgumentError(message)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass(frozen=True)
class ModelConfig:
    """How to load a GGUF file."""
    path: str
    n_gpu_layers: int = -1
    use_mmap: bool = True
    load_mtp: bool = False
    split_mode: str = "layer"
    main_gpu: int = 0
    tensor_split: tuple[float, ...] | None = None
    rpc: tuple[str, ...] = ()          # "host:port" RPC workers whose devices join the split
    mtp_placement: str = "local"       # with rpc: MTP layers + output layer on this host, or "split"
    rpc_timeout: float = 120.0         # seconds without an answer before a worker counts as lost

    def __post_init__(self):
        _require(isinstance(self.path, (str, os.PathLike)), f"model path must be a str or PathLike, got {type(self.path).__name__}")
        object.__setattr__(self, "path", os.fspath(self.path))
        _require(_is_int(self.n_gpu_layers), "n_gpu_layers must be an int (-1 = all)")
        _require(self.split_mode in _SPLIT_MODES, f"split_mode must be one of {sorted(_SPLIT_MODES)}, got {self.split_mode!r}")
        _require(_is_int(self.main_gpu) and self.main_gpu >= 0, "main_gpu must be an int >= 0")
        if self.tensor_split is not None:
            split = tuple(float(x) for x in self.tensor_split)
            _require(all(math.isfinite(x) and x >= 0 for x in split) and sum(split) > 0,
                     "tensor_split must be non-negative proportions with a positive sum")
            object.__setattr__(self, "tensor_split", split)
        object.__setattr__(self, "rpc", parse_rpc_endpoints(self.rpc))
        _require(self.mtp_placement in _MTP_PLACEMENTS,
                 f"mtp_placement must be one of {sorted(_MTP_PLACEMENTS)}, got {self.mtp_placement!r}")
        _require(isinstance(self.rpc_timeout, (int, float)) and not isinstance(self.rpc_timeout, bool)
                 and math.isfinite(self.rpc_timeout) and self.rpc_timeout >= 0,
                 f"rpc_timeout must be a number of seconds >= 0 (0 = wait forever), got {self.rpc_timeout!r}")

    @property
    def split_mode_id(self) -> int:
        return _SPLIT_MODES[self.split_mode]

    @property
    def mtp_placement_id(self) -> int:
        return _MTP_PLACEMENTS[self.mtp_placement]


def parse_rpc_endpoints(rpc) -> tuple[str, ...]:
    """'h1:p1,h2:p2' or a sequence of 'host:port' -> a tuple, each checked."""
    if rpc is None:
        return ()
    if isinstance(rpc, str):
        rpc = [part.strip() for part in rpc.split(",") if part.strip()]
    _require(all(isinstance(ep, str) for ep in rpc), f"rpc must be 'host:port' strings, got {rpc!r}")
    out = tuple(rpc)
    for ep in out:
        host, sep, port = ep.rpartition(":")
        _require(bool(sep and host and port.isdigit() and 1 <= int(port) <= 65535),
                 f"RPC endpoint {ep!r} is not host:port (e.g. 192.168.1.20:50052)")
    _require(len(set(out)) == len(out), f"an RPC endpoint is listed twice: {list(out)}")
    return out


@dataclass(frozen=True)
class ContextConfig:
    """The target context (and the MTP heads' contexts, which mirror it)."""
    n_ctx: int = 4096
    n_batch: int = 512
    n_ubatch: int = 512
    threads: int = field(default_factory=default_threads)
    threads_batch: int | None = None
    type_k: str | None = None
    type_v: str | None = None
    flash_attn: bool | None = None
    draft_max: int = 0
    swa_guard: bool = True
    unsafe_split_verify: bool = False
    n_seq_max: int = 1            # sequences decoded together; n_ctx is per sequence

    def __post_init__(self):
        _require(_is_int(self.n_ctx) and self.n_ctx > 0, f"n_ctx must be a positive int, got {self.n_ctx!r}")
        _require(_is_int(self.n_seq_max) and 1 <= self.n_seq_max <= MAX_SEQUENCES,
                 f"n_seq_max must be an int in [1, {MAX_SEQUENCES}], got {self.n_seq_max!r}")
        _require(_is_int(self.n_batch) and self.n_batch > 0, f"n_batch must be a positive int, got {self.n_batch!r}")
        _require(_is_int(self.n_ubatch) and self.n_ubatch > 0, f"n_ubatch must be a positive int, got {self.n_ubatch!r}")
        _require(_is_int(self.threads) and self.threads > 0, f"threads must be a positive int, got {self.threads!r}")
        if self.threads_batch is None:
            object.__setattr__(self, "threads_batch", self.threads)
        _require(_is_int(self.threads_batch) and self.threads_batch > 0, "threads_batch must be a positive int")
        for name in ("type_k", "type_v"):
            value = getattr(self, name)
            _require(value is None or value in _KV_TYPES, f"{name} must be one of {sorted(_KV_TYPES)}, got {value!r}")
        _require(_is_int(self.draft_max) and 0 <= self.draft_max <= MAX_DRAFT,
                 f"draft must be an int in [1, {MAX_DRAFT}], got {self.draft_max!r}")

    def kv_type_id(self, name: str) -> int:
        value = getattr(self, name)
        return -1 if value is None else _KV_TYPES[value]

    @property
    def flash_attn_id(self) -> int:
        return -1 if self.flash_attn is None else int(bool(self.flash_attn))


@dataclass(frozen=True)
class SamplingParams:
    """llama.cpp's sampler chain: penalties, then greedy (temperature <= 0) or
    top_k -> top_p -> min_p -> temperature -> seeded draw."""
    temperature: float = 0.0
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    penalty_last_n: int = 64
    seed: int = 0xFFFFFFFF
    accept: str | None = None     # MTP at temperature > 0: "rejection" (default) or "match"
    n_logprobs: int = -1          # -1 off; 0 each token's logprob; k <= MAX_TOP_LOGPROBS also the top k

    def __post_init__(self):
        for name in ("temperature", "top_p", "min_p", "repeat_penalty", "presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _require(isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value),
                     f"{name} must be a finite number, got {value!r}")
        _require(self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}")
        _require(_is_int(self.top_k) and self.top_k >= 0, f"top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
        _require(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        _require(0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}")
        _require(self.repeat_penalty > 0, f"repeat_penalty must be > 0 (1 = off), got {self.repeat_penalty}")
        _require(_is_int(self.penalty_last_n) and self.penalty_last_n >= -1, "penalty_last_n must be an int >= -1")
        _require(_is_int(self.seed) and 0 <= self.seed <= 0xFFFFFFFF, f"seed must be an int in [0, 2**32), got {self.seed!r}")
        _require(_is_int(self.n_logprobs) and -1 <= self.n_logprobs <= MAX_TOP_LOGPROBS,
                 f"logprobs must be an int in [0, {MAX_TOP_LOGPROBS}], got {self.n_logprobs!r}")
        _require(self.accept in (None, "match", "rejection"),
                 f"accept must be 'match' or 'rejection', got {self.accept!r}")

    @property
    def accept_id(self) -> int:
        """0 match, 1 rejection sampling (the default; greedy decoding is the same either way)."""
        return 0 if self.accept == "match" else 1

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0
