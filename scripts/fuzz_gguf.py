#!/usr/bin/env python3
"""Feed mutated GGUF files to the loader and report any that kill the process.

    python scripts/fuzz_gguf.py --files 10000 --jobs 2 --out fuzz-crashes

Seeds are tiny models from the package's factory (a dense llama; a step35 with MoE, sliding
windows and MTP heads). Each mutant gets one to three mutations: structured ones on the
parsed file (every metadata value type, array and string lengths, duplicate / empty / huge
tokens, token types, merges, special ids, the tokenizer model, hyper-parameters, tensor
count, names, dims, types, offsets, alignment) or raw ones (truncation, byte flips in the
header or anywhere). Each file is loaded in a worker process, as a user would: a ``Llama``
(with its MTP heads where the seed has them, else without), then a short generation.

Outcomes: ``ok`` (it loaded and generated), ``refused`` (a typed ``PmtpError``: the
promise), ``untyped`` (another Python exception: a defect, reported), ``died`` (the worker
was killed by a signal: a crash inside llama.cpp) and ``hung`` (no answer within
--timeout). Files that died or hung are copied to --out; the exit status is 1 if any did
(or, with --strict, if any exception was untyped). The same --seed gives the same files.
"""
from __future__ import annotations

import argparse
import collections
import math
import multiprocessing as mp
import random
import shutil
import struct
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

# ------------------------------------------------------------------------------ the format

T_U8, T_I8, T_U16, T_I16, T_U32, T_I32, T_F32, T_BOOL, T_STR, T_ARR, T_U64, T_I64, T_F64 = range(13)
_FMT = {T_U8: "<B", T_I8: "<b", T_U16: "<H", T_I16: "<h", T_U32: "<I", T_I32: "<i", T_F32: "<f", T_BOOL: "<?",
        T_U64: "<Q", T_I64: "<q", T_F64: "<d"}
_INT_RANGE = {T_U8: (0, 255), T_I8: (-128, 127), T_U16: (0, 65535), T_I16: (-32768, 32767),
              T_U32: (0, 2**32 - 1), T_I32: (-2**31, 2**31 - 1), T_U64: (0, 2**64 - 1), T_I64: (-2**63, 2**63 - 1)}


@dataclass
class KV:
    key: str
    type: int
    value: object                 # scalar, str/bytes, or list
    sub_type: int | None = None


@dataclass
class Tensor:
    name: str
    dims: list[int]
    type: int
    offset: int                   # relative to the data section


@dataclass
class Gguf:
    kvs: list[KV]
    tensors: list[Tensor]
    data: bytes
    version: int = 3
    n_tensors: int | None = None  # header counts; None: the real ones
    n_kv: int | None = None
    alignment: int = 32
    marks: dict = field(default_factory=dict)   # byte positions of fields, filled by encode()


def parse(path: Path) -> Gguf:
    from pyllama_mtp.tools.gguf_header import read_header
    header = read_header(path)
    kvs = [KV(k, int(f.type), f.value, None if f.sub_type is None else int(f.sub_type))
           for k, f in header.fields.items()]
    infos = list(header.tensors.values())
    data_start = min(t.offset for t in infos)
    raw = path.read_bytes()
    tensors = [Tensor(t.name, list(t.shape), int(t.type), t.offset - data_start) for t in infos]
    return Gguf(kvs, tensors, raw[data_start:], alignment=header.alignment)


def _scalar(t: int, v) -> bytes:
    """v as GGUF type t; a value of another kind (after a retype) becomes 0 of that type."""
    fmt = _FMT[t]
    number = isinstance(v, (int, float)) and not isinstance(v, bool)
    if t in _INT_RANGE:
        lo, hi = _INT_RANGE[t]
        v = int(v) if number and not (isinstance(v, float) and not math.isfinite(v)) else 0
        v = min(max(v, lo), hi)
    elif t == T_BOOL:
        v = bool(v) if number or isinstance(v, bool) else False
    else:
        v = float(v) if number else 0.0
        if t == T_F32 and math.isfinite(v) and abs(v) > 3.4e38:
            v = math.copysign(float("inf"), v)
    return struct.pack(fmt, v)


