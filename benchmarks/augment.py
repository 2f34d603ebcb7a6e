"""Stage 1 with and without its augmentations (``stage1.augment``: views and intensity
jitter; ``stage1.crop_margin``: random crops of tiled images), on a folder built to look
like a user's few labelled tomography slices, and on the demo's synthetic set.

The folder (issue 35, item 6): 4 "scans" of 400 x 400 to 500 x 601 slices, 8 training, 3
validation and 4 test slices in all (about 150 training tiles of 128 x 128, 50 per stage),
float32 reconstructions (an attenuation-like scale with noise and blur, not [0, 1]) and
palette TIFF labels of 3 phases: the shape of the held-back nano-CT set, drawn by paser's
own battery generator. ``--data folder-clear`` is the same folder with a third of the
noise and half the blur: on the first, every model tops out near the same mIoU, and
whether stage 1 orders the pool (f0 < f1 < f2) can only show where the data leaves room.
Each setting runs ``paser pretrain --preset battery-quick`` with the
overrides ``paser data check`` prints, for each seed, in a process of its own, and reads
each pool model's test mIoU and epochs from ``stage1.json``.

    .venv/bin/python benchmarks/augment.py                      # folder, seeds 0 1 2
    .venv/bin/python benchmarks/augment.py --data demo --seeds 0

Writes ``benchmarks/results/augment.json`` (or ``--results``), one entry per data set and ``--extra``: each
row records the stage-1 settings it trained with (``settings``), and is written as it
finishes; a call with fewer ``--seeds``, or ``--only``, replaces those rows of the entry
and keeps its others (:func:`record`). An entry measured with other settings
(battery-quick has changed since the first rows: its patience, its epoch draws, its
weight average) is kept under a key that says it was replaced. The first
entries were recorded before the settings were, each with battery-quick as it was then
(docs/experiments.md, "Stage 1 on few labelled slices"): ``folder`` at a patience of 4,
``folder-clear`` at a patience of 10 and one pass per epoch, neither with the weight
average; today's preset reproduces them with ``--extra stage1.patience=4
stage1.min_epoch_images=null stage1.ema=null`` (``folder``) and ``--extra
stage1.min_epoch_images=null stage1.ema=null`` (``folder-clear``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import tifffile
import yaml
from PIL import Image
from scipy import ndimage

from paser.runtime import atomic_write_text

HERE = Path(__file__).parent
DATA = HERE / ".data"
RESULTS = HERE / "results" / "augment.json"
#: (height, width, train, validation, test) slices of each scan
SCANS = [(400, 400, 2, 1, 1), (500, 572, 2, 1, 1), (499, 601, 2, 1, 1), (480, 480, 2, 0, 1)]
PALETTE = [30, 30, 30, 200, 60, 40, 60, 160, 220]  # pore, carbon, nickel


#: blur (pixels) and noise (std, on [0, 1] before the attenuation scale) of each folder
FOLDERS = {"folder": (1.2, 0.08), "folder-clear": (0.6, 0.025)}


def build_folder(root: Path, blur: float = 1.2, noise: float = 0.08) -> Path:
    """The folder described in the module doc (made once)."""
    from paser.data.battery import read_label
    from paser.data.synthetic import generate_dataset

    if (root / "classes.yaml").is_file():
        return root
    rng = np.random.default_rng(0)
    for s, (h, w, *counts) in enumerate(SCANS):
        src = DATA / f"scan{s}_{h}x{w}"
        if not (src / "stats.json").is_file():
            generate_dataset(src, n_train=sum(counts), n_val=1, n_test=1, height=h, width=w,
                             seed=100 + s, workers=1, progress=False)
        files = sorted((src / "train_images").glob("*.png"))
        split_of = ["train"] * counts[0] + ["validation"] * counts[1] + ["test"] * counts[2]
        for i, (f, split) in enumerate(zip(files, split_of, strict=False)):
            img = np.asarray(Image.open(f), np.float32) / 255
            img = ndimage.gaussian_filter(img, blur) + rng.normal(0, noise, img.shape)
            recon = (0.004 + 0.03 * img).astype(np.float32)  # attenuation-like, 1/um
            lab = read_label(src / "train_label" / f.name).astype(np.uint8)
            (root / split / "images").mkdir(parents=True, exist_ok=True)
            (root / split / "masks").mkdir(parents=True, exist_ok=True)
            name = f"scan{s}_{i:02d}.tif"
            tifffile.imwrite(root / split / "images" / name, recon)
            mask = Image.fromarray(lab, "P")
            mask.putpalette(PALETTE + [0] * (768 - len(PALETTE)))
            mask.save(root / split / "masks" / name)
    (root / "classes.yaml").write_text("classes: {0: pore, 1: carbon, 2: nickel}\nignore: null\n")
    return root


def pretrain(run_dir: Path, args: list[str]) -> dict:
    cmd = [sys.executable, "-m", "paser", "pretrain", "--preset", "battery-quick",
           "--run-dir", str(run_dir), *args]
    start = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}\n{res.stderr[-3000:]}")
    s = json.loads((run_dir / "stage1.json").read_text())
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    return {"seconds": time.perf_counter() - start,
            # what the preset and the overrides made of stage 1: the preset moves on
            "settings": {"stage1": cfg["stage1"],
                         "epochs": [cfg["models"]["f0"].get("epochs"),
                                    *(m.get("epochs") for m in cfg["models"]["pool"])]},
            "models": {k: {"test_miou": v["test_miou"], "epochs": v["epochs"],
                           "best_epoch": v.get("best_epoch")}
                       for k, v in s["models"].items()}}


def preset(row: dict) -> dict | None:
    """A row's stage-1 settings but the ones this script varies between its rows."""
    s = row.get("settings")
    return s and {**s, "stage1": {k: v for k, v in s["stage1"].items()
                                  if k not in ("augment", "crop_margin")}}


