"""``pyllama-mtp inspect``: what a GGUF file holds and what will go wrong with it, from
the header alone (no tensor data is read, so a 100 GB file answers at once).

:func:`inspect_model` returns a JSON-ready dict (what ``--json`` prints);
:func:`format_report` renders it for people.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any, Callable

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q

from .gguf_header import GgufHeader, TensorInfo
from .modelfile import MTP, MTP_REQUIRED, SHARED, TRUNK, ModelFile, open_model

_GROUPS = (TRUNK, MTP, SHARED)
_N_MISSING_SHOWN = 5
_TEMPLATE_SHOWN = 72            # characters of the chat template's first line in the text report
# Types that are not block-quantized: MTP tensors of these types are never "below Q8_0".
_UNQUANTIZED = {Q.F32, Q.F16, Q.BF16, Q.F64, Q.I8, Q.I16, Q.I32, Q.I64}


def inspect_model(path) -> dict[str, Any]:
    m = open_model(path)
    h = m.header
    return {
        "path": str(h.path),
        "file_size": h.file_size,
        "arch": m.arch,
        "name": _text(h.get("general.name")),
        "description": _text(h.get("general.description")),
        "n_params": sum(t.n_elements for t in h.tensors.values()),
        "n_embd": m.n_embd,
        "n_vocab": m.n_vocab,
        "context_length": m.key("context_length"),
        "layers": {"block_count": m.n_layer_all, "trunk": m.n_layer, "mtp": m.n_layer_mtp},
        "mtp": _mtp_summary(m),
        "sliding_window": {"window": m.key("attention.sliding_window"),
                           "pattern": m.key("attention.sliding_window_pattern")},
        "chat_template": _chat_template(h.get("tokenizer.chat_template")),
        "special_tokens": {name: _token(h, h.get(f"tokenizer.ggml.{name}_token_id")) for name in ("bos", "eos")},
        "tensor_groups": _tensor_groups(m),
        "warnings": [w for check in _CHECKS if (w := check(m))],
    }


def _text(value: Any) -> Any:
    """Metadata strings that are not UTF-8 arrive as bytes; JSON and terminals want str."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _mtp_summary(m: ModelFile) -> dict[str, Any]:
    missing = m.mtp_missing if m.mtp_status == "partial" else []
    return {
        "status": m.mtp_status,
        "missing": missing[:_N_MISSING_SHOWN],
        "n_missing": len(missing),
        "types": dict(Counter(t.type.name for t in m.mtp_tensors)),
    }


def _chat_template(template: Any) -> dict[str, Any]:
    if not template:
        return {"present": False, "first_line": None}
    return {"present": True, "first_line": _text(template).splitlines()[0]}


def _token(h: GgufHeader, token_id: int | None) -> dict[str, Any] | None:
    if token_id is None:
        return None
    tokens = h.get("tokenizer.ggml.tokens") or []
    return {"id": token_id, "text": _text(tokens[token_id]) if 0 <= token_id < len(tokens) else None}


def _tensor_groups(m: ModelFile) -> dict[str, dict[str, Any]]:
    """Per group (trunk, MTP blocks, embeddings+output): totals and, per tensor type, the
    count and bytes; types in the order of the bytes they take."""
    by_group: dict[str, list[TensorInfo]] = defaultdict(list)
    for t in m.header.tensors.values():
        by_group[m.group_of(t.name)].append(t)
    groups = {}
    for group in _GROUPS:
        tensors = by_group[group]
        types: dict[str, dict[str, int]] = defaultdict(lambda: {"count": 0, "bytes": 0})
        for t in tensors:
            types[t.type.name]["count"] += 1
            types[t.type.name]["bytes"] += t.n_bytes
        groups[group] = {
            "tensors": len(tensors),
            "params": sum(t.n_elements for t in tensors),
            "bytes": sum(t.n_bytes for t in tensors),
            "types": dict(sorted(types.items(), key=lambda kv: -kv[1]["bytes"])),
        }
    return groups


# --------------------------------------------------------------------------- warnings

def _not_text(m: ModelFile) -> str | None:
    if m.n_layer_all is None:
        return f"no {m.arch}.block_count: not a text model; Llama() cannot load it"
    return None


def _trunk_only(m: ModelFile) -> str | None:
    if m.n_layer_mtp > 0 and m.mtp_status == "none":
        return (f"declares {m.n_layer_mtp} MTP layers but has none of their tensors (a trunk-only file): "
                f"load it with mtp='mtp-only.gguf' (the matching MTP-only file), or merge the two with "
                f"pyllama-mtp graft {m.path.name} mtp-only.gguf -o full.gguf")
    return None


def _partial(m: ModelFile) -> str | None:
    if m.mtp_status != "partial":
        return None
    missing = m.mtp_missing
    shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
    total = m.n_layer_mtp * len(MTP_REQUIRED)
    return (f"MTP tensors partial: {len(missing)} of the {total} required MTP tensors are missing ({shown}); "
            "llama.cpp refuses this file; re-convert the model with all its MTP layers")


