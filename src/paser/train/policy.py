"""Stage 2: train the routing policy on D_rl; f0 and f1..fK are frozen.

Per patch p with action a_p (0 = keep f0's prediction, k = run f_k):

    R_p = (1 - lam) * (IoU(routed prediction on p) - IoU(f0 on p)) - lam * c(a_p)

with ``c`` the parameter ratio of paper Eq. 3 (or the FLOP ratio) and ``c(0) = 0``. The
IoU gain is the patch's own mIoU gain (the paper) or, with ``stage2.gain=dataset``, the
patch's first-order effect on the split's mIoU (:meth:`PatchOutcomes.dataset_gain`).

Objectives (``stage2.objective``):

- ``reinforce`` (the paper): ``loss = -mean_p log pi(a_p | s) * R_p`` for sampled actions.
  Exploration: per batch, with probability alpha the actions are sampled from the policy,
  otherwise uniformly; alpha rises linearly over the stage.
- ``expected``: every action's reward is known, so the exact expected reward
  ``loss = -mean_p sum_a pi(a | s) R_p(a)``; no sampling, no exploration.
- ``gain``: regress every pool model's gain over f0 on every patch (mean squared error);
  the policy routes each patch to the action of highest predicted reward (its
  ``gain_head``), and a budget moves that choice
  by a price per GFLOP (:mod:`paser.calibration`), as a router trained on full labels does.

Because the task models are frozen, what a patch scores under each action depends only
on (image, patch, action). :class:`paser.outcomes.PatchOutcomes` therefore runs f0 (T Monte Carlo
passes, one draw per image) and every pool model on every patch once per stage and
keeps the state and per-patch, per-action intersection/union counts; each epoch then
only runs the policy. One consequence: every epoch sees the same Monte Carlo draw of
f0 for an image (the reference draws anew each batch).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from paser.checkpoints import build_router, load_checkpoint
from paser.config import ExperimentConfig
from paser.data import Tensors, load_stage_data
from paser.errors import ConfigError
from paser.metrics import reward as action_reward
from paser.models import PooledPolicy
from paser.outcomes import PatchOutcomes, usable_views, viewed
from paser.routing import Router
from paser.runtime import atomic_save, atomic_write_text, progress, resolve_device
from paser.train.common import (
    MetricLog,
    check_finite,
    drop_downstream,
    forget_progress,
    prepare_run_dir,
    resume_state,
    rng_state,
    setup,
)
from paser.train.distributed import Dist, check_devices, launch
from paser.train.pretrain import crop


def reward(patch_iou: torch.Tensor, actions: torch.Tensor, cost: torch.Tensor, lam: float
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-patch reward ``[B, P]``, with its IoU gain and cost parts.

    ``patch_iou`` [B, P, K+1], ``actions`` [B, P], ``cost`` [K+1] with ``cost[0] = 0``.
    """
    gain = patch_iou.gather(-1, actions[..., None])[..., 0] - patch_iou[..., 0]
    paid = cost.to(patch_iou.device)[actions]
    return action_reward(gain, paid, lam), gain, paid


def fractions(actions: torch.Tensor, num_models: int) -> list[float]:
    """Share of patches sent to each model ``[K+1]``."""
    return (torch.bincount(actions.reshape(-1), minlength=num_models).double()
            / actions.numel()).tolist()


def tvd(p: torch.Tensor | list[float], q: torch.Tensor | list[float]) -> float:
    """Total variation distance between two assignment distributions: ``0.5 * sum |p - q|``."""
    return 0.5 * float((torch.as_tensor(p, dtype=torch.float64)
                        - torch.as_tensor(q, dtype=torch.float64)).abs().sum())


def linear(start: float, end: float, epoch: int, epochs: int) -> float:
    """Linear schedule from ``start`` (first epoch) to ``end`` (last epoch)."""
    return start if epochs <= 1 else start + (end - start) * epoch / (epochs - 1)