ORDER = ("off", "views+jitter", "views+jitter+crops")


def record(result: dict, key: str, overrides: list[str], rows: list[dict]) -> dict:
    """``result`` with ``rows`` under ``key``: they replace the rows of the same seed and
    setting, and the entry's other rows (a call with fewer ``--seeds`` or with ``--only``)
    are kept where they were measured with the same stage-1 settings (:func:`preset`; the
    overrides name the data's folder by its path, which moves with the checkout). An entry
    measured otherwise (battery-quick as it was then) is kept under a key that says it was
    replaced."""
    before = result.get(key)
    kept = []
    if before is not None:
        if all(preset(r) == preset(rows[0]) for r in before["rows"]):
            new = {(r["seed"], r["augment"]) for r in rows}
            kept = [r for r in before["rows"] if (r["seed"], r["augment"]) not in new]
        else:
            when = time.strftime("%Y-%m-%d %H:%M")
            result = {**result, f"{key} (an earlier battery-quick, replaced {when})": before}
    merged = sorted(kept + rows, key=lambda r: (r["seed"], ORDER.index(r["augment"])))
    return {**result, key: {"overrides": overrides, "rows": merged}}


def main() -> None:
    from paser.data.registry import check_dataset

    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", choices=[*FOLDERS, "demo"], default="folder")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--only", nargs="+", help="these settings alone (default: all)")
    ap.add_argument("--extra", nargs="*", default=[], help="overrides added to every "
                    "setting (e.g. stage1.patience=10); the results are kept under their own key")
    ap.add_argument("--results", type=Path, default=RESULTS,
                    help="the JSON file to update (default: the committed benchmarks/results/augment.json)")
    args = ap.parse_args()
    runs = DATA / "augment_runs"
    if args.data in FOLDERS:
        root = build_folder(DATA / ("realish" if args.data == "folder" else "realish_clear"),
                            *FOLDERS[args.data])
        # what `paser data check` prints, data.dataset and data.root included (its images
        # come in several sizes: data.tile too)
        base = check_dataset(root, workers=0, show_progress=False)["suggested_overrides"]
    else:
        base = [f"data.cache_dir={DATA / 'demo_data'}"]
    print("overrides:", " ".join(base))
    settings = {"off": ["stage1.augment=off"],
                "views+jitter": ["stage1.augment=on", "stage1.crop_margin=0"]}
    if args.data in FOLDERS:  # crops where images are cut into tiles
        settings["views+jitter+crops"] = ["stage1.augment=on"]
    unknown = [k for k in args.only or [] if k not in settings]
    if unknown:
        raise SystemExit(f"--only {' '.join(unknown)}: not a setting of --data {args.data}; "
                         f"its settings: {', '.join(settings)}")
    settings = {k: [*v, *args.extra] for k, v in settings.items()
                if not args.only or k in args.only}
    key = " ".join([args.data, *args.extra])
    rows = []
    for seed in args.seeds:
        for mode, extra in settings.items():
            run_dir = runs / f"{key.replace(' ', '_')}_{mode}_{seed}"
            r = pretrain(run_dir, [*base, f"seed={seed}", *extra])
            rows.append({"seed": seed, "augment": mode, **r})
            print(json.dumps(rows[-1]), flush=True)
            # each row as it finishes: a later seed that fails, or Ctrl-C, keeps the earlier
            result = json.loads(args.results.read_text()) if args.results.is_file() else {}
            atomic_write_text(json.dumps(record(result, key, base + args.extra, rows),
                                         indent=1), args.results)
    print(f"{'seed':>4} {'augment':>18} " + " ".join(f"{m:>14}" for m in rows[0]["models"]))
    for r in rows:
        print(f"{r['seed']:>4} {r['augment']:>18} " + " ".join(
            f"{v['test_miou']:.4f} ({v['epochs']:>2} ep)" for v in r["models"].values()))


if __name__ == "__main__":
    main()
