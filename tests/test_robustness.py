"""Robustness (paper R3): the noise (rate, seeding, channels), the pool swap that leaves f0
and the policy alone, and the study on a tiny finished run."""

import copy
import hashlib
import json

import pytest
import torch

from paser.api import PaSeR
from paser.data import Tensors
from paser.errors import CheckpointError, ConfigError
from paser.experiments import robustness as rob


def test_salt_and_pepper_hits_the_asked_share_of_pixels_half_white_half_black():
    images = torch.full((40, 1, 64, 64), 0.5)
    noisy = rob.salt_and_pepper(images, 0.01, seed=3)
    n = images[:, 0].numel()
    salt, pepper = (noisy == 1).sum().item(), (noisy == 0).sum().item()
    # Bernoulli(0.01) per pixel: 1638 expected, standard deviation 40
    assert abs(salt + pepper - 0.01 * n) < 4 * (0.01 * 0.99 * n) ** 0.5
    assert abs(salt - pepper) < 4 * (0.01 * n) ** 0.5  # salt vs pepper 0.5
    assert ((noisy == 0.5) | (noisy == 0) | (noisy == 1)).all()  # the rest is untouched
    assert torch.equal(noisy, rob.salt_and_pepper(images, 0.01, seed=3))  # seeded
    assert not torch.equal(noisy, rob.salt_and_pepper(images, 0.01, seed=4))
    assert torch.equal(rob.salt_and_pepper(images, 0.0, seed=3), images)


def test_salt_and_pepper_hits_every_channel_of_a_pixel_together():
    images = torch.rand(4, 3, 32, 32) * 0.8 + 0.1  # never exactly 0 or 1
    noisy = rob.salt_and_pepper(images, 0.2, seed=0)
    hit = (noisy != images).any(1)  # [N, H, W]
    assert 0.15 < hit.float().mean() < 0.25
    values = noisy.permute(0, 2, 3, 1)[hit]  # [hits, 3]
    assert ((values == 0).all(1) | (values == 1).all(1)).all()


def test_amount_outside_0_1_is_refused():
    with pytest.raises(ConfigError, match="fraction of pixels in"):
        rob.salt_and_pepper(torch.zeros(1, 1, 4, 4), 1.5, seed=0)


def test_clean_plus_noisy_keeps_labels_and_doubles_the_split():
    data = Tensors(torch.full((3, 1, 8, 8), 0.5), torch.randint(0, 2, (3, 8, 8)).byte(),
                   ["a", "b", "c"], torch.tensor([0, 1, 2]), ("x", "y", "z"))
    both = rob.clean_plus_noisy(data, 0.3, seed=1)
    assert len(both) == 6 and both.ids[3:] == ["a#noisy", "b#noisy", "c#noisy"]
    assert torch.equal(both.images[:3], data.images)
    assert not torch.equal(both.images[3:], data.images)
    assert torch.equal(both.masks[3:], data.masks) and both.groups.tolist() == [0, 1, 2] * 2


@pytest.mark.slow
def test_swap_pool_changes_only_the_pool(mnist_run):
    clean = PaSeR.load(mnist_run, device="cpu").router
    new_pool = [_perturbed(m) for m in clean.pool]
    swapped = rob.swap_pool(clean, new_pool)
    assert swapped.f0 is clean.f0 and swapped.policy is clean.policy
    assert all(a is b for a, b in zip(swapped.pool, new_pool, strict=True))
    x = torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        keep = torch.zeros(3, clean.grid.num_patches, dtype=torch.long)  # every patch on f0
        a, b = clean(x, actions=keep, mc_seed=0), swapped(x, actions=keep, mc_seed=0)
        assert torch.equal(a.probs, b.probs) and torch.equal(a.gflops, b.gflops)
        top = torch.full_like(keep, clean.num_models - 1)
        assert not torch.allclose(clean(x, actions=top, mc_seed=0).probs,
                                  swapped(x, actions=top, mc_seed=0).probs)
        # the policy sees the same state, so it chooses the same actions
        assert torch.equal(clean(x, mc_seed=0).actions, swapped(x, mc_seed=0).actions)
    with pytest.raises(ConfigError, match="1 models for a pool of 2"):
        rob.swap_pool(clean, new_pool[:1])


