"""The report's figures and caveats: Table 2, and what a run's setting makes optimistic or hard
to read, said where the figures are. Small hand-built results, no run."""

import pytest

from paser.config import load_config
from paser.experiments.main import one_volume_note, same_images_note
from paser.experiments.report import setting_line


def test_cityscapes_validation_read_as_test_is_said_to_make_the_figures_optimistic():
    data = load_config(preset="cityscapes-segformer").data  # val as validation and test
    note = same_images_note(data)
    assert note.startswith("Validation and test are the same images (Cityscapes folder `val` "
                           "for both, data.cityscapes_splits)")
    assert "IDK-Cascade's thresholds were chosen on the images Table 1 scores" in note
    assert "the verdict, Table 2 and the routers' shares of the headroom" in note


def test_splits_of_their_own_need_no_note():
    own = load_config(preset="cityscapes-segformer", overrides=[
        "data.cityscapes_splits={train: train, validation: holdout, test: val}"]).data
    assert same_images_note(own) is None
    assert same_images_note(load_config(preset="battery-quick").data) is None


def test_test_read_from_the_training_folder_is_said_too():
    data = load_config(preset="cityscapes-segformer", overrides=[
        "data.cityscapes_splits={train: train, validation: val, test: train}"]).data
    assert same_images_note(data).startswith("Test is read from the training folder "
                                             "(Cityscapes `train`")


def test_the_flop_line_gives_f0s_passes_as_counted_and_as_the_paper_counts_them():
    from paser.experiments.report import mc_counting

    # the demo's f0 at T = 5, dropout all: 0.1708 a pass, 0.0662 before the first dropout
    costs = {"mc_samples": 5, "f0_pass": 0.1708, "f0_shared": 0.0662,
             "f0_mc": 0.1708 * 5 - 0.0662 * 4}
    line = mc_counting(costs)
    assert "run once for its 5 Monte Carlo passes and are counted once" in line
    assert "f0 with 5 passes 0.589 GFLOP; every pass counted in full, as the paper counts " \
           "them, 0.854 (0.265 more per image for the routers and f0 (MC))" in line
    assert mc_counting({**costs, "f0_shared": 0.0, "f0_mc": 0.854}) == (
        "f0's 5 Monte Carlo passes are each counted in full")
    assert mc_counting({"mc_samples": 1, "f0_pass": 0.1708, "f0_shared": 0.0,
                        "f0_mc": 0.1708}) == "f0 runs one pass"


def test_a_methods_point_has_its_curves_colour_and_no_other_method_takes_one():
    from paser.experiments.report import CURVE_COLOURS, point_colours

    names = ["PaSeR", "PaSeR (paper)", "PaSeR (best model's IoU - 0.005)", "PaSeR-RandPol",
             "IDK-Cascade", "IDK-Cascade (IoU match)", "Oracle", "f0", "f0 (MC)", "f1", "f2"]
    colours = point_colours(names)
    assert colours["Oracle"] == "C2" and colours["PaSeR (paper)"] == "C4"
    assert colours["PaSeR (best model's IoU - 0.005)"] == colours["PaSeR"] == "C0"
    assert colours["IDK-Cascade (IoU match)"] == colours["IDK-Cascade"] == "C1"
    rest = [colours[n] for n in ("PaSeR-RandPol", "f0", "f0 (MC)", "f1", "f2")]
    assert len(set(rest)) == 5 and not set(rest) & set(CURVE_COLOURS.values())


def test_lams_that_land_on_one_point_share_one_label():
    from paser.experiments.sensitivity import lam_labels

    rows = [{"lam": 0.0, "mean_cost": 0.20, "iou": 0.80},
            {"lam": 0.1, "mean_cost": 0.20, "iou": 0.80},  # the same policy as lam 0
            {"lam": 0.2, "mean_cost": 0.1999, "iou": 0.8001},  # within 2 % of each axis
            {"lam": 0.5, "mean_cost": 0.05, "iou": 0.70}]
    assert lam_labels(rows) == [(0.20, 0.80, "0, 0.1, 0.2"), (0.05, 0.70, "0.5")]