def _string(s) -> bytes:
    b = s if isinstance(s, bytes) else str(s).encode("utf-8", "surrogatepass")
    return struct.pack("<Q", len(b)) + b


def encode(g: Gguf) -> bytes:
    """The file's bytes; g.marks records where length and type fields went, for raw mutations."""
    out = bytearray(b"GGUF")
    marks = collections.defaultdict(list)
    out += struct.pack("<I", g.version)
    marks["n_tensors"].append(len(out))
    out += struct.pack("<Q", len(g.tensors) if g.n_tensors is None else g.n_tensors)
    marks["n_kv"].append(len(out))
    out += struct.pack("<Q", len(g.kvs) if g.n_kv is None else g.n_kv)
    for kv in g.kvs:
        marks["string_len"].append(len(out))
        out += _string(kv.key)
        marks["kv_type"].append(len(out))
        out += struct.pack("<I", kv.type)
        if kv.type == T_STR:
            marks["string_len"].append(len(out))
            out += _string(kv.value)
        elif kv.type == T_ARR:
            marks["array_type"].append(len(out))
            out += struct.pack("<I", kv.sub_type)
            marks["array_len"].append(len(out))
            out += struct.pack("<Q", len(kv.value))
            for item in kv.value:
                out += _string(item) if kv.sub_type == T_STR else _scalar(kv.sub_type, item)
        else:
            out += _scalar(kv.type, kv.value)
    for t in g.tensors:
        marks["string_len"].append(len(out))
        out += _string(t.name)
        marks["n_dims"].append(len(out))
        out += struct.pack("<I", len(t.dims))
        for d in t.dims:
            marks["dim"].append(len(out))
            out += struct.pack("<Q", d % 2**64)
        marks["tensor_type"].append(len(out))
        out += struct.pack("<I", t.type % 2**32)
        marks["tensor_offset"].append(len(out))
        out += struct.pack("<Q", t.offset % 2**64)
    marks["data"].append(len(out))
    align = g.alignment if g.alignment > 0 else 32
    out += b"\0" * (-len(out) % align)
    out += g.data
    g.marks = dict(marks)
    return bytes(out)


# ------------------------------------------------------------------------------ mutations

_EDGE_INTS = [0, 1, -1, 2, 3, 7, 255, 256, 65535, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**63 - 1, 2**64 - 1, -2**31]
_EDGE_FLOATS = [0.0, -1.0, 1e-30, 1e38, -1e38, float("nan"), float("inf"), float("-inf")]
_HUGE_LENGTHS = [0, 1, 2**31, 2**32 - 1, 2**32, 2**62, 2**64 - 1]


def _kvs(g: Gguf, pred=lambda kv: True) -> list[KV]:
    return [kv for kv in g.kvs if pred(kv)]


def _kv(g: Gguf, key: str) -> KV | None:
    return next((kv for kv in g.kvs if kv.key == key), None)


def m_scalar_edge(g, rng):
    kv = rng.choice(_kvs(g, lambda kv: kv.type not in (T_STR, T_ARR)))
    kv.value = rng.choice(_EDGE_FLOATS if kv.type in (T_F32, T_F64) else _EDGE_INTS)
    return f"{kv.key} = {kv.value!r}"


def m_retype(g, rng):
    kv = rng.choice(g.kvs)
    new = rng.choice([t for t in range(13) if t != kv.type])
    if new == T_ARR:
        kv.value, kv.sub_type = [kv.value] if not isinstance(kv.value, list) else kv.value, rng.choice([T_U32, T_STR])
    elif new == T_STR:
        kv.value = str(kv.value)[:64]
    elif isinstance(kv.value, (list, str, bytes)):
        kv.value = rng.choice(_EDGE_INTS)
    kv.type = new
    return f"{kv.key} retyped to {new}"


def m_drop_kv(g, rng):
    kv = rng.choice(g.kvs)
    g.kvs.remove(kv)
    return f"dropped {kv.key}"


def m_dup_kv(g, rng):
    kv = rng.choice(g.kvs)
    g.kvs.insert(rng.randrange(len(g.kvs) + 1), KV(kv.key, kv.type, kv.value, kv.sub_type))
    return f"duplicated {kv.key}"


