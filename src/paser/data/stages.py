"""The five splits a run trains and evaluates on: D_pre, D_rl and D_ft cut from the
training split, validation and test, in memory or streamed from disk."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from torch.utils.data import Subset

from paser.config import REFERENCE_CLASS_WEIGHTS, DataConfig, ExperimentConfig
from paser.data.battery import SPLITS, SegmentationFiles, split_three
from paser.data.registry import kind, open_split
from paser.data.tensors import StageData, Tensors, on_disk, to_tensors
from paser.data.tiles import Tiles, decode_into
from paser.errors import ConfigError, DataError


def load_stage_data(cfg: ExperimentConfig, progress: bool = True,
                    run_dir: str | Path | None = None) -> StageData:
    """D_pre / D_rl / D_ft, validation and test of the configured dataset: in memory, or
    read from disk as batches are asked for (``data.stream``). The data's channels and
    classes must be the models' (``models.in_channels``, ``models.num_classes``). Streamed
    tiles keep each image they read decoded in the ``cache`` folder of ``run_dir`` (while
    the splits are in use: :func:`paser.data.tiles.decode_into`; a folder for each of the
    ``distributed.devices`` processes of a machine), so that a tile drawn at random does
    not decode its whole image again."""
    data = cfg.data
    built = kind(data).build
    if built is not None:
        return built(data)
    sets = {s: as_tiles(data, open_split(data, s, progress, cfg.models.in_channels), cfg.grid)
            for s in SPLITS}
    train = sets["train"]
    for name in ("validation", "test"):
        if sets[name].size != train.size:
            raise DataError(
                f"{name}: images of {sets[name].size_range()}, train {train.size_range()}; "
                f"all splits must share one image size, or set data.tile=[H,W] to cut every "
                "image into tiles of that size"
            )
    check_fits_models(cfg, train)
    stream = streams(data, sets.values())
    if stream and run_dir is not None:
        decode_into(Path(run_dir) / "cache", sets.values(), ranks=cfg.distributed.devices)
    train, val, test = ((on_disk(d, data.workers) if stream else to_tensors(d))
                        for d in sets.values())
    pre, rl, ft = split_three(len(train), data.split, data.split_seed,
                              data.slices["train"] if data.dataset == "volume" else None)

    def windows(margin: int, rows: list[int]) -> Tensors | None:
        """The tiles ``rows`` with ``margin`` pixels of their image around them, read or
        held for nothing else; None without a margin."""
        if not margin:
            return None
        around = sets["train"].around(margin)
        return (on_disk(around, data.workers).subset(rows) if stream
                else to_tensors(Subset(around, rows)))

    margin = crop_margin(cfg, sets["train"])
    router_margin = half_patch(cfg, sets["train"]) if cfg.stage2.crops else 0
    return StageData(train.subset(pre), train.subset(rl), train.subset(ft), val, test,
                     windows(margin, pre), margin, windows(router_margin, rl),
                     windows(router_margin, ft), router_margin)


def augments(cfg: ExperimentConfig) -> bool:
    """``stage1.augment``, ``auto`` resolved: on for folder and volume data and a battery
    layout on disk."""
    mode = cfg.stage1.augment
    if mode == "auto":
        data = cfg.data
        mode = "on" if data.dataset in ("folder", "volume") or (
            data.dataset == "battery" and data.root is not None) else "off"
    return mode == "on"


def crop_margin(cfg: ExperimentConfig, train: SegmentationFiles | Tiles) -> int:
    """How far stage 1 moves its crops of the training tiles (``stage1.crop_margin``; null:
    half a patch): 0 unless stage 1 augments (``stage1.augment``) and the training images
    are cut into tiles."""
    return half_patch(cfg, train) if augments(cfg) else 0


def half_patch(cfg: ExperimentConfig, train: SegmentationFiles | Tiles) -> int:
    """``stage1.crop_margin`` (null: half a patch) where the training images are cut into
    tiles, else 0: how far a random crop of a tile moves each way."""
    if not isinstance(train, Tiles):
        return 0
    margin = cfg.stage1.crop_margin
    if margin is None:
        rows, cols = cfg.grid
        margin = min(train.tile[0] // rows, train.tile[1] // cols) // 2
    return margin


def as_tiles(cfg: DataConfig, split: SegmentationFiles, grid: tuple[int, int] | None = None
             ) -> SegmentationFiles | Tiles:
    """The split as the run sees it: itself when its images are all ``data.tile`` (or no
    tile is set and they share one size), else its tiles (:class:`Tiles`). Images of
    several sizes without ``data.tile`` are a :class:`DataError` that says what to set; a
    tile the patch ``grid`` does not divide, a :class:`ConfigError`."""
    tile = cfg.tile
    if not isinstance(tile, tuple):  # null or auto: the images as they are
        if split.size is None:
            i = next(i for i, size in enumerate(split.sizes) if size != split.sizes[0])
            raise DataError(f"{split.images[i]}: {split.sizes[i][0]} x {split.sizes[i][1]}, but "
                            f"{split.images[0].name} is {split.sizes[0][0]} x "
                            f"{split.sizes[0][1]} (this split's images are "
                            f"{split.size_range()}); set data.tile=[H,W] (a multiple of the "
                            "grid, e.g. [128,128]) to cut every image into tiles of that "
                            "size, or give images of one size")
        return split
    rows, cols = grid or (1, 1)
    if tile[0] % rows or tile[1] % cols:
        raise ConfigError(f"key 'data.tile': {list(tile)} does not divide into the grid "
                          f"{rows} x {cols}; use a multiple of it (e.g. [{64 * rows}, "
                          f"{64 * cols}])")
    return split if split.size == tuple(tile) else Tiles(split, tile)


def check_fits_models(cfg: ExperimentConfig, dataset: SegmentationFiles) -> None:
    """The models take the data's channels and predict its classes, or a ConfigError says
    which key to set."""
    m = cfg.models
    if dataset.channels != m.in_channels:
        kind = {1: "grayscale (1 channel)", 3: "RGB (3 channels)"}.get(
            dataset.channels, f"{dataset.channels} channels")
        raise ConfigError(f"key 'models.in_channels': the data is {kind} but the models take "
                          f"{m.in_channels}; set "
                          f"models.in_channels={dataset.channels}")
    if len(dataset.class_names) != m.num_classes:
        raise ConfigError(f"key 'models.num_classes': the data has {len(dataset.class_names)} "
                          f"classes ({', '.join(dataset.class_names)}) but the models predict "
                          f"{m.num_classes}; set models.num_classes={len(dataset.class_names)}")
    weights = cfg.stage1.class_weights
    if cfg.data.dataset in ("folder", "volume") and weights == REFERENCE_CLASS_WEIGHTS:
        raise ConfigError(
            f"key 'stage1.class_weights': {weights} are the reference implementation's "
            f"weights for its battery phases (the config's default), not of your classes "
            f"({', '.join(dataset.class_names)}); give your own ('paser data check' prints "
            "some from your training masks), or stage1.class_weights=null for none")
    if weights and len(weights) != m.num_classes:
        raise ConfigError(f"key 'stage1.class_weights': {len(weights)} weights for "
                          f"{m.num_classes} classes; give one per class, or null ('paser data "
                          "check DIR' suggests some)")


def streams(cfg: DataConfig, datasets: Iterable[SegmentationFiles]) -> bool:
    """Whether ``data.stream`` reads these splits from disk: ``auto`` does when holding
    them in memory (float32 images, uint8 masks) would take more than
    ``data.stream_above_mb``."""
    if cfg.stream != "auto":
        return cfg.stream == "always"
    size = sum(len(d) * d.size[0] * d.size[1] * (4 * d.channels + 1) for d in datasets)
    return size > cfg.stream_above_mb * 2**20


def validation_split(cfg: DataConfig, progress: bool = True, channels: int | None = None
                     ) -> Tensors:
    """The configured dataset's validation split alone: read from disk for file datasets
    (at ``channels``, the models' ``in_channels``: :func:`open_split`), in memory for noisy
    MNIST (built with its other splits)."""
    built = kind(cfg).build
    if built is not None:
        return built(cfg).validation
    return on_disk(as_tiles(cfg, open_split(cfg, "validation", progress, channels)),
                   cfg.workers)
