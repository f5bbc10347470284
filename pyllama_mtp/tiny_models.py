"""Tiny deterministic GGUF models for the benchmark's built-in models (``tiny:...``), the
benchmark scripts and the tests: seeded numpy weights written with the ``gguf`` package, no
downloads and no other files. The tests' other factories (qwen35, glm4moe, broken files,
Hugging Face checkpoints) live in tests/factories and build on this module.

* :func:`write_llama` - a dense llama.
* :func:`write_step35` - the Step-3.5 layout of the pinned llama.cpp: leading dense FFN
  block(s), then MoE blocks (sigmoid router with selection bias, shared expert), per-head
  q/k norms, a head-wise attention gate, 3 sliding-window : 1 full attention layers with
  partial RoPE on the full ones, and ``n_mtp`` chained MTP blocks appended after the trunk.
  With ``oracle=True`` the trunk's greedy output follows a fixed permutation of the vocabulary
  and the MTP heads agree with it on a chosen fraction of tokens (see :func:`oracle_maps`).
* :func:`write_step35_pair` - the same weights as a trunk-only and an MTP-only file.

All models share one 512-token SPM vocabulary (:func:`vocabulary`): 256 byte-fallback tokens
make any UTF-8 text round-trip exactly through llama.cpp's tokenizer.

Three properties hold for every model, by construction:

* Each tensor draws from its own random stream keyed by (seed, tensor name), so a tensor has
  the same values whichever subset of tensors a file holds.
* Residual dimension 0 carries a constant (every token embedding has ``_BIAS_DIM_VALUE``
  there and no layer writes to it). The output rows of the control/unknown tokens read only
  that dimension with a large negative weight, so greedy decoding never emits EOS/EOT and
  sampling almost never does: generation tests get the full ``max_tokens``.
* Logits are spread wide (std 4 for random models, a margin of tens for the oracle), so the
  near-ties that floating-point differences between batched and single-token evaluation
  could flip are rare: greedy output with and without speculative decoding can be compared
  token for token.

Command line, for scripts::

    python -m pyllama_mtp.tiny_models {llama,step35,oracle} OUT.gguf [--size-gb X] [--acceptance A]
"""
from __future__ import annotations

import argparse
import functools
import inspect
import math
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

# Bump when the bytes written for the same arguments change (caches key on it).
FACTORY_VERSION = "1"

N_VOCAB = 512

_BIAS_DIM_VALUE = 2.0      # residual dim 0 of every token embedding (see module docstring)
_SPECIAL_LOGIT = -40.0     # weight of the control tokens' output rows on residual dim 0
_RANDOM_LOGIT_STD = 4.0    # random models: logit spread (peaked enough for exact greedy)
_ORACLE_LOGIT = 40.0       # oracle: logit of the intended next token (others ~ N(0, 40/sqrt(n_embd)))
_ORACLE_RESIDUAL = 0.15    # oracle: norm of all layer outputs together, relative to the embedding
_ORACLE_H_MIX = 0.1        # oracle MTP heads: weight of the hidden-state half of eh_proj

_DTYPES = {"f32": np.float32, "f16": np.float16}
_FILE_TYPES = {"f32": 0, "f16": 1}       # general.file_type: ALL_F32, MOSTLY_F16
_F32_SUFFIXES = ("ssm_conv1d.weight",)    # 2-D tensors the converters keep F32 (ggml_ssm_conv needs it)


# --------------------------------------------------------------------------- vocabulary

_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Frequent English words: each becomes "▁word" plus all its prefixes, because the SPM
# tokenizer only reaches a piece through merges of pieces that are themselves in the vocab.
_WORDS = (
    "the of and to a in is you that it he was for on are as with his they at be this have from "
    "or one had by word but not what all were we when your can said there use an each which she "
    "do how their if will up other about out many then them these so some her would make like "
    "him into time has look two more write go see number no way could people my than first"
).split()
_CHARS = ("▁" + "abcdefghijklmnopqrstuvwxyz" + "ABCDEFGHIJKLMNOPQRSTUVWXYZ" + "0123456789" + ".,!?;:'\"-()/")


