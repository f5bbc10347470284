"""Model and Session: thin Python objects over the native handles.

Each owns one handle, frees it in ``close()`` (idempotent), works as a context
manager, and has a ``weakref.finalize`` safety net. A Session keeps its Model
(and MTP model) alive.
"""
from __future__ import annotations

import json
import weakref
from dataclasses import dataclass

import numpy as np

from . import _native
from ._native import check, ffi, lib
from .config import ContextConfig, ModelConfig, SamplingParams
from .errors import ClosedError, InvalidArgumentError


class _Handle:
    """Owns one native pointer; subclasses name the free function."""
    _free = None
    _kind = "object"

    def _own(self, ptr) -> None:
        self._ptr = ptr
        self._finalizer = weakref.finalize(self, type(self)._free, ptr)

    def _check_open(self):
        ptr = getattr(self, "_ptr", None)
        if ptr is None:
            raise ClosedError(f"this {self._kind} is closed; create a new one")
        return ptr

    @property
    def closed(self) -> bool:
        return getattr(self, "_ptr", None) is None

    def close(self) -> None:
        if getattr(self, "_ptr", None) is not None:
            self._ptr = None
            self._finalizer()

    def __enter__(self):
        self._check_open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass(frozen=True)
class ModelInfo:
    arch: str
    description: str
    n_vocab: int
    n_ctx_train: int
    n_embd: int
    n_layer: int
    n_layer_mtp: int
    n_swa: int
    size_bytes: int
    n_params: int
    token_bos: int
    token_eos: int
    token_eot: int
    add_bos: bool
    add_eos: bool
    has_mtp_tensors: bool
    has_trunk_tensors: bool
    mtp_loaded: bool
    is_recurrent: bool


_DEVICE_TYPES = {0: "cpu", 1: "gpu", 2: "igpu", 3: "accel"}


@dataclass(frozen=True)
class DeviceInfo:
    name: str
    description: str
    type: str                 # "cpu", "gpu", "igpu" or "accel"
    endpoint: str | None      # "host:port" of the RPC worker that serves it; None when local
    memory_free: int          # bytes (0 when a device does not report, or a worker was lost)
    memory_total: int


def _devices(fn, *args) -> list[DeviceInfo]:
    cap = 64
    raw = ffi.new("pmtp_device_info[]", cap)
    n = ffi.new("size_t *")
    check(fn(*args, raw, cap, n))
    out = []
    for d in raw[0:min(n[0], cap)]:
        endpoint = ffi.string(d.endpoint).decode()
        out.append(DeviceInfo(name=ffi.string(d.name).decode(), description=ffi.string(d.description).decode(),
                              type=_DEVICE_TYPES.get(d.type, str(d.type)), endpoint=endpoint or None,
                              memory_free=int(d.memory_free), memory_total=int(d.memory_total)))
    return out


def local_devices() -> list[DeviceInfo]:
    """This host's devices (what an RPC worker here can serve)."""
    return _devices(lib.pmtp_local_devices)


def rpc_protocol_version() -> str | None:
    """The RPC protocol version this build speaks ("major.minor.patch"); None without RPC."""
    v = ffi.new("int32_t[3]")
    if not lib.pmtp_rpc_version(v, v + 1, v + 2):
        return None
    return f"{v[0]}.{v[1]}.{v[2]}"