def test_label_and_prediction_share_class_colours_with_a_legend(tmp_path):
    import torch

    from paser.experiments.report import plot_qualitative
    from paser.patches import PatchGrid

    labels = torch.tensor([[[0, 1], [2, 255]]]).repeat_interleave(8, 1).repeat_interleave(8, 2)
    path = tmp_path / "q.png"
    plot_qualitative(path, torch.rand(1, 1, 16, 16), labels, labels.clamp(max=2),
                     torch.tensor([[0, 1, 2, 0]]), torch.rand(1, 16, 16), PatchGrid(2, 2),
                     ["f0", "f1", "f2"], ["pore", "carbon", "nickel"])
    assert path.stat().st_size > 1000


def test_every_rows_entropy_map_has_one_scale_that_its_title_names(tmp_path, monkeypatch):
    import math

    import torch

    from paser.experiments import report
    from paser.patches import PatchGrid

    # each row's entropy was scaled to its own range, with no bar or unit: a certain image
    # and an unsure one looked alike
    shown = {}

    def keep(fig, path, dpi=110, rect=(0, 0, 1, 1)):
        shown.update(titles=[ax.get_title() for ax in fig.axes[:5]],
                     clims=[ax.images[0].get_clim() for ax in fig.axes[4::5]])
    monkeypatch.setattr(report, "save_figure", keep)
    labels = torch.zeros(2, 16, 16, dtype=torch.long)
    entropies = torch.stack([torch.full((16, 16), 0.01), torch.full((16, 16), 0.9)])
    report.plot_qualitative(tmp_path / "q.png", torch.rand(2, 1, 16, 16), labels, labels,
                            torch.zeros(2, 4, dtype=torch.long), entropies, PatchGrid(2, 2),
                            ["f0", "f1"], ["a", "b", "c"])
    assert shown["titles"][4] == "f0 entropy (black 0, white ln 3 = 1.10 nats)"
    assert shown["clims"] == [(0, math.log(3))] * 2


def test_paser_s_point_is_drawn_over_an_operating_point_at_the_same_place(tmp_path,
                                                                          monkeypatch):
    from paser.experiments import report

    # the demo: PaSeR and 'PaSeR (best model's IoU - 0.005)' at 1.817 GFLOP, 0.8574, f0 and
    # f0 (MC) at 0.171, 0.8003; the second of each, drawn after, hid the first's marker
    methods = {"PaSeR": {"gflops": 1.817, "iou": 0.8574},
               "PaSeR (best model's IoU - 0.005)": {"gflops": 1.817, "iou": 0.8574},
               "f0": {"gflops": 0.171, "iou": 0.8003},
               "f0 (MC)": {"gflops": 0.171, "iou": 0.8003},
               "f1": {"gflops": 1.065, "iou": 0.8528}}
    frontier = {"gflops": [0.171, 1.065], "iou": [0.8003, 0.8528], "interpolate": True}
    drawn = {}

    def keep(fig, path, dpi=110, rect=(0, 0, 1, 1)):
        drawn.update({c.get_label(): c.get_zorder() for c in fig.axes[0].collections})
    monkeypatch.setattr(report, "save_figure", keep)
    report.plot_curves(tmp_path / "c.png", methods, {"Frontier": frontier})
    assert drawn["PaSeR"] > drawn["PaSeR (best model's IoU - 0.005)"] > drawn["f0"]
    assert drawn["f0"] > drawn["f0 (MC)"] > drawn["f1"] > 2  # every point over the curves


def test_the_baselines_note_says_what_trained_and_for_how_long_beside_the_pool():
    from paser.experiments.main import baselines_note

    # the demo: no monolithic model, MatPhase at stage1.epochs 12, the pool at its own 40;
    # the note named 'Monolithic models and MatPhase' and said nothing of the pool's 40
    quick = load_config(preset="battery-quick")
    assert baselines_note(quick) == (
        "MatPhase trains from scratch on D_pre with stage 1's settings (12 epochs at most, "
        "batch 2; f0 and the pool trained 40 at most, so Table 1 sets them against models "
        "trained longer); nothing is downloaded.")
    alike = load_config(preset="battery-quick", overrides=[
        "models.f0.epochs=12", "models.pool.0.epochs=12", "models.pool.1.epochs=12"])
    assert baselines_note(alike) == ("MatPhase trains from scratch on D_pre with stage 1's "
                                     "settings (12 epochs at most, batch 2); nothing is "
                                     "downloaded.")
    assert baselines_note(load_config(preset="battery-paper")).startswith(
        "Monolithic models and MatPhase train from scratch on D_pre with stage 1's settings "
        "(200 epochs, batch 32)")