@dataclass(frozen=True)
class Vocab:
    tokens: tuple[str, ...]
    scores: tuple[float, ...]
    types: tuple[int, ...]          # gguf.TokenType values
    unk: int
    bos: int
    eos: int
    im_start: int
    im_end: int

    @property
    def special(self) -> np.ndarray:
        """Ids of the unknown and control tokens (never an oracle target, never emitted)."""
        return np.array([self.unk, self.bos, self.eos, self.im_start, self.im_end])

    @property
    def ordinary(self) -> np.ndarray:
        """Ids of every other token: byte tokens and word pieces."""
        return np.setdiff1d(np.arange(len(self.tokens)), self.special)


def _word_pieces(n: int) -> list[str]:
    """n pieces, prefix-closed and ordered so that every piece comes after its prefixes
    (any truncation stays prefix-closed)."""
    pieces = dict.fromkeys(_CHARS)
    for word in ["▁" + w for w in _WORDS]:
        for end in range(2, len(word) + 1):
            pieces.setdefault(word[:end])
    if len(pieces) < n:
        raise AssertionError(f"word list too short: {len(pieces)} < {n} pieces")
    return list(pieces)[:n]


@functools.lru_cache(maxsize=None)
def vocabulary() -> Vocab:
    """The shared vocabulary: <unk> <s> </s>, <0x00>..<0xFF>, word pieces, <|im_start|> <|im_end|>."""
    from gguf import TokenType

    n_pieces = N_VOCAB - 3 - 256 - 2
    pieces = _word_pieces(n_pieces)
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces + ["<|im_start|>", "<|im_end|>"]
    types = ([TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL] + [TokenType.BYTE] * 256
             + [TokenType.NORMAL] * n_pieces + [TokenType.CONTROL] * 2)
    # SPM merges the pair whose result scores highest: earlier (more frequent) pieces win
    scores = [0.0] * 259 + [-float(i) for i in range(n_pieces)] + [0.0, 0.0]
    return Vocab(tuple(tokens), tuple(scores), tuple(int(t) for t in types),
                 unk=0, bos=1, eos=2, im_start=N_VOCAB - 2, im_end=N_VOCAB - 1)


def _tokenizer_metadata(v: Vocab) -> dict:
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": list(v.tokens),
        "tokenizer.ggml.scores": list(v.scores),
        "tokenizer.ggml.token_type": list(v.types),
        "tokenizer.ggml.bos_token_id": v.bos,
        "tokenizer.ggml.eos_token_id": v.eos,
        "tokenizer.ggml.unknown_token_id": v.unk,
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_eos_token": False,
        # no implicit leading space: detokenize(tokenize(text)) == text for any text
        "tokenizer.ggml.add_space_prefix": False,
        "tokenizer.chat_template": _CHAT_TEMPLATE,
    }


def char_tokens(text: str) -> tuple[int, ...]:
    """One token per character of ``text`` in the shared vocabulary: the one-character piece
    ("▁" for a space), else the character's UTF-8 byte tokens. For an oracle chain that
    makes a model's greedy output spell ``text``."""
    index = {piece: i for i, piece in enumerate(vocabulary().tokens)}
    out: list[int] = []
    for ch in text:
        piece = "▁" if ch == " " else ch
        if piece in index and piece not in ("<unk>", "<s>", "</s>"):
            out.append(index[piece])
        else:
            out.extend(index[f"<0x{b:02X}>"] for b in ch.encode("utf-8"))
    return tuple(out)


# --------------------------------------------------------------------------- oracle maps

def oracle_maps(seed: int = 0, acceptance: float = 1.0, chain: Sequence[int] = ()) -> tuple[np.ndarray, np.ndarray]:
    """(trunk_next, head_next), int arrays of length N_VOCAB, for an oracle model of this seed.

    trunk_next restricted to the ordinary tokens is a single cycle through all of them: the
    oracle trunk's greedy continuation of token t is trunk_next[t]. head_next is what every
    MTP head predicts after token t: equal to trunk_next on a random ``acceptance`` fraction
    of ordinary tokens (at least two differ when acceptance < 1), a different token on the
    rest. A special token behaves like the ordinary token it aliases (see _oracle_tables).
    ``chain``: distinct ordinary tokens that follow each other in the cycle, in this order
    (so the greedy continuation of chain[0] is chain[1:], ...); see :func:`char_tokens`.
    """
    trunk_next, head_next, alias = _oracle_tables(seed, acceptance, chain)
    return trunk_next[alias], head_next[alias]


