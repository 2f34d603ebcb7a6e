"""Budget calibration: one cost offset on the policy's logits that meets a compute budget.

The bias added to the policy's logits is ``-t * c``, with ``c[k]`` model k's GFLOP on
one patch divided by the largest model's (``c[0] = 0``: f0 has already run). Raising
``t`` can only move a patch to a cheaper model (the chosen action minimises
``t * c[k] - logit[k]``), so the mean GFLOP per image and the share of patches on the
largest model never increase with ``t``, and bisection finds the smallest ``t`` (the
most generous routing) that meets the budget. ``t < 0`` spends a budget above what the
policy uses on its own.

The logits are computed once on the validation split, batch by batch with the same
Monte Carlo seed as evaluation, so the routing the search predicts is exactly the one
:func:`paser.evaluation.evaluate_router` then measures with the bias.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from paser.cost import FLOP_CONVENTION
from paser.data import Tensors
from paser.errors import CheckpointError, ConfigError
from paser.evaluation import evaluate_router
from paser.routing import Router
from paser.train.common import atomic_write_text

FILE = "calibration.json"


@dataclass
class Calibration:
    """A calibrated bias and what it achieved on the validation split.

    ``bias`` [K+1] is added to the policy's logits; ``strength`` is ``t``; ``target`` is
    ``{"budget_gflops": x}`` or ``{"max_frac_large": f}`` (the share of patches on the
    most expensive model, fK); ``gflops`` (mean per image,
    :data:`paser.cost.FLOP_CONVENTION`), ``fractions`` (share of patches per model),
    ``miou`` are measured on ``images`` validation images of ``height x width`` with the
    bias; ``uncalibrated`` holds the same three without it.
    """

    bias: list[float]
    strength: float
    target: dict
    gflops: float
    fractions: list[float]
    miou: float
    uncalibrated: dict
    images: int
    height: int
    width: int
    policy: str = ""
    flop_convention: str = FLOP_CONVENTION

    def tensor(self) -> torch.Tensor:
        return torch.tensor(self.bias, dtype=torch.float32)

    def save(self, run_dir: str | Path) -> Path:
        path = Path(run_dir) / FILE
        atomic_write_text(json.dumps(asdict(self), indent=2), path)
        return path

    @classmethod
    def load(cls, run_dir: str | Path, policy: str) -> Calibration | None:
        """The run's saved calibration, or ``None`` when it has none; an error when it was
        made for another policy than the one of digest ``policy`` (``Router.policy_digest``;
        the run was trained again since)."""
        path = Path(run_dir) / FILE
        if not path.is_file():
            return None
        try:
            cal = cls(**json.loads(path.read_text()))
        except (json.JSONDecodeError, TypeError) as err:
            raise CheckpointError(f"{path}: not a calibration written by `paser calibrate` "
                                  f"({err}); delete it or run `paser calibrate` again") from None
        if cal.policy != policy:
            raise CheckpointError(f"{path}: made for another policy (the run was trained again "
                                  "since); run `paser calibrate` again or delete it")
        return cal


@torch.inference_mode()
def validation_logits(router: Router, data: Tensors, batch_size: int,
                      mc_seed: int = 0) -> torch.Tensor:
    """The policy's logits ``[N, P, K+1]`` on ``data``, batched and seeded as evaluation."""
    router.eval()
    device = next(router.parameters()).device
    out = []
    for images, _ in data.batches(batch_size):
        _, mc = router.look(images.to(device), mc_seed)
        out.append(router.policy(mc.state()).float().cpu())
    return torch.cat(out)


def calibrate(router: Router, data: Tensors, num_classes: int,
              budget_gflops: float | None = None, max_frac_large: float | None = None,
              batch_size: int = 16, iterations: int = 60) -> Calibration:
    """The bias that meets exactly one of ``budget_gflops`` (mean GFLOP per image on
    ``data``) or ``max_frac_large`` (share of patches on the largest model), as generously
    as the budget allows.

    Raises :class:`ConfigError` for a budget below the fixed cost every image pays (f0's
    T passes and the policy) or a share outside [0, 1].
    """
    if (budget_gflops is None) == (max_frac_large is None):
        raise ConfigError("give exactly one budget: --budget-gflops X or --max-frac-large F")
    h, w = data.images.shape[-2:]
    costs = router.costs(h, w)
    patch = torch.tensor(costs.patch, dtype=torch.float32)
    rel = patch / patch.max()
    if budget_gflops is not None:
        if budget_gflops < costs.fixed:
            raise ConfigError(
                f"--budget-gflops {budget_gflops:g} is below the {costs.fixed:.3f} GFLOP every "
                f"{h} x {w} image pays before any patch is routed (f0's {costs.mc_samples} "
                f"Monte Carlo passes {costs.f0_mc:.3f} + the policy {costs.policy:.3f}; "
                f"{FLOP_CONVENTION}); give at least that")
        target = {"budget_gflops": float(budget_gflops)}
        limit = float(budget_gflops)
    else:
        if not 0.0 <= max_frac_large <= 1.0:
            raise ConfigError(f"--max-frac-large {max_frac_large:g}: a share of patches, give "
                              "a value in [0, 1]")
        target = {"max_frac_large": float(max_frac_large)}
        limit = float(max_frac_large)

    logits = validation_logits(router, data, batch_size)
    largest = int(patch.argmax())  # fK, the most expensive model per patch

    def spent(t: float) -> float:
        actions = (logits + (-t * rel)).argmax(-1)
        if budget_gflops is not None:
            return float(costs.gflops(actions).mean())
        return float((actions == largest).double().mean())

    # beyond `reach` every patch takes the cheapest / the largest model whatever its logits
    gap = float((logits.amax(-1) - logits.amin(-1)).max()) + 1.0
    steps = rel.sort().values.diff()
    reach = gap / float(steps[steps > 0].min()) if (steps > 0).any() else 1.0
    lo, hi = -reach, reach
    if spent(lo) <= limit:  # even the most generous routing fits
        hi = lo
    else:
        for _ in range(iterations):  # invariant: spent(lo) > limit >= spent(hi)
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if spent(mid) <= limit else (mid, hi)
    bias = (-hi * rel + 0.0).tolist()  # + 0.0: no -0.0 for f0
    res = evaluate_router(router, data, num_classes, batch_size, bias=torch.tensor(bias))
    base = evaluate_router(router, data, num_classes, batch_size)
    return Calibration(bias=bias, strength=hi, target=target, gflops=res["gflops"],
                       fractions=res["fractions"], miou=res["miou"],
                       uncalibrated={k: base[k] for k in ("gflops", "fractions", "miou")},
                       images=res["images"], height=int(h), width=int(w),
                       policy=router.policy_digest)

