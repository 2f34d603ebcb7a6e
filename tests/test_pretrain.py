"""Stage 1 on a tiny synthetic set: checkpoints, metrics, distillation and exact resume."""

import json
import re

import pytest
import torch
from tests.helpers import IOU_ABS

from paser.config import load_config
from paser.train import pretrain as stage1
from paser.train.common import MetricLog

TINY = [
    "num_threads=1", "data.synthetic.n_train=9", "data.synthetic.n_val=2", "data.synthetic.n_test=2",
    "data.synthetic.height=32", "data.synthetic.width=32", "grid=[2, 2]",
    "stage1.epochs=2", "stage1.batch_size=2", "models.f0.epochs=2",
    "models.pool.0.epochs=null", "models.pool.1.epochs=null",
    "models.pool.0.kwargs={c0: 2, widths: [4, 4]}",
    "models.pool.1.kwargs={c0: 4, widths: [8, 8]}",
]

#: stage 1's test mIoU on TINY after 2 epochs, trained channels-last (runtime.place) and kept as
#: battery-quick's weight average (stage1.ema), each model seeded from (seed, role)
#: (train.common.seed_role; from one seed in turn they were 0.1705, 0.0372, 0.4263)
TEST_MIOU = {"f0": 0.2651, "f1": 0.0568, "f2": 0.0553}


def _done(line: str) -> str:
    """A progress line's ``done/total``."""
    return next(t for t in line.split() if re.fullmatch(r"\d+/\d+", t))


@pytest.fixture
def tiny_cfg(tmp_path):
    return load_config(preset="battery-quick",
                       overrides=[*TINY, f"data.cache_dir={tmp_path / 'cache'}"])


@pytest.mark.slow
def test_stage1_writes_checkpoints_metrics_and_summary(tiny_cfg, tmp_path, monkeypatch, capsys):
    import paser.runtime as R

    monkeypatch.setattr(R, "LOG_EVERY_S", 0.0)  # every move of a bar, as a line in a log
    run = tmp_path / "run"
    summary = stage1.pretrain(tiny_cfg, run, show_progress=True)
    lines = capsys.readouterr().err.splitlines()
    # a bar moves through the pool's last reading of both splits (minutes on large slices)
    last = [_done(line) for line in lines if line.startswith("stage 1: each model")]
    n = len(tiny_cfg.models.pool) + 1
    assert last == [f"{2 * k}/{n * 4}" for k in range(1, 2 * n + 1)]  # 2 images a batch
    for role in ("f0", "f1", "f2"):
        best = torch.load(run / "checkpoints" / f"{role}.pt", weights_only=False)
        last = torch.load(run / "checkpoints" / f"{role}_last.pt", weights_only=False)
        assert last["epoch"] == 1 and {"optimizer", "rng"} <= last.keys()
        assert best["val_miou"] == max(r["val_miou"] for r in MetricLog(
            run / "metrics" / "stage1.jsonl").read() if r["model"] == role)
        assert summary["models"][role]["test_miou"] == pytest.approx(TEST_MIOU[role], abs=IOU_ABS)
    records = MetricLog(run / "metrics" / "stage1.jsonl").read()
    # task models first, then f0 (it distils from f2)
    assert [(r["model"], r["epoch"]) for r in records] == [
        ("f1", 0), ("f1", 1), ("f2", 0), ("f2", 1), ("f0", 0), ("f0", 1)]
    assert json.loads((run / "stage1.json").read_text()) == summary
    assert "multiply-add counts as 2" in summary["flop_convention"]
    assert (run / "config.yaml").is_file()
    # what inference reads the run's inputs with: 8-bit synthetic data needs no window
    assert json.loads((run / "intensity.json").read_text())["window"] is None


