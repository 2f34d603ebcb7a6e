"""Budget calibration: one cost offset on the policy's logits that meets a target.

The bias added to the policy's logits is ``-t * c``, with ``c[k]`` model k's GFLOP on
one patch divided by the largest model's (``c[0] = 0``: f0 has already run). Raising
``t`` can only move a patch to a cheaper model (the chosen action minimises
``t * c[k] - logit[k]``), so the mean GFLOP per image and the share of patches on the
largest model never increase with ``t``, and bisection finds the smallest ``t`` (the
most generous routing) that meets the budget. ``t < 0`` spends a budget above what the
policy uses on its own. For a policy that predicts each model's gain (``stage2.objective
gain``), ``t`` is a price per GFLOP: a patch goes to a dearer model only where its
predicted gain pays for the extra GFLOP.

Targets on quality score every ``t`` of a dense sweep on the validation split exactly, from
every model's outcome on every validation patch (:class:`~paser.outcomes.PatchOutcomes`):
``iou_within_top=d`` takes the least GFLOP whose mIoU is within ``d`` of the best single
model's alone (f0, f1, ... or fK on every patch: on some data a dearer model scores less, and
the target must not then fall to a cheaper, worse one's), and
``budget_gflops`` with ``best_iou`` the best mIoU within the budget.

The logits are computed once on the validation split, batch by batch with the same
Monte Carlo seed as evaluation, so the routing the search predicts is exactly the one
:func:`paser.evaluation.evaluate_router` then measures with the bias.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from paser.cost import FLOP_CONVENTION, at_least
from paser.data import Tensors
from paser.data.tiles import source_images
from paser.errors import CheckpointError, ConfigError
from paser.evaluation import evaluate_router
from paser.outcomes import PatchOutcomes
from paser.routing import CostTable, Router
from paser.runtime import atomic_write_text, figure

FILE = "calibration.json"


@dataclass
class Calibration:
    """A calibrated bias and what it achieved on the validation split.

    ``bias`` [K+1] is added to the policy's logits; ``strength`` is ``t``; ``target`` is
    ``{"budget_gflops": x}`` (``"best_iou": true`` when the best validation mIoU within it
    was asked for, ``"budget_gflops_per_mp"`` when it was given per megapixel,
    ``"above_dearest"``: the GFLOP of every patch on fK, where the budget is more than
    that and bounds nothing), ``{"max_frac_large": f}`` (the share of patches on the most expensive
    model, fK) or ``{"iou_within_top": d, "top_miou": m, "top_model": "f1"}`` (the best
    single model's validation mIoU, and which model that is; ``"reached": false`` where no
    routing of the policy's comes that close, and the one of best mIoU is kept);
    ``gflops`` (mean per image,
    :data:`paser.cost.FLOP_CONVENTION`), ``fractions`` (share of patches per model),
    ``miou`` are measured on ``images`` validation images of ``height x width`` with the
    bias; ``uncalibrated`` holds the same three without it. ``tiles``: the validation
    images were cut into tiles of ``height x width`` (``data.tile``), and ``gflops`` and a
    budget are per tile (:attr:`per`). ``calibration.json`` gives GFLOP per megapixel beside
    (:meth:`per_megapixel`).
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
    tiles: bool = False

    def tensor(self) -> torch.Tensor:
        return torch.tensor(self.bias, dtype=torch.float32)

    @property
    def per(self) -> str:
        """What ``gflops`` and a budget are per: ``image``, or ``tile of 64 x 64``."""
        return f"tile of {self.height} x {self.width}" if self.tiles else "image"

    @property
    def megapixels(self) -> float:
        """Megapixels of one validation image (``height x width``)."""
        return self.height * self.width / 1e6

    def per_megapixel(self, gflops: float) -> float | None:
        """``gflops`` per image as GFLOP per megapixel of these images: comparable across
        image sizes (a 1,024 x 1,024 slice costs 64 of the demo's 128 x 128 images);
        ``None`` when their size is not known."""
        return gflops / self.megapixels if self.megapixels > 0 else None

    def describe_target(self) -> dict[str, str]:
        """The target's entries as text for a line of output (numbers as ``%g``)."""
        return {k: str(v).lower() if isinstance(v, bool) else
                f"{v:g}" if isinstance(v, (int, float)) else str(v)
                for k, v in self.target.items()}

    def target_text(self) -> str:
        """The target in words, for a line of output (:meth:`describe_target`'s keys; a
        budget above every patch on fK is a note of its own)."""
        t = self.target
        if "iou_within_top" in t:  # (a calibration of before 2026-12-03 names no model)
            best = ", ".join(([t["top_model"]] if "top_model" in t else [])
                             + ([f"validation mIoU {t['top_miou']:.4f}"] if "top_miou" in t
                                else []))
            text = (f"the least GFLOP within {t['iou_within_top']:g} mIoU of the best single "
                    "model" + (f" ({best})" if best else ""))
            if t.get("reached", True) or "top_miou" not in t:
                return text
            short = t["top_miou"] - self.miou
            return (text + f"; not met: the policy's routing comes within {short:.4f} of it at "
                    f"best (validation mIoU {self.miou:.4f}, kept), so ask for "
                    f"--iou-within-top {math.ceil(short * 1e4 - 1e-6) / 1e4:g} or more, or a "
                    "budget (--budget-gflops)")
        if "budget_gflops" in t:
            per_mp = t.get("budget_gflops_per_mp")
            return (f"a budget of {figure(t['budget_gflops'])} GFLOP per {self.per}"
                    + ("" if per_mp is None else f" ({figure(per_mp)} GFLOP per megapixel)")
                    + (", the best mIoU within it" if t.get("best_iou") else "")
                    + ("; more than every patch on the largest model costs "
                       f"({figure(t['above_dearest'])}): it bounds nothing"
                       if "above_dearest" in t else ""))
        if "max_frac_large" in t:
            return f"at most {t['max_frac_large']:.1%} of patches on the largest model"
        if "max_tvd" in t:
            return (f"routing within a total variation distance of {t['max_tvd']:g} of the "
                    f"policy's own ({t['tvd']:.3f} reached)")
        return ", ".join(f"{k} {v}" for k, v in self.describe_target().items())

    def save(self, run_dir: str | Path) -> Path:
        path = Path(run_dir) / FILE
        record = {**asdict(self), "gflops_per_megapixel": self.per_megapixel(self.gflops)}
        atomic_write_text(json.dumps(record, indent=2), path)
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
            record = json.loads(path.read_text())
            record.pop("gflops_per_megapixel", None)  # written beside, not a field
            cal = cls(**record)
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
        xp, mc = router.look(images.to(device), mc_seed)
        out.append(router.policy(router.state(xp, mc)).float().cpu())
    return torch.cat(out)


def price_sweep(logits: torch.Tensor, rel: torch.Tensor, points: int = 401
                ) -> torch.Tensor:
    """Strengths ``t`` [S] from "every patch on the largest model" to "every patch on f0"
    for logits ``[N, P, K+1]`` and relative costs ``rel`` [K+1] (0 for f0): ``points``
    spaced evenly in ``asinh(t)`` (dense near 0, where policies put their choices, and
    reaching the extremes), plus 0."""
    gap = float((logits.amax(-1) - logits.amin(-1)).max()) + 1.0
    steps = rel.sort().values.diff()
    reach = gap / float(steps[steps > 0].min()) if (steps > 0).any() else 1.0
    lo, hi = -math.asinh(reach * 1e3), math.asinh(reach * 1e3)
    ts = torch.sinh(torch.linspace(lo, hi, points, dtype=torch.float64)) / 1e3
    return torch.cat([ts, torch.zeros(1, dtype=torch.float64)]).sort().values


def sweep_actions(logits: torch.Tensor, rel: torch.Tensor, ts: torch.Tensor) -> torch.Tensor:
    """Actions ``[S, N, P]`` for each strength of ``ts`` [S]: ``argmax(logits - t * rel)``."""
    return (logits[None].double() - ts[:, None, None, None] * rel.double()).argmax(-1)


def check_budget(budget_gflops: float, costs: CostTable, height: int, width: int,
                 option: str, given: str, per_mp: bool = False, unit: str = "image") -> None:
    """Raise :class:`ConfigError` where ``budget_gflops`` is below what every ``height x
    width`` image (``unit``: tile, where they are tiles) pays before any patch is routed (f0
    and the policy: ``costs.fixed``); ``option`` names the setting as the user gave it,
    ``given`` its value as they gave it."""
    if budget_gflops >= costs.fixed:
        return
    passes = ("one pass" if costs.mc_samples == 1
              else f"{costs.mc_samples} Monte Carlo passes")
    raise ConfigError(
        f"{option} {given} is below the {at_least(costs.fixed)} GFLOP every "
        f"{height} x {width} {unit} pays before any patch is routed (f0's {passes} "
        f"{costs.f0_mc:.3f} + the policy {costs.policy:.3f}; {FLOP_CONVENTION}"
        + (f"; {at_least(costs.fixed / (height * width / 1e6))} GFLOP per megapixel"
           if per_mp else "") + "); give at least that")


def calibrate(router: Router, data: Tensors, num_classes: int,
              budget_gflops: float | None = None, max_frac_large: float | None = None,
              batch_size: int = 16, iterations: int = 60, iou_within_top: float | None = None,
              best_iou: bool = False, max_tvd: float | None = None,
              outcomes: PatchOutcomes | None = None,
              budget_gflops_per_mp: float | None = None) -> Calibration:
    """The bias that meets exactly one of ``budget_gflops`` (mean GFLOP per image on
    ``data``), ``budget_gflops_per_mp`` (the same per megapixel: it carries to images of any
    size, which pay for the tiles they are cut into, padding included), ``max_frac_large`` (share of patches on the largest model),
    ``iou_within_top`` (mIoU on ``data`` within this of the best single model's alone, at
    the least GFLOP) or
    ``max_tvd`` (the least GFLOP whose assignment distribution is within this total
    variation of the policy's own).

    A budget is spent as generously as it allows, or with ``best_iou`` at the setting of
    best mIoU within it. ``outcomes``: the split's :class:`PatchOutcomes`, built with
    ``mc_seed=0`` in batches of ``batch_size``, when the caller has them already (the quality
    targets need them). Raises :class:`ConfigError` for a budget below the fixed cost every
    image pays (f0's T passes and the policy) or a share outside [0, 1].
    """
    if best_iou and budget_gflops is None and budget_gflops_per_mp is None:
        raise ConfigError("--best-iou goes with --budget-gflops (the best mIoU within that "
                          "budget); the other targets fix the point themselves")
    if sum(v is not None for v in (budget_gflops, max_frac_large, iou_within_top,
                                   max_tvd, budget_gflops_per_mp)) != 1:
        raise ConfigError("give exactly one budget: --budget-gflops X, --budget-gflops-per-mp "
                          "Y, --max-frac-large F, --iou-within-top D or --max-tvd T")
    h, w = data.images.shape[-2:]
    # a tile's GFLOP where the images are cut into tiles, and a budget is per tile
    unit = "image" if source_images(data.ids) is None else "tile"
    costs = router.costs(h, w)
    patch = torch.tensor(costs.patch, dtype=torch.float32)
    rel = patch / patch.max()
    per_mp = budget_gflops_per_mp
    if per_mp is not None:
        if not math.isfinite(per_mp):
            raise ConfigError(f"--budget-gflops-per-mp {per_mp:g}: give a number of GFLOP "
                              "per megapixel")
        budget_gflops = per_mp * h * w / 1e6
    if budget_gflops is not None:
        option, given = (("--budget-gflops", f"{budget_gflops:g}") if per_mp is None else
                         ("--budget-gflops-per-mp", f"{per_mp:g} ({budget_gflops:.6g} GFLOP "
                          f"per validation {unit})"))
        if not math.isfinite(budget_gflops):
            raise ConfigError(f"--budget-gflops {budget_gflops:g}: give a number of GFLOP "
                              f"per {unit}")
        check_budget(budget_gflops, costs, h, w, option, given, per_mp=per_mp is not None,
                     unit=unit)
        target = {"budget_gflops": float(budget_gflops)}
        limit = float(budget_gflops)
    for option, value, what in (("max-frac-large", max_frac_large, "a share of patches"),
                                ("max-tvd", max_tvd, "a total variation distance"),
                                ("iou-within-top", iou_within_top, "an mIoU difference")):
        if value is not None and not 0.0 <= value <= 1.0:  # NaN too
            raise ConfigError(f"--{option} {value:g}: {what}, give a value in [0, 1]")
    if max_frac_large is not None:
        target = {"max_frac_large": float(max_frac_large)}
        limit = float(max_frac_large)

    logits = validation_logits(router, data, batch_size)
    largest = int(patch.argmax())  # fK, the most expensive model per patch

    def most_generous() -> float:
        """The least strength that meets the limit: the most generous routing within it."""
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
            # hi lies on a tie, where logits computed in batches of another size (last-bit
            # differences) flip a patch back over the budget; a little past it they do not,
            # and spending never grows with t
            hi += TIE_MARGIN * (1.0 + abs(hi))
        return hi

    if max_tvd is not None:
        strength, target = _by_tvd(logits, rel, costs, max_tvd)
    elif iou_within_top is not None or best_iou:
        outcomes = outcomes or PatchOutcomes.build(router, data, num_classes, batch_size,
                                                   next(router.parameters()).device, mc_seed=0)
        # with a budget, the plain call's routing is a candidate too: the best mIoU within
        # it is never below what the call without --best-iou gives
        strength, target = _by_quality(outcomes, logits, rel, costs, iou_within_top,
                                       budget_gflops, also=() if iou_within_top is not None
                                       else (most_generous(),))
    else:
        strength = most_generous()
    if budget_gflops is not None:
        if per_mp is not None:
            target["budget_gflops_per_mp"] = float(per_mp)
        dearest = costs.fixed + costs.num_patches * float(patch.max())
        if budget_gflops >= dearest:  # every patch on fK fits: the budget says nothing
            target["above_dearest"] = dearest
    bias = (-strength * rel + 0.0).tolist()  # + 0.0: no -0.0 for f0
    res = evaluate_router(router, data, num_classes, batch_size, bias=torch.tensor(bias))
    base = evaluate_router(router, data, num_classes, batch_size)
    return Calibration(bias=bias, strength=strength, target=target, gflops=res["gflops"],
                       fractions=res["fractions"], miou=res["miou"],
                       uncalibrated={k: base[k] for k in ("gflops", "fractions", "miou")},
                       images=res["images"], height=int(h), width=int(w),
                       policy=router.policy_digest, tiles=unit == "tile")


#: how far past the bisection's tie a budget's strength is set (relative)
TIE_MARGIN = 1e-4


def _by_tvd(logits: torch.Tensor, rel: torch.Tensor, costs, max_tvd: float
            ) -> tuple[float, dict]:
    """The cheapest swept strength ``t >= 0`` whose assignment distribution is within
    ``max_tvd`` of the policy's own (``t = 0``)."""
    ts = price_sweep(logits, rel)
    ts = ts[ts >= 0]
    actions = sweep_actions(logits, rel, ts)  # [S, N, P]
    k = logits.shape[-1]
    shares = torch.nn.functional.one_hot(actions, k).double().mean((1, 2))  # [S, K+1]
    own = shares[int((ts == 0).nonzero()[0, 0])]
    distance = 0.5 * (shares - own).abs().sum(-1)
    gflops = costs.gflops(actions).mean(-1)
    pick = torch.where(distance <= max_tvd + 1e-12, gflops, torch.inf).argmin()
    return float(ts[int(pick)]), {"max_tvd": float(max_tvd), "tvd": float(distance[int(pick)])}


def _by_quality(outcomes: PatchOutcomes, logits: torch.Tensor, rel: torch.Tensor, costs,
                iou_within_top: float | None, budget_gflops: float | None,
                also: Sequence[float] = ()) -> tuple[float, dict]:
    """The strength of a quality target, from an exact score of every swept strength and
    of the strengths ``also``."""
    ts = torch.cat([price_sweep(logits, rel), torch.tensor(also, dtype=torch.float64)])
    actions = sweep_actions(logits, rel, ts)
    miou = outcomes.miou_many(actions)
    gflops = costs.gflops(actions).mean(-1)
    if iou_within_top is not None:
        singles = outcomes.miou_many(torch.arange(logits.shape[-1])[:, None, None]
                                     .expand(-1, *logits.shape[:2]))  # [K+1] each model alone
        best = int(singles.argmax())
        top = float(singles[best])
        ok = miou >= top - iou_within_top - 1e-12
        target = {"iou_within_top": float(iou_within_top), "top_miou": top,
                  "top_model": f"f{best}"}
        # the least GFLOP that is close enough; else the best mIoU there is, and the target
        # says it was not met (the best model may be one the policy never routes to alone)
        if ok.any():
            pick = torch.where(ok, gflops, torch.inf).argmin()
        else:
            pick = miou.argmax()
            target["reached"] = False
    else:
        ok = gflops <= budget_gflops + 1e-9
        target = {"budget_gflops": float(budget_gflops), "best_iou": True}
        # the best mIoU within the budget, the cheaper of ties
        score = torch.where(ok, miou - 1e-9 * gflops / max(float(gflops.max()), 1e-12), -torch.inf)
        pick = score.argmax()
    return float(ts[int(pick)]), target
