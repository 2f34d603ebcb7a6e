"""Stage 3: joint fine-tuning on D_ft. For each batch: sample actions (alpha rises
0.95 -> 1.0), update every f_k (k >= 1) with cross entropy on the patches routed to it,
then update the policy by REINFORCE with the reward of stage 2 on those predictions.

Budget by total variation (``stage3.tvd_threshold``): lam rises linearly from
``lam_start`` to ``lam_end`` and fine-tuning stops once the validation assignment
distribution is ``tvd_threshold`` away from the starting policy's (trained with
lam = 0); the kept checkpoint is the last epoch still within the threshold.

With a full-information policy (``stage2.objective`` expected or gain) the pool is
fine-tuned the same way, on the patches the stage-2 policy routes to each model, but the
policy is not updated by sampled rewards: once the pool is fine-tuned (best epoch on
validation), the policy is trained afresh on D_rl's outcomes under the new pool.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from paser.checkpoints import build_router, load_checkpoint, make_policy
from paser.config import ExperimentConfig, Stage3Config
from paser.data import StageData, load_stage_data
from paser.errors import ConfigError
from paser.evaluation import evaluate_router
from paser.metrics import iou_per_image, predicted_classes
from paser.models.registry import has_batchnorm
from paser.outcomes import PatchOutcomes
from paser.runtime import atomic_save, atomic_write_text, progress
from paser.train.common import (
    MetricLog,
    check_finite,
    forget_progress,
    prepare_run_dir,
    resume_state,
    rng_state,
    setup,
)
from paser.train.distributed import Dist, check_devices, launch
from paser.train.policy import explore, fit_policy, linear, reward, tvd


def refuse_tvd_without_reinforce(cfg: ExperimentConfig, s3: Stage3Config) -> None:
    """A TVD budget (``stage3.tvd_threshold``, or the thresholds of ``stage3.tvd_sweep``)
    fine-tunes a REINFORCE policy: refused for a full-information one (by ``paser run``
    before stage 1 trains; not by the config, whose full-information variants in the
    ablation keep a REINFORCE run's stage-3 keys)."""
    if cfg.stage2.objective == "reinforce":
        return
    key = ("stage3.tvd_threshold" if s3.tvd_threshold is not None else
           "stage3.tvd_sweep" if s3.tvd_sweep else None)
    if key is not None:
        raise ConfigError(f"key '{key}': the TVD budget fine-tunes a REINFORCE policy "
                          "(stage2.objective=reinforce); a full-information policy meets a "
                          "budget by calibration (operating_point.max_tvd)")


def finetune(cfg: ExperimentConfig | None, run_dir: str | Path, resume: bool = False,
             show_progress: bool = True, variant: tuple[Path, Stage3Config] | None = None,
             data: StageData | None = None) -> dict:
    """Run stage 3 into ``run_dir``; return the summary written to ``stage3.json``.

    ``variant=(out_dir, settings)`` fine-tunes from the run's stage-1 models and stage-2
    policy with other stage-3 settings (a TVD sweep), writing checkpoints, metrics and
    ``stage3.json`` under ``out_dir`` instead; the run's own stage 3 is left alone.
    """
    run_dir, cfg = prepare_run_dir(run_dir, cfg, resume)
    check_devices(cfg, "32-true")  # before anything is read or removed
    setup(cfg)
    out_dir, s3 = variant if variant is not None else (run_dir, cfg.stage3)
    out_dir = Path(out_dir)
    if not resume:
        forget_progress(out_dir / "checkpoints" / "stage3_last.pt")
    data = data or load_stage_data(cfg, progress=show_progress, run_dir=run_dir)
    # after the data is in place: the other processes only read it; stage 3 is 32-bit
    dist = launch(cfg, "32-true")
    device = dist.device
    policy_state = load_checkpoint(run_dir / "checkpoints" / "policy.pt", device)["policy"]
    ckpt_dir = out_dir / "checkpoints"
    router = build_router(cfg, run_dir, device, policy_state)
    grid, policy, pool = router.grid, router.policy, router.pool
    ncls, batch = cfg.models.num_classes, s3.batch_size
    cost = router.costs(*data.ft.images.shape[-2:]).model_cost(cfg.stage2.cost).to(device)
    weight = (torch.tensor(cfg.stage1.class_weights, device=device)
              if cfg.stage1.class_weights else None)
    opts = [torch.optim.Adam(m.parameters(), lr=s3.lr) for m in (policy, *pool)]
    last_path, best_path = ckpt_dir / "stage3_last.pt", ckpt_dir / "stage3.pt"
    start, best, stopped = 0, -float("inf"), False
    lam_fixed = cfg.stage2.lam if s3.lam is None else s3.lam
    objective = cfg.stage2.objective
    refuse_tvd_without_reinforce(cfg, s3)
    reference = evaluate_router(router, data.validation, ncls, batch)["fractions"]
    state = resume_state(last_path, resume, device,
                         {"policy": policy, "pool": list(pool), "optimizers": list(opts)})
    if state is not None:
        start, best, stopped, reference = (state["epoch"] + 1, state["best"], state["stopped"],
                                           state["reference"])
    log = MetricLog(out_dir / "metrics" / "stage3.jsonl")
    if dist.is_main:
        if start == 0 or not best_path.is_file():  # the starting point is valid (TVD 0)
            _save_best(best_path, router, -1, None)
        log.truncate_after("stage3", start - 1)
    n = len(data.ft)
    with progress(show_progress and dist.is_main and s3.epochs > 0) as bar:
        name = "stage 3 joint" if variant is None else f"stage 3 variant (TVD {s3.tvd_threshold})"
        task = bar.add_task(name, total=s3.epochs, completed=start, info="")
        for epoch in range(start, s3.epochs):
            if stopped:
                break
            tick = time.perf_counter()
            alpha = linear(*s3.alpha, epoch, s3.epochs)
            lam = (linear(s3.lam_start, s3.lam_end, epoch, s3.epochs)
                   if s3.tvd_threshold is not None else lam_fixed)
            with dist.same_draws():  # dropout took unlike amounts in each process
                order = torch.randperm(n)
            sums = torch.zeros(4, dtype=torch.float64)
            # every process needs a share of a batch
            batches = [idx for idx in order.split(batch) if len(idx) >= dist.world]
            shares = [dist.shard(torch.arange(len(idx))) for idx in batches]
            loaded = data.ft.gather(idx[rows] for idx, rows in zip(batches, shares, strict=True))
            for idx, rows, (images, masks) in zip(batches, shares, loaded, strict=True):
                x = grid.pad(images.to(device))
                y = grid.pad(masks.to(device), mode="constant", value=-1)
                r, gain, paid, task_loss = _joint_step(router, opts, x, y, alpha, lam, cost,
                                                       weight, ncls, dist, rows, len(idx),
                                                       objective)
                sums += torch.tensor([r, gain, paid, task_loss], dtype=torch.float64) * len(idx)
            dist.sync_buffers(router)  # the pool's BatchNorm saw the patches routed here
            check_finite(router, f"stage 3, epoch {epoch}", "stage3.lr")
            val = evaluate_router(router, data.validation, ncls, batch, lam=lam, cost=cost)
            distance = tvd(val["fractions"], reference)
            kept = val | {"tvd": distance, "epoch": epoch, "lam": lam}
            if s3.tvd_threshold is not None:
                stopped = distance >= s3.tvd_threshold
                if not stopped and dist.is_main:
                    _save_best(best_path, router, epoch, kept)
            elif val["reward"] > best:
                best = val["reward"]
                if dist.is_main:
                    _save_best(best_path, router, epoch, kept)
            m = sums / n
            record = {"stage": 3, "model": "stage3", "epoch": epoch, "alpha": alpha, "lam": lam,
                      "policy/reward": m[0].item(), "policy/reward_no_cost": m[1].item(),
                      "policy/cost": m[2].item(), "task/loss": m[3].item(),
                      "val/reward": val["reward"], "val/miou": val["miou"],
                      "val/f0_miou": val["f0_miou"], "val/gflops": val["gflops"],
                      "val/fractions": val["fractions"], "val/tvd": distance,
                      "stopped": stopped, "seconds": time.perf_counter() - tick}
            if dist.is_main:
                log.end_epoch(record, {"policy": policy.state_dict(),
                                       "pool": [m.state_dict() for m in pool],
                                       "optimizers": [o.state_dict() for o in opts],
                                       **rng_state(device), "epoch": epoch,
                                       "best": best, "stopped": stopped,
                                       "reference": reference}, last_path)
            bar.update(task, advance=1, info=f"val mIoU {val['miou']:.3f}  GFLOP "
                       f"{val['gflops']:.2f}  TVD {distance:.3f}")
    dist.barrier()  # the others read what rank 0 wrote
    if objective != "reinforce" and s3.epochs > 0:  # the policy learns the fine-tuned pool
        state = load_checkpoint(best_path, device)
        for model, sd in zip(pool, state["pool"], strict=True):
            model.load_state_dict(sd)
        val = refit_policy(cfg, router, data, device)
        # the refit policy's routing: its distance from the reference is its own, not the
        # epoch's before the refit (87.5 / 12.5 / 0 % against [1, 0, 0] read TVD 0.000)
        val |= {"tvd": tvd(val["fractions"], reference), "refit": True}
        if dist.is_main:
            _save_best(best_path, router, state["epoch"], (state["val"] or {}) | val)
        dist.barrier()
    summary = {"stage": 3, "epochs": s3.epochs, "lam": lam_fixed,
               "tvd_threshold": s3.tvd_threshold,
               "reference_fractions": reference, "stopped_by_tvd": stopped,
               "best": load_checkpoint(best_path)["val"]}
    if dist.is_main:
        atomic_write_text(json.dumps(summary, indent=2), out_dir / "stage3.json")
    return summary


def sweep_dir(run_dir: str | Path, threshold: float, cfg: ExperimentConfig) -> Path:
    """Where the TVD-sweep variant for ``threshold`` lives: ``run_dir/tvd/<threshold>``, or
    the run itself when ``threshold`` is the run's own ``stage3.tvd_threshold`` (that variant
    is the run's stage 3: it is not trained twice)."""
    if threshold == cfg.stage3.tvd_threshold:
        return Path(run_dir)
    return Path(run_dir) / "tvd" / f"{threshold:g}"


def tvd_sweep(cfg: ExperimentConfig, run_dir: str | Path, resume: bool = False,
              show_progress: bool = True) -> list[dict]:
    """Fine-tune one variant per ``stage3.tvd_sweep`` threshold, each from the run's stage-2
    policy and stage-1 models (paper Fig. 12); return their ``stage3.json`` summaries. The
    run's own threshold is its stage 3 (run first) and is read, not trained again."""
    data = load_stage_data(cfg, progress=show_progress, run_dir=run_dir)
    (Path(run_dir) / "tvd").mkdir(parents=True, exist_ok=True)  # the step's output marker
    if not resume:  # the variants it has not reached when cut short start over too
        forget_progress(*(where / "checkpoints" / "stage3_last.pt" for where in (
            sweep_dir(run_dir, t, cfg) for t in cfg.stage3.tvd_sweep) if where != Path(run_dir)))
    out = []
    for threshold in cfg.stage3.tvd_sweep:
        where = sweep_dir(run_dir, threshold, cfg)
        if where == Path(run_dir):
            out.append(json.loads((where / "stage3.json").read_text()))
            continue
        settings = cfg.stage3.model_copy(update={"tvd_threshold": threshold})
        out.append(finetune(cfg, run_dir, resume, show_progress, variant=(where, settings),
                            data=data))
    return out


def _joint_step(router, opts, x, y, alpha, lam, cost, weight, ncls, dist: Dist,
                rows: torch.Tensor, batch: int, objective: str = "reinforce"):
    """One batch of stage 3 on this process's share ``rows`` of a batch of ``batch`` padded
    images: ``x`` [b, C, Hp, Wp], labels ``y`` (padding -1). Each process's losses are sums
    divided by the whole batch's count, so with the gradients summed over the processes
    (:meth:`Dist.reduce_grads`: a process may route no patch to a model, so not DDP) every
    update is the whole batch's mean, as in one process. Returns the batch means of reward,
    IoU gain, cost and the task models' loss. With a full-information ``objective`` the
    policy routes (greedy; uniformly with probability 1 - alpha) but is not updated: it is
    refit on D_rl once the pool is fine-tuned (:func:`refit_policy`)."""
    grid, policy = router.grid, router.policy
    with torch.no_grad():
        mc = router.observe(x)
    reinforce = objective == "reinforce"
    policy.train(reinforce)  # a full-information policy stays as stage 2 trained it
    with torch.set_grad_enabled(reinforce):
        logits = policy(router.state(x, mc))  # [b, P, K+1]
    actions = (explore(logits.detach(), alpha, rows, batch, dist) if reinforce
               else explore_greedy(logits.detach(), alpha, rows, batch, dist))
    patches, labels = grid.context(x), grid.split(y)  # [b*P, C, h', w'], [b*P, h, w]
    f0_pred = grid.split(mc.pred)
    routed = f0_pred.clone()
    flat = actions.reshape(-1)
    task_loss = 0.0
    for k, (model, opt) in enumerate(zip(router.pool, opts[1:], strict=True), start=1):
        idx = (flat == k).nonzero(as_tuple=True)[0]
        target = labels[idx]
        valid = target[target >= 0]
        mass = (weight[valid].sum() if weight is not None else valid.numel() * 1.0)
        total = float(dist.sum(torch.as_tensor(mass, dtype=torch.float64).cpu()))
        if total == 0:  # no labelled pixel routed to f_k in the whole batch
            continue
        # one patch routed to a model with BatchNorm: its statistics as they stand (batch
        # statistics of one value per channel cannot train it)
        model.train(idx.numel() > 1 or not has_batchnorm(model))
        opt.zero_grad(set_to_none=True)
        local = torch.zeros((), dtype=torch.float64)
        if idx.numel():
            out = router.pool_logits(k, patches[idx])
            loss = F.cross_entropy(out, target, weight=weight, ignore_index=-1,
                                   reduction="sum") / total  # the batch's weighted mean
            loss.backward()
            local = loss.detach().double().cpu()
            routed[idx] = predicted_classes(out.detach())
        dist.reduce_grads(model)
        opt.step()
        share = float(dist.sum(torch.tensor([float(idx.numel())], dtype=torch.float64))[0])
        task_loss += float(dist.sum(local)) * share / (batch * grid.num_patches)
    iou = torch.stack([iou_per_image(p, labels, ncls, ignore_index=-1).nan_to_num(0.0)
                       for p in (f0_pred, routed)], -1).view(*actions.shape, 2)
    # reward() reads IoU per action; here only f0's (index 0) and the taken one are known.
    patch_iou = torch.zeros(*actions.shape, router.num_models, device=x.device)
    patch_iou[..., 0] = iou[..., 0]
    patch_iou.scatter_(-1, actions[..., None], iou[..., 1:2])
    r, gain, paid = reward(patch_iou, actions, cost, lam)
    count = batch * grid.num_patches
    if reinforce:
        log_prob = torch.distributions.Categorical(logits=logits).log_prob(actions)
        loss = -(log_prob * r).sum() / count  # summed over the processes: the batch mean
        opts[0].zero_grad(set_to_none=True)
        loss.backward()
        dist.reduce_grads(policy)
        opts[0].step()
    means = dist.sum(torch.stack([r.sum(), gain.sum(), paid.sum()]).detach().double().cpu())
    return (*(means / count).tolist(), task_loss)


def explore_greedy(scores: torch.Tensor, alpha: float, rows: torch.Tensor, batch: int,
                   dist: Dist | None = None) -> torch.Tensor:
    """With probability alpha the policy's greedy actions for the batch, else uniform ones
    (drawn for the whole batch, identically in every process, as :func:`explore`)."""
    with (dist or Dist(scores.device)).same_draws():
        coin = torch.rand(())
        uniform = torch.randint(0, scores.shape[-1], (batch, *scores.shape[1:-1]))
    if coin < alpha:
        return scores.argmax(-1)
    return uniform[rows].to(scores.device)


def refit_policy(cfg: ExperimentConfig, router, data: StageData, device: torch.device) -> dict:
    """A full-information policy trained afresh on D_rl's outcomes under the fine-tuned
    pool (D_rl trained no pool model, so its outcomes are held out); it replaces the
    router's policy. Returns its validation result."""
    ncls, batch = cfg.models.num_classes, cfg.stage2.batch_size
    train = PatchOutcomes.build(router, data.rl, ncls, batch, device)
    val = PatchOutcomes.build(router, data.validation, ncls, batch, device)
    cost = router.costs(*data.rl.images.shape[-2:]).model_cost(cfg.stage2.cost).to(device)
    torch.manual_seed(cfg.seed)
    policy = make_policy(cfg, router.num_models).to(device)
    state, _ = fit_policy(cfg, policy, train, val, cost)
    router.policy.load_state_dict(state)
    return evaluate_router(router, data.validation, ncls, batch, lam=cfg.stage2.lam, cost=cost)


def _save_best(path: Path, router, epoch: int, val: dict | None) -> None:
    atomic_save({"policy": router.policy.state_dict(),
                 "pool": [m.state_dict() for m in router.pool], "epoch": epoch, "val": val}, path)