@pytest.mark.parametrize(("augment", "ema"), [("off", None), ("on", None), ("off", 0.9)])
@pytest.mark.slow
def test_resume_after_interruption_ends_like_an_uninterrupted_run(tiny_cfg, tmp_path,
                                                                   monkeypatch, augment, ema):
    # augmented: the same draws again on resume, each epoch 2 passes over D_pre's 4 images;
    # with a weight average, the average goes on from where it was
    tiny_cfg = tiny_cfg.model_copy(update={"stage1": tiny_cfg.stage1.model_copy(
        update={"augment": augment, "min_epoch_images": 8, "ema": ema})})
    straight = stage1.pretrain(tiny_cfg, tmp_path / "a", show_progress=False)

    calls = {"n": 0}
    real_write = MetricLog.write

    def dying_write(self, record):
        real_write(self, record)
        calls["n"] += 1
        if calls["n"] == 3:  # f2 finished its first epoch
            raise KeyboardInterrupt

    monkeypatch.setattr(MetricLog, "write", dying_write)
    with pytest.raises(KeyboardInterrupt):
        stage1.pretrain(tiny_cfg, tmp_path / "b", show_progress=False)
    monkeypatch.setattr(MetricLog, "write", real_write)
    assert not (tmp_path / "b" / "checkpoints" / "f0.pt").exists()
    resumed = stage1.pretrain(None, tmp_path / "b", resume=True, show_progress=False)

    assert resumed["models"] == straight["models"]
    a = MetricLog(tmp_path / "a" / "metrics" / "stage1.jsonl").read()
    b = MetricLog(tmp_path / "b" / "metrics" / "stage1.jsonl").read()
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in a]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in b]


def test_distillation_target_is_the_stitched_large_model(tiny_cfg, tmp_path):
    from paser.patches import PatchGrid

    model = torch.nn.Conv2d(1, 3, 1)
    grid = PatchGrid(2, 2)
    x = torch.rand(2, 1, 8, 8)
    stitched = stage1.patchwise(grid)(model, x)
    assert torch.allclose(stitched, model(x), atol=1e-6)  # a 1x1 conv: patches change nothing


def test_augmentation_views_are_inverted_and_on_where_the_data_allows(tiny_cfg):
    from paser.outcomes import unview, view

    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    for v in range(8):
        assert torch.equal(unview(view(x, v), v), x)
    assert stage1.augmentations(tiny_cfg, 32, 32) == []  # the synthetic set: off (auto)
    folder = load_config(preset="battery-quick", overrides=[
        "data.dataset=folder", "data.root=/data", "grid=[2, 2]"])
    assert stage1.augmentations(folder, 32, 32) == list(range(8))  # mirrors and turns
    assert stage1.augmentations(folder, 32, 48) == [0, 1, 2, 3]  # not square: no quarter turn
    volume = load_config(preset="battery-quick", overrides=[
        "data.dataset=volume", "data.root=/data", "data.volume=v.tif", "data.labels=l.tif",
        "data.slices={train: [0, 8], validation: [8, 10], test: [10, 12]}", "grid=[2, 2]"])
    assert stage1.augmentations(volume, 32, 32) == list(range(8))  # slices of a volume: on
    on = load_config(preset="battery-quick", overrides=[*TINY, "stage1.augment=on"])
    assert on.stage1.augment == "on"  # YAML's on (a boolean) taken as meant
    assert stage1.augmentations(on, 32, 32) == list(range(8))
    gen = torch.Generator().manual_seed(0)
    y = stage1.jitter(torch.ones(64, 1, 2, 2), 0.1, gen)
    assert y.shape == (64, 1, 2, 2) and (y - 1).abs().max() <= 0.15 and y.std() > 0.02
    assert torch.equal(y[:, :, 0, 0], y[:, :, 1, 1])  # one gain and offset per image