def _tokens(g):
    return _kv(g, "tokenizer.ggml.tokens")


def m_token_dup(g, rng):
    toks = _tokens(g).value
    i, j = rng.randrange(len(toks)), rng.randrange(len(toks))
    toks[i] = toks[j]
    return f"token {i} = token {j} ({toks[j]!r})"


def m_token_same_length_swap(g, rng):
    """A one-character change that makes a token equal to another of the same length."""
    toks = _tokens(g).value
    by_len = collections.defaultdict(list)
    for i, t in enumerate(toks):
        by_len[len(t)].append(i)
    group = rng.choice([v for v in by_len.values() if len(v) > 1])
    i, j = rng.sample(group, 2)
    toks[i] = toks[j]
    return f"token {i} became {toks[j]!r}"


def m_token_empty(g, rng):
    toks = _tokens(g).value
    i = rng.randrange(len(toks))
    toks[i] = ""
    return f"token {i} empty"


def m_token_huge(g, rng):
    toks = _tokens(g).value
    i = rng.randrange(len(toks))
    toks[i] = "\u2581" * rng.choice([256, 4096, 70000])
    return f"token {i} huge"


def m_token_bytes(g, rng):
    toks = _tokens(g).value
    i = rng.randrange(len(toks))
    toks[i] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 6)))
    return f"token {i} invalid UTF-8"


