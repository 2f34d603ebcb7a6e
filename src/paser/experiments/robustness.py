"""Robustness to noise the run never saw (paper R3).

Salt-and-pepper noise (scikit-image ``random_noise``, mode ``s&p``): each pixel is hit
with probability ``amount`` (default 1 %), independently and seeded; a hit pixel becomes
white or black with equal odds, in every channel at once.

Noisy variants of f1..fK are trained on D_pre clean plus one noisy copy of it (best
checkpoint on validation clean plus noisy), starting from the pool weights the run
deployed (stage 3), with stage 1's loss, learning rate and batch size. They are swapped
into the trained PaSeR; f0 and the policy are not touched. PaSeR (at the run's calibrated
operating point, as Table 1 and ``paser segment`` run it) and PaSeR-RandPol (the run's
random actions) are measured on the clean test split with the deployed pool and on
the noisy test split with the noisy pool, by the same code as Table 1
(:func:`paser.experiments.methods.measure`). f0 and fK alone are shown for context, and
each system also on the noisy split without the swap (what retraining the pool bought) and
on the clean split with the noisy pool (the retraining's own effect, noise aside).
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import torch
from skimage.util import random_noise
from torch import nn

from paser.api import PaSeR
from paser.baselines.routed import random_actions
from paser.checkpoints import load_trained
from paser.data import Tensors
from paser.errors import ConfigError
from paser.experiments import methods as M
from paser.experiments.finished import FinishedRun, open_finished, record_experiment
from paser.experiments.report import pyplot, save_figure
from paser.patches import PatchGrid
from paser.routing import Router
from paser.runtime import atomic_write_text, progress
from paser.train.common import MetricLog, seed_role
from paser.train.pretrain import fit, model_epochs, patchwise, weighted_ce

NOISY_DIR = "noisy"  # under checkpoints/: the noisy pool, noisy/f1.pt ...


def salt_and_pepper(images: torch.Tensor, amount: float, seed: int) -> torch.Tensor:
    """``images`` [N, C, H, W] in [0, 1] with a fraction ``amount`` of pixels set to 0 or 1.

    The hit pattern is drawn by scikit-image on one channel and applied to all channels,
    so ``amount`` is a share of pixels for RGB too. Same seed, same noise."""
    if not 0.0 <= amount <= 1.0:
        raise ConfigError(f"noise amount {amount}: give a fraction of pixels in [0, 1]")
    n, _, h, w = images.shape
    # On a mid-grey canvas random_noise's output is the pattern: 1 salt, 0 pepper, 0.5 none.
    pattern = torch.from_numpy(random_noise(np.full((n, 1, h, w), 0.5, dtype=np.float32),
                                            mode="s&p", amount=amount, rng=seed)).float()
    return torch.where(pattern == 0.5, images, pattern.to(images.dtype))


def noisy_split(data: Tensors, amount: float, seed: int) -> Tensors:
    """The same samples with salt-and-pepper noise on their images."""
    data = data.in_memory()
    return Tensors(salt_and_pepper(data.images, amount, seed), data.masks, data.ids,
                   data.groups, data.group_names)


def clean_plus_noisy(data: Tensors, amount: float, seed: int) -> Tensors:
    """Every sample twice: as it is, then with noise (ids of the copies end in ``#noisy``)."""
    data = data.in_memory()
    noisy = noisy_split(data, amount, seed)
    groups = None if data.groups is None else torch.cat([data.groups, noisy.groups])
    return Tensors(torch.cat([data.images, noisy.images]), torch.cat([data.masks, noisy.masks]),
                   data.ids + [f"{i}#noisy" for i in data.ids], groups, data.group_names)


def swap_pool(router: Router, pool: list[nn.Module]) -> Router:
    """A router with the same f0, policy, grid and T but another pool (same sizes)."""
    if len(pool) != len(router.pool):
        raise ConfigError(f"swap_pool: {len(pool)} models for a pool of {len(router.pool)}")
    return Router(router.f0, router.policy, pool, router.grid, router.mc_samples,
                  router.in_channels, router.mc_dropout, router.signal, router.state_kind,
                  router.num_classes).eval()


def train_noisy_pool(run: FinishedRun, router: Router, amount: float, seed: int, epochs: int | None,
                     show_progress: bool = True) -> tuple[list[nn.Module], dict]:
    """Fine-tune a copy of each pool model on clean + noisy D_pre (see the module doc).

    Checkpoints go to ``checkpoints/noisy/``; an interrupted run continues from the last
    epoch when the noise settings and starting weights are the same, and starts over when
    they changed."""
    cfg, data, device = run.cfg, run.data, run.device
    ckpt_dir = run.run_dir / "checkpoints" / NOISY_DIR
    log_path = run.run_dir / "metrics" / "robustness.jsonl"
    start = hashlib.sha256(b"".join(p.detach().cpu().numpy().tobytes()
                                    for p in router.pool.parameters())).hexdigest()
    settings = {"amount": amount, "seed": seed, "epochs": epochs, "start_weights": start}
    marker = ckpt_dir / "settings.json"
    resume = marker.is_file() and json.loads(marker.read_text()) == settings
    if not resume:
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        log_path.unlink(missing_ok=True)
        atomic_write_text(json.dumps(settings), marker)
    grid = PatchGrid(*cfg.grid, halo=cfg.halo)
    ce = weighted_ce(cfg, device)
    log, pool, info = MetricLog(log_path), [], {}
    for k, (spec, model) in enumerate(zip(cfg.models.pool, router.pool, strict=True), 1):
        key = f"models.pool.{k - 1}.groups"
        train, val = (clean_plus_noisy(d.in_groups(spec.groups, key), amount, seed + i)
                      for i, d in ((1, data.pre), (2, data.validation)))
        role = f"{NOISY_DIR}/f{k}"
        n_epochs = model_epochs(cfg, spec) if epochs is None else epochs
        seed_role(cfg, role)  # its dropout draws: not the previous model's training's
        best = fit(role, copy.deepcopy(model).to(device), patchwise(grid), ce, train, val,
                   cfg=cfg, epochs=n_epochs, lr=spec.lr or cfg.stage1.lr, run_dir=run.run_dir,
                   log=log, resume=resume, device=device, show_progress=show_progress,
                   spec=spec, label=f"noisy f{k}")
        pool.append(load_trained(run.run_dir, cfg, role, device, spec=spec,
                                 channels_last=False))  # routed on patches, as build_router
        info[f"f{k}"] = {"epochs": n_epochs, "val_miou_clean_plus_noisy": best,
                         "train_images": len(train)}
    return pool, info


def run_robustness(run_dir: str | Path, amount: float = 0.01, seed: int | None = None,
                   epochs: int | None = None, show_progress: bool = True) -> dict:
    """The robustness study on a finished run; written into its ``results.json``
    (``experiments.robustness``), ``report.md`` and ``figures/``. Returns that entry.

    ``seed`` (default: the run's seed) draws the test noise; D_pre and validation get
    ``seed + 1`` and ``seed + 2``. ``epochs`` defaults to each model's stage-1 epochs."""
    if epochs is not None and epochs < 0:
        raise ConfigError(f"epochs {epochs}: give 0 or more")
    run = open_finished(run_dir, show_progress)
    cfg, data = run.cfg, run.data
    seed = cfg.seed if seed is None else seed
    paser = PaSeR.load(run.run_dir, device=str(run.device))
    clean = paser.router
    # the bias segment deploys and Table 1 measures; kept with the noisy pool too, whose
    # policy it was calibrated for
    bias = paser.calibration.tensor() if paser.calibration is not None else None
    pool, info = train_noisy_pool(run, clean, amount, seed, epochs, show_progress)
    noisy = swap_pool(clean, pool)
    test = data.test.in_memory()
    noisy_test = noisy_split(test, amount, seed)
    nmod, top = clean.num_models, f"f{clean.num_models - 1}"
    rand = random_actions(len(test), clean.grid.num_patches, nmod, cfg.seed)
    systems = {"PaSeR": lambda r: M.paser_predictor(r, bias=bias), "PaSeR-RandPol":
               lambda r: M.fixed_actions_predictor(r, rand),
               "f0": lambda r: M.f0_predictor(r, monte_carlo=False),
               top: lambda r: M.patch_model_predictor(r, nmod - 1)}
    cases = {"clean": (clean, test), "noisy": (noisy, noisy_test),
             "noisy_original_models": (clean, noisy_test), "clean_noisy_models": (noisy, test)}
    ncls, batch = cfg.models.num_classes, cfg.baselines.timing_batch
    table = {}
    with progress(show_progress) as bar:
        task = bar.add_task("robustness evaluation", total=len(systems) * len(cases), info="")
        for name, make in systems.items():
            routed = name.startswith("PaSeR")
            got = {}
            for case, (router, split) in cases.items():
                bar.update(task, info=f"{name}, {case}")
                got[case] = M.measure(make(router), split, ncls, batch, run.device,
                                      nmod if routed else None, timed=False)
                bar.advance(task)
            row = {"iou_clean": got["clean"]["iou"], "iou_noisy": got["noisy"]["iou"],
                   "degradation_pct": 100 * (got["clean"]["iou"] - got["noisy"]["iou"])
                   / max(got["clean"]["iou"], 1e-12),
                   "iou_noisy_original_models": got["noisy_original_models"]["iou"],
                   "iou_clean_noisy_models": got["clean_noisy_models"]["iou"],
                   "gflops_clean": got["clean"]["gflops"], "gflops_noisy": got["noisy"]["gflops"]}
            if routed:
                row["fractions_clean"] = got["clean"]["fractions"]
                row["fractions_noisy"] = got["noisy"]["fractions"]
                row["share_above_f0_clean"] = 1 - got["clean"]["fractions"][0]
                row["share_above_f0_noisy"] = 1 - got["noisy"]["fractions"][0]
            table[name] = row
    changed = (noisy_test.images != test.images).any(dim=1).float().mean().item()
    out = {"noise": "salt-and-pepper (skimage random_noise s&p, salt_vs_pepper 0.5)",
           "amount": amount, "seed": seed, "pixels_changed": changed,
           "noisy_pool": info, "models": ["f0", *(f"f{k}" for k in range(1, nmod))],
           "trained_from": "the deployed pool weights (stage 3 when it ran)",
           "training_data": "D_pre clean + one noisy copy; best on validation clean + noisy",
           "paser_operating_point": (None if paser.calibration is None
                                     else paser.calibration.describe_target()),
           "table": table}
    _plot_shares(run.run_dir / "figures" / "robustness_routing.png", table["PaSeR"],
                 out["models"])
    record_experiment(run.run_dir, "robustness", out)
    return out


def _plot_shares(path: Path, row: dict, models: list[str]) -> None:
    """Share of patches per model, clean vs noisy test split (paper Fig. 11)."""
    plt = pyplot()
    x, width = np.arange(len(models)), 0.38
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for i, case in enumerate(("clean", "noisy")):
        shares = 100 * np.asarray(row[f"fractions_{case}"])
        bars = ax.bar(x + (i - 0.5) * width, shares, width, label=case, color=f"C{i}")
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(x, models)
    ax.set_ylabel("patches sent to the model (%)")
    ax.set_title(f"PaSeR: above f0 {100 * row['share_above_f0_clean']:.1f} % clean, "
                 f"{100 * row['share_above_f0_noisy']:.1f} % noisy", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    save_figure(fig, path)
