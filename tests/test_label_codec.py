"""Label PNGs in the user's own codec: `paser segment` writes the values of the run's
class map, and the dataset's own reader reads back exactly the predicted classes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from paser.api import PaSeR
from paser.checkpoints import CODEC_FILE, label_codec, make_policy, save_label_codec
from paser.config import load_config
from paser.data import read_label
from paser.data.folders import CityscapesDataset, ClassMap, FolderDataset
from paser.data.registry import BATTERY_CODEC
from paser.errors import DataError
from paser.patches import PatchGrid
from paser.routing import Router
from paser.segment import segment_files

VALUES = {0: "background", 40: "particle", 80: "binder"}  # not the battery's 0/255/128


class Bands(torch.nn.Module):
    """Three classes by intensity: below 0.3, 0.3 to 0.7, above 0.7 (no training needed)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = x[:, :1]
        return torch.cat([-(v - 0.15).abs(), -(v - 0.5).abs(), -(v - 0.85).abs()], 1) * 50


def folder(root):
    """A 3-class folder dataset with the values of :data:`VALUES`, one test image."""
    (root / "classes.yaml").parent.mkdir(parents=True)
    (root / "classes.yaml").write_text(yaml.safe_dump({"classes": VALUES}))
    for split in ("train", "validation", "test"):
        for d in ("images", "masks"):
            (root / split / d).mkdir(parents=True)
        ramp = np.tile(np.linspace(0, 255, 16, dtype=np.uint8), (16, 1))
        Image.fromarray(ramp).save(root / split / "images" / "a.png")
        Image.fromarray(np.zeros((16, 16), np.uint8)).save(root / split / "masks" / "a.png")
    return root


def model(cfg, run_dir):
    """f0 and a pool of one, both :class:`Bands`, with an untrained policy."""
    cfg = cfg.model_copy(update={"mc_samples": 1, "mc_dropout": "none"})
    router = Router(Bands(), make_policy(cfg, 2), [Bands()], PatchGrid(*cfg.grid), 1, 1,
                    "none", num_classes=3)
    return PaSeR(router.eval(), cfg, run_dir)


def test_the_class_map_encodes_and_decodes_exactly(tmp_path):
    codec = ClassMap(list(VALUES), list(VALUES.values()))
    classes = np.array([[0, 1, 2], [2, 1, 0]])
    assert codec.encode(classes).tolist() == [[0, 40, 80], [80, 40, 0]]
    assert codec.decode(codec.encode(classes), "x").tolist() == classes.tolist()
    (tmp_path / "classes.yaml").write_text(codec.to_yaml())
    assert ClassMap.read(tmp_path / "classes.yaml").values == [0, 40, 80]
    with pytest.raises(DataError, match="class indices 0..3 outside"):
        codec.encode(np.array([0, 3]))
    assert BATTERY_CODEC.encode(np.array([0, 1, 2])).tolist() == [0, 255, 128]
    Image.fromarray(BATTERY_CODEC.encode(np.array([[0, 1, 2]]))).save(tmp_path / "l.png")
    assert read_label(tmp_path / "l.png").tolist() == [[0, 1, 2]]  # the battery reader
    city = CityscapesDataset.classmap  # train id k is written as its label id
    assert city.encode(np.array([0, 1, 18])).tolist() == [7, 8, 33]


def test_segment_writes_the_folder_codec_and_its_reader_reads_the_predicted_classes(tmp_path):
    root = folder(tmp_path / "data")
    cfg = load_config(preset="battery-quick", overrides=[
        "data.dataset=folder", f"data.root={root}", "grid=[2, 2]", "models.num_classes=3"])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    save_label_codec(run_dir, cfg)  # what stage 1 does
    (root / "classes.yaml").unlink()  # the run keeps its codec: the data need not be here
    m = model(cfg, run_dir)
    image = root / "test" / "images" / "a.png"
    [res] = segment_files(m, [image], tmp_path / "out")
    assert res.ok, res.error
    written = np.asarray(Image.open(tmp_path / "out" / "a_labels.png"))
    assert sorted(np.unique(written).tolist()) == [0, 40, 80]
    (root / "classes.yaml").write_text((run_dir / CODEC_FILE).read_text())
    read_back = FolderDataset(root, "test").decode(tmp_path / "out" / "a_labels.png")
    x = torch.from_numpy(np.asarray(Image.open(image), np.float32) / 255)[None, None]
    predicted = m.segment(x).mask[0].numpy()
    assert np.array_equal(read_back, predicted) and set(np.unique(predicted)) == {0, 1, 2}


def test_a_run_without_its_codec_reads_the_datasets_or_says_what_to_do(tmp_path):
    root = folder(tmp_path / "data")
    cfg = load_config(preset="battery-quick", overrides=[
        "data.dataset=folder", f"data.root={root}", "models.num_classes=3"])
    assert label_codec(tmp_path, cfg).values == [0, 40, 80]
    (root / "classes.yaml").unlink()
    with pytest.raises(DataError, match="copy the dataset's classes.yaml into the run folder"):
        label_codec(tmp_path, cfg)
    battery = load_config(preset="battery-quick")
    assert label_codec(None, battery).values == [0, 255, 128]