@pytest.mark.skipif(not hasattr(__import__("signal"), "raise_signal"), reason="signals")
def test_a_ctrl_c_while_a_figure_is_drawn_stops_as_ctrl_c_once_it_is_written(tmp_path,
                                                                             monkeypatch):
    """matplotlib's C++ reads an image's transform through numpy and turns a
    KeyboardInterrupt raised there into a ValueError: paser run stopped in its report
    ended with a traceback and exit status 1, not 130 and how to go on."""
    import signal

    import matplotlib.transforms as mt
    import numpy as np

    from paser.experiments.report import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots()
    ax.imshow(np.zeros((8, 8)))
    array, seen = mt.Affine2DBase.__array__, []

    def interrupted(self, *args, **kwargs):
        if not seen:  # Ctrl-C as matplotlib's C++ reads the image's matrix
            seen.append(True)
            signal.raise_signal(signal.SIGINT)
        return array(self, *args, **kwargs)

    def ctrl_c(signum, frame):
        raise KeyboardInterrupt

    monkeypatch.setattr(mt.Affine2DBase, "__array__", interrupted)
    before = signal.signal(signal.SIGINT, ctrl_c)  # a pytest-xdist worker ignores SIGINT
    try:
        with pytest.raises(KeyboardInterrupt):
            save_figure(fig, tmp_path / "f.png")
    finally:
        signal.signal(signal.SIGINT, before)
        plt.close(fig)
    assert seen and (tmp_path / "f.png").stat().st_size > 1000  # written whole first


def test_predictors_are_timed_in_turns_each_round_starting_with_the_next():
    import torch

    from paser.evaluation import Prediction, time_in_turns

    calls: list[tuple[str, int]] = []

    def predictor(name):
        def predict(x, idx):
            calls.append((name, int(x[0, 0, 0, 0])))  # which batch it was given
            return Prediction(x[:, 0].long(), torch.zeros(len(x)))
        return predict

    names = ["PaSeR", "f0", "f1"]
    batches = [torch.full((2, 1, 4, 4), float(b)) for b in range(2)]
    ms = time_in_turns({n: predictor(n) for n in names}, batches, torch.device("cpu"),
                       rounds=3, budget_s=60.0)
    assert calls == [("PaSeR", 0), ("f0", 0), ("f1", 0), ("f0", 1), ("f1", 1), ("PaSeR", 1),
                     ("f1", 0), ("PaSeR", 0), ("f0", 0)]
    assert {n: len(v) for n, v in ms.items()} == {"PaSeR": 3, "f0": 3, "f1": 3}
    assert all(v >= 0 for times in ms.values() for v in times)
    calls.clear()  # over its budget it stops after the least rounds
    ms = time_in_turns({n: predictor(n) for n in names}, batches, torch.device("cpu"),
                       rounds=5, least=2, budget_s=0.0)
    assert len(calls) == 6 and len(ms["f1"]) == 2
    # batches read as the rounds reach them; the images of each timed are kept
    from paser.data import Tensors
    from paser.evaluation import FirstBatches

    split = Tensors(torch.zeros(20, 1, 4, 4), torch.zeros(20, 4, 4, dtype=torch.uint8),
                    [str(i) for i in range(20)])
    firsts = FirstBatches(split, 8, 5)
    assert len(firsts) == 3 and firsts.used == []
    time_in_turns({n: predictor(n) for n in names}, firsts, torch.device("cpu"), rounds=2,
                  budget_s=60.0)
    assert firsts.used == [8, 8]
    time_in_turns({n: predictor(n) for n in names}, firsts, torch.device("cpu"), rounds=4,
                  budget_s=60.0)
    assert firsts.used == [8, 8, 4]


