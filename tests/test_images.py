"""One image reader: the same file gives the same tensor in training, evaluation, data check
and ``paser segment``; floats and signed integers scale by one window fitted on the
training images and kept in the run."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from paser.config import DataConfig
from paser.data import data_intensity, on_disk, open_split
from paser.data.images import (
    Intensity,
    as_input,
    fit_window,
    gray_in_colour,
    probe,
    read_array,
    read_image,
    read_mask,
    window_of,
)
from paser.data.registry import check_dataset
from paser.errors import DataError
from paser.segment import read_input

RNG = np.random.default_rng(0)
H, W = 6, 8


def _kinds(folder, gray: np.ndarray) -> dict[str, str]:
    """The same scene as every kind of file a user has; returns name -> kind."""
    folder.mkdir(parents=True)
    Image.fromarray(gray).save(folder / "u8.png")
    Image.fromarray(gray.astype(np.uint16) * 257).save(folder / "u16.png")
    tifffile.imwrite(folder / "u16.tif", gray.astype(np.uint16) * 257)
    Image.fromarray(np.dstack([gray] * 3)).save(folder / "rgb.png")
    pal = Image.fromarray(gray // 64, mode="L").convert("P")  # indices 0..3
    pal.putpalette([0, 0, 0, 90, 90, 90, 170, 170, 170, 255, 255, 255] + [0] * 756)
    pal.save(folder / "palette.png")
    tifffile.imwrite(folder / "f32.tif", gray.astype(np.float32) * 10.0 - 500.0)  # a recon
    tifffile.imwrite(folder / "i16.tif", gray.astype(np.int16) * 8 - 1000)
    tifffile.imwrite(folder / "pages.tif", np.stack([gray, 255 - gray, gray]),
                     photometric="minisblack")
    return {p.name: p.suffix for p in folder.iterdir()}


def test_gray_in_colour_compares_red_green_and_blue_only():
    gray = RNG.integers(0, 256, (H, W), dtype=np.uint8)
    rgb = np.dstack([gray] * 3)
    assert gray_in_colour(rgb)
    assert gray_in_colour(np.dstack([rgb, 255 - gray]))  # alpha is not a colour
    off = rgb.copy()
    off[2, 3, 1] ^= 1  # one value of one pixel
    assert not gray_in_colour(off)
    assert not gray_in_colour(gray) and not gray_in_colour(np.dstack([gray] * 2))


def _folder_dataset(root, gray):
    (root / "classes.yaml").parent.mkdir(parents=True, exist_ok=True)
    (root / "classes.yaml").write_text("classes: {0: a, 1: b}\n")
    names = {}
    for split in ("train", "validation", "test"):
        names[split] = _kinds(root / split / "images", gray)
        (root / split / "masks").mkdir()
        for name in names[split]:
            Image.fromarray((gray > 127).astype(np.uint8)).save(
                root / split / "masks" / f"{name.split('.')[0]}.png")
    return names


def test_every_kind_of_file_gives_the_same_tensor_on_every_path(tmp_path):
    gray = RNG.integers(0, 256, (H, W), dtype=np.uint8)
    _folder_dataset(tmp_path / "d", gray)
    cfg = DataConfig(dataset="folder", root=tmp_path / "d")
    window = data_intensity(cfg)
    # fitted on the training floats and signed integers only: their 0.5 / 99.5 percentiles
    both = np.concatenate([gray.astype(np.float32).ravel() * 10 - 500,
                           gray.astype(np.float32).ravel() * 8 - 1000])
    assert window.window == pytest.approx(tuple(np.percentile(both, [0.5, 99.5])), rel=1e-6)
    window.save(tmp_path / "run")
    kept = Intensity.load(tmp_path / "run")
    assert kept == window
    for split in ("train", "test"):
        # a palette of grays and an RGB image of equal channels: gray saved as colour, read
        # as gray; at three channels for models that take three (the path of colour data)
        assert open_split(cfg, split).channels == 1
        ds = open_split(cfg, split, channels=3)
        assert ds.channels == 3 and ds.gray_colour == 2 and ds.intensity == window
        streamed = dict(zip(ds.ids, on_disk(ds, 0).images[:], strict=True))
        for i, path in enumerate(ds.images):
            trained = ds.image(i)  # stage 1 to the report, evaluate, data check
            segmented = torch.from_numpy(read_input(path, 3, kept)[0])  # segment
            assert torch.equal(trained, segmented), path.name
            assert torch.equal(streamed[path.stem], segmented), path.name
    # what each kind became, on one channel
    for name, want in [("u8.png", gray / 255), ("u16.png", gray / 255), ("u16.tif", gray / 255),
                       ("rgb.png", gray / 255), ("pages.tif", gray / 255),
                       ("palette.png", np.array([0, 90, 170, 255])[gray // 64] / 255)]:
        x = read_image(tmp_path / "d" / "train" / "images" / name, 1, kept)
        assert np.allclose(x[0], want, atol=1e-6), name
    lo, hi = window.window
    x = read_image(tmp_path / "d" / "train" / "images" / "f32.tif", 1, kept)
    assert np.allclose(x[0], np.clip((gray * 10.0 - 500 - lo) / (hi - lo), 0, 1), atol=1e-6)
    report = check_dataset(tmp_path / "d", workers=0, show_progress=False)
    assert report["intensity"]["window"] == pytest.approx(list(window.window))
    assert not report["intensity"]["given"]  # fitted: data check says so
    given = check_dataset(tmp_path / "d", workers=0, show_progress=False, overrides=["data.window=[0,500]"])
    assert given["intensity"]["window"] == [0, 500] and given["intensity"]["given"]
    assert report["files"]["train"] == {"uint8 PNG": 3, "uint16 PNG": 1, "uint16 TIF": 1,
                                        "float32 TIF": 1, "int16 TIF": 1, "uint8 TIF stack": 1}


def test_the_same_scene_in_five_formats_is_one_tensor(tmp_path):
    """8-bit PNG, 16-bit PNG, RGB PNG, float32 TIFF in [0, 1] and 16-bit TIFF: a run trained
    on 8-bit images (no window) sees one tensor, so it gives one label map."""
    gray = RNG.integers(0, 256, (H, W), dtype=np.uint8)
    _kinds(tmp_path / "k", gray)
    tifffile.imwrite(tmp_path / "k" / "unit.tif", gray.astype(np.float32) / 255)
    # compressed as instruments, Fiji and Pillow write them (tifffile decodes LZW and
    # PackBits only with imagecodecs)
    tifffile.imwrite(tmp_path / "k" / "lzw.tif", gray.astype(np.uint16) * 257,
                     compression="lzw")
    Image.fromarray(gray).save(tmp_path / "k" / "packbits.tif", compression="packbits")
    ref = read_image(tmp_path / "k" / "u8.png", 1)
    for name in ("u16.png", "rgb.png", "unit.tif", "u16.tif", "lzw.tif", "packbits.tif"):
        assert np.array_equal(read_image(tmp_path / "k" / name, 1), ref), name
    # big-endian 16-bit (HDF5, zarr) is scaled by its type's range as little-endian is
    u16 = gray.astype(np.uint16) * 257
    assert np.array_equal(Intensity().scale(u16.astype(">u2")), Intensity().scale(u16))
    # a bilevel (1-bit) PNG is its 0/255 8-bit twin, not 0 and 1/255
    binary = gray > 127
    Image.fromarray(binary).save(tmp_path / "k" / "bits.png")
    Image.fromarray(binary.astype(np.uint8) * 255).save(tmp_path / "k" / "bytes.png")
    assert Image.open(tmp_path / "k" / "bits.png").mode == "1"
    assert np.array_equal(read_image(tmp_path / "k" / "bits.png", 1),
                          read_image(tmp_path / "k" / "bytes.png", 1))


@pytest.mark.parametrize("layout", ["folder", "battery"])
def test_training_images_added_in_the_same_process_are_in_the_intensity_window(tmp_path,
                                                                                layout):
    """The window was cached by the config alone: a folder of float slices checked, given
    two more training images and opened again in the same process (a notebook, a second
    run) kept the window of the first two, [0.0044, 1.96] where the four give [0.0062,
    3.97], and a run trained with it and saved it as intensity.json."""
    root = tmp_path / layout
    mask = np.zeros((8, 8), np.uint8)
    if layout == "folder":
        (root / "train").mkdir(parents=True)
        (root / "classes.yaml").write_text("classes: {0: a, 1: b}\n")
        dirs = {s: (root / s / "images", root / s / "masks") for s in
                ("train", "validation", "test")}
    else:
        dirs = {s: (root / f"{s}_images", root / f"{s}_label") for s in
                ("train", "validation", "test")}
    slices = np.arange(4, dtype=np.float32)[:, None, None] + np.random.default_rng(0).random(
        (4, 8, 8), dtype=np.float32)  # image z holds z..z+1

    def save(split, name, image):
        for d in dirs[split]:
            d.mkdir(parents=True, exist_ok=True)
        tifffile.imwrite(dirs[split][0] / f"{name}.tif", image)
        Image.fromarray(mask).save(dirs[split][1] / f"{name}.png")

    for split in ("validation", "test"):
        save(split, "v", slices[0])
    for z in (0, 1):
        save("train", f"s{z}", slices[z])
    cfg = DataConfig(dataset=layout, root=root)

    def window_of(zs):
        return pytest.approx(tuple(np.percentile(slices[zs].ravel(), [0.5, 99.5])), rel=1e-5)

    assert data_intensity(cfg).window == window_of([0, 1])
    for z in (2, 3):
        save("train", f"s{z}", slices[z])
    assert len(open_split(cfg, "train")) == 4
    assert data_intensity(cfg).window == window_of([0, 1, 2, 3])


def test_a_window_by_hand_per_image_scaling_and_their_errors(tmp_path):
    f = np.array([[-2.0, 0.0], [2.0, 6.0]], dtype=np.float32)
    tifffile.imwrite(tmp_path / "f.tif", f)
    notes: list[str] = []
    assert np.allclose(Intensity((0.0, 4.0)).scale(f), [[0, 0], [0.5, 1]])  # clipped
    x = Intensity(mode="per_image").scale(read_array(tmp_path / "f.tif"), "f.tif", notes)
    assert np.allclose(x, [[0, 0.25], [0.5, 1]]) and "per_image" in notes[0]
    notes = []
    Intensity().scale(f, "f.tif", notes)  # a run with no window, given a float image
    assert "no intensity window" in notes[0]
    gone = Intensity.load(tmp_path)  # a run without its intensity.json: says so alone
    assert gone == Intensity() and "it has no intensity.json" in gone.why_none
    notes = []
    gone.scale(f, "f.tif", notes)
    assert notes[0].endswith("(the run keeps no intensity window: it has no intensity.json: "
                             "made before 2026-12-04, when runs kept none, or the file was "
                             "removed)")
    Intensity().save(tmp_path)  # as a run trained on 8/16-bit images writes it
    assert Intensity.load(tmp_path).why_none == "it trained on 8/16-bit images alone, which need none"
    with pytest.raises(DataError, match="NaN or Inf"):
        Intensity((0.0, 1.0)).scale(np.array([[np.nan]], np.float32), "n.tif")
    with pytest.raises(ValueError, match="lo < hi"):
        DataConfig(window=(3.0, 1.0))
    assert DataConfig(window=(0.0, 1.0), intensity="window").window == (0.0, 1.0)
    assert fit_window([tmp_path / "f.tif"]) == pytest.approx(
        tuple(np.percentile(f.ravel(), [0.5, 99.5])))
    Image.fromarray(np.zeros((2, 2), np.uint8)).save(tmp_path / "u8.png")
    assert fit_window([tmp_path / "u8.png"]) is None  # nothing needs a window
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "intensity.json").write_text("{")
    with pytest.raises(DataError, match="intensity.json: not an intensity file"):
        Intensity.load(tmp_path / "kept")
    assert Intensity.load(tmp_path / "none") == Intensity()  # a run older than the window
    # what older runs and paser segment folders keep: the keys added since only off default
    assert Intensity((0.0, 1.0)).to_dict() == {"mode": "window", "window": [0.0, 1.0],
                                               "percentiles": [0.5, 99.5]}
    # 12-bit camera data in 16-bit files: a window the user gives scales 16-bit (and 8-bit)
    # images too, and the run keeps that it was given
    twelve = np.array([[0, 1000], [4095, 65535]], np.uint16)
    given = Intensity((0.0, 4095.0), given=True)
    assert np.allclose(given.scale(twelve), [[0, 1000 / 4095], [1, 1]])
    assert np.allclose(Intensity((0.0, 4095.0)).scale(twelve), twelve / 65535)  # fitted
    given.save(tmp_path / "kept")
    assert Intensity.load(tmp_path / "kept") == given
    assert given.describe() == "every image scaled by the window [0, 4095]"
    # NaN outside a reconstruction's field of view: refused, or 0 with data.nonfinite fill
    fov = np.array([[np.nan, 1.0], [3.0, -np.inf]], np.float32)
    with pytest.raises(DataError, match=r"NaN or Inf values \(2 of 4 pixels, 50.0 %.*"
                                        "data.nonfinite=fill"):
        Intensity((1.0, 3.0)).scale(fov, "fov.tif")
    notes = []
    filled = Intensity((1.0, 3.0), nonfinite="fill")
    assert np.array_equal(filled.scale(fov, "fov.tif", notes), [[0, 0], [1, 0]])
    assert notes == ["2 NaN or Inf pixels set to 0 (data.nonfinite fill)"]
    notes = []  # a slice outside the scan, all NaN: 0 as asked, not a failed volume
    assert np.array_equal(filled.scale(np.full((2, 2), np.nan), "z.tif", notes), np.zeros((2, 2)))
    assert notes == ["every pixel NaN or Inf: all set to 0 (data.nonfinite fill)"]
    assert np.array_equal(Intensity(mode="per_image", nonfinite="fill").scale(fov),
                          [[0, 0], [1, 0]])  # min-max of the finite pixels
    filled.save(tmp_path / "kept")
    assert Intensity.load(tmp_path / "kept") == filled
    tifffile.imwrite(tmp_path / "fov.tif", fov)
    assert fit_window([tmp_path / "fov.tif"]) == pytest.approx(
        tuple(np.percentile([1.0, 3.0], [0.5, 99.5])))  # fitted on the finite pixels
    # a fill outside the field of view (40 % of the pixels at -1000, or at float32's least
    # value) is left out of the fit: the window is the scan's own
    scan = np.random.default_rng(0).normal(0.01, 0.003, (64, 64)).astype(np.float32)
    outside = np.hypot(*np.mgrid[-32:32, -32:32]) > 28
    for fill in (0.0, -1000.0, float(np.finfo(np.float32).min)):
        filled_scan = np.where(outside, np.float32(fill), scan)
        assert window_of([(filled_scan, "s")]) == pytest.approx(
            window_of([(scan[~outside], "s")]))
    # a window of extreme values (a float32 fill of -3.4e38) does not overflow to Inf
    huge = np.array([[-3e38, 0.0], [3e38, 1.0]], np.float32)
    assert np.allclose(Intensity((-3e38, 3e38)).scale(huge), [[0, 0.5], [1, 0.5]])


def test_a_window_is_fitted_without_constant_frames_and_keeps_every_level():
    scan = np.random.default_rng(0).normal(100.0, 10.0, (32, 32)).astype(np.float32)
    alone = window_of([(scan, "scan")])
    # a saturated and a dark frame beside it would have been the window's ends
    frames = [(scan, "scan"), (np.full((32, 32), 1e6, np.float32), "white"),
              (np.full((32, 32), -1e6, np.float32), "black")]
    assert window_of(frames) == pytest.approx(alone)
    assert window_of([(np.full((4, 4), 7.0), "c")]) == (7.0, 8.0)  # only constant ones: kept
    # integers past float32's 2^24 levels, and float64 with an offset, keep every level
    big = (10**10 + np.arange(1000)).astype(np.int64).reshape(20, 50)
    assert window_of([(big, "big")]) == pytest.approx(tuple(np.percentile(big, [0.5, 99.5])))
    x = Intensity((1e10, 1e10 + 999)).scale(big)
    assert len(np.unique(x)) == 1000 and x.min() == 0 and x.max() == 1
    fine = 1e6 + np.linspace(0, 1, 100).reshape(10, 10)
    assert len(np.unique(Intensity((1e6, 1e6 + 1)).scale(fine))) == 100
    # a finite float64 past float32's range is a value, clipped, not "NaN or Inf"
    wide = np.array([[1e300, 0.0], [0.5, 1.0]])
    assert np.array_equal(Intensity((0.0, 1.0)).scale(wide), [[1, 0], [0.5, 1]])
    # every pixel on one side of the window: the models see one value, and a note says so
    notes: list[str] = []
    Intensity((0.0, 1.0)).scale(np.full((4, 4), -5.0), "dark.tif", notes)
    assert notes == ["every pixel lies below the intensity window [0, 1], so the image reaches "
                     "the models as one value (an image of another kind or scale than the "
                     "window was fitted on, or a slice of fill only)"]
    notes = []
    fill = np.array([[np.nan, 7.0], [9.0, 8.0]], np.float32)  # NaN aside, all above
    Intensity((0.0, 1.0), nonfinite="fill").scale(fill, "f.tif", notes)
    assert "every pixel lies above" in notes[-1]
    notes = []  # mostly air under a CT window: clipping it is the window's point
    Intensity((0.0, 1.0)).scale(np.array([[-9.0, -9.0], [-9.0, 0.5]]), "air.tif", notes)
    assert notes == []
    # an empty (all-NaN) image leaves the constant frames in the fit
    assert window_of([(np.full((2, 2), np.nan), "a"), (np.full((2, 2), 5.0), "b")]) == (5.0, 6.0)


def test_masks_are_read_as_stored_and_bad_ones_say_what_to_do(tmp_path):
    """Masks give their stored values: a WhiteIsZero TIFF (ImageJ's inverting LUT) is not
    inverted, palette TIFFs and PNGs give indices, wider integers in 0..255 and an alpha
    channel are fine; JPEG, colours and values past 255 are errors that say what to do."""
    m = RNG.integers(0, 3, (H, W)).astype(np.uint8)
    tifffile.imwrite(tmp_path / "white.tif", m * 255 // 2, photometric="miniswhite")
    assert np.array_equal(read_mask(tmp_path / "white.tif"), m * 255 // 2)
    pal = Image.fromarray(m, mode="L").convert("P")
    pal.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)
    pal.save(tmp_path / "pal.png")
    pal.save(tmp_path / "pal.tif", compression="tiff_lzw")
    tifffile.imwrite(tmp_path / "u16.tif", m.astype(np.uint16))  # numpy labels as saved
    Image.fromarray(np.dstack([m, np.full_like(m, 255)]), mode="LA").save(tmp_path / "la.png")
    tifffile.imwrite(tmp_path / "f32.tif", m.astype(np.float32))  # whole numbers as floats
    for name in ("pal.png", "pal.tif", "u16.tif", "la.png", "f32.tif"):
        assert read_mask(tmp_path / name).dtype == np.uint8
        assert np.array_equal(read_mask(tmp_path / name), m), name
    Image.fromarray(m * 100).save(tmp_path / "m.jpg")
    tifffile.imwrite(tmp_path / "inst.tif", m.astype(np.uint16) * 300)
    Image.fromarray(np.dstack([m * 100, m * 0, m * 50])).save(tmp_path / "rgb.png")
    tifffile.imwrite(tmp_path / "soft.tif", m.astype(np.float32) / 2)  # interpolated labels
    for name, message in [("soft.tif", "float32 labels holding 0.5 .* resample them by "
                           "nearest neighbour"),
                          ("m.jpg", "JPEG's lossy compression .* save masks as PNG or TIFF"),
                          ("inst.tif", "values 0..600; a class map takes the values 0..255"),
                          ("rgb.png", r"colour mask \(3 colours: \(0, 0, 0\), \(100, 0, 50\)")]:
        with pytest.raises(DataError, match=message):
            read_mask(tmp_path / name)
    # without a classes.yaml, data check names what is wrong with the masks
    (tmp_path / "d" / "images").mkdir(parents=True)
    (tmp_path / "d" / "masks").mkdir()
    Image.fromarray(m).save(tmp_path / "d" / "images" / "a.png")
    (tmp_path / "rgb.png").rename(tmp_path / "d" / "masks" / "a.png")
    with pytest.raises(DataError, match="a.png: a colour mask"):
        check_dataset(tmp_path / "d", workers=0)


def test_data_check_spots_12_bit_data_and_a_given_window_scales_it(tmp_path, capsys,
                                                                   monkeypatch):
    root = tmp_path / "d"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.yaml").write_text("classes: {0: a, 1: b}\n")
    for i in range(5):
        tifffile.imwrite(root / "images" / f"{i}.tif",
                         RNG.integers(0, 4096, (H, W)).astype(np.uint16))
        Image.fromarray((RNG.random((H, W)) > 0.5).astype(np.uint8)).save(
            root / "masks" / f"{i}.png")
    r = check_dataset(root, workers=0, show_progress=False)
    assert r["intensity"]["window"] is None and r["intensity"]["peak"] <= 4095 / 65535
    from paser.cli import main  # what paser data check prints about it

    monkeypatch.setattr("sys.argv", ["paser", "data", "check", str(root), "--workers", "0"])
    with _no_exit():
        main()
    printed = capsys.readouterr().out
    assert re.search(r"the training pixels span 0\.000\d to 0\.06\d\d of their type's range "
                     r"\(6\.2 % of it", printed), printed
    assert re.search(r"data.window=\[\d+,40\d\d\] \(the darkest and brightest training pixels "
                     r"as stored; in the suggested line below\) scales them", printed), printed
    assert r["intensity"]["stored_range"][0] < 100 and r["intensity"]["low_contrast"]
    # the line to paste carries it (it printed the advice and then left it out)
    lo, hi = r["intensity"]["stored_range"]
    assert r["suggested_overrides"][-1] == f"data.window=[{lo},{hi}]"
    assert re.search(r"suggested .*data\.window=\[\d+,40\d\d\]", printed), printed
    assert r["intensity"]["by_type_range"] == ["bool", "uint16", "uint8"]
    # as narrow a band higher up (a reconstruction saved with a loose range): the same hint
    for i in range(5):
        tifffile.imwrite(root / "images" / f"{i}.tif",
                         RNG.integers(30000, 32775, (H, W)).astype(np.uint16))
    narrow = check_dataset(root, workers=0, show_progress=False)["intensity"]
    assert 30000 <= narrow["stored_range"][0] < narrow["stored_range"][1] <= 32774
    assert narrow["peak"] - narrow["floor"] == pytest.approx(
        (narrow["stored_range"][1] - narrow["stored_range"][0]) / 65535, abs=1e-4)
    for i in range(5):
        tifffile.imwrite(root / "images" / f"{i}.tif",
                         RNG.integers(0, 4096, (H, W)).astype(np.uint16))
    r = check_dataset(root, workers=0, show_progress=False, overrides=["data.window=[0,4095]"])
    assert r["intensity"]["given"] and r["intensity"]["peak"] == pytest.approx(1.0, abs=0.01)
    assert not r["intensity"]["low_contrast"]
    assert [o for o in r["suggested_overrides"] if o.startswith("data.window")] == [
        "data.window=[0,4095]"]  # the one given, not a second
    assert r["intensity"]["by_type_range"] == ["bool"]  # the window scales 8/16-bit too
    cfg = DataConfig(dataset="folder", root=root, window=(0.0, 4095.0))
    x = open_split(cfg, "train").image(0)
    raw = tifffile.imread(open_split(cfg, "train").images[0])
    assert np.allclose(x.numpy()[0], raw / 4095)


def test_alpha_is_dropped_where_the_format_says_so_and_two_channels_stay_two(tmp_path):
    """An LA PNG and an RGBA TIFF lose their alpha (their format marks it); a TIFF of two
    samples that are not alpha (two detectors, SE + BSE) is two channels, and a folder of
    them trains models of in_channels 2 instead of losing its second channel."""
    gray = RNG.integers(0, 256, (H, W), dtype=np.uint8)
    pair = np.dstack([gray, 255 - gray])
    Image.fromarray(pair, mode="LA").save(tmp_path / "la.png")
    tifffile.imwrite(tmp_path / "rgba.tif", np.dstack([gray] * 3 + [gray * 0]),
                     photometric="rgb", extrasamples=["unassalpha"])
    tifffile.imwrite(tmp_path / "two.tif", pair, photometric="minisblack",
                     extrasamples=["unspecified"])
    for name, channels in (("la.png", 1), ("rgba.tif", 3), ("two.tif", 2)):
        notes: list[str] = []
        arr = read_array(tmp_path / name, notes)
        assert (arr.shape[-1] if arr.ndim == 3 else 1) == channels == probe(
            tmp_path / name).channels, name
        assert ("alpha channel dropped" in notes) == (name != "two.tif"), name
    assert np.array_equal(read_image(tmp_path / "two.tif", 2)[1],
                          (255 - gray).astype(np.float32) / 255.0)
    with pytest.raises(DataError, match=r"two.tif: 2 channels \(two detectors, or channels "
                                        r"stored as pages\), and the models take 1; give "
                                        r"grayscale images: save the channel to segment as "
                                        r"its own file"):
        read_image(tmp_path / "two.tif", 1)
    root = tmp_path / "d"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.yaml").write_text("classes: {0: a, 1: b}\n")
    for i in range(6):
        tifffile.imwrite(root / "images" / f"{i}.tif", pair, photometric="minisblack",
                         extrasamples=["unspecified"])
        Image.fromarray((gray > 127).astype(np.uint8)).save(root / "masks" / f"{i}.png")
    r = check_dataset(root, workers=0, show_progress=False)
    assert r["splits"]["train"]["channels"] == 2 and "models.in_channels=2" in r[
        "suggested_overrides"]
    Image.fromarray(gray).save(root / "images" / "3.tif")  # one of one channel among them
    with pytest.raises(DataError, match="2 channels.*1 channel|1 channel.*2 channels"):
        check_dataset(root, workers=0, show_progress=False)


def test_three_planes_apart_are_read_as_colour_with_a_note_that_names_the_stack_reading(
        tmp_path):
    """tifffile.imwrite stores a (3, H, W) array without `photometric` as one RGB page of
    planes apart (SYX), warning only with a hidden DeprecationWarning: the file says colour,
    and paser reads it so, but the note says what a stack of three slices saved that way
    looks like and how to save it as slices; a contiguous RGB page gets no such note."""
    stack = RNG.integers(0, 256, (3, H, W), dtype=np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        tifffile.imwrite(tmp_path / "planes.tif", stack)
    tifffile.imwrite(tmp_path / "rgb.tif", np.moveaxis(stack, 0, -1), photometric="rgb")
    tifffile.imwrite(tmp_path / "slices.tif", stack, photometric="minisblack")
    notes: list[str] = []
    assert np.array_equal(read_array(tmp_path / "planes.tif", notes), np.moveaxis(stack, 0, -1))
    assert notes == ["3 planes stored apart (TIFF axes SYX), read as one colour image; a "
                     "stack of 3 slices written by tifffile.imwrite without "
                     "photometric='minisblack' is stored so: if these are slices, write them "
                     "again with that argument"]
    read_array(tmp_path / "rgb.tif", rgb_notes := [])
    assert rgb_notes == []
    read_array(tmp_path / "slices.tif", slice_notes := [])
    assert slice_notes[0].startswith("a stack of 3 pages")


def _no_exit():
    """A CLI call that succeeds: typer may end it with SystemExit(0)."""
    import contextlib

    return contextlib.suppress(SystemExit)


def test_probe_reads_headers_of_every_kind(tmp_path):
    gray = RNG.integers(0, 256, (H, W), dtype=np.uint8)
    _kinds(tmp_path / "k", gray)
    got = {p.name: (probe(p).height, probe(p).width, probe(p).colour, probe(p).dtype,
                    probe(p).pages) for p in sorted((tmp_path / "k").iterdir())}
    assert got == {"f32.tif": (H, W, False, "float32", 1), "i16.tif": (H, W, False, "int16", 1),
                   "pages.tif": (H, W, False, "uint8", 3), "palette.png": (H, W, True, "uint8", 1),
                   "rgb.png": (H, W, True, "uint8", 1), "u16.png": (H, W, False, "uint16", 1),
                   "u16.tif": (H, W, False, "uint16", 1), "u8.png": (H, W, False, "uint8", 1)}
    (tmp_path / "bad.tif").write_bytes(b"II*\0garbage")
    with pytest.raises(DataError, match="bad.tif: cannot read the image"):
        probe(tmp_path / "bad.tif")


def test_segment_scales_by_the_runs_window_not_by_each_images_range(tmp_path):
    """A reconstruction in Hounsfield-like units: the run's window [-1000, 1000] maps -1000,
    0 to 0, 0.5 (classes 0, 1 of the intensity bands); each image's own min-max would map
    this image's 0 to 1 (class 2)."""
    from PIL import Image as PILImage
    from tests.test_label_codec import folder, model

    from paser.config import load_config
    from paser.segment import segment_files

    root = folder(tmp_path / "data")
    cfg = load_config(preset="battery-quick", overrides=[
        "data.dataset=folder", f"data.root={root}", "grid=[2, 2]", "models.num_classes=3"])
    run_dir = tmp_path / "run"
    Intensity((-1000.0, 1000.0)).save(run_dir)
    scan = np.full((16, 16), -1000.0, np.float32)
    scan[:, 8:] = 0.0
    tifffile.imwrite(tmp_path / "scan.tif", scan)
    m = model(cfg, run_dir)
    assert m.intensity == Intensity((-1000.0, 1000.0))
    [res] = segment_files(m, [tmp_path / "scan.tif"], tmp_path / "out")
    assert res.ok, res.error
    written = np.asarray(PILImage.open(tmp_path / "out" / "scan_labels.png"))
    assert np.array_equal(written, np.where(scan < 0, 0, 40))  # classes 0, 1 as 0, 40


@pytest.mark.parametrize("turn", range(1, 9))
def test_an_exif_orientation_is_read_upright_as_viewers_show_it(tmp_path, turn):
    from PIL import ImageOps

    stored = RNG.integers(0, 256, (5, 7), dtype=np.uint8)  # not square: a turn shows
    img = Image.fromarray(stored)
    exif = img.getexif()
    exif[0x0112] = turn
    img.save(tmp_path / "a.png", exif=exif)
    notes: list[str] = []
    got = read_array(tmp_path / "a.png", notes)
    with Image.open(tmp_path / "a.png") as shown:
        assert np.array_equal(got, np.asarray(ImageOps.exif_transpose(shown)))
    assert (probe(tmp_path / "a.png").height, probe(tmp_path / "a.png").width) == got.shape
    assert got.shape == ((7, 5) if turn >= 5 else (5, 7))
    assert any("EXIF orientation" in n for n in notes) == (turn != 1)


def _png16(arr: np.ndarray, colour_type: int) -> bytes:
    """A 16-bit PNG of ``arr`` [H, W, C] written by hand (no filter, one IDAT)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))

    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in arr)
    header = struct.pack(">IIBBBBB", arr.shape[1], arr.shape[0], 16, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
            + chunk(b"IEND", b""))


def test_an_orientation_in_xmp_turns_the_image_too(tmp_path):
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()  # as photo tools write it, in place of an EXIF block
    info.add_itxt("XML:com.adobe.xmp", '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:'
                  'rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"><rdf:Description xmlns:'
                  'tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6"/></rdf:RDF>'
                  '</x:xmpmeta>')
    Image.fromarray(RNG.integers(0, 256, (5, 7), dtype=np.uint8)).save(tmp_path / "x.png",
                                                                        pnginfo=info)
    assert read_array(tmp_path / "x.png").shape == (7, 5)
    assert probe(tmp_path / "x.png").orientation == 6


def test_sixteen_bit_colour_and_gray_alpha_pngs_keep_their_sixteen_bits(tmp_path):
    rgba = RNG.integers(0, 65536, (H, W, 4), dtype=np.uint16)
    for name, arr, want, kind, channels in (("rgb", rgba[..., :3], rgba[..., :3], 2, 3),
                                            ("rgba", rgba, rgba[..., :3], 6, 3),
                                            ("la", rgba[..., :2], rgba[..., 0], 4, 1)):
        (tmp_path / f"{name}.png").write_bytes(_png16(arr, kind))
        got = read_array(tmp_path / f"{name}.png")  # Pillow gives 8 bits (and LA as RGBA)
        assert got.dtype == np.uint16 and np.array_equal(got, want), name
        p = probe(tmp_path / f"{name}.png")
        assert (p.dtype, p.channels, p.colour) == ("uint16", channels, channels == 3), name


def test_channels_stored_as_pages_are_one_image_of_two_or_refused(tmp_path):
    from paser.volumes import is_volume

    arr = RNG.integers(0, 256, (2, H, W), dtype=np.uint8)  # ImageJ's C x Y x X: SE and BSE
    tifffile.imwrite(tmp_path / "c.tif", arr, imagej=True, metadata={"axes": "CYX"})
    notes: list[str] = []
    got = read_array(tmp_path / "c.tif", notes)
    assert np.array_equal(got, np.moveaxis(arr, 0, -1)) and "channels stored as pages" in notes[0]
    p = probe(tmp_path / "c.tif")
    assert (p.pages, p.channels) == (1, 2) and not is_volume(tmp_path / "c.tif")
    # three or four would pass for colour and alpha: refused, by the reader and the probe
    tifffile.imwrite(tmp_path / "c3.tif", RNG.integers(0, 256, (3, H, W), dtype=np.uint8),
                     imagej=True, metadata={"axes": "CYX"})
    for read in (read_array, probe):
        with pytest.raises(DataError, match=r"c3.tif: its pages hold 3 channels \(TIFF axes "
                           r"CYX\).*save the channel to use as its own file"):
            read(tmp_path / "c3.tif")
    tifffile.imwrite(tmp_path / "z.tif", arr, imagej=True, metadata={"axes": "ZYX"})
    assert is_volume(tmp_path / "z.tif")  # slices stay a volume


def test_an_axis_of_one_is_dropped_wherever_tifffile_puts_it(tmp_path):
    # tifffile writes H x W x 1 as axes YXQ and 1 x H x W x 1 as QYXQ: one gray image each
    arr = RNG.integers(0, 256, (H, W), dtype=np.uint8)
    for name, stored in {"yxq": arr[..., None], "qyx": arr[None], "qyxq": arr[None, ..., None],
                         "rgb1": np.stack([arr] * 3, -1)[None]}.items():
        tifffile.imwrite(tmp_path / f"{name}.tif", stored)
        got = read_array(tmp_path / f"{name}.tif")
        assert got.shape[:2] == (H, W) and np.array_equal(got.reshape(H, W, -1)[..., 0], arr), name


def test_a_file_is_read_by_what_it_holds_not_by_its_name(tmp_path):
    gray = RNG.integers(0, 256, (H, W), dtype=np.uint8)
    Image.fromarray(gray).save(tmp_path / "a.png")
    (tmp_path / "png.tif").write_bytes((tmp_path / "a.png").read_bytes())
    tifffile.imwrite(tmp_path / "b.tif", gray.astype(np.uint16))
    (tmp_path / "tiff.png").write_bytes((tmp_path / "b.tif").read_bytes())
    assert np.array_equal(read_array(tmp_path / "png.tif"), gray)
    assert read_array(tmp_path / "tiff.png").dtype == np.uint16
    assert probe(tmp_path / "tiff.png").dtype == "uint16"
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(DataError, match="empty.png: an empty file"):
        read_array(tmp_path / "empty.png")
    with pytest.raises(DataError, match="values of type complex64"):
        window_of([(np.ones((2, 2), np.complex64), "c.tif")])


def test_files_in_formats_paser_does_not_read_are_named_not_passed_over(tmp_path):
    from paser.data.images import READABLE_SUFFIXES, skipped_note, unread_files

    assert ".webp" in READABLE_SUFFIXES and ".gif" in READABLE_SUFFIXES
    (tmp_path / "images").mkdir()
    for name in ("a.jp2", "b.jp2", "c.dcm", "notes.txt"):
        (tmp_path / "images" / name).write_bytes(b"x")
    unread = unread_files(tmp_path / "images")
    assert [f.name for f in unread] == ["a.jp2", "b.jp2", "c.dcm"]  # not the text file
    assert skipped_note(unread).startswith("skipped 3 files in a format paser does not read "
                                           "(2 .jp2, 1 .dcm;")
    (tmp_path / "masks").mkdir()
    (tmp_path / "classes.yaml").write_text("classes: {0: a, 1: b}\n")
    with pytest.raises(DataError, match="no image paser reads; skipped 3 files"):
        open_split(DataConfig(dataset="folder", root=tmp_path), "train")
    from paser.data.folders import unread_images

    (tmp_path / "other" / "images").mkdir(parents=True)  # not a split: training reads none
    (tmp_path / "other" / "images" / "d.jp2").write_bytes(b"x")
    assert [f.name for f in unread_images(tmp_path)] == ["a.jp2", "b.jp2", "c.dcm"]


def test_data_check_says_which_images_are_turned_by_exif_and_why_sizes_differ(tmp_path):
    for split in ("train", "validation", "test"):
        (tmp_path / split / "images").mkdir(parents=True)
        (tmp_path / split / "masks").mkdir(parents=True)
        for i in range(3):
            img = Image.fromarray(RNG.integers(0, 256, (8, 12), dtype=np.uint8))
            exif = img.getexif()
            exif[0x0112] = 6
            img.save(tmp_path / split / "images" / f"s{i}.png", exif=exif)
            Image.fromarray(RNG.integers(0, 2, (12, 8), dtype=np.uint8)).save(
                tmp_path / split / "masks" / f"s{i}.png")  # drawn on the picture as shown
    (tmp_path / "classes.yaml").write_text("classes: {0: a, 1: b}\n")
    r = check_dataset(tmp_path, workers=0, show_progress=False)
    assert r["files"]["train"] == {"uint8 PNG turned upright by EXIF": 3}
    Image.fromarray(np.zeros((8, 12), np.uint8)).save(tmp_path / "test" / "masks" / "s0.png")
    with pytest.raises(DataError, match=r"s0.png: image is 12x8 but its label .* is 8x12 .*"
                       r"EXIF orientation \(6\).*without the orientation tag"):
        check_dataset(tmp_path, workers=0, show_progress=False)


def test_a_broken_sixteen_bit_png_is_one_line_and_a_probe_decodes_no_pixels(tmp_path,
                                                                              monkeypatch):
    data = bytearray(_png16(RNG.integers(0, 65536, (H, W, 3), dtype=np.uint16), 2))
    data[-20] ^= 0xFF  # the IDAT's checksum broken
    (tmp_path / "bad.png").write_bytes(bytes(data))
    with pytest.raises(DataError, match="bad.png: cannot read the image"):
        read_array(tmp_path / "bad.png")
    Image.fromarray(RNG.integers(0, 256, (H, W), dtype=np.uint8)).save(tmp_path / "a.png")

    def decoded(self, *args, **kwargs):
        raise AssertionError("a probe decoded the pixels")

    monkeypatch.setattr(Image.Image, "load", decoded)
    monkeypatch.setattr("PIL.ImageFile.ImageFile.load", decoded)
    assert (probe(tmp_path / "a.png").height, probe(tmp_path / "a.png").width) == (H, W)


def test_a_fill_is_left_out_of_the_fit_and_an_image_of_65536_pixels_fits_every_pixel():
    fill = np.array([0.0] * 50 + [1.0] * 5 + [2.0] * 5).reshape(6, 10)  # 50 = 10 x 5: a fill
    assert window_of([(fill, "f")]) == (1.0, 2.0)
    binary = np.array([0.0] * 95 + [1.0] * 5).reshape(10, 10)  # two values: no fill to drop
    assert window_of([(binary, "b")]) == (0.0, 1.0)
    arr = np.arange(65536, dtype=np.float64)
    arr[1::2] += 1e5  # a sample of every other pixel would miss the bright ones
    assert window_of([(arr.reshape(256, 256), "a")]) == pytest.approx(
        tuple(np.percentile(arr, [0.5, 99.5])))


def test_colour_with_two_equal_channels_is_still_colour_and_a_given_window_per_image():
    from skimage.color import rgb2gray

    from paser.data.images import to_channels

    rgb = np.zeros((2, 2, 3), np.float32)
    rgb[..., 0] = rgb[..., 1] = 0.5  # yellow: R == G, B differs
    notes: list[str] = []
    out = to_channels(rgb, 1, "y.png", notes)
    assert np.allclose(out[0], rgb2gray(rgb)) and not np.allclose(out[0], 0.5)
    assert notes == ["RGB converted to grayscale (luminance) for 1-channel models"]
    per_image = Intensity((0.0, 4095.0), mode="per_image", given=True)  # 8-bit: by its range
    assert np.allclose(per_image.scale(np.array([[0, 51]], np.uint8)), [[0, 0.2]])


def test_a_signed_mask_with_negative_values_is_refused_not_wrapped_to_255(tmp_path):
    tifffile.imwrite(tmp_path / "m.tif", np.array([[-1, 0], [1, 2]], np.int16))
    with pytest.raises(DataError, match=r"int16 labels with values -1\.\.2"):
        read_mask(tmp_path / "m.tif")


def test_unlabelled_pixels_stored_as_minus_one_or_nan_are_told_to_be_the_ignore_value(
        tmp_path):
    """-1 (PyTorch's ignore_index, many tools' unlabelled) and NaN in a float mask were
    refused as 'an instance label image numbers objects, not classes' and as 'labels
    resampled by interpolation, or a probability map?': neither is what they are. Values
    past 255 are still an instance image, and fractions resampled labels."""
    def refusal(arr: np.ndarray) -> str:
        tifffile.imwrite(tmp_path / "m.tif", arr)
        with pytest.raises(DataError) as err:
            read_mask(tmp_path / "m.tif")
        return str(err.value).removeprefix(f"{tmp_path / 'm.tif'}: ")

    told = ("if they mark unlabelled pixels, store those as the ignore value (classes.yaml's "
            "'ignore', 255 unless it says otherwise), which losses and metrics skip")
    assert refusal(np.array([[-1, 0], [1, 2]], np.int16)) == (
        f"int16 labels with values -1..2; a class map takes the values 0..255, and -1 is none: "
        f"{told}")
    assert refusal(np.array([[np.nan, 0], [1, np.nan]], np.float32)) == (
        f"float32 labels holding nan (2 voxels or pixels), which is no class value: {told}")
    assert refusal(np.array([[-1, 0], [1, 300]], np.int16)).endswith(
        "(an instance label image numbers objects, not classes: give one value per class)")
    assert refusal(np.array([[np.nan, 0.5], [1, 2]], np.float32)).endswith(
        "labels resampled by interpolation, or a probability map? Class labels are whole "
        "values; resample them by nearest neighbour")


def test_data_check_names_every_bad_file_when_a_float_training_image_cannot_be_read(
        tmp_path):
    # the window is fitted on the training floats: a truncated one there stopped the check
    # at the fit, hiding every other bad file (one run per mistake)
    root = tmp_path / "d"
    (root / "classes.yaml").parent.mkdir(parents=True)
    (root / "classes.yaml").write_text("classes: {0: a, 1: b}\n")
    for split in ("train", "validation", "test"):
        (root / split / "images").mkdir(parents=True)
        (root / split / "masks").mkdir()
        for i in range(3):
            img = RNG.normal(500, 100, (H, W)).astype(np.float32)
            tifffile.imwrite(root / split / "images" / f"s{i}.tif", img)
            Image.fromarray((img > 500).astype(np.uint8)).save(
                root / split / "masks" / f"s{i}.png")
    for split in ("train", "test"):
        path = root / split / "images" / "s1.tif"
        path.write_bytes(path.read_bytes()[:-60])  # cut short by a copy: its pixels
    mask = np.zeros((H, W), np.uint8)
    mask[0, 0] = 7
    Image.fromarray(mask).save(root / "validation" / "masks" / "s2.png")
    with pytest.raises(DataError) as err:
        check_dataset(root, workers=0, show_progress=False)
    lines = str(err.value).splitlines()
    assert lines[0] == "3 problems; fix each and check again:", lines
    assert [re.search(r"/(\w+)/(images|masks)/(s\d)\.(tif|png): (cannot read|mask values "
                      r"\[7\])", line).group(1, 3, 5) for line in lines[1:]] == [
        ("train", "s1", "cannot read"), ("validation", "s2", "mask values [7]"),
        ("test", "s1", "cannot read")], lines


def test_a_tiff_of_pages_that_differ_is_read_with_a_note_and_refused_as_a_volume(tmp_path):
    """Pages written one at a time where one differs in size or type are no single stack:
    tifffile makes each its own series. The first alone was read, as a one-page image, with
    nothing said (paser segment segmented one slice of four); the image reader now names
    the other images and a volume refuses the file; a thumbnail (a reduced page) is none."""
    from paser.volumes import is_volume, open_volume

    page = np.arange(64, dtype=np.uint8).reshape(8, 8)
    with tifffile.TiffWriter(tmp_path / "odd.tif") as tif:
        for p in (page, page, page.astype(np.uint16), page):
            tif.write(p)
    notes: list[str] = []
    assert np.array_equal(read_array(tmp_path / "odd.tif", notes), page)
    assert notes == ["holds more than one image or stack of pages (1 x 8 x 8 uint8, then 1 x "
                     "8 x 8 uint8, 1 x 8 x 8 uint16, 1 x 8 x 8 uint8); the first one read: "
                     "save each as its own TIFF"]
    assert probe(tmp_path / "odd.tif").pages == 4 and is_volume(tmp_path / "odd.tif")
    with pytest.raises(DataError, match=r"odd.tif: holds more than one stack of pages \(1 x 8 "
                                        r"x 8 uint8, then 1 x 8 x 8 uint8, 1 x 8 x 8 uint16"):
        open_volume(tmp_path / "odd.tif")
    with tifffile.TiffWriter(tmp_path / "thumb.tif") as tif:
        tif.write(page)
        tif.write(page[::4, ::4], subfiletype=1)  # a reduced-resolution preview
    read_array(tmp_path / "thumb.tif", thumb_notes := [])
    assert thumb_notes == [] and probe(tmp_path / "thumb.tif").pages == 1
    assert not is_volume(tmp_path / "thumb.tif")


def test_a_16_bit_pgm_is_read_as_uint16_scaled_by_its_type_s_range_as_a_16_bit_png(tmp_path):
    """Pillow opens a 16-bit PGM as 32-bit integers: it was probed and read as int32, so
    scaled by the intensity window (or min-max per image, with a note) where the same
    pixels as a 16-bit PNG are / 65535, and data check warned the folder was scaled two
    ways. Its values (stretched by Pillow from its maxval to 0..65535) are uint16."""
    gray = (RNG.integers(0, 256, (H, W)) * 257).astype(np.uint16)
    Image.fromarray(gray).save(tmp_path / "a.pgm")
    Image.fromarray(gray).save(tmp_path / "a.png")
    arr = read_array(tmp_path / "a.pgm")
    assert arr.dtype == np.uint16 and np.array_equal(arr, gray)
    assert probe(tmp_path / "a.pgm").dtype == "uint16"
    notes: list[str] = []
    assert np.array_equal(read_image(tmp_path / "a.pgm", 1, Intensity(), notes),
                          read_image(tmp_path / "a.png", 1, Intensity()))
    assert notes == []
    (tmp_path / "m.pgm").write_bytes(b"P5\n3 1\n4095\n" + np.array([0, 2048, 4095], ">u2")
                                     .tobytes())  # a 12-bit maxval, as Pillow stretches it
    assert read_array(tmp_path / "m.pgm").tolist() == [[0, 32776, 65535]]



def test_a_16_bit_ppm_is_read_at_its_16_bits_as_the_same_colour_png(tmp_path):
    """Pillow decodes a 16-bit PPM to 8 bits (up to 1/510 off the same pixels as a 16-bit
    PNG, and data check said uint8); its samples are read with numpy after the header
    Pillow parsed, stretched from a maxval below 65535 as Pillow stretches a PGM's. A plain
    (ASCII) one stays at 8 bits, with a note that says so."""
    import imagecodecs

    rgb = RNG.integers(0, 65536, (H, W, 3), dtype=np.uint16)
    (tmp_path / "a.ppm").write_bytes(f"P6\n{W} {H}\n65535\n".encode()
                                     + rgb.astype(">u2").tobytes())
    (tmp_path / "a.png").write_bytes(imagecodecs.png_encode(rgb))
    notes: list[str] = []
    arr = read_array(tmp_path / "a.ppm", notes)
    assert arr.dtype == np.uint16 and np.array_equal(arr, rgb) and notes == []
    assert (probe(tmp_path / "a.ppm").dtype, probe(tmp_path / "a.ppm").channels) == ("uint16", 3)
    for channels in (1, 3):
        assert np.array_equal(read_image(tmp_path / "a.ppm", channels),
                              read_image(tmp_path / "a.png", channels))
    (tmp_path / "m.ppm").write_bytes(b"P6\n1 1\n4095\n" + np.array([0, 2048, 4095], ">u2")
                                     .tobytes())  # 12-bit
    assert read_array(tmp_path / "m.ppm").tolist() == [[[0, 32776, 65535]]]
    (tmp_path / "p.ppm").write_bytes(b"P3\n1 1\n65535\n65535 0 1000\n")
    arr = read_array(tmp_path / "p.ppm", notes)
    assert arr.tolist() == [[[255, 0, 4]]] and probe(tmp_path / "p.ppm").dtype == "uint8"
    assert notes == ["a plain (ASCII) PPM of 16-bit samples, read at 8 bits: save it as a "
                     "binary PPM (P6), PNG or TIFF to keep its 16 bits"]

def test_a_mask_of_jpeg_data_named_png_or_a_jpeg_compressed_tiff_is_refused_as_jpeg(tmp_path):
    """A mask's name was its only test of JPEG: JPEG bytes saved as .png, or a TIFF written
    with compression='jpeg', were read, and their edge values taken for a mask resized with
    interpolation, with the wrong advice (resample by nearest neighbour)."""
    mask = np.zeros((16, 16), np.uint8)
    mask[4:12, 4:12] = 255
    Image.fromarray(mask).save(tmp_path / "a.png", format="JPEG")
    tifffile.imwrite(tmp_path / "b.tif", mask, compression="jpeg")
    tifffile.imwrite(tmp_path / "c.tif", mask, compression="zlib")
    with pytest.raises(DataError, match=r"a.png: a JPEG mask \(JPEG data in a .png file\); "
                                        "JPEG's lossy compression changes mask values"):
        read_mask(tmp_path / "a.png")
    with pytest.raises(DataError, match=r"b.tif: a JPEG mask \(a TIFF compressed with JPEG\); "
                                        "JPEG's "):
        read_mask(tmp_path / "b.tif")
    assert np.array_equal(read_mask(tmp_path / "c.tif"), mask)


def test_an_imagej_lookup_table_is_display_and_other_palettes_colours_on_every_path(tmp_path):
    """Fiji saves an 8-bit image it shows through a colour lookup table (Green, Fire) as a
    palette TIFF: its stored values are the data. They were read as the table's colours
    (a green table: every pixel 0.7152 as bright by luminance) by the image reader, and as
    stored by the volume reader: the same file, two tensors. Now both read an ImageJ TIFF's
    values, and both read any other palette TIFF's colours."""
    from paser.volumes import open_volume

    gray = RNG.integers(0, 256, (H, W), dtype=np.uint8)
    green = np.zeros((3, 256), np.uint16)
    green[1] = np.arange(256) * 257
    tifffile.imwrite(tmp_path / "fiji.tif", gray, imagej=True, colormap=green)
    tifffile.imwrite(tmp_path / "fiji_stack.tif", np.stack([gray, 255 - gray]), imagej=True,
                     colormap=green, metadata={"axes": "ZYX"})
    tifffile.imwrite(tmp_path / "plain.tif", np.stack([gray, 255 - gray]),
                     photometric="palette", colormap=green)
    for name in ("fiji.tif", "fiji_stack.tif"):
        notes = []
        assert np.array_equal(read_array(tmp_path / name, notes), gray), name
        assert any("ImageJ" in n and "lookup table" in n for n in notes), notes
        head = probe(tmp_path / name)
        assert (head.channels, head.colour, head.dtype) == (1, False, "uint8")
        assert np.array_equal(read_image(tmp_path / name, 1), gray[None] / np.float32(255))
    volume = open_volume(tmp_path / "fiji_stack.tif")
    assert volume.shape == (2, H, W)
    assert np.array_equal(volume.read(0, 2), np.stack([gray, 255 - gray]))
    # any other palette TIFF is its colours, as a palette PNG: in both readers
    shown = np.dstack([np.zeros_like(gray), gray, np.zeros_like(gray)])
    assert np.array_equal(read_array(tmp_path / "plain.tif"), shown)
    assert probe(tmp_path / "plain.tif").channels == 3
    volume = open_volume(tmp_path / "plain.tif")
    assert volume.shape == (2, H, W, 3) and volume.dtype == "uint8"
    assert np.array_equal(volume.read(1, 2)[0], np.dstack([np.zeros_like(gray), 255 - gray,
                                                           np.zeros_like(gray)]))
    assert np.array_equal(as_input(volume.read(0, 1)[0], 1, Intensity()),
                          read_image(tmp_path / "plain.tif", 1))


def test_a_png_sent_to_the_server_is_decoded_as_the_same_file_is_read(tmp_path):
    """The server decoded PNG bodies with Pillow alone: a 16-bit colour PNG came out at 8
    bits (up to 1/510 off the same file read by paser segment), one of the server's own
    reader's rules kept apart from the one reader's."""
    import imagecodecs

    from paser.serve.codec import decode_png

    rgb16 = RNG.integers(0, 65536, (H, W, 3), dtype=np.uint16)
    (tmp_path / "rgb16.png").write_bytes(imagecodecs.png_encode(rgb16))
    gray = RNG.integers(0, 256, (H, W), dtype=np.uint8)
    Image.fromarray(np.dstack([gray, gray])).save(tmp_path / "la.png")  # gray + alpha
    pal = Image.fromarray(gray // 64).convert("P")
    pal.putpalette([0, 0, 0, 200, 10, 10, 10, 200, 10, 255, 255, 255] + [0] * 756)
    pal.save(tmp_path / "palette.png")
    Image.fromarray(gray > 127).save(tmp_path / "bits.png")
    for name in ("rgb16.png", "la.png", "palette.png", "bits.png"):
        body = (tmp_path / name).read_bytes()
        served, read = decode_png(body, 10**6), read_array(tmp_path / name)
        assert served.dtype == read.dtype and np.array_equal(served, read), name
    assert decode_png((tmp_path / "rgb16.png").read_bytes(), 10**6).dtype == np.uint16


def test_a_cmyk_tiff_is_read_as_rgb_as_the_same_cmyk_picture_from_pillow(tmp_path):
    """A CMYK TIFF (Photometric Separated) was read as 4 channels: K dropped as "alpha", the
    inks taken for red, green and blue (an inverted picture), data check counting 4
    channels; it is converted to RGB as Pillow converts CMYK, in a volume of such pages
    too."""
    from paser.volumes import open_volume

    cmyk = RNG.integers(0, 256, (2, H, W, 4), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "ink.tif", cmyk[0], photometric="separated")
    tifffile.imwrite(tmp_path / "inks.tif", cmyk, photometric="separated")
    rgb = np.asarray(Image.fromarray(cmyk[0], "CMYK").convert("RGB"))
    notes: list[str] = []
    assert np.array_equal(read_array(tmp_path / "ink.tif", notes), rgb)
    assert notes == ["CMYK converted to RGB, as a CMYK JPEG is"]
    assert (probe(tmp_path / "ink.tif").channels, probe(tmp_path / "ink.tif").colour) == (3, True)
    volume = open_volume(tmp_path / "inks.tif")
    assert volume.shape == (2, H, W, 3) and np.array_equal(volume.read(0, 1)[0], rgb)
    wide = RNG.integers(0, 65536, (H, W, 4), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "ink16.tif", wide, photometric="separated")
    ink = wide.astype(np.float64) / 65535
    assert np.allclose(read_array(tmp_path / "ink16.tif") / 65535,
                       (1 - ink[..., :3]) * (1 - ink[..., 3:]), atol=1 / 65535)


def test_a_tiff_of_4_or_12_bit_samples_is_stretched_to_its_types_range_but_not_a_mask(
        tmp_path):
    """tifffile gives a 4-bit TIFF as 0..15 in uint8 and a 12-bit one as 0..4095 in uint16:
    scaled by their type's range they were 1/17 and 1/16 as bright as the same picture as a
    PNG (Pillow stretches a 4-bit PNG, and a 4-bit TIFF, to 0..255). Both readers stretch
    them now; a mask's classes stay as stored."""
    from paser.volumes import open_volume

    four = RNG.integers(0, 16, (H, W), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "four.tif", four, bitspersample=4)
    notes = []
    got = read_array(tmp_path / "four.tif", notes)
    assert np.array_equal(got, four * 17) and any("4-bit" in n for n in notes), notes
    assert np.array_equal(got, np.asarray(Image.open(tmp_path / "four.tif")))  # Pillow's way
    Image.fromarray(four * 17).save(tmp_path / "four.png")
    assert np.array_equal(read_image(tmp_path / "four.tif", 1),
                          read_image(tmp_path / "four.png", 1))
    assert np.array_equal(read_mask(tmp_path / "four.tif"), four)  # classes, as stored
    twelve = RNG.integers(0, 4096, (2, H, W), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "twelve.tif", twelve, bitspersample=12, photometric="minisblack")
    want = np.rint(twelve * (65535 / 4095)).astype(np.uint16)
    assert want.max() <= 65535 and np.array_equal(read_array(tmp_path / "twelve.tif"), want[0])
    volume = open_volume(tmp_path / "twelve.tif")
    assert np.array_equal(volume.read(0, 2), want)
    labels = open_volume(tmp_path / "twelve.tif", palette="indices")  # a label volume's read
    assert np.array_equal(labels.read(0, 2), twelve)


def test_a_thumbnail_stored_first_is_not_read_in_place_of_the_image(tmp_path):
    """Scanners and cameras may store a reduced-resolution copy first (NewSubfileType 1);
    tifffile makes a series of it, which was read, 16 x 20 in place of 64 x 80."""
    full = RNG.integers(0, 256, (64, 80), dtype=np.uint8)
    with tifffile.TiffWriter(tmp_path / "t.tif") as tif:
        tif.write(full[::4, ::4].copy(), subfiletype=1)
        tif.write(full)
    notes = []
    assert np.array_equal(read_array(tmp_path / "t.tif", notes), full) and notes == []
    head = probe(tmp_path / "t.tif")
    assert (head.height, head.width, head.pages) == (64, 80, 1)
