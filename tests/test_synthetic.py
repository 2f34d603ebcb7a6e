"""The synthetic battery generator: determinism, layout, class fractions, difficulty."""

import json

import numpy as np
import pytest
from PIL import Image

from paser.data import synthetic as S
from paser.data.battery import BatteryDataset, decode_label


def _files(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*.png"))}


def test_same_seed_same_bytes_whatever_the_workers(tmp_path):
    for name, workers in (("a", 1), ("b", 1), ("c", 2)):
        S.generate_dataset(tmp_path / name, 4, 2, 2, 48, 64, seed=5, workers=workers,
                           progress=False)
    a = _files(tmp_path / "a")
    assert len(a) == 16 and a == _files(tmp_path / "b") == _files(tmp_path / "c")
    S.generate_dataset(tmp_path / "d", 4, 2, 2, 48, 64, seed=6, workers=1, progress=False)
    assert _files(tmp_path / "d") != a


def test_layout_codec_and_stats(tmp_path):
    stats = S.generate_dataset(tmp_path, 3, 1, 2, 40, 56, seed=0, workers=1, progress=False)
    assert json.loads((tmp_path / "stats.json").read_text()) == stats
    assert stats["counts"] == {"train": 3, "validation": 1, "test": 2}
    for split, n in stats["counts"].items():
        images = sorted(p.name for p in (tmp_path / f"{split}_images").iterdir())
        labels = sorted(p.name for p in (tmp_path / f"{split}_label").iterdir())
        assert images == labels and len(images) == n
        for name in labels:
            lbl = np.asarray(Image.open(tmp_path / f"{split}_label" / name))
            assert lbl.shape == (40, 56) and lbl.dtype == np.uint8
            assert set(np.unique(lbl)) <= {0, 128, 255}
    ds = BatteryDataset(tmp_path, "train")  # one loader serves the synthetic and the real data
    assert ds.size == (40, 56) and len(ds) == 3


def test_class_fractions_are_the_papers():
    labels = np.stack([S.generate_sample(96, 96, seed)[1] for seed in range(24)])
    frac = np.bincount(labels.ravel(), minlength=3) / labels.size
    assert frac == pytest.approx([0.11, 0.12, 0.76], abs=0.025)  # pore, carbon, nickel


def _sample_with_difficulty(seed, h=128, w=128):
    image, label = S.generate_sample(h, w, seed)
    rng = np.random.default_rng(seed)  # replay the generator's draws up to its difficulty field
    assert np.array_equal(S._label_map(rng, h, w), label)
    return image.astype(np.float64) / 255, label, S._difficulty(rng, h, w)


def test_carbon_is_close_to_pore_and_nickel_is_bright():
    image, label, _ = _sample_with_difficulty(1)
    grey = [image[label == c].mean() for c in range(3)]  # pore, carbon, nickel
    assert abs(grey[1] - grey[0]) < 0.3 * (grey[2] - grey[0])


def test_difficulty_varies_within_an_image():
    easy_contrast, hard_contrast = [], []
    for seed in range(6):
        image, label, diff = _sample_with_difficulty(seed)
        assert diff.max() - diff.min() > 0.5  # every image mixes easier and harder regions
        for mask, out in ((diff < 0.3, easy_contrast), (diff > 0.7, hard_contrast)):
            carbon, pore = image[mask & (label == 1)], image[mask & (label == 0)]
            if carbon.size > 20 and pore.size > 20:
                out.append(carbon.mean() - pore.mean())
    # carbon stands out from pore where it is easy, much less where it is hard (what is left
    # there is mostly blur from the bright particles next to the binder film)
    assert np.mean(easy_contrast) > 0.12
    assert abs(np.mean(hard_contrast)) < 0.7 * np.mean(easy_contrast)


def _geometry_auc(label: np.ndarray) -> float:
    """How well nearness to nickel alone tells binder from pore (ROC AUC over non-nickel px)."""
    from scipy import ndimage as ndi
    from scipy.stats import rankdata

    free = label != 2
    near = -ndi.distance_transform_edt(free)[free]
    binder = label[free] == 1
    n1, n0 = binder.sum(), (~binder).sum()
    return float((rankdata(near)[binder].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def test_clumps_take_the_binder_away_from_where_the_geometry_puts_it(monkeypatch):
    # A film alone lies where nickel is near: geometry gives the answer away (AUC about 0.95
    # or more), and a tiny whole-image model needs no texture. With the default three
    # quarters of the binder in clumps, geometry is little better than chance.
    def aucs():
        return [_geometry_auc(S.generate_sample(128, 128, seed)[1]) for seed in range(3)]

    clumps = aucs()
    monkeypatch.setitem(S.PARAMS, "clump_share", 0.0)
    film = aucs()
    assert min(film) > 0.94 and max(clumps) < 0.7


def test_lowest_takes_the_n_lowest_pixels_where_allowed():
    score = np.arange(6.0).reshape(2, 3)
    where = np.array([[False, True, True], [True, True, True]])
    assert S._lowest(score, where, 2).nonzero()[1].tolist() == [1, 2]  # 0 is not allowed
    assert np.array_equal(S._lowest(score, where, 9), where)  # more than there are: all
    assert not S._lowest(score, where, 0).any()


def test_decoded_labels_match_the_class_indices():
    image, label = S.generate_sample(32, 32, 3)
    lut = np.array([S.LABEL_CODEC[c] for c in range(3)], np.uint8)
    assert np.array_equal(decode_label(lut[label]), label)
    assert image.dtype == np.uint8 and image.shape == (32, 32)


def test_fingerprint_changes_with_the_parameters(monkeypatch):
    before = S.generator_fingerprint()
    monkeypatch.setitem(S.PARAMS, "noise_hard", S.PARAMS["noise_hard"] + 0.01)
    assert S.generator_fingerprint() != before
