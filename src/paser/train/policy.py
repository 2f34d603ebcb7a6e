"""Stage 2: train the routing policy by REINFORCE on D_rl; f0 and f1..fK are frozen.

Per patch p with action a_p (0 = keep f0's prediction, k = run f_k):

    R_p = (1 - lam) * (IoU(routed prediction on p) - IoU(f0 on p)) - lam * c(a_p)
    loss = -mean_p log pi(a_p | s) * R_p

with ``c`` the parameter ratio of paper Eq. 3 (or the FLOP ratio) and ``c(0) = 0``.
Exploration: per batch, with probability alpha the actions are sampled from the
policy, otherwise uniformly; alpha rises linearly over the stage.

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

from paser.config import ExperimentConfig
from paser.data import load_stage_data
from paser.errors import CheckpointError
from paser.models import RoutingPolicy
from paser.outcomes import PatchOutcomes
from paser.patches import PatchGrid
from paser.routing import Router
from paser.train.common import (
    MetricLog,
    atomic_save,
    atomic_write_text,
    load_checkpoint,
    prepare_run_dir,
    progress,
    setup,
)
from paser.train.distributed import Dist, launch
from paser.train.pretrain import load_trained, model_roles


def make_policy(cfg: ExperimentConfig, num_models: int) -> RoutingPolicy:
    """A fresh policy as the config describes it (grid, head, stride)."""
    rows, cols = cfg.grid
    return RoutingPolicy(rows * cols, num_models, head=cfg.stage2.head, grid=cfg.grid,
                         stride=cfg.stage2.stride)


def build_router(cfg: ExperimentConfig, run_dir: str | Path, device: torch.device,
                 policy_state: dict | None = None, pool_states: list[dict] | None = None
                 ) -> Router:
    """The stage-1 models (optionally with fine-tuned pool weights) and a policy."""
    grid = PatchGrid(*cfg.grid, halo=cfg.halo)
    roles = [role for role, _ in model_roles(cfg)]
    k = len(roles) - 1
    policy = make_policy(cfg, len(roles)).to(device)
    if pool_states is not None and len(pool_states) != k:
        raise CheckpointError(f"{run_dir}: the fine-tuned checkpoint holds a pool of K = "
                              f"{len(pool_states)} models, the config asks for K = {k}; use "
                              "the run's own config.yaml or re-run stages 1 to 3")
    if policy_state is not None:
        try:
            policy.load_state_dict(policy_state)
        except RuntimeError:
            raise CheckpointError(f"{run_dir}: the policy checkpoint does not fit the config's "
                                  f"{grid} grid and pool of K = {k} models (its head, or the "
                                  "grid, differs); use the run's own config.yaml or re-run "
                                  "stages 2 and 3") from None
    f0 = load_trained(run_dir, cfg, "f0", device)
    pool = [load_trained(run_dir, cfg, role, device) for role in roles[1:]]
    if pool_states is not None:
        for model, state in zip(pool, pool_states, strict=True):
            model.load_state_dict(state)
    return Router(f0, policy, pool, grid, cfg.mc_samples, cfg.models.in_channels).to(device)


def reward(patch_iou: torch.Tensor, actions: torch.Tensor, cost: torch.Tensor, lam: float
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-patch reward ``[B, P]``, with its IoU gain and cost parts.

    ``patch_iou`` [B, P, K+1], ``actions`` [B, P], ``cost`` [K+1] with ``cost[0] = 0``.
    """
    gain = patch_iou.gather(-1, actions[..., None])[..., 0] - patch_iou[..., 0]
    paid = cost.to(patch_iou.device)[actions]
    return (1 - lam) * gain - lam * paid, gain, paid


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


def explore(logits: torch.Tensor, alpha: float, rows: torch.Tensor, batch: int
            ) -> torch.Tensor:
    """With probability alpha sample the batch's actions from the policy, else uniformly.

    ``logits`` are the ``rows`` of a batch of ``batch`` states (all of them in one process;
    its share in data-parallel training): the random numbers are drawn for the whole
    batch, identically in every process, and the rows taken (Gumbel-max sampling), so the
    processes together explore exactly as one process does on the whole batch.
    """
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
    order = torch.randperm(len(states))
    sums = torch.zeros(3, dtype=torch.float64)
    counts = torch.zeros(patch_iou.shape[-1], dtype=torch.float64)
    for i in range(0, len(states), batch_size):
        idx = order[i:i + batch_size]
        if len(idx) < dist.world:  # every process needs a share
            continue
        rows = dist.shard(torch.arange(len(idx)))
        mine = idx[rows]
        with dist.autocast():
            logits = policy(states[mine].to(device)).float()  # [b, P, K+1]
        actions = explore(logits.detach(), alpha, rows, len(idx))
        r, gain, paid = reward(patch_iou[mine.to(device)], actions, cost, lam)
        log_prob = torch.distributions.Categorical(logits=logits).log_prob(actions)
        loss = -(log_prob * r).mean() * (len(mine) * dist.world / len(idx))  # the batch mean
        opt.zero_grad(set_to_none=True)
        dist.backward(loss)
        opt.step()
        sums += torch.stack([r.sum(), gain.sum(), paid.sum()]).detach().double().cpu()
        counts += torch.bincount(actions.reshape(-1), minlength=len(counts)).double().cpu()
    return dist.sum(sums), dist.sum(counts)


