"""`compare --plot FILE.png`: one bar chart per evaluate metric (mean with std error bars, one bar
per run) and, for run folders, training curves against step (the paper's Figure 3 view of the
reverse-KL estimate going down during distillation)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from minillm_cli.errors import InputError
from minillm_cli.eval.compare import Entry, metric_order
from minillm_cli.eval.metrics import higher_is_better

# Training-log keys worth a curve, in display order; whichever exist in metrics.jsonl are drawn.
CURVE_KEYS = ("reverse_kl", "valid_reverse_kl", "loss", "valid_loss", "valid_rougeL", "reward", "pt_loss")


def _curve_keys(entries: Sequence[Entry]) -> list[str]:
    keys = []
    for k in CURVE_KEYS:
        if any(sum(1 for r in e.curve if _num(r.get(k)) and _num(r.get("step"))) >= 2 for e in entries):
            keys.append(k)
    return keys


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def plot_comparison(entries: Sequence[Entry], path: Path, *, title: str = "minillm compare") -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only; never a window, works headless
    import matplotlib.pyplot as plt

    path = Path(path)
    if path.suffix.lower() not in (".png", ".pdf", ".svg"):
        raise InputError(f"--plot {path}: use a .png, .pdf or .svg file name")
    # Training metrics are drawn as curves, not as bars of their last value.
    bars = [m for m in metric_order(entries) if not m.startswith("train.")]
    curves = _curve_keys(entries)
    panels = [("bar", m) for m in bars] + [("curve", k) for k in curves]
    if not panels:
        raise InputError("--plot: nothing to draw (no evaluate metrics and no training curves)")
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.6 * nrows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    color_of = {e.name: colors[i % len(colors)] for i, e in enumerate(entries)}

    for ax, (kind, key) in zip(axes.flat, panels):
        if kind == "bar":
            _bar_panel(ax, entries, key, color_of)
        else:
            _curve_panel(ax, entries, key, color_of)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _bar_panel(ax, entries, metric, color_of) -> None:
    shown = [e for e in entries if metric in e.metrics and _num(e.metrics[metric].get("mean"))]
    means = [float(e.metrics[metric]["mean"]) for e in shown]
    stds = [float(e.metrics[metric].get("std") or 0.0) for e in shown]
    xs = range(len(shown))
    ax.bar(xs, means, yerr=stds, capsize=4, color=[color_of[e.name] for e in shown])
    ax.set_xticks(list(xs))
    ax.set_xticklabels([e.name for e in shown], rotation=20 if len(shown) > 3 else 0, ha="right"
                       if len(shown) > 3 else "center", fontsize=8)
    up = higher_is_better(metric)
    ax.set_title(metric + ("" if up is None else (" (higher is better)" if up else " (lower is better)")),
                 fontsize=10)
    for x, m, s in zip(xs, means, stds):
        # Above the error bar's cap (below it for negative bars), so label and cap never overlap.
        top = m + s if m >= 0 else m - s
        ax.annotate(f"{m:.3g}", (x, top), textcoords="offset points", xytext=(0, 3 if m >= 0 else -3),
                    ha="center", va="bottom" if m >= 0 else "top", fontsize=8)
    ax.margins(y=0.12)
    ax.grid(axis="y", alpha=0.3)


def _curve_panel(ax, entries, key, color_of) -> None:
    for e in entries:
        pts = [(r["step"], r[key]) for r in e.curve if _num(r.get(key)) and _num(r.get("step"))]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, label=e.name, color=color_of[e.name], marker="." if len(pts) < 30 else None)
    ax.set_title(f"{key} (training)", fontsize=10)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