def test_an_epoch_draws_at_least_min_epoch_images_where_stage1_augments(tiny_cfg):
    assert tiny_cfg.stage1.min_epoch_images == 100  # battery-quick's
    assert stage1.epoch_draws(tiny_cfg, 3) == 3  # the synthetic set: not augmented, one pass
    on = tiny_cfg.model_copy(update={"stage1": tiny_cfg.stage1.model_copy(
        update={"augment": "on", "min_epoch_images": 7})})
    assert stage1.epoch_draws(on, 3) == 7 and stage1.epoch_draws(on, 9) == 9
    assert stage1.epoch_draws(on, 0) == 0  # nothing to repeat
    # one pass is the permutation an epoch always drew (the demo's runs do not move)
    order = stage1.epoch_order(5, 5, torch.Generator().manual_seed(3))
    assert torch.equal(order, torch.randperm(5, generator=torch.Generator().manual_seed(3)))
    # more: whole permutations one after the other, cut; every image as often as the rest
    order = stage1.epoch_order(3, 7, torch.Generator().manual_seed(3))
    assert len(order) == 7 and sorted(order[:6].tolist()) == [0, 0, 1, 1, 2, 2]
    g = torch.Generator().manual_seed(3)
    first = torch.randperm(3, generator=g)
    assert torch.equal(order[:3], first)


@pytest.mark.slow
def test_augmented_training_learns_from_other_views(tiny_cfg, tmp_path):
    on = tiny_cfg.model_copy(update={"stage1": tiny_cfg.stage1.model_copy(
        update={"augment": "on", "min_epoch_images": None})})
    stage1.pretrain(tiny_cfg, tmp_path / "off", show_progress=False)
    stage1.pretrain(on, tmp_path / "on", show_progress=False)
    off_log = MetricLog(tmp_path / "off" / "metrics" / "stage1.jsonl").read()
    on_log = MetricLog(tmp_path / "on" / "metrics" / "stage1.jsonl").read()
    assert [r["loss"] for r in off_log] != [r["loss"] for r in on_log]


def test_a_validation_split_without_a_labelled_pixel_stops_stage1_saying_so(
        tiny_cfg, tmp_path, monkeypatch):
    import dataclasses

    from paser.data import IGNORE
    from paser.errors import DataError

    real = stage1.load_stage_data

    def unlabelled(*args, **kwargs):  # a copy: the loaded splits may be cached
        data = real(*args, **kwargs)
        val = data.validation
        return dataclasses.replace(data, validation=dataclasses.replace(
            val, masks=torch.full_like(val.masks, IGNORE)))

    monkeypatch.setattr(stage1, "load_stage_data", unlabelled)
    with pytest.raises(DataError, match=r"stage 1 f1: the validation split \(2 images\) has "
                                        r"no labelled pixel .*label part of its images"):
        stage1.pretrain(tiny_cfg, tmp_path / "run", show_progress=False)


@pytest.mark.slow
def test_weight_average_warms_up_to_its_decay_and_is_what_stage1_keeps(tiny_cfg, tmp_path):
    model = torch.nn.Linear(1, 1, bias=False)
    ema = stage1.weight_average(model, 0.5)
    expected = None
    for t, w in enumerate([2.0, 4.0, 1.0, 3.0, 5.0, 7.0, 1.0, 2.0, 6.0, 8.0, 0.0]):
        model.weight.data.fill_(w)
        ema.update_parameters(model)
        # the first step copies; then the decay is min(0.5, (1 + t) / (10 + t)), t the
        # steps averaged before (from t = 8 on, 0.5 itself)
        d = min(0.5, (1 + t) / (10 + t))
        expected = w if t == 0 else d * expected + (1 - d) * w
        assert ema.module.weight.item() == pytest.approx(expected, rel=1e-6)
    assert stage1.weight_average(model, None) is None

    # BatchNorm's running statistics are averaged as the weights are; its count of batches
    # (an integer) follows the model
    bn = torch.nn.BatchNorm1d(1, affine=False)
    ema = stage1.weight_average(bn, 0.5)
    for t, m in enumerate([2.0, 6.0]):
        bn.running_mean.fill_(m)
        bn.num_batches_tracked.fill_(t + 1)
        ema.update_parameters(bn)
    assert ema.module.running_mean.item() == pytest.approx(2 / 11 * 2.0 + 9 / 11 * 6.0)
    assert ema.module.num_batches_tracked.item() == 2

    cfg = tiny_cfg.model_copy(update={"stage1": tiny_cfg.stage1.model_copy(
        update={"ema": 0.9, "epochs": 1}), "models": tiny_cfg.models.model_copy(update={"pool": [
            tiny_cfg.models.pool[0]]})})
    stage1.pretrain(cfg, tmp_path / "run", show_progress=False)
    ckpt = tmp_path / "run" / "checkpoints"
    last = torch.load(ckpt / "f1_last.pt", weights_only=False)
    best = torch.load(ckpt / "f1.pt", weights_only=False)
    assert int(last["ema"]["n_averaged"]) == 2  # 1 epoch of 2 batches of D_pre's 4 images
    assert best["epoch"] == last["epoch"] == 0  # the best on validation is the last epoch, and
    for k, v in best["model"].items():  # what it keeps is the average, not the last step's
        assert torch.equal(v, last["ema"][f"module.{k}"])
    assert any(not torch.equal(v, last["model"][k]) for k, v in best["model"].items())


