"""The one inference path: f0 with Monte Carlo dropout -> policy -> patches dispatched to
the chosen models, one batched call per model -> stitched prediction, actions, GFLOP.

Used by policy training, fine-tuning, evaluation, the CLI and the API. Everything is
vectorised over images and patches: the only Python loop is over the K pool models.
"""

from __future__ import annotations

import hashlib
import threading
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from paser.cost import FLOP_CONVENTION, at_least, gflops_per_sample
from paser.errors import ConfigError, DataError
from paser.metrics import predicted_classes
from paser.patches import PatchGrid
from paser.uncertainty import (
    Dropout,
    MCOutput,
    NotBatchFirst,
    Signal,
    StateKind,
    mc_predict,
    one_mask_per_image,
    seeded,
    shares_masks,
    state_channels,
)

Mode = Literal["greedy", "sample"]

#: On the CPU a pool model runs on at most this many pixels (its patches with their halo)
#: at a time (:meth:`Router.run_local`), so that the memory a batch takes does not grow with
#: the number of its patches routed to one model. On the demo's 1,024 x 1,024 volume slices
#: (8 tiles at a time, 32 patches of 80 x 80) the peak fell by 118 to 204 MiB, at the same
#: speed within the bench's noise (docs/volumes.md).
CPU_CHUNK_PIXELS = 2 ** 16

#: seeded draws use the process's generators (forked and seeded, then put back) and change
#: f0's dropout modules while they last: one at a time, from whichever thread
_SEEDED = threading.Lock()


@dataclass
class CostTable:
    """Cost of every part of the routed pipeline for one image size.

    GFLOP use :data:`paser.cost.FLOP_CONVENTION` (a multiply-add counts 2).

    Attributes:
        f0_pass: GFLOP of one f0 pass on the whole (padded) image.
        mc_samples: T, f0 passes per image.
        f0_shared: GFLOP of f0's layers before its first active dropout, which are the
            same in every pass and run once for all T (``UNet.mc_probs``; with
            ``mc_dropout=last`` the decoder up to the last dropout too); 0 for other
            models.
        policy: GFLOP of the policy on one state.
        patch: GFLOP of each model on one patch (with its halo of context, if the grid has
            one), ``[K+1]``; entry 0 is 0 because action 0 reuses f0's prediction.
        params: parameters of f0..fK, ``[K+1]``.
        num_patches: P, patches per image.
    """

    f0_pass: float
    mc_samples: int
    policy: float
    patch: list[float]
    params: list[int]
    num_patches: int
    f0_shared: float = 0.0

    @classmethod
    def measure(cls, f0: nn.Module, policy: nn.Module, pool: list[nn.Module], grid: PatchGrid,
                in_channels: int, height: int, width: int, mc_samples: int,
                state_channels: int = 2, mc_dropout: Dropout = "all") -> CostTable:
        """Count FLOPs at the padded size of a ``height x width`` image; the policy on a
        state of ``state_channels``."""
        hp, wp = grid.padded_size(height, width)
        ph, pw = hp // grid.rows + 2 * grid.halo, wp // grid.cols + 2 * grid.halo
        shares = hasattr(f0, "shared") and mc_dropout != "none" and mc_samples > 1
        return cls(
            f0_pass=gflops_per_sample(f0, in_channels, hp, wp),
            mc_samples=mc_samples,
            policy=gflops_per_sample(policy, state_channels, hp, wp),
            patch=[0.0] + [gflops_per_sample(m, in_channels, ph, pw) for m in pool],
            # every parameter, frozen or not: paper Eq. 3's params(f_m) is the model's size,
            # and a router frozen for inference (requires_grad_(False)) counted 0 for every
            # model, so c(m) = 0 / 0 = NaN in every reward, cascade fit and evaluation
            params=[sum(p.numel() for p in m.parameters()) for m in (f0, *pool)],
            num_patches=grid.num_patches,
            f0_shared=(gflops_per_sample(_Shared(f0, mc_dropout == "last"), in_channels, hp, wp)
                       if shares else 0.0),
        )

    @property
    def f0_mc(self) -> float:
        """GFLOP of f0's T Monte Carlo passes as they run: the shared layers once."""
        return self.f0_pass * self.mc_samples - self.f0_shared * (self.mc_samples - 1)

    @property
    def fixed(self) -> float:
        """GFLOP every image pays: f0's T passes and the policy."""
        return self.f0_mc + self.policy

    def gflops(self, actions: torch.Tensor, policy: bool = True) -> torch.Tensor:
        """GFLOP per image ``[B]`` for actions ``[B, P]``; ``policy=False`` when the actions
        did not come from the policy (given, random, oracle), which then did not run."""
        per_patch = torch.tensor(self.patch, dtype=torch.float64, device=actions.device)
        fixed = self.fixed if policy else self.fixed - self.policy
        return fixed + per_patch[actions].sum(-1)

    def model_cost(self, kind: Literal["params", "flops"] = "params") -> torch.Tensor:
        """Reward cost ``c(m)`` of each action ``[K+1]``; f0 always runs, so ``c(0) = 0``.

        ``params``: paper Eq. 3, ``params(f_m) / sum of params over f0..fK``.
        ``flops``: ``GFLOP(f_m on a patch) / sum over f0..fK``, with f0's share of a patch
        being one pass divided by the number of patches.
        """
        if kind == "params":
            values = torch.tensor(self.params, dtype=torch.float64)
        else:
            values = torch.tensor(self.patch, dtype=torch.float64)
            values[0] = self.f0_pass / self.num_patches
        cost = values / values.sum()
        cost[0] = 0.0
        return cost.float()

    def to_dict(self) -> dict:
        return {"flop_convention": FLOP_CONVENTION, "f0_pass": self.f0_pass,
                "mc_samples": self.mc_samples, "policy": self.policy, "patch": self.patch,
                "params": self.params, "num_patches": self.num_patches, "f0_shared": self.f0_shared,
                "f0_mc": self.f0_mc, "fixed": self.fixed}