def test_the_wall_clock_line_says_how_it_was_timed_and_how_far_rounds_spread():
    from paser.experiments.report import wall_clock_line

    wc = {"paser_ms": 14.6, "frontier_ms_at_equal_iou": 14.2, "ratio": 1.028, "rounds": 5,
          "ratio_range": [0.95, 1.31], "batches": 3, "images": [8, 8, 4]}
    assert wall_clock_line(wc, 8) == (
        "Wall clock on this device: PaSeR 14.6 ms per image; the single models need 14.2 ms "
        "for its IoU (1.03 x) (medians of 5 rounds in which PaSeR and the single models each "
        "timed the same batch in turn, over the split's first 20 test images in 3 batches; "
        "single rounds gave 0.95 to 1.31 x). A few batches on a machine that may be "
        "shared give a rough figure; `make bench` (benchmarks/bench.py) times whole splits "
        "in turns.")
    one = wall_clock_line({**wc, "batches": 1, "images": [6]}, 8)
    assert "one batch of 6 test images;" in one
    # the rounds of a loaded machine (2 threads on 2 busy cores): said to be unreadable
    unsteady = wall_clock_line({**wc, "ratio_range": [0.03, 35.8]}, 8)
    assert "The rounds disagree by more than 2 x: this machine's timing was too unsteady" \
        in unsteady
    old = {k: wc[k] for k in ("paser_ms", "frontier_ms_at_equal_iou", "ratio")}
    assert "one method after another in this run, batches of 8" in wall_clock_line(old, 8)


def test_monte_carlo_passes_of_an_f0_without_dropout_are_said_to_be_one_answer_paid_t_times():
    from types import SimpleNamespace

    import torch

    from paser.experiments.main import passes_without_dropout
    from paser.models import create_model

    cfg = load_config(preset="battery-quick")
    plain = torch.nn.Conv2d(1, 3, 3, padding=1)  # no dropout
    routers = {"PaSeR": SimpleNamespace(f0=plain, mc_samples=1, mc_dropout="none"),
               "PaSeR (paper)": SimpleNamespace(f0=plain, mc_samples=5, mc_dropout="all"),
               "with dropout": SimpleNamespace(f0=create_model("unet_tiny"), mc_samples=5,
                                               mc_dropout="all")}
    assert passes_without_dropout(cfg, routers) == [
        "PaSeR (paper): f0 (unet_tiny) has no dropout, so its T = 5 Monte Carlo passes are "
        "one answer computed 5 times, each paid for; use an f0 with dropout, or "
        "mc_samples=1 mc_dropout=none"]


def test_table2_compares_paser_with_the_iou_matched_cascade():
    from paser.experiments.report import table2

    methods = {"PaSeR": {"gflops": 1.0, "iou": 0.8, "iou_per_gflop": 0.8},
               "IDK-Cascade (IoU match)": {"gflops": 2.0, "iou": 0.8, "iou_per_gflop": 0.4}}
    assert table2(methods) == {"flops_saved_pct": pytest.approx(50.0),
                               "iou_per_gflop_gain_pct": pytest.approx(100.0),
                               "iou_difference": 0.0}
    methods["PaSeR"] = {"gflops": 2.5, "iou": 0.81, "iou_per_gflop": 0.324}  # dearer
    assert table2(methods)["flops_saved_pct"] == pytest.approx(-25.0)


def test_the_setting_line_counts_tiles_and_the_images_they_came_from():
    base = {"device": "cpu", "seed": 0, "lam": 0.1, "image_size": [128, 128], "grid": [2, 2],
            "mc_samples": 1, "test_images": 40, "train_images": 240, "validation_images": 40}
    assert setting_line(base) == ("- device: cpu; seed 0; lam 0.1; test images 40 of 128 x 128 "
                                  "(train 240, validation 40); grid 2 x 2; T = 1\n")
    tiled = setting_line(base | {"tiled_from": {"train": 10, "validation": 2, "test": 3}})
    assert ("; test tiles 40 of 128 x 128 from 3 images (train 240 tiles from 10 images, "
            "validation 40 tiles from 2 images; below, an image is one of these tiles); "
            "grid") in tiled
    one = setting_line(base | {"tiled_from": {"train": 10, "validation": 1, "test": 1}})
    assert "test tiles 40 of 128 x 128 from 1 image (train 240 tiles from 10 images, " in one


def test_a_run_on_slices_of_one_volume_is_told_its_bootstrap_is_too_sure():
    volume = load_config(preset="battery-quick", overrides=[
        "data.dataset=volume", "data.root=/data", "data.volume=scan.tif",
        "data.labels=labels.tif"]).data
    assert "neighbouring slices look alike" in one_volume_note(volume)
    assert one_volume_note(load_config(preset="battery-quick").data) is None


