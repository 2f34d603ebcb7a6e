"""`make bench`: is PaSeR fast in seconds, not only in FLOPs? Measured side by side, one run.

At the battery-paper shapes (224 x 256 images, 4 x 4 patches, the three reference UNets
with untrained weights, T = 5 Monte Carlo passes), on CPU and on CUDA when present:

1. routed inference: the routing path (`Router`, what `PaSeR.segment` runs; f0, the
   policy, each pool model once on its patches) with a fixed mix of actions, for the
   shipped method (f0 once, the pooled policy) and the paper's (T = 5, the reference
   policy), against f2 on the whole image and against the IDK cascade with the same final
   assignment (every patch that ends at f2 also ran f1). ms per image, and the ratio of
   the wall-clock ratio to the GFLOP ratio (target: the shipped PaSeR's at most 1.25).
1a. the layout (CPU): each reference UNet on whole images with torch's ``instance_norm``
   in NCHW (what paser ran before), with paser's group-norm instance norm in NCHW, and with
   that in channels-last (``paser.runtime.place``, what paser runs).
1b. stage-1 training on the CPU at the demo's shapes (battery-quick's f0, f1 and f2; 128 x 128
   images, batch 2, f1 and f2 on 2 x 2 patches with their 8-pixel halo): images per second
   of a training step (forward, class-weighted loss, backward, Adam) in 32-bit channels-last
   (32-bit stage 1 before 2026-12-07), in 32-bit NCHW (what `auto` picks on a CPU without
   native bf16) and under bf16 autocast in NCHW (what `auto` picks on a CPU with
   AVX512-BF16 or AMX).
1c. the demo's test split (runs/demo): PaSeR's ms against the single models' frontier
   at equal IoU. 1d. `paser segment` end to end on 200 (up to 1,000) images: images per second.
1e. volumes (runs/demo): `paser segment` on a synthetic 16-bit TIFF volume of 1,024 x 1,024
   slices (each cut into the run's 128 x 128 tiles; by default each slice a mosaic of 8 x 8
   samples of 128 x 128, the data the demo trains on, `--volume-data generated` for one
   1,024 x 1,024 sample per slice), at 64 and at 256 slices, for PaSeR,
   f0, f1 and f2 alone, each in a fresh process: megavoxels per second with reading and
   writing, peak memory, mIoU against the generator's labels, and PaSeR's seconds per
   megavoxel against the single models' frontier at equal IoU (targets: peak under 2 GiB
   and the same at 64 and 256 slices; PaSeR at most the frontier's time).
1f. the Dask engine (runs/demo, `paser segment --scheduler`): a 16-bit volume generated at 1,024 x 1,024 (32
   slices by default) segmented here in one process, on a LocalCluster of one worker of 2
   threads and on one of 2 workers of 1 thread, on the same cores: megavoxels per second
   (cluster start and the workers' model loads apart), and whether the label volumes are
   byte-identical.
2. one stage-2 epoch: ours (REINFORCE on the states and per-patch IoUs cached once per
   stage by `PatchOutcomes`; the task models are frozen) against the loop of the paper's
   published code (f0's T passes, the policy and every pool model on each batch, then
   routing and IoU image by image, patch by patch in Python). Both are timed on a few
   batches and scaled to the epoch; the one-off cache is amortised over the paper's 200
   epochs (target: 20 x).
3. peak memory (max RSS of a fresh process) of evaluating 1,000 test images streamed
   from disk (target: under 2 GiB).
4. peak memory of stage 1 on the paper's 1,270 training images (one epoch of tiny
   models, so that the data, not the models, is what is measured), with the splits
   streamed from disk and held in memory, each in a fresh process.

Weights are untrained: time and memory do not depend on them, and the action mix is
fixed. The process runs as `paser` does, with glibc keeping freed memory for reuse
(`paser.runtime.keep_freed_memory`; PASER_SYSTEM_MALLOC=1 measures glibc's defaults).
Results: printed, and written to benchmarks/results/cpu.json. With CUDA present (or
``--device cuda``) only the inference and stage-2 parts run, on CUDA, into
cuda-bench.json (cuda.json holds ``make bench-gpu``'s measurements).
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from paser.baselines.routed import cascade_gflops
from paser.cost import FLOP_CONVENTION, gflops_per_sample
from paser.data import Tensors
from paser.metrics import predicted_classes, reward
from paser.models import PooledPolicy, RoutingPolicy, create_model
from paser.models.unet import InstanceNorm
from paser.outcomes import PatchOutcomes
from paser.patches import PatchGrid
from paser.routing import Router
from paser.runtime import atomic_write_text, keep_freed_memory, place
from paser.train.policy import policy_epoch
from paser.uncertainty import entropy, mc_dropout

H, W, GRID, T, CLASSES = 224, 256, (4, 4), 5, 3
MIX = (0.50, 0.35, 0.15)  # share of patches on f0, f1, f2
REFERENCE = ("unet_tiny", "unet_small", "unet_large")  # f0, f1, f2
EPOCHS = 200  # the paper's stage-2 epochs, over which one-off work is amortised
RL_IMAGES = 419  # D_rl of battery-paper: a third of 1,270 training images
#: the parts, in the order they run (``--only``); those in CPU_ONLY are skipped on CUDA
PARTS = ("inference", "layout", "train", "demo", "segment", "volume", "cluster", "stage2",
         "memory", "train-memory")
CPU_ONLY = {"layout", "train", "demo", "segment", "volume", "cluster", "memory",
            "train-memory"}
RESULTS = Path(__file__).parent / "results"
DATA = Path(__file__).parent / ".data"


def reference_router(device: torch.device, models: tuple[str, str, str] = REFERENCE
                     ) -> Router:
    """f0 unet_tiny, f1 unet_small, f2 unet_large (``models``; untrained, seeded), the
    reference policy, 4 x 4 patches without halo, T = 5."""
    torch.manual_seed(0)
    f0, *pool = (create_model(name, 1, CLASSES) for name in models)
    grid = PatchGrid(*GRID)
    policy = RoutingPolicy(grid.num_patches, 3, head="global")
    # as checkpoints.build_router places them: f0 (whole images) channels-last on CPU, the
    # pool (patches) in the default layout
    return Router(place(f0, device), policy, [m.to(device) for m in pool], grid, T, 1).to(
        device).eval()


def mixed_actions(images: int, patches: int, seed: int = 0) -> torch.Tensor:
    """Actions ``[images, patches]`` with exactly the MIX shares over the batch, shuffled."""
    n = images * patches
    counts = [round(s * n) for s in MIX[:-1]]
    flat = torch.cat([torch.full((c,), k) for k, c in enumerate(counts + [n - sum(counts)])])
    return flat[torch.randperm(n, generator=torch.Generator().manual_seed(seed))].view(
        images, patches)


class FixedPolicy(nn.Module):
    """The real policy runs (and is paid for); its logits are then overridden so that the
    greedy choice is the fixed mix of :func:`mixed_actions` (like for like)."""

    def __init__(self, policy: nn.Module):
        super().__init__()
        self.policy = policy

    def forward(self, state: torch.Tensor) -> torch.Tensor:
        logits = self.policy(state)
        actions = mixed_actions(*logits.shape[:2]).to(state.device)
        return logits + 1e4 * F.one_hot(actions, logits.shape[-1])


def fixed_mix_router(device: torch.device, models: tuple[str, str, str] = REFERENCE
                     ) -> Router:
    """:func:`reference_router` with its policy's choice fixed to the mix."""
    r = reference_router(device, models)
    return Router(r.f0, FixedPolicy(r.policy), list(r.pool), r.grid, T, 1).eval()


