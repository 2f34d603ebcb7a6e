"""The report's caveats: what a run's setting makes optimistic or hard to read, said where
the figures are. Small hand-built results, no run."""

from paser.config import load_config
from paser.experiments.main import same_images_note


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
           "them, 0.854 (0.265 more per image" in line
    assert mc_counting({**costs, "f0_shared": 0.0, "f0_mc": 0.854}) == (
        "f0's 5 Monte Carlo passes are each counted in full")
    assert mc_counting({"mc_samples": 1, "f0_pass": 0.1708, "f0_shared": 0.0,
                        "f0_mc": 0.1708}) == "f0 runs one pass"
