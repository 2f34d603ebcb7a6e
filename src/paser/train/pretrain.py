"""Stage 1: pretrain f1..fK on patches (class-weighted cross entropy), then f0 on whole
images with distillation from fK: ``(1 - a_kd) * CE(f0) + a_kd * MSE(f0 logits, fK logits)``,
where fK's logits are its patch predictions stitched back into the full image.

Each model keeps its best-on-validation checkpoint (``checkpoints/<role>.pt``) and a
last-epoch checkpoint with optimizer and RNG state (``checkpoints/<role>_last.pt``)
for ``--resume``. Metrics go to ``metrics/stage1.jsonl``, one line per model and
epoch; the summary (validation and test mIoU, parameters, GFLOP) to ``stage1.json``.
"""

from __future__ import annotations

import hashlib
import json
import time
import zlib
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel

from paser.checkpoints import (
    build_model,
    load_trained,
    model_roles,
    read_record,
    save_label_codec,
)
from paser.config import ExperimentConfig, ModelSpec
from paser.cost import FLOP_CONVENTION, gflops_per_sample
from paser.data import IGNORE, Tensors, data_intensity, load_stage_data
from paser.data.stages import augments
from paser.data.tiles import source_images
from paser.errors import CheckpointError, ConfigError, DataError
from paser.metrics import IoUAccumulator, predicted_classes
from paser.models.registry import count_parameters, has_batchnorm
from paser.outcomes import unview, usable_views, view
from paser.patches import PatchGrid
from paser.routing import patchwise_logits
from paser.runtime import atomic_save, atomic_write_text, progress
from paser.train.common import (
    MetricLog,
    cache_predictions,
    check_finite,
    drop_downstream,
    forget_progress,
    prepare_run_dir,
    resume_state,
    rng_state,
    seed_role,
    setup,
)
from paser.train.distributed import Dist, check_devices, launch, machine, machine_kind

Forward = Callable[[nn.Module, torch.Tensor], torch.Tensor]


def class_weight(cfg: ExperimentConfig, device: torch.device) -> torch.Tensor | None:
    """Stage 1's cross-entropy weights as a tensor (``None``: unweighted)."""
    if not cfg.stage1.class_weights:
        return None
    if len(cfg.stage1.class_weights) != cfg.models.num_classes:
        raise ConfigError(f"key 'stage1.class_weights': {len(cfg.stage1.class_weights)} weights "
                          f"for {cfg.models.num_classes} classes; give one per class or null")
    return torch.tensor(cfg.stage1.class_weights, dtype=torch.float32, device=device)