def explore(logits: torch.Tensor, alpha: float, rows: torch.Tensor, batch: int,
            dist: Dist | None = None) -> torch.Tensor:
    """With probability alpha sample the batch's actions from the policy, else uniformly.

    ``logits`` are the ``rows`` of a batch of ``batch`` states (all of them in one process;
    its share in data-parallel training, ``dist``): the random numbers are drawn for the
    whole batch, identically in every process (:meth:`Dist.same_draws`), and the rows taken
    (Gumbel-max sampling), so the processes together explore exactly as one process does
    on the whole batch.
    """
    with (dist or Dist(logits.device)).same_draws():
        coin = torch.rand(())
        gumbel = -torch.log(-torch.log(torch.rand(batch, *logits.shape[1:]).clamp_min(1e-20)))
        uniform = torch.randint(0, logits.shape[-1], (batch, *logits.shape[1:-1]))
    if coin < alpha:
        return (logits + gumbel[rows].to(logits.device)).argmax(-1)
    return uniform[rows].to(logits.device)


def policy_epoch(policy: torch.nn.Module, opt: torch.optim.Optimizer, states: torch.Tensor,
                 patch_iou: torch.Tensor, cost: torch.Tensor, lam: float, alpha: float,
                 batch_size: int, dist: Dist | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One REINFORCE epoch over cached states ``[N, 2, H, W]`` and IoUs ``[N, P, K+1]``.

    Returns the summed (reward, IoU gain, cost) over all patches and the action counts
    ``[K+1]`` (over all processes, with ``dist``, each of which takes its share of every
    batch).
    """
    device = patch_iou.device
    dist = dist or Dist(device)
    policy.train()
    # as rank 0 draws it: explore's draws moved rank 0's generator on and no other's
    with dist.same_draws():
        order = torch.randperm(len(states))
    sums = torch.zeros(3, dtype=torch.float64)
    counts = torch.zeros(patch_iou.shape[-1], dtype=torch.float64)
    for i in range(0, len(states), batch_size):
        idx = order[i:i + batch_size]
        if len(idx) < dist.world:  # every process needs a share
            continue
        rows = dist.shard(torch.arange(len(idx)))
        mine = idx[rows]
        with dist.autocast(convolutional=False):
            logits = policy(states[mine].to(device)).float()  # [b, P, K+1]
        actions = explore(logits.detach(), alpha, rows, len(idx), dist)
        r, gain, paid = reward(patch_iou[mine.to(device)], actions, cost, lam)
        log_prob = torch.distributions.Categorical(logits=logits).log_prob(actions)
        loss = -(log_prob * r).mean() * (len(mine) * dist.world / len(idx))  # the batch mean
        opt.zero_grad(set_to_none=True)
        dist.backward(loss)
        opt.step()
        sums += torch.stack([r.sum(), gain.sum(), paid.sum()]).detach().double().cpu()
        counts += torch.bincount(actions.reshape(-1), minlength=len(counts)).double().cpu()
    return dist.sum(sums), dist.sum(counts)


def full_information_epoch(policy: torch.nn.Module, opt: torch.optim.Optimizer,
                           states: torch.Tensor, gain: torch.Tensor, cost: torch.Tensor,
                           lam: float, batch_size: int, objective: str,
                           dist: Dist | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One epoch of a full-information objective over cached states ``[N, S, H, W]`` and
    every action's gain ``[N, P, K+1]`` (entry 0 is 0).

    ``expected``: minimise ``-sum_a pi(a | s) R(a)`` per patch. ``gain``: minimise the mean
    squared error of the policy's outputs to the gains of f1..fK (the policy's ``lam`` and
    ``cost`` buffers are 0 while it trains, so its output is its predicted gain).
    Returns the summed (loss, IoU gain, cost) of the greedy actions' patches and their
    counts ``[K+1]``, summed over the processes as :func:`policy_epoch` does.
    """
    device = gain.device
    dist = dist or Dist(device)
    policy.train()
    value = action_reward(gain, cost.to(device), lam)  # [N, P, K+1] every action's reward
    order = torch.randperm(len(states))
    sums = torch.zeros(3, dtype=torch.float64)
    counts = torch.zeros(gain.shape[-1], dtype=torch.float64)
    for i in range(0, len(states), batch_size):
        idx = order[i:i + batch_size]
        if len(idx) < dist.world:
            continue
        mine = idx[dist.shard(torch.arange(len(idx)))]
        with dist.autocast(convolutional=False):
            out = policy(states[mine].to(device)).float()  # [b, P, K+1] (or [M, b, P, K+1])
        target = mine.to(device)
        if objective == "expected":
            per_patch = -(out.softmax(-1) * value[target]).sum(-1)
            mean = out.detach() if out.dim() == 3 else out.detach().mean(0)
            actions = mean.argmax(-1)
        else:  # gain: squared error on f1..fK, summed over models, mean over patches
            per_patch = (out[..., 1:] - gain[target][..., 1:]).square().sum(-1)
            mean = out.detach() if out.dim() == 3 else out.detach().mean(0)
            actions = action_reward(mean, cost.to(device), lam).argmax(-1)
        if per_patch.dim() == 3:  # an ensemble: each member learns from its own error
            per_patch = per_patch.mean(0)
        loss = per_patch.mean() * (len(mine) * dist.world / len(idx))  # the batch mean
        opt.zero_grad(set_to_none=True)
        dist.backward(loss)
        opt.step()
        taken = gain[target].gather(-1, actions[..., None])[..., 0]
        sums += torch.stack([per_patch.detach().sum(), taken.sum(),
                             cost.to(device)[actions].sum()]).double().cpu()
        counts += torch.bincount(actions.reshape(-1), minlength=len(counts)).double().cpu()
    return dist.sum(sums), dist.sum(counts)


@torch.inference_mode()
def greedy_actions(policy: torch.nn.Module, states: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Argmax actions ``[N, P]`` of the policy in eval mode."""
    policy.eval()
    device = next(policy.parameters()).device
    return torch.cat([policy(states[i:i + batch_size].to(device)).argmax(-1)
                      for i in range(0, len(states), batch_size)])


def training_outcomes(cfg: ExperimentConfig, router: Router, data, device: torch.device,
                      mc_seed: int | None = None,
                      pool_from: PatchOutcomes | None = None) -> PatchOutcomes:
    """What the policy trains on: D_rl's outcomes, with D_ft's after them when
    ``stage2.train_on`` is ``rl+ft``, each split seen in ``stage2.views`` dihedral views
    (mirrored, turned: :func:`paser.outcomes.usable_views`), one after another, then in
    ``stage2.crops`` random crops of its tiles (:func:`random_crops`). The pool models are
    not equivariant, so a view or a crop is a new draw of every model's outcome on every
    patch, and a router that learns from more draws learns less of one draw's noise.
    ``pool_from``: outcomes built by this function before, in the same order."""
    splits = [(data.rl, getattr(data, "rl_around", None))]
    if cfg.stage2.train_on == "rl+ft":
        splits.append((data.ft, getattr(data, "ft_around", None)))
    if cfg.stage2.crops and any(around is None for _, around in splits):
        raise ConfigError(
            f"stage2.crops={cfg.stage2.crops}: the router's training images are whole images, "
            "not tiles cut from larger ones (data.tile), so there is no image around them to "
            "crop from; set stage2.crops=0 (stage2.views adds mirrored and turned copies)")
    h, w = data.rl.images.shape[-2:]
    views = usable_views(router.grid, h, w, cfg.stage2.views)
    parts: list[PatchOutcomes] = []

    def build(split) -> None:
        base, start = None, sum(len(p.state) for p in parts)
        if pool_from is not None:
            base = pool_from.rows(slice(start, start + len(split)))
        parts.append(PatchOutcomes.build(router, split, cfg.models.num_classes,
                                         cfg.stage2.batch_size, device, mc_seed, base))

    for s, (split, around) in enumerate(splits):
        for v in views:
            build(viewed(split, v))
        if cfg.stage2.crops:  # streamed windows are read once for all the draws
            around = around.in_memory()
        for c in range(cfg.stage2.crops):
            build(random_crops(around, data.router_margin, cfg.seed, s, c))
    return parts[0] if len(parts) == 1 else PatchOutcomes.concat(parts)


def random_crops(around: Tensors, margin: int, seed: int, split: int, draw: int) -> Tensors:
    """Tiles cut from their windows ``around`` (each tile with ``margin`` pixels of its
    image about it, :meth:`paser.data.tiles.Tiles.around`) at random offsets of up to
    ``margin`` each way: draw ``draw`` of training split ``split`` for run seed ``seed``,
    the same on every call."""
    around = around.in_memory()
    gen = torch.Generator().manual_seed(seed * 1_000_003 + split * 1009 + draw)
    offsets = torch.randint(2 * margin + 1, (len(around), 2), generator=gen)
    images, masks = crop(around.images, around.masks, margin, offsets)
    return Tensors(images, masks, list(around.ids), around.groups, around.group_names)


def prepare(policy: torch.nn.Module, train_states: torch.Tensor) -> None:
    """Before training: a pooled policy fits its standardisation to the training states, and
    a gain head trains with no price (its output is then its predicted gain)."""
    if isinstance(policy, PooledPolicy):
        policy.standardise_on(train_states)
    if getattr(policy, "gain_head", False):
        policy.lam.zero_()
        policy.cost.zero_()


def inputs(policy: torch.nn.Module, states: torch.Tensor) -> torch.Tensor:
    """What the policy trains on for cached states ``[N, S, H, W]``: a pooled policy's
    patch statistics ``[N, P, 3S]``, computed once instead of every epoch (it takes
    either), the states themselves for others."""
    if isinstance(policy, PooledPolicy):
        return policy.all_statistics(states).cpu()
    return states


def priced(policy: torch.nn.Module, lam: float, cost: torch.Tensor) -> dict:
    """The policy's state dict for routing: a gain head's price buffers set to ``lam`` and
    ``cost`` (it then returns the predicted reward); other policies' as they are."""
    state = {k: v.detach().clone() for k, v in policy.state_dict().items()}
    if getattr(policy, "gain_head", False):
        state["lam"] = torch.tensor(float(lam))
        state["cost"] = cost.detach().float().cpu().clone()
    return state


def run_epoch(policy: torch.nn.Module, opt: torch.optim.Optimizer, states: torch.Tensor,
              gain: torch.Tensor, cost: torch.Tensor, lam: float, objective: str,
              alpha: float, batch_size: int, dist: Dist | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """One stage-2 epoch of ``objective`` (see the module doc); see :func:`policy_epoch`
    and :func:`full_information_epoch` for what comes back."""
    if objective == "reinforce":
        return policy_epoch(policy, opt, states, gain, cost, lam, alpha, batch_size, dist)
    return full_information_epoch(policy, opt, states, gain, cost, lam, batch_size, objective,
                                  dist)


@torch.inference_mode()
def validate(policy: torch.nn.Module, states: torch.Tensor, gain: torch.Tensor,
             cache: PatchOutcomes, cost: torch.Tensor, lam: float, batch: int,
             objective: str = "reinforce") -> dict:
    """Greedy routing on the validation cache: mean reward, routed mIoU, fractions, and
    ``score``, what the best checkpoint maximises: the reward, or for ``gain`` minus the
    squared error of the predicted gains (``loss``; the routing it gives depends on lam,
    the regression does not)."""
    policy.eval()
    device = next(policy.parameters()).device
    out = torch.cat([policy(states[i:i + batch].to(device)).float()
                     for i in range(0, len(states), batch)])
    cost = cost.to(out.device)
    gain = gain.to(out.device)
    result = {}
    if objective == "gain":  # trained with no price: out is the predicted gain
        actions = action_reward(out, cost, lam).argmax(-1)
        result["loss"] = float((out[..., 1:] - gain[..., 1:]).square().sum(-1).mean())
    else:
        actions = out.argmax(-1)
    r, _, _ = reward(gain, actions, cost, lam)
    result.update({"reward": r.mean().item(), "miou": cache.miou(actions.cpu()),
                   "fractions": fractions(actions, gain.shape[-1])})
    result["score"] = -result["loss"] if objective == "gain" else result["reward"]
    return result


def make_optimizer(policy: torch.nn.Module, cfg: ExperimentConfig) -> torch.optim.Optimizer:
    """Adam (the paper), AdamW with ``stage2.weight_decay`` above 0."""
    s2 = cfg.stage2
    if s2.weight_decay > 0:
        return torch.optim.AdamW(policy.parameters(), lr=s2.lr, weight_decay=s2.weight_decay)
    return torch.optim.Adam(policy.parameters(), lr=s2.lr)


def fit_policy(cfg: ExperimentConfig, policy: torch.nn.Module, train: PatchOutcomes,
               val: PatchOutcomes, cost: torch.Tensor, lam: float | None = None,
               epochs: int | None = None, on_epoch=None) -> tuple[dict, int]:
    """Train a fresh ``policy`` on cached outcomes in memory (no checkpoints) and return
    its best state (priced for routing, :func:`priced`) and that epoch (-1: untrained).

    ``lam`` and ``epochs`` default to stage 2's; ``on_epoch(epoch, val)`` is called after
    each epoch (progress bars). Used by the lam sweep and the ablation; ``train_policy``
    runs the same epochs with checkpoints and resume.
    """
    s2 = cfg.stage2
    lam = s2.lam if lam is None else lam
    epochs = s2.epochs if epochs is None else epochs
    device = next(policy.parameters()).device
    gain, val_gain = train.gain(s2.gain).to(device), val.gain(s2.gain).to(device)
    prepare(policy, train.state)
    opt = make_optimizer(policy, cfg)
    best, best_state, best_epoch = -float("inf"), priced(policy, lam, cost), -1
    train_in, val_states = inputs(policy, train.state), inputs(policy, val.state).to(device)
    for epoch in range(epochs):
        run_epoch(policy, opt, train_in, gain, cost, lam, s2.objective,
                  linear(*s2.alpha, epoch, epochs), s2.batch_size)
        check_finite(policy, f"stage 2 policy, epoch {epoch}", "stage2.lr")
        result = validate(policy, val_states, val_gain, val, cost, lam, s2.batch_size,
                          s2.objective)
        if result["score"] > best:
            best, best_state, best_epoch = result["score"], priced(policy, lam, cost), epoch
        if on_epoch is not None:
            on_epoch(epoch, result)
    return best_state, best_epoch


def train_policy(cfg: ExperimentConfig | None, run_dir: str | Path, resume: bool = False,
                 show_progress: bool = True) -> dict:
    """Run stage 2 into ``run_dir``; return the summary written to ``stage2.json``."""
    run_dir, cfg = prepare_run_dir(run_dir, cfg, resume)
    # the policy's MLPs regress gains of 1e-3 in 32-bit on the CPU, where bf16 pays for
    # convolutions only
    precision = "32-true" if resolve_device(cfg.device).type == "cpu" else None
    check_devices(cfg, precision)  # before anything is read or removed
    if not resume:
        drop_downstream(run_dir, "stage2")
        forget_progress(run_dir / "checkpoints" / "policy_last.pt")
    setup(cfg)
    s2 = cfg.stage2
    data = load_stage_data(cfg, progress=show_progress, run_dir=run_dir)
    dist = launch(cfg, precision)  # after the data is in place: the others only read it
    device = dist.device
    router = build_router(cfg, run_dir, device)
    costs = router.costs(*data.rl.images.shape[-2:])
    policy = router.policy
    ncls, batch = cfg.models.num_classes, s2.batch_size
    t0 = time.perf_counter()
    train_cache = training_outcomes(cfg, router, data, device)
    val_cache = PatchOutcomes.build(router, data.validation, ncls, batch, device)
    cache_seconds = time.perf_counter() - t0
    train_gain, val_gain = (c.gain(s2.gain).to(device) for c in (train_cache, val_cache))
    cost = costs.model_cost(s2.cost).to(device)
    prepare(policy, train_cache.state)
    train_in = inputs(policy, train_cache.state)
    opt = make_optimizer(policy, cfg)
    log = MetricLog(run_dir / "metrics" / "stage2.jsonl")
    last_path, best_path = run_dir / "checkpoints" / "policy_last.pt", run_dir / "checkpoints" / "policy.pt"
    start, best = 0, -float("inf")
    state = resume_state(last_path, resume, device, {"policy": policy, "optimizer": opt})
    if state is not None:
        start, best = state["epoch"] + 1, state["best"]
    if dist.is_main:
        log.truncate_after("policy", start - 1)
    wrapped, opt = dist.setup(policy, opt)
    val_states = inputs(policy, val_cache.state).to(device)
    f0_val = val_cache.miou(torch.zeros(val_gain.shape[:2], dtype=torch.long))
    train_seconds = 0.0
    with progress(show_progress and dist.is_main) as bar:
        task = bar.add_task("stage 2 policy", total=s2.epochs, completed=start, info="")
        for epoch in range(start, s2.epochs):
            tick = time.perf_counter()
            alpha = linear(*s2.alpha, epoch, s2.epochs)
            sums, counts = run_epoch(wrapped, opt, train_in, train_gain, cost, s2.lam,
                                     s2.objective, alpha, batch, dist)
            dist.sync_buffers(policy)
            check_finite(policy, f"stage 2 policy, epoch {epoch}", "stage2.lr")
            val = validate(policy, val_states, val_gain, val_cache, cost, s2.lam, batch,
                           s2.objective)
            if val["score"] > best:
                best = val["score"]
                if dist.is_main:
                    atomic_save({"policy": priced(policy, s2.lam, cost), "epoch": epoch,
                                 "val": val}, best_path)
            m = sums / counts.sum()
            record = {"stage": 2, "model": "policy", "epoch": epoch, "alpha": alpha,
                      "objective": s2.objective,
                      # reinforce: the reward of the actions taken; otherwise the loss
                      ("policy/reward" if s2.objective == "reinforce" else "policy/loss"):
                          m[0].item(),
                      "policy/reward_no_cost": m[1].item(), "policy/cost": m[2].item(),
                      "routing/fractions": (counts / counts.sum()).tolist(),
                      "val/reward": val["reward"], "val/miou": val["miou"],
                      "val/f0_miou": f0_val, "val/fractions": val["fractions"],
                      "seconds": time.perf_counter() - tick}
            if "loss" in val:
                record["val/loss"] = val["loss"]
            train_seconds += record["seconds"]
            if dist.is_main:
                log.end_epoch(record, {"policy": policy.state_dict(), "optimizer": opt.state_dict(),
                                       **rng_state(device), "epoch": epoch,
                                       "best": best}, last_path)
            head = (f"reward {m[0].item():+.4f}" if s2.objective == "reinforce"
                    else f"loss {m[0].item():.4f}")
            bar.update(task, advance=1, info=f"{head}  val mIoU {val['miou']:.3f} "
                       f"(f0 {f0_val:.3f})")
    if dist.is_main and not best_path.is_file():
        atomic_save({"policy": priced(policy, s2.lam, cost), "epoch": -1, "val": None},
                    best_path)
    dist.barrier()  # the others read what rank 0 wrote
    summary = {"stage": 2, "lam": s2.lam, "cost": s2.cost, "objective": s2.objective,
               "gain": s2.gain, "policy": s2.policy, "state": s2.state,
               "train_on": s2.train_on, "train_images": len(train_cache.state),
               "cache_seconds": cache_seconds, "train_seconds": train_seconds,
               "best_val": load_checkpoint(best_path)["val"],
               "val_f0_miou": f0_val, "costs": costs.to_dict()}
    if dist.is_main:
        atomic_write_text(json.dumps(summary, indent=2), run_dir / "stage2.json")
    return summary
