"""The run's report: ``results.json``, ``results.csv``, ``report.md`` and ``figures/``.

Tables follow the paper (Table 1: every method; Table 2: PaSeR against the IoU-matched
cascade), plus an honest view that IoU/GFLOP alone hides: IoU/GFLOP rewards the cheapest
model whatever its quality, so each method also gets "gap recovered",
``(IoU - IoU_f0) / (IoU_fK - IoU_f0)``, its GFLOP as a fraction of fK's, and each curve its
normalised area over one common GFLOP range.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np

from paser.cost import FLOP_CONVENTION
from paser.train.common import atomic_write_text

ROUTED = ("PaSeR", "PaSeR-RandPol", "IDK-Cascade", "IDK-Cascade (IoU match)", "Oracle")


def method_order(num_pool: int) -> list[str]:
    return [*ROUTED, "DeepLabV3+", "SegFormer", "EfficientViT", "MatPhase", "f0", "f0 (MC)",
            *(f"f{k}" for k in range(1, num_pool + 1))]


def add_honest_view(methods: dict[str, dict], top: str) -> None:
    """Gap recovered and GFLOP as a fraction of ``top`` (fK on all patches), in place."""
    base, ceil = methods["f0"], methods[top]
    span = ceil["iou"] - base["iou"]
    for m in methods.values():
        m["gap_recovered"] = (m["iou"] - base["iou"]) / span if abs(span) > 1e-12 else None
        m["gflops_frac_of_top"] = m["gflops"] / ceil["gflops"]


def step_area(curve: dict, lo: float, hi: float, samples: int = 512) -> float:
    """Mean over budgets ``g`` in [lo, hi] of the best IoU a curve reaches at GFLOP <= g
    (0 below its cheapest point): its normalised area under IoU-vs-GFLOP."""
    xs, ys = np.asarray(curve["gflops"]), np.asarray(curve["iou"])
    grid = np.linspace(lo, hi, samples)
    best = np.array([ys[xs <= g].max() if (xs <= g).any() else 0.0 for g in grid])
    return float(best.mean())


def curve_areas(curves: dict[str, dict]) -> tuple[dict[str, float], list[float]]:
    lo = min(min(c["gflops"]) for c in curves.values())
    hi = max(max(c["gflops"]) for c in curves.values())
    return {k: step_area(c, lo, hi) for k, c in curves.items()}, [lo, hi]


def table2(methods: dict[str, dict]) -> dict:
    """PaSeR against IDK-Cascade (IoU match): FLOPs saved and IoU/GFLOP gained, in %."""
    p, c = methods["PaSeR"], methods["IDK-Cascade (IoU match)"]
    return {"flops_saved_pct": 100 * (1 - p["gflops"] / c["gflops"]),
            "iou_per_gflop_gain_pct": 100 * (p["iou_per_gflop"] / c["iou_per_gflop"] - 1),
            "iou_difference": p["iou"] - c["iou"]}


def _fmt(v, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def markdown(results: dict) -> str:
    """``report.md``: setting, Table 1, Table 2, routing fractions, curves, notes."""
    methods = results["methods"]
    out = io.StringIO()
    w = out.write
    w(f"# PaSeR report: {results.get('preset') or 'custom config'}\n\n")
    w(f"- device: {results['device']}; seed {results['seed']}; lam {results['lam']}; "
      f"test images {results['test_images']} of {results['image_size'][0]} x "
      f"{results['image_size'][1]}; grid {results['grid'][0]} x {results['grid'][1]}; "
      f"T = {results['mc_samples']}\n")
    w(f"- FLOPs: {results['flop_convention']}; GFLOP per image at inference, all Monte Carlo "
      "passes, the policy and every routed model included.\n")
    w(f"- ms/image: wall-clock on this device in this run, batches of "
      f"{results['timing_batch']} images, after one warm-up batch.\n\n")
    w("## Table 1: every method on the test split\n\n")
    w("| method | IoU | GFLOP | IoU/GFLOP | ms/image | gap recovered | GFLOP / "
      f"{results['top_model']} |\n|---|---|---|---|---|---|---|\n")
    for name, m in methods.items():
        w(f"| {name} | {_fmt(m['iou'])} | {_fmt(m['gflops'], 3)} | {_fmt(m['iou_per_gflop'])} | "
          f"{_fmt(m['ms_per_image'], 2)} | {_fmt(m.get('gap_recovered'), 3)} | "
          f"{_fmt(m.get('gflops_frac_of_top'), 3)} |\n")
    t2 = results["table2"]
    w("\n## Table 2: PaSeR against IDK-Cascade (IoU match)\n\n")
    w("| FLOPs saved | IoU/GFLOP gain | IoU difference |\n|---|---|---|\n")
    w(f"| {t2['flops_saved_pct']:.1f} % | {t2['iou_per_gflop_gain_pct']:+.1f} % | "
      f"{t2['iou_difference']:+.4f} |\n")
    match = results["cascade"]["iou_match"]
    if not match["reached"]:
        w(f"\nThe cascade never reached PaSeR's IoU within {results['cascade']['tolerance']}: "
          "its most accurate thresholds are shown.\n")
    w("\n## Routing: share of patches per model\n\n")
    names = results["models"]
    w("| method | " + " | ".join(names) + " |\n|---|" + "---|" * len(names) + "\n")
    for name, m in methods.items():
        if "fractions" in m:
            w(f"| {name} | " + " | ".join(f"{100 * f:.1f} %" for f in m["fractions"]) + " |\n")
    w("\n## IoU-vs-GFLOP curves (test split)\n\n")
    lo, hi = results["curve_range"]
    w(f"Normalised area under each curve over {lo:.3f}-{hi:.3f} GFLOP (mean best IoU within "
      "budget; higher is better):\n\n")
    for name, area in results["curve_areas"].items():
        w(f"- {name}: {area:.4f}\n")
    w(f"- PaSeR's point {'is' if results['paser_on_or_above_cascade'] else 'is NOT'} on or "
      "above the cascade's curve (at PaSeR's GFLOP, IoU at least the cascade's best).\n")
    w("\nFigures: `figures/iou_vs_gflop.png`, `figures/qualitative.png`.\n")
    w("\n## Notes\n\n")
    for note in results["notes"]:
        w(f"- {note}\n")
    return out.getvalue()


def write_report(run_dir: Path, results: dict) -> str:
    """Write results.json, results.csv and report.md; return the markdown."""
    atomic_write_text(json.dumps(results, indent=2), run_dir / "results.json")
    buf = io.StringIO()
    cols = ["method", "iou", "gflops", "iou_per_gflop", "ms_per_image", "batch_size",
            "gap_recovered", "gflops_frac_of_top", "fractions"]
    writer = csv.writer(buf)
    writer.writerow(cols)
    for name, m in results["methods"].items():
        writer.writerow([name] + [" ".join(f"{f:.4f}" for f in m[c]) if c == "fractions" and c in m
                                  else m.get(c, "") for c in cols[1:]])
    atomic_write_text(buf.getvalue(), run_dir / "results.csv")
    text = markdown(results)
    atomic_write_text(text, run_dir / "report.md")
    return text


def plot_curves(path: Path, methods: dict[str, dict], curves: dict[str, dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    styles = {"PaSeR": "C0", "IDK-Cascade": "C1", "Oracle": "C2"}
    for name, c in curves.items():
        ax.plot(c["gflops"], c["iou"], "-", color=styles.get(name, "C7"), alpha=0.7,
                label=f"{name} curve")
    for i, (name, m) in enumerate(methods.items()):
        ax.scatter(m["gflops"], m["iou"], marker="o*sD^v<>phX8d"[i % 13], s=60, zorder=3,
                   color=plt.cm.tab20(i % 20), label=name)
    ax.set_xscale("log")
    ax.set_xlabel(f"GFLOP per image ({FLOP_CONVENTION})", fontsize=8)
    ax.set_ylabel("test mIoU")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_qualitative(path: Path, images, labels, preds, actions, entropies, grid,
                     model_names: list[str]) -> None:
    """Rows of test images: input, label, PaSeR prediction, routing map, entropy map."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    n = len(images)
    fig, axes = plt.subplots(n, 5, figsize=(12, 2.5 * n), squeeze=False)
    cmap = ListedColormap(["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd"][:len(model_names)])
    for r in range(n):
        h, w = labels[r].shape
        rmap = np.kron(actions[r].reshape(grid.rows, grid.cols).numpy(),
                       np.ones((math.ceil(h / grid.rows), math.ceil(w / grid.cols))))[:h, :w]
        panels = [(images[r][0], "gray", "input"), (labels[r], "viridis", "label"),
                  (preds[r], "viridis", "PaSeR"), (rmap, cmap, "routing"),
                  (entropies[r][:h, :w], "magma", "f0 entropy")]
        for c, (img, cm, title) in enumerate(panels):
            ax = axes[r, c]
            kw = {"vmin": 0, "vmax": len(model_names) - 1} if title == "routing" else {}
            ax.imshow(np.asarray(img), cmap=cm, interpolation="nearest", **kw)
            ax.set_xticks([])
            ax.set_yticks([])
            if title == "routing":  # the patch borders
                for k in range(1, grid.rows):
                    ax.axhline(k * h / grid.rows - 0.5, color="white", lw=0.8)
                for k in range(1, grid.cols):
                    ax.axvline(k * w / grid.cols - 0.5, color="white", lw=0.8)
            if r == 0:
                ax.set_title(title if title != "routing" else
                             "routing: " + ", ".join(f"{i}={m}" for i, m in enumerate(model_names)),
                             fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
