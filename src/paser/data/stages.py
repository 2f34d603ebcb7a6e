"""The five splits a run trains and evaluates on: D_pre, D_rl and D_ft cut from the
training split, validation and test, in memory or streamed from disk."""

from __future__ import annotations

from collections.abc import Iterable

from paser.config import DataConfig, ExperimentConfig
from paser.data.battery import SPLITS, SegmentationFiles, split_three
from paser.data.registry import kind, open_split
from paser.data.tensors import StageData, Tensors, on_disk, to_tensors
from paser.errors import ConfigError, DataError


def load_stage_data(cfg: ExperimentConfig, progress: bool = True) -> StageData:
    """D_pre / D_rl / D_ft, validation and test of the configured dataset: in memory, or
    read from disk as batches are asked for (``data.stream``). The data's channels and
    classes must be the models' (``models.in_channels``, ``models.num_classes``)."""
    data = cfg.data
    built = kind(data).build
    if built is not None:
        return built(data)
    sets = {s: open_split(data, s, progress) for s in SPLITS}
    train = sets["train"]
    for name in ("validation", "test"):
        if sets[name].size != train.size:
            raise DataError(
                f"{sets[name].images[0].parent}: size {sets[name].size} differs from train "
                f"{train.size}; all splits must share one image size"
            )
    check_fits_models(cfg, train)
    stream = streams(data, sets.values())
    train, val, test = ((on_disk(d, data.workers) if stream else to_tensors(d))
                        for d in sets.values())
    pre, rl, ft = split_three(len(train), data.split, data.split_seed)
    return StageData(train.subset(pre), train.subset(rl), train.subset(ft), val, test)


def check_fits_models(cfg: ExperimentConfig, dataset: SegmentationFiles) -> None:
    """The models take the data's channels and predict its classes, or a ConfigError says
    which key to set."""
    m = cfg.models
    if dataset.channels != m.in_channels:
        kind = "RGB" if dataset.channels == 3 else "grayscale"
        raise ConfigError(f"key 'models.in_channels': the data is {kind} ({dataset.channels} "
                          f"channels) but the models take {m.in_channels}; set "
                          f"models.in_channels={dataset.channels}")
    if len(dataset.class_names) != m.num_classes:
        raise ConfigError(f"key 'models.num_classes': the data has {len(dataset.class_names)} "
                          f"classes ({', '.join(dataset.class_names)}) but the models predict "
                          f"{m.num_classes}; set models.num_classes={len(dataset.class_names)}")
    weights = cfg.stage1.class_weights
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


def validation_split(cfg: DataConfig, progress: bool = True) -> Tensors:
    """The configured dataset's validation split alone: read from disk for file datasets,
    in memory for noisy MNIST (built with its other splits)."""
    built = kind(cfg).build
    if built is not None:
        return built(cfg).validation
    return on_disk(open_split(cfg, "validation", progress), cfg.workers)