def _oracle_tables(seed: int, acceptance: float, chain: Sequence[int] = ()) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(trunk_next, head_next, alias); the maps are only meaningful on ordinary tokens, and
    alias sends each special token to a random ordinary one (the identity elsewhere)."""
    if not 0.0 <= acceptance <= 1.0:
        raise ValueError(f"acceptance must be in [0, 1], got {acceptance}")
    v = vocabulary()
    rng = np.random.default_rng([seed, zlib.crc32(b"oracle.maps")])
    ordinary = v.ordinary
    cycle = rng.permutation(ordinary)
    if len(chain):
        chain = np.asarray(chain, dtype=cycle.dtype)
        if len(set(chain.tolist())) != len(chain) or not np.isin(chain, ordinary).all():
            raise ValueError("an oracle chain must be distinct ordinary tokens")
        cycle = np.concatenate([chain, cycle[~np.isin(cycle, chain)]])
    trunk_next = np.arange(N_VOCAB)
    trunk_next[cycle] = np.roll(cycle, -1)
    alias = np.arange(N_VOCAB)
    alias[v.special] = rng.choice(ordinary, size=len(v.special))

    head_next = trunk_next.copy()
    n_wrong = round((1.0 - acceptance) * len(ordinary))
    n_wrong = 0 if n_wrong == 0 else max(n_wrong, 2)   # one token alone cannot be deranged
    wrong = rng.permutation(ordinary)[:n_wrong]
    # a cyclic shift among the wrong tokens keeps head_next a permutation of the targets
    head_next[wrong] = trunk_next[np.roll(wrong, -1)]
    return trunk_next, head_next, alias


# --------------------------------------------------------------------------- weights

@dataclass(frozen=True)
class _Tensor:
    name: str
    shape: tuple[int, ...]               # numpy order: ggml's ne reversed, e.g. (n_vocab, n_embd)
    make: Callable[[], np.ndarray]       # float32 values, computed only when written


class _Weights:
    """Seeded weight generators shared by the architectures. ``alias`` (oracle models):
    each token embeds like the token it aliases, so the special tokens need no output rows
    of their own (rows holding two embeddings would blur the oracle's margins)."""

    def __init__(self, seed: int, n_embd: int, alias: np.ndarray | None = None):
        self.seed = seed
        self.n_embd = n_embd
        self.alias = alias

    def normal(self, name: str, shape: tuple[int, ...], std: float) -> np.ndarray:
        rng = np.random.default_rng([self.seed, zlib.crc32(name.encode())])
        a = rng.standard_normal(shape, dtype=np.float32)
        a *= np.float32(std)
        return a

    def residual_writer(self, name: str, shape: tuple[int, ...], std: float, axis: int) -> np.ndarray:
        """A projection onto the residual stream (``axis`` indexes n_embd); it never writes
        residual dim 0, which stays the constant that suppresses the special tokens."""
        a = self.normal(name, shape, std)
        a[(slice(None),) * axis + (0,)] = 0.0
        return a

    @functools.cached_property
    def embeddings(self) -> np.ndarray:
        """[n_vocab, n_embd]: random directions of RMS 1 (near-orthogonal), dim 0 constant."""
        e = self.normal("token_embd.weight", (N_VOCAB, self.n_embd), 1.0)
        e[:, 1:] *= np.sqrt((self.n_embd - 1) / np.sum(e[:, 1:] ** 2, axis=1, keepdims=True))
        e[:, 0] = _BIAS_DIM_VALUE
        return e if self.alias is None else e[self.alias]

    def lm_head(self, name: str, next_map: np.ndarray | None) -> np.ndarray:
        """[n_vocab, n_embd] output matrix. With next_map (a permutation of the ordinary
        tokens), row next_map[t] is the embedding of t, so that normed(embedding(t)) scores
        next_map[t] highest by far; without, random rows. Special rows read only dim 0,
        with a large negative weight."""
        n = self.n_embd
        special = vocabulary().special
        if next_map is None:
            w = self.normal(name, (N_VOCAB, n), _RANDOM_LOGIT_STD / math.sqrt(n))
        else:
            ordinary = vocabulary().ordinary
            w = np.zeros((N_VOCAB, n), dtype=np.float32)
            w[next_map[ordinary]] = self.embeddings[ordinary] * np.float32(_ORACLE_LOGIT / n)
        w[:, 0] = 0.0
        w[special] = 0.0
        w[special, 0] = _SPECIAL_LOGIT
        return w


def _ones(n: int) -> Callable[[], np.ndarray]:
    return lambda: np.ones(n, dtype=np.float32)


# --------------------------------------------------------------------------- GGUF writing

def _add_metadata(writer, metadata: dict) -> None:
    for key, value in metadata.items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_array(key, value)


def _write_gguf(path, arch: str, metadata: dict, tensors: Sequence[_Tensor], dtype: str) -> Path:
    """Stream the file: tensor infos first, then each tensor generated just before it is
    written, so peak memory is one tensor (a 2 GB model never sits in memory)."""
    import gguf

    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def stored(t: _Tensor) -> type:      # 1-D tensors (norms, biases) stay F32 like the converters'
        return np.float32 if len(t.shape) == 1 or t.name.endswith(_F32_SUFFIXES) else _DTYPES[dtype]

    writer = gguf.GGUFWriter(str(path), arch)
    _add_metadata(writer, {"general.name": f"pyllama-mtp tiny {arch}",
                           "general.file_type": _FILE_TYPES[dtype], **metadata})
    for t in tensors:
        np_dtype = np.dtype(stored(t))
        writer.add_tensor_info(t.name, t.shape, np_dtype, math.prod(t.shape) * np_dtype.itemsize)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in tensors:
        data = t.make()
        assert data.shape == t.shape, (t.name, data.shape, t.shape)
        writer.write_tensor_data(data.astype(stored(t), copy=False))
    writer.close()
    return path


# --------------------------------------------------------------------------- shared blocks

def _embedding_tensors(w: _Weights, next_map: np.ndarray | None = None) -> list[_Tensor]:
    """token_embd, output_norm and output: what every architecture's file starts with."""
    n = w.n_embd
    return [
        _Tensor("token_embd.weight", (N_VOCAB, n), lambda: w.embeddings),
        _Tensor("output_norm.weight", (n,), _ones(n)),
        _Tensor("output.weight", (N_VOCAB, n), lambda: w.lm_head("output.weight", next_map)),
    ]


def _attention(w: _Weights, il: int, n_head: int, n_head_kv: int, head_dim: int, out_std: float) -> list[_Tensor]:
    """attn_q [n_head*hd, n_embd], attn_k/attn_v [n_head_kv*hd, n_embd], attn_output [n_embd, n_head*hd]."""
    n = w.n_embd
    p = f"blk.{il}."
    in_std = 1.0 / math.sqrt(n)      # normed input (RMS 1) -> q/k/v entries ~ N(0, 1)
    q, kv = (n_head * head_dim, n), (n_head_kv * head_dim, n)
    return [
        _Tensor(p + "attn_norm.weight", (n,), _ones(n)),
        _Tensor(p + "attn_q.weight", q, lambda: w.normal(p + "attn_q.weight", q, in_std)),
        _Tensor(p + "attn_k.weight", kv, lambda: w.normal(p + "attn_k.weight", kv, in_std)),
        _Tensor(p + "attn_v.weight", kv, lambda: w.normal(p + "attn_v.weight", kv, in_std)),
        _Tensor(p + "attn_output.weight", (n, q[0]),
                lambda: w.residual_writer(p + "attn_output.weight", (n, q[0]), out_std / math.sqrt(q[0]), axis=0)),
    ]


def _swiglu(w: _Weights, prefix: str, suffix: str, n_ff: int, out_std: float, n_expert: int | None = None) -> list[_Tensor]:
    """ffn_gate{suffix}/ffn_up{suffix} [(n_expert,) n_ff, n_embd], ffn_down{suffix} [(n_expert,) n_embd, n_ff]."""
    n = w.n_embd
    lead = () if n_expert is None else (n_expert,)
    up, down = lead + (n_ff, n), lead + (n, n_ff)
    names = [prefix + f"ffn_{kind}{suffix}.weight" for kind in ("gate", "up", "down")]
    # silu(gate) * up has RMS ~0.6 for N(0, 1) inputs: 1.6 restores out_std per output entry
    down_std = 1.6 * out_std / math.sqrt(n_ff)
    return [
        _Tensor(names[0], up, lambda: w.normal(names[0], up, 1.0 / math.sqrt(n))),
        _Tensor(names[1], up, lambda: w.normal(names[1], up, 1.0 / math.sqrt(n))),
        _Tensor(names[2], down, lambda: w.residual_writer(names[2], down, down_std, axis=len(lead))),
    ]


# --------------------------------------------------------------------------- llama

def write_llama(path, *, seed=0, n_embd=64, n_layer=2, n_head=4, n_head_kv=2, n_ff=128, n_ctx_train=4096,
                dtype="f32") -> Path:
    """A dense llama with random weights: varied, context-dependent greedy output."""
    if n_embd % n_head or n_head % n_head_kv:
        raise ValueError("n_embd must be a multiple of n_head, n_head a multiple of n_head_kv")
    head_dim = n_embd // n_head
    w = _Weights(seed, n_embd)
    tensors = _embedding_tensors(w)
    for il in range(n_layer):
        tensors += _attention(w, il, n_head, n_head_kv, head_dim, out_std=1.0)
        tensors.append(_Tensor(f"blk.{il}.ffn_norm.weight", (n_embd,), _ones(n_embd)))
        tensors += _swiglu(w, f"blk.{il}.", "", n_ff, out_std=1.0)
    metadata = {
        "llama.context_length": n_ctx_train,
        "llama.embedding_length": n_embd,
        "llama.block_count": n_layer,
        "llama.feed_forward_length": n_ff,
        "llama.attention.head_count": n_head,
        "llama.attention.head_count_kv": n_head_kv,
        "llama.rope.dimension_count": head_dim,
        "llama.rope.freq_base": 10000.0,
        "llama.attention.layer_norm_rms_epsilon": 1e-5,
        "llama.vocab_size": N_VOCAB,
        **_tokenizer_metadata(vocabulary()),
    }
    return _write_gguf(path, "llama", metadata, tensors, dtype)


# --------------------------------------------------------------------------- step35

@dataclass(frozen=True)
class _Step35:
    """Shapes of a step35 model; blocks 0..n_layer-1 are the trunk, then n_mtp MTP blocks."""
    n_embd: int
    n_layer: int
    n_mtp: int
    n_swa: int
    n_expert: int
    n_expert_used: int
    n_dense_lead: int
    n_ctx_train: int
    n_head: int
    n_head_kv: int
    n_head_swa: int
    head_dim: int
    n_ff: int
    n_ff_exp: int
    n_ff_shexp: int
    attn_gate: bool
    oracle: bool
    acceptance: float
    oracle_chain: tuple = ()
    n_layer_all: int = field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "n_layer_all", self.n_layer + self.n_mtp)
        if self.n_head % self.n_head_kv or self.n_head_swa % self.n_head_kv:
            raise ValueError("n_head and n_head_swa must be multiples of n_head_kv")
        if self.head_dim % 4:
            raise ValueError("head_dim must be a multiple of 4 (full-attention layers rotate head_dim/2 dims)")
        if not 0 < self.n_expert_used <= self.n_expert:
            raise ValueError("need 0 < n_expert_used <= n_expert")
        if not 0 <= self.n_dense_lead <= self.n_layer:
            raise ValueError("need 0 <= n_dense_lead <= n_layer")
        if not 0.0 <= self.acceptance <= 1.0:
            raise ValueError(f"acceptance must be in [0, 1], got {self.acceptance}")

    def is_swa(self, il: int) -> bool:
        # like Step-3.5-Flash: full attention on every 4th trunk layer starting at 0, the
        # rest sliding-window; MTP blocks use full attention
        return il < self.n_layer and il % 4 != 0

    def n_head_at(self, il: int) -> int:
        return self.n_head_swa if self.is_swa(il) else self.n_head

    @property
    def out_std(self) -> float:
        """Per-entry std of each sublayer's residual update. Random: as large as the
        embedding, so context matters. Oracle: all updates together stay a small fraction
        of the embedding, so the argmax never moves but every layer still computes."""
        if not self.oracle:
            return 1.0
        return _ORACLE_RESIDUAL / math.sqrt(2 * self.n_layer_all)


