"""The CLI as a user meets it: one clear line on stderr and exit status 2 for a fixable error."""

import json

import pytest
from tests.helpers import paser

# every test runs `python -m paser` in a process of its own
pytestmark = pytest.mark.slow


def test_unknown_key_is_one_line_naming_the_key(tmp_path):
    res = paser("pretrain", "--preset", "battery-quick", "--run-dir", str(tmp_path / "r"),
                "stage1.epoch=3")
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        "error: preset battery-quick with overrides: unknown key 'stage1.epoch'; check its spelling"]
    assert "Traceback" not in res.stderr


def test_unknown_preset_and_debug_traceback(tmp_path):
    res = paser("pretrain", "--preset", "nope", "--run-dir", str(tmp_path / "r"))
    assert res.returncode == 2 and "unknown preset 'nope'" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    debug = paser("--debug", "pretrain", "--preset", "nope", "--run-dir", str(tmp_path / "r"))
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_missing_data_root_is_clear(tmp_path):
    res = paser("pretrain", "--preset", "battery-quick", "--run-dir", str(tmp_path / "r"),
                f"data.root={tmp_path / 'absent'}")
    assert res.returncode == 2
    assert f"data.root {tmp_path / 'absent'} does not exist" in res.stderr


def test_config_prints_the_resolved_config():
    res = paser("config", "--preset", "battery-paper", "stage2.lam=0.25")
    assert res.returncode == 0
    cfg = json.loads(res.stdout)
    assert cfg["stage2"]["lam"] == 0.25 and cfg["preset"] == "battery-paper"


def test_data_synth_writes_the_layout_and_stats(tmp_path):
    out = tmp_path / "synth"
    res = paser("data", "synth", "--out", str(out), "--n-train", "3", "--n-val", "1",
                "--n-test", "1", "--height", "32", "--width", "48", "--seed", "3",
                "--workers", "1")
    assert res.returncode == 0, res.stderr
    stats = json.loads((out / "stats.json").read_text())
    assert stats["seed"] == 3 and (stats["height"], stats["width"]) == (32, 48)
    for split, n in (("train", 3), ("validation", 1), ("test", 1)):
        assert len(list((out / f"{split}_images").glob("*.png"))) == n
        assert len(list((out / f"{split}_label").glob("*.png"))) == n
