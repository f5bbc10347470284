"""Bench records and their formats: llama-bench's field names where they apply,
plus the MTP columns (n_draft, accept_rate, accept_rate_per_pos, mean_accept_len,
speedup against draft 0 measured in the same run)."""
from __future__ import annotations

import csv
import io
import json
import os
from datetime import datetime, timezone

from .runner import Measurement

FIELDS = [
    "build_commit", "cpu_info", "gpu_info", "backends", "model_filename", "model_type", "model_size",
    "model_n_params", "n_batch", "n_ubatch", "n_threads", "type_k", "type_v", "n_gpu_layers", "flash_attn",
    "n_prompt", "n_gen", "n_depth", "test_time", "avg_ns", "stddev_ns", "avg_ts", "stddev_ts",
    "samples_ns", "samples_ts", "n_draft", "accept_rate", "accept_rate_per_pos", "mean_accept_len", "speedup",
]


def record(m: Measurement, model_info, env: dict) -> dict:
    ns = m.samples_ns
    avg_ns = sum(ns) / len(ns) if ns else 0.0
    std_ns = (sum((x - avg_ns) ** 2 for x in ns) / (len(ns) - 1)) ** 0.5 if len(ns) > 1 else 0.0
    inst, test = m.instance, m.test
    return {
        **env,
        "model_filename": inst.model, "model_type": model_info.description,
        "model_size": model_info.size_bytes, "model_n_params": model_info.n_params,
        "n_batch": inst.n_batch, "n_ubatch": inst.n_ubatch, "n_threads": inst.threads,
        "type_k": inst.type_k, "type_v": inst.type_v, "n_gpu_layers": inst.n_gpu_layers,
        "flash_attn": inst.flash_attn, "n_prompt": test.n_prompt, "n_gen": test.n_gen, "n_depth": test.n_depth,
        "test_time": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "avg_ns": int(avg_ns), "stddev_ns": int(std_ns), "avg_ts": m.avg_ts, "stddev_ts": m.stddev_ts,
        "samples_ns": list(ns), "samples_ts": m.samples_ts,
        "n_draft": test.n_draft, "accept_rate": m.accept_rate, "accept_rate_per_pos": m.accept_rate_per_pos,
        "mean_accept_len": m.mean_accept_len, "speedup": None,
        "_label": test.label,
    }


def add_speedups(records: list[dict]) -> None:
    """speedup = avg_ts / avg_ts of the draft-0 row with every other setting equal."""
    def key(r):
        return tuple(r[k] for k in ("model_filename", "n_batch", "n_ubatch", "n_threads", "type_k", "type_v",
                                    "n_gpu_layers", "flash_attn", "n_prompt", "n_gen", "n_depth"))
    base = {key(r): r["avg_ts"] for r in records if r["n_draft"] == 0}
    for r in records:
        b = base.get(key(r))
        if b and r["n_gen"] > 0:
            r["speedup"] = r["avg_ts"] / b


def _public(r: dict) -> dict:
    return {k: r[k] for k in FIELDS}


def to_json(records: list[dict]) -> str:
    return json.dumps([_public(r) for r in records], indent=2)


def to_jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(_public(r)) + "\n" for r in records)


def to_csv(records: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=FIELDS, lineterminator="\n")
    writer.writeheader()
    for r in records:
        row = _public(r)
        for k in ("samples_ns", "samples_ts", "accept_rate_per_pos"):
            row[k] = ";".join(f"{x:.6g}" if isinstance(x, float) else str(x) for x in row[k])
        writer.writerow(row)
    return buf.getvalue()


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.2f} MiB"


def _params(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return str(n)


def to_markdown(records: list[dict]) -> str:
    cols = ["model", "size", "params", "backend", "threads", "n_draft", "test", "t/s", "accept", "per pos",
            "speedup"]
    rows = []
    for r in records:
        rows.append([
            os.path.basename(r["model_filename"]), _size(r["model_size"]), _params(r["model_n_params"]),
            r["backends"], str(r["n_threads"]), str(r["n_draft"]), r["_label"],
            f"{r['avg_ts']:.2f} ± {r['stddev_ts']:.2f}",
            "-" if r["accept_rate"] is None else f"{r['accept_rate']:.2f}",
            "-" if not r["accept_rate_per_pos"] else "/".join(f"{x:.2f}" for x in r["accept_rate_per_pos"]),
            "-" if r["speedup"] is None else f"{r['speedup']:.2f}x",
        ])
    widths = [max(len(c), *(len(row[i]) for row in rows)) if rows else len(c) for i, c in enumerate(cols)]
    right = {"size", "params", "threads", "n_draft", "test", "t/s", "accept", "per pos", "speedup"}

    def line(cells):
        return "| " + " | ".join(c.rjust(w) if cols[i] in right else c.ljust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths))) + " |"
    sep = "| " + " | ".join(("-" * (w - 1) + ":") if c in right else "-" * w for c, w in zip(cols, widths)) + " |"
    return "\n".join([line(cols), sep, *(line(r) for r in rows)]) + "\n"


FORMATTERS = {"md": to_markdown, "csv": to_csv, "json": to_json, "jsonl": to_jsonl}