def _step35_block(cfg: _Step35, w: _Weights, il: int) -> list[_Tensor]:
    """One decoder block: attention with q/k norms and head gate, then a dense SwiGLU FFN
    (leading blocks and MTP blocks) or routed experts plus a shared expert."""
    n, p = cfg.n_embd, f"blk.{il}."
    n_head = cfg.n_head_at(il)
    tensors = _attention(w, il, n_head, cfg.n_head_kv, cfg.head_dim, cfg.out_std)
    tensors += [
        _Tensor(p + "attn_q_norm.weight", (cfg.head_dim,), _ones(cfg.head_dim)),
        _Tensor(p + "attn_k_norm.weight", (cfg.head_dim,), _ones(cfg.head_dim)),
        _Tensor(p + "ffn_norm.weight", (n,), _ones(n)),
    ]
    if cfg.attn_gate:     # [n_head, n_embd]: sigmoid gate per head
        tensors.append(_Tensor(p + "attn_gate.weight", (n_head, n),
                               lambda: w.normal(p + "attn_gate.weight", (n_head, n), 1.0 / math.sqrt(n))))
    if il < cfg.n_dense_lead or il >= cfg.n_layer:
        return tensors + _swiglu(w, p, "", cfg.n_ff, cfg.out_std)
    e = cfg.n_expert
    # routed experts and the shared expert each contribute about half of the update
    return tensors + [
        _Tensor(p + "ffn_gate_inp.weight", (e, n), lambda: w.normal(p + "ffn_gate_inp.weight", (e, n), 1.0 / math.sqrt(n))),
        _Tensor(p + "exp_probs_b.bias", (e,), lambda: w.normal(p + "exp_probs_b.bias", (e,), 0.1)),
        *_swiglu(w, p, "_exps", cfg.n_ff_exp, cfg.out_std / math.sqrt(2), n_expert=e),
        *_swiglu(w, p, "_shexp", cfg.n_ff_shexp, cfg.out_std / math.sqrt(2)),
    ]


