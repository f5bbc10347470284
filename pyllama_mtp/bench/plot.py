"""--plot: tok/s and speedup against draft length, one line per test (depth, size)."""
from __future__ import annotations

from collections import defaultdict


def plot(records: list[dict], path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("--plot needs matplotlib: pip install 'pyllama-mtp[plot]'") from e
    series = defaultdict(list)
    for r in records:
        if r["n_gen"] > 0 and isinstance(r["n_draft"], int):
            series[(r["model_filename"], r["_label"], r["n_threads"])].append(r)
    fig, (ax_ts, ax_up) = plt.subplots(1, 2, figsize=(11, 4.2))
    for (model, label, threads), rows in sorted(series.items()):
        rows.sort(key=lambda r: r["n_draft"])
        drafts = [r["n_draft"] for r in rows]
        name = f"{model.split('/')[-1]} {label} t{threads}"
        ax_ts.errorbar(drafts, [r["avg_ts"] for r in rows], yerr=[r["stddev_ts"] for r in rows], marker="o",
                       capsize=3, label=name)
        ax_up.plot(drafts, [r["speedup"] or 0 for r in rows], marker="o", label=name)
    ax_ts.set(xlabel="draft length (0 = MTP off)", ylabel="tokens / s", title="decode throughput")
    ax_up.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax_up.set(xlabel="draft length (0 = MTP off)", ylabel="speedup vs draft 0", title="MTP speedup")
    for ax in (ax_ts, ax_up):
        ax.grid(alpha=0.3)
        ax.set_xticks(sorted({d for rows in series.values() for d in (r["n_draft"] for r in rows)}))
    ax_up.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