def weights_digest(module: nn.Module) -> str:
    """SHA-256 of a module's weights (names and values): which weights these are."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def model_digests(router: Router) -> dict[str, str]:
    """Each model's :func:`weights_digest`, f0 and f1..fK: what an export was made from,
    checked when it is loaded with a run, and what made a ``paser segment`` output folder."""
    return {"f0": weights_digest(router.f0),
            **{f"f{k}": weights_digest(m) for k, m in enumerate(router.pool, start=1)}}


class _Shared(nn.Module):
    """What a UNet's Monte Carlo passes share (``UNet.shared``) as a module, to count its
    FLOPs."""

    def __init__(self, model: nn.Module, last_only: bool):
        super().__init__()
        self.model, self.last_only = model, last_only

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.model.shared(x, self.last_only)


def patch_logits(model: nn.Module, grid: PatchGrid, patches: torch.Tensor) -> torch.Tensor:
    """A patch model's logits on patches with their halo ``[N, C, h + 2 halo, w + 2 halo]``,
    halo cropped: ``[N, Kc, h, w]``. Every run of a pool model on patches comes here."""
    return grid.centre(model(patches))


def patchwise_logits(model: nn.Module, grid: PatchGrid, x: torch.Tensor) -> torch.Tensor:
    """A patch model on every patch of a batch ``[B, C, H, W]`` (padded to the grid, each
    patch with its halo), its logits stitched back and cropped: ``[B, Kc, H, W]``."""
    h, w = x.shape[-2:]
    return grid.crop(grid.merge(patch_logits(model, grid, grid.context(grid.pad(x)))), h, w)


@dataclass
class RoutingOutput:
    """What routing returns for a batch of B images of H x W with P patches, K+1 models.

    ``mask`` [B, H, W] stitched prediction; ``probs`` [B, C, H, W] class probabilities;
    ``actions`` [B, P] chosen model per patch (0 = f0); ``gflops`` [B] per image;
    ``logits`` [B, P, K+1] policy logits (``None`` when the actions were given);
    ``mc`` f0's Monte Carlo output (padded size; ``None`` for a pool model alone,
    :meth:`Router.alone`); ``degraded`` [B, P] patches whose model
    could not run (a remote tier that failed, :mod:`paser.serve`), which kept f0's
    prediction and are not paid for in ``gflops`` (``None``: every model ran).
    """

    mask: torch.Tensor
    probs: torch.Tensor
    actions: torch.Tensor
    gflops: torch.Tensor
    logits: torch.Tensor | None
    mc: MCOutput | None
    degraded: torch.Tensor | None = None


class Router(nn.Module):
    """f0 + policy + pool (f1..fK) on a patch grid: the PaSeR inference path.

    ``mc_samples`` (T) and ``mc_dropout`` say how f0 looks (:func:`paser.uncertainty.mc_predict`);
    ``signal`` and ``state`` what the policy sees (:meth:`paser.uncertainty.MCOutput.state`;
    ``num_classes`` sizes it).
    """

    def __init__(self, f0: nn.Module, policy: nn.Module, pool: list[nn.Module], grid: PatchGrid,
                 mc_samples: int, in_channels: int = 1, mc_dropout: Dropout = "all",
                 signal: Signal = "entropy", state: StateKind = "paper", num_classes: int = 3):
        super().__init__()
        self.f0, self.policy, self.pool = f0, policy, nn.ModuleList(pool)
        self.grid, self.mc_samples, self.in_channels = grid, mc_samples, in_channels
        self.mc_dropout, self.signal, self.state_kind = mc_dropout, signal, state
        self.num_classes = num_classes
        self._costs: dict[tuple[int, int], CostTable] = {}
        #: where f1..fK run when set: a :class:`paser.serve.client.RemotePool` (the edge /
        #: cloud split)
        self.remote = None
        #: a folder where :meth:`paser.outcomes.PatchOutcomes.build` keeps the pool's
        #: outcomes on a split, named by the pool's weights and the data (``None``: not kept)
        self.outcome_cache: str | Path | None = None
        #: GFLOP per megapixel no image (or tile) routed by the policy may exceed
        #: (:meth:`capped`; ``None``: no cap)
        self.cap_per_mp: float | None = None
        #: a JSON file where the cost tables of the sizes counted are kept for the next
        #: process, named by the models' structure (:meth:`costs`; ``None``: not kept)
        self.cost_cache: str | Path | None = None

    def costs(self, height: int, width: int) -> CostTable:
        """The cost table for ``height x width`` images: counted once per size, and kept in
        ``cost_cache`` where it is set, from which later processes read it. Counting runs
        the models under PyTorch's FLOP counter, whose first use loads ``torch._dynamo``
        (3 s at the start of every ``paser segment`` on 2 cores); a run's sizes are
        counted once."""
        key = self.grid.padded_size(height, width)
        if key not in self._costs:
            kept, name = self._kept_costs()
            size = f"{key[0]}x{key[1]}"
            try:  # a table of other fields (written by another version of paser) is counted
                self._costs[key] = CostTable(**kept[name][size])
            except (KeyError, TypeError):
                self._costs[key] = CostTable.measure(
                    self.f0, self.policy, list(self.pool), self.grid, self.in_channels,
                    height, width, self.mc_samples, self.state_channels, self.mc_dropout)
                self._keep_costs(kept, name, size, self._costs[key])
        return self._costs[key]

    def _structure(self) -> str:
        """What a cost table depends on: each model's structure (its modules' settings as
        PyTorch prints them, and its parameters' shapes, not their values), the grid, the
        inputs, f0's passes and the counting's torch version."""
        import json

        h = hashlib.sha1(json.dumps([
            [self.grid.rows, self.grid.cols, self.grid.halo], self.in_channels, self.mc_samples,
            self.state_channels, self.mc_dropout, torch.__version__]).encode())
        for model in (self.f0, self.policy, *self.pool):
            h.update(repr(model).encode())
            h.update(repr([tuple(p.shape) for p in model.parameters()]).encode())
        return h.hexdigest()[:20]

    def _kept_costs(self) -> tuple[dict, str]:
        """The tables in ``cost_cache`` (by structure, then size) and this router's name
        there; none where no file is set, or it cannot be read."""
        import json

        if self.cost_cache is None or self.remote is not None:
            return {}, ""
        try:
            kept = json.loads(Path(self.cost_cache).read_text())
        except (OSError, ValueError):
            kept = {}
        return (kept if isinstance(kept, dict) else {}), self._structure()

    def _keep_costs(self, kept: dict, name: str, size: str, table: CostTable) -> None:
        """Add ``table`` to ``cost_cache``, beside the tables of the 7 structures written
        last (a run and its PaSeR (paper) share the file; models trained again leave
        theirs); nothing where it cannot be written."""
        import dataclasses
        import json

        from paser.runtime import atomic_write_text

        if not name:
            return
        others = [(k, v) for k, v in kept.items() if k != name and isinstance(v, dict)][-7:]
        try:
            atomic_write_text(json.dumps({**dict(others), name: {
                **kept.get(name, {}), size: dataclasses.asdict(table)}}), self.cost_cache)
        except OSError:
            pass

    @property
    def state_channels(self) -> int:
        """Channels of the policy's input."""
        return state_channels(self.state_kind, self.in_channels, self.num_classes)

    @property
    def policy_digest(self) -> str:
        """SHA-256 of the policy's weights: which policy a calibration belongs to."""
        return weights_digest(self.policy)

    @property
    def num_models(self) -> int:
        """K + 1."""
        return len(self.pool) + 1

    def observe(self, x: torch.Tensor, mc_seed: int | None = None) -> MCOutput:
        """f0's Monte Carlo output on a padded batch ``[B, C, Hp, Wp]``; ``mc_seed`` fixes
        the dropout masks (see :meth:`forward`), each image's from the seed alone, so that
        an image gets the same answer in any batch (one image at a time, as ``paser
        segment`` runs, or with others, as evaluation and the API do)."""
        drawn = mc_seed is not None and self.mc_dropout != "none"
        if drawn and len(x) > 1:
            if shares_masks(self.f0):
                try:
                    with _SEEDED, seeded(mc_seed, x.device), \
                            one_mask_per_image(self.f0, len(x), self.mc_samples):
                        return mc_predict(self.f0, x, self.mc_samples, self.mc_dropout)
                except NotBatchFirst:
                    pass
            # a dropout of another kind, or on other than the batch: an image at a time
            each = [self.observe(x[i:i + 1], mc_seed) for i in range(len(x))]
            return MCOutput(*(torch.cat(part) for part in
                              zip(*((o.probs, o.pred, o.entropy) for o in each), strict=True)))
        # without dropout nothing is drawn: no generator to fork and seed (0.5 ms a call)
        with _SEEDED if drawn else nullcontext(), seeded(mc_seed if drawn else None, x.device):
            return mc_predict(self.f0, x, self.mc_samples, self.mc_dropout)

    def state(self, xp: torch.Tensor, mc: MCOutput) -> torch.Tensor:
        """The policy's input for a padded batch ``xp`` and f0's output on it."""
        return mc.state(self.state_kind, xp, self.signal)

    def look(self, x: torch.Tensor, mc_seed: int | None = None) -> tuple[torch.Tensor, MCOutput]:
        """A batch ``[B, C, H, W]`` padded to the grid, and f0's Monte Carlo output on it."""
        xp = self.grid.pad(x)
        return xp, self.observe(xp, mc_seed)

    def choose(self, logits: torch.Tensor, mode: Mode = "greedy") -> torch.Tensor:
        """Actions ``[B, P]`` from logits ``[B, P, K+1]``: argmax, or a sample."""
        if mode == "greedy":
            return logits.argmax(-1)
        if mode != "sample":
            raise ConfigError(f"routing mode '{mode}': use greedy or sample")
        return torch.distributions.Categorical(logits=logits).sample()

    def capped(self, logits: torch.Tensor, actions: torch.Tensor, height: int, width: int,
               inside: torch.Tensor | None = None) -> torch.Tensor:
        """``actions`` [B, P] with every image held to :attr:`cap_per_mp` GFLOP per
        megapixel of its ``height x width``: an image over it is routed again with a price
        of its own on each model's GFLOP, ``argmax(logits - price * GFLOP(k) / GFLOP(fK))``,
        the least price (bisection, 40 steps) that fits. A higher price never picks a
        dearer model, so the patches that leave a dear model are those the policy valued
        least per GFLOP; images within the cap keep their actions. ``inside`` [B, P]: the
        patches that hold image pixels (the others stay on f0). A cap under what every
        image pays before routing (f0 and the policy) is a :class:`DataError`."""
        costs = self.costs(height, width)
        limit = self.cap_per_mp * height * width / 1e6
        room = limit - costs.fixed  # what the patches may spend
        if room < -1e-9:
            raise DataError(
                f"a cap of {self.cap_per_mp:.8g} GFLOP per megapixel is {limit:.8g} GFLOP for a "
                f"{height} x {width} image, under the {costs.fixed:.8g} it pays before any "
                f"patch is routed (f0 and the policy; "
                f"{at_least(costs.fixed / (height * width / 1e6))} per megapixel at this "
                "size); give at least that")
        patch = torch.tensor(costs.patch, dtype=torch.float64, device=actions.device)
        over = patch[actions].sum(-1) > room + 1e-9
        if not over.any():
            return actions
        scores = logits[over].double()
        rel = (patch / patch.max()).to(scores)
        outside = None if inside is None else ~inside.to(actions.device).expand_as(actions)[over]
        # at this price every model but f0 loses to f0 on every patch
        lo = torch.zeros(len(scores), dtype=torch.float64, device=scores.device)
        hi = torch.full_like(lo, float(scores.max() - scores.min()) / float(
            rel[1:].min().clamp_min(1e-12)) + 1.0)

        def route(price: torch.Tensor) -> torch.Tensor:
            chosen = (scores - price[:, None, None] * rel).argmax(-1)
            return chosen if outside is None else chosen.masked_fill(outside, 0)

        for _ in range(40):
            mid = (lo + hi) / 2
            fits = patch[route(mid)].sum(-1) <= room + 1e-9
            hi, lo = torch.where(fits, mid, hi), torch.where(fits, lo, mid)
        actions = actions.clone()
        actions[over] = route(hi)
        return actions

    def pool_logits(self, k: int, patches: torch.Tensor) -> torch.Tensor:
        """Logits ``[N, Kc, h, w]`` of pool model ``k`` (1..K) on patches with their halo
        ``[N, C, h + 2 halo, w + 2 halo]``, halo cropped (gradients flow: stage 3 trains
        through it)."""
        return patch_logits(self.pool[k - 1], self.grid, patches)

    def run_local(self, k: int, patches: torch.Tensor) -> torch.Tensor:
        """Class probabilities ``[N, Kc, h, w]`` of pool model ``k`` on patches with their
        halo (:meth:`pool_logits`, softmax): what routing, the outcomes, the cascade and
        ``paser serve`` run; on the CPU, :data:`CPU_CHUNK_PIXELS` at a time."""
        n, _, h, w = patches.shape
        step = n if patches.device.type != "cpu" else max(1, CPU_CHUNK_PIXELS // (h * w))
        if n <= step:  # one chunk (or none): no split, no copy by torch.cat
            return self.pool_logits(k, patches).float().softmax(1)
        return torch.cat([self.pool_logits(k, part).float().softmax(1)
                          for part in patches.split(step)])

    def dispatch(self, x: torch.Tensor, base_probs: torch.Tensor, actions: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Replace f0's probabilities on each routed patch by its model's.

        ``x`` [B, C, Hp, Wp] padded images, ``base_probs`` [B, Kc, Hp, Wp] f0's mean
        probabilities, ``actions`` [B, P]. Returns probabilities [B, Kc, Hp, Wp] and the
        degraded patches [B, P] (``None`` when every model ran). Each model runs once, on
        all the patches routed to it (gather, forward, scatter); with :attr:`remote` set,
        on the remote tier, asked once for every model (the images travel once), where
        ``None`` back for a model means it failed and its patches keep f0's.
        """
        remote = self.remote
        # [B*P, C, h + 2 halo, w + 2 halo]; a remote tier cuts its own from x
        patches = None if remote is not None else self.grid.context(x)
        out = self.grid.split(base_probs).clone()  # [B*P, Kc, h, w]
        flat = actions.reshape(-1)
        routed = {k: idx for k in range(1, self.num_models)
                  if (idx := (flat == k).nonzero(as_tuple=True)[0]).numel()}
        answers = remote.run(x, routed) if remote is not None and routed else {}
        degraded = None
        for k, idx in routed.items():
            probs = (answers[k] if remote is not None
                     else self.run_local(k, patches.index_select(0, idx)))
            if probs is None:
                if degraded is None:
                    degraded = torch.zeros_like(flat, dtype=torch.bool)
                degraded[idx] = True
            else:
                out.index_copy_(0, idx, probs.to(out))
        return self.grid.merge(out), None if degraded is None else degraded.view_as(actions)

    def _inside(self, h: int, w: int, inside: torch.Tensor | None) -> torch.Tensor | None:
        """``inside`` as given, else the patches of an ``h x w`` image that hold its pixels;
        ``None``: all of them (only fixed-size patches reach wholly past an image)."""
        if inside is None and self.grid.patch is not None:
            return self.grid.inside(h, w)
        return inside

    def alone(self, k: int, x: torch.Tensor, mc_seed: int | None = 0,
              inside: torch.Tensor | None = None) -> RoutingOutput:
        """One model alone on a batch ``[B, C, H, W]``, no policy: f0 as routing sees it
        (its T passes) for ``k = 0``, pool model ``k`` on every patch that holds image
        pixels otherwise (``inside``, as :meth:`forward` takes it; padding past the image
        is left out and not paid for, as routing leaves it; f0 does not run, ``mc`` is
        ``None``). GFLOP are what that model alone costs."""
        if not 0 <= k < self.num_models:
            raise ConfigError(f"model f{k}: this run has f0..f{self.num_models - 1}")
        h, w = x.shape[-2:]
        costs = self.costs(h, w)
        b, num = x.shape[0], self.grid.num_patches
        inside = self._inside(h, w, inside)
        run = (torch.ones(b, num, dtype=torch.bool) if inside is None
               else inside.cpu().expand(b, num))
        actions = torch.zeros(b, num, dtype=torch.long).masked_fill(run, k).to(x.device)
        if k == 0:
            xp, mc = self.look(x, mc_seed)
            probs, gflops = mc.probs, torch.full((b,), costs.f0_mc, dtype=torch.float64)
        else:
            mc, gflops = None, costs.patch[k] * run.sum(-1).double()
            patches = self.grid.context(self.grid.pad(x))  # [B*P, C, ...]
            idx = run.reshape(-1).nonzero(as_tuple=True)[0].to(x.device)
            if len(idx) == len(patches):
                out = self.run_local(k, patches)
            else:  # the patches of padding alone: none of the model's pixels is seen
                done = self.run_local(k, patches.index_select(0, idx))
                out = done.new_zeros(len(patches), *done.shape[1:]).index_copy_(0, idx, done)
            probs = self.grid.merge(out)
        probs = self.grid.crop(probs, h, w)
        return RoutingOutput(predicted_classes(probs), probs, actions, gflops, None, mc)

    def forward(self, x: torch.Tensor, mode: Mode = "greedy", actions: torch.Tensor | None = None,
                bias: torch.Tensor | None = None, mc_seed: int | None = None,
                inside: torch.Tensor | None = None) -> RoutingOutput:
        """Route a batch ``[B, C, H, W]`` (any size: padded to the grid, cropped back).

        ``actions`` [B, P] overrides the policy, which then does not run and is not paid for
        (baselines, oracle); ``bias`` [K+1] is added
        to the policy's logits (budget calibration). ``mc_seed`` fixes f0's dropout masks
        (without touching the global random state), so the same batch always gets the same
        answer; ``None`` draws them from the global generator (training).
        ``inside`` [B, P] bool: the patches that hold image pixels (default: those of ``x``
        itself, :meth:`PatchGrid.inside`); the policy's choice for the others, padding past
        the image (the last tiles of :func:`paser.data.tiles.route_tiled`), is f0.
        """
        h, w = x.shape[-2:]
        xp, mc = self.look(x, mc_seed)
        logits = None
        if actions is None:
            logits = self.policy(self.state(xp, mc))
            if bias is not None:
                logits = logits + bias.to(logits)
            actions = self.choose(logits, mode)
            inside = self._inside(h, w, inside)
            if inside is not None:
                actions = actions.masked_fill(~inside.to(actions.device).expand_as(actions), 0)
            if self.cap_per_mp is not None:
                actions = self.capped(logits, actions, h, w, inside)
        probs, degraded = self.dispatch(xp, mc.probs, actions)
        probs = self.grid.crop(probs, h, w)
        ran = actions if degraded is None else actions.masked_fill(degraded, 0)
        gflops = self.costs(h, w).gflops(ran, policy=logits is not None)
        return RoutingOutput(predicted_classes(probs), probs, actions, gflops, logits, mc,
                             degraded)