def _eh_proj(cfg: _Step35, w: _Weights, name: str) -> np.ndarray:
    """[n_embd, 2*n_embd] on concat(enorm(embedding), hnorm(hidden)): passes the embedding
    through, so the head knows which token it continues, and mixes in the hidden state
    (weakly for the oracle). Residual dim 0 comes from the embedding alone."""
    n = cfg.n_embd
    h_mix = _ORACLE_H_MIX if cfg.oracle else 1.0
    a = w.normal(name, (n, 2 * n), h_mix / math.sqrt(n))
    a[:, :n] = np.eye(n, dtype=np.float32)
    a[0, n:] = 0.0
    return a


def _nextn(cfg: _Step35, w: _Weights, il: int, head_next: np.ndarray | None) -> list[_Tensor]:
    n, p = cfg.n_embd, f"blk.{il}.nextn."
    return [
        _Tensor(p + "eh_proj.weight", (n, 2 * n), lambda: _eh_proj(cfg, w, p + "eh_proj.weight")),
        _Tensor(p + "enorm.weight", (n,), _ones(n)),
        _Tensor(p + "hnorm.weight", (n,), _ones(n)),
        _Tensor(p + "shared_head_norm.weight", (n,), _ones(n)),
        _Tensor(p + "shared_head_head.weight", (N_VOCAB, n), lambda: w.lm_head(p + "shared_head_head.weight", head_next)),
    ]