class Model(_Handle):
    """A loaded GGUF model: metadata and tokenizer; sessions do the compute."""
    _free = lib.pmtp_model_free
    _kind = "model"

    def __init__(self, config: ModelConfig, progress=None):
        self.config = config
        params = ffi.new("pmtp_model_params *", lib.pmtp_model_default_params())
        params.n_gpu_layers = config.n_gpu_layers
        params.split_mode = config.split_mode_id
        params.main_gpu = config.main_gpu
        params.use_mmap = config.use_mmap
        params.load_mtp = config.load_mtp
        keep = []
        if config.tensor_split:
            split = ffi.new("float[]", list(config.tensor_split))
            keep.append(split)
            params.tensor_split = split
            params.n_tensor_split = len(config.tensor_split)
        if progress is not None:
            callback = ffi.callback("bool(float, void *)", lambda p, _u: bool(progress(float(p)) is not False))
            keep.append(callback)
            params.progress = callback
        if config.rpc:
            endpoints = [ffi.new("char[]", ep.encode()) for ep in config.rpc]
            array = ffi.new("const char *[]", endpoints)
            keep += [endpoints, array]
            params.rpc_servers = array
            params.n_rpc_servers = len(endpoints)
            params.mtp_placement = config.mtp_placement_id
            check(lib.pmtp_rpc_set_timeout(float(config.rpc_timeout)))
        out = ffi.new("pmtp_model **")
        check(lib.pmtp_model_load(config.path.encode(), params, out))
        self._own(out[0])
        self.info = self._read_info()
        self._pieces: list[bytes] | None = None
        self._eog: frozenset[int] | None = None

    @property
    def path(self) -> str:
        return self.config.path

    @property
    def devices(self) -> list[DeviceInfo]:
        """Every device this model uses: the local CPU first, then the devices of its layer
        split (RPC workers' devices, then local GPUs), with free/total memory now."""
        return _devices(lib.pmtp_model_devices, self._check_open())

    def _read_info(self) -> ModelInfo:
        raw = ffi.new("pmtp_model_info *")
        check(lib.pmtp_model_get_info(self._check_open(), raw))
        values = {}
        for name in ModelInfo.__dataclass_fields__:
            key = "desc" if name == "description" else name
            value = getattr(raw, key)
            values[name] = ffi.string(value).decode() if isinstance(value, ffi.CData) else value
        return ModelInfo(**values)

    def meta(self, key: str) -> str | None:
        """A metadata value as a string, or None when the file has no such key."""
        ptr = self._check_open()
        try:
            return _native.read_string(lib.pmtp_model_meta, ptr, key.encode())
        except InvalidArgumentError:
            return None

    @property
    def chat_template(self) -> str | None:
        return self.meta("tokenizer.chat_template")

    def tokenize(self, text: str | bytes, *, add_special: bool = True, parse_special: bool = False) -> list[int]:
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        ptr = self._check_open()
        cap = len(data) + 8
        n_out = ffi.new("size_t *")
        while True:
            out = ffi.new("int32_t[]", cap)
            status = lib.pmtp_tokenize(ptr, data, len(data), add_special, parse_special, out, cap, n_out)
            if status == 9 and n_out[0] > cap:
                cap = n_out[0]
                continue
            check(status)
            return list(ffi.unpack(out, n_out[0]))

    def detokenize(self, tokens, *, remove_special: bool = False, unparse_special: bool = False) -> str:
        toks = ffi.new("int32_t[]", list(tokens))
        return _native.read_string(lib.pmtp_detokenize, self._check_open(), toks, len(toks),
                                   remove_special, unparse_special)

    @property
    def token_pieces(self) -> list[bytes]:
        """Bytes of every token as it appears in generated text (control tokens are empty)."""
        if self._pieces is None:
            ptr = self._check_open()
            n_out = ffi.new("size_t *")
            check(lib.pmtp_vocab_pieces(ptr, False, ffi.NULL, 0, ffi.NULL, n_out))
            size = n_out[0]
            buf = ffi.new("char[]", max(size, 1))
            offsets = ffi.new("uint32_t[]", self.info.n_vocab + 1)
            check(lib.pmtp_vocab_pieces(ptr, False, buf, size, offsets, n_out))
            data = ffi.unpack(buf, size)
            offs = ffi.unpack(offsets, self.info.n_vocab + 1)
            self._pieces = [data[offs[i]:offs[i + 1]] for i in range(self.info.n_vocab)]
        return self._pieces

    @property
    def eog_tokens(self) -> frozenset[int]:
        """End-of-generation tokens (EOS, EOT, ...), looked up once."""
        if self._eog is None:
            ptr = self._check_open()
            self._eog = frozenset(t for t in range(self.info.n_vocab) if lib.pmtp_token_is_eog(ptr, t))
        return self._eog

    def is_eog(self, token: int) -> bool:
        self._check_open()
        return token in self.eog_tokens