def shipped_router(device: torch.device) -> Router:
    """The shipped method's routing path at the same shapes and models, its choice fixed to
    the mix: f0 once, deterministically (``mc_dropout: none``, T = 1), and the pooled
    policy (5 MLPs on each patch's statistics of f0's prediction and entropy), as
    ``battery-quick`` trains it."""
    r = reference_router(device)
    policy = PooledPolicy(GRID, 3, 2, hidden=64, gain_head=True, members=5).to(device)
    return Router(r.f0, FixedPolicy(policy), list(r.pool), r.grid, 1, 1, "none").eval()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fns: dict, device: torch.device, repeats: int) -> dict[str, float]:
    """Median seconds of each ``fn()`` over ``repeats`` rounds after one untimed call.

    The functions take turns within each round, so a slow spell of a shared machine
    hits all of them alike instead of one."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


@torch.inference_mode()
def cascade_same_assignment(router: Router, x: torch.Tensor, actions: torch.Tensor):
    """The IDK cascade's work for a given final assignment: f0's T passes, then f1 on every
    patch that goes past f0, f2 on those that go past f1, entropies to decide."""
    grid = router.grid
    xp = grid.pad(x)
    mc = router.observe(xp, 0)
    patches = grid.context(xp)
    probs = grid.split(mc.probs).clone()
    entropy(probs).mean((-2, -1))  # the cascade's first decision, as it pays for it
    flat = actions.reshape(-1).to(x.device)
    for k in range(1, router.num_models):
        idx = (flat >= k).nonzero(as_tuple=True)[0]
        out = router.run_local(k, patches.index_select(0, idx))
        entropy(out).mean((-2, -1))  # and the next one
        probs.index_copy_(0, idx, out)
    return predicted_classes(grid.merge(probs))


#: The two routing paths measured: the shipped method and the paper's.
VARIANTS = {"PaSeR": shipped_router, "PaSeR (paper: T = 5)": fixed_mix_router}


def bench_inference(device: torch.device, batch: int, repeats: int) -> dict:
    """Both routing paths (:data:`VARIANTS`), f2 on the whole image and the cascade, and
    each PaSeR's parts alone on the same inputs, all in one interleaved timing."""
    routers = {name: make(device) for name, make in VARIANTS.items()}
    paper = routers["PaSeR (paper: T = 5)"]
    actions = mixed_actions(batch, paper.grid.num_patches)
    x = torch.rand(batch, 1, H, W, generator=torch.Generator().manual_seed(0)).to(device)
    f2 = paper.pool[-1]
    gflops = {"f2 (whole image)": gflops_per_sample(f2, 1, H, W)}
    runs = {"f2 (whole image)": lambda: predicted_classes(f2(x)),
            "IDK-Cascade (same assignment)": lambda: cascade_same_assignment(paper, x, actions)}
    gflops["IDK-Cascade (same assignment)"] = float(
        cascade_gflops(actions, paper.costs(H, W)).mean())
    parts: dict[str, dict[str, float]] = {}
    with torch.inference_mode():
        for name, router in routers.items():
            out = router(x, mc_seed=0)
            assert torch.equal(out.actions.cpu(), actions), f"{name}: the mix was not routed"
            costs = router.costs(H, W)
            gflops[name] = float(costs.gflops(actions).mean())
            runs[name] = partial(router, x, mc_seed=0)
            parts[name] = _parts(router, x, out, actions, costs, batch, runs)
    seconds = timed({name: _inference(fn) for name, fn in runs.items()}, device, repeats)
    top = "f2 (whole image)"
    rows = {}
    for name in gflops:
        wall = seconds[name] / seconds[top]
        flops = gflops[name] / gflops[top]
        rows[name] = {"ms_per_image": 1000 * seconds[name] / batch, "gflops": gflops[name],
                      "gflop_per_s": gflops[name] * batch / seconds[name],
                      "wall_ratio_to_f2": wall, "gflop_ratio_to_f2": flops,
                      "wall_over_gflop_ratio": wall / flops}
    profiles, floors = {}, {}
    for name, own in parts.items():
        profile = {part: {"ms_per_image": 1000 * seconds[key] / batch, "gflops": g,
                          "gflop_per_s": g * batch / seconds[key]}
                   for part, (key, g) in own.items()}
        spent = sum(seconds[key] for key, _ in own.values())
        profile["rest: PaSeR minus its parts (noisy)"] = {
            "ms_per_image": 1000 * (seconds[name] - spent) / batch, "gflops": 0.0,
            "gflop_per_s": 0.0}
        profiles[name] = profile
        # the ratio this PaSeR would reach with no overhead at all: its parts' own times
        floors[name] = spent / seconds[top] / (gflops[name] / gflops[top])
    return {"batch_size": batch, "repeats": repeats, "mix": list(MIX),
            "fractions": (torch.bincount(actions.reshape(-1), minlength=3) / actions.numel()
                          ).tolist(), "methods": rows, "paser_profile": profiles,
            "wall_over_gflop_ratio_without_overhead": floors,
            "target": "PaSeR (the shipped method) wall_over_gflop_ratio <= 1.25",
            "met": rows["PaSeR"]["wall_over_gflop_ratio"] <= 1.25}