def _perturbed(model):
    m = copy.deepcopy(model)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1)
    return m.eval()


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_robustness_trains_a_noisy_pool_and_reports_table_3(mnist_run):
    ckpt = mnist_run / "checkpoints"
    before = {p.name: _digest(p) for p in ckpt.glob("*.pt")}
    out = rob.run_robustness(mnist_run, amount=0.05, epochs=1, show_progress=False)
    assert {p.name: _digest(p) for p in ckpt.glob("*.pt")} == before  # run untouched
    assert sorted(p.name for p in (ckpt / "noisy").glob("f?.pt")) == ["f1.pt", "f2.pt"]
    assert set(out["table"]) == {"PaSeR", "PaSeR-RandPol", "f0", "f2"}
    results = json.loads((mnist_run / "results.json").read_text())
    for name, row in out["table"].items():
        assert row["degradation_pct"] == pytest.approx(
            100 * (row["iou_clean"] - row["iou_noisy"]) / row["iou_clean"])
        # the clean column is Table 1's number: same models, same split, same code
        assert row["iou_clean"] == pytest.approx(results["methods"][name]["iou"], abs=1e-9)
    f0 = out["table"]["f0"]  # f0 is not swapped
    assert f0["iou_noisy"] == pytest.approx(f0["iou_noisy_original_models"], abs=1e-12)
    assert f0["iou_clean"] == pytest.approx(f0["iou_clean_noisy_models"], abs=1e-12)
    paser = out["table"]["PaSeR"]
    assert sum(paser["fractions_noisy"]) == pytest.approx(1.0)
    assert paser["share_above_f0_noisy"] == pytest.approx(1 - paser["fractions_noisy"][0])
    assert 0.0 < out["pixels_changed"] < 0.05
    stored = dict(results["experiments"]["robustness"])
    assert stored.pop("measured_on") and stored == json.loads(json.dumps(out))
    text = (mnist_run / "report.md").read_text()
    assert "Robustness to unseen noise (Table 3)" in text and "above f0:" in text
    assert (mnist_run / "figures" / "robustness_routing.png").stat().st_size > 1000

    # the same settings again: the noisy pool is reused, not retrained
    log = mnist_run / "metrics" / "robustness.jsonl"
    lines = log.read_text()
    again = rob.run_robustness(mnist_run, amount=0.05, epochs=1, show_progress=False)
    assert log.read_text() == lines and again["table"] == out["table"]
    # other noise: trained again
    rob.run_robustness(mnist_run, amount=0.1, epochs=1, show_progress=False)
    assert len(log.read_text().splitlines()) == len(lines.splitlines())
    assert json.loads((ckpt / "noisy" / "settings.json").read_text())["amount"] == 0.1


@pytest.mark.slow
def test_robustness_routes_paser_at_the_runs_calibrated_operating_point(mnist_run, tmp_path):
    import shutil

    from paser.calibration import Calibration
    from paser.data import load_stage_data

    run_dir = tmp_path / "run"
    shutil.copytree(mnist_run, run_dir)  # the shared run keeps no calibration
    router = PaSeR.load(run_dir, device="cpu").router
    # a bias no logit outweighs: every patch on f2, as segment would route it
    Calibration(bias=[-1e6, -1e6, 0.0], strength=1.0, target={"budget_gflops": 9.0},
                gflops=0.0, fractions=[0.0, 0.0, 1.0], miou=0.0, uncalibrated={}, images=1,
                height=32, width=32, policy=router.policy_digest).save(run_dir)
    # the report was of the run uncalibrated: an experiment waits for it to be written again
    with pytest.raises(CheckpointError, match=r"its report \(results.json\) was made on "
                       "other models or another calibration"):
        rob.run_robustness(run_dir, amount=0.05, epochs=0, show_progress=False)
    from paser.checkpoints import run_config
    from paser.run import run

    lines: list[str] = []
    run(run_config(run_dir), run_dir, show_progress=False, echo=lines.append)
    assert "[report] running (the run's models or calibration changed since the report was " \
           "written: a stage command or paser calibrate ran)" in lines
    out = rob.run_robustness(run_dir, amount=0.05, epochs=0, show_progress=False)
    paser = out["table"]["PaSeR"]
    assert paser["fractions_clean"] == [0.0, 0.0, 1.0]
    assert paser["fractions_noisy"] == [0.0, 0.0, 1.0]  # the same bias with the noisy pool
    deployed = PaSeR.load(run_dir, device="cpu")
    test = load_stage_data(deployed.config, progress=False).test
    assert paser["iou_clean"] == pytest.approx(deployed.evaluate(test, 4)["miou"], abs=1e-9)
    assert paser["iou_clean"] == pytest.approx(out["table"]["f2"]["iou_clean"], abs=1e-9)
    assert out["paser_operating_point"] == {"budget_gflops": "9"}
    text = (run_dir / "report.md").read_text()
    assert "calibrated operating point (a budget of 9 GFLOP per image" in text


def test_no_finished_run_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="no results.json"):
        rob.run_robustness(tmp_path)


@pytest.mark.slow  # `paser experiment` in processes
def test_cli_refuses_a_bad_amount(tmp_path):
    from tests.helpers import paser_here

    res = paser_here("experiment", "robustness", "--run-dir", str(tmp_path), "--amount", "0")
    assert res.returncode == 2 and "share of noisy pixels in (0, 1]" in res.stderr
    res = paser_here("experiment", "robustness", "--run-dir", str(tmp_path))
    assert res.returncode == 2 and "no results.json" in res.stderr
