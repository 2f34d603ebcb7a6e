"""What every model of a trained pool does on every patch of a split, counted once.

Stage 2, the oracle, the IDK cascade's threshold search and the report's curves all ask
the same question many times: "if patch p of image n went to model k, what would it
score?" With the task models frozen the answer depends only on (n, p, k), so
:class:`PatchOutcomes` runs f0 (T Monte Carlo passes, one draw per image, fixed seed
when given) and every pool model on every patch once and keeps per-patch counts.
Any assignment of patches to models is then scored exactly by adding counts: patches are
disjoint, so dataset intersections and unions are sums over patches.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from paser.data import Tensors
from paser.metrics import confusion_counts, predicted_classes
from paser.patches import PatchGrid
from paser.routing import Router
from paser.runtime import atomic_save
from paser.uncertainty import entropy

#: the outcomes of the pool models (entries 1..K), which a cache can keep
POOL_KEYS = ("inter", "union", "entropy", "nll")

#: the dihedral views of an image, as (quarter turns, mirrored); the first four keep its shape
VIEWS = [(0, False), (0, True), (2, False), (2, True), (1, False), (1, True), (3, False),
         (3, True)]


def view(x: torch.Tensor, v: int) -> torch.Tensor:
    """Dihedral view ``v`` (:data:`VIEWS`) of ``x [..., H, W]``: mirrored left-right, then
    turned by quarter turns."""
    turns, mirrored = VIEWS[v]
    return torch.rot90(x.flip(-1) if mirrored else x, turns, (-2, -1))


def unview(x: torch.Tensor, v: int) -> torch.Tensor:
    """The inverse of :func:`view`: ``unview(view(x, v), v)`` is ``x``."""
    turns, mirrored = VIEWS[v]
    x = torch.rot90(x, -turns, (-2, -1))
    return x.flip(-1) if mirrored else x


def usable_views(grid: PatchGrid, height: int, width: int, count: int) -> list[int]:
    """The first ``count`` views (0, the image itself, first) that map the patch grid of a
    ``height x width`` image onto itself: the grid must divide the image exactly (padding
    would move), and quarter turns need a square image and grid."""
    if height % grid.rows or width % grid.cols:
        return [0]
    square = height == width and grid.rows == grid.cols
    return [v for v, (turns, _) in enumerate(VIEWS) if square or turns % 2 == 0][:count]


def patch_order(grid: PatchGrid, v: int) -> torch.Tensor:
    """``[P]``: position ``p`` of view ``v``'s patch grid holds the image's patch
    ``order[p]`` (row-major patch numbers)."""
    return view(torch.arange(grid.num_patches).view(grid.rows, grid.cols), v).flatten()


def viewed(data: Tensors, v: int) -> Tensors:
    """A split seen in view ``v`` (in memory)."""
    if v == 0:
        return data
    data = data.in_memory()
    return Tensors(view(data.images, v).contiguous(), view(data.masks, v).contiguous(),
                   list(data.ids), data.groups, data.group_names)


def _digest(h, tensor: torch.Tensor) -> None:
    t = tensor.detach().cpu().contiguous().reshape(-1)
    h.update(f"{t.dtype}{tuple(tensor.shape)}".encode())
    h.update(t.view(torch.uint8).numpy().tobytes())


def _cache_path(router: Router, data: Tensors, num_classes: int) -> Path | None:
    """Where the pool's outcomes on ``data`` are kept (``router.outcome_cache``), named by
    what they depend on: the pool's weights, the patch grid and halo, the images and labels,
    the class count. Stage 2, calibration and the report ask for the same ones; computed
    once, they are read after. ``None``: not cached (no cache set, a remote pool, or a split
    streamed from disk, which would have to be read to be named)."""
    if router.outcome_cache is None or router.remote is not None or data.streamed:
        return None
    h = hashlib.sha1(f"{router.grid.rows} {router.grid.cols} {router.grid.halo} "
                     f"{num_classes}".encode())
    for name, t in router.pool.state_dict().items():
        h.update(name.encode())
        _digest(h, t)
    _digest(h, data.images)
    _digest(h, data.masks)
    return Path(router.outcome_cache) / f"pool_{h.hexdigest()[:20]}.pt"


@dataclass
class PatchOutcomes:
    """Frozen-model outcomes for every (image, patch, action) of a split.

    ``state`` [N, S, Hp, Wp] the policy's input (:meth:`paser.routing.Router.state`); ``inter``, ``union`` [N, P, K+1, C] pixel
    counts of each action's prediction against the label on each patch; ``entropy``
    [N, P, K+1] mean per-pixel entropy (nats) of each model's probabilities on the patch
    (f0: of its Monte Carlo mean); ``nll`` [N, P, K+1] mean cross entropy on the patch's
    labelled pixels (0 where none).
    """

    state: torch.Tensor
    inter: torch.Tensor
    union: torch.Tensor
    entropy: torch.Tensor
    nll: torch.Tensor

    @classmethod
    @torch.inference_mode()
    def build(cls, router: Router, data: Tensors, num_classes: int, batch_size: int,
              device: torch.device, mc_seed: int | None = None,
              pool_from: PatchOutcomes | None = None) -> PatchOutcomes:
        """Run f0 and every pool model on every patch of ``data``.

        ``mc_seed`` fixes f0's dropout masks per batch (as at inference); ``None`` draws
        them from the global generator (training). ``pool_from``: outcomes of the same
        split and pool under another f0 setting (T, dropout, state); the pool's entries are
        taken from it and only f0 runs. Without it, the pool's entries come from the
        router's ``outcome_cache`` when they were computed before (:func:`_cache_path`).
        """
        grid = router.grid
        pool_part = None if pool_from is None else {k: getattr(pool_from, k)[:, :, 1:]
                                                    for k in POOL_KEYS}
        cached = None if pool_part is not None else _cache_path(router, data, num_classes)
        if cached is not None and cached.is_file():
            pool_part = torch.load(cached, map_location="cpu", weights_only=True)
        parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("state", *POOL_KEYS)}
        for images, masks in data.batches(batch_size):
            x = grid.pad(images.to(device))
            y = grid.pad(masks.to(device), mode="constant", value=-1)
            mc = router.observe(x, mc_seed)
            patches, labels = grid.context(x), grid.split(y)  # [B*P, C, h', w'], [B*P, h, w]
            probs = [grid.split(mc.probs)]
            if pool_part is None:
                probs += [router.run_local(k, patches) for k in range(1, router.num_models)]
            b, p = x.shape[0], grid.num_patches
            labelled = labels >= 0
            safe = labels.clamp_min(0)[:, None]
            inter, union, ent, nll = [], [], [], []
            for pr in probs:
                counts = confusion_counts(predicted_classes(pr), labels, num_classes, ignore_index=-1)
                inter.append(counts[0])
                union.append(counts[1])
                ent.append(entropy(pr).mean((-2, -1)))
                pix = -pr.gather(1, safe)[:, 0].clamp_min(1e-12).log() * labelled
                nll.append(pix.sum((-2, -1)) / labelled.sum((-2, -1)).clamp_min(1))
            shape = (b, p, len(probs))
            parts["inter"].append(torch.stack(inter, 1).view(*shape, -1).cpu())
            parts["union"].append(torch.stack(union, 1).view(*shape, -1).cpu())
            parts["entropy"].append(torch.stack(ent, 1).view(shape).float().cpu())
            parts["nll"].append(torch.stack(nll, 1).view(shape).float().cpu())
            parts["state"].append(router.state(x, mc).cpu())
        out = {k: torch.cat(v) for k, v in parts.items()}
        if pool_part is None:
            if cached is not None:
                try:
                    atomic_save({k: out[k][:, :, 1:].clone() for k in POOL_KEYS}, cached)
                except OSError:  # a run folder one may not write to: computed, not kept
                    pass
        else:
            for key in POOL_KEYS:
                out[key] = torch.cat([out[key], pool_part[key]], 2)
        return cls(**out)

    @classmethod
    def concat(cls, parts: list[PatchOutcomes]) -> PatchOutcomes:
        """The outcomes of several splits of the same size as one."""
        return cls(*(torch.cat([getattr(p, f.name) for p in parts]) for f in fields(cls)))

    def rows(self, index: slice | torch.Tensor) -> PatchOutcomes:
        """The outcomes of some of the images (``index`` into the first dimension)."""
        return type(self)(*(getattr(self, f.name)[index] for f in fields(self)))

    @property
    def num_models(self) -> int:
        """K + 1."""
        return self.inter.shape[2]

    def patch_iou(self) -> torch.Tensor:
        """IoU of each action on each patch ``[N, P, K+1]`` (mean over classes present;
        a patch with no labelled pixel scores 0 under every action)."""
        present = self.union > 0
        iou = torch.where(present, self.inter / self.union.clamp_min(1), 0.0).sum(-1)
        return (iou / present.sum(-1).clamp_min(1)).float()

    def dataset_gain(self) -> torch.Tensor:
        """Each action's first-order effect on the split's mIoU, per patch ``[N, P, K+1]``
        (entry 0 is 0), scaled by the number of patches ``N * P``.

        The split's mIoU is ``mean_c I_c / U_c`` over summed intersections and unions. Moving
        one patch from f0 to model k changes them by ``dI``, ``dU``, so the mIoU by about
        ``mean_c (dI_c / U_c - I_c dU_c / U_c^2)``, with ``I``, ``U`` the totals with every
        patch on f0. Unlike the patch's own mIoU gain, this weighs a class by how rare it is
        in the split, as the split's mIoU does, and adds up over patches: ranking patches by
        it ranks them by what they do to the figure the report measures.
        """
        inter, union = self.inter.double(), self.union.double()
        total_i, total_u = inter[:, :, 0].sum((0, 1)), union[:, :, 0].sum((0, 1))
        present = total_u > 0
        d_i, d_u = inter - inter[:, :, :1], union - union[:, :, :1]
        u = total_u.clamp_min(1)
        per_class = torch.where(present, d_i / u - total_i * d_u / u.square(), 0.0)
        scale = inter.shape[0] * inter.shape[1] / present.sum().clamp_min(1)
        return (per_class.sum(-1) * scale).float()

    def gain(self, kind: str = "patch") -> torch.Tensor:
        """Gain of each action over f0 on each patch ``[N, P, K+1]``: ``patch`` (its own
        mIoU, the paper's reward) or ``dataset`` (:meth:`dataset_gain`)."""
        if kind == "dataset":
            return self.dataset_gain()
        iou = self.patch_iou()
        return iou - iou[..., :1]

    def to_image_order(self, grid: PatchGrid, v: int) -> PatchOutcomes:
        """Outcomes built on view ``v`` of a split with their patches put back in the
        image's own order (the state stays as the view saw it)."""
        back = patch_order(grid, v).argsort()  # the inverse permutation
        return PatchOutcomes(self.state, *(getattr(self, k)[:, back]
                                           for k in ("inter", "union", "entropy", "nll")))

    def miou(self, actions: torch.Tensor) -> float:
        """Dataset-level mIoU of the routed predictions for ``actions`` [N, P]."""
        return float(self.miou_many(actions[None])[0])

    def miou_many(self, actions: torch.Tensor) -> torch.Tensor:
        """Dataset-level mIoU ``[S]`` for ``S`` assignments at once, ``actions`` [S, N, P]."""
        onehot = torch.nn.functional.one_hot(actions, self.num_models).double()  # S N P K
        inter = torch.einsum("snpk,npkc->sc", onehot, self.inter.double())
        union = torch.einsum("snpk,npkc->sc", onehot, self.union.double())
        present = union > 0
        ratio = torch.where(present, inter / union.clamp_min(1), 0.0)
        return ratio.sum(-1) / present.sum(-1).clamp_min(1)