def with_torch_instance_norm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with torch's ``nn.InstanceNorm2d`` for paser's group-norm one."""
    model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, InstanceNorm):
                setattr(parent, name, nn.InstanceNorm2d(child.num_features, eps=child.eps))
    return model


#: part 1a's layouts, the first the baseline of the ratios
LAYOUTS = {"instance_norm, NCHW": with_torch_instance_norm,
           "group norm, NCHW": lambda m: m,
           "group norm, channels-last": lambda m: place(copy.deepcopy(m), "cpu")}


def bench_layout(batch: int, repeats: int) -> dict:
    """Each reference UNet on ``batch`` whole images in each of :data:`LAYOUTS`, all in one
    interleaved timing."""
    x = torch.rand(batch, 1, H, W, generator=torch.Generator().manual_seed(0))
    runs, diffs = {}, {}
    torch.manual_seed(0)
    for role, name in (("f0", "unet_tiny"), ("f1", "unet_small"), ("f2", "unet_large")):
        model = create_model(name, 1, CLASSES).eval()
        with torch.inference_mode():
            ref = model(x)
            for layout, make in LAYOUTS.items():
                m = make(model)
                diffs[role, layout] = float((m(x) - ref).abs().max())
                runs[role, layout] = partial(m, x)
    seconds = timed({k: _inference(fn) for k, fn in runs.items()}, torch.device("cpu"),
                    repeats)
    base = next(iter(LAYOUTS))
    return {"batch_size": batch, "repeats": repeats, "image_size": [H, W],
            "models": {role: {layout: {
                "ms_per_image": 1000 * seconds[role, layout] / batch,
                "ratio_to_instance_norm_nchw": seconds[role, layout] / seconds[role, base],
                "max_abs_logit_difference": diffs[role, layout]} for layout in LAYOUTS}
                for role in ("f0", "f1", "f2")}}


#: ways to train stage 1 on the CPU: (precision, channels-last). Stage 1 trains NCHW, in bf16
#: where the CPU computes it natively and in 32-bit elsewhere; channels-last is what 32-bit
#: stage 1 used before (the first mode, which the ratios are to)
TRAIN_MODES = {"32-bit, channels-last": ("32-true", True), "32-bit, NCHW": ("32-true", False),
               "bf16, NCHW": ("bf16-mixed", False)}


def bench_train(batch: int, repeats: int, steps: int = 5) -> dict:
    """Images per second of ``steps`` stage-1 training steps of each battery-quick model in
    each of :data:`TRAIN_MODES`, in interleaved rounds (medians)."""
    from paser.checkpoints import build_model, model_roles
    from paser.config import load_config
    from paser.train.distributed import Dist, native_bf16
    from paser.train.pretrain import masked_ce, patchwise, whole_image

    cfg = load_config(preset="battery-quick")
    grid = PatchGrid(*cfg.grid, halo=cfg.halo)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 1, 128, 128, generator=gen)
    y = torch.randint(0, CLASSES, (batch, 128, 128), generator=gen)
    weight = torch.tensor(cfg.stage1.class_weights)
    cpu = torch.device("cpu")
    runs = {}
    for role, spec in model_roles(cfg):
        forward = whole_image if role == "f0" else patchwise(grid)
        for mode, (precision, channels_last) in TRAIN_MODES.items():
            torch.manual_seed(0)
            model = place(build_model(cfg, spec), cpu, channels_last=channels_last).train()
            opt = torch.optim.Adam(model.parameters(), lr=cfg.stage1.lr)
            dist = Dist(cpu, precision=precision)

            def train(model=model, opt=opt, dist=dist, forward=forward):
                for _ in range(steps):
                    with dist.autocast():
                        loss = masked_ce(forward(model, x).float(), y, weight)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
            runs[role, mode] = train
    seconds = timed(runs, cpu, repeats)
    return {"batch_size": batch, "steps": steps, "repeats": repeats, "image_size": [128, 128],
            "native_bf16": native_bf16(cpu),
            "models": {role: {mode: {"images_per_s": batch * steps / seconds[role, mode]}
                              for mode in TRAIN_MODES} for role, _ in model_roles(cfg)},
            "note": "without native bf16 (AVX512-BF16 or AMX) the CPU emulates it, and "
                    "`auto` keeps 32-bit"}


def _inference(fn):
    def run():
        with torch.inference_mode():
            fn()
    return run


def _parts(router: Router, x: torch.Tensor, out, actions: torch.Tensor, costs, batch: int,
           runs: dict) -> dict[str, tuple[str, float]]:
    """A routing path's parts as timed functions added to ``runs``: part -> (its key in
    ``runs``, GFLOP per image)."""
    tag = "paper" if router.mc_samples > 1 else "shipped"
    xp = router.grid.pad(x)
    state = router.state(xp, out.mc)
    patches = router.grid.context(xp)
    routed = [patches[actions.reshape(-1).to(x.device) == k] for k in (1, 2)]
    f0 = f"f0, {router.mc_samples} pass{'es' if router.mc_samples > 1 else ''}"
    own = {f0: (f"{tag}: f0", costs.f0_mc), "policy": (f"{tag}: policy", costs.policy),
           **{f"f{k} on its patches": (f"{tag}: f{k}", len(routed[k - 1]) * costs.patch[k]
                                       / batch) for k in (1, 2)}}
    runs[f"{tag}: f0"] = lambda: router.observe(xp, 0)
    runs[f"{tag}: policy"] = lambda: router.policy(state)
    for k in (1, 2):
        runs[f"{tag}: f{k}"] = partial(router.run_local, k, routed[k - 1])
    return own


def naive_stage2_batch(router: Router, opt, images: torch.Tensor, masks: torch.Tensor,
                       lam: float, cost: torch.Tensor) -> None:
    """One stage-2 batch as the paper's published code runs it: f0's T passes (each a full
    forward), the policy and every pool model, each on the whole batch; then, image by
    image and patch by patch in Python, the routed prediction and its IoU gain over f0."""
    grid, policy = router.grid, router.policy
    policy.train()
    with torch.no_grad():
        with mc_dropout(router.f0):
            probs = torch.stack([router.f0(images).softmax(1) for _ in range(T)]).mean(0)
        pred = predicted_classes(probs)
        preds = [pred] + [predicted_classes(model(images)) for model in router.pool]
    state = torch.stack([pred.float(), entropy(probs)], dim=1)
    dist = torch.distributions.Categorical(logits=policy(state))  # [B, P, K+1]
    actions = dist.sample()
    ph, pw = H // grid.rows, W // grid.cols
    rewards = torch.zeros(actions.shape)
    for i in range(len(images)):
        for p in range(grid.num_patches):
            r, c = divmod(p, grid.cols)
            sl = (i, slice(r * ph, (r + 1) * ph), slice(c * pw, (c + 1) * pw))
            a = int(actions[i, p])
            gain = _patch_iou(preds[a][sl], masks[sl]) - _patch_iou(pred[sl], masks[sl])
            rewards[i, p] = reward(gain, float(cost[a]), lam)
    loss = -(dist.log_prob(actions) * rewards.to(actions.device)).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


def _patch_iou(pred: torch.Tensor, label: torch.Tensor) -> float:
    values = []
    for c in range(CLASSES):
        union = int(((pred == c) | (label == c)).sum())
        if union:
            values.append(int(((pred == c) & (label == c)).sum()) / union)
    return sum(values) / len(values) if values else 0.0


def bench_stage2(device: torch.device, batch: int, rounds: int, cache_images: int,
                 ours_batches: int) -> dict:
    """Rounds of one loop batch then ``ours_batches`` of ours, medians per batch: a slow
    spell of a shared machine hits both alike."""
    router = reference_router(device)
    gen = torch.Generator().manual_seed(1)
    images = torch.rand(batch * rounds, 1, H, W, generator=gen)
    masks = torch.randint(0, CLASSES, (len(images), H, W), generator=gen)
    cost = router.costs(H, W).model_cost("params")
    batches_per_epoch = math.ceil(RL_IMAGES / batch)

    sub = Tensors(images[:cache_images], masks[:cache_images].byte(),
                  [str(i) for i in range(cache_images)])
    sync(device)
    start = time.perf_counter()
    cache = PatchOutcomes.build(router, sub, CLASSES, batch, device)
    sync(device)
    cache_per_image = (time.perf_counter() - start) / cache_images
    copies = math.ceil(batch * ours_batches / cache_images)
    states = cache.state.repeat(copies, 1, 1, 1)[:batch * ours_batches]
    iou = cache.patch_iou().repeat(copies, 1, 1)[:batch * ours_batches].to(device)
    policy = RoutingPolicy(router.grid.num_patches, 3, head="global").to(device)
    popt = torch.optim.Adam(policy.parameters(), lr=1e-4)
    opt = torch.optim.Adam(router.policy.parameters(), lr=1e-4)
    policy_epoch(policy, popt, states[:batch], iou[:batch], cost.to(device), 0.5, 0.7, batch)

    naive_times, ours_times = [], []
    for r in range(rounds):
        sl = slice(r * batch, (r + 1) * batch)
        sync(device)
        start = time.perf_counter()
        naive_stage2_batch(router, opt, images[sl].to(device), masks[sl].to(device), 0.5,
                           cost)
        sync(device)
        naive_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        policy_epoch(policy, popt, states, iou, cost.to(device), 0.5, 0.7, batch)
        sync(device)
        ours_times.append((time.perf_counter() - start) / ours_batches)
    naive_batch, ours_batch = statistics.median(naive_times), statistics.median(ours_times)

    naive_epoch = naive_batch * batches_per_epoch
    ours_epoch = ours_batch * batches_per_epoch
    cache_total = cache_per_image * RL_IMAGES
    amortised = ours_epoch + cache_total / EPOCHS
    return {"epoch_images": RL_IMAGES, "batch_size": batch,
            "naive": {"seconds_per_batch": naive_batch, "batches_timed": rounds,
                      "seconds_per_epoch": naive_epoch},
            "ours": {"seconds_per_batch": ours_batch, "batches_timed": rounds * ours_batches,
                     "seconds_per_epoch": ours_epoch,
                     "cache_seconds_per_image": cache_per_image,
                     "cache_images_timed": cache_images,
                     "cache_seconds_for_epoch_images": cache_total,
                     "seconds_per_epoch_amortised": amortised, "amortised_over": EPOCHS},
            "speedup": naive_epoch / ours_epoch,
            "speedup_amortised": naive_epoch / amortised,
            "target": "speedup_amortised >= 20", "met": naive_epoch / amortised >= 20,
            "cached": "per stage: f0's Monte Carlo state (one dropout draw per image) and every "
                      "pool model's per-patch intersection/union counts; the task models are "
                      "frozen in stage 2, so the rewards are the ones the loop computes, "
                      "except that the loop draws new dropout masks for f0 every epoch"}


def bench_demo(run_dir: Path, repeats: int) -> dict:
    """The demo's test split, as `make demo` left it in ``run_dir``: PaSeR at the run's
    operating point against f0 (one pass), f1 and f2 alone, ms per image timed side by side
    in interleaved rounds, and PaSeR's ms against the single models' frontier at equal IoU
    (:func:`paser.frontier.wall_clock`)."""
    from paser import PaSeR
    from paser import evaluation as E
    from paser.data import open_split, to_tensors
    from paser.frontier import wall_clock

    if not (run_dir / "results.json").is_file():
        return {"run_dir": str(run_dir), "skipped": "no finished run there: `make demo` first"}
    model = PaSeR.load(run_dir, device="cpu")
    router, cfg = model.router, model.config
    test = to_tensors(open_split(cfg.data, "test", progress=False))
    bias = None if model.calibration is None else model.calibration.tensor()
    predictors = {"PaSeR": E.paser_predictor(router, bias=bias),
                  "f0": E.f0_predictor(router, monte_carlo=cfg.mc_samples > 1),
                  **{f"f{k}": E.patch_model_predictor(router, k)
                     for k in range(1, router.num_models)}}
    batch = cfg.baselines.timing_batch
    device = torch.device("cpu")
    ious = {name: E.measure(p, test, cfg.models.num_classes, batch, device, timed=False)
            for name, p in predictors.items()}

    def whole_split(predict):
        def run():
            with torch.inference_mode():
                for i in range(0, len(test), batch):
                    x = test.images[i:i + batch]
                    predict(x, torch.arange(i, i + len(x)))
        return run

    seconds = timed({n: whole_split(p) for n, p in predictors.items()}, device, repeats)
    ms = {n: 1000 * t / len(test) for n, t in seconds.items()}
    rows = {n: {"ms_per_image": ms[n], "iou": ious[n]["iou"], "gflops": ious[n]["gflops"]}
            for n in predictors}
    result = wall_clock((ms["PaSeR"], ious["PaSeR"]["iou"]),
                        {n: (ms[n], ious[n]["iou"]) for n in predictors if n != "PaSeR"})
    return {"run_dir": str(run_dir), "images": len(test), "image_size": list(test.images.shape[-2:]),
            "batch_size": batch, "repeats": repeats,
            "operating_point": None if model.calibration is None else model.calibration.target,
            "methods": rows, **result,
            "target": "PaSeR's ms/image at most the single-model frontier's at equal IoU"}


def bench_segment(run_dir: Path, images: int, workers: int) -> dict:
    """``paser segment`` end to end, as a user runs it on a folder: the same ``images``
    synthetic images of 224 x 256 for PaSeR, f1 alone and f2 alone (``--model``), reading
    and writing included, one fresh process each; images per second."""
    if not (run_dir / "results.json").is_file():
        return {"run_dir": str(run_dir), "skipped": "no finished run there: `make demo` first"}
    # the memory part's 1,000 images (made once), the first ``images`` of them
    files = sorted((ensure_test_data(1000) / "test_images").glob("*.png"))[:images]
    rows = {}
    for name, extra in (("PaSeR", []), ("f1 alone", ["--model", "f1"]),
                        ("f2 alone", ["--model", "f2"])):
        with tempfile.TemporaryDirectory() as out:
            start = time.perf_counter()
            done = subprocess.run([sys.executable, "-m", "paser", "segment", *map(str, files),
                                   "--run-dir", str(run_dir), "--out", out, "--device", "cpu",
                                   "--workers", str(workers), *extra],
                                  capture_output=True, text=True)
            seconds = time.perf_counter() - start
            if done.returncode != 0:
                raise RuntimeError(f"paser segment ({name}) failed: {done.stderr[-2000:]}")
            with open(Path(out) / "summary.csv") as fh:
                summary = list(csv.DictReader(fh))
        ms = [float(r["ms"]) for r in summary if r["status"] == "ok"]
        gflops = [float(r["gflops"]) for r in summary if r["status"] == "ok"]
        rows[name] = {"seconds": seconds, "images_per_s": len(summary) / seconds,
                      "compute_ms_per_image": statistics.mean(ms),
                      "gflops_per_image": statistics.mean(gflops), "images": len(summary)}
    return {"run_dir": str(run_dir), "images": len(files), "image_size": [H, W],
            "workers": workers, "methods": rows,
            "note": "wall clock of the whole command (start-up, model load, reading, "
                    "routing, writing three PNGs and a JSON per image, summary.csv)"}


VOLUME_SIDE = 1024


VOLUME_DATA = ("mosaic", "generated")


def ensure_volume(depth: int, data: str = "mosaic") -> tuple[Path, Path]:
    """A 16-bit TIFF volume of ``depth`` synthetic 1,024 x 1,024 slices and its labels (class
    indices, uint8): 16 slices, repeated mirrored and turned (made once).

    ``mosaic``: each slice 8 x 8 samples of 128 x 128, the size the demo trains on, one per
    tile the demo's run routes, drawn from seeds none of its splits use: the kind of data
    the run was trained on. ``generated``: each slice one 1,024 x 1,024 sample; its
    128 x 128 tiles vary in composition far more than whole 128 x 128 samples (the generator
    fits the class fractions per image), so a run trained on the demo's images sees them as
    shifted data (docs/volumes.md)."""
    import numpy as np
    import tifffile

    from paser.data.battery import read_label
    from paser.data.synthetic import generate_dataset, generate_sample, sample_seed
    from paser.outcomes import view

    suffix = "" if data == "generated" else f"_{data}"
    path = DATA / f"volume_{depth}x{VOLUME_SIDE}{suffix}.tif"
    labels = path.with_name(path.stem + "_labels.npy")
    if path.is_file() and labels.is_file():
        return path, labels
    if data == "generated":
        root = DATA / f"battery_{VOLUME_SIDE}_16"
        if not (root / "stats.json").is_file():
            generate_dataset(root, n_train=1, n_val=1, n_test=16, height=VOLUME_SIDE,
                             width=VOLUME_SIDE, seed=0, progress=False)
        files = sorted((root / "test_images").glob("*.png"))
        from PIL import Image

        base = [np.asarray(Image.open(f)) for f in files]
        lab = [read_label(root / "test_label" / f.name).astype(np.uint8) for f in files]
    else:
        side, n = 128, VOLUME_SIDE // 128
        base, lab = [], []
        for s in range(16):  # split index 3: the demo's splits are 0, 1 and 2
            pairs = [generate_sample(side, side, sample_seed(0, 3, s * n * n + j))
                     for j in range(n * n)]
            for k, dest in enumerate((base, lab)):
                dest.append(np.stack([p[k] for p in pairs]).reshape(n, n, side, side)
                           .transpose(0, 2, 1, 3).reshape(VOLUME_SIDE, VOLUME_SIDE))
    # written under temporary names and renamed when whole: an interrupted bench leaves no
    # half volume that the next one would take for finished
    DATA.mkdir(parents=True, exist_ok=True)
    part, labels_part = (p.with_name(p.name + ".part") for p in (path, labels))
    out = np.lib.format.open_memmap(labels_part, "w+", np.uint8,
                                    (depth, VOLUME_SIDE, VOLUME_SIDE))
    with tifffile.TiffWriter(part, bigtiff=True) as tif:
        for z in range(depth):
            v = (z // len(base)) % 8
            img = view(torch.from_numpy(base[z % len(base)].copy()), v).numpy()
            tif.write(img.astype(np.uint16) * 257, photometric="minisblack", contiguous=True)
            out[z] = view(torch.from_numpy(lab[z % len(base)]), v).numpy()
    out.flush()
    del out
    labels_part.replace(labels)
    part.replace(path)
    return path, labels


def volume_child(run_dir: str, path: str, out: str, only: str) -> None:
    """In a fresh process: what `paser segment VOLUME` does (one volume, its labels written);
    print JSON."""
    from paser import PaSeR
    from paser.volumes import segment_volumes, split_inputs

    model = PaSeR.load(run_dir, device="cpu")
    k = None if only == "routed" else int(only[1:])
    start = time.perf_counter()
    [res] = segment_volumes(model, split_inputs([path])[1], out, only=k)
    if res.record is None:
        raise RuntimeError(res.error)
    print(json.dumps({"seconds": time.perf_counter() - start, "peak_rss_mib": peak_rss_kib() / 1024,
                      "gflops_per_slice": res.record["gflops_per_slice"],
                      "patch_share": res.record["patch_share"], "output": res.record["output"]}))


def bench_volume(run_dir: Path, depths: list[int], data: str = "mosaic") -> dict:
    import numpy as np
    import tifffile

    from paser import PaSeR
    from paser.metrics import IoUAccumulator

    if not (run_dir / "results.json").is_file():
        return {"run_dir": str(run_dir), "skipped": "no finished run there: `make demo` first"}
    model = PaSeR.load(run_dir, device="cpu")
    codec, ncls = model.label_codec, model.config.models.num_classes
    rows: dict = {}
    for depth in depths:
        path, labels = ensure_volume(depth, data)
        truth = np.load(labels, mmap_mode="r")
        for name, only in (("PaSeR", "routed"), ("f0 alone", "f0"), ("f1 alone", "f1"),
                           ("f2 alone", "f2")):
            with tempfile.TemporaryDirectory() as out:
                r = child(["--volume-child", str(run_dir), str(path), out, only],
                          f"volume {name}")
                acc = IoUAccumulator(ncls)
                with tifffile.TiffFile(Path(out) / r["output"]) as tif:
                    for z, page in enumerate(tif.pages):
                        pred = codec.decode(page.asarray(), "labels")
                        acc.update(torch.from_numpy(pred), torch.from_numpy(
                            truth[z].astype(np.int64)))
            mvox = depth * VOLUME_SIDE ** 2 / 1e6
            rows.setdefault(str(depth), {})[name] = {
                **r, "megavoxels": mvox, "megavoxels_per_s": mvox / r["seconds"],
                "s_per_megavoxel": r["seconds"] / mvox, "miou": acc.compute()["miou"]}
    result: dict = {"run_dir": str(run_dir), "data": data, "slice": [VOLUME_SIDE, VOLUME_SIDE],
                    "tile": list(model.tile or []), "depths": depths, "rows": rows}
    for depth, m in rows.items():
        result.setdefault("frontier", {})[depth] = volume_frontier(m)
    peaks = [rows[str(d)]["PaSeR"]["peak_rss_mib"] for d in depths]
    result["peak_rss_mib_paser"] = peaks
    result["target"] = ("peak under 2 GiB and the same at every depth; PaSeR's seconds per "
                        "megavoxel at most the frontier's at equal IoU")
    result["met_memory"] = max(peaks) < 2048 and max(peaks) < 1.1 * min(peaks)
    return result


def volume_frontier(rows: dict) -> dict:
    """PaSeR's seconds per megavoxel against the single models' frontier at its mIoU, for
    one depth's ``rows`` (method -> ``s_per_megavoxel``, ``miou``): the figures of
    :func:`paser.frontier.wall_clock`, under names that say their unit (its own say
    milliseconds, of an image)."""
    from paser.frontier import wall_clock

    wc = wall_clock((rows["PaSeR"]["s_per_megavoxel"], rows["PaSeR"]["miou"]),
                    {n: (v["s_per_megavoxel"], v["miou"]) for n, v in rows.items()
                     if n != "PaSeR"})
    return {"paser_s_per_megavoxel": wc["paser_ms"], "paser_miou": wc["paser_iou"],
            "frontier_s_per_megavoxel_at_equal_miou": wc["frontier_ms_at_equal_iou"],
            "ratio": wc["ratio"], "met": wc["met"]}


def bench_cluster(run_dir: Path, depth: int, layouts: list[tuple[int, int]], chunk: int
                  ) -> dict:
    """Part 1f (module doc)."""
    import tifffile

    from paser import PaSeR
    from paser.cluster import RunSpec, segment_on_cluster
    from paser.volumes import split_inputs

    try:
        import distributed
    except ImportError:
        return {"skipped": "Dask distributed is not installed: pip install 'paser[dask]'"}
    if not (run_dir / "results.json").is_file():
        return {"run_dir": str(run_dir), "skipped": "no finished run there: `make demo` first"}
    path, _ = ensure_volume(depth, "generated")
    mvox = depth * VOLUME_SIDE ** 2 / 1e6
    model = PaSeR.load(run_dir, device="cpu")
    rows: dict = {}
    with tempfile.TemporaryDirectory() as out:
        r = child(["--volume-child", str(run_dir), str(path), out, "routed"], "volume")
        here = tifffile.imread(Path(out) / r["output"])
        rows["here: 1 process"] = {"seconds": r["seconds"], "megavoxels_per_s": mvox / r["seconds"],
                                   "threads": torch.get_num_threads(), "voxels_differing": 0}
    for workers, threads in layouts:
        start = time.perf_counter()
        with distributed.LocalCluster(n_workers=workers, threads_per_worker=threads,
                                      processes=True, dashboard_address=None) as cluster, \
                distributed.Client(cluster) as client, tempfile.TemporaryDirectory() as out:
            started = time.perf_counter() - start
            spec = RunSpec(str(run_dir.resolve()), "cpu")
            client.run(_load_on_worker, spec)  # model loads apart, as for the process above
            tick = time.perf_counter()
            done = segment_on_cluster(client, spec, model, [], split_inputs([path])[1], out,
                                      chunk=chunk)
            seconds = time.perf_counter() - tick
            if done.volumes[0].record is None:
                raise RuntimeError(done.volumes[0].error)
            differ = int((tifffile.imread(Path(out) / done.volumes[0].record["output"])
                          != here).sum())
        rows[f"{workers} worker{'s' * (workers > 1)} x {threads} thread{'s' * (threads > 1)}"] = {
            "seconds": seconds, "megavoxels_per_s": mvox / seconds, "cluster_start_s": started,
            "workers": done.workers, "threads": threads, "voxels_differing": differ}
    return {"run_dir": str(run_dir), "slices": depth, "slice": [VOLUME_SIDE, VOLUME_SIDE],
            "chunk": chunk, "megavoxels": mvox, "cores": os.cpu_count(), "rows": rows,
            "note": "the process row is `paser segment` here (its torch threads); cluster "
                    "rows from the first task to the last label written, after the cluster "
                    "started and each worker loaded the run, each model call on the worker's "
                    "threads; voxels_differing: against the process row (other thread "
                    "counts add in another order; equal ones give identical labels)"}


def _load_on_worker(spec) -> None:
    from paser.cluster import worker_model

    worker_model(spec)


def ensure_test_data(images: int) -> Path:
    """1,000 synthetic test images of 224 x 256 on disk (made once, kept in .data)."""
    from paser.data.synthetic import generate_dataset

    root = DATA / f"battery_{H}x{W}_{images}"
    if not (root / "stats.json").is_file():
        generate_dataset(root, n_train=1, n_val=1, n_test=images, height=H, width=W, seed=0,
                         progress=False)
    return root


def child(argv: list[str], what: str) -> dict:
    """``bench.py ARGV`` in a fresh process: the JSON of the last line it prints. One that
    fails is a RuntimeError that names ``what`` and ends with the end of its stderr."""
    res = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{what} failed (exit status {res.returncode}): "
                           f"{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def peak_rss_kib() -> int:
    """This process's peak resident memory in KiB since it started (its exec).

    Linux's ``VmHWM``: ``ru_maxrss`` would also count what the parent had resident when it
    forked us, and the bench's parent keeps the heap of its stage-2 part (GiBs)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def memory_child(root: str, batch: int, workers: int) -> None:
    """In a fresh process: stream the test split through the shipped routing path (what
    `paser run` and `paser segment` evaluate); print JSON."""
    from paser.data import BatteryDataset
    from paser.evaluation import evaluate_router

    device = torch.device("cpu")
    router = shipped_router(device)
    data = BatteryDataset(root, "test")
    before = peak_rss_kib()
    start = time.perf_counter()
    res = evaluate_router(router, data, CLASSES, batch, num_workers=workers)
    seconds = time.perf_counter() - start
    peak = peak_rss_kib()
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(json.dumps({"images": res["images"], "seconds": seconds,
                      "peak_rss_mib": peak / 1024, "rss_before_eval_mib": before / 1024,
                      "peak_rss_worker_mib": children / 1024, "fractions": res["fractions"],
                      "gflops": res["gflops"]}))