@pytest.mark.slow
def test_each_model_is_seeded_on_its_own(tmp_path):
    """f1 training one epoch more (its dropout drawing more numbers) leaves f2, and so f0,
    which distils from it, as they were: a table comparing f1 variants compares f1 alone."""
    weights = {}
    for f1_epochs in (0, 1):
        cfg = load_config(preset="battery-quick", overrides=[
            *TINY, "stage1.epochs=1", "models.f0.epochs=1", f"models.pool.0.epochs={f1_epochs}",
            f"data.cache_dir={tmp_path / 'cache'}"])
        run = tmp_path / f"f1_{f1_epochs}"
        stage1.pretrain(cfg, run, show_progress=False)
        weights[f1_epochs] = {role: torch.load(run / "checkpoints" / f"{role}.pt",
                                               weights_only=False)["model"]
                              for role in ("f0", "f1", "f2")}
    same = {role: all(torch.equal(a, weights[1][role][k]) for k, a in weights[0][role].items())
            for role in ("f0", "f1", "f2")}
    assert same == {"f0": True, "f1": False, "f2": True}


@pytest.mark.slow
def test_paser_run_keeps_the_models_whose_own_settings_did_not_change(tmp_path):
    """Stage 1 again after one model's settings changed (reuse, as paser run does): the
    others are kept, byte for byte, and every model equals a fresh run's."""
    def cfg_with(*extra):
        return load_config(preset="battery-quick", overrides=[
            *TINY, "stage1.epochs=1", *extra, f"data.cache_dir={tmp_path / 'cache'}"])

    def files(run):
        return {role: (run / "checkpoints" / f"{role}.pt").read_bytes()
                for role in ("f0", "f1", "f2")}

    run = tmp_path / "run"
    stage1.pretrain(cfg_with(), run, show_progress=False, reuse=True)
    first = files(run)
    changed = cfg_with("models.f0.epochs=3")  # f0 only (TINY: 2): f1 and f2 are kept
    stage1.pretrain(changed, run, show_progress=False, reuse=True)
    second = files(run)
    assert {r: second[r] == first[r] for r in first} == {"f0": False, "f1": True, "f2": True}
    lines = [(r["model"], r["epoch"]) for r in MetricLog(run / "metrics" / "stage1.jsonl").read()]
    assert lines == [("f1", 0), ("f2", 0), ("f0", 0), ("f0", 1), ("f0", 2)]
    changed = cfg_with("models.f0.epochs=3", "models.pool.0.epochs=2")  # f1: f2 and f0 kept
    stage1.pretrain(changed, run, show_progress=False, reuse=True)
    third = files(run)
    assert {r: third[r] == second[r] for r in first} == {"f0": True, "f1": False, "f2": True}
    fresh = tmp_path / "fresh"
    stage1.pretrain(changed, fresh, show_progress=False)
    for role in ("f0", "f1", "f2"):
        a = torch.load(run / "checkpoints" / f"{role}.pt", weights_only=False)["model"]
        b = torch.load(fresh / "checkpoints" / f"{role}.pt", weights_only=False)["model"]
        assert all(torch.equal(v, b[k]) for k, v in a.items()), role
    stage1.pretrain(changed, run, show_progress=False)  # no reuse (--force): all again
    assert (run / "checkpoints" / "f1.trained.json").is_file()


