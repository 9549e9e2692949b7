"""The bias evaluation as a PNG: one group of bars per model, one bar per condition (matplotlib, optional)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

#: (bar label, condition, metric, colour, hatch)
_BARS = (
    ("faithful: accuracy", "faithful", "accuracy", "#4c72b0", None),
    ("adversarial: accuracy", "adversarial", "accuracy", "#dd8452", None),
    ("neutral: accuracy", "neutral", "accuracy", "#55a868", None),
    ("adversarial: follows the cue", "adversarial", "text_following", "#c44e52", "//"),
)


def plot_bias(results: Mapping[str, Any], path: str | Path, *, title: str | None = None) -> Path:
    """Grouped bars (accuracy per condition and text-following rate, in %) with the 95 % bootstrap intervals as
    error bars; for multi-run models the runs are dots on their bar. Written through a temporary name.

    results: :func:`caad.bias_eval.evaluate_bias`'s output. Needs matplotlib (``pip install matplotlib``).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # an optional extra: say which
        raise ImportError("the bias plot needs matplotlib: pip install matplotlib") from exc
    models = results["models"]
    names = list(models)
    bars = [b for b in _BARS if any(b[1] in m for m in models.values())]
    width = 0.8 / max(len(bars), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(names) + 2), 4.2))
    for k, (label, condition, metric, colour, hatch) in enumerate(bars):
        xs, heights, low, high = [], [], [], []
        for i, name in enumerate(names):
            entry = (models[name].get(condition) or {}).get(metric)
            if entry is None:
                continue
            x = i + (k - (len(bars) - 1) / 2) * width
            xs.append(x)
            heights.append(100 * entry["mean"])
            low.append(100 * (entry["mean"] - entry["low"]))
            high.append(100 * (entry["high"] - entry["mean"]))
            if len(entry["runs"]) > 1:
                ax.scatter([x] * len(entry["runs"]), [100 * v for v in entry["runs"]], s=9, color="black", zorder=3)
        ax.bar(xs, heights, width, yerr=[low, high], capsize=2, label=label, color=colour, hatch=hatch,
               edgecolor="white" if hatch is None else "#7a2e30", linewidth=0.5)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([n.replace(", ", ",\n", 1) for n in names], fontsize=8)
    ax.set_ylabel("% of items")
    ax.set_ylim(0, 105)
    counts = results.get("n") or {}
    ax.set_title(title or "Text-prior bias: " + ", ".join(f"{v} {k}" for k, v in counts.items()) + " items",
                 fontsize=10)
    ax.legend(fontsize=7, ncols=2, loc="upper center", bbox_to_anchor=(0.5, -0.22), frameon=False)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
    return path
