"""Datasets: the battery layout (real or synthetic), your own folders, Cityscapes and noisy
MNIST (:mod:`~paser.data.registry`), the split containers the stages read
(:mod:`~paser.data.tensors`) and the stage split (:mod:`~paser.data.stages`)."""

from __future__ import annotations

from paser.data.battery import (
    CLASS_NAMES,
    MASK_IGNORE,
    SPLITS,
    BatteryDataset,
    SegmentationFiles,
    decode_label,
    read_label,
    split_three,
)
from paser.data.images import Intensity, read_image
from paser.data.registry import (
    data_intensity,
    describe,
    ensure_dataset,
    label_codec,
    open_split,
    synthetic_root,
)
from paser.data.stages import load_stage_data, streams, validation_split
from paser.data.tensors import IGNORE, OnDisk, StageData, Tensors, labels, on_disk, to_tensors

__all__ = [
    "CLASS_NAMES", "IGNORE", "Intensity", "MASK_IGNORE", "SPLITS", "BatteryDataset", "OnDisk",
    "SegmentationFiles", "StageData", "Tensors", "data_intensity", "decode_label", "describe",
    "ensure_dataset", "label_codec", "labels", "load_stage_data", "on_disk", "open_split",
    "read_image", "read_label", "split_three", "streams", "synthetic_root", "to_tensors",
    "validation_split",
]