@pytest.mark.slow
def test_resume_trains_again_the_models_a_new_config_was_cut_short_before(tmp_path,
                                                                           monkeypatch):
    """A run whose settings changed (every model trains again) cut short in f1: f2 and f0
    still hold the last checkpoints of the config before, and --resume must not take
    them for finished. Every model ends as a fresh run's."""
    def cfg_with(*extra):
        return load_config(preset="battery-quick", overrides=[
            *TINY, "stage1.epochs=1", "models.f0.epochs=1", *extra,
            f"data.cache_dir={tmp_path / 'cache'}"])

    run = tmp_path / "run"
    stage1.pretrain(cfg_with(), run, show_progress=False)
    changed = cfg_with("stage1.lr=0.01")
    real_write = MetricLog.write

    def dying_write(self, record):
        real_write(self, record)
        raise KeyboardInterrupt  # f1 finished its only epoch

    monkeypatch.setattr(MetricLog, "write", dying_write)
    with pytest.raises(KeyboardInterrupt):
        stage1.pretrain(changed, run, show_progress=False)
    monkeypatch.setattr(MetricLog, "write", real_write)
    stage1.pretrain(None, run, resume=True, show_progress=False)
    fresh = tmp_path / "fresh"
    stage1.pretrain(changed, fresh, show_progress=False)
    same = {}
    for role in ("f0", "f1", "f2"):
        a = torch.load(run / "checkpoints" / f"{role}.pt", weights_only=False)["model"]
        b = torch.load(fresh / "checkpoints" / f"{role}.pt", weights_only=False)["model"]
        same[role] = all(torch.equal(v, b[k]) for k, v in a.items())
    assert same == {"f0": True, "f1": True, "f2": True}


BN_NET = """
import torch
from torch import nn

class Pooled(nn.Module):
    # a 3x3 conv beside an image-pooling branch with BatchNorm, as DeepLabV3+'s ASPP has:
    # one value per channel on a batch of one image
    def __init__(self, in_channels, num_classes):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, num_classes, 3, padding=1)
        self.pooled = nn.Sequential(nn.AdaptiveAvgPool2d(1),
                                    nn.Conv2d(in_channels, num_classes, 1),
                                    nn.BatchNorm2d(num_classes))

    def forward(self, x):
        return self.conv(x) + self.pooled(x)

def pooled(in_channels, num_classes):
    return Pooled(in_channels, num_classes)
"""