@torch.inference_mode()
def greedy_actions(policy: torch.nn.Module, states: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Argmax actions ``[N, P]`` of the policy in eval mode."""
    policy.eval()
    device = next(policy.parameters()).device
    return torch.cat([policy(states[i:i + batch_size].to(device)).argmax(-1)
                      for i in range(0, len(states), batch_size)])


def train_policy(cfg: ExperimentConfig | None, run_dir: str | Path, resume: bool = False,
                 show_progress: bool = True) -> dict:
    """Run stage 2 into ``run_dir``; return the summary written to ``stage2.json``."""
    run_dir, cfg = prepare_run_dir(run_dir, cfg, resume)
    setup(cfg)
    s2 = cfg.stage2
    data = load_stage_data(cfg, progress=show_progress)
    dist = launch(cfg)  # after the data is in place: the other processes only read it
    device = dist.device
    router = build_router(cfg, run_dir, device)
    costs = router.costs(*data.rl.images.shape[-2:])
    policy = router.policy
    ncls, batch = cfg.models.num_classes, s2.batch_size
    t0 = time.perf_counter()
    train_cache = PatchOutcomes.build(router, data.rl, ncls, batch, device)
    val_cache = PatchOutcomes.build(router, data.validation, ncls, batch, device)
    cache_seconds = time.perf_counter() - t0
    train_iou, val_iou = train_cache.patch_iou().to(device), val_cache.patch_iou().to(device)
    cost = costs.model_cost(s2.cost).to(device)
    opt = torch.optim.Adam(policy.parameters(), lr=s2.lr)
    log = MetricLog(run_dir / "metrics" / "stage2.jsonl")
    last_path, best_path = run_dir / "checkpoints" / "policy_last.pt", run_dir / "checkpoints" / "policy.pt"
    start, best = 0, -float("inf")
    if resume and last_path.is_file():
        state = load_checkpoint(last_path, device)
        policy.load_state_dict(state["policy"])
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        start, best = state["epoch"] + 1, state["best"]
    if dist.is_main:
        log.truncate_after("policy", start - 1)
    wrapped, opt = dist.setup(policy, opt)
    val_states = val_cache.state.to(device)
    f0_val = val_cache.miou(torch.zeros(val_iou.shape[:2], dtype=torch.long))
    with progress(show_progress and dist.is_main) as bar:
        task = bar.add_task("stage 2 policy", total=s2.epochs, completed=start, info="")
        for epoch in range(start, s2.epochs):
            tick = time.perf_counter()
            alpha = linear(*s2.alpha, epoch, s2.epochs)
            policy.train()
            sums, counts = policy_epoch(wrapped, opt, train_cache.state, train_iou, cost,
                                        s2.lam, alpha, batch, dist)
            dist.sync_buffers(policy)
            val = _validate(policy, val_states, val_iou, val_cache, cost, s2.lam, batch)
            if val["reward"] > best:
                best = val["reward"]
                if dist.is_main:
                    atomic_save({"policy": policy.state_dict(), "epoch": epoch, "val": val},
                                best_path)
            m = sums / counts.sum()
            record = {"stage": 2, "model": "policy", "epoch": epoch, "alpha": alpha,
                      "policy/reward": m[0].item(), "policy/reward_no_cost": m[1].item(),
                      "policy/cost": m[2].item(),
                      "routing/fractions": (counts / counts.sum()).tolist(),
                      "val/reward": val["reward"], "val/miou": val["miou"],
                      "val/f0_miou": f0_val, "val/fractions": val["fractions"],
                      "seconds": time.perf_counter() - tick}
            if dist.is_main:
                log.end_epoch(record, {"policy": policy.state_dict(), "optimizer": opt.state_dict(),
                                       "rng": torch.get_rng_state(), "epoch": epoch,
                                       "best": best}, last_path)
            bar.update(task, advance=1, info=f"reward {record['policy/reward']:+.4f}  "
                       f"val mIoU {val['miou']:.3f} (f0 {f0_val:.3f})")
    if dist.is_main and not best_path.is_file():
        atomic_save({"policy": policy.state_dict(), "epoch": -1, "val": None}, best_path)
    dist.barrier()  # the others read what rank 0 wrote
    summary = {"stage": 2, "lam": s2.lam, "cost": s2.cost, "cache_seconds": cache_seconds,
               "best_val": load_checkpoint(best_path)["val"],
               "val_f0_miou": f0_val, "costs": costs.to_dict()}
    if dist.is_main:
        atomic_write_text(json.dumps(summary, indent=2), run_dir / "stage2.json")
    return summary


@torch.inference_mode()
def _validate(policy: torch.nn.Module, states: torch.Tensor, patch_iou: torch.Tensor,
              cache: PatchOutcomes, cost: torch.Tensor, lam: float, batch: int) -> dict:
    """Greedy routing on the validation cache: mean reward, routed mIoU, fractions."""
    actions = greedy_actions(policy, states, batch)
    r, _, _ = reward(patch_iou, actions, cost, lam)
    return {"reward": r.mean().item(), "miou": cache.miou(actions.cpu()),
            "fractions": fractions(actions, patch_iou.shape[-1])}
