"""The main job on data paser did not generate: a stand-in for electron-microscopy membranes.

30 slices of 512 x 512, 8-bit TIFF, 2 classes (masks 0 = membrane, 255 = cell, as the
ISBI 2012 challenge stores them): Voronoi cells whose walls are 1.5 to 5 pixels thick,
a textured cytoplasm, dark vesicles that are not membrane, blur and noise. Nothing here
comes from paser's battery generator, so a setting tuned to that generator shows here.
18 training, 4 validation and 8 test slices (split by file, as a user's folder is).

The script writes ``classes.yaml`` (``{0: membrane, 255: cell}``, ``ignore: null``), asks
:func:`paser.data.registry.check_dataset` for the overrides ``paser data check`` prints
(with ``data.tile=[128,128]``: 16 tiles a slice), and runs
``paser run --preset battery-quick`` with them for each seed, each in a process of its own,
with ``--force``: a run folder left by an earlier call is trained again on today's code
(paser skips steps whose config did not change, and would report their old figures).
``--extra KEY=VALUE ...`` adds overrides to every run (they key the results with the seed).

    .venv/bin/python benchmarks/membranes.py --seeds 0 1 2

Writes ``benchmarks/results/membranes.json`` (or ``--results``): per seed the pool's test mIoU, the curve
areas (routers from f0's point, as the report reads them), each router's share of the
oracle's headroom, Table 2 and the verdict, and the run's seconds.
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
from scipy import ndimage
from scipy.spatial import cKDTree

from paser.runtime import atomic_write_text

HERE = Path(__file__).parent
DATA = HERE / ".data"
RESULTS = HERE / "results" / "membranes.json"
SPLIT = (("train", 18), ("validation", 4), ("test", 8))


def build_folder(root: Path, size: int = 512, seed: int = 7) -> Path:
    """The folder described in the module doc (made once)."""
    if (root / "classes.yaml").is_file():
        return root
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    pixels = np.stack([yy.ravel(), xx.ravel()], 1)
    names = [split for split, n in SPLIT for _ in range(n)]
    for i, split in enumerate(names):
        cells = rng.uniform(-20, size + 20, (rng.integers(90, 180), 2))
        nearest, _ = cKDTree(cells).query(pixels, k=2)
        gap = (nearest[:, 1] - nearest[:, 0]).reshape(size, size)  # 0 on a cell wall
        thick = 2.0 + 15 * ndimage.gaussian_filter(rng.standard_normal((size, size)), 30)
        membrane = gap < np.clip(thick, 1.5, 5)
        cytoplasm = 0.62 + 0.24 * ndimage.gaussian_filter(rng.standard_normal((size, size)), 3)
        spots = ndimage.gaussian_filter((rng.uniform(size=(size, size)) < 0.0015) * 60.0, 4)
        img = np.where(membrane, 0.18, cytoplasm) - 0.25 * (spots > 0.25)
        img = ndimage.gaussian_filter(img, 1.3) + rng.normal(0, 0.06, (size, size))
        for sub in ("images", "masks"):
            (root / split / sub).mkdir(parents=True, exist_ok=True)
        tifffile.imwrite(root / split / "images" / f"slice{i:02d}.tif",
                         np.clip(img * 255, 0, 255).astype(np.uint8))
        tifffile.imwrite(root / split / "masks" / f"slice{i:02d}.tif",
                         np.where(membrane, 0, 255).astype(np.uint8))
    (root / "classes.yaml").write_text("classes: {0: membrane, 255: cell}\nignore: null\n")
    return root


def summary(run_dir: Path, seconds: float) -> dict:
    r = json.loads((run_dir / "results.json").read_text())
    return {"seconds": seconds,
            # f0..fK as the run has them: an --extra may change the pool
            "pool": {k: r["methods"][k]["iou"] for k in r["models"]},
            "paser": {k: r["methods"]["PaSeR"][k] for k in ("iou", "gflops")},
            "curve_areas": r["curve_areas"], "headroom_captured": r["headroom_captured"],
            "reachable_captured": r["reachable_captured"],
            "table2_flops_saved_pct": r["table2"]["flops_saved_pct"],
            "verdict": r["verdict"], "versus_cascade": r["versus_cascade"]}


def main() -> None:
    from paser.data.registry import check_dataset

    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--extra", nargs="*", default=[],
                    help="overrides added to every run, e.g. stage1.epochs=5")
    ap.add_argument("--results", type=Path, default=RESULTS,
                    help="the JSON file to update (default: the committed benchmarks/results/membranes.json)")
    args = ap.parse_args()
    root = build_folder(DATA / "membranes")
    overrides = check_dataset(root, workers=0, show_progress=False)["suggested_overrides"]
    print("overrides:", " ".join(overrides), flush=True)
    saved = json.loads(args.results.read_text()) if args.results.is_file() else {}
    for seed in args.seeds:
        key = " ".join([str(seed), *args.extra])  # the committed entries: the seed alone
        run_dir = DATA / "membranes_runs" / f"seed{seed}"
        cmd = [sys.executable, "-m", "paser", "run", "--preset", "battery-quick",
               "--run-dir", str(run_dir), "--force", *overrides, f"seed={seed}", *args.extra]
        start = time.perf_counter()
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)}\n{res.stderr[-3000:]}")
        saved[key] = {"overrides": [*overrides, *args.extra],
                      **summary(run_dir, time.perf_counter() - start)}
        atomic_write_text(json.dumps(saved, indent=1), args.results)
        print(json.dumps(saved[key]), flush=True)


if __name__ == "__main__":
    main()
