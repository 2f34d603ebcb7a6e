"""Stages 1 -> 2 -> 3 and the API on a tiny synthetic set (seconds, not minutes)."""

import json
import warnings

import numpy as np
import pytest
import torch
from tests.helpers import TINY

from paser import PaSeR
from paser.config import load_config
from paser.data import load_stage_data
from paser.errors import ConfigError, DataError
from paser.train.finetune import finetune
from paser.train.policy import train_policy
from paser.train.pretrain import pretrain


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipeline")
    cfg = load_config(preset="battery-quick", overrides=[*TINY, f"data.cache_dir={tmp / 'c'}"])
    run_dir = tmp / "run"
    pretrain(cfg, run_dir, show_progress=False)
    s2 = train_policy(None, run_dir, show_progress=False)
    s3 = finetune(None, run_dir, show_progress=False)
    return run_dir, cfg, s2, s3


def test_stages_write_their_summaries_and_logs(run):
    run_dir, _, s2, s3 = run
    assert json.loads((run_dir / "stage2.json").read_text()) == s2
    assert json.loads((run_dir / "stage3.json").read_text()) == s3
    lines = [json.loads(x) for x in (run_dir / "metrics" / "stage2.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [0, 1]
    for key in ("policy/reward", "policy/reward_no_cost", "policy/cost", "routing/fractions",
                "val/miou", "val/f0_miou"):
        assert key in lines[0]
    assert sum(lines[0]["routing/fractions"]) == pytest.approx(1.0)
    assert s2["costs"]["params"][0] == 16_571


@pytest.mark.slow
def test_stage3s_summary_gives_the_refit_policys_own_distance_from_the_reference(tmp_path,
                                                                                 monkeypatch):
    """After the pool's fine-tuning the policy is fitted again, and the summary took its
    fractions with the TVD of the epoch before it: 87.5 / 12.5 / 0 % of patches against a
    reference of [1, 0, 0] read TVD 0.000."""
    from tests.helpers import TINY_DATA

    import paser.train.finetune as stage3
    from paser.train.policy import tvd

    refit = stage3.refit_policy  # routing unlike the epoch's before it, as on real data
    monkeypatch.setattr(stage3, "refit_policy", lambda *a: refit(*a) | {
        "fractions": [0.5, 0.25, 0.25]})
    cfg = load_config(preset="battery-quick", overrides=[
        *TINY_DATA, f"data.cache_dir={tmp_path / 'c'}", "stage3.epochs=1", "stage2.train_on=rl"])
    run_dir = tmp_path / "run"
    pretrain(cfg, run_dir, show_progress=False)
    train_policy(None, run_dir, show_progress=False)
    s3 = finetune(None, run_dir, show_progress=False)  # the gain router: fitted again
    assert s3["best"]["refit"] is True and s3["best"]["fractions"] == [0.5, 0.25, 0.25]
    assert s3["best"]["tvd"] == pytest.approx(tvd([0.5, 0.25, 0.25],
                                                  s3["reference_fractions"]))
    assert s3["best"]["tvd"] > 0  # the reference is one of the tiny run's own routings


def test_api_segments_and_evaluates(run):
    run_dir, cfg, _, _ = run
    model = PaSeR.load(run_dir)
    data = load_stage_data(cfg, progress=False)
    out = model.segment(data.test.images)
    assert out.mask.shape == (2, 32, 32) and out.actions.shape == (2, 4)
    assert out.probs.shape == (2, 3, 32, 32)
    costs = model.router.costs(32, 32)
    assert torch.allclose(out.gflops, costs.gflops(out.actions))
    again = model.segment(data.test.images)  # greedy, fixed Monte Carlo seed: same answer
    assert torch.equal(again.mask, out.mask) and torch.equal(again.actions, out.actions)
    seen: list[int] = []  # paser evaluate's progress bar
    result = model.evaluate(data.test, batch_size=1, on_batch=seen.append)
    assert seen == [1] * len(data.test) and result == model.evaluate(data.test)
    assert set(result) >= {"miou", "gflops", "iou_per_gflop", "fractions", "f0_miou"}
    assert result["iou_per_gflop"] == pytest.approx(result["miou"] / result["gflops"])
    assert result["gflops"] >= costs.fixed


def test_api_refuses_bad_images(run):
    model = PaSeR.load(run[0])
    with pytest.raises(DataError, match="channels"):
        model.segment(torch.rand(1, 3, 32, 32))
    bad = torch.rand(1, 1, 32, 32)
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(DataError, match="NaN"):
        model.segment(bad)
    # an array Pillow gives is read-only: taken without torch's warning, the same answer
    frozen = np.random.default_rng(0).integers(0, 256, (32, 32), dtype=np.uint8)
    fine = model.segment(frozen.copy()).mask
    frozen.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(model.segment(frozen).mask, fine)


def test_an_image_gets_the_same_answer_alone_and_in_any_batch(run):
    """f0 has Monte Carlo dropout here (T = 2): each image's masks come from the seed alone."""
    model = PaSeR.load(run[0])
    x = torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    batch, flipped = model.segment(x), model.segment(x.flip(0))
    for i in range(3):
        alone = model.segment(x[i:i + 1])
        assert torch.equal(batch.mask[i], alone.mask[0])
        assert torch.equal(batch.actions[i], alone.actions[0])
        assert torch.allclose(flipped.probs[2 - i], alone.probs[0], atol=1e-5)  # batched convs
    batch.mask[batch.mask == 2] = 0  # ordinary tensors, not inference tensors
    assert not batch.probs.requires_grad and not batch.probs.is_inference()


def test_integer_images_are_scaled_as_a_file_holding_them(run):
    """An 8-bit, a 16-bit and a float image of the same picture give the same labels; a
    stored [H, W] array through prepare() gives paser segment's tensor."""
    model = PaSeR.load(run[0])
    u8 = torch.randint(0, 256, (2, 1, 32, 32), dtype=torch.uint8,
                       generator=torch.Generator().manual_seed(1))
    as_float = model.segment(u8.float() / 255)
    for same in (u8, u8.numpy(), (u8.numpy().astype("uint16") * 257)):
        assert torch.equal(model.segment(same).mask, as_float.mask)
    stored = u8[0, 0].numpy()
    assert torch.equal(model.prepare(stored), u8[0].float() / 255)
    assert torch.equal(model.prepare(stored[..., None]), u8[0].float() / 255)  # [H, W, 1]
    with pytest.raises(DataError, match=r"gray and alpha.*give image\[\.\.\., 0\]"):
        model.prepare(np.stack([stored, np.full_like(stored, 255)], -1))  # a Pillow 'LA'


def test_big_endian_arrays_are_taken_as_their_values(run):
    """A big-endian array (astropy's FITS data, h5py on a big-endian dataset) was torch's
    'given numpy array has byte order different from the native byte order', where
    prepare() and paser segment read the same pixels."""
    model = PaSeR.load(run[0])
    u16 = np.random.default_rng(2).integers(0, 65536, (2, 1, 32, 32)).astype(np.uint16)
    floats = (u16 / 65535).astype(np.float32)
    expected = model.segment(u16).mask
    assert torch.equal(model.segment(u16.astype(">u2")).mask, expected)
    assert torch.equal(model.segment(floats.astype(">f4")).mask, model.segment(floats).mask)
    assert torch.equal(model.segment(model.prepare(u16[0, 0].astype(">u2"))).mask[0],
                       expected[0])


@pytest.mark.parametrize("images, match", [
    (torch.full((1, 1, 32, 32), 255.0), r"values in \[255, 255\], outside \[0, 1\]"),
    (torch.full((1, 1, 32, 32), 1.002), r"values in \[1.002, 1.002\], outside \[0, 1\]"),
    (torch.full((1, 1, 32, 32), -0.002), r"values in \[-0.002, -0.002\], outside \[0, 1\]"),
    (torch.zeros(0, 1, 32, 32), "at least one pixel"),
    (torch.zeros(1, 1, 1, 32, 32), "shape"),
    ("image.png", "of type str"),
    (torch.zeros(1, 1, 32, 32, dtype=torch.complex64), "complex64"),
    (torch.rand(32, 32, 1).numpy(), r"model.prepare\(image\)"),
])
def test_api_refuses_images_it_would_misread(run, images, match):
    with pytest.raises(DataError, match=match):
        PaSeR.load(run[0]).segment(images)


def test_api_takes_resampling_overshoot_as_it_is(run):
    model = PaSeR.load(run[0])
    for value in (1.0005, -0.0005):  # within paser.api.OUT_OF_RANGE (1e-3) of [0, 1]
        assert model.segment(torch.full((1, 1, 32, 32), value)).mask.shape == (1, 32, 32)


def test_api_refuses_a_bias_or_mode_it_cannot_use_and_keeps_the_callers_rng(run):
    torch.manual_seed(3)
    expected = torch.rand(1)
    torch.manual_seed(3)
    model = PaSeR.load(run[0], device="cpu:0")  # the CPU, said another way
    assert torch.equal(torch.rand(1), expected)  # building the models drew from a fork
    x = torch.rand(1, 1, 32, 32)
    assert torch.equal(model.segment(x, bias=[0.0, 0.0, 0.0]).actions,
                       model.segment(x, bias=torch.zeros(3)).actions)
    with pytest.raises(DataError, match="one number per model, 3"):
        model.segment(x, bias=[0.0, 1.0])
    # a NaN bias sent every patch to f0; only=True ran f1 alone, 1.0 failed in torch
    with pytest.raises(DataError, match=r"bias \[0.0, nan, 0.0\]: give finite numbers"):
        model.segment(x, bias=[0.0, float("nan"), 0.0])
    for only in (True, 1.0, "1"):
        with pytest.raises(DataError, match=f"only {only!r}: give a model's number, 0 "
                                            r"\(f0\) to 2, or None to route"):
            model.segment(x, only=only)
    assert torch.equal(model.segment(x, only=np.int64(1)).mask, model.segment(x, only=1).mask)
    with pytest.raises(ConfigError, match="routing mode 'gready'"):
        model.segment(x, mode="gready")


def test_tvd_mode_stops_once_the_assignment_moves(run, tmp_path):
    run_dir, cfg, _, _ = run
    import shutil

    copy = tmp_path / "tvd"
    shutil.copytree(run_dir, copy)
    (copy / "checkpoints" / "stage3.pt").unlink()
    (copy / "checkpoints" / "stage3_last.pt").unlink()
    tvd_cfg = load_config(config_file=copy / "config.yaml", overrides=[
        "stage3.tvd_threshold=0.0", "stage3.epochs=3"])
    summary = finetune(tvd_cfg, copy, show_progress=False)
    # a threshold of 0 is reached at once: stop after the first epoch, keep the start
    assert summary["stopped_by_tvd"] is True
    records = [json.loads(x) for x in (copy / "metrics" / "stage3.jsonl").read_text().splitlines()]
    assert len(records) == 1 and records[0]["stopped"]
    assert torch.load(copy / "checkpoints" / "stage3.pt", weights_only=False)["epoch"] == -1


@pytest.mark.slow  # reader processes (a fork server that imports torch: seconds)
def test_evaluation_streams_from_disk_with_workers_like_in_memory(run):
    """A dataset read lazily by 2 worker processes gives exactly the in-memory figures."""
    from paser import PaSeR
    from paser.data import BatteryDataset, ensure_dataset, to_tensors

    run_dir, cfg, _, _ = run
    model = PaSeR.load(run_dir, device="cpu")
    lazy = BatteryDataset(ensure_dataset(cfg.data), "test")
    assert lazy._cache is None  # nothing read yet
    streamed = model.evaluate(lazy, batch_size=1, num_workers=2)
    assert streamed == model.evaluate(to_tensors(lazy), batch_size=1)
    assert streamed["images"] == len(lazy)


def test_evaluate_and_calibrate_take_numpy_columns_and_any_dataset_of_samples(run):
    """Tensors of numpy arrays were an AttributeError ('numpy.ndarray' object has no
    attribute 'long'), and a Dataset of {'image', 'mask', 'id'} samples, which the error for
    other data names, one too ('has no attribute size'): only paser's file datasets
    stream."""
    from torch.utils.data import Dataset

    from paser.data import Tensors

    class Samples(Dataset):
        def __init__(self, images, masks):
            self.images, self.masks = images, masks

        def __len__(self):
            return len(self.images)

        def __getitem__(self, i):
            return {"image": self.images[i], "mask": self.masks[i], "id": f"s{i}"}

    class Unlabelled(Samples):
        def __getitem__(self, i):
            return {"image": self.images[i], "id": f"s{i}"}

    run_dir, cfg, _, _ = run
    model = PaSeR.load(run_dir, calibrated=False)
    test = load_stage_data(cfg, progress=False).test
    u8 = (test.images * 255).round().to(torch.uint8)
    expected = model.evaluate(Tensors(u8, test.masks, test.ids))
    assert expected["images"] == 2
    assert model.evaluate(Tensors(u8.numpy(), test.masks.numpy(), test.ids)) == expected
    assert model.evaluate(Samples(u8.numpy(), test.masks.numpy())) == expected
    assert model.evaluate(Samples(u8, test.masks)) == expected
    budget = 1.1 * model.router.costs(32, 32).fixed
    bias = model.calibrate(budget, save=False, data=Tensors(u8, test.masks, test.ids)).bias
    assert model.calibrate(budget, save=False, data=Samples(u8.numpy(), test.masks)).bias == bias
    with pytest.raises(DataError, match=r"data: Unlabelled's samples are not \{'image', "
                                        r"'mask', 'id'\} dicts \(KeyError: 'mask'\)"):
        model.evaluate(Unlabelled(u8, test.masks))
    with pytest.raises(DataError, match="data: Samples's samples do not stack"):
        model.evaluate(Samples([u8[0], u8[1, :, :16]], test.masks))


def test_evaluate_cuts_images_larger_than_a_tile_as_segment_does(run):
    """evaluate routed 64 x 64 images whole, in 32 x 32 patches, where segment (and paser
    segment, paser evaluate) cut them into the run's 32 x 32 tiles of 16 x 16 patches: its
    mIoU (0.1962 here) was not that of the labels segment gives (0.1966)."""
    from paser.data import Tensors
    from paser.metrics import IoUAccumulator

    model = PaSeR.load(run[0], calibrated=False)
    assert model.tile == (32, 32)
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(2, 1, 64, 64, generator=generator)
    masks = torch.randint(0, 3, (2, 64, 64), generator=generator).to(torch.uint8)
    out = model.segment(images)
    segmented = IoUAccumulator(3)
    segmented.update(out.mask, masks.long())
    result = model.evaluate(Tensors(images, masks, ["a", "b"]))
    assert result["images"] == 8  # tiles, as paser evaluate counts them
    assert result["miou"] == pytest.approx(segmented.compute()["miou"], abs=1e-9)
    assert 4 * result["gflops"] == pytest.approx(float(out.gflops.mean()), rel=1e-6)


@pytest.mark.slow
def test_cli_evaluate_of_images_of_another_size_than_stage_1s_counts_the_tiles_it_routes(
        run, tmp_path):
    """data.tile auto routes images of another size than stage 1's in its tiles; since
    PaSeR.evaluate cuts them too, paser evaluate (which passed such a split whole) printed
    'test split, 2 images of 64 x 64; GFLOP per image' above each tile's GFLOP, and its bars
    ran to 8/2."""
    import shutil

    import yaml
    from tests.helpers import paser_here

    from paser.data import BatteryDataset, ensure_dataset

    run_dir, cfg, _, _ = run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    raw = yaml.safe_load((copy / "config.yaml").read_text())
    assert raw["data"]["tile"] == "auto"
    raw["data"]["synthetic"].update(height=64, width=64)  # the same run on 64 x 64 images
    raw["data"]["cache_dir"] = str(tmp_path / "c")
    (copy / "config.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    res = paser_here("evaluate", "--run-dir", copy, "--workers", "0")
    assert res.returncode == 0, res.stderr
    model = PaSeR.load(copy)
    assert model.tile == (32, 32)
    tiles = model.evaluate(BatteryDataset(ensure_dataset(model.config.data), "test"))
    assert tiles["images"] == 8
    assert "test split, 8 tiles of 32 x 32 from 2 images; GFLOP per tile" in res.stdout, res.stdout
    row = next(line for line in res.stdout.splitlines() if line.startswith("PaSeR"))
    assert row.split()[1:3] == [f"{tiles['miou']:.4f}", f"{tiles['gflops']:.3f}"]


@pytest.mark.slow  # reader processes (a fork server that imports torch: seconds)
def test_calibrate_streams_a_file_dataset_as_the_validation_split(run):
    """calibrate(data=BatteryDataset(...)) was an AttributeError ('list' object has no
    attribute 'shape'); it now reads the files from disk as the validation split is."""
    from paser.data import BatteryDataset, ensure_dataset, to_tensors

    run_dir, cfg, _, _ = run
    model = PaSeR.load(run_dir, calibrated=False)
    lazy = BatteryDataset(ensure_dataset(cfg.data), "test")
    budget = 1.1 * model.router.costs(32, 32).fixed
    streamed = model.calibrate(budget, save=False, data=lazy)
    assert streamed.images == 2
    assert streamed.bias == model.calibrate(budget, save=False, data=to_tensors(lazy)).bias


@pytest.mark.slow  # reader processes (a fork server that imports torch: seconds), and stages 1 to 3 again
def test_training_streamed_from_disk_by_reader_processes_equals_training_in_memory(run, tmp_path):
    """Stages 1-3 with every split read from disk by 2 reader processes end exactly where
    the in-memory run ended: same metrics, epoch by epoch, and same summaries."""
    run_dir, cfg, s2, s3 = run
    streamed = cfg.model_copy(update={"data": cfg.data.model_copy(
        update={"stream": "always", "workers": 2})})
    data = load_stage_data(streamed, progress=False)
    assert data.pre.streamed and data.test.streamed
    other = tmp_path / "streamed"
    pretrain(streamed, other, show_progress=False)
    assert _untimed(train_policy(None, other, show_progress=False)) == _untimed(s2)
    assert _untimed(finetune(None, other, show_progress=False)) == _untimed(s3)
    for stage in (1, 2, 3):
        a, b = ([_untimed(json.loads(line))
                 for line in (d / "metrics" / f"stage{stage}.jsonl").read_text().splitlines()]
                for d in (run_dir, other))
        assert a == b
    assert json.loads((other / "stage1.json").read_text()) == json.loads(
        (run_dir / "stage1.json").read_text())
    assert not (other / "cache" / "teacher_logits.npy").exists()  # f0's targets, used up


def _untimed(record: dict) -> dict:
    return {k: v for k, v in record.items() if "seconds" not in k}


def test_a_run_whose_config_changed_its_class_count_is_refused_clearly(run, tmp_path):
    import shutil

    import yaml

    from paser.errors import CheckpointError

    copy = tmp_path / "run"
    shutil.copytree(run[0], copy)
    raw = yaml.safe_load((copy / "config.yaml").read_text())
    raw["models"]["num_classes"] = 4
    raw["stage1"]["class_weights"] = None
    (copy / "config.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(CheckpointError, match="f0.pt: its weights do not fit .*num_classes 4"):
        PaSeR.load(copy)


@pytest.mark.slow  # a script in a process of its own, with reader processes (11 s)
def test_a_script_without_a_main_guard_is_told_how_to_fix_it(run, tmp_path):
    """Reader processes start from a fork server, which imports the calling script: without
    `if __name__ == "__main__":` each reader runs the script again and stops."""
    import subprocess
    import sys

    script = tmp_path / "calibrate_it.py"
    script.write_text("from paser import PaSeR\n"
                      f"PaSeR.load({str(run[0])!r}).calibrate(iou_within_top=0.005)\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=240, cwd=tmp_path)
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("paser.errors.DataError") and "__name__" in last, done.stderr[-2000:]


def test_a_call_at_a_scripts_top_level_is_found_and_one_under_its_guard_is_not(tmp_path,
                                                                                 monkeypatch):
    """What the error above reads, without starting a process: the line of the main
    script's top-level code that is not under `if __name__ == "__main__":`."""
    import sys
    import types

    script = tmp_path / "s.py"
    script.write_text("from paser.runtime import unguarded_main\n"
                      "found = [unguarded_main()]\n"
                      "def main():\n"
                      "    found.append(unguarded_main())\n"
                      "if '__main__' == __name__:\n"
                      "    main()\n")
    main = types.ModuleType("__main__")
    main.__file__ = str(script)
    monkeypatch.setitem(sys.modules, "__main__", main)
    exec(compile(script.read_text(), str(script), "exec"), vars(main))
    assert main.found == [(str(script), 2), None]
    # what worker_context makes of it there: no workers (data.workers=0, the advice, which
    # streamed data still reads through from_readers) is no refusal; workers are
    from paser.errors import DataError
    from paser.runtime import from_readers, worker_context

    main.read, main.from_readers, main.worker_context = [], from_readers, worker_context
    exec(compile("read += from_readers([worker_context(0, [])], 0)\n", str(script), "exec"),
         vars(main))
    assert main.read == [None]
    with pytest.raises(DataError, match=r"s.py, line 1: called at the script's top level.*"
                                        r"or set --workers 0 \(no worker processes\)$"):
        exec(compile("worker_context(2, [], '--workers 0')\n", str(script), "exec"), vars(main))
    main.__spec__ = types.SimpleNamespace(name="tool.__main__")  # python -m tool: not re-run
    assert exec("found.append(unguarded_main())", vars(main)) is None and main.found[-1] is None


@pytest.mark.slow
def test_stage2s_gain_target_is_the_one_configured(tmp_path):
    import shutil

    from tests.helpers import TINY_DATA  # battery-quick's gain router

    cfg = load_config(
        preset="battery-quick",
        overrides=[*TINY_DATA, f"data.cache_dir={tmp_path / 'c'}", "stage2.members=1"],
    )
    pretrain(cfg, tmp_path / "pre", show_progress=False)
    states = {}
    for gain in ("dataset", "patch"):
        shutil.copytree(tmp_path / "pre", tmp_path / gain)
        train_policy(
            cfg.model_copy(update={"stage2": cfg.stage2.model_copy(update={"gain": gain})}),
            tmp_path / gain,
            show_progress=False,
        )
        states[gain] = torch.load(
            tmp_path / gain / "checkpoints" / "policy_last.pt", weights_only=False
        )["policy"]
    assert any(not torch.equal(v, states["patch"][k]) for k, v in states["dataset"].items())


def test_a_checkpoint_of_a_model_run_at_another_input_size_is_refused(tmp_path):
    from paser.checkpoints import build_model, load_trained
    from paser.errors import CheckpointError

    cfg = load_config(preset="battery-quick")
    spec = cfg.models.pool[0].model_copy(update={"input_size": (64, 64)})
    (tmp_path / "checkpoints").mkdir()  # Resized at either size: the same weights' names
    torch.save(
        {
            "model": build_model(cfg, spec, initial=False).state_dict(),
            "spec": spec.model_dump(mode="json"),
        },
        tmp_path / "checkpoints" / "f1.pt",
    )
    with pytest.raises(CheckpointError, match=r"holds model .*\[64, 64\], but the config asks"):
        load_trained(tmp_path, cfg, "f1", spec=spec.model_copy(update={"input_size": (32, 32)}))


def test_stage3s_task_loss_is_the_class_weighted_mean_over_the_routed_pixels():
    import torch.nn.functional as F

    from paser.models import create_model
    from paser.patches import PatchGrid
    from paser.routing import Router
    from paser.train.distributed import Dist
    from paser.train.finetune import _joint_step

    class ToF1(torch.nn.Module):  # every patch to f1
        def forward(self, state):
            return torch.tensor([0.0, 1.0, 0.0]).expand(state.shape[0], 4, 3)

    torch.manual_seed(0)
    pool, grid = (
        [create_model("unet_tiny", 1, 3, dropout=0.0) for _ in range(2)],
        PatchGrid(2, 2),
    )  # trains: no draws
    router = Router(
        create_model("unet_tiny", 1, 3), ToF1(), pool, grid, 1, mc_dropout="none"
    ).eval()
    x, y, weight = (
        torch.rand(2, 1, 16, 16),
        torch.randint(0, 3, (2, 16, 16)),
        torch.tensor([0.9, 0.5, 0.1]),
    )
    y[:, :3] = -1  # some unlabelled pixels
    with torch.no_grad():
        want = F.cross_entropy(
            router.pool_logits(1, grid.context(x)), grid.split(y), weight=weight, ignore_index=-1
        )
    opts = [torch.optim.SGD(m.parameters(), lr=0.0) for m in (router.f0, *pool)]
    *_, task_loss = _joint_step(
        router,
        opts,
        x,
        y,
        1.0,
        0.5,
        torch.tensor([0, 0.2, 1]),
        weight,
        3,
        Dist(torch.device("cpu")),
        torch.arange(2),
        2,
        "gain",
    )
    assert task_loss == pytest.approx(want.item(), rel=1e-5)


def test_prepare_says_what_to_do_with_a_channels_first_or_a_masked_array(run):
    """A [C, H, W] array (torch's order) was 'the image: 32 channels, and the models take
    1; give grayscale images'; a numpy masked array was read by its data, so the pixels it
    masked (-9999 outside the field of view) were scaled as the scan's, silently. An array
    masked nowhere is its data."""
    model = PaSeR.load(run[0])
    stored = np.random.default_rng(3).integers(0, 256, (32, 32), dtype=np.uint8)
    with pytest.raises(DataError) as err:
        model.prepare(np.stack([stored] * 3))
    assert str(err.value) == ("the image: shape (3, 32, 32), channels first ([C, H, W]); "
                              "prepare takes one stored image [H, W] or [H, W, C]: give "
                              "np.moveaxis(image, 0, -1)")
    with pytest.raises(DataError, match=r"shape \(1, 32, 32\), channels first .*: give image\[0\]$"):
        model.prepare(stored[None])
    assert torch.equal(model.prepare(np.moveaxis(np.stack([stored] * 3), 0, -1)),
                       model.prepare(stored))
    scan = stored.astype(np.float32)
    scan[:4] = -9999
    for call in (model.prepare, model.segment):
        with pytest.raises(DataError) as err:
            call(np.ma.masked_equal(scan, -9999))
        assert str(err.value).endswith(
            ": a masked array with 128 of 1024 values masked; the models would read the "
            "masked pixels' stored values as the scan's (numpy drops the mask): fill them with "
            "a value the scan's background has, image.filled(value), or give image.data to "
            "read them as stored")
    assert torch.equal(model.prepare(np.ma.masked_array(stored)), model.prepare(stored))


def test_evaluate_refuses_masks_as_a_masked_array_that_masks_labels(run):
    """numpy's mark of unlabelled pixels, a masked array of labels, was dropped by
    torch.as_tensor: the values stored under it (0 here, a class) were scored as that
    class, without a word. Masks masked nowhere are their labels."""
    from paser.data import Tensors

    model = PaSeR.load(run[0])
    gen = torch.Generator().manual_seed(4)
    images = torch.rand(2, 1, 32, 32, generator=gen)
    labels = torch.randint(0, 3, (2, 32, 32), generator=gen).byte().numpy()
    unknown = np.zeros(labels.shape, bool)
    unknown[:, :4] = True
    hidden = np.ma.masked_array(np.where(unknown, 0, labels), mask=unknown)
    with pytest.raises(DataError) as err:
        model.evaluate(Tensors(images, hidden, ["a", "b"]))
    assert str(err.value) == (
        "data: masks as a masked array with 256 of 2048 labels masked; the masked pixels' "
        "stored values would be scored as classes: give them the ignore value, "
        "masks.filled(255) (or -1 in signed labels)")
    unlabelled = np.where(unknown, 255, labels).astype(np.uint8)
    assert model.evaluate(Tensors(images, hidden.filled(255), ["a", "b"])) == model.evaluate(
        Tensors(images, unlabelled, ["a", "b"]))
    assert model.evaluate(Tensors(images, np.ma.masked_array(labels), ["a", "b"])) == (
        model.evaluate(Tensors(images, labels, ["a", "b"])))
