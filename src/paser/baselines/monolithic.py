"""Whole-image baselines trained from scratch: the monolithic models and MatPhase.

They train on D_pre with stage 1's epochs, batch size, class weights and the same
:func:`paser.train.pretrain.fit` loop (best-on-validation checkpoint, resumable), so the
comparison with PaSeR's pool is at an equal epoch budget.

MatPhase (Tabassum et al. 2022) is re-implemented from its published description, not
from its code: an ensemble of UNets run on the whole image, a pixel-level "I don't know"
gate on the first member's entropy, and a small CNN that fuses every member's
probabilities with the input. Pixels where the first member is confident keep its
prediction; the others take the fused one. Convolutions cannot skip pixels, so every
member and the fusion CNN run on the whole image and are all paid for.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from paser.checkpoints import build_model, load_checkpoint, load_trained
from paser.config import ExperimentConfig, ModelSpec
from paser.cost import gflops_per_sample
from paser.data import StageData, Tensors, load_stage_data
from paser.metrics import IoUAccumulator, predicted_classes
from paser.runtime import atomic_save
from paser.train.common import (
    MetricLog,
    cache_predictions,
    forget_progress,
    prepare_run_dir,
    resume_state,
    rng_state,
    seed_role,
    setup,
)
from paser.train.distributed import Dist, check_devices, launch
from paser.train.pretrain import class_weight, fit, masked_ce, model_epochs, weighted_ce
from paser.uncertainty import entropy

MULTIPLE = 32
"""Whole-image baselines see images padded (reflect) to a multiple of this: encoders with
five stride-2 stages need it. FLOPs are counted at the padded size."""


def role_name(name: str) -> str:
    """A file-safe role for a report name: ``DeepLabV3+`` -> ``base_deeplabv3plus``."""
    return "base_" + re.sub(r"[^a-z0-9]+", "_", name.lower().replace("+", "plus")).strip("_")


def padded(x: torch.Tensor, multiple: int = MULTIPLE) -> torch.Tensor:
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if not (ph or pw):
        return x
    return F.pad(x, (0, pw, 0, ph), mode="reflect" if min(h, w) > max(ph, pw) else "replicate")


def whole_padded(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Logits of a whole-image model on ``x`` padded to :data:`MULTIPLE`, cropped back."""
    h, w = x.shape[-2:]
    return model(padded(x))[..., :h, :w]


def padded_gflops(model: nn.Module, in_channels: int, h: int, w: int) -> float:
    return gflops_per_sample(model, in_channels, h + (-h) % MULTIPLE, w + (-w) % MULTIPLE)


def train_baselines(cfg: ExperimentConfig | None, run_dir: str | Path, resume: bool = False,
                    show_progress: bool = True, data: StageData | None = None) -> list[str]:
    """Train every monolithic baseline and MatPhase into ``run_dir`` (data-parallel when
    ``cfg.distributed`` asks, like stage 1); return the roles trained."""
    run_dir, cfg = prepare_run_dir(run_dir, cfg, resume)
    check_devices(cfg)  # before anything is read or removed
    if not resume:  # every model starts over: what an earlier config left is no resume
        mp = cfg.baselines.matphase
        fitted = [role_name(name) for name in cfg.baselines.monolithic]
        fitted += [] if mp is None else [member_role(i) for i in range(len(mp.members))]
        forget_progress(*(run_dir / "checkpoints" / f"{role}_last.pt" for role in fitted),
                        *([] if mp is None else [run_dir / "checkpoints" / "base_matphase.pt",
                                                 run_dir / "checkpoints" / FUSION_LAST]))
    setup(cfg)
    data = data or load_stage_data(cfg, progress=show_progress, run_dir=run_dir)
    dist = launch(cfg)  # after the data is in place: the other processes only read it
    roles = []
    for name, spec in cfg.baselines.monolithic.items():
        train_whole(cfg, run_dir, role_name(name), spec, data, dist.device, resume,
                    show_progress, name, dist)
        roles.append(role_name(name))
    if cfg.baselines.matphase is not None:
        train_matphase(cfg, run_dir, data, dist.device, resume, show_progress, dist)
        roles.append("matphase")
    return roles


