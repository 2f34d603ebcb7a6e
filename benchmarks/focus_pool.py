"""Pool models trained where f0 errs (issue 33): does a pool that learns f0's mistakes make
routing pay more?

Copies a finished run, retrains its pool models f1..fK from scratch (the run's stage-1
config, the same initial weights) with each pixel's cross entropy weighted by
``1 + beta * (1 - p)``, ``p`` the run's trained f0's probability of the pixel's true class,
then lets ``paser run`` redo every step after stage 1 (MatPhase kept: it does not read the
pool) and reports the report's figures beside the source run's: each pool model's test
mIoU, the curve areas, the share of the oracle's headroom captured, Table 2.

    .venv/bin/python benchmarks/focus_pool.py runs/ema_s0 runs/focus_s0 --beta 4

Appends one entry per run to ``benchmarks/results/focus_pool.json`` (or ``--results``; in place of an earlier
call's for the same OUT, whose folder this one replaced). About 8 minutes a run on
2 cores (stage 1 of f1 and f2, then stage 2, PaSeR (paper) and the report).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F

from paser.checkpoints import build_model, load_trained, model_roles
from paser.config import load_config
from paser.data import IGNORE, load_stage_data
from paser.patches import PatchGrid
from paser.run import run
from paser.runtime import atomic_write_text
from paser.train import pretrain as stage1
from paser.train.common import MetricLog, seed_role, setup
from paser.train.distributed import launch

RESULTS = Path(__file__).parent / "results" / "focus_pool.json"
KEEP_STEPS = ("stage1", "baselines")  # MatPhase trains its own members, not the pool


def copy_run(src: Path, dst: Path) -> None:
    """``src`` into ``dst`` with the pool's checkpoints and every step after stage 1
    (but the baselines) removed, so that ``paser run`` redoes them. ``dst`` is replaced:
    refused where that would delete ``src`` (the same folder, or one holding it or in it)
    or where ``src`` is not a finished run, before anything is removed."""
    if not (src / "results.json").is_file():
        raise SystemExit(f"focus_pool: {src}: no results.json; give a finished `paser run` "
                         "folder as the source")
    a, b = src.resolve(), dst.resolve()
    if a == b or a in b.parents or b in a.parents:
        raise SystemExit(f"focus_pool: {dst} would replace the source run {src} (or a folder "
                         "holding it or in it); give another output folder")
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(
        "cache", "paper", "figures", "policy*.pt", "stage3.pt", "f[1-9]*.pt",
        "calibration.json", "report.md", "results.*", "stage2.json", "stage3.json"))
    steps = json.loads((dst / "steps.json").read_text())
    (dst / "steps.json").write_text(json.dumps(
        {k: v for k, v in steps.items() if k in KEEP_STEPS}, indent=2))


def f0_error(run_dir: Path, cfg, pre) -> torch.Tensor:
    """1 - the trained f0's probability of each pixel's true class on D_pre, [N, H, W]."""
    f0 = load_trained(run_dir, cfg, "f0").eval()
    with torch.inference_mode():
        probs = torch.cat([f0(x).float().softmax(1) for x, _ in pre.batches(16)])
    y = pre.masks.long().clamp_max(probs.shape[1] - 1)  # ignored pixels: any class
    return 1 - probs.gather(1, y[:, None])[:, 0]


def retrain_pool(run_dir: Path, beta: float) -> dict:
    cfg = load_config(config_file=run_dir / "config.yaml")
    data = load_stage_data(cfg, progress=False)
    if data.pre_around is not None or stage1.augmentations(cfg, *data.pre.images.shape[-2:]):
        raise SystemExit("focus_pool: the pixel weights follow D_pre's tiles as they are; "
                         "run it on a run without augmentation or crops (the demo)")
    focus = 1 + beta * f0_error(run_dir, cfg, data.pre)
    device = setup(cfg)
    grid = PatchGrid(*cfg.grid, halo=cfg.halo)
    stage1.probe_models(cfg, grid, *data.pre.images.shape[-2:])
    dist = launch(cfg)
    weight = stage1.class_weight(cfg, device)

    def focused_ce(logits, y, idx):
        """The class-weighted mean cross entropy, each pixel further weighted by its focus."""
        y, f = y.long(), focus[idx].to(logits.device)
        labelled = (y != IGNORE).float()
        mass = labelled if weight is None else weight[y.clamp_max(len(weight) - 1)] * labelled
        per_pixel = F.cross_entropy(logits, y, weight=weight, ignore_index=IGNORE,
                                    reduction="none")
        return (per_pixel * f).sum() / (mass * f).sum().clamp_min(1e-12)

    log = MetricLog(run_dir / "metrics" / "stage1.jsonl")
    roles = model_roles(cfg)
    forwards = {role: stage1.whole_image if role == "f0" else stage1.patchwise(grid)
                for role, _ in roles}
    for (role, spec), key in zip(roles[1:], stage1._keys(cfg)[1:], strict=True):
        train, val = (d.in_groups(spec.groups, key) for d in (data.pre, data.validation))
        if len(train) != len(data.pre):
            raise SystemExit("focus_pool: pool models trained on groups of D_pre are not covered")
        seed_role(cfg, role)  # seeded as stage 1 is: the run's initial weights
        stage1.fit(role, dist.place(build_model(cfg, spec)), forwards[role], focused_ce, train,
                   val, cfg=cfg, epochs=stage1.model_epochs(cfg, spec),
                   lr=spec.lr or cfg.stage1.lr, run_dir=run_dir, log=log, resume=False,
                   device=device, show_progress=True, dist=dist)
    summary = stage1.summarize(cfg, run_dir, data, forwards, device) | {
        "precision": dist.precision}
    (run_dir / "stage1.json").write_text(json.dumps(summary, indent=2))
    return cfg


def figures(run_dir: Path) -> dict:
    r = json.loads((run_dir / "results.json").read_text())
    models = json.loads((run_dir / "stage1.json").read_text())["models"]
    a = r["curve_areas"]
    return {"test_miou": {m: round(v["test_miou"], 4) for m, v in models.items()},
            "areas": {k: round(v, 4) for k, v in a.items()},
            # None where the oracle has no headroom over the frontier (the report: no shares)
            "captured": {k: None if v is None else round(v, 3)
                         for k, v in r["headroom_captured"].items()},
            "rank_correlation": {k: round(v, 3) for k, v in r["rank_correlation"].items()},
            "paser_minus_cascade": round(a["PaSeR"] - a["IDK-Cascade"], 4),
            "table2_flops_saved_pct": round(r["table2"]["flops_saved_pct"], 1),
            "operating_point": {k: round(r["methods"]["PaSeR"][k], 4) for k in ("iou", "gflops")}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", type=Path, help="a finished run (without augmentation)")
    ap.add_argument("out", type=Path, help="the run folder to write (replaced)")
    ap.add_argument("--beta", type=float, default=4.0)
    ap.add_argument("--results", type=Path, default=RESULTS,
                    help="the JSON file to update (default: the committed benchmarks/results/focus_pool.json)")
    args = ap.parse_args()
    copy_run(args.source, args.out)
    cfg = retrain_pool(args.out, args.beta)
    run(cfg, args.out)
    entry = {"source": str(args.source), "run": str(args.out), "beta": args.beta,
             "before": figures(args.source), "after": figures(args.out)}
    results = json.loads(args.results.read_text()) if args.results.is_file() else []
    atomic_write_text(json.dumps([e for e in results if e["run"] != str(args.out)] + [entry],
                                 indent=1) + "\n", args.results)
    print(json.dumps(entry, indent=1))


if __name__ == "__main__":
    main()