def _shared_tensors(cfg, seed: int):
    """Weights source, oracle tables, and the embedding / output tensors every
    hybrid-or-MoE writer starts with: (w, head_next, tensors)."""
    n = cfg.n_embd
    trunk_next, head_next, alias = (_oracle_tables(seed, cfg.acceptance, getattr(cfg, "oracle_chain", ()))
                                    if cfg.oracle else (None, None, None))
    w = _Weights(seed, n, alias)
    return w, head_next, _embedding_tensors(w, trunk_next)


def _step35_tensors(cfg: _Step35, seed: int) -> list[_Tensor]:
    w, head_next, tensors = _shared_tensors(cfg, seed)
    for il in range(cfg.n_layer):
        tensors += _step35_block(cfg, w, il)
    for il in range(cfg.n_layer, cfg.n_layer_all):
        tensors += _step35_block(cfg, w, il) + _nextn(cfg, w, il, head_next)
    return tensors


def _step35_metadata(cfg: _Step35) -> dict:
    """The keys the pinned loader reads (llama-model.cpp load_hparams + step35.cpp), laid out
    like conversion/step3.py writes them: per-layer arrays cover trunk and MTP blocks."""
    layers = range(cfg.n_layer_all)
    k = "step35."
    metadata = {
        k + "context_length": cfg.n_ctx_train,
        k + "embedding_length": cfg.n_embd,
        k + "block_count": cfg.n_layer_all,          # n_layer_all: trunk + MTP blocks
        k + "feed_forward_length": cfg.n_ff,         # dense blocks (leading + MTP)
        k + "attention.head_count": [cfg.n_head_at(il) for il in layers],
        k + "attention.head_count_kv": [cfg.n_head_kv for _ in layers],
        k + "attention.key_length": cfg.head_dim,
        k + "attention.value_length": cfg.head_dim,
        # SWA layers rotate all head_dim dims; step35 halves this for full-attention layers
        k + "rope.dimension_count": cfg.head_dim,
        k + "rope.freq_base": 10000.0,
        k + "rope.freq_base_swa": 10000.0,
        k + "attention.layer_norm_rms_epsilon": 1e-5,
        k + "attention.sliding_window": cfg.n_swa,
        k + "attention.sliding_window_pattern": [cfg.is_swa(il) for il in layers],
        k + "expert_count": cfg.n_expert,
        k + "expert_used_count": cfg.n_expert_used,
        k + "expert_feed_forward_length": cfg.n_ff_exp,
        k + "expert_shared_feed_forward_length": cfg.n_ff_shexp,
        k + "expert_weights_scale": 1.0,
        k + "expert_weights_norm": True,
        k + "expert_gating_func": 2,                 # LLAMA_EXPERT_GATING_FUNC_TYPE_SIGMOID
        k + "leading_dense_block_count": cfg.n_dense_lead,
        **_tokenizer_metadata(vocabulary()),
    }
    if cfg.n_mtp:
        metadata[k + "nextn_predict_layers"] = cfg.n_mtp
    return metadata


