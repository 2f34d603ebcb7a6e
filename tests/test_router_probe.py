"""benchmarks/router_probe.py's dense target: every pixel's first-order effect on the
split's mIoU, which adds up over a patch to the report's patch gain."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from paser.outcomes import PatchOutcomes


@pytest.fixture()
def probe(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import router_probe

    return router_probe


def test_pixel_gain_by_hand(probe):
    # one 2 x 2 image, classes 0 and 1; f0 gets pixel (0, 1) wrong, f1 gets it right
    label = torch.tensor([[[0, 0], [1, 1]]])
    pred = torch.tensor([[[[0, 1], [1, 1]], [[0, 0], [1, 1]]]])  # [N, K+1, H, W]
    gain = probe.pixel_gain(label, pred, 2)
    # f0's totals: class 0 I = 1, U = 2; class 1 I = 2, U = 3. Pixel (0, 1) adds 1 to
    # class 0's intersection (1 / U_0) and takes 1 from class 1's union (+ I_1 / U_1^2)
    assert gain.shape == (1, 1, 2, 2)
    assert gain[0, 0, 0, 1].item() == pytest.approx(1 / 2 + 2 / 9)
    assert gain[0, 0].flatten()[[0, 2, 3]].tolist() == [0, 0, 0]


def test_pixel_gains_add_up_to_the_patch_gains(probe):
    from paser.metrics import confusion_counts

    g = torch.Generator().manual_seed(0)
    n, ncls, side, k = 3, 3, 8, 2
    label = torch.randint(0, ncls, (n, side, side), generator=g)
    label[0, :2] = -1  # unlabelled pixels count nowhere
    pred = torch.randint(0, ncls, (n, k + 1, side, side), generator=g)
    pred[:, 1:] = torch.where(torch.rand(n, k, side, side, generator=g) < 0.5,
                              label[:, None].clamp_min(0), pred[:, 1:])
    outcomes = probe.block_outcomes({"label": label, "pred": pred}, 4, ncls,
                                    torch.zeros(n, 1, side, side))
    assert outcomes.inter.shape == (n, 4, k + 1, ncls)
    # the block counts are the counts of each 4 x 4 block
    counts = confusion_counts(pred[1, 2, 4:, :4][None], label[1, 4:, :4][None], ncls,
                              ignore_index=-1)
    assert torch.equal(outcomes.inter[1, 2, 2], counts[0][0])
    assert torch.equal(outcomes.union[1, 2, 2], counts[1][0])
    per_patch = probe.block_sums(probe.pixel_gain(label, pred, ncls), 4)  # [N, P, K]
    present = (outcomes.union[:, :, 0].sum((0, 1)) > 0).sum()
    scale = n * 4 / present
    expected = PatchOutcomes.dataset_gain(outcomes)[..., 1:]
    assert torch.allclose(per_patch * scale, expected, atol=1e-5)


def test_a_two_step_cascade_pays_f1_and_f2_for_a_patch_it_moves_on(probe):
    # two patches; predicted gains of f1, f2 over f0, and of f2 over f1 once f1 is seen
    gains = torch.tensor([[0.5, 0.6], [0.1, 1.0]])
    upgrade = torch.tensor([0.3, 0.0])
    rel = torch.tensor([0.0, 0.25, 1.0])
    actions, cost = probe.cascade_actions(gains, upgrade, rel, torch.tensor([0.0, 0.2, 0.5]))
    # free: both straight to f2. At 0.2 the first patch goes to f1 (0.45 > 0.4) and on to
    # f2 (0.3 > 0.2), paying both; at 0.5 it stays on f1 (0.3 < 0.5)
    assert actions.tolist() == [[2, 2], [2, 2], [1, 2]]
    assert cost.tolist() == [[1.0, 1.0], [1.25, 1.0], [0.25, 1.0]]


def test_patch_features_by_hand(probe):
    # one 4 x 4 image in 2 x 2 patches; f0 sure of class 0 everywhere, f1 says class 1 on
    # the top-left patch
    probs = torch.zeros(1, 2, 4, 4)
    probs[:, 0] = 1.0
    pool = probs.clone()[:, None].repeat(1, 2, 1, 1, 1)
    pool[0, 0, :, :2, :2] = torch.tensor([0.0, 1.0])[:, None, None]
    image = torch.arange(16.0).view(1, 1, 4, 4)
    d = {"probs": probs, "pool": pool, "image": image, "label": torch.zeros(1, 4, 4)}
    first = probe.patch_features(d, 2, second=False)
    assert first.shape == (4, 4 + 2 + 2)
    assert first[:, :3].abs().sum() == 0  # no entropy anywhere
    assert first[:, 3].tolist() == [1.0] * 4  # top probability
    assert first[0, 4].item() == pytest.approx(image[0, 0, :2, :2].mean().item())
    assert first[:, 6:].tolist() == [[1.0, 0.0]] * 4  # every pixel class 0
    both = probe.patch_features(d, 2, second=True)
    assert both.shape == (4, 8 + 4 + 2 + 2)
    assert both[:, 12].tolist() == [1.0, 0.0, 0.0, 0.0]  # where f1 changes f0's answer
    assert both[:, 13].tolist() == [2.0, 0.0, 0.0, 0.0]  # L1 distance of probabilities
    assert both[0, 14:].tolist() == [-1.0, 1.0]  # class shares moved from 0 to 1


def test_blocks_that_do_not_tile_the_images_are_refused(probe):
    probe.check_blocks([16, 32, 64, 128], 128, 128)
    with pytest.raises(SystemExit, match=r"--blocks 48 256: each block must divide the "
                                         r"run's padded images, 128 x 128 pixels"):
        probe.check_blocks([16, 48, 256], 128, 128)
    with pytest.raises(SystemExit, match="--blocks 64: .* 128 x 96"):
        probe.check_blocks([32, 64], 128, 96)


def test_a_cascade_on_another_pool_is_refused_before_any_part_runs(probe, monkeypatch,
                                                                   tmp_path):
    from types import SimpleNamespace

    # a run of three pool models: the cascade's check came after the images and protocol
    # parts had run (minutes), and their figures were lost with it
    run = SimpleNamespace(cfg=SimpleNamespace(models=SimpleNamespace(num_classes=3)))
    router = SimpleNamespace(num_models=4, eval=lambda: router)
    monkeypatch.setattr(probe, "open_finished", lambda run_dir, show_progress: run)
    monkeypatch.setattr(probe.PaSeR, "load",
                        lambda run_dir, device: SimpleNamespace(router=router))
    monkeypatch.setattr(probe, "images_probe", lambda *a: pytest.fail("ran the images part"))
    with pytest.raises(SystemExit, match=r"a pool of two models \(f1, f2\); .* has 3"):
        probe.probe(tmp_path, [0], [64], ["images", "cascade"])


@pytest.mark.parametrize("overrides, within", [
    ([], 0.005), (["operating_point.iou_within_top=0.01"], 0.01),
    # a run calibrated to a budget, or not at all: the protocol part stopped on
    # float - None after the images part had run
    (["operating_point.iou_within_top=null", "operating_point.budget_gflops=1.5"], 0.005),
    (["operating_point.iou_within_top=null"], 0.005)])
def test_table2_on_validation_reads_the_runs_rule_or_the_reports_row(probe, overrides, within):
    from paser.config import load_config

    cfg = load_config(preset="battery-quick", overrides=overrides)
    assert probe.within_top(cfg) == within


def test_the_dense_router_is_kept_by_its_error_over_the_runs_patches(probe, monkeypatch):
    # 8 x 8 images on a 4 x 4 grid: patches of 2 pixels, 1 on the half-resolution map. The
    # epoch kept was chosen over blocks of a quarter of the image's width, the patch of a
    # 2 x 2 grid alone (battery-paper routes 4 x 4, mnist-noisy 1 x 1)
    g = torch.Generator().manual_seed(0)

    def split(n):
        label = torch.randint(0, 2, (n, 8, 8), generator=g)
        return {"probs": torch.rand(n, 2, 8, 8, generator=g).softmax(1),
                "image": torch.rand(n, 1, 8, 8, generator=g), "label": label,
                "pred": torch.randint(0, 2, (n, 3, 8, 8), generator=g)}

    data = {s: split(2) for s in ("rl", "ft", "validation")}
    sides = []
    sums = probe.block_sums
    monkeypatch.setattr(probe, "block_sums", lambda m, side: sides.append(side) or sums(m, side))
    probe.train_dense(data, 2, seed=0, image=False, patch=2, epochs=2)
    assert sides == [1, 1, 1, 1]  # net's and the target's, each epoch


def test_the_per_pixel_parts_refuse_patches_that_are_not_square(probe, monkeypatch, tmp_path):
    from types import SimpleNamespace

    from paser.patches import PatchGrid

    # battery-paper: 224 x 256 images on a 4 x 4 grid, patches of 56 x 64. The per-pixel
    # parts summed over 64 x 64 blocks and stopped on "cannot split a 224x256 image" after
    # the images and protocol parts had run
    test = SimpleNamespace(batches=lambda n: iter([(torch.zeros(1, 1, 224, 256), None)]))
    run = SimpleNamespace(cfg=SimpleNamespace(models=SimpleNamespace(num_classes=3)),
                          data=SimpleNamespace(test=test))
    router = SimpleNamespace(num_models=3, grid=PatchGrid(4, 4), eval=lambda: router)
    monkeypatch.setattr(probe, "open_finished", lambda run_dir, show_progress: run)
    monkeypatch.setattr(probe.PaSeR, "load",
                        lambda run_dir, device: SimpleNamespace(router=router))
    with pytest.raises(SystemExit, match="need square patches; .* are 56 x 64 pixels"):
        probe.probe(tmp_path, [0], [16], ["images", "dense"])


def test_each_part_is_written_as_it_finishes(probe, monkeypatch, tmp_path):
    import json
    import sys
    from types import SimpleNamespace

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "results.json").write_text(json.dumps({
        "curve_range": [1.0, 2.0], "curves": {"Frontier": {}, "Oracle": {}},
        "headroom_captured": {"PaSeR": 0.4}, "rank_correlation": {"PaSeR": 0.7}}))
    results = tmp_path / "router_probe.json"
    results.write_text(json.dumps({str(run_dir): {"cascade": ["an earlier call's"]}}))
    monkeypatch.setattr(probe, "RESULTS", results)
    run = SimpleNamespace(cfg=SimpleNamespace(models=SimpleNamespace(num_classes=3)),
                          data=SimpleNamespace(test=None))
    router = SimpleNamespace(num_models=3, eval=lambda: router, costs=lambda *shape: None)
    monkeypatch.setattr(probe, "open_finished", lambda run_dir, show_progress: run)
    monkeypatch.setattr(probe.PaSeR, "load",
                        lambda run_dir, device: SimpleNamespace(router=router))
    monkeypatch.setattr(probe.PatchOutcomes, "build", lambda *a, **k: SimpleNamespace(
        state=torch.zeros(1, 4, 1, 2, 2)))
    monkeypatch.setattr(probe, "images_probe", lambda *a: [{"share": 1.0}])

    def stopped(*a):  # Ctrl-C in the part after it
        raise KeyboardInterrupt

    monkeypatch.setattr(probe, "protocol_probe", stopped)
    monkeypatch.setattr(sys, "argv", ["router_probe.py", str(run_dir), "--parts", "images",
                                      "protocol"])
    with pytest.raises(KeyboardInterrupt):
        probe.main()
    entry = json.loads(results.read_text())[str(run_dir)]
    assert entry["images"] == [{"share": 1.0}]
    assert entry["cascade"] == ["an earlier call's"]  # --parts replaces only its parts
    assert "protocol" not in entry