@dataclass(frozen=True)
class StepResult:
    tokens: tuple[int, ...]        # in order; the last one is pending (not yet decoded)
    from_draft: tuple[bool, ...]   # accepted MTP drafts; the last token never is
    n_drafted: int
    n_accepted: int
    logprobs: tuple[float, ...] | None = None                        # per token, when asked
    top_logprobs: tuple[tuple[tuple[int, float], ...], ...] | None = None   # per token: (token, logprob)


_STAT_COUNTERS = ("n_steps", "n_drafted", "n_accepted", "n_emitted", "swa_recoveries", "n_target_decodes",
                  "n_rows_skipped")
_STAT_TIMES = ("t_draft_s", "t_verify_s", "t_catchup_s", "t_sample_s", "t_prefill_s", "t_decode_s")


class Session(_Handle):
    """A target context plus, with ``draft_max > 0``, the MTP heads' contexts."""
    _free = lib.pmtp_session_free
    _kind = "session"

    def __init__(self, model: Model, config: ContextConfig, mtp_model: Model | None = None):
        model._check_open()
        self.model = model
        self.mtp_model = mtp_model
        self.config = config
        p = ffi.new("pmtp_session_params *", lib.pmtp_session_default_params())
        p.n_ctx = config.n_ctx
        p.n_batch = config.n_batch
        p.n_ubatch = config.n_ubatch
        p.n_threads = config.threads
        p.n_threads_batch = config.threads_batch
        p.type_k = config.kv_type_id("type_k")
        p.type_v = config.kv_type_id("type_v")
        p.flash_attn = config.flash_attn_id
        p.draft_max = config.draft_max
        p.mtp_model = mtp_model._check_open() if mtp_model is not None else ffi.NULL
        p.swa_guard = config.swa_guard
        p.unsafe_split_verify = config.unsafe_split_verify
        p.n_seq_max = config.n_seq_max
        out = ffi.new("pmtp_session **")
        check(lib.pmtp_session_new(model._check_open(), p, out))
        self._own(out[0])
        self._step = ffi.new("pmtp_step_result *")
        self._n_vocab = model.info.n_vocab
        self.sampling = SamplingParams()
        self._seq_sampling = [SamplingParams()] * config.n_seq_max   # per sequence, for results
        self._batch_cap = 0

    @property
    def n_ctx(self) -> int:
        return lib.pmtp_session_n_ctx(self._check_open())

    @property
    def n_ubatch(self) -> int:
        return lib.pmtp_session_n_ubatch(self._check_open())

    @property
    def n_past(self) -> int:
        return lib.pmtp_session_n_past(self._check_open())

    @property
    def draft_max(self) -> int:
        return lib.pmtp_session_draft_max(self._check_open())

    @property
    def graph_builds(self) -> int:
        """Target decodes so far that built a compute graph instead of reusing the last one
        (another number of rows, or the KV span grown past a multiple of 256 cells)."""
        return lib.pmtp_session_graph_builds(self._check_open())

    @property
    def n_seq_max(self) -> int:
        return lib.pmtp_session_n_seq_max(self._check_open())

    def set_sampling(self, sampling: SamplingParams) -> None:
        self.seq_set_sampling(0, sampling)

    def reset(self) -> None:
        check(lib.pmtp_reset(self._check_open()))

    def rollback(self, n_keep: int) -> None:
        check(lib.pmtp_rollback(self._check_open(), n_keep))

    def prefill(self, tokens) -> None:
        toks = ffi.new("int32_t[]", list(tokens))
        check(lib.pmtp_prefill(self._check_open(), toks, len(toks)))

    def logits(self) -> np.ndarray:
        """Logits of the last decoded token, [n_vocab] float32."""
        out = np.empty(self._n_vocab, dtype=np.float32)
        check(lib.pmtp_logits(self._check_open(), ffi.from_buffer("float[]", out), out.size))
        return out

    def sample(self) -> int:
        """Sample the first token after a prefill; ``last_result`` has it with its logprobs."""
        check(lib.pmtp_sample(self._check_open(), self._step))
        return self._step.tokens[0]

    @property
    def last_result(self) -> StepResult:
        return self._result()

    def _result(self, r=None, seq: int = 0) -> StepResult:
        r = self._step if r is None else r
        n = r.n_tokens
        if self._seq_sampling[seq].n_logprobs < 0:
            return StepResult(tuple(r.tokens[0:n]), tuple(r.from_draft[0:n]), r.n_drafted, r.n_accepted)
        top = tuple(tuple(zip(r.top_tokens[i][0:r.n_top], r.top_logprobs[i][0:r.n_top])) for i in range(n))
        return StepResult(tuple(r.tokens[0:n]), tuple(r.from_draft[0:n]), r.n_drafted, r.n_accepted,
                          tuple(r.logprob[0:n]), top)

    def step(self, draft: int = 0) -> StepResult:
        check(lib.pmtp_step(self._check_open(), draft, self._step))
        return self._result()

    def draft(self, k: int) -> list[int]:
        out = ffi.new("int32_t[]", max(k, 1))
        n_out = ffi.new("size_t *")
        check(lib.pmtp_draft(self._check_open(), k, out, max(k, 1), n_out))
        return list(ffi.unpack(out, n_out[0]))

    def head_logits(self, head: int) -> np.ndarray:
        """Logits [n_vocab] of MTP head `head`'s last output (after draft(k): draft head's)."""
        out = np.empty(self.model.info.n_vocab, dtype=np.float32)
        check(lib.pmtp_head_logits(self._check_open(), head, ffi.from_buffer("float[]", out), out.size))
        return out

    def verify(self, drafts) -> StepResult:
        toks = ffi.new("int32_t[]", list(drafts))
        check(lib.pmtp_verify(self._check_open(), toks, len(toks), self._step))
        return self._result()

    # ------------------------------------------- several sequences (n_seq_max > 1)

    def seq_n_past(self, seq: int) -> int:
        return lib.pmtp_seq_n_past(self._check_open(), seq)

    def seq_set_sampling(self, seq: int, sampling: SamplingParams) -> None:
        check(lib.pmtp_seq_set_sampling(self._check_open(), seq, _native_sampling(sampling)))
        self._seq_sampling[seq] = sampling
        if seq == 0:
            self.sampling = sampling

    def seq_reset(self, seq: int) -> None:
        """Forget sequence ``seq`` (its slot is free for a new prompt)."""
        check(lib.pmtp_seq_reset(self._check_open(), seq))

    def seq_mtp_catch_up(self, seq: int) -> None:
        """Let the MTP heads take the rows sequence ``seq`` queued while decoding plainly
        (a draft does it by itself; a policy timing its steps does it first)."""
        check(lib.pmtp_seq_mtp_catch_up(self._check_open(), seq))

    def seq_mtp_queued(self, seq: int) -> int:
        """Rows the MTP heads still lack for sequence ``seq``: what ``seq_mtp_catch_up``
        would run now (0 without heads)."""
        return lib.pmtp_seq_mtp_queued(self._check_open(), seq)

    def seq_mtp_window(self, seq: int, n_rows: int) -> None:
        """Let the MTP heads skip sequence ``seq``'s rows older than the newest ``n_rows``
        while it decodes plainly (0: feed every row, the default after a reset; a window
        holds across prefills). Only drafts can change, never the output; see
        ``pmtp_seq_mtp_window``."""
        check(lib.pmtp_seq_mtp_window(self._check_open(), seq, n_rows))

    def mtp_catch_up(self) -> None:
        self.seq_mtp_catch_up(0)

    def seq_rollback(self, seq: int, n_keep: int) -> None:
        """Keep the first ``n_keep`` tokens of sequence ``seq``."""
        check(lib.pmtp_seq_rollback(self._check_open(), seq, n_keep))

    def seq_prefill(self, seq: int, tokens) -> None:
        toks = ffi.new("int32_t[]", list(tokens))
        check(lib.pmtp_seq_prefill(self._check_open(), seq, toks, len(toks)))

    def seq_sample(self, seq: int) -> StepResult:
        """Sample the first token after ``seq_prefill`` (call it right after: a decode of
        any other sequence overwrites the logits it samples from)."""
        check(lib.pmtp_seq_sample(self._check_open(), seq, self._step))
        return self._result(self._step, seq)

    def step_batch(self, seqs, drafts) -> list[StepResult]:
        """One decode cycle for several sequences together: ``drafts[i]`` MTP drafts for
        ``seqs[i]`` (0 = plain decode). Each sequence's result equals its ``step`` alone."""
        seqs, drafts = list(seqs), list(drafts)
        if len(seqs) != len(drafts):
            raise InvalidArgumentError(f"{len(seqs)} sequences but {len(drafts)} draft lengths")
        n = len(seqs)
        if n > self._batch_cap:     # buffers kept across steps: a step allocates nothing
            self._batch_out = ffi.new("pmtp_step_result[]", max(n, 1))
            self._batch_seqs = ffi.new("int32_t[]", max(n, 1))
            self._batch_drafts = ffi.new("int32_t[]", max(n, 1))
            self._batch_cap = n
        self._batch_seqs[0:n] = seqs
        self._batch_drafts[0:n] = drafts
        check(lib.pmtp_step_batch(self._check_open(), self._batch_seqs, self._batch_drafts, n, self._batch_out))
        return [self._result(self._batch_out[i], seqs[i]) for i in range(n)]

    def stats(self) -> dict:
        raw = ffi.new("pmtp_stats *")
        check(lib.pmtp_session_stats(self._check_open(), raw))
        out = {name: int(getattr(raw, name)) for name in _STAT_COUNTERS}
        out.update({name: float(getattr(raw, name)) for name in _STAT_TIMES})
        for name in ("accepted_at", "drafted_at", "accepted_at_rejection", "drafted_at_rejection"):
            out[name] = list(getattr(raw, name))
        return out

    def reset_stats(self) -> None:
        lib.pmtp_session_stats_reset(self._check_open())


