"""The CLI as a user meets it: one clear line on stderr and exit status 2 for a fixable error."""

import json

import pytest
from tests.helpers import paser, paser_here

# every test but the version's runs `python -m paser` in a process of its own
pytestmark = pytest.mark.slow


def test_unknown_key_is_one_line_naming_the_key(tmp_path):
    res = paser("pretrain", "--preset", "battery-quick", "--run-dir", str(tmp_path / "r"),
                "stage1.epoch=3")
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        "error: preset battery-quick with overrides: unknown key 'stage1.epoch'; did you mean "
        "'stage1.epochs'?"]
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


def test_a_command_that_fails_on_its_config_leaves_the_run_as_it_was(tmp_path):
    from paser.cli.common import config_kept_on_error
    from paser.errors import ConfigError

    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.yaml").write_text("seed: 1\n")
    with pytest.raises(ConfigError), config_kept_on_error(run_dir):
        (run_dir / "config.yaml").write_text("seed: 2\nmodels: {pool: [{name: nosuch}]}\n")
        raise ConfigError("unknown model nosuch")
    assert (run_dir / "config.yaml").read_text() == "seed: 1\n"
    # a finished stage marked as begun by a command that then failed before training: the
    # ledger is put back, so that paser run does not resume it and redo every later step
    ledger = '{"stage1": {"fingerprint": "abc"}}'
    (run_dir / "steps.json").write_text(ledger)
    with pytest.raises(ConfigError), config_kept_on_error(run_dir):
        (run_dir / "steps.json").write_text('{"stage1": {"started": "abc"}}')
        raise ConfigError("environment variable PASER_BF16='yes'")
    assert (run_dir / "steps.json").read_text() == ledger
    (run_dir / "steps.json").unlink()
    with pytest.raises(ConfigError), config_kept_on_error(run_dir):  # no ledger before
        (run_dir / "steps.json").write_text('{"stage1": {"started": "abc"}}')
        raise ConfigError("later")
    assert not (run_dir / "steps.json").exists()
    with pytest.raises(ConfigError), config_kept_on_error(run_dir):  # trained, then failed
        (run_dir / "config.yaml").write_text("seed: 3\n")
        (run_dir / "checkpoints" / "f1.pt").write_text("w")
        raise ConfigError("later")
    assert (run_dir / "config.yaml").read_text() == "seed: 3\n"  # the new models' config
    typo = tmp_path / "nonexist"
    with pytest.raises(ConfigError), config_kept_on_error(typo):
        typo.mkdir()
        (typo / "config.yaml").write_text("seed: 1\n")
        raise ConfigError("checkpoint not found")
    assert not typo.exists()


def test_more_bad_inputs_are_one_clear_error(tmp_path):
    from PIL import Image

    from paser.config import load_config
    from paser.data.images import probe
    from paser.data.synthetic import generate_dataset
    from paser.errors import ConfigError, DataError
    from paser.segment import find_images

    (tmp_path / "latin1.yaml").write_bytes(b"seed: 3\xe9\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(config_file=tmp_path / "latin1.yaml")
    with pytest.raises(ConfigError, match="is a folder"):
        load_config(config_file=tmp_path)
    (tmp_path / "scans").mkdir()
    Image.new("L", (8, 8)).save(tmp_path / "scans" / "a.png")
    with pytest.raises(DataError, match="the input folder is --out"):
        find_images([tmp_path / "scans"], exclude=tmp_path)
    assert find_images([tmp_path / "scans"], exclude=tmp_path / "scans" / "out")
    with pytest.raises(ConfigError, match="not empty"):
        generate_dataset(tmp_path / "scans", 3, 1, 1, 32, 32, workers=1, progress=False)
    assert Image.MAX_IMAGE_PIXELS == 1 << 30  # scans are large: a gigapixel
    limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, 16  # Pillow refuses over twice it
    try:
        with pytest.raises(DataError, match="a.png: cannot read the image"):
            probe(tmp_path / "scans" / "a.png")
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def test_a_synth_out_inside_a_file_is_one_line_not_a_traceback(tmp_path):
    (tmp_path / "afile").write_text("x")
    res = paser("data", "synth", "--out", str(tmp_path / "afile" / "sub"), "--n-train", "3",
                "--n-val", "1", "--n-test", "1", "--height", "32", "--width", "32")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr == (f"error: {tmp_path / 'afile' / 'sub'}: {tmp_path / 'afile'} is a "
                          "file, not a folder; the synthetic set is written into a new or "
                          "empty folder: give --out a folder\n")


def test_options_that_do_nothing_together_are_refused(tmp_path):
    from paser.config import load_config
    from paser.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown preset ''"):
        load_config(preset="")
    res = paser("config", "--doc", "--preset", "battery-quick")
    assert res.returncode == 2 and "--doc prints the reference" in res.stderr
    res = paser("run", "--run-dir", str(tmp_path / "r"), "--resume")
    assert res.returncode == 2 and "paser run resumes by itself" in res.stderr
    assert not (tmp_path / "r").exists()


def test_version_names_paser_and_torch():
    from importlib.metadata import version

    import torch

    from paser import __version__

    assert __version__ == version("paser")  # the package's own, as installed
    res = paser_here("--version")
    assert res.returncode == 0
    assert res.stdout.startswith(f"paser {__version__} (torch {torch.__version__}, Python ")


def test_inference_commands_let_their_threads_sleep_while_they_wait():
    import subprocess
    import sys

    code = ("import os, sys\n"
            "from paser import cli\n"
            "seen = []\n"
            "for args, env in ((['--debug', 'segment', 'in'], {}), (['run'], {}),\n"
            "                  (['serve'], {'OMP_WAIT_POLICY': 'ACTIVE'})):\n"
            "    cli.passive_threads(args, env)\n"
            "    seen.append(env.get('OMP_WAIT_POLICY'))\n"
            "before = 'torch' in sys.modules\n"
            "sys.argv = ['paser', 'calibrate', '--help']\n"
            "try:\n"
            "    cli.entry()\n"
            "except SystemExit:\n"
            "    pass\n"
            "print(seen, before, os.environ.get('OMP_WAIT_POLICY'))\n")
    env = {k: v for k, v in __import__("os").environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, env=env)
    # set before torch is loaded (its OpenMP runtime reads it once); a user's choice kept;
    # training keeps the spin
    assert out.stdout.strip().splitlines()[-1] == "['PASSIVE', None, 'ACTIVE'] False PASSIVE"


def test_stage_summaries_name_the_flop_convention_with_their_gflop(capsys):
    # stage 1 named it; stage 3's line gave 'GFLOP/image' alone
    from paser.cli.train import _report_finetune
    from paser.cost import FLOP_CONVENTION

    _report_finetune({"epochs": 3, "best": {"miou": 0.81, "f0_miou": 0.78, "gflops": 1.25,
                                            "fractions": [0.5, 0.25, 0.25], "tvd": 0.1}},
                     run_dir=None)
    assert capsys.readouterr().out == (
        f"stage 3 done: validation routed mIoU 0.8100 (f0 alone 0.7800), 1.250 GFLOP/image "
        f"({FLOP_CONVENTION}), patches per model 50.0%, 25.0%, 25.0%, TVD 0.100\n")