def train_whole(cfg: ExperimentConfig, run_dir: Path, role: str, spec: ModelSpec, data: StageData,
                device: torch.device, resume: bool, show_progress: bool, label: str,
                dist: Dist | None = None) -> nn.Module:
    """Train one whole-image model on D_pre (class-weighted CE) and return its best weights
    (its weights and dropout seeded from the run's seed and ``role`` alone)."""
    seed_role(cfg, role)
    model = (dist or Dist(device)).place(build_model(cfg, spec))
    fit(role, model, whole_padded, weighted_ce(cfg, device, dist), data.pre, data.validation,
        cfg=cfg, epochs=model_epochs(cfg, spec), lr=spec.lr or cfg.stage1.lr,
        run_dir=run_dir, log=MetricLog(run_dir / "metrics" / "baselines.jsonl"), resume=resume,
        device=device, show_progress=show_progress, spec=spec, label=label, min_batch=2,
        dist=dist)
    return load_trained(run_dir, cfg, role, device, spec=spec)


class MatPhase(nn.Module):
    """Members (whole-image models), a fusion CNN, and the gate threshold ``tau`` (nats)."""

    def __init__(self, members: list[nn.Module], in_channels: int, num_classes: int,
                 channels: int = 16):
        super().__init__()
        self.members = nn.ModuleList(members)
        fused_in = in_channels + num_classes * len(members)
        self.fusion = nn.Sequential(
            nn.Conv2d(fused_in, channels, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(channels, num_classes, 1))
        self.register_buffer("tau", torch.tensor(float("inf")))

    def member_probs(self, x: torch.Tensor) -> torch.Tensor:
        """Every member's probabilities, concatenated ``[B, M * classes, H, W]``."""
        return torch.cat([whole_padded(m, x).float().softmax(1) for m in self.members], 1)

    def fuse(self, x: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """The fusion CNN's logits from the input and the members' probabilities."""
        return self.fusion(torch.cat([x, probs], 1))

    def gated(self, x: torch.Tensor, probs: torch.Tensor, tau: torch.Tensor | float
              ) -> torch.Tensor:
        """Prediction ``[B, H, W]``: the first member where its entropy is at most ``tau``,
        the fusion elsewhere."""
        c = self.fusion[-1].out_channels
        first = probs[:, :c]
        unsure = entropy(first) > tau
        return torch.where(unsure, predicted_classes(self.fuse(x, probs)), predicted_classes(first))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gated(x, self.member_probs(x), self.tau)

    def gflops(self, in_channels: int, h: int, w: int) -> float:
        """Every member on the (padded) image plus the fusion CNN."""
        return (sum(padded_gflops(m, in_channels, h, w) for m in self.members)
                + gflops_per_sample(self.fusion, self.fusion[0].in_channels, h, w))


#: the fusion CNN's last-epoch checkpoint (in ``checkpoints/``), which ``resume`` goes on from
FUSION_LAST = "base_matphase_last.pt"


def train_matphase(cfg: ExperimentConfig, run_dir: Path, data: StageData, device: torch.device,
                   resume: bool, show_progress: bool, dist: Dist | None = None) -> MatPhase:
    """Train the members (data-parallel with ``dist``), then the fusion CNN on their frozen
    outputs, then pick the gate threshold that maximises validation mIoU (the small fusion
    CNN and the gate: the same in every process, rank 0 saves). The fusion CNN keeps a
    last-epoch checkpoint, as every stage does: ``resume`` goes on after its last epoch."""
    mp = cfg.baselines.matphase
    assert mp is not None
    dist = dist or Dist(device)
    members = [train_whole(cfg, run_dir, member_role(i), spec, data, device, resume,
                           show_progress, f"MatPhase member {i + 1}/{len(mp.members)}", dist)
               for i, spec in enumerate(mp.members)]
    seed_role(cfg, "matphase")  # the fusion CNN's weights: not the members' training's draws
    model = MatPhase(members, cfg.models.in_channels, cfg.models.num_classes,
                     mp.fusion_channels).to(device)
    path = run_dir / "checkpoints" / "base_matphase.pt"
    if resume and path.is_file():
        model.load_state_dict(load_checkpoint(path, device)["model"])
        return model.eval()
    for m in model.members:
        m.eval().requires_grad_(False)
    weight = class_weight(cfg, device)
    bs = cfg.stage1.batch_size
    cache = run_dir / "cache" / "matphase_member_probs.npy"
    cached = cache_predictions(model.member_probs, data.pre, bs, cache, dist,
                               "MatPhase: its members on D_pre", show_progress)
    opt = torch.optim.Adam(model.fusion.parameters(), lr=cfg.stage1.lr)
    epochs = cfg.stage1.epochs if mp.fusion_epochs is None else mp.fusion_epochs
    gen = torch.Generator().manual_seed(cfg.seed + 7)
    last = run_dir / "checkpoints" / FUSION_LAST
    state = resume_state(last, resume, device, {"fusion": model.fusion, "optimizer": opt})
    start = 0 if state is None else state["epoch"] + 1
    if state is not None:
        gen.set_state(state["order"])  # the batch orders of the epochs to come
    for epoch in range(start, epochs):
        order = torch.randperm(len(data.pre), generator=gen)
        batches = order.split(bs)
        for idx, (x, y) in zip(batches, data.pre.gather(batches), strict=True):
            x, y = x.to(device), y.to(device)
            probs = torch.from_numpy(cached[idx.numpy()]).to(device).float()
            loss = masked_ce(model.fuse(x, probs), y, weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if dist.is_main:
            atomic_save({"fusion": model.fusion.state_dict(), "optimizer": opt.state_dict(),
                         "order": gen.get_state(), **rng_state(device), "epoch": epoch}, last)
    model.tau.fill_(choose_gate(model, data.validation, cfg.models.num_classes, bs, device))
    if dist.is_main:
        atomic_save({"model": model.state_dict(), "tau": float(model.tau)}, path)
        cache.unlink()
    return model.eval()


@torch.inference_mode()
def choose_gate(model: MatPhase, val: Tensors, num_classes: int, batch_size: int,
                device: torch.device, points: int = 11) -> float:
    """The gate threshold (a quantile of the first member's pixel entropies, or "always
    fuse" / "never fuse") with the best validation mIoU. Two passes over ``val``: the
    entropies for the quantiles, then every candidate at once; no prediction is kept."""
    model.eval()
    c = num_classes
    ent = torch.cat([entropy(model.member_probs(x.to(device))[:, :c]).reshape(-1).cpu()
                     for x, _ in val.batches(batch_size)])
    qs = torch.quantile(ent[torch.randperm(len(ent), generator=torch.Generator().manual_seed(0))
                            [:100_000]], torch.linspace(0, 1, points))
    candidates = [-1.0, *qs.tolist(), float("inf")]
    accs = [IoUAccumulator(num_classes) for _ in candidates]
    for x, y in val.batches(batch_size):
        x = x.to(device)
        probs = model.member_probs(x)
        fused, first = predicted_classes(model.fuse(x, probs)), predicted_classes(probs[:, :c])
        doubt = entropy(probs[:, :c])
        for tau, acc in zip(candidates, accs, strict=True):
            acc.update(torch.where(doubt > tau, fused, first).cpu(), y)
    mious = [acc.compute()["miou"] for acc in accs]
    return candidates[max(range(len(mious)), key=mious.__getitem__)]


def member_role(i: int) -> str:
    return f"base_matphase_m{i}"


def load_monolithic(cfg: ExperimentConfig, run_dir: Path, name: str, device: torch.device
                    ) -> nn.Module:
    """A trained monolithic baseline, by its report name."""
    return load_trained(run_dir, cfg, role_name(name), device, spec=cfg.baselines.monolithic[name])


def load_matphase(cfg: ExperimentConfig, run_dir: Path, device: torch.device) -> MatPhase:
    """The trained MatPhase of a run (members, fusion CNN and gate threshold)."""
    mp = cfg.baselines.matphase
    assert mp is not None
    members = [load_trained(run_dir, cfg, member_role(i), device, spec=spec)
               for i, spec in enumerate(mp.members)]
    model = MatPhase(members, cfg.models.in_channels, cfg.models.num_classes,
                     mp.fusion_channels).to(device)
    model.load_state_dict(load_checkpoint(run_dir / "checkpoints" / "base_matphase.pt",
                                          device)["model"])
    return model.eval()
