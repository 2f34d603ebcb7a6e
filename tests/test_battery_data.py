from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from paser.config import DataConfig
from paser.data import BatteryDataset, decode_label, split_three
from paser.data.registry import BATTERY_CODEC
from paser.data.stages import as_tiles
from paser.errors import DataError


def _png(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _layout(root, n=2, size=(8, 10), split="train"):
    rng = np.random.default_rng(0)
    for i in range(n):
        _png(root / f"{split}_images" / f"s{i}.png", rng.integers(0, 256, size, dtype=np.uint8))
        _png(root / f"{split}_label" / f"s{i}.png",
             rng.choice(np.array([0, 128, 255], dtype=np.uint8), size))
    return root


def test_label_codec_is_the_reference_one():
    raw = np.array([[0, 255, 128], [1, 254, 7]], dtype=np.uint8)
    assert decode_label(raw).tolist() == [[0, 1, 2], [2, 2, 2]]
    assert BATTERY_CODEC.encode(np.array([0, 1, 2])).tolist() == [0, 255, 128]
    assert decode_label(BATTERY_CODEC.encode(np.array([0, 1, 2]))).tolist() == [0, 1, 2]


def test_loader_reads_images_and_labels(tmp_path):
    ds = BatteryDataset(_layout(tmp_path), "train")
    item = ds[1]
    assert len(ds) == 2 and item["id"] == "s1" and ds.size == (8, 10)
    assert item["image"].shape == (1, 8, 10) and item["image"].dtype.is_floating_point
    assert 0.0 <= item["image"].min() and item["image"].max() <= 1.0
    raw = np.asarray(Image.open(tmp_path / "train_label" / "s1.png"))
    assert item["mask"].numpy().tolist() == decode_label(raw).tolist()


def test_sixteen_bit_images_scale_to_unit_range(tmp_path):
    _layout(tmp_path, n=1)
    arr = np.array([[0, 65535], [32768, 1000]], dtype=np.uint16)
    Image.fromarray(arr).save(tmp_path / "train_images" / "s0.png")
    _png(tmp_path / "train_label" / "s0.png", np.zeros((2, 2), np.uint8))
    img = BatteryDataset(tmp_path, "train")[0]["image"]
    assert img[0, 0, 1].item() == pytest.approx(1.0) and img[0, 1, 0].item() == pytest.approx(
        32768 / 65535)


def test_three_way_split_is_seeded_disjoint_and_complete():
    a = split_three(1270, (0.34, 0.33, 0.33), seed=42)
    assert [len(p) for p in a] == [432, 419, 419]
    assert sorted(a[0] + a[1] + a[2]) == list(range(1270))
    assert a == split_three(1270, (0.34, 0.33, 0.33), seed=42)
    assert a != split_three(1270, (0.34, 0.33, 0.33), seed=43)
    # the reference's cut (random_split by proportions) for every n but 3, where it left D_ft
    # empty with a warning on stderr (a test's one-line error check then failed by order)
    import warnings

    import torch
    from torch.utils.data import random_split

    for n in (4, 5, 7, 80, 241):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = random_split(range(n), [0.34, 0.33, 0.33],
                               generator=torch.Generator().manual_seed(42))
        assert split_three(n) == tuple(sorted(p.indices) for p in ref)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert sorted(len(p) for p in split_three(3)) == [1, 1, 1]


@pytest.mark.parametrize(
    ("breakage", "fragment"),
    [
        ("no_folder", "folder not found"),
        ("missing_label", "label not found for image"),
        ("corrupt", "cannot read the image"),
        ("truncated", "cannot read the image"),
        ("label_size", "s1.png is 4x4 (HxW); they must match; save the mask at its "
         "image's size (a resized mask resampled by nearest neighbour, not interpolated)"),
        ("mixed_sizes", "set data.tile=[H,W]"),
        ("empty", "no images"),
    ],
)
def test_bad_data_gets_one_clear_error_naming_the_file(tmp_path, breakage, fragment):
    root = _layout(tmp_path, n=2)
    bad = root / "train_images" / "s1.png"
    if breakage == "no_folder":
        root = tmp_path / "nowhere"
    elif breakage == "missing_label":
        (root / "train_label" / "s1.png").unlink()
    elif breakage == "corrupt":
        bad.write_bytes(b"not a png at all")
    elif breakage == "truncated":
        bad.write_bytes(bad.read_bytes()[:60])
    elif breakage == "label_size":
        _png(root / "train_label" / "s1.png", np.zeros((4, 4), np.uint8))
    elif breakage == "mixed_sizes":
        _png(bad, np.zeros((9, 10), np.uint8))
        _png(root / "train_label" / "s1.png", np.zeros((9, 10), np.uint8))
    elif breakage == "empty":
        for p in (root / "train_images").iterdir():
            p.unlink()
    with pytest.raises(DataError) as err:
        ds = BatteryDataset(root, "train")
        [ds[i] for i in range(len(ds))]
        as_tiles(DataConfig(), ds)  # what a run does with a split (mixed sizes: tiles or this)
    msg = str(err.value)
    assert fragment in msg
    if breakage not in ("no_folder", "empty"):
        assert "s1.png" in msg


@pytest.mark.slow  # reader processes (a fork server that imports torch: seconds)
def test_a_split_on_disk_indexes_batches_and_subsets_like_one_in_memory(tmp_path):
    """The lazily read columns give exactly the stacked tensors, for every kind of index,
    through subsets, and batch by batch with 2 reader processes."""
    import torch

    from paser.data import on_disk, to_tensors

    ds = BatteryDataset(_layout(tmp_path, n=7), "train")
    lazy, full = on_disk(ds, workers=2), to_tensors(ds)
    assert lazy.streamed and not full.streamed
    assert lazy.images.shape == full.images.shape == (7, 1, 8, 10)
    assert lazy.masks.shape == full.masks.shape and lazy.ids == full.ids
    for index in (3, slice(1, 6, 2), [6, 0, 6], torch.tensor([2, 5])):
        assert torch.equal(lazy.images[index], full.images[index])
        assert torch.equal(lazy.masks[index], full.masks[index])
    sub, ref = lazy.subset([5, 1, 3]), full.subset([5, 1, 3])
    assert sub.streamed and sub.ids == ref.ids == ["s5", "s1", "s3"]
    assert torch.equal(sub.in_memory().images, ref.images)
    order = [torch.tensor([4, 0]), torch.tensor([6]), torch.tensor([1, 2, 3, 5])]
    for (xa, ya), (xb, yb) in zip(lazy.gather(order), full.gather(order), strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and ya.dtype == torch.int64
    assert [len(x) for x, _ in sub.batches(2)] == [2, 1]


@pytest.mark.slow  # reader processes (a fork server that imports torch: seconds)
def test_a_file_broken_after_the_split_was_opened_fails_with_one_line_from_a_reader(tmp_path):
    from paser.data import on_disk

    ds = BatteryDataset(_layout(tmp_path, n=4), "train")
    path = tmp_path / "train_images" / "s2.png"
    path.write_bytes(path.read_bytes()[:60])  # header intact, pixels cut off
    with pytest.raises(DataError) as info:
        list(on_disk(ds, workers=2).batches(2))
    assert str(info.value).startswith(f"{path}: cannot read the image")
    assert "Traceback" not in str(info.value)


def test_a_finished_run_finds_its_relative_synthetic_set_from_another_folder(tmp_path,
                                                                              monkeypatch):
    # make demo's runs/demo with data.cache_dir=runs/data, used by paser segment --budget
    # (which calibrates on validation) from another folder: the set is read where the run
    # made it, not generated again under the folder the command started in
    from pathlib import Path

    from paser.checkpoints import run_config
    from paser.config import load_config, save_config
    from paser.data.registry import synthetic_root

    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    # a seed of its own: the set of a demo run from /tmp (say) would be found in /tmp/runs/data
    cfg = load_config(preset="battery-quick", overrides=["data.cache_dir=runs/data",
                                                         "data.synthetic.seed=7919"])
    save_config(cfg, work / "runs" / "demo" / "config.yaml")
    name = synthetic_root(cfg.data).name
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert run_config(work / "runs" / "demo").data.cache_dir == Path("runs/data")  # nowhere
    (work / "runs" / "data" / name).mkdir(parents=True)
    (work / "runs" / "data" / name / "stats.json").write_text("{}")
    found = run_config(Path("..") / "work" / "runs" / "demo").data
    assert found.cache_dir == work / "runs" / "data"
    assert synthetic_root(found) == work / "runs" / "data" / name
    monkeypatch.chdir(work)  # where it was made: as saved
    assert run_config(Path("runs/demo")).data.cache_dir == Path("runs/data")
    # the run copied elsewhere (nothing above it holds the set): where data.json says it read it
    import json
    import shutil

    shutil.copytree(work / "runs" / "demo", tmp_path / "copy")
    monkeypatch.chdir(elsewhere)
    assert run_config(tmp_path / "copy").data.cache_dir == Path("runs/data")  # no data.json
    image = work / "runs" / "data" / name / "train_images" / "train_00000.png"
    (tmp_path / "copy" / "data.json").write_text(json.dumps({"stat": {str(image): [1, 2, "x"]}}))
    assert run_config(tmp_path / "copy").data.cache_dir == work / "runs" / "data"


def test_a_group_past_the_last_is_refused():
    import torch

    from paser.data.tensors import Tensors
    from paser.errors import DataError

    t = Tensors(torch.zeros(2, 1, 4, 4), torch.zeros(2, 4, 4, dtype=torch.uint8), ["a", "b"],
                torch.tensor([0, 1]), ("blur", "noise"))
    assert t.in_groups([1]).ids == ["b"]
    with pytest.raises(DataError, match=r"groups \[2\] do not exist"):
        t.in_groups([2])


def test_a_label_pairs_with_its_image_by_stem_in_either_unicode_form(tmp_path):
    """The battery layout looked a label up by its image's exact name: a label saved on a
    Mac (NFD, u and a combining diaeresis) was 'label not found' beside a Linux-named image
    (NFC), and a .tif image's .png label was too, while the error said to save 'the image's
    name, as .png or .tif'. The folder layout pairs both; so does this one now, the label
    of the very name first."""
    import unicodedata

    _layout(tmp_path, n=1)
    rng = np.random.default_rng(1)
    composed = unicodedata.normalize("NFC", "Zelle ü")
    _png(tmp_path / "train_images" / f"{composed}.png", rng.integers(0, 256, (8, 10), np.uint8))
    label = rng.choice(np.array([0, 128, 255], dtype=np.uint8), (8, 10))
    _png(tmp_path / "train_label" / f"{unicodedata.normalize('NFD', 'Zelle ü')}.png", label)
    Image.fromarray(rng.integers(0, 256, (8, 10), np.uint8)).save(
        tmp_path / "train_images" / "t1.tif")
    tif_label = rng.choice(np.array([0, 128, 255], dtype=np.uint8), (8, 10))
    _png(tmp_path / "train_label" / "t1.png", tif_label)
    ds = BatteryDataset(tmp_path, "train")
    assert ds.ids == [composed, "s0", "t1"]
    assert ds[0]["mask"].numpy().tolist() == decode_label(label).tolist()
    assert ds[2]["mask"].numpy().tolist() == decode_label(tif_label).tolist()
    _png(tmp_path / "train_label" / "t1.tiff", tif_label)
    with pytest.raises(DataError) as err:
        BatteryDataset(tmp_path, "train")
    assert str(err.value) == (
        f"{tmp_path / 'train_label' / 't1.png'} and {tmp_path / 'train_label' / 't1.tiff'} are "
        f"both labels of {tmp_path / 'train_images' / 't1.tif'} (an image's label is the one "
        "file of its name in the label folder): keep one")


def test_the_battery_layout_reads_what_a_folder_reads_and_names_what_it_skips(tmp_path):
    """A .jpg and a .bmp slice in train_images/ were left out of the split without a word
    (the layout read .png and .tif alone; a folder dataset and paser segment read both),
    and a .jp2 one, which paser does not read, was not named by paser data check."""
    from paser.data.registry import check_dataset

    for split in ("validation", "test"):
        _layout(tmp_path, n=1, split=split)
    _layout(tmp_path, n=2)
    rng = np.random.default_rng(1)
    slice_ = rng.integers(0, 256, (8, 10), dtype=np.uint8)
    Image.fromarray(slice_).save(tmp_path / "train_images" / "s2.jpg", quality=100)
    Image.fromarray(slice_).save(tmp_path / "train_images" / "s3.bmp")
    for name in ("s2", "s3"):
        _png(tmp_path / "train_label" / f"{name}.png", np.zeros((8, 10), np.uint8))
    (tmp_path / "train_images" / "s4.jp2").write_bytes(b"\0")
    ds = BatteryDataset(tmp_path, "train")
    assert ds.ids == ["s0", "s1", "s2", "s3"]
    assert ds[3]["image"][0].numpy() == pytest.approx(slice_ / 255)
    report = check_dataset(tmp_path, workers=0, show_progress=False)
    assert report["splits"]["train"]["images"] == 4
    assert report["unread_images"] == [str(tmp_path / "train_images" / "s4.jp2")]
    for f in (tmp_path / "validation_images").iterdir():
        f.rename(f.with_suffix(".jp2"))
    with pytest.raises(DataError, match=r"validation_images: no image paser reads; skipped 1 "
                       r"file in a format paser does not read \(1 \.jp2"):
        BatteryDataset(tmp_path, "validation")


def test_an_ome_tiffs_label_of_its_very_stem_pairs_with_it(tmp_path):
    """s.ome.png is the label of s.ome.tif by its stem, as docs/data.md says ('its stem as
    another of these types') and as the folder layout pairs it, yet the battery layout
    looked its stem up without '.ome' alone: 'label not found ... save the label there
    (the image's name, as .png or .tif)', the name it had."""
    _layout(tmp_path, n=1)
    Image.fromarray(np.eye(8, 10, dtype=np.uint8) * 200).save(
        tmp_path / "train_images" / "s.ome.tif")
    label = np.random.default_rng(2).choice(np.array([0, 128, 255], dtype=np.uint8), (8, 10))
    _png(tmp_path / "train_label" / "s.ome.png", label)
    ds = BatteryDataset(tmp_path, "train")
    assert ds.ids == ["s.ome", "s0"]
    assert ds[0]["mask"].numpy().tolist() == decode_label(label).tolist()


def test_a_battery_folder_named_otherwise_says_what_to_rename(tmp_path):
    """test_labels/ for test_label/ (or Train_images/ for train_images/) stopped with
    'folder not found' alone, where a folder dataset's images/ named otherwise is named."""
    from paser.data.registry import detect_layout

    root = _layout(tmp_path / "b", split="test")
    (root / "test_label").rename(root / "test_labels")
    with pytest.raises(DataError) as err:
        BatteryDataset(root, "test")
    assert str(err.value).endswith(
        f"(see docs/data.md) ({root / 'test_labels'} is there: rename it test_label/)")
    (root / "test_labels").rename(root / "test_label")
    assert len(BatteryDataset(root, "test")) == 2
    root = _layout(tmp_path / "c")
    (root / "train_images").rename(root / "Train_images")
    with pytest.raises(DataError) as err:  # not found as the battery layout at all
        detect_layout(root)
    assert str(err.value).endswith(
        f"train_images/ (the battery layout); {root / 'Train_images'} is there: rename it "
        "train_images/")


def test_a_folder_inside_a_dataset_names_the_dataset(tmp_path, monkeypatch):
    """`paser data check mydata/images` (or a split's folder) said 'not a dataset folder',
    or told the user to write a classes.yaml into the split folder; it names the dataset."""
    from paser.data.registry import detect_layout

    (tmp_path / "mydata" / "train" / "images").mkdir(parents=True)
    (tmp_path / "mydata" / "classes.yaml").write_text("classes: {0: a, 1: b}\n")
    battery = _layout(tmp_path / "batt")
    monkeypatch.chdir(tmp_path)
    for given, dataset, marker in ((Path("mydata/train/images"), "mydata", "classes.yaml"),
                                   (Path("mydata/train"), "mydata", "classes.yaml"),
                                   (battery / "train_images", str(battery), "train_images")):
        with pytest.raises(DataError) as err:
            detect_layout(given)
        assert str(err.value) == (f"{given}: a folder inside the dataset {dataset} (its "
                                  f"{marker} is there); give the dataset's own folder: "
                                  f"{dataset}")
    assert detect_layout(Path("mydata")) == "folder" and detect_layout(battery) == "battery"
