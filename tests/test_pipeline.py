"""Stages 1 -> 2 -> 3 and the API on a tiny synthetic set (seconds, not minutes)."""

import json

import pytest
import torch
from tests.helpers import TINY

from paser import PaSeR
from paser.config import load_config
from paser.data import load_stage_data
from paser.errors import DataError
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
    result = model.evaluate(data.test)
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
