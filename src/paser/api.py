"""The Python API: ``PaSeR.load(run_dir)``, ``segment(images)``, ``evaluate(data)``."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from paser.calibration import Calibration, calibrate
from paser.checkpoints import (
    LOADED_STEPS,
    build_router,
    label_codec,
    load_checkpoint,
    run_config,
    unfinished_steps,
)
from paser.config import ExperimentConfig
from paser.cost import FLOP_CONVENTION, at_least
from paser.data import MASK_IGNORE, OnDisk, Tensors, on_disk, to_tensors
from paser.data.folders import ClassMap
from paser.data.images import Intensity, as_input, native
from paser.data.tiles import Tiles, route_tiled
from paser.errors import CheckpointError, ConfigError, DataError
from paser.evaluation import evaluate_router
from paser.patches import PatchGrid
from paser.routing import Router, RoutingOutput
from paser.runtime import keep_freed_memory, resolve_device

#: float images may stray this far outside [0, 1] (resampling overshoot) and are taken as they are
OUT_OF_RANGE = 1e-3
#: data to evaluate or calibrate on may stray this far: noise or contrast augmentation puts
#: float images a little past [0, 1] (a robustness test); 0..255 or 0..65535 floats lie far past
AUGMENTED = 0.5
#: torch's words where an image is too small for a model's layers, and what they mean: a
#: norm layer's where pooling left one pixel; a convolution's or a pooling's where it left
#: a side narrower than the kernel (a strip a few pixels high)
TOO_SMALL = {
    "Expected more than 1 value per channel": "their deepest layers would see one pixel of it",
    "Kernel size can't be greater than actual input size":
        "pooled, a side of it is narrower than their deeper layers' kernels",
    "Output size is too small": "pooled, a side of it would vanish",
}


def too_small(err: BaseException) -> str | None:
    """What ``err`` (torch's, from running a model) means where it says an input was too
    small for the model's layers (:data:`TOO_SMALL`); None for any other error."""
    return next((why for words, why in TOO_SMALL.items() if words in str(err)), None)


def _refuse_unfinished(run_dir: Path, calibrated: bool) -> None:
    """A run whose stages (or calibration, when it is used) ``steps.json`` shows begun and
    not finished is refused: its settings may be new and its checkpoints of before."""
    uses = LOADED_STEPS + (("calibrate",) if calibrated and (run_dir / "calibration.json")
                           .is_file() else ())  # a calibration of before, half replaced
    begun = unfinished_steps(run_dir, uses)
    if begun:
        raise CheckpointError(
            f"{run_dir}: {', '.join(begun)} {'is' if len(begun) == 1 else 'are'} being "
            "trained again, or was stopped while it was (its settings are in config.yaml, "
            "its checkpoints may still be those of the settings before); finish it first: "
            f"paser run --run-dir {run_dir} (it resumes)")


def _unmasked(image, source: str):
    """``image``, or its data where it is a numpy masked array that masks no pixel; one that
    masks some is a :class:`DataError`: ``np.asarray`` drops the mask, and the pixels it
    hid (a fill value, -9999 outside the field of view, NaN) were read as the scan's."""
    if not isinstance(image, np.ma.MaskedArray):
        return image
    hidden = int(np.ma.getmaskarray(image).sum())
    if hidden:
        raise DataError(f"{source}: a masked array with {hidden} of {image.size} values masked; "
                        "the models would read the masked pixels' stored values as the scan's "
                        "(numpy drops the mask): fill them with a value the scan's background "
                        "has, image.filled(value), or give image.data to read them as stored")
    return image.data


#: what a dataset streamed from disk has (:class:`paser.data.battery.SegmentationFiles`,
#: :class:`paser.data.tiles.Tiles`): :func:`paser.data.on_disk` reads it by these
STREAMED = ("image", "mask", "ids", "size", "channels")


def _stacked(dataset: Dataset) -> Tensors:
    """A Dataset of ``{'image', 'mask', 'id'}`` samples (tensors or numpy arrays) that is not
    one of paser's file datasets, read into memory as :class:`Tensors`."""
    samples = [dataset[i] for i in range(len(dataset))]
    name = type(dataset).__name__
    try:
        columns = [[s[key] for s in samples] for key in ("image", "mask")]
        ids = [str(s["id"]) for s in samples]
    except (TypeError, KeyError, IndexError) as err:
        raise DataError(f"data: {name}'s samples are not {{'image', 'mask', 'id'}} "
                        f"dicts ({type(err).__name__}: {err}); give such a Dataset, or "
                        "paser.data.Tensors(images, masks, ids)") from None
    if not samples:
        raise DataError(f"data: an empty {name}; give one image or more")
    try:
        images, masks = (torch.stack([torch.as_tensor(v) for v in c]) for c in columns)
    except (TypeError, ValueError, RuntimeError) as err:
        raise DataError(f"data: {name}'s samples do not stack ({err}); give images "
                        "[C, H, W] of one size and masks [H, W] of their size") from None
    return Tensors(images, masks, ids)


class _Held:
    """:class:`Tensors` in memory read as a file dataset is, for :class:`Tiles` to cut."""

    class_names: list[str] = []

    def __init__(self, data: Tensors):
        self.data, self.ids = data, data.ids
        self.sizes = [tuple(data.images.shape[-2:])] * len(data)
        self.channels = data.images.shape[1]
        # uint8, as files' masks are: a tile's padding is MASK_IGNORE, -1 masks become it
        self.masks = data.masks.to(torch.uint8)

    def image(self, i: int) -> torch.Tensor:
        return self.data.images[i]

    def mask(self, i: int) -> torch.Tensor:
        return self.masks[i]


class PaSeR:
    """A trained PaSeR pipeline: f0 with Monte Carlo dropout, the policy and f1..fK.

    >>> model = PaSeR.load("runs/demo")
    >>> out = model.segment(images)           # images [B, C, H, W] in [0, 1], or integers
    >>> out = model.segment(model.prepare(np.asarray(PIL.Image.open("scan.tif"))))
    >>> out.mask, out.probs, out.actions, out.gflops
    """

    def __init__(self, router: Router, config: ExperimentConfig, run_dir: Path | None = None,
                 calibration: Calibration | None = None):
        self.router, self.config, self.run_dir = router, config, run_dir
        #: the budget bias used by :meth:`segment` and :meth:`evaluate` (``None``: none)
        self.calibration = calibration
        self._codec: ClassMap | None = None
        self._intensity: Intensity | None = None
        self._trained_size: tuple | None = None

    @classmethod
    def load(cls, run_dir: str | Path, device: str = "auto",
             stage3: str | Path | None = None, calibrated: bool = True) -> PaSeR:
        """Load a run: the stage-3 checkpoint when present, else stage 1 + the stage-2 policy.

        ``stage3`` names another stage-3 checkpoint of the run (a TVD-sweep variant).
        ``calibrated=False`` ignores the run's saved calibration (``paser calibrate``).
        Sets glibc to keep freed memory for reuse (:func:`paser.runtime.keep_freed_memory`):
        large CPU tensors are not page-faulted in afresh on every call."""
        keep_freed_memory()
        cfg = run_config(run_dir)  # first: a clear error for a run_dir that is not a path
        run_dir = Path(run_dir)
        _refuse_unfinished(run_dir, calibrated)
        dev = resolve_device(device)
        ckpt_dir = run_dir / "checkpoints"
        stage3 = Path(stage3) if stage3 is not None else ckpt_dir / "stage3.pt"
        if (stage3 == ckpt_dir / "stage3.pt" and not stage3.is_file()
                and (run_dir / "stage3.json").is_file()):
            load_checkpoint(ckpt_dir / "stage3.pt")  # stage 3 ran: not stage 2's policy instead
        if stage3.is_file() or stage3 != ckpt_dir / "stage3.pt":
            if not stage3.is_file():  # one the caller named: not the stage's to write
                raise CheckpointError(f"stage3={stage3}: not a file; give a checkpoint "
                                      f"paser finetune wrote: {ckpt_dir / 'stage3.pt'}, or a "
                                      f"TVD variant's, {run_dir}/tvd/<threshold>/checkpoints/"
                                      "stage3.pt")
            state = load_checkpoint(stage3, dev)
            if not isinstance(state, dict) or not {"policy", "pool"} <= state.keys():
                raise CheckpointError(f"stage3={stage3}: not a stage-3 checkpoint (one holds "
                                      "the policy and the pool); give one paser finetune wrote, "
                                      f"{ckpt_dir / 'stage3.pt'} or a TVD variant's")
            policy_state, pool_states = state["policy"], state["pool"]
        else:
            policy_state = load_checkpoint(ckpt_dir / "policy.pt", dev)["policy"]
            pool_states = None
        with torch.random.fork_rng(devices=[]):  # building draws initial weights: not the caller's
            router = build_router(cfg, run_dir, dev, policy_state, pool_states)  # checks the fit
        return cls(router.eval(), cfg, run_dir,
                   Calibration.load(run_dir, router.policy_digest) if calibrated else None)

    @classmethod
    def load_onnx(cls, run_dir: str | Path, export_dir: str | Path | None = None,
                  calibrated: bool = True) -> PaSeR:
        """The run's ONNX export (``paser export``; default ``<run_dir>/onnx``) on
        onnxruntime: the same routing path, no PyTorch models. Its calibration applies when
        it was made for the exported policy."""
        from paser.export import load_onnx_router
        from paser.routing import model_digests

        keep_freed_memory()
        # first: a clear error for a run_dir that is not a path, its example this call
        cfg = run_config(run_dir, "PaSeR.load_onnx")
        run_dir = Path(run_dir)
        _refuse_unfinished(run_dir, calibrated)
        export_dir = Path(export_dir) if export_dir is not None else run_dir / "onnx"
        router = load_onnx_router(export_dir)
        exported, policy = router.manifest.get("digests"), router.manifest.get("policy")
        if exported is not None or policy is not None:  # of this run's weights, as they are
            here = cls.load(run_dir, device="cpu", calibrated=False).router
            # an export before the models' digests were kept has its policy's digest
            if here.policy_digest != policy or exported not in (None, model_digests(here)):
                raise CheckpointError(f"{export_dir}: exported from other weights than "
                                      f"{run_dir}'s (another run, or before it was trained "
                                      f"again); export again: paser export --run-dir "
                                      f"{run_dir} --out {export_dir}")
        calibration = Calibration.load(run_dir, router.policy_digest) if calibrated else None
        return cls(router.eval(), cfg, run_dir, calibration)

    @property
    def label_codec(self) -> ClassMap:
        """The class map label PNGs are written in: the run's ``classes.yaml``
        (:func:`paser.checkpoints.label_codec`)."""
        if self._codec is None:
            self._codec = label_codec(self.run_dir, self.config)
        return self._codec

    @property
    def intensity(self) -> Intensity:
        """How the run scales its inputs to [0, 1]: its ``intensity.json`` (the window stage
        1 fitted on the training images; :class:`paser.data.images.Intensity`)."""
        if self._intensity is None:
            self._intensity = Intensity.load(self.run_dir)
        return self._intensity

    @property
    def device(self) -> torch.device:
        return next(self.router.parameters()).device

    @torch.no_grad()  # not inference mode: the outputs are ordinary tensors to edit or train on
    def segment(self, images: torch.Tensor | np.ndarray, mode: str = "greedy",
                bias: torch.Tensor | None = None, mc_seed: int | None = 0,
                only: int | None = None, probs: bool = True,
                on_tiles: Callable[[int, int], None] | None = None) -> RoutingOutput:
        """Segment a batch ``[B, C, H, W]`` (or one ``[C, H, W]`` / ``[H, W]`` image).

        Floats are taken as scaled to [0, 1]; integer (and boolean) images are scaled as
        ``paser segment`` scales a file holding them (the run's :attr:`intensity`: 8/16-bit
        by their type's range, others by the run's window), image by image. A stored image
        ``[H, W]`` / ``[H, W, C]`` of any type, raw floats included: :meth:`prepare`.
        Greedy actions and a fixed seed for f0's Monte Carlo dropout by default, so the same
        image always gets the same answer, in any batch (``mc_seed=None`` samples fresh
        masks). ``bias`` defaults to the run's calibration (``paser calibrate``), if it has
        one. ``only=k`` runs model k alone instead (:meth:`paser.routing.Router.alone`: f0
        for 0, pool model k on every patch), to compare with routing on the same images.
        ``out.gflops`` is per image, :data:`paser.cost.FLOP_CONVENTION`. ``probs=False``
        leaves out the class probabilities of an image larger than a tile (``out.probs``
        None): far less memory for a large image whose labels alone are wanted.
        ``on_tiles(done, total)``: the tiles of an image larger than a tile routed so far,
        after each batch of them.
        """
        if only is not None and (isinstance(only, bool) or not isinstance(only, int | np.integer)):
            raise DataError(f"only {only!r}: give a model's number, 0 (f0) to "  # True read as 1
                            f"{self.router.num_models - 1}, or None to route")
        x = self._batch(images)
        self.router.eval()
        bias = self._bias(bias)

        def route(t: torch.Tensor, inside: torch.Tensor | None = None) -> RoutingOutput:
            if only is not None:
                return self.router.alone(only, t, mc_seed, inside=inside)
            return self.router(t, mode=mode, bias=bias, mc_seed=mc_seed, inside=inside)

        x = x.to(self.device)
        with self._sized(*x.shape[-2:]):
            if self._whole(*x.shape[-2:]):
                return route(x)
            return route_tiled(route, x, self.tile, self.router.grid, probs=probs,
                               on_batch=on_tiles)

    @contextmanager
    def _sized(self, height: int, width: int):
        """Run the models on a ``height x width`` image; one too small for their layers is
        a :class:`DataError` that says so: torch's words ('Expected more than 1 value per
        channel', 'Kernel size can't be greater than actual input size') name neither the
        image nor what to do."""
        try:
            yield
        except (ValueError, RuntimeError) as err:
            why = too_small(err)
            if why is None:
                raise
            try:  # the size stage 1 trained at, where its summary says
                size = self.trained_size
            except (OSError, ValueError, KeyError):
                size = None
            raise DataError(f"a {height} x {width} image is too small for the run's models "
                            f"({why}); give it at a size nearer the one the run trained on"
                            + (f" ({size[0]} x {size[1]})" if size else "")) from None

    def prepare(self, image: np.ndarray, source: str = "the image") -> torch.Tensor:
        """A stored image ``[H, W]`` or ``[H, W, C]`` (as Pillow, tifffile or scikit-image
        give it; any dtype) as the models see it: ``[C, H, W]`` float32 in [0, 1], scaled and
        converted exactly as ``paser segment`` reads a file holding it
        (:func:`paser.data.images.as_input` with the run's :attr:`intensity`)."""
        arr = np.asarray(_unmasked(image, source))
        if arr.ndim not in (2, 3) or arr.size == 0:
            raise DataError(f"{source}: shape {arr.shape}; prepare takes one stored image "
                            "[H, W] or [H, W, C]")
        channels = self.config.models.in_channels
        if arr.ndim == 3 and arr.shape[0] <= 4 and arr.shape[-1] > 4:
            # [C, H, W] (torch's order, a planar TIFF's pages) read as [H, W, C] was 'W
            # channels, and the models take 1'
            raise DataError(f"{source}: shape {arr.shape}, channels first ([C, H, W]); "
                            "prepare takes one stored image [H, W] or [H, W, C]: give "
                            + ("image[0]" if arr.shape[0] == 1 else
                               "np.moveaxis(image, 0, -1)"))
        if arr.ndim == 3 and arr.shape[-1] == 2 and channels != 2:
            raise DataError(f"{source}: 2 channels, and the models take {channels}: gray and "
                            "alpha, as np.asarray gives a Pillow 'LA' image? give image[..., 0] "
                            "(paser segment reads such a file without its alpha)")
        return torch.from_numpy(as_input(arr, channels, self.intensity, source))

    def _batch(self, images, slack: float = OUT_OF_RANGE) -> torch.Tensor:
        """``images`` as a float32 batch ``[B, C, H, W]`` in [0, 1] (floats within ``slack``
        of it taken as they are), checked."""
        if isinstance(images, (list, tuple)):
            raise DataError(f"images as a {type(images).__name__} of {len(images)}: give one "
                            "batch [B, C, H, W] (torch.stack of images of one size), or call "
                            "segment once per image (images of different sizes)")
        if not isinstance(images, (torch.Tensor, np.ndarray)):
            raise DataError(f"images of type {type(images).__name__}: give a torch tensor or "
                            "a numpy array (a PIL image: model.prepare(np.asarray(image)))")
        if isinstance(images, np.ndarray):
            images = np.ascontiguousarray(_unmasked(images, "images"))
            images = native(images)  # big-endian (FITS, HDF5, zarr): torch refuses it
            if not images.flags.writeable:  # Pillow's arrays: torch would warn
                images = images.copy()
        try:
            x = torch.as_tensor(images)
        except TypeError as err:  # numpy object or string arrays
            raise DataError(f"images: {err}; give integer or float images") from None
        if x.is_complex():
            raise DataError(f"images of type {x.dtype}; give integer or float images")
        if x.dim() > 4 or x.numel() == 0:
            raise DataError(f"images of shape {tuple(x.shape)}: give [B, C, H, W], [C, H, W] "
                            "or [H, W] with at least one pixel")
        while x.dim() < 4:
            x = x.unsqueeze(0)
        channels = self.config.models.in_channels
        if x.shape[1] != channels:
            hint = (" (an [H, W, C] image, as Pillow and scikit-image give it: "
                    "model.prepare(image))" if len(images.shape) == 3
                    and images.shape[-1] in (1, 2, 3, 4) else
                    f" (a gray [1, H, W] image for models of {channels} channels: model.prepare("
                    "image[0]) repeats it)" if len(images.shape) == 3 and images.shape[0] == 1
                    else "")
            raise DataError(f"images have {x.shape[1]} channels, the models expect {channels}: "
                            f"shape {tuple(x.shape)}, expected [B, {channels}, H, W]{hint}")
        if not x.is_floating_point():  # stored values: scaled as a file holding them is
            x = torch.stack([torch.from_numpy(self.intensity.scale(
                i.cpu().numpy(), f"image {n}")) for n, i in enumerate(x)])
        x = x.float()
        if not torch.isfinite(x).all():
            raise DataError("images contain NaN or Inf values")
        lo, hi = float(x.min()), float(x.max())
        if lo < -slack or hi > 1 + slack:
            raise DataError(f"float images with values in [{lo:g}, {hi:g}], outside [0, 1]: "
                            "scale them to [0, 1], or give each stored image to "
                            "model.prepare(image), which scales it as paser segment does")
        return x

    @property
    def tile(self) -> tuple[int, int] | None:
        """The image size the run trained and routes at (``data.tile``; ``auto``: stage 1's
        image size, from ``stage1.json``, padded to the grid as the models saw it), or
        ``None``: images are routed whole, in the grid's patches of whatever size."""
        tile = self.config.data.tile
        if tile == "auto" and self.trained_size is not None:  # the size stage 1 trained at:
            # padded, its patches are those of the fixed grid of tiles (grid_for) and the
            # cloud tier's (a 15 x 15 tile's 7 x 7 did not cover it, nor the 8 x 8 sent)
            tile = self.router.grid.padded_size(*self.trained_size)
        elif tile == "auto":
            tile = None
        return None if tile is None else tuple(tile)

    @property
    def trained_size(self) -> tuple[int, int] | None:
        """The image size stage 1 trained at (``stage1.json``), read once; ``None`` where the
        run does not say (no run folder, or no summary)."""
        if self._trained_size is None:
            summary = None if self.run_dir is None else Path(self.run_dir) / "stage1.json"
            self._trained_size = (tuple(json.loads(summary.read_text())["image_size"])
                                  if summary is not None and summary.is_file() else ())
        return self._trained_size or None

    def _whole(self, height: int, width: int) -> bool:
        """Whether a ``height x width`` image is routed whole, not cut into tiles (one of
        the size stage 1 trained at too, where the tile is that size padded: as it was)."""
        return self.tile is None or (height, width) == self.tile or (
            self.config.data.tile == "auto" and (height, width) == self.trained_size)

    def routed_size(self, height: int, width: int) -> tuple[int, int]:
        """The size each routed call sees for a ``height x width`` image: its own, or the
        run's tile (:attr:`tile`) when it is cut into tiles; :meth:`Router.costs` of it is
        the cost table the image is charged by."""
        return (height, width) if self._whole(height, width) else self.tile

    def cost_table(self, height: int, width: int):
        """The :class:`paser.routing.CostTable` a ``height x width`` image is charged by
        (its tiles' size where it is cut into tiles), counted once per size."""
        with self._sized(height, width):
            return self.router.costs(*self.routed_size(height, width))

    def grid_for(self, height: int, width: int) -> PatchGrid:
        """The patches a ``height x width`` image is routed in: the run's grid, or, when it
        is cut into tiles (:attr:`tile`), the tiles' patches as one grid of fixed-size
        patches (a 1024 x 1024 image, 128 x 128 tiles of 2 x 2: 16 x 16 of 64 x 64)."""
        grid = self.router.grid
        if self._whole(height, width):
            return grid
        (th, tw), (r, c) = self.tile, (grid.rows, grid.cols)
        return PatchGrid(-(-height // th) * r, -(-width // tw) * c, grid.halo,
                         patch=(th // r, tw // c))

    def _data(self, data: Tensors | Dataset, batch_size: int) -> Tensors | Dataset:
        """``data`` to evaluate or calibrate on, its images in memory checked as
        :meth:`segment` checks (and scales) images, and their masks against them: deep in
        the models, a wrong column was a bare RuntimeError or IndexError, or, for NaN or
        0..255 floats, a wrong mIoU. Floats a little past [0, 1] (:data:`AUGMENTED`: noise or
        augmentation) are evaluated as they are, as before these checks."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise DataError(f"batch_size {batch_size!r}: give a whole number, 1 or more")
        if isinstance(data, Dataset):
            if all(hasattr(data, a) for a in STREAMED):  # paser's file datasets, their tiles
                return self._tiles(data, data.size)
            data = _stacked(data)  # any other: its samples in memory, checked as Tensors
        if not isinstance(data, Tensors):
            raise DataError(f"data of type {type(data).__name__}: give paser.data.Tensors("
                            "images, masks, ids) or a Dataset of {'image', 'mask', 'id'} samples")
        if isinstance(data.images, OnDisk):  # columns on disk: checked as read
            return data
        if isinstance(data.masks, np.ma.MaskedArray) and np.ma.getmaskarray(data.masks).any():
            # numpy's mark of what no one labelled, which torch.as_tensor drops: the stored
            # values under it were scored as classes
            raise DataError(f"data: masks as a masked array with "
                            f"{int(np.ma.getmaskarray(data.masks).sum())} of {data.masks.size} "
                            "labels masked; the masked pixels' stored values would be scored "
                            f"as classes: give them the ignore value, masks.filled({MASK_IGNORE}) "
                            "(or -1 in signed labels)")
        images, masks = data.images, torch.as_tensor(np.ma.getdata(data.masks))
        if not isinstance(images, (torch.Tensor, np.ndarray)):
            raise DataError(f"data: images of type {type(images).__name__}; give a tensor or "
                            "a numpy array [N, C, H, W]")
        if images.ndim != 4 or len(images) == 0:
            raise DataError(f"data: images of shape {tuple(images.shape)}; give [N, C, H, W], "
                            "N 1 or more")
        if len(masks) != len(images) or len(data.ids) != len(images):
            raise DataError(f"data: {len(images)} images, {len(masks)} masks and "
                            f"{len(data.ids)} ids; give one mask and one id per image")
        if masks.dim() != 3 or masks.shape[-2:] != images.shape[-2:]:
            raise DataError(f"data: masks of shape {tuple(masks.shape)} for images of shape "
                            f"{tuple(images.shape)}; give masks [N, H, W] of the images' size")
        data = replace(data, images=self._batch(images, AUGMENTED), masks=masks)
        return self._tiles(_Held(data), tuple(images.shape[-2:]))

    def _tiles(self, data, size: tuple[int, int] | None):
        """``data`` (a dataset whose images are all ``size``, or of several sizes: ``None``)
        cut into the run's tiles where :meth:`segment` cuts its images, as ``paser evaluate``
        cuts a folder's (:class:`paser.data.tiles.Tiles`); else as it is. Each tile counts
        as an image, as in ``paser evaluate``."""
        if self.tile is None and size is None and not isinstance(data, Tiles):
            # (routed whole, a batch is of one size: on_disk's 'cannot unpack NoneType')
            sizes = data.size_range() if hasattr(data, "size_range") else "of several sizes"
            raise DataError(f"data: its images are {sizes}, and this run routes images whole "
                            "(data.tile null), a batch of one size; give images of one size, "
                            "or cut them into tiles of one: paser.data.tiles.Tiles(data, (H, W))")
        if self.tile is None or isinstance(data, Tiles) or (
                size is not None and self._whole(*size)):
            return data.data if isinstance(data, _Held) else data
        tiles = Tiles(data, self.tile)
        return to_tensors(tiles) if isinstance(data, _Held) else tiles  # in memory: still

    def _bias(self, bias: torch.Tensor | None) -> torch.Tensor | None:
        if bias is None:
            return None if self.calibration is None else self.calibration.tensor()
        try:
            bias = torch.as_tensor(bias, dtype=torch.float32, device=self.device)
        except (TypeError, ValueError, RuntimeError) as err:
            raise DataError(f"bias: {err}; give one number per model (f0..f"
                            f"{self.router.num_models - 1})") from None
        if bias.shape != (self.router.num_models,):
            raise DataError(f"bias of shape {tuple(bias.shape)}: give one number per model, "
                            f"{self.router.num_models} (f0..f{self.router.num_models - 1})")
        if not torch.isfinite(bias).all():  # a NaN sends every patch to f0, without a word
            raise DataError(f"bias {bias.tolist()}: give finite numbers, one per model")
        return bias

    def calibrate(self, budget_gflops: float | None = None, max_frac_large: float | None = None,
                  batch_size: int = 16, save: bool = True, iou_within_top: float | None = None,
                  best_iou: bool = False, data: Tensors | Dataset | None = None,
                  max_tvd: float | None = None,
                  budget_gflops_per_mp: float | None = None) -> Calibration:
        """Find the bias that meets the target on the run's validation split (or ``data``,
        taken as :meth:`evaluate` takes it; see :func:`paser.calibration.calibrate`), use it
        from now on and, with ``save``, keep it in the run (``calibration.json``) for later
        loads."""
        from paser.data import validation_split

        cfg = self.config
        data = (self._data(data, batch_size) if data is not None
                else validation_split(cfg.data, channels=cfg.models.in_channels))
        if not isinstance(data, Tensors):  # a file dataset: read from disk as it is swept
            data = on_disk(data, cfg.data.workers)
        self.calibration = calibrate(self.router, data, cfg.models.num_classes, budget_gflops,
                                     max_frac_large, batch_size, iou_within_top=iou_within_top,
                                     best_iou=best_iou, max_tvd=max_tvd,
                                     budget_gflops_per_mp=budget_gflops_per_mp)
        if save and self.run_dir is not None:
            self.calibration.save(self.run_dir)
        return self.calibration

    def cap(self, max_gflops_per_mp: float | None, option: str = "max_gflops_per_mp"
            ) -> float | None:
        """Hold every image routed from now on (each tile of an image larger than a tile)
        to ``max_gflops_per_mp`` GFLOP per megapixel (``None``: no cap), in
        :meth:`segment`, :meth:`evaluate`, the server and the cluster alike
        (:meth:`paser.routing.Router.capped`). A budget (``calibrate``) is a mean over
        images: some spend more, some less; the cap is a limit no image passes, the
        patches the policy values least per GFLOP leaving the dearer models first. It must
        leave room for what every image pays before routing, f0 and the policy (``option``:
        the name an error gives it). Returns what every patch on the dearest model costs per
        megapixel at the run's image size (a cap at or above it bounds nothing), or
        ``None`` where the run does not say its size."""
        if max_gflops_per_mp is None:
            self.router.cap_per_mp = None
            return None
        try:
            cap = float(max_gflops_per_mp)
        except (TypeError, ValueError):
            cap = math.nan
        size = self.trained_size or self.tile  # (auto: the unpadded size, whose pixels pay most)
        costs = None if size is None else self.router.costs(*size)
        megapixels = None if size is None else size[0] * size[1] / 1e6
        fixed = 0.0 if costs is None else costs.fixed / megapixels
        if not math.isfinite(cap) or cap <= 0 or cap < fixed:
            at = "" if size is None else (
                f" of at least {at_least(fixed)}, what every {size[0]} x {size[1]} image pays before "
                f"any patch is routed (f0 and the policy; {FLOP_CONVENTION})")
            raise ConfigError(f"{option} {max_gflops_per_mp!r}: give a "
                              f"{'finite ' if math.isinf(cap) else ''}number of "
                              f"GFLOP per megapixel{at}")
        self.router.cap_per_mp = cap
        return (None if costs is None else
                (costs.fixed + max(costs.patch) * costs.num_patches) / megapixels)

    def use_remote(self, url: str | None, **options):
        """Run f1..fK on a ``paser serve`` server at ``url`` from now on (``None``: here
        again); f0 and the policy stay here. ``options`` go to
        :class:`paser.serve.client.RemotePool` (token, ca_file, timeout, retries, backoff,
        down_for, output, http). Returns the pool; its ``connect()`` checks the server's
        models (and that it takes the token)."""
        if url is None:
            self.router.remote = None
            return None
        from paser.serve import require_serve_extra

        require_serve_extra()
        from paser.serve.client import RemotePool

        self.router.remote = RemotePool(url, self, **options)
        return self.router.remote

    def evaluate(self, data: Tensors | Dataset, batch_size: int = 16,
                 model: int | None = None, num_workers: int = 0,
                 on_batch: Callable[[int], None] | None = None) -> dict:
        """mIoU, GFLOP per image, IoU per GFLOP and the share of patches per model.

        ``model=k`` evaluates one model alone as the report does
        (:func:`paser.evaluation.evaluate_router`): f0 with its Monte Carlo passes for 0,
        pool model k on every patch otherwise. ``data``: :class:`paser.data.Tensors`
        (tensors or numpy arrays), or a dataset: paser's (e.g.
        :class:`paser.data.BatteryDataset`) is streamed from disk, read by ``num_workers``
        processes; only counts are kept, never the predictions. Any other Dataset of
        ``{'image', 'mask', 'id'}`` samples is read into memory first. Images are checked and
        scaled as :meth:`segment` takes them, and cut into the run's tiles where it cuts them
        (:attr:`tile`): each tile then counts as an image, as in ``paser evaluate``.
        ``on_batch`` is called with
        each batch's number of images as it is done (a progress bar).
        """
        data = self._data(data, batch_size)
        return evaluate_router(self.router, data, self.config.models.num_classes, batch_size,
                               bias=None if model is not None else self._bias(None),
                               model=model, num_workers=num_workers, on_batch=on_batch)