def _native_sampling(sampling: SamplingParams):
    s = ffi.new("pmtp_sampling *")
    for name in SamplingParams.__dataclass_fields__:
        if name != "accept":
            setattr(s, name, getattr(sampling, name))
    s.accept = sampling.accept_id
    return s


def sampling_probs(sampling: SamplingParams, logits: np.ndarray) -> np.ndarray:
    """The distribution the sampler draws from for ``logits`` (what rejection sampling
    uses as p and q): temperature, top_k, top_p and min_p as llama.cpp's chain applies them."""
    logits = np.ascontiguousarray(logits, dtype=np.float32)
    probs = np.empty_like(logits)
    check(lib.pmtp_sampling_probs(_native_sampling(sampling), ffi.from_buffer("float[]", logits), logits.size,
                                  ffi.from_buffer("float[]", probs)))
    return probs


def rejection_verify(p: np.ndarray, q: np.ndarray, drafts, seed: int) -> tuple[list[int], int]:
    """The engine's verifier on given distributions: p [n+1, V] target, q [n, V] draft,
    drafts [n] drawn from q. Returns (emitted tokens, number of accepted drafts)."""
    p = np.ascontiguousarray(p, dtype=np.float32)
    q = np.ascontiguousarray(q, dtype=np.float32).reshape(-1, p.shape[1])
    n = len(drafts)
    if p.shape[0] != n + 1 or q.shape[0] != n:
        raise InvalidArgumentError(f"need p of {n + 1} rows and q of {n} rows for {n} drafts")
    out = ffi.new("int32_t[]", n + 1)
    n_acc = ffi.new("int32_t *")
    check(lib.pmtp_rejection_verify(ffi.from_buffer("float[]", p), ffi.from_buffer("float[]", q) if n else ffi.NULL,
                                    ffi.new("int32_t[]", list(drafts)) if n else ffi.NULL, n, p.shape[1], seed,
                                    out, n_acc))
    return list(out[0:n_acc[0] + 1]), n_acc[0]


def build_info() -> dict:
    """What this build of llama.cpp can do: backends (CPU, RPC, CUDA, Metal), devices, CPU features."""
    return json.loads(_native.read_string(lib.pmtp_build_info))