def weighted_ce(cfg: ExperimentConfig, device: torch.device, dist: Dist | None = None
                ) -> Callable:
    """Stage 1's loss, class-weighted cross entropy, in :func:`fit`'s ``loss_fn`` form
    (``dist``: the processes whose shares of a batch it weighs, :func:`masked_ce`)."""
    weight = class_weight(cfg, device)

    def ce(logits: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return masked_ce(logits, y, weight, dist)

    return ce


def masked_ce(logits: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None,
              dist: Dist | None = None) -> torch.Tensor:
    """Class-weighted cross entropy, the weighted mean over labelled pixels (``y`` =
    :data:`paser.data.IGNORE` skipped), as ``F.cross_entropy``'s mean; 0 with none.

    With ``dist`` of several processes, ``y`` is this process's share of a batch, and
    :func:`fit` weighs its loss by its share of the batch's images: the mean is then taken
    over the batch's labelled weight per image times the share's images, so that the
    processes' averaged gradient is the batch's weighted mean, as in one process. The
    share's own weight would weigh its pixels unlike the other shares' wherever the
    shares' class mix or unlabelled pixels differ (class weights: the presets' default).
    """
    total = F.cross_entropy(logits, y, weight=weight, ignore_index=IGNORE, reduction="sum")
    valid = y[y != IGNORE]
    mass = valid.new_tensor(valid.numel(), dtype=total.dtype) if weight is None else \
        weight[valid].sum()
    if dist is not None and dist.world > 1:
        batch_mass, images = dist.sum(torch.tensor([float(mass), float(len(y))],
                                                   dtype=torch.float64)).tolist()
        mass = mass.new_tensor(batch_mass / images * len(y))
    return total / mass.clamp_min(1e-12)  # no labelled pixel: total is 0, so is the loss


def whole_image(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Logits of a whole-image model: [B, C, H, W] -> [B, K, H, W]."""
    return model(x)


def patchwise(grid: PatchGrid) -> Forward:
    """Run a model on the grid's patches (with their halo) and stitch its logits back:
    [B, C, H, W] -> [B, K, H, W]."""

    return partial(_patchwise, grid=grid)


def _patchwise(model: nn.Module, x: torch.Tensor, grid: PatchGrid) -> torch.Tensor:
    return patchwise_logits(model, grid, x)


@torch.inference_mode()
def evaluate_miou(model: nn.Module, forward: Forward, data: Tensors, num_classes: int,
                  batch_size: int, device: torch.device,
                  on_batch: Callable[[int], None] | None = None) -> float:
    """Dataset-level mIoU (intersection and union summed over the split, mean over classes).
    ``on_batch(n)`` after each batch, ``n`` images done (a progress bar's)."""
    model.eval()
    acc = IoUAccumulator(num_classes)
    done = 0
    for x, y in data.batches(batch_size):
        acc.update(predicted_classes(forward(model, x.to(device))).cpu(), y)
        done += len(x)
        if on_batch is not None:
            on_batch(done)
    return acc.compute()["miou"]


def augmentations(cfg: ExperimentConfig, height: int, width: int) -> list[int]:
    """The views (:data:`paser.outcomes.VIEWS`) a training batch is drawn from: none when
    ``stage1.augment`` is off, else mirrors, and quarter turns where the image and the
    patch grid are square (:func:`paser.outcomes.usable_views`)."""
    if not augments(cfg):
        return []
    return usable_views(PatchGrid(*cfg.grid, halo=cfg.halo), height, width, 8)


def epoch_draws(cfg: ExperimentConfig, n: int) -> int:
    """Images an epoch over ``n`` draws: ``n``, or ``stage1.min_epoch_images`` where that is
    more and stage 1 augments (a repeat is then a new view, jitter and crop)."""
    return max(n, cfg.stage1.min_epoch_images or 0) if n and augments(cfg) else n


def epoch_order(n: int, draws: int, gen: torch.Generator) -> torch.Tensor:
    """The ``draws`` (at least ``n``) indices of one epoch over ``n`` images: a random
    permutation, and further ones after it, cut at ``draws``, where an epoch draws more
    images than there are (``stage1.min_epoch_images``)."""
    if draws <= n:
        return torch.randperm(n, generator=gen)
    return torch.cat([torch.randperm(n, generator=gen) for _ in range(-(-draws // n))])[:draws]


def crop(x: torch.Tensor, y: torch.Tensor, margin: int, offsets: torch.Tensor
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows ``x [B, C, H + 2m, W + 2m]`` and their labels ``y`` cropped to ``H x W``,
    image ``b`` at ``offsets[b] = (dy, dx)``, each in ``0 .. 2 margin`` (``margin``: the
    tile itself)."""
    h, w = x.shape[-2] - 2 * margin, x.shape[-1] - 2 * margin
    rows = torch.arange(h, device=x.device) + offsets[:, :1].to(x.device)  # [B, H]
    cols = torch.arange(w, device=x.device) + offsets[:, 1:].to(x.device)  # [B, W]
    b = torch.arange(len(x), device=x.device)[:, None, None]
    ys = y[b, rows[:, :, None], cols[:, None, :]]
    xs = x.permute(0, 2, 3, 1)[b, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    return xs.contiguous(), ys


def jitter(x: torch.Tensor, amount: float, gen: torch.Generator) -> torch.Tensor:
    """Each image's intensities ``x * (1 + g) + o``, ``g ~ U(-amount, amount)``, ``o ~
    U(-amount / 2, amount / 2)`` (drawn from ``gen``: seeded, replayed on resume)."""
    if amount <= 0:
        return x
    g = (torch.rand(x.shape[0], generator=gen) * 2 - 1) * amount
    o = (torch.rand(x.shape[0], generator=gen) - 0.5) * amount
    shape = (-1,) + (1,) * (x.dim() - 1)
    return x * (1 + g.to(x).view(shape)) + o.to(x).view(shape)


def weight_average(model: nn.Module, decay: float | None) -> AveragedModel | None:
    """An exponential moving average of ``model``'s weights (``stage1.ema``), or None.

    Its decay at optimizer step t is ``min(decay, (1 + t) / (10 + t))``, the warm-up of
    TensorFlow's ``ExponentialMovingAverage``: the first steps are followed closely, so a
    short training is not averaged with its initial weights. Buffers are averaged too
    (BatchNorm's running statistics, for a model with ``norm: batch``); integer ones (its
    count of batches) are not averages: they follow the model.
    """
    if decay is None:
        return None

    def lerp(averaged: list[torch.Tensor], current: list[torch.Tensor], n: torch.Tensor):
        # called once per dtype and device: a group is all floating point, or all integer
        if not averaged[0].is_floating_point():
            torch._foreach_copy_(averaged, current)
            return
        t = int(n)
        torch._foreach_lerp_(averaged, current, 1 - min(decay, (1 + t) / (10 + t)))

    return AveragedModel(model, multi_avg_fn=lerp, use_buffers=True)


def fit(role: str, model: nn.Module, forward: Forward, loss_fn: Callable, train: Tensors,
        val: Tensors, *, cfg: ExperimentConfig, epochs: int, lr: float, run_dir: Path,
        log: MetricLog, resume: bool, device: torch.device, show_progress: bool,
        spec: ModelSpec | None = None, label: str | None = None, min_batch: int = 1,
        dist: Dist | None = None, around: Tensors | None = None, margin: int = 0) -> float:
    """Train one model, keep the best-on-validation checkpoint; return its validation mIoU.

    ``loss_fn(logits [B, K, H, W], masks [B, H, W], index [B]) -> scalar``; ``index``
    are the batch's positions in ``train`` (for per-image targets such as fK's logits).
    ``spec`` defaults to the role's entry in the pool; ``label`` names the progress bar.
    A short last batch of fewer than ``min_batch`` images (per process) is skipped, and one
    of a single image always is for a model with BatchNorm (it may give one value per
    channel, which BatchNorm cannot train on); full batches always train.
    With ``stage1.augment`` each batch is seen in a random mirror or quarter turn (the
    model's output turned back before the loss, so the labels and fK's targets stay as
    they are) with intensity jitter (:func:`augmentations`, :func:`jitter`). With
    ``around`` (``train``'s tiles with ``margin`` pixels of their image around them) each
    image of a batch is a crop of its window at a random offset (:func:`crop`).
    With ``stage1.ema`` validation, the early stop and the best checkpoint use an average of
    the weights over the steps (:func:`weight_average`); the last checkpoint keeps both.
    Validation runs under the training's autocast (``dist``'s precision).
    With ``stage1.patience`` the model stops once its validation mIoU has not improved for
    that many epochs (``epochs`` is then the most it trains); the metric line of its last
    epoch says ``"stopped": true``.
    ``dist``: the processes training together (:mod:`paser.train.distributed`); each takes
    its share of every batch, rank 0 writes.
    """
    s1 = cfg.stage1
    dist = dist or Dist(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    ema = weight_average(model, s1.ema)
    ckpt_dir = run_dir / "checkpoints"
    last_path, best_path = ckpt_dir / f"{role}_last.pt", ckpt_dir / f"{role}.pt"
    start, best, best_epoch = 0, -1.0, -1
    state = resume_state(last_path, resume, device, {"model": model, "optimizer": opt} | (
        {} if ema is None else {"ema": ema}))
    if state is not None:
        start, best = state["epoch"] + 1, state["best"]
        best_epoch = state.get("best_epoch", state["epoch"])
    elif dist.is_main:  # from scratch: a model of an earlier config is not this one
        best_path.unlink(missing_ok=True)
    if dist.is_main:
        log.truncate_after(role, start - 1)
    patience = s1.patience
    if has_batchnorm(model):
        min_batch = max(min_batch, 2)
    model, opt = dist.setup(model, opt)
    plain = dist.unwrap(model)
    kept = plain if ema is None else ema.module  # what is validated and kept
    # as JSON: a path in it (weights:) would make the checkpoint unreadable with weights_only
    spec = (spec or dict(model_roles(cfg))[role]).model_dump(mode="json")
    n = len(train)
    views = augmentations(cfg, *train.images.shape[-2:])
    draws = epoch_draws(cfg, n)
    with progress(show_progress and dist.is_main) as bar:
        task = bar.add_task(label or f"stage 1 {role}", total=epochs, completed=start, info="")
        for epoch in range(start, epochs):
            if patience is not None and epoch - best_epoch > patience:
                break  # stopped before the interruption: nothing left to train
            t0 = time.perf_counter()
            model.train()
            # The batch order depends only on (seed, role, epoch): resuming replays it exactly.
            gen = torch.Generator().manual_seed(
                cfg.seed * 1_000_003 + zlib.crc32(role.encode()) * 1009 + epoch)
            order = epoch_order(n, draws, gen)
            total, acc = torch.zeros((), dtype=torch.float64), IoUAccumulator(
                cfg.models.num_classes)
            # a full batch always trains; a short last one only with min_batch images for
            # every process (BatchNorm: 2; one image may give one value per channel)
            batches = [idx for idx in order.split(s1.batch_size)
                       if len(idx) >= dist.world and (len(idx) == s1.batch_size
                                                      or len(idx) >= min(min_batch, n) * dist.world)]
            loaded = (around or train).gather(dist.shard(idx) for idx in batches)
            for step, (idx, (x, y)) in enumerate(zip(batches, loaded, strict=True)):
                mine = dist.shard(idx)
                x, y = x.to(device), y.to(device)
                if around is not None:  # drawn for the whole batch: the same on every process
                    offsets = torch.randint(2 * margin + 1, (len(idx), 2), generator=gen)
                    x, y = crop(x, y, margin, dist.shard(offsets))
                view_index = 0
                if views:  # the same draws on every process and on resume: (gen's) order
                    view_index = views[int(torch.randint(len(views), (), generator=gen))]
                    x = jitter(x, s1.jitter, gen)
                with dist.autocast():
                    if view_index:  # seen mirrored or turned, its output turned back
                        logits = unview(forward(model, view(x, view_index)), view_index)
                    else:
                        logits = forward(model, x)
                    # DDP averages the processes' gradients: weighting each share by its size
                    # makes that the batch mean, as in one process, when shares are unequal
                    loss = loss_fn(logits.float(), y, mine) * (len(mine) * dist.world / len(idx))
                opt.zero_grad(set_to_none=True)
                dist.backward(loss)
                opt.step()
                if ema is not None:
                    ema.update_parameters(plain)
                total += loss.item() * len(idx) / dist.world  # this share's summed loss
                acc.update(predicted_classes(logits.detach()).cpu(), y.cpu())
                # the bar moves within an epoch (minutes on a folder of large slices); the
                # last share of it is the epoch's validation
                bar.update(task, completed=epoch + (step + 1) / (len(batches) + 1))
            check_finite(plain, f"stage 1 {role}, epoch {epoch}", "stage1.lr (or the model's lr)")
            total = float(dist.sum(total))
            acc.intersection, acc.union = dist.sum(acc.intersection), dist.sum(acc.union)
            dist.sync_buffers(model)
            if ema is not None:  # its BatchNorm statistics averaged each process's own
                dist.sync_buffers(ema)
            def validated(k: int, epoch=epoch, steps=len(batches)) -> None:  # the last share
                bar.update(task, completed=epoch + (steps + k / len(val)) / (steps + 1))

            with dist.autocast():  # the early stop's reading, in training's precision
                val_miou = evaluate_miou(kept, forward, val, cfg.models.num_classes,
                                         s1.batch_size, device, validated)
            if val_miou != val_miou:  # NaN: no class has a pixel in any validation mask
                raise DataError(
                    f"{label or f'stage 1 {role}'}: the validation split ({len(val)} images) "
                    f"has no labelled pixel (every mask pixel is the ignore value {IGNORE}), "
                    "so no epoch can be scored and none kept; label part of its images, or "
                    "give the split other ones (paser data check shows what each split holds)")
            if val_miou > best:
                best, best_epoch = val_miou, epoch
                if dist.is_main:
                    atomic_save({"model": kept.state_dict(), "spec": spec, "role": role,
                                 "epoch": epoch, "val_miou": val_miou}, best_path)
            stop = patience is not None and epoch - best_epoch >= patience
            record = {"stage": 1, "model": role, "epoch": epoch, "loss": total / len(order),
                      "train_miou": acc.compute()["miou"], "val_miou": val_miou,
                      "best_epoch": best_epoch, "stopped": stop,
                      "seconds": time.perf_counter() - t0}
            if dist.is_main:
                log.end_epoch(record, {"model": plain.state_dict(), "optimizer": opt.state_dict(),
                                       **rng_state(device), "epoch": epoch,
                                       "best": best, "best_epoch": best_epoch, "spec": spec,
                                       "role": role} | ({} if ema is None else {
                                           "ema": ema.state_dict()}), last_path)
            low = "" if dist.precision == "32-true" else f" ({dist.precision.split('-')[0]})"
            bar.update(task, completed=epoch + 1,  # the summary's figures are 32-bit
                       info=f"loss {record['loss']:.3f}  val mIoU{low} {val_miou:.3f}")
            if stop:
                bar.update(task, total=epoch + 1)
                break
    if dist.is_main and not best_path.is_file():
        if epochs > 0:  # trained before this call, and its best checkpoint removed since
            raise CheckpointError(f"{best_path}: missing, though {role} trained; run stage 1 "
                                  "again without --resume (paser run: --force)")
        # zero epochs: keep the untrained weights (or the spec's own weights file)
        atomic_save({"model": plain.state_dict(), "spec": spec, "role": role, "epoch": -1,
                     "val_miou": best}, best_path)
    dist.barrier()  # the others read what rank 0 wrote
    return best


def model_fingerprint(cfg: ExperimentConfig, role: str, added: bool = False,
                      root: bool = False) -> str:
    """What a stage-1 model's training depends on, hashed: its role (its seed, through
    :func:`paser.train.common.seed_role`), its own spec, the data (not how it is read),
    the run's seed, grid and halo, the class and channel counts and stage 1's settings; and
    for f0 the fingerprint of fK, which it distils from. Another model's spec is not in it.
    ``added``: stage 1's keys added since (:data:`paser.run.ADDED`) left out at the value
    models trained before them had, as those models were fingerprinted; ``root``: the
    data's folder hashed as a path, as before 2026-12-06 (:func:`paser.run.hashed_part`)."""
    from paser.run import ADDED_KEYS, hashed_part

    raw = cfg.model_dump(mode="json")
    models = raw["models"]
    parts = {"role": role, "seed": raw["seed"], "grid": raw["grid"], "halo": raw["halo"],
             "data": hashed_part(raw, "data", root=root),
             "channels": models["in_channels"], "classes": models["num_classes"],
             "stage1": hashed_part(raw, "stage1", added=ADDED_KEYS if added else frozenset()),
             "model": models["f0"] if role == "f0" else models["pool"][int(role[1:]) - 1]}
    if role == "f0":
        parts["teacher"] = model_fingerprint(cfg, f"f{len(cfg.models.pool)}", added, root)
    return hashlib.sha1(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]


def model_fingerprints(cfg: ExperimentConfig, role: str) -> set[str]:
    """Every way a version of paser fingerprinted this model (:func:`model_fingerprint`'s
    ``added`` and ``root``): one trained under any of them is the model this config
    trains."""
    return {model_fingerprint(cfg, role, added, root)
            for added in (False, True) for root in (False, True)}


def rehash_models(cfg: ExperimentConfig, run_dir: Path) -> None:
    """Record each stage-1 model that an earlier version of paser fingerprinted in another
    way (:func:`model_fingerprint`'s ``added`` and ``root``) under today's fingerprint."""
    for role, _ in model_roles(cfg):
        path = _trained_file(run_dir, role)
        record = trained_record(path)
        now = model_fingerprint(cfg, role)
        if record.get("fingerprint") not in (None, now) and record["fingerprint"] in (
                model_fingerprints(cfg, role)):
            atomic_write_text(json.dumps({**record, "fingerprint": now}), path)


def kept_before(cfg: ExperimentConfig, run_dir: Path, role: str, files: str | None) -> bool:
    """Whether ``role`` finished its stage-1 training before with this config's settings
    for it (:func:`model_fingerprints`) on the data files of digest ``files``: a
    :func:`pretrain` with ``reuse`` keeps it."""
    record = trained_record(_trained_file(run_dir, role))
    return ((run_dir / "checkpoints" / f"{role}.pt").is_file()
            and record.get("fingerprint") in model_fingerprints(cfg, role)
            and record.get("data") == files)


def every_model_kept(cfg: ExperimentConfig, run_dir: Path, files: str | None) -> bool:
    """Whether a :func:`pretrain` with ``reuse`` (not resumed) keeps every model of stage 1
    (:func:`kept_before`): it then trains nothing, and only writes ``stage1.json``."""
    return all(kept_before(cfg, run_dir, role, files) for role, _ in model_roles(cfg))


def _trained_file(run_dir: Path, role: str) -> Path:
    """Where a model that finished its stage-1 training records its fingerprint."""
    return run_dir / "checkpoints" / f"{role}.trained.json"


def trained_record(path: Path) -> dict:
    """A model's record at ``path`` (:func:`_trained_file`; empty where there is none). One
    cut short (a copy stopped, a full disk) is a :class:`CheckpointError` that names it and
    says what to do, as an unreadable ``steps.json`` is, not a JSON traceback."""
    if not path.is_file():
        return {}
    role = path.name.removesuffix(".trained.json")
    return read_record(path, "a record of a trained model", (
        f"it records what {role} was trained with and on. Delete it: {role}.pt is kept, and "
        f"stage 1 trains {role} again the next time it runs"))


def trained_on(cfg: ExperimentConfig, run_dir: Path) -> dict:
    """Where the pool trained, from each model's record: ``machine`` where every model
    trained on one kind (:func:`paser.train.distributed.machine`), else ``None`` and
    ``machines`` by model (a model kept from an earlier call, or resumed elsewhere, keeps
    its own; one recorded before machines were is ``None``)."""
    machines = {}
    for role, _ in model_roles(cfg):
        machines[role] = machine_kind(trained_record(_trained_file(run_dir, role)).get("machine"))
    kinds = {json.dumps(m, sort_keys=True) for m in machines.values()}
    if len(kinds) == 1 and None not in machines.values():
        return {"machine": next(iter(machines.values()))}
    return {"machine": None, "machines": machines}


def pretrain(cfg: ExperimentConfig | None, run_dir: str | Path, resume: bool = False,
             show_progress: bool = True, reuse: bool = False,
             files: str | None = None) -> dict:
    """Run stage 1 into ``run_dir``; return the summary written to ``stage1.json``.

    ``cfg=None`` reopens the config saved in ``run_dir`` (for ``--resume``). ``reuse``
    (``paser run`` without ``--force``): a model whose training finished before with the
    same :func:`model_fingerprint` is kept, not trained again; each model is seeded on its
    own, so it is the model a fresh run would train (changing f0 keeps f1..fK; changing f1
    keeps the others, f0 included, since it distils from fK). ``files``: the digest of the
    data's files (:mod:`paser.data.identity`; found here when not given): recorded with
    each model trained, and a model trained on other files is not kept.
    """
    run_dir, cfg = prepare_run_dir(run_dir, cfg, resume)
    check_devices(cfg)  # before anything is read or removed
    if not resume and not (reuse and every_model_kept(cfg, run_dir, files)):
        drop_downstream(run_dir, "stage1")  # (a call that keeps every model replaces none)
    device = setup(cfg)
    data = load_stage_data(cfg, progress=show_progress, run_dir=run_dir)
    grid = PatchGrid(*cfg.grid, halo=cfg.halo)
    probe_models(cfg, grid, *data.pre.images.shape[-2:])  # before any training
    _groups_hold_samples(cfg, data)
    probe_budget(cfg, grid, *data.validation.images.shape[-2:],
                 unit="image" if source_images(data.validation.ids) is None else "tile")
    dist = launch(cfg)  # after the data is in place: the other processes only read it
    if files is None and dist.is_main:  # only the main process records them
        from paser.data.identity import data_identity

        ident = data_identity(cfg.data, run_dir)
        files = None if ident is None else ident.digest
    # a model finished before keeps the files it was trained on through a --resume
    records = {role: trained_record(_trained_file(run_dir, role))
               for role, _ in model_roles(cfg) if _trained_file(run_dir, role).is_file()}
    device = dist.device
    if dist.is_main:  # what inference needs to read the run's data as it trained on it
        save_label_codec(run_dir, cfg)
        data_intensity(cfg.data, progress=False).save(run_dir)
    weight = class_weight(cfg, device)
    ce = weighted_ce(cfg, device, dist)
    log = MetricLog(run_dir / "metrics" / "stage1.jsonl")
    common = dict(cfg=cfg, run_dir=run_dir, log=log, resume=resume, device=device,
                  show_progress=show_progress, dist=dist)

    roles = model_roles(cfg)
    forwards = {role: whole_image if role == "f0" else patchwise(grid) for role, _ in roles}

    def same(role: str) -> bool:
        """Trained before with the same fingerprint (and ``reuse``)."""
        return reuse and not resume and kept_before(cfg, run_dir, role, files)

    if not resume:
        # a model this call trains again starts over: cut short before it is reached, its
        # last checkpoint of an earlier config would be what --resume finishes it from
        forget_progress(*(run_dir / "checkpoints" / f"{role}_last.pt"
                          for role, _ in roles if not same(role)))

    def kept(role: str) -> bool:
        """Trained before with the same fingerprint (and ``reuse``): shown, not trained."""
        path = _trained_file(run_dir, role)
        if same(role):
            with progress(show_progress and dist.is_main) as bar:
                bar.add_task(f"stage 1 {role}", total=1, completed=1,
                             info="kept: trained before with these settings")
            return True
        if dist.is_main:
            path.unlink(missing_ok=True)  # trained again: finished only once it is
        return False

    def finished(role: str) -> None:
        if dist.is_main:
            record = {"fingerprint": model_fingerprint(cfg, role), "machine": machine(device)}
            had = records.get(role, {})
            if resume and had.get("fingerprint") == record["fingerprint"] and "data" in had:
                record["data"] = had["data"]  # finished before: nothing trained now
                record["machine"] = had.get("machine")
            elif files is not None:
                record["data"] = files
            atomic_write_text(json.dumps(record), _trained_file(run_dir, role))

    for (role, spec), key in zip(roles[1:], _keys(cfg)[1:], strict=True):
        if kept(role):
            continue
        seed_role(cfg, role)  # each model's weights and dropout from (seed, role) alone
        model = dist.place(build_model(cfg, spec))
        train, val = (d.in_groups(spec.groups, key) for d in (data.pre, data.validation))
        around = None if data.pre_around is None else data.pre_around.in_groups(spec.groups, key)
        fit(role, model, forwards[role], ce, train, val, around=around, margin=data.margin,
            epochs=model_epochs(cfg, spec), lr=spec.lr or cfg.stage1.lr, **common)
        finished(role)

    if not kept("f0"):
        _train_f0(cfg, run_dir, data, forwards, weight, dist, common)
        finished("f0")

    summary = summarize(cfg, run_dir, data, forwards, device,
                        show_progress and dist.is_main) | {"precision": dist.precision,
                                                           **trained_on(cfg, run_dir)}
    if dist.is_main:
        atomic_write_text(json.dumps(summary, indent=2), run_dir / "stage1.json")
    return summary


def _train_f0(cfg: ExperimentConfig, run_dir: Path, data, forwards: dict[str, Forward],
              weight: torch.Tensor | None, dist: Dist, common: dict) -> None:
    """f0 on whole images, distilled from fK (frozen)."""
    device = dist.device
    roles = model_roles(cfg)
    # fK is frozen while f0 learns: its stitched logits on f0's data are computed once.
    f0_spec = cfg.models.f0
    f0_train, f0_val = (d.in_groups(f0_spec.groups, _keys(cfg)[0])
                        for d in (data.pre, data.validation))
    teacher_role = roles[-1][0]
    teacher = load_trained(run_dir, cfg, teacher_role, device).eval()
    targets = run_dir / "cache" / "teacher_logits.npy"
    teacher_logits = cache_predictions(partial(forwards[teacher_role], teacher), f0_train,
                                       cfg.stage1.batch_size, targets, dist,
                                       f"stage 1 f0: {teacher_role}'s targets",
                                       common["show_progress"])
    a_kd = cfg.stage1.a_kd

    def ce_kd(logits, y, idx):
        target = torch.from_numpy(teacher_logits[idx.numpy()]).to(logits.device).float()
        return (1 - a_kd) * masked_ce(logits, y, weight, dist) + a_kd * F.mse_loss(
            logits, target)

    seed_role(cfg, "f0")
    f0 = dist.place(build_model(cfg, f0_spec))
    fit("f0", f0, whole_image, ce_kd, f0_train, f0_val,
        epochs=model_epochs(cfg, f0_spec), lr=f0_spec.lr or cfg.stage1.lr, **common)
    if dist.is_main:
        targets.unlink()


@torch.inference_mode()
def probe_models(cfg: ExperimentConfig, grid: PatchGrid, h: int, w: int) -> None:
    """Run every model once on an input of the size it will get (f0 the whole image, the
    pool a patch with its halo), so that a model that cannot take it fails now, naming
    its key, not after hours of training. A grid larger than the image fails here too."""
    ph, pw = (s + 2 * grid.halo for s in grid.patch_size(h, w))
    for (role, spec), key in zip(model_roles(cfg), _keys(cfg), strict=True):
        size = (h, w) if role == "f0" else (ph, pw)
        where = "the whole image" if role == "f0" else "a patch with its halo"
        try:
            out = build_model(cfg, spec, initial=False).eval()(
                torch.zeros(1, cfg.models.in_channels, *size))
        except (RuntimeError, ValueError, AssertionError) as err:
            first = str(err).splitlines()[0][:300] if str(err) else type(err).__name__
            if spec.input_size is not None:  # it ran at its own size, not the patch's
                raise ConfigError(
                    f"key '{key.removesuffix('.groups')}.input_size': {spec.name} cannot run "
                    f"at {spec.input_size[0]} x {spec.input_size[1]}, the size its input is "
                    f"resized to ({first}); give a size it runs at, or null") from None
            raise ConfigError(
                f"key '{key.removesuffix('.groups')}': {spec.name} cannot run on {where} of "
                f"{size[0]} x {size[1]} ({first}); choose a grid (or halo) whose patches suit "
                "it, or another model" + (" (or give it an input_size it runs at, e.g. "
                                          "input_size: [96, 96])" if spec.input_size is None
                                          else "")) from None
        want = (1, cfg.models.num_classes, *size)
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != want:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ConfigError(
                f"key '{key.removesuffix('.groups')}': {spec.name} gave {got} on {where} of "
                f"{size[0]} x {size[1]}; a model must give logits [B, models.num_classes, H, W] "
                f"for an input [B, C, H, W], here {want}")


def probe_budget(cfg: ExperimentConfig, grid: PatchGrid, h: int, w: int,
                 unit: str = "image") -> None:
    """Refuse ``operating_point.budget_gflops`` below what f0 and the policy cost on the
    ``h x w`` validation images (``unit``: tiles, where they are) it is calibrated on, before
    any training, not once the run reaches its calibration (the models' FLOPs do not depend
    on their weights)."""
    budget = cfg.operating_point.budget_gflops
    if budget is None:
        return
    from paser.calibration import check_budget
    from paser.checkpoints import make_policy
    from paser.routing import CostTable
    from paser.uncertainty import state_channels

    # f0 and the policy alone: the pool's cost is not part of it (building and counting
    # the cityscapes-segformer pool took 2.5 s of the 2.6 s, and its memory, in every process)
    f0 = build_model(cfg, cfg.models.f0, initial=False)
    policy = make_policy(cfg, len(model_roles(cfg)))
    costs = CostTable.measure(f0, policy, [], grid, cfg.models.in_channels, h, w, cfg.mc_samples,
                              state_channels(cfg.stage2.state, cfg.models.in_channels,
                                             cfg.models.num_classes), cfg.mc_dropout)
    try:
        check_budget(budget, costs, h, w, "key 'operating_point.budget_gflops':", f"{budget:g}",
                     unit=unit)
    except ConfigError as err:
        raise ConfigError(f"{err}; nothing was trained") from None


def _groups_hold_samples(cfg: ExperimentConfig, data) -> None:
    """Every model given ``groups`` has samples of them in D_pre and in validation: one
    with none trained on nothing and stopped with a ZeroDivisionError after its first
    epoch, the models before it trained for nothing."""
    for (role, spec), key in zip(model_roles(cfg), _keys(cfg), strict=True):
        for split, d in (("D_pre", data.pre), ("validation", data.validation)):
            if spec.groups is None or len(d.in_groups(spec.groups, key)):
                continue
            names = " or ".join(d.group_names[g] for g in spec.groups)
            held = ", ".join(f"{n} {d.group_names[g]}" for g, n in enumerate(
                torch.bincount(d.groups, minlength=len(d.group_names)).tolist()) if n)
            raise DataError(f"key '{key}': {split} holds no {names} sample ({len(d)} samples: "
                            f"{held or 'none'}), so {role} would have nothing to "
                            f"{'train' if split == 'D_pre' else 'be validated'} on; give "
                            "more samples (noisy MNIST: data.mnist.n_train, of which D_pre "
                            "is data.split's first share, and data.mnist.n_val)")


def _keys(cfg: ExperimentConfig) -> list[str]:
    """The config key of each role's ``groups``, f0 first (for error messages)."""
    return ["models.f0.groups"] + [f"models.pool.{i}.groups" for i in range(len(cfg.models.pool))]


def model_epochs(cfg: ExperimentConfig, spec: ModelSpec) -> int:
    """A model's stage-1 epochs: its own ``epochs``, else ``stage1.epochs``."""
    return cfg.stage1.epochs if spec.epochs is None else spec.epochs


def training_record(log: list[dict], role: str, cap: int, patience: int | None) -> dict:
    """How long a model trained, from its metric lines: ``epochs`` run, the ``best_epoch``
    kept, and ``converged`` (validation mIoU stopped improving for ``patience`` epochs
    before the cap of ``cap`` epochs; ``None`` without patience, when nothing says so)."""
    lines = [r for r in log if r.get("model") == role]
    best = max(lines, key=lambda r: r["val_miou"], default=None)
    stopped = bool(lines and lines[-1].get("stopped"))
    return {"epochs": len(lines), "epoch_cap": cap, "patience": patience,
            "best_epoch": None if best is None else best["epoch"],
            "converged": stopped if patience is not None else None}


def summarize(cfg: ExperimentConfig, run_dir: Path, data, forwards: dict[str, Forward],
              device: torch.device, show_progress: bool = False) -> dict:
    """Validation and test mIoU (dropout off, one pass), parameters and GFLOP per image."""
    grid = PatchGrid(*cfg.grid, halo=cfg.halo)
    h, w = data.test.images.shape[-2:]
    ph, pw = (s + 2 * grid.halo for s in grid.patch_size(h, w))
    log = MetricLog(run_dir / "metrics" / "stage1.jsonl").read()
    models = {}
    roles = model_roles(cfg)
    per_model = len(data.validation) + len(data.test)
    with progress(show_progress) as bar:
        task = bar.add_task("stage 1: each model on validation and test",
                            total=len(roles) * per_model, info="")
        for r, (role, spec) in enumerate(roles):
            model = load_trained(run_dir, cfg, role, device)
            # GFLOP per image: f0 once on the whole image, a task model on all P patches.
            gflops = (gflops_per_sample(model, cfg.models.in_channels, h, w) if role == "f0"
                      else grid.num_patches * gflops_per_sample(model, cfg.models.in_channels,
                                                                ph, pw))
            miou = {}
            for split, before in (("validation", 0), ("test", len(data.validation))):
                def seen(k: int, at=r * per_model + before) -> None:
                    bar.update(task, completed=at + k)

                miou[f"{split}_miou"] = evaluate_miou(
                    model, forwards[role], getattr(data, split), cfg.models.num_classes,
                    cfg.stage1.batch_size, device, seen)
            models[role] = {
                "name": spec.name,
                "parameters": count_parameters(model),
                "gflops_per_image": gflops,
                **training_record(log, role, model_epochs(cfg, spec), cfg.stage1.patience),
                **miou,
            }
            if data.test.groups is not None:  # each model on each kind of sample (noisy MNIST)
                models[role]["test_miou_by_group"] = {
                    name: evaluate_miou(model, forwards[role], data.test.in_groups([g]),
                                        cfg.models.num_classes, cfg.stage1.batch_size, device)
                    for g, name in enumerate(data.test.group_names)}
    return {"stage": 1, "flop_convention": FLOP_CONVENTION, "device": str(device),
            "image_size": [h, w], "grid": list(cfg.grid), "models": models}