def test_gap_recovered_is_none_where_the_largest_model_is_no_better_than_f0():
    from paser.experiments.report import add_honest_view

    methods = {"PaSeR": {"iou": 0.78, "gflops": 0.23}, "f0": {"iou": 0.74, "gflops": 0.17},
               "f1": {"iou": 0.75, "gflops": 1.0}, "f2": {"iou": 0.65, "gflops": 3.5}}
    add_honest_view(methods, "f2")  # f2 below f0: no gap, not a negative one
    assert [m["gap_recovered"] for m in methods.values()] == [None] * 4
    assert methods["PaSeR"]["gflops_frac_of_top"] == pytest.approx(0.23 / 3.5)
    methods["f2"]["iou"] = 0.84
    add_honest_view(methods, "f2")
    assert methods["PaSeR"]["gap_recovered"] == pytest.approx(0.4)
    assert methods["f0"]["gap_recovered"] == 0 and methods["f2"]["gap_recovered"] == 1


def test_the_table_of_paser_s_points_names_its_margin_as_one_point_s_iou():
    import io

    from paser.experiments.report import _regret_md

    out = io.StringIO()
    _regret_md(out.write, {"regret": [
        {"method": "PaSeR", "gflops": 1.817, "iou": 0.8574, "frontier": 0.8562,
         "above_frontier": 0.0012, "cascade": 0.8569, "oracle": 0.8688}]})
    text = out.getvalue()
    # its column read 'PaSeR - frontier', the name `paser compare` gives the curve areas'
    # difference (the routers' table's 'above the frontier'), and it held the rows of
    # PaSeR (paper) and the operating points too
    assert ("| method | GFLOP | IoU | frontier | IoU - frontier | IDK-Cascade | Oracle |"
            in text)
    assert "| PaSeR | 1.817 | 0.8574 | 0.8562 | +0.0012 | 0.8569 | 0.8688 |" in text
    assert "PaSeR - frontier" not in text


def test_the_docs_name_every_column_of_results_csv_and_how_its_gflop_are_counted(
        tmp_path, monkeypatch):
    import csv
    import re
    from pathlib import Path

    from paser.cost import FLOP_CONVENTION
    from paser.experiments import report

    monkeypatch.setattr(report, "markdown", lambda results: "")
    report.write_report(tmp_path, {"classes": ["pore"], "methods": {
        "f0": {"iou": 0.8, "gflops": 0.17, "per_class": [0.7]}}})
    with open(tmp_path / "results.csv", newline="") as f:
        header, row = list(csv.reader(f))
    assert row[:3] == ["f0", "0.8", "0.17"]
    # the csv's 'gflops' named neither its convention nor where to find it: a reader of the
    # paper (fvcore: a multiply-add counts once) read it as theirs, off by 2
    docs = (Path(__file__).parents[1] / "docs" / "experiments.md").read_text()
    said = " ".join(docs[docs.index("`results.csv` has"):].split("\n- ")[0].split())
    named = set(re.findall(r"`([a-z_<>]+)`", said))
    assert set(header) - {"iou_pore"} <= named and "iou_<class>" in named
    assert "torch.utils.flop_counter, one multiply-add counts as 2 FLOPs" in said
    assert FLOP_CONVENTION.startswith("torch.utils.flop_counter; one multiply-add counts as 2")


def test_paper_s_note_says_its_stage_3_tunes_a_pool_of_its_own():
    from paser.experiments.main import tuned_pool_said
    from paser.train.paper import paper_config

    paper = paper_config(load_config(preset="battery-quick"))
    # the note said 'trained on the same stage-1 pool', while its stage 3 fine-tunes its own
    # copy: the demo's f2 scores 0.8645 there against the run's 0.8638
    assert paper.stage3.epochs == 3
    assert tuned_pool_said(paper) == (
        ", whose stage 3 fine-tunes its own copy of f1..fK (3 epochs): its row, its curve and "
        "its rank correlation are of that pool, while the single-model frontier, the oracle "
        "and the headroom it is read against are of the run's")
    untuned = paper_config(load_config(preset="battery-quick",
                                       overrides=["baselines.paper.stage3.epochs=0"]))
    assert tuned_pool_said(untuned) == ""