def m_token_count(g, rng):
    kv = rng.choice([k for k in (_tokens(g), _kv(g, "tokenizer.ggml.scores"), _kv(g, "tokenizer.ggml.token_type"))
                     if k is not None])
    n = len(kv.value)
    new = rng.choice([0, 1, n - 1, n + 1, n // 2])
    kv.value = (kv.value + kv.value[: max(0, new - n)])[:new]
    return f"{kv.key} has {new} entries"


def m_token_type(g, rng):
    kv = _kv(g, "tokenizer.ggml.token_type")
    for _ in range(rng.randrange(1, 8)):
        kv.value[rng.randrange(len(kv.value))] = rng.choice([-1, 0, 1, 2, 3, 4, 5, 6, 7, 8, 99, 2**31 - 1])
    return "token types changed"


def m_special_ids(g, rng):
    keys = [kv for kv in g.kvs if kv.key.startswith("tokenizer.ggml.") and kv.key.endswith("_token_id")]
    kv = rng.choice(keys)
    n = len(_tokens(g).value)
    kv.value = rng.choice([n, n + 1, 2**31 - 1, 2**32 - 1, -1, 0])
    return f"{kv.key} = {kv.value}"


def m_tokenizer_model(g, rng):
    kv = _kv(g, "tokenizer.ggml.model")
    kv.value = rng.choice(["gpt2", "bert", "t5", "rwkv", "ugm", "plamo2", "none", "", "unknown-model"])
    if kv.value == "gpt2" and rng.random() < 0.7:
        toks = _tokens(g).value
        merges = [f"{rng.choice(toks)} {rng.choice(toks)}" for _ in range(rng.randrange(1, 50))]
        merges += rng.choice([[""], ["nospace"], [" "], ["a b c"], ["\u2581 \u2581"]])
        g.kvs.append(KV("tokenizer.ggml.merges", T_ARR, merges, T_STR))
    return f"tokenizer model {kv.value!r}"


def m_pre(g, rng):
    g.kvs.append(KV("tokenizer.ggml.pre", T_STR, rng.choice(["llama3", "qwen2", "deepseek-llm", "gpt-4o", "x" * 300])))
    return "tokenizer pre"


def m_hparam(g, rng):
    arch = _kv(g, "general.architecture").value
    kv = rng.choice(_kvs(g, lambda kv: kv.key.startswith(f"{arch}.") and kv.type != T_STR))
    if kv.type == T_ARR:
        kv.value = [rng.choice(_EDGE_INTS) for _ in range(rng.choice([0, 1, len(kv.value) - 1, len(kv.value) + 3]))]
        kv.sub_type = rng.choice([kv.sub_type, T_U32, T_I32, T_F32])
    elif kv.type in (T_F32, T_F64):
        kv.value = rng.choice(_EDGE_FLOATS)
    else:
        kv.value = rng.choice([0, 1, 2, 3, 5, 7, 64, 1000, 2**16, 2**31 - 1, 2**32 - 1, 2**63])
    return f"{kv.key} = {kv.value!r}"


def m_arch(g, rng):
    kv = _kv(g, "general.architecture")
    kv.value = rng.choice(["llama", "step35", "qwen35", "qwen35moe", "glm4moe", "deepseek2", "gemma3", "mamba",
                           "bert", "t5", "", "no-such-arch"])
    return f"architecture {kv.value!r}"


def m_tensor_dims(g, rng):
    t = rng.choice(g.tensors)
    choice = rng.randrange(5)
    if choice == 0:
        t.dims[rng.randrange(len(t.dims))] = rng.choice([0, 1, 2, 3, 31, 33, 2**31, 2**40, 2**63, 2**64 - 1])
    elif choice == 1:
        t.dims.reverse()
    elif choice == 2:
        t.dims.append(rng.choice([1, 2, 3]))
    elif choice == 3:
        t.dims = t.dims[:-1] or [1]
    else:
        t.dims = [rng.choice([1, 2, 64]) for _ in range(rng.choice([0, 5, 8]))]
    return f"{t.name} dims {t.dims}"


def m_tensor_type(g, rng):
    t = rng.choice(g.tensors)
    t.type = rng.choice([0, 1, 2, 3, 8, 10, 12, 14, 15, 16, 24, 30, 31, 39, 40, 41, 99, 2**31])
    return f"{t.name} type {t.type}"


def m_tensor_offset(g, rng):
    t = rng.choice(g.tensors)
    other = rng.choice(g.tensors)
    t.offset = rng.choice([t.offset + 1, t.offset + 32, other.offset, len(g.data), len(g.data) - 32, 2**40, 2**64 - 1])
    return f"{t.name} offset {t.offset}"


def m_tensor_name(g, rng):
    t = rng.choice(g.tensors)
    t.name = rng.choice([rng.choice(g.tensors).name, "", "x" * 70, t.name + ".bias", "blk.99.attn_q.weight",
                         t.name.replace("blk.0", "blk.1")])
    return f"tensor renamed {t.name!r}"


def m_tensor_drop(g, rng):
    t = rng.choice(g.tensors)
    g.tensors.remove(t)
    return f"dropped tensor {t.name}"


def m_counts(g, rng):
    which = rng.choice(["n_tensors", "n_kv"])
    real = len(g.tensors) if which == "n_tensors" else len(g.kvs)
    setattr(g, which, rng.choice([0, real - 1, real + 1, real * 2, 2**31, 2**63, 2**64 - 1]))
    return f"{which} = {getattr(g, which)}"


def m_alignment(g, rng):
    kv = _kv(g, "general.alignment")
    value = rng.choice([0, 1, 3, 8, 64, 48, 2**31, 2**32 - 1])
    if kv is None:
        g.kvs.append(KV("general.alignment", T_U32, value))
    else:
        kv.value = value
    if value and not value & (value - 1) and value < 4096:
        g.alignment = value
    return f"alignment {value}"


def m_version(g, rng):
    g.version = rng.choice([0, 1, 2, 4, 2**16, 2**32 - 1])
    return f"version {g.version}"


STRUCTURED = [m_scalar_edge, m_retype, m_drop_kv, m_dup_kv, m_token_dup, m_token_same_length_swap, m_token_empty,
              m_token_huge, m_token_bytes, m_token_count, m_token_type, m_special_ids, m_tokenizer_model, m_pre,
              m_hparam, m_arch, m_tensor_dims, m_tensor_type, m_tensor_offset, m_tensor_name, m_tensor_drop,
              m_counts, m_alignment, m_version]


def raw_length(b: bytearray, g, rng):
    kind = rng.choice(["string_len", "array_len", "kv_type", "array_type", "n_dims", "dim", "tensor_type",
                       "tensor_offset"])
    positions = g.marks.get(kind)
    if not positions:
        return "no raw length"
    pos = rng.choice(positions)
    size = 4 if kind in ("kv_type", "array_type", "n_dims", "tensor_type") else 8
    old = int.from_bytes(b[pos:pos + size], "little")
    new = rng.choice([0, 1, old + 1, max(old - 1, 0), old * 2, *_HUGE_LENGTHS]) % 2**(8 * size)
    b[pos:pos + size] = new.to_bytes(size, "little")
    return f"raw {kind} at {pos}: {old} -> {new}"


def raw_truncate(b: bytearray, g, rng):
    cut = rng.randrange(len(b)) if rng.random() < 0.5 else rng.randrange(g.marks["data"][0] + 64)
    del b[cut:]
    return f"truncated at {cut}"


def raw_flip_header(b: bytearray, g, rng):
    end = g.marks["data"][0]
    for _ in range(rng.randrange(1, 9)):
        b[rng.randrange(4, end)] = rng.randrange(256)
    return "header bytes changed"


def raw_flip_anywhere(b: bytearray, g, rng):
    for _ in range(rng.randrange(1, 33)):
        b[rng.randrange(len(b))] = rng.randrange(256)
    return "bytes changed"


RAW = [raw_length, raw_truncate, raw_flip_header, raw_flip_anywhere]


def mutant(seed_file: Gguf, rng: random.Random) -> tuple[bytes, list[str]]:
    import copy
    g = copy.deepcopy(seed_file)
    done = []
    for _ in range(rng.choice([1, 1, 1, 2, 2, 3])):
        if rng.random() < 0.7:
            fn = rng.choice(STRUCTURED)
            try:
                done.append(fn(g, rng))
            except (IndexError, AttributeError, ValueError, TypeError):
                done.append(f"{fn.__name__} skipped")
    data = bytearray(encode(g))
    if rng.random() < 0.35 or not done:
        fn = rng.choice(RAW)
        done.append(fn(data, g, rng))
    return bytes(data), done


# ------------------------------------------------------------------------------ loading

def _worker(conn, mem_limit: int) -> None:
    """Loads the files it is sent, one at a time; answers (outcome, detail)."""
    import os
    import resource
    resource.setrlimit(resource.RLIMIT_AS, (mem_limit, mem_limit))
    os.environ["GGML_NO_BACKTRACE"] = "1"     # an abort dies at once (no debugger attached)
    import logging
    logging.disable(logging.CRITICAL)
    from pyllama_mtp import InternalError, Llama, MtpError, PmtpError
    while True:
        path, mtp = conn.recv()
        try:
            try:
                llm = Llama(path, mtp=mtp, draft=2 if mtp else 3, n_ctx=64, n_batch=64, n_ubatch=64, threads=1)
            except MtpError:
                llm = Llama(path, n_ctx=64, n_batch=64, n_ubatch=64, threads=1)
            with llm:
                llm.generate("hello there", max_tokens=4)
                llm.chat([{"role": "user", "content": "hi"}], max_tokens=2)
            conn.send(("ok", ""))
        except InternalError as e:      # typed, but it says "a bug": reported like an untyped one
            conn.send(("untyped", f"InternalError: {str(e)[:300]}"))
        except PmtpError as e:
            conn.send(("refused", type(e).__name__))
        except MemoryError:
            conn.send(("refused", "MemoryError"))
        except Exception as e:
            conn.send(("untyped", f"{type(e).__name__}: {str(e)[:200]}"))


class Loader:
    """A worker process that survives its files: a death or a hang is recorded, and the
    next file gets a fresh worker."""

    def __init__(self, timeout: float, mem_limit: int):
        self.timeout, self.mem_limit = timeout, mem_limit
        self.ctx = mp.get_context("spawn")
        self.proc = None

    def _start(self):
        self.conn, child = self.ctx.Pipe()
        self.proc = self.ctx.Process(target=_worker, args=(child, self.mem_limit), daemon=True)
        self.proc.start()

    def load(self, path: str, mtp: bool) -> tuple[str, str]:
        if self.proc is None or not self.proc.is_alive():
            self._start()
        self.conn.send((path, mtp))
        if self.conn.poll(self.timeout):
            try:
                return self.conn.recv()
            except EOFError:              # the worker is going down
                self.proc.join(30)
                if self.proc.is_alive():
                    self.proc.kill()
                    self.proc.join()
                code = self.proc.exitcode
                self.proc = None
                return "died", f"exit code {code}"
        self.proc.kill()                  # no answer in time
        self.proc.join()
        self.proc = None
        return "hung", f"no answer within {self.timeout:g} s"

    def close(self):
        if self.proc is not None:
            self.proc.kill()
            self.proc.join()


def seeds(workdir: Path) -> list[tuple[str, Gguf, bool]]:
    from pyllama_mtp import tiny_models as testing
    llama = testing.write_llama(workdir / "seed-llama.gguf", seed=1, n_embd=32, n_layer=2, n_head=4, n_head_kv=2,
                                n_ff=64)
    step35 = testing.write_step35(workdir / "seed-step35.gguf", seed=2, n_embd=32, n_layer=2, n_mtp=2, n_swa=4)
    return [("llama", parse(llama), False), ("step35", parse(step35), True)]


def run(n_files: int, seed: int, jobs: int, out: Path | None, timeout: float, mem_limit: int,
        progress: bool = True) -> dict:
    rng = random.Random(seed)
    results = collections.Counter()
    bad: list[tuple[str, str, list[str], str]] = []
    untyped = collections.Counter()
    refused = collections.Counter()
    with tempfile.TemporaryDirectory(prefix="fuzz-gguf-") as tmp:
        tmp = Path(tmp)
        seed_files = seeds(tmp)
        plan = []
        for i in range(n_files):
            name, g, mtp = seed_files[i % len(seed_files)]
            data, what = mutant(g, random.Random(rng.getrandbits(64)))
            path = tmp / f"m{i:05d}-{name}.gguf"
            path.write_bytes(data)
            plan.append((str(path), mtp, what))
        lock = threading.Lock()
        queue = collections.deque(plan)
        t0 = time.time()

        def drive():
            loader = Loader(timeout, mem_limit)
            try:
                while True:
                    with lock:
                        if not queue:
                            return
                        path, mtp, what = queue.popleft()
                    outcome, detail = loader.load(path, mtp)
                    with lock:
                        results[outcome] += 1
                        if outcome == "untyped":
                            untyped[detail.split(":")[0]] += 1
                        if outcome == "refused":
                            refused[detail] += 1
                        if outcome in ("died", "hung", "untyped"):
                            bad.append((path, outcome, what, detail))
                            if out is not None and outcome != "untyped":
                                out.mkdir(parents=True, exist_ok=True)
                                shutil.copy(path, out / Path(path).name)
                        done = sum(results.values())
                        if progress and (done % 200 == 0 or done == n_files):
                            print(f"{done}/{n_files} {dict(results)} {time.time() - t0:.0f} s", file=sys.stderr)
            finally:
                loader.close()

        threads = [threading.Thread(target=drive) for _ in range(max(1, jobs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return {"results": dict(results), "bad": bad, "untyped": dict(untyped), "refused": dict(refused)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=1000, help="mutants to try (default 1000)")
    ap.add_argument("--seed", type=int, default=0, help="the same seed gives the same files")
    ap.add_argument("--jobs", type=int, default=2, help="worker processes")
    ap.add_argument("--out", type=Path, default=None, help="copy files that died or hung here")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds before a load counts as hung")
    ap.add_argument("--mem-limit-gb", type=float, default=8.0,
                    help="address-space limit of a worker: a huge allocation fails instead of swapping")
    ap.add_argument("--strict", action="store_true", help="untyped Python exceptions fail the run too")
    args = ap.parse_args(argv)
    report = run(args.files, args.seed, args.jobs, args.out, args.timeout, int(args.mem_limit_gb * 2**30))
    print(f"files: {args.files}, outcomes: {report['results']}")
    print(f"refused with: {report['refused']}")
    if report["untyped"]:
        print(f"untyped exceptions: {report['untyped']}")
    for path, outcome, what, detail in report["bad"]:
        print(f"{outcome}: {Path(path).name}: {'; '.join(what)} ({detail})")
    failed = any(outcome in ("died", "hung") for _, outcome, _, _ in report["bad"])
    return 1 if failed or (args.strict and report["untyped"]) else 0


if __name__ == "__main__":
    sys.exit(main())
