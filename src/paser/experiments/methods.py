"""Every method of the paper's Table 1 as a predictor for the one evaluation loop,
:func:`paser.evaluation.measure`: the routing path's own (PaSeR, fixed actions, f0, a pool
model alone; from :mod:`paser.evaluation`) and the baselines' (the IDK cascade, monolithic
models on the whole image, MatPhase), measured by the same code on the same test split.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from paser.baselines.monolithic import MatPhase, padded_gflops, whole_padded
from paser.baselines.routed import CascadeFit, cascade_forward
from paser.evaluation import (
    FirstBatches,
    Prediction,
    Predictor,
    f0_predictor,
    fixed_actions_predictor,
    measure,
    paser_predictor,
    patch_model_predictor,
    time_in_turns,
)
from paser.metrics import predicted_classes
from paser.routing import Router


def cascade_predictor(router: Router, fit: CascadeFit, mc_seed: int = 0) -> Predictor:
    """The IDK cascade at the thresholds of ``fit``, run for real (:func:`cascade_forward`)."""
    def predict(x, idx):
        pred, actions, gflops = cascade_forward(router, x, fit.taus, mc_seed)
        return Prediction(pred, gflops, actions)
    return predict


def _whole(segment: Callable[[torch.Tensor], torch.Tensor],
           gflops_at: Callable[[int, int], float]) -> Predictor:
    """A method with the same cost for every image of a size: ``segment(x)`` gives the
    prediction, ``gflops_at(h, w)`` its cost, counted once per size."""
    cache: dict[tuple[int, int], float] = {}

    def predict(x, idx):
        h, w = x.shape[-2:]
        if (h, w) not in cache:
            cache[h, w] = gflops_at(h, w)
        return Prediction(segment(x), torch.full((x.shape[0],), cache[h, w]))
    return predict


def whole_image_predictor(model: nn.Module, in_channels: int) -> Predictor:
    """A monolithic model on the whole image (padded to a multiple of 32, cropped back)."""
    return _whole(lambda x: predicted_classes(whole_padded(model, x)),
                  lambda h, w: padded_gflops(model, in_channels, h, w))


def matphase_predictor(model: MatPhase, in_channels: int) -> Predictor:
    """MatPhase: every member and the fusion CNN on the whole image."""
    return _whole(model, lambda h, w: model.gflops(in_channels, h, w))


__all__ = ["FirstBatches", "Prediction", "Predictor", "cascade_predictor", "f0_predictor",
           "fixed_actions_predictor", "matphase_predictor", "measure",
           "paser_predictor", "patch_model_predictor", "time_in_turns",
           "whole_image_predictor"]