def _mtp_block_prefixes(cfg: _Step35) -> tuple[str, ...]:
    return tuple(f"blk.{il}." for il in range(cfg.n_layer, cfg.n_layer_all))


def _split_filter(cfg: _Step35, split: str | None) -> Callable[[str], bool]:
    """Which tensors a file holds. "trunk": everything but the MTP blocks (upstream then
    marks MTP tensors not required). "mtp": the MTP blocks plus the shared token_embd,
    output_norm and output (upstream detects MTP-only by the missing blk.0.attn_norm)."""
    mtp = _mtp_block_prefixes(cfg)
    if split is None:
        return lambda name: True
    if split == "trunk":
        return lambda name: not name.startswith(mtp)
    if split == "mtp":
        return lambda name: name.startswith(mtp) or not name.startswith("blk.")
    raise ValueError(f"split must be None, 'trunk' or 'mtp', got {split!r}")


def _step35_config(*, n_head_swa, head_dim, n_ff, n_ff_exp, n_ff_shexp, **shape) -> _Step35:
    """A _Step35 from write_step35's shape keywords, filling the derived defaults."""
    n_embd, n_head = shape["n_embd"], shape["n_head"]
    return _Step35(
        # Step-3.5-Flash gives its sliding-window layers 1.5x the query heads of the full ones
        n_head_swa=n_head_swa or n_head + n_head // 2,
        head_dim=head_dim or n_embd // n_head,
        n_ff=n_ff or 2 * n_embd, n_ff_exp=n_ff_exp or n_embd // 2, n_ff_shexp=n_ff_shexp or n_embd // 2,
        **shape)