def bench_memory(images: int, batch: int, workers: int) -> dict:
    root = ensure_test_data(images)
    res = child(["--memory-child", str(root), "--batch", str(batch), "--workers",
                 str(workers)], "memory")
    # each reader's peak at most the largest one's (the OS keeps only that, for children)
    total = res["peak_rss_mib"] + workers * res["peak_rss_worker_mib"]
    return {**res, "batch_size": batch, "workers": workers, "peak_total_mib": total,
            "target": "peak_total_mib < 2048", "met": total < 2048}


def train_memory_child(root: str, run_dir: str, stream: str, workers: int) -> None:
    """In a fresh process: stage 1, one epoch of tiny models at battery-paper's data size."""
    from paser.config import load_config
    from paser.train.pretrain import pretrain

    tiny = "{name: unet_tiny, kwargs: {c0: 2, widths: [2, 2]}}"
    cfg = load_config(preset="battery-paper", overrides=[
        f"data.root={root}", f"data.stream={stream}", f"data.workers={workers}",
        "stage1.epochs=1", f"models.f0={tiny}", f"models.pool=[{tiny}, {tiny}]"])
    start = time.perf_counter()
    pretrain(cfg, run_dir, show_progress=False)
    print(json.dumps({"seconds": time.perf_counter() - start, "peak_rss_mib": peak_rss_kib() / 1024,
                      "peak_rss_worker_mib": resource.getrusage(
                          resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))


def bench_train_memory(workers: int) -> dict:
    from paser.data.synthetic import generate_dataset

    root = DATA / f"battery_{H}x{W}_train1270"
    if not (root / "stats.json").is_file():
        generate_dataset(root, n_train=1270, n_val=20, n_test=40, height=H, width=W, seed=0,
                         progress=False)
    out = {"images": {"train": 1270, "validation": 20, "test": 40}, "workers": workers,
           "models": "three 2-channel unet_tiny, 1 epoch (the data is what is measured)"}
    for stream in ("never", "always"):
        run_dir = DATA / f"train_memory_{stream}"
        subprocess.run(["rm", "-rf", str(run_dir)], check=True)
        out[stream] = child(["--train-memory-child", str(root), str(run_dir), stream,
                             "--workers", str(workers)], f"train-memory ({stream})")
    out["peak_ratio_streamed_to_in_memory"] = (out["always"]["peak_rss_mib"]
                                               / out["never"]["peak_rss_mib"])
    return out


def positive(text: str, least: int = 1) -> int:
    """An argparse type: a whole number of at least 1 (a median of no rounds, a batch of no
    images or an epoch of no batches is not a measurement), or of at least ``least``."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"{value}: at least {least}")
    return value


def layout(text: str) -> tuple[int, int]:
    """An argparse type: a LocalCluster's WORKERSxTHREADS, each at least 1."""
    try:
        workers, threads = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not WORKERSxTHREADS, as 2x1") from None
    if min(workers, threads) < 1:
        raise argparse.ArgumentTypeError(f"{text}: at least 1 worker of 1 thread")
    return workers, threads


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=positive, default=8,
                    help="images per batch of the inference and memory parts")
    ap.add_argument("--repeats", type=positive, default=5,
                    help="timed rounds of the inference, train and demo parts (medians)")
    ap.add_argument("--rounds", type=positive, default=2,
                    help="stage 2: rounds of one loop batch and three of ours")
    ap.add_argument("--images", type=positive, default=1000, help="test images for the memory run")
    ap.add_argument("--workers", type=partial(positive, least=0), default=1,
                    help="reader processes of the memory part (train-memory: at least 2)")
    ap.add_argument("--only", choices=PARTS, action="append")
    ap.add_argument("--segment-images", type=positive, default=200,
                    help="images of the `paser segment` part (at most 1,000; 200 take "
                    "about 2 minutes)")
    ap.add_argument("--demo-run", type=Path, default=Path("runs/demo"),
                    help="the finished `make demo` run that parts demo, segment, volume "
                         "and cluster use (skipped without one)")
    ap.add_argument("--volume-slices", type=int, nargs="+", default=[64, 256],
                    help="depths of the volume part's synthetic 1,024 x 1,024 volumes (at "
                         "least 2 each: one page is an image, not a volume)")
    ap.add_argument("--volume-data", choices=VOLUME_DATA, default="mosaic",
                    help="the volume part's slices: mosaic (8 x 8 samples of the demo's "
                         "128 x 128 size, the data its run trained on) or generated (one "
                         "1,024 x 1,024 sample each: shifted data for that run)")
    ap.add_argument("--cluster-slices", type=positive, default=32,
                    help="depth of the Dask part's synthetic 1,024 x 1,024 volume "
                         "(at least 2)")
    ap.add_argument("--cluster-chunk", type=positive, default=16,
                    help="slices per task of the Dask part (paser segment --chunk)")
    ap.add_argument("--cluster-layouts", nargs="+", type=layout, default=[(1, 2), (2, 1)],
                    help="the Dask part's LocalClusters, WORKERSxTHREADS")
    ap.add_argument("--volume-child", nargs=4, help=argparse.SUPPRESS)
    ap.add_argument("--memory-child", help=argparse.SUPPRESS)
    ap.add_argument("--train-memory-child", nargs=3, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=None,
                    help="the results file; default benchmarks/results/cpu.json (checked "
                         "in), or <device>-bench.json on another device")
    args = ap.parse_args()
    if min(args.volume_slices) < 2:
        ap.error(f"--volume-slices {min(args.volume_slices)}: a volume has at least 2 slices")
    if args.cluster_slices < 2:
        ap.error(f"--cluster-slices {args.cluster_slices}: a volume has at least 2 slices")
    if args.segment_images > 1000:
        ap.error(f"--segment-images {args.segment_images}: at most 1000, the memory part's "
                 "images")
    freed_memory_kept = keep_freed_memory()  # what `paser` does in every stage and load
    if args.memory_child:
        memory_child(args.memory_child, args.batch, args.workers)
        return
    if args.volume_child:
        volume_child(*args.volume_child)
        return
    if args.train_memory_child:
        train_memory_child(*args.train_memory_child, args.workers)
        return
    try:
        device = torch.device(args.device)
    except RuntimeError:
        ap.error(f"--device {args.device}: not a torch device; cpu, or cuda where CUDA is present")
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: CUDA is not available here; --device cpu")
    parts = args.only or PARTS
    cpu_only = [part for part in args.only or () if part in CPU_ONLY]
    if device.type != "cpu" and cpu_only:
        ap.error(f"--only {' '.join(cpu_only)}: measured on the CPU only; add --device cpu")
    result = {"machine": platform.platform(), "processor": platform.processor(),
              "cpu_count": os.cpu_count(), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "device": str(device),
              "glibc_keeps_freed_memory": freed_memory_kept,
              "flop_convention": FLOP_CONVENTION,
              "shapes": {"image": [H, W], "grid": list(GRID), "mc_samples": T,
                         "models": ["unet_tiny", "unet_small", "unet_large"]}}
    runs = {"inference": (lambda: bench_inference(device, args.batch, args.repeats),
                          _print_inference),
            "layout": (lambda: bench_layout(2, 3), _print_layout),
            "train": (lambda: bench_train(2, args.repeats), _print_train),
            "demo": (lambda: bench_demo(args.demo_run, args.repeats), _print_demo),
            "segment": (lambda: bench_segment(args.demo_run, args.segment_images, 2),
                        _print_segment),
            "volume": (lambda: bench_volume(args.demo_run, args.volume_slices, args.volume_data),
                       _print_volume),
            "cluster": (lambda: bench_cluster(args.demo_run, args.cluster_slices,
                                              args.cluster_layouts, args.cluster_chunk),
                        _print_cluster),
            "stage2": (lambda: bench_stage2(device, 32, args.rounds, 16, 3), _print_stage2),
            "memory": (lambda: bench_memory(args.images, args.batch, args.workers),
                       _print_memory),
            "train-memory": (lambda: bench_train_memory(max(args.workers, 2)),
                             _print_train_memory)}
    # cuda.json is benchmarks/gpu.py's (make bench-gpu), another set of measurements
    path = args.out or RESULTS / ("cpu.json" if device.type == "cpu"
                                  else f"{device.type}-bench.json")
    try:
        last = json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError as e:
        ap.error(f"{path} is not a results file ({e}): restore it (git checkout) or move "
                 "it away, or --out another file")
    # each part's figures stand with the settings of the run that measured them: a part
    # re-measured now replaces its entry, the others keep theirs (a part skipped now, as the
    # demo's parts are without a finished demo run, does not wipe its last measurement)
    context = ("machine", "processor", "cpu_count", "torch", "threads", "device",
               "glibc_keeps_freed_memory")
    when = {key: result[key] for key in context} | {"date": time.strftime("%Y-%m-%d")}
    measured_with = {part: last.get("measured_with", {}).get(part)
                     # a file written before parts kept their own: its run's settings
                     or {key: last[key] for key in context if key in last}
                     for part in last.get("part_seconds", {}) if part in PARTS}
    seconds = {p: t for p, t in last.get("part_seconds", {}).items() if p in PARTS}
    t0 = time.perf_counter()
    measured, kept = {}, []
    for part in PARTS:
        if part in parts and (device.type == "cpu" or part not in CPU_ONLY):
            measure, show = runs[part]
            start = time.perf_counter()
            r = measure()
            show(r)
            key = part.replace("-", "_")
            if "skipped" in r and key in last and "skipped" not in last[key]:
                kept.append(part)
                continue
            measured[key] = r
            seconds[part] = measured_now = time.perf_counter() - start
            measured_with[part] = when
            # written after each part: a run stopped half way keeps what it measured
            out = {**{k: v for k, v in last.items() if k not in measured}, **result,
                   **measured, "measured_with": measured_with, "part_seconds": seconds,
                   # the whole bench at these figures: every part, as last measured
                   "seconds": sum(seconds.values())}
            # whole or not at all: a run stopped while writing keeps the file as it was
            atomic_write_text(json.dumps(out, indent=2), path)
            print(f"[{part}: {measured_now:.0f} s, written to {path}]", flush=True)
    print(f"\n{time.perf_counter() - t0:.0f} s ("
          + ", ".join(f"{p} {seconds[p]:.0f}" for p in PARTS
                      if p.replace("-", "_") in measured)
          + (f"); written to {path}" if measured else "); nothing new to write")
          + (f"; skipped now, their last results kept: {', '.join(kept)}" if kept else ""))


def _print_inference(r: dict) -> None:
    print(f"\n1. Routed inference, batch {r['batch_size']}, mix f0/f1/f2 "
          f"{' / '.join(f'{100 * f:.0f}' for f in r['fractions'])} % ({FLOP_CONVENTION})")
    print(f"{'method':<32}{'ms/image':>10}{'GFLOP':>9}{'wall/f2':>9}{'GFLOP/f2':>10}"
          f"{'wall:GFLOP':>11}")
    for name, m in r["methods"].items():
        print(f"{name:<32}{m['ms_per_image']:10.1f}{m['gflops']:9.2f}"
              f"{m['wall_ratio_to_f2']:9.3f}{m['gflop_ratio_to_f2']:10.3f}"
              f"{m['wall_over_gflop_ratio']:11.2f}")
    print(f"target {r['target']}: {'met' if r['met'] else 'NOT met'}")
    for variant, profile in r["paser_profile"].items():
        floor = r["wall_over_gflop_ratio_without_overhead"][variant]
        print(f"\nwhere {variant}'s time goes (each part alone on the same inputs; without "
              f"any overhead wall:GFLOP would be {floor:.2f})")
        print(f"{'part':<40}{'ms/image':>10}{'GFLOP':>9}{'GFLOP/s':>9}")
        for name, m in profile.items():
            print(f"{name:<40}{m['ms_per_image']:10.1f}{m['gflops']:9.2f}"
                  f"{m['gflop_per_s']:9.1f}")
    f2 = r["methods"]["f2 (whole image)"]
    print(f"{'f2 (whole image), for comparison':<40}{f2['ms_per_image']:10.1f}"
          f"{f2['gflops']:9.2f}{f2['gflop_per_s']:9.1f}")


def _print_layout(r: dict) -> None:
    print(f"\n1a. Layout: whole images of {r['image_size'][0]} x {r['image_size'][1]}, batch "
          f"{r['batch_size']}; ms per image (ratio to instance_norm, NCHW; max |logit "
          "difference|)")
    print(f"{'model':<6}" + "".join(f"{layout:>28}" for layout in LAYOUTS))
    for role, layouts in r["models"].items():
        print(f"{role:<6}" + "".join(
            f"{m['ms_per_image']:9.1f} ({m['ratio_to_instance_norm_nchw']:.2f}; "
            f"{m['max_abs_logit_difference']:.0e})".rjust(28) for m in layouts.values()))


def _print_train(r: dict) -> None:
    print(f"\n1b. Stage-1 training steps, demo models, batch {r['batch_size']} of "
          f"{r['image_size'][0]} x {r['image_size'][1]}; images per second (native bf16: "
          f"{r['native_bf16']})")
    modes = next(iter(r["models"].values()))  # as measured (an older file has two)
    print(f"{'model':<6}" + "".join(f"{mode:>24}" for mode in modes) + "  (ratio to the first)")
    for role, modes in r["models"].items():
        ips = [m["images_per_s"] for m in modes.values()]
        print(f"{role:<6}" + "".join(f"{v:15.1f} ({v / ips[0]:.2f} x)" for v in ips))


def _print_demo(r: dict) -> None:
    print(f"\n1c. The demo's test split ({r['run_dir']})")
    if "skipped" in r:
        print(f"skipped: {r['skipped']}")
        return
    print(f"{r['images']} images of {r['image_size'][0]} x {r['image_size'][1]}, batch "
          f"{r['batch_size']}, PaSeR at {r['operating_point']}")
    print(f"{'method':<10}{'ms/image':>10}{'mIoU':>9}{'GFLOP':>9}")
    for name, m in r["methods"].items():
        print(f"{name:<10}{m['ms_per_image']:10.2f}{m['iou']:9.4f}{m['gflops']:9.3f}")
    need = r["frontier_ms_at_equal_iou"]
    print("single-model frontier at PaSeR's IoU: "
          + ("no single model reaches it" if need is None else f"{need:.2f} ms per image")
          + f"; target {r['target']}: {'met' if r['met'] else 'NOT met'}")


def _print_segment(r: dict) -> None:
    print(f"\n1d. `paser segment` on {r['images']} images of {H} x {W} ({r['run_dir']})")
    if "skipped" in r:
        print(f"skipped: {r['skipped']}")
        return
    print(f"{'method':<10}{'images/s':>10}{'s':>8}{'compute ms':>12}{'GFLOP':>9}")
    for name, m in r["methods"].items():
        print(f"{name:<10}{m['images_per_s']:10.1f}{m['seconds']:8.1f}"
              f"{m['compute_ms_per_image']:12.1f}{m['gflops_per_image']:9.3f}")


def _print_volume(r: dict) -> None:
    if "skipped" in r:
        print(f"\n1e. volumes: skipped ({r['skipped']})")
        return
    print(f"\n1e. `paser segment` on 16-bit TIFF volumes of {r['slice'][0]} x {r['slice'][1]} "
          f"slices ({r.get('data', 'generated')}; tiles {r['tile']}), reading and writing "
          "included")
    print(f"{'slices':>7} {'method':<10}{'Mvox/s':>8}{'s':>8}{'peak MiB':>10}{'mIoU':>8}"
          f"{'GFLOP/slice':>12}")
    for depth, m in r["rows"].items():
        for name, v in m.items():
            print(f"{depth:>7} {name:<10}{v['megavoxels_per_s']:8.2f}{v['seconds']:8.1f}"
                  f"{v['peak_rss_mib']:10.0f}{v['miou']:8.4f}{v['gflops_per_slice']:12.2f}")
        f = r["frontier"][depth]
        need = f["frontier_s_per_megavoxel_at_equal_miou"]
        print(f"        PaSeR {f['paser_s_per_megavoxel']:.3f} s/Mvox against the frontier's "
              + ("(none reaches its IoU)" if need is None else f"{need:.3f} at equal IoU")
              + f": {'met' if f['met'] else 'missed'}")
    print(f"        peak memory {' / '.join(f'{p:.0f}' for p in r['peak_rss_mib_paser'])} MiB "
          f"at {' / '.join(map(str, r['depths']))} slices: "
          f"{'met' if r['met_memory'] else 'missed'}")


def _print_cluster(r: dict) -> None:
    if "skipped" in r:
        print(f"\n1f. Dask: skipped ({r['skipped']})")
        return
    print(f"\n1f. `paser segment` on a 16-bit volume of {r['slices']} x {r['slice'][0]} x "
          f"{r['slice'][1]} ({r['megavoxels']:.0f} megavoxels) on {r['cores']} cores")
    print(f"{'':<24}{'Mvox/s':>8}{'s':>8}{'start s':>9}  voxels differing from 1 process")
    for name, v in r["rows"].items():
        start = v.get("cluster_start_s")
        print(f"{name:<24}{v['megavoxels_per_s']:8.2f}{v['seconds']:8.1f}"
              f"{'' if start is None else f'{start:.1f}':>9}  {v['voxels_differing']:,} of "
              f"{r['megavoxels'] * 1e6:,.0f}")


def _print_stage2(r: dict) -> None:
    n, o = r["naive"], r["ours"]
    print(f"\n2. Stage-2 epoch ({r['epoch_images']} images, batch {r['batch_size']})")
    print(f"paper's loop: {n['seconds_per_batch']:.1f} s/batch -> {n['seconds_per_epoch']:.0f} s "
          f"per epoch ({n['batches_timed']} batches timed)")
    print(f"ours: {o['seconds_per_batch']:.2f} s/batch -> {o['seconds_per_epoch']:.1f} s per "
          f"epoch; cache {o['cache_seconds_per_image']:.2f} s/image -> "
          f"{o['cache_seconds_for_epoch_images']:.0f} s once, "
          f"{o['seconds_per_epoch_amortised']:.1f} s/epoch amortised over {o['amortised_over']}")
    print(f"speed-up {r['speedup']:.1f} x, amortised {r['speedup_amortised']:.1f} x; "
          f"target {r['target']}: {'met' if r['met'] else 'NOT met'}")


def _print_memory(r: dict) -> None:
    print(f"\n3. Evaluation of {r['images']} test images streamed from disk (batch "
          f"{r['batch_size']}, {r['workers']} reader process{'es' * (r['workers'] > 1)}): "
          f"{r['seconds']:.0f} s, peak RSS {r['peak_rss_mib']:.0f} MiB (+ "
          f"{r['workers']} x reader {r['peak_rss_worker_mib']:.0f} MiB) = "
          f"{r['peak_total_mib']:.0f} MiB; target {r['target']}: "
          f"{'met' if r['met'] else 'NOT met'}")


def _print_train_memory(r: dict) -> None:
    print(f"\n4. Stage 1 on {r['images']['train']} training images of {H} x {W} ({r['models']})")
    for stream, what in (("never", "in memory"), ("always", f"streamed, {r['workers']} readers")):
        m = r[stream]
        print(f"{what:<24} {m['seconds']:6.0f} s, peak RSS {m['peak_rss_mib']:6.0f} MiB "
              f"(largest child process {m['peak_rss_worker_mib']:.0f} MiB, pages shared "
              "with the parent by fork included)")
    print(f"streamed / in memory, peak RSS of the training process: "
          f"{r['peak_ratio_streamed_to_in_memory']:.2f}")


if __name__ == "__main__":
    main()
