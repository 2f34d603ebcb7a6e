"""Datasets: the battery layout (real or synthetic) and the stage split."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from paser.config import DataConfig
from paser.data.battery import (
    CLASS_NAMES,
    SPLITS,
    BatteryDataset,
    decode_label,
    encode_label,
    read_image,
    read_label,
    split_three,
)
from paser.errors import DataError

__all__ = [
    "CLASS_NAMES", "SPLITS", "BatteryDataset", "StageData", "Tensors", "decode_label",
    "describe", "encode_label", "ensure_dataset", "load_stage_data", "read_image", "read_label",
    "split_three", "to_tensors", "validation_split",
]


def ensure_dataset(cfg: DataConfig, progress: bool = True) -> Path:
    """The dataset root; the synthetic set is generated into the cache on first use.

    Generation writes to a temporary sibling folder and renames it when complete,
    so an interrupted generation never leaves a half dataset behind.
    """
    root = cfg.resolved_root()
    if cfg.root is not None:
        if not root.is_dir():
            raise DataError(f"data.root {root} does not exist; point it at a dataset folder")
        return root
    if (root / "stats.json").is_file():
        return root
    from paser.data.synthetic import generate_dataset

    s = cfg.synthetic
    tmp = root.with_name(root.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    generate_dataset(tmp, s.n_train, s.n_val, s.n_test, s.height, s.width, seed=s.seed,
                     progress=progress)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(root)
    return root


@dataclass
class Tensors:
    """A split held in memory: ``images`` float32 [N, C, H, W], ``masks`` uint8 [N, H, W];
    optionally ``groups`` int64 [N], a known condition of each sample (noisy MNIST: its
    blur type) named by ``group_names``."""

    images: torch.Tensor
    masks: torch.Tensor
    ids: list[str]
    groups: torch.Tensor | None = None
    group_names: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, idx: list[int] | torch.Tensor) -> Tensors:
        index = torch.as_tensor(idx, dtype=torch.long)
        return Tensors(self.images[index], self.masks[index],
                       [self.ids[i] for i in index.tolist()],
                       None if self.groups is None else self.groups[index], self.group_names)

    def in_groups(self, groups: list[int] | None, key: str = "groups") -> Tensors:
        """The samples whose group is in ``groups`` (all of them for ``None``)."""
        if groups is None:
            return self
        if self.groups is None:
            raise DataError(f"key '{key}': this dataset has no sample groups (noisy MNIST has: "
                            "its blur types); set it to null")
        bad = [g for g in groups if not 0 <= g < len(self.group_names)]
        if bad:
            raise DataError(f"key '{key}': groups {bad} do not exist; this dataset has "
                            + ", ".join(f"{i} {n}" for i, n in enumerate(self.group_names)))
        return self.subset(torch.isin(self.groups, torch.tensor(groups)).nonzero()[:, 0])


def to_tensors(dataset: Dataset) -> Tensors:
    """Stack a dataset into memory (masks as uint8: class indices < 256)."""
    items = [dataset[i] for i in range(len(dataset))]
    if not items:
        raise DataError("empty dataset")
    return Tensors(
        torch.stack([it["image"] for it in items]),
        torch.stack([it["mask"] for it in items]).to(torch.uint8),
        [it["id"] for it in items],
    )


def iter_batches(data: Tensors | Dataset, batch_size: int, num_workers: int = 0
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(images [B, C, H, W], masks [B, H, W])`` batches of a split held in memory
    (slices), or of a dataset read lazily from disk by a DataLoader with ``num_workers``
    worker processes: only the batches in flight are in memory."""
    if isinstance(data, Tensors):
        for i in range(0, len(data), batch_size):
            yield data.images[i:i + batch_size], data.masks[i:i + batch_size]
        return
    for batch in DataLoader(data, batch_size=batch_size, num_workers=num_workers):
        yield batch["image"], batch["mask"]


@dataclass
class StageData:
    """D_pre, D_rl, D_ft (three cuts of the training split), validation and test."""

    pre: Tensors
    rl: Tensors
    ft: Tensors
    validation: Tensors
    test: Tensors


def describe(cfg: DataConfig, progress: bool = True) -> str:
    """Make the dataset available (generate the synthetic set if needed); say what it is."""
    if cfg.dataset == "mnist-noisy":
        from paser.data.mnist import resolve_source

        return f"noisy MNIST, source {resolve_source(cfg.mnist)}"
    return str(ensure_dataset(cfg, progress=progress))


def load_stage_data(cfg: DataConfig, progress: bool = True) -> StageData:
    """D_pre / D_rl / D_ft, validation and test of the configured dataset, in memory."""
    if cfg.dataset == "mnist-noisy":
        return _mnist_stage_data(cfg)
    root = ensure_dataset(cfg, progress=progress)
    train = to_tensors(BatteryDataset(root, "train"))
    pre, rl, ft = split_three(len(train), cfg.split, cfg.split_seed)
    val, test = (to_tensors(BatteryDataset(root, s)) for s in ("validation", "test"))
    for name, t in (("validation", val), ("test", test)):
        if t.images.shape[-2:] != train.images.shape[-2:]:
            raise DataError(
                f"{root}/{name}_images: size {tuple(t.images.shape[-2:])} differs from train "
                f"{tuple(train.images.shape[-2:])}; all splits must share one image size"
            )
    return StageData(train.subset(pre), train.subset(rl), train.subset(ft), val, test)


def validation_split(cfg: DataConfig, progress: bool = True) -> Tensors | Dataset:
    """The configured dataset's validation split alone: streamed from disk for the battery
    layout, in memory for noisy MNIST (built with its other splits)."""
    if cfg.dataset == "mnist-noisy":
        return _mnist_stage_data(cfg).validation
    return BatteryDataset(ensure_dataset(cfg, progress=progress), "validation")


def _mnist_stage_data(cfg: DataConfig) -> StageData:
    from paser.data.mnist import BLURS, build_splits

    splits = build_splits(cfg.mnist)
    t = {name: Tensors(s["images"], s["masks"], s["ids"], s["groups"], BLURS)
         for name, s in splits.items() if name != "source"}
    pre, rl, ft = split_three(len(t["train"]), cfg.split, cfg.split_seed)
    return StageData(t["train"].subset(pre), t["train"].subset(rl), t["train"].subset(ft),
                     t["validation"], t["test"])