@pytest.mark.slow
def test_models_with_batchnorm_skip_what_a_batch_of_one_cannot_train(tmp_path, monkeypatch):
    """f0 on a last batch of one image, and a pool model given one patch in stage 3."""
    from tests.helpers import TINY as PIPELINE

    from paser.train.finetune import finetune
    from paser.train.policy import train_policy

    (tmp_path / "bnnets.py").write_text(BN_NET)
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = load_config(preset="battery-quick", overrides=[
        *PIPELINE, f"data.cache_dir={tmp_path / 'cache'}", "stage1.batch_size=3",
        "models.f0={name: 'bnnets:pooled', epochs: 2}", "stage3.batch_size=1",
        "models.pool.1={name: 'bnnets:pooled'}"])
    run = tmp_path / "run"
    stage1.pretrain(cfg, run, show_progress=False)
    pre = len(stage1.load_stage_data(cfg, progress=False).pre)
    assert pre % 3 == 1  # so the last batch of every epoch holds one image
    last = torch.load(run / "checkpoints" / "f0_last.pt", weights_only=False)
    assert int(last["ema"]["n_averaged"]) == 2 * (pre // 3)  # that batch was skipped
    train_policy(None, run, show_progress=False)
    assert finetune(None, run, show_progress=False)["epochs"] == 2
    # batches of one image by choice (stage1.batch_size=1) all train: a BatchNorm UNet
    # normalises over each image's pixels
    ones = load_config(preset="battery-quick", overrides=[
        *PIPELINE, f"data.cache_dir={tmp_path / 'cache'}", "stage1.batch_size=1",
        "models.f0.kwargs={norm: batch}", "models.pool.0.kwargs={c0: 2, widths: [4, 4], "
        "norm: batch}"])
    stage1.pretrain(ones, tmp_path / "ones", show_progress=False)
    for role in ("f0", "f1"):
        last = torch.load(tmp_path / "ones" / "checkpoints" / f"{role}_last.pt",
                          weights_only=False)
        assert int(last["ema"]["n_averaged"]) == pre * ones.models.f0.epochs


@pytest.mark.slow
def test_a_checkpoint_of_a_model_started_from_weights_serves_as_weights(tiny_cfg, tmp_path):
    """Its spec holds the weights' path: stored as text, the checkpoint stays readable with
    weights_only, so one run's f1 can start another's."""
    from paser.checkpoints import build_model
    from paser.models.registry import read_state_dict

    start = tmp_path / "f1_start.pt"
    torch.save(build_model(tiny_cfg, tiny_cfg.models.pool[0]).state_dict(), start)
    pool = [tiny_cfg.models.pool[0].model_copy(update={"weights": start}),
            tiny_cfg.models.pool[1]]
    cfg = tiny_cfg.model_copy(update={"models": tiny_cfg.models.model_copy(update={"pool": pool})})
    stage1.pretrain(cfg, tmp_path / "run", show_progress=False)
    ckpt = tmp_path / "run" / "checkpoints" / "f1.pt"
    assert torch.load(ckpt, weights_only=True)["spec"]["weights"] == str(start)
    assert read_state_dict(ckpt).keys() == torch.load(start).keys()


def test_patience_and_ties_decide_the_epoch_kept(tiny_cfg, tmp_path, monkeypatch):
    from paser.data import Tensors

    cfg = tiny_cfg.model_copy(
        update={"stage1": tiny_cfg.stage1.model_copy(update={"patience": 2, "ema": None})}
    )
    scores = iter([0.5, 0.6, 0.6, 0.58, 0.9])  # best at 1; a tie at 2 does not move it
    monkeypatch.setattr(stage1, "evaluate_miou", lambda *a, **k: next(scores))
    data = Tensors(torch.rand(4, 1, 8, 8), torch.randint(0, 3, (4, 8, 8)).byte(), list("abcd"))
    (tmp_path / "checkpoints").mkdir()
    log, cpu = MetricLog(tmp_path / "metrics" / "stage1.jsonl"), torch.device("cpu")
    stage1.fit(
        "f1",
        torch.nn.Conv2d(1, 3, 1),
        stage1.whole_image,
        stage1.weighted_ce(cfg, cpu),
        data,
        data,
        cfg=cfg,
        epochs=5,
        lr=1e-3,
        run_dir=tmp_path,
        log=log,
        resume=False,
        device=cpu,
        show_progress=False,
    )
    assert [(r["epoch"], r["best_epoch"], r["stopped"]) for r in log.read()] == [
        (0, 0, False),
        (1, 1, False),
        (2, 1, False),
        (3, 1, True),
    ]  # 2 epochs without a gain: stop
    assert torch.load(tmp_path / "checkpoints" / "f1.pt", weights_only=False)["epoch"] == 1


@pytest.mark.slow
def test_f0_distils_fks_stitched_logits_with_weight_a_kd(tiny_cfg, tmp_path, monkeypatch):
    from paser.checkpoints import load_trained
    from paser.data import IGNORE
    from paser.patches import PatchGrid

    f0 = tiny_cfg.models.f0.model_copy(update={"epochs": 1})
    cfg = tiny_cfg.model_copy(
        update={
            "models": tiny_cfg.models.model_copy(update={"f0": f0}),
            "stage1": tiny_cfg.stage1.model_copy(update={"a_kd": 0.25, "epochs": 1}),
        }
    )
    seen, fit = {}, stage1.fit

    def spy(role, model, forward, loss_fn, train, *args, **kwargs):
        seen[role] = (loss_fn, train)
        return fit(role, model, forward, loss_fn, train, *args, **kwargs)

    monkeypatch.setattr(stage1, "fit", spy)
    stage1.pretrain(cfg, tmp_path / "run", show_progress=False)
    loss, train = seen["f0"]
    with torch.inference_mode():
        fk = stage1.patchwise(PatchGrid(*cfg.grid, halo=cfg.halo))(
            load_trained(tmp_path / "run", cfg, "f2"), train.images[:2]
        ).float()
    none, idx = (
        torch.full((2, *fk.shape[2:]), IGNORE),
        torch.arange(2),
    )  # no labelled pixel: the MSE term alone
    assert loss(0 * fk, none, idx).item() == pytest.approx(
        0.25 * fk.square().mean().item(), rel=1e-2
    )
    assert loss(fk, none, idx).item() == pytest.approx(0.0, abs=1e-4)


def test_cached_predictions_move_a_progress_bar(tmp_path, monkeypatch, capsys):
    """fK's distillation targets for f0 are one pass over D_pre before f0's bar starts:
    minutes on a folder of large slices, silent before (seen: 220 s on 696 tiles of
    2048 x 2048 slices). Its bar counts the images done; the cache holds each one's."""
    import paser.runtime as R
    from paser.data.tensors import Tensors
    from paser.train.common import cache_predictions
    from paser.train.distributed import Dist

    monkeypatch.setattr(R, "LOG_EVERY_S", 0.0)
    data = Tensors(torch.arange(5.0).reshape(5, 1, 1, 1).expand(5, 1, 2, 2).clone(),
                   torch.zeros(5, 2, 2, dtype=torch.uint8), [f"i{i}" for i in range(5)])
    out = cache_predictions(lambda x: 2 * x, data, 2, tmp_path / "t.npy",
                            Dist(torch.device("cpu")), "stage 1 f0: f2's targets", True)
    assert out.shape == (5, 1, 2, 2) and out[:, 0, 0, 0].tolist() == [0, 2, 4, 6, 8]
    lines = capsys.readouterr().err.splitlines()
    assert [_done(line) for line in lines] == ["2/5", "4/5", "5/5"]
    assert all(line.startswith("stage 1 f0: f2's targets") for line in lines)
    cache_predictions(lambda x: x, data, 2, tmp_path / "u.npy", Dist(torch.device("cpu")))
    assert capsys.readouterr().err == ""  # no bar unless asked


def test_validation_passes_move_their_bars():
    """A validation pass on a folder of large slices runs minutes (seen: 77 s with f2's bar
    still at 83 %): evaluate_miou says how many images it has done after each batch."""
    from paser.data.tensors import Tensors
    from paser.train.pretrain import evaluate_miou

    y = torch.tensor([[0, 1], [1, 1]], dtype=torch.uint8).expand(5, 2, 2).clone()
    data = Tensors(torch.zeros(5, 1, 2, 2), y, [f"i{i}" for i in range(5)])
    seen = []

    def right(model, x):  # the true classes as logits: mIoU 1
        return torch.nn.functional.one_hot(y[: len(x)].long(), 2).permute(0, 3, 1, 2).float()

    miou = evaluate_miou(torch.nn.Identity(), right, data, 2, 2, torch.device("cpu"), seen.append)
    assert miou == 1.0 and seen == [2, 4, 5]