def _mtp_only(m: ModelFile) -> str | None:
    if m.has_trunk or m.n_layer_mtp == 0:
        return None
    return (f"MTP-only file (no trunk blocks): it cannot generate alone; pass it as mtp='{m.path.name}' "
            f"next to its trunk-only file, or merge the two with "
            f"pyllama-mtp graft trunk.gguf {m.path.name} -o full.gguf")


def _bits_per_weight(t: Q) -> float:
    block_size, type_size = GGML_QUANT_SIZES[t]
    return 8 * type_size / block_size


def _low_bit_mtp(m: ModelFile) -> str | None:
    """Quantized MTP heads predict the trunk worse, so fewer drafts are accepted; Q8_0
    costs little on layers this few."""
    mtp = m.mtp_tensors
    low = [t for t in mtp if t.type not in _UNQUANTIZED and _bits_per_weight(t.type) < _bits_per_weight(Q.Q8_0)]
    if not low:
        return None
    types = ", ".join(sorted({t.type.name for t in low}))
    blocks = "|".join(str(il) for il in range(m.n_layer, m.n_layer_all))
    return (f"MTP tensors below Q8_0: {len(low)} of {len(mtp)} MTP tensors are {types} (e.g. {low[0].name}); "
            "low-bit MTP heads get fewer drafts accepted; re-quantize keeping the MTP blocks at Q8_0 or better, "
            f"e.g. llama-quantize --tensor-type 'blk\\.({blocks})\\.=q8_0' ...")


_CHECKS: tuple[Callable[[ModelFile], str | None], ...] = (_not_text, _trunk_only, _partial, _mtp_only, _low_bit_mtp)


# --------------------------------------------------------------------------- text

def format_report(r: dict[str, Any]) -> str:
    layers = r["layers"]
    lines = [r["path"]] + [f"  {label:<16}{value}" for label, value in [
        ("arch", r["arch"]),
        ("name", r["name"] or "-"),
        ("description", r["description"] or "-"),
        ("file size", f"{_bytes(r['file_size'])} ({r['file_size']:,} bytes)"),
        ("parameters", _count(r["n_params"])),
        ("layers", "-" if layers["block_count"] is None else
         f"{layers['trunk']} trunk + {layers['mtp']} MTP (block_count {layers['block_count']})"),
        ("n_embd", _or_dash(r["n_embd"])),
        ("vocabulary", "-" if r["n_vocab"] is None else f"{r['n_vocab']} tokens"),
        ("context length", _or_dash(r["context_length"])),
        ("sliding window", _swa_text(r["sliding_window"])),
        ("chat template", _template_text(r["chat_template"])),
        ("special tokens", ", ".join(f"{name} {_token_text(tok)}" for name, tok in r["special_tokens"].items())),
        ("MTP tensors", _mtp_text(r["mtp"], layers["mtp"])),
    ]]
    lines += ["tensors", f"  {'group':<19}{'type':<9}{'count':>7}{'bytes':>12}"]
    for group, g in r["tensor_groups"].items():
        for type_name, t in g["types"].items():
            lines.append(f"  {group:<19}{type_name:<9}{t['count']:>7}{_bytes(t['bytes']):>12}")
    if r["warnings"]:
        lines += ["warnings"] + [f"  ! {w}" for w in r["warnings"]]
    return "\n".join(lines) + "\n"


def _or_dash(value: Any) -> str:
    return "-" if value is None else str(value)


def _bytes(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    size, unit = float(n), "B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        size /= 1024
        if size < 1024:
            break
    return f"{size:.1f} {unit}"


def _count(n: int) -> str:
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.2f} {suffix} ({n:,})"
    return str(n)


def _swa_text(swa: dict[str, Any]) -> str:
    window, pattern = swa["window"], swa["pattern"]
    if not window:
        return "none"
    if isinstance(pattern, list):
        layout = "".join("S" if is_swa else "F" for is_swa in pattern)
        return f"{window} tokens; layers {layout} (S sliding, F full)"
    if pattern:
        return f"{window} tokens; 1 full-attention layer in every {pattern}"
    return f"{window} tokens"


def _template_text(t: dict[str, Any]) -> str:
    if not t["present"]:
        return "none"
    line = t["first_line"]
    return "yes: " + (line if len(line) <= _TEMPLATE_SHOWN else line[:_TEMPLATE_SHOWN] + "...")


def _token_text(tok: dict[str, Any] | None) -> str:
    if tok is None:
        return "-"
    return f"{tok['id']}" + ("" if tok["text"] is None else f" {tok['text']!r}")


def _mtp_text(mtp: dict[str, Any], n_layer_mtp: int) -> str:
    if n_layer_mtp == 0:
        return "none declared"
    if mtp["status"] == "none":
        return "none (trunk-only file)"
    types = ", ".join(f"{name} x{n}" for name, n in mtp["types"].items())
    if mtp["status"] == "all":
        return f"all ({types})"
    more = mtp["n_missing"] - len(mtp["missing"])
    return f"partial ({types}); missing " + ", ".join(mtp["missing"]) + (f" and {more} more" if more else "")