def write_step35(path, *, seed=0, n_embd=64, n_layer=4, n_mtp=3, n_swa=8, n_expert=4, n_expert_used=2, n_dense_lead=1,
                 n_ctx_train=4096, dtype="f32", oracle=False, acceptance=1.0, split=None,
                 n_head=4, n_head_kv=2, n_head_swa=None, head_dim=None, n_ff=None, n_ff_exp=None, n_ff_shexp=None,
                 attn_gate=True, oracle_chain=()) -> Path:
    """A step35 model with n_layer trunk blocks and n_mtp MTP blocks (blk.{n_layer}..).

    Random (default): varied, context-dependent greedy output; the MTP heads are random
    (acceptance near 0). ``oracle=True``: greedy output follows ``oracle_maps(seed)[0]``
    and every MTP head predicts ``oracle_maps(seed, acceptance)[1]``, so each draft
    position is accepted with probability ``acceptance`` given the previous ones were:
    with 3 chained heads, accepted/drafted is about (a + a^2 + a^3) / 3 and the mean
    accepted length 1 + a + a^2 + a^3. ``oracle_chain``: see :func:`oracle_maps`.

    ``split``: None (everything), "trunk" (no MTP tensors, still declares
    nextn_predict_layers) or "mtp" (MTP-only file), always the same values as the full
    file for the same arguments. Defaults of the extra shapes: n_head_swa = 1.5 n_head,
    head_dim = n_embd / n_head, n_ff = 2 n_embd, n_ff_exp = n_ff_shexp = n_embd / 2.
    """
    shape = {k: v for k, v in locals().items() if k in _SHAPE_ARGS}
    shape["oracle_chain"] = tuple(int(t) for t in oracle_chain)
    cfg = _step35_config(**shape)
    if split is not None and n_mtp == 0:
        raise ValueError("split needs MTP blocks (n_mtp > 0)")
    keep = _split_filter(cfg, split)
    tensors = [t for t in _step35_tensors(cfg, seed) if keep(t.name)]
    return _write_gguf(path, "step35", _step35_metadata(cfg), tensors, dtype)


# write_step35's keywords that shape the model, with their defaults (the one source of them)
_SHAPE_ARGS = {name: p.default for name, p in inspect.signature(write_step35).parameters.items()
               if name not in ("path", "seed", "dtype", "split")}


def write_step35_pair(dir, **kw) -> tuple[Path, Path]:
    """(trunk_only_path, mtp_only_path): dir/trunk.gguf and dir/mtp.gguf from the same weights."""
    dir = Path(dir)
    return (write_step35(dir / "trunk.gguf", split="trunk", **kw),
            write_step35(dir / "mtp.gguf", split="mtp", **kw))


def _step35_bytes(dtype: str, **shape) -> int:
    """Bytes of tensor data write_step35(**shape) writes (without alignment padding)."""
    cfg = _step35_config(**{**_SHAPE_ARGS, **shape})
    size = np.dtype(_DTYPES[dtype]).itemsize
    return sum(math.prod(t.shape) * (4 if len(t.shape) == 1 else size) for t in _step35_tensors(cfg, seed=0))


def oracle_size_for(target_bytes) -> dict:
    """write_step35 keyword arguments for an F16 model of about target_bytes of weights.

    The width grows with the square root of the size (10 to 25 blocks; 64-dim heads below
    1024 wide, 128-dim above); 4 experts with 2 active plus a shared expert, so about 2/3
    of the weights are read for every token and CPU decode is memory-bound.
    """
    target = float(target_bytes)
    width = math.sqrt(target / (14 * 35))          # a MoE block holds ~17.5 n_embd^2 F16 weights
    head_dim = 64 if width < 1024 else 128
    quantum = 4 * head_dim                         # n_head a multiple of 4: n_head_kv = n_head / 4
    n_embd = max(quantum, quantum * round(width / quantum))
    n_head = n_embd // head_dim
    kw = dict(n_embd=n_embd, n_head=n_head, n_head_kv=n_head // 4, head_dim=head_dim,
              n_ff=128 * round(8 * n_embd / 3 / 128), n_ff_exp=n_embd, n_ff_shexp=n_embd,
              n_expert=4, n_expert_used=2, n_mtp=3)
    two, three = (_step35_bytes("f16", n_layer=n, **kw) for n in (2, 3))
    per_block = three - two                        # block 2 is a MoE block
    kw["n_layer"] = max(2, round((target - (two - 2 * per_block)) / per_block))
    return {**kw, "dtype": "f16"}


# --------------------------------------------------------------------------- CLI

def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pyllama_mtp.tiny_models", description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=["llama", "step35", "oracle"])
    parser.add_argument("out", type=Path)
    parser.add_argument("--size-gb", type=float, help="step35/oracle: F16 weights of about this size")
    parser.add_argument("--acceptance", type=float, default=1.0, help="oracle: MTP draft acceptance per head")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", choices=["trunk", "mtp"], help="step35/oracle: write only this part")
    args = parser.parse_args(argv)

    if args.kind == "llama":
        path = write_llama(args.out, seed=args.seed)
    else:
        sized = oracle_size_for(args.size_gb * 1e9) if args.size_gb else {}
        path = write_step35(args.out, seed=args.seed, oracle=args.kind == "oracle", acceptance=args.acceptance,
                            split=args.split, **sized)
    print(f"{path} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
