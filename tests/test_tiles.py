"""Images of any size as tiles of the size a run trains and routes at (data.tile): every
labelled pixel once in training; any image routed in the trained patches."""

from __future__ import annotations

import gc
import json
import os
import re

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from tests.test_label_codec import model

from paser.config import load_config
from paser.data import load_stage_data
from paser.data.folders import FolderDataset
from paser.data.tiles import Tiles, counted, route_tiled, source_images, tile_origins
from paser.errors import ConfigError, DataError
from paser.experiments.main import _tiled_from
from paser.segment import segment_files

SIZES = [(40, 40), (50, 61), (32, 32), (45, 33)]


def mixed_folder(root):
    """A 2-class folder dataset of images of several sizes (labels: the image > 127)."""
    rng = np.random.default_rng(0)
    (root / "classes.yaml").parent.mkdir(parents=True)
    (root / "classes.yaml").write_text(yaml.safe_dump({"classes": {0: "a", 200: "b"}}))
    for split in ("train", "validation", "test"):
        for d in ("images", "masks"):
            (root / split / d).mkdir(parents=True)
        for i, (h, w) in enumerate(SIZES):
            img = rng.integers(0, 256, (h, w), dtype=np.uint8)
            Image.fromarray(img).save(root / split / "images" / f"i{i}.png")
            Image.fromarray(np.where(img > 127, 200, 0).astype(np.uint8)).save(
                root / split / "masks" / f"i{i}.png")
    return root


def test_tiles_hold_every_labelled_pixel_once(tmp_path):
    root = mixed_folder(tmp_path / "d")
    files = FolderDataset(root, "train")
    assert files.size is None and files.size_range() == "32 x 32 to 50 x 61"
    tiles = Tiles(files, (16, 16))
    assert len(tiles) == sum(len(tile_origins(h, w, (16, 16))) for h, w in SIZES) == 9 + 16 + 4 + 9
    labelled = sum(int((tiles.mask(j) != 255).sum()) for j in range(len(tiles)))
    assert labelled == sum(h * w for h, w in SIZES)
    j = tiles.ids.index("i1@48,48")  # the last tile of the 50 x 61 image
    assert tiles.ids[j] == "i1@48,48" and tiles.image(j).shape == (1, 16, 16)
    assert torch.equal(tiles.image(j)[0, :2, :13], files.image(1)[0, 48:, 48:])
    assert (tiles.mask(j)[2:] == 255).all() and (tiles.mask(j)[:, 13:] == 255).all()


@pytest.mark.slow
def test_streamed_tiles_decode_each_image_once_and_read_the_same(tmp_path, monkeypatch):
    import pickle
    from types import SimpleNamespace

    import paser.data.tiles as tiles_module

    files = FolderDataset(mixed_folder(tmp_path / "d"), "train")
    plain = Tiles(files, (16, 16))
    kept = Tiles(files, (16, 16))
    stale = tmp_path / "cache" / "decoded-999999999-dead"  # a killed process's
    stale.mkdir(parents=True)
    decoded = tiles_module.decode_into(tmp_path / "cache", [kept, plain.files])
    folder = decoded.path
    assert not stale.exists() and folder.parent == tmp_path / "cache"
    assert kept.decoded.path.parent == folder  # the split's own folder in it
    reads = []
    image = type(files).image
    monkeypatch.setattr(type(files), "image", lambda self, i: reads.append(i) or image(self, i))
    order = np.random.default_rng(1).permutation(len(kept))  # as training draws them
    around = kept.around(3)  # shares the folder
    got = [(kept.image(j), kept.mask(j), around.image(j)) for j in [*order, *order]]
    assert sorted(reads) == [0, 1, 2, 3]  # each image decoded once, in random order
    wide = Tiles(files, (16, 16), 3)
    for j, (x, y, a) in zip([*order, *order], got, strict=True):
        assert torch.equal(x, plain.image(j)) and torch.equal(y, plain.mask(j))
        assert torch.equal(a, wide.image(j)) and y.dtype == torch.uint8
    assert sorted(p.name for p in kept.decoded.path.iterdir()) == sorted(
        f"{i}.{part}.npy" for i in range(4) for part in ("image", "mask"))
    copy = pickle.loads(pickle.dumps(kept))  # a reader process's: the folder, not its removal
    assert copy.decoded.path == kept.decoded.path
    del copy
    gc.collect()
    assert folder.is_dir()
    del kept, around, decoded
    gc.collect()
    assert not folder.exists()  # gone with the tiles that used it
    # a killed run's folder of this very pid (a container's first process has the same one
    # each time) is stale; another machine's (a cache shared by nodes) is not this one's
    # to judge by its pid, even one that no process here has
    import os
    import socket

    again = tmp_path / "cache" / f"decoded-{os.getpid()}-0badcafe-{socket.gethostname()}"
    other = tmp_path / "cache" / "decoded-999999999-0badcafe-another-node"
    again.mkdir()
    other.mkdir()
    first = tiles_module.Decoded(tmp_path / "cache")
    assert not again.exists() and other.is_dir() and first.path.is_dir()
    second = tiles_module.Decoded(tmp_path / "cache")  # two stages in one process: both kept
    assert first.path.is_dir() and second.path.is_dir()
    del first, second
    # where the disk has no room for them, nothing is kept
    monkeypatch.setattr(tiles_module.shutil, "disk_usage",
                        lambda path: SimpleNamespace(free=2**30))  # a gibibyte, no more
    assert tiles_module.decode_into(tmp_path / "cache", [Tiles(files, (16, 16))]) is None
    assert tiles_module.decode_into(tmp_path / "cache", [files]) is None  # none tiled


@pytest.mark.skipif(not os.path.isfile("/proc/self/stat"),
                    reason="a process's start is read from Linux's /proc")
def test_a_killed_runs_folder_is_reclaimed_where_another_process_holds_its_pid_now(tmp_path):
    import socket

    import paser.data.tiles as tiles_module

    started = tiles_module._started
    with open("/proc/uptime") as f:  # clock ticks since boot, now
        now = float(f.read().split()[0]) * os.sysconf("SC_CLK_TCK")
    assert int(started(os.getppid())) <= int(started(os.getpid())) <= now + 1
    host, cache = socket.gethostname(), tmp_path / "cache"
    holder = os.getppid()  # alive, and not this process (whose pid is judged by more)
    killed = cache / f"decoded-{holder}.{int(started(holder)) - 1}-0badcafe-{host}"
    live = cache / f"decoded-{holder}.{started(holder)}-0badcafe-{host}"
    ours = cache / f"decoded-{os.getpid()}.{int(started(os.getpid())) - 1}-0badcafe-{host}"
    for folder in (killed, live, ours):
        folder.mkdir(parents=True)
    decoded = tiles_module.Decoded(cache)
    assert not killed.exists() and not ours.exists() and live.is_dir()
    assert decoded.path.name.startswith(f"decoded-{os.getpid()}.{started(os.getpid())}-")
    del decoded
    gc.collect()


@pytest.mark.slow
def test_the_processes_of_a_machine_check_room_for_a_copy_each(tmp_path, monkeypatch):
    from types import SimpleNamespace

    import paser.data.tiles as tiles_module

    root, cache = mixed_folder(tmp_path / "d"), tmp_path / "cache"
    # three splits of these images: float32 images of 1 channel, byte masks
    need = 3 * sum(h * w * (4 + 1) for h, w in SIZES)
    base = ["data.dataset=folder", f"data.root={root}", "models.num_classes=2", "grid=[2, 2]",
            "stage1.class_weights=null", "data.tile=[16, 16]", "data.stream=always",
            "data.workers=0"]
    for devices, copies, kept in ((2, 1, 0), (2, 2, 1), (1, 1, 1)):
        free = copies * 2 * need + 2**30 + 1  # room for this many copies, at spare=2
        monkeypatch.setattr(tiles_module.shutil, "disk_usage",
                            lambda path, free=free: SimpleNamespace(free=free))
        cfg = load_config(preset="battery-quick",
                          overrides=[*base, f"distributed.devices={devices}"])
        data = load_stage_data(cfg, progress=False, run_dir=tmp_path)  # kept while in use
        assert len(list(cache.glob("decoded-*"))) == kept, (devices, copies)
        del data
        gc.collect()


def test_a_reader_whose_kept_image_was_removed_reads_it_again(tmp_path):
    import paser.data.tiles as tiles_module

    files = FolderDataset(mixed_folder(tmp_path / "d"), "train")
    tiles, plain = Tiles(files, (16, 16)), Tiles(files, (16, 16))
    decoded = tiles_module.decode_into(tmp_path / "cache", [tiles])
    tiles.image(0)
    # the folder's owner (the process that made it, ending) removing it: the image gone first
    (tiles.decoded.path / "0.image.npy").unlink()
    tiles._last = None
    assert torch.equal(tiles.image(0), plain.image(0))
    del decoded


@pytest.mark.slow
def test_a_run_trains_on_tiles_of_mixed_sizes_or_says_what_to_set(tmp_path):
    root = mixed_folder(tmp_path / "d")
    base = ["data.dataset=folder", f"data.root={root}", "models.num_classes=2",
            "grid=[2, 2]", "stage1.class_weights=null", "stage1.min_epoch_images=null"]
    import contextlib

    import paser.data.registry as registry
    from paser.data.registry import check_dataset

    seen = {}

    class Bar:  # what the progress bar is told: a split's images, counted once each
        def add_task(self, name, total, info):
            seen[name] = [total, 0]
            return name

        def update(self, task, advance):
            seen[task][1] += advance

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(registry, "progress_bar", lambda show: contextlib.nullcontext(Bar()))
        report = check_dataset(root, workers=0)  # read image by image
    assert all(done == total for total, done in seen.values()) and len(seen) == 3
    assert report["splits"]["test"]["size"] is None
    assert report["splits"]["test"]["sizes"] == "32 x 32 to 50 x 61"
    with pytest.raises(DataError, match=r"i1.png: 50 x 61, but i0.png is 40 x 40 \(this "
                       r"split.s images are 32 x 32 to 50 x 61\); set data.tile=\[H,W\]"):
        load_stage_data(load_config(preset="battery-quick", overrides=[*base, "data.tile=null"]))
    data = load_stage_data(load_config(preset="battery-quick",
                                       overrides=[*base, "data.tile=[16, 16]"]))
    assert data.test.images.shape[1:] == (1, 16, 16) and len(data.test) == 38
    # streamed, the tiles keep their images decoded under the run's cache while in use
    streamed = load_stage_data(load_config(preset="battery-quick", overrides=[
        *base, "data.tile=[16, 16]", "data.stream=always", "data.workers=0"]),
        progress=False, run_dir=tmp_path)
    assert len(list((tmp_path / "cache").glob("decoded-*"))) == 1
    rows = torch.tensor([0, 5, 2])
    x, y = next(streamed.pre.gather([rows]))
    assert torch.equal(x, data.pre.images[rows]) and torch.equal(y, next(data.pre.gather([rows]))[1])
    # the other splits' images, numbered from 0 too, are their own, not train's kept ones
    for split in ("validation", "test"):
        every = torch.arange(len(getattr(data, split)))
        x, y = next(getattr(streamed, split).gather([every]))
        assert torch.equal(x, getattr(data, split).images), split
        assert torch.equal(y, next(getattr(data, split).gather([every]))[1]), split
    del streamed, x, y
    gc.collect()
    assert not list((tmp_path / "cache").glob("decoded-*"))
    # what a user can match to their files: the tiles' images, counted
    assert counted(data.test.ids, (16, 16)) == ("38 tiles of 16 x 16 from 4 images", "tile")
    assert source_images(data.test.ids).tolist() == [0] * 9 + [1] * 16 + [2] * 4 + [3] * 9
    assert _tiled_from(data) == {"tiled_from": {"train": 4, "validation": 4, "test": 4}}
    whole = load_stage_data(load_config(preset="battery-quick", overrides=[
        "data.synthetic.n_train=6", "data.synthetic.n_val=3", "data.synthetic.n_test=3",
        f"data.cache_dir={tmp_path / 'syn'}", "data.synthetic.height=32", "data.synthetic.width=32"]), progress=False)
    assert counted(whole.test.ids, (32, 32)) == ("3 images of 32 x 32", "image")
    assert source_images(whole.test.ids) is None and _tiled_from(whole) == {}
    with pytest.raises(Exception, match=r"data.tile.*does not divide into the grid 2 x 2"):
        load_stage_data(load_config(preset="battery-quick", overrides=[*base, "data.tile=[15, 16]"]))


@pytest.mark.slow
def test_any_image_is_routed_in_the_trained_patches(tmp_path):
    """A run trained on 128 x 128 tiles of 2 x 2 patches routes a 1024 x 1024 image in 16 x
    16 patches of 64 x 64, and gives what its 64 tiles give segmented one by one."""
    cfg = load_config(preset="battery-quick", overrides=["data.tile=[128, 128]",
                                                         "models.num_classes=3"])
    m = model(cfg, tmp_path / "run")
    assert m.tile == (128, 128)
    x = torch.rand(1, 1, 1024, 1024, generator=torch.Generator().manual_seed(0))
    out = m.segment(x)
    grid = m.grid_for(1024, 1024)
    assert (grid.rows, grid.cols, grid.patch_size(1024, 1024)) == (16, 16, (64, 64))
    assert out.actions.shape == (1, 256) and out.mask.shape == (1, 1024, 1024)
    alone = [m.segment(x[..., y:y + 128, c:c + 128]) for y in range(0, 1024, 128)
             for c in range(0, 1024, 128)]
    mask = torch.cat([torch.cat([alone[8 * r + c].mask for c in range(8)], -1)
                      for r in range(8)], -2)
    assert torch.equal(out.mask, mask)
    assert float(out.gflops[0]) == pytest.approx(sum(float(a.gflops[0]) for a in alone))
    # the labels alone (what paser segment keeps): the same labels, routing and GFLOP
    lean = m.segment(x, probs=False)
    assert lean.probs is None and torch.equal(lean.mask, out.mask)
    assert torch.equal(lean.actions, out.actions) and torch.equal(lean.gflops, out.gflops)
    assert torch.equal(out.probs[..., 128:256, 256:384], alone[8 * 1 + 2].probs)
    tile_actions = torch.stack([a.actions[0].view(2, 2) for a in alone]).view(8, 8, 2, 2)
    assert torch.equal(out.actions.view(16, 16), tile_actions.permute(0, 2, 1, 3).reshape(16, 16))
    # a size that is not a multiple of the tile: padded, cropped back, paid per tile
    odd = m.segment(x[..., :200, :300])
    assert odd.mask.shape == (1, 200, 300) and odd.actions.shape == (1, 2 * 2 * 3 * 2)
    # ... where the last column of patches (x from 320) is padding only: f0, no pool model
    # paid; the policy's choice there, and its cost, is what routing without that knowledge
    # spends for nothing
    top = m.router.num_models - 1
    to_f2 = torch.zeros(top + 1)
    to_f2[top] = 1e3  # a bias that sends every patch to the last model
    odd = m.segment(x[..., :200, :300], bias=to_f2)
    blind = route_tiled(lambda t, inside: m.router(t, bias=to_f2, mc_seed=0),
                        x[..., :200, :300], (128, 128), m.router.grid)
    padding = torch.zeros(4, 6, dtype=torch.bool)
    padding[:, 5] = True
    assert (blind.actions == top).all() and (odd.actions.view(4, 6)[padding] == 0).all()
    assert (odd.actions.view(4, 6)[~padding] == top).all()
    assert torch.equal(odd.mask, blind.mask)  # padding is cropped away
    patch = torch.tensor(m.router.costs(128, 128).patch, dtype=torch.float64)
    saved = float(patch[blind.actions.view(4, 6)[padding]].sum())
    assert float(odd.gflops[0]) == pytest.approx(float(blind.gflops[0]) - saved)
    # one model alone, to compare with routing, leaves the padding out as routing does
    # (a helper's audit: f2 alone spent 75 % of a 64 x 64 image's GFLOP on it)
    for k in range(1, top + 1):
        alone_k = m.segment(x[..., :200, :300], only=k)
        assert (alone_k.actions.view(4, 6)[padding] == 0).all()
        assert (alone_k.actions.view(4, 6)[~padding] == k).all()
        assert float(alone_k.gflops[0]) == pytest.approx(float(patch[k]) * int((~padding).sum()))
        every = route_tiled(lambda t, inside, k=k: m.router.alone(k, t),
                            x[..., :200, :300], (128, 128), m.router.grid)
        assert torch.equal(alone_k.mask, every.mask)  # the padding's labels are cropped away
    # batching tiles does not change them
    same = route_tiled(lambda t, inside: m.router(t, bias=m._bias(None), mc_seed=0,
                                                  inside=inside),
                       x, (128, 128), m.router.grid, batch=5)
    assert torch.equal(same.mask, out.mask)


def test_the_cloud_tier_of_a_tiled_run_takes_its_tiles_and_says_so_of_other_images(tmp_path):
    """An image the server would cut into patches larger than the run's is refused with
    the tile to send, not with advice (pad it to the grid) that meets the next refusal."""
    import io

    from fastapi.testclient import TestClient

    from paser.serve.server import create_app

    cfg = load_config(preset="battery-quick", overrides=["data.tile=[128, 128]",
                                                         "models.num_classes=3"])
    # the helper's pool is one model: f1
    cfg = cfg.model_copy(update={"models": cfg.models.model_copy(
        update={"pool": cfg.models.pool[:1]})})
    client = TestClient(create_app(model(cfg, tmp_path / "run")))

    def post(h, w):
        buf = io.BytesIO()
        np.savez_compressed(buf, image=np.zeros((1, 1, h, w), np.uint8), index=np.array([0]))
        return client.post("/v1/segment", params={"model": "f1", "output": "labels"},
                           content=buf.getvalue(), headers={"Content-Type": "application/x-npz"})

    for h, w in ((300, 517), (256, 256)):
        r = post(h, w)
        assert r.status_code == 422
        assert r.json()["error"] == (f"an image of {h} x {w}: this run routes tiles of 128 x "
                                     "128 (data.tile); send its tiles as 'image' [B, C, 128, "
                                     "128] (the last ones padded), or 'patches'")
    r = post(128, 128)
    assert r.status_code == 200
    assert np.load(io.BytesIO(r.content))["labels"].shape == (1, 64, 64)


def test_a_run_trained_at_a_size_the_grid_does_not_divide_routes_tiles_padded_to_it(tmp_path):
    """data.tile auto, trained on 15 x 15 images with a 2 x 2 grid: the models saw them
    padded to 16 x 16 (patches of 8 x 8). Tiles of 15 x 15 made patches of 7 x 7 of the
    fixed grid: a 30 x 30 image failed ('covers 28x28'), and the cloud tier refused the
    edge's padded tiles (16 x 16, not 15 x 15). Tiles are the padded size."""
    import io

    from fastapi.testclient import TestClient

    from paser.serve.server import create_app

    cfg = load_config(preset="battery-quick", overrides=["models.num_classes=3"])
    cfg = cfg.model_copy(update={"models": cfg.models.model_copy(
        update={"pool": cfg.models.pool[:1]})})  # the helper's pool is one model: f1
    assert cfg.data.tile == "auto" and tuple(cfg.grid) == (2, 2)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "stage1.json").write_text(json.dumps({"image_size": [15, 15]}))
    m = model(cfg, tmp_path / "run")
    assert m.tile == (16, 16)
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.integers(0, 256, (1, 1, 15, 15)) / 255.0).float()
    whole = m.router(x, bias=m._bias(None), mc_seed=0)  # as the run saw its images
    same = m.segment(x)
    assert torch.equal(same.mask, whole.mask) and same.mc is not None  # routed whole
    # a cap is checked against what the trained size's pixels pay, not the padded tile's
    fixed = m.router.costs(15, 15).fixed
    with pytest.raises(ConfigError, match="GFLOP per megapixel of at least"):
        m.cap(fixed / (16 * 16 / 1e6) * 1.01)
    Image.fromarray(rng.integers(0, 256, (30, 30), dtype=np.uint8)).save(tmp_path / "a.png")
    [res] = segment_files(m, [tmp_path / "a.png"], tmp_path / "out")
    assert res.ok, res.error
    rec = json.loads((tmp_path / "out" / "a.json").read_text())
    assert rec["grid"] == [4, 4] and rec["patch"] == [8, 8]
    buf = io.BytesIO()  # a tile as the edge sends it: padded to the grid
    np.savez_compressed(buf, image=np.zeros((1, 1, 16, 16), np.uint8), index=np.array([0]))
    r = TestClient(create_app(m)).post(
        "/v1/segment", params={"model": "f1", "output": "labels"}, content=buf.getvalue(),
        headers={"Content-Type": "application/x-npz"})
    assert r.status_code == 200, r.text
    assert np.load(io.BytesIO(r.content))["labels"].shape == (1, 8, 8)


def test_stitched_tiles_keep_the_degraded_patches_of_any_batch():
    """A remote tier that failed on some batches of tiles only: the patches it left on f0
    are kept wherever they lie, whichever batch came first."""
    from paser.patches import PatchGrid
    from paser.routing import RoutingOutput

    grid = PatchGrid(1, 1)

    def route(t, inside, failing):
        n = t.shape[0]
        fail = None if not failing(int(t[0, 0, 0, 0])) else torch.ones(n, 1, dtype=torch.bool)
        return RoutingOutput(torch.zeros(n, 4, 4, dtype=torch.long), None,
                             torch.ones(n, 1, dtype=torch.long), torch.ones(n), None, None, fail)

    # a 4 x 16 image: four tiles of 4 x 4, tile j all j
    x = torch.arange(4.0).repeat_interleave(4).view(1, 1, 1, 16).expand(1, 1, 4, 16).contiguous()
    for failing, expect in ((lambda v: v >= 2, [False, False, True, True]),
                            (lambda v: v < 2, [True, True, False, False])):
        out = route_tiled(lambda t, i, failing=failing: route(t, i, failing), x, (4, 4), grid, batch=2,
                          probs=False)
        assert out.degraded.view(-1).tolist() == expect


def test_stitched_labels_are_class_indices_whatever_their_count():
    """The tiles' labels are stitched as bytes where they fit, and come back as int64 class
    indices either way, a batch of tiles past class 255 included."""
    from paser.patches import PatchGrid
    from paser.routing import RoutingOutput

    def route(t, inside):  # each tile labelled with 100 times its value
        n = t.shape[0]
        mask = (t[:, 0] * 100).long()
        return RoutingOutput(mask, None, torch.zeros(n, 1, dtype=torch.long), torch.ones(n),
                             None, None, None)

    # a 4 x 16 image: four tiles of 4 x 4, tile j all j; batches of two: classes 0 and 100,
    # then 200 and 300 (past a byte)
    x = torch.arange(4.0).repeat_interleave(4).view(1, 1, 1, 16).expand(1, 1, 4, 16).contiguous()
    out = route_tiled(route, x, (4, 4), PatchGrid(1, 1), batch=2, probs=False)
    assert out.mask.dtype == torch.long
    assert torch.equal(out.mask, (x[:, 0] * 100).long())
    out = route_tiled(route, x[..., :8], (4, 4), PatchGrid(1, 1), batch=2, probs=False)
    assert out.mask.dtype == torch.long and out.mask.unique().tolist() == [0, 100]


def test_segment_records_and_draws_the_patches_an_image_was_routed_in(tmp_path):
    cfg = load_config(preset="battery-quick", overrides=["data.tile=[16, 16]",
                                                         "models.num_classes=3"])
    m = model(cfg, tmp_path / "run")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 24), dtype=np.uint8)).save(
        tmp_path / "a.png")
    [res] = segment_files(m, [tmp_path / "a.png"], tmp_path / "out")
    assert res.ok, res.error
    rec = json.loads((tmp_path / "out" / "a.json").read_text())
    assert rec["grid"] == [6, 4] and rec["patch"] == [8, 8]
    assert np.array(rec["actions"]).shape == (6, 4)
    # the shares count the 5 x 3 patches that hold its 40 x 24 pixels, not the padding
    assert sum(rec["patches_per_model"]) == 15 and sum(res.fractions) == pytest.approx(1)
    routing = np.asarray(Image.open(tmp_path / "out" / "a_routing.png"))
    assert routing.shape == (40, 24, 3) and (routing[8] == 255).all()  # a patch border


def test_windows_around_tiles_hold_the_tile_at_their_centre_and_the_image_around_it(tmp_path):
    root = mixed_folder(tmp_path / "d")
    files = FolderDataset(root, "train")
    tiles = Tiles(files, (16, 16))
    around = tiles.around(4)
    assert around.size == (24, 24) and around.ids == tiles.ids and len(around) == len(tiles)
    for j in range(len(tiles)):  # the centre is the tile, exactly
        assert torch.equal(around.image(j)[:, 4:20, 4:20], tiles.image(j))
        assert torch.equal(around.mask(j)[4:20, 4:20], tiles.mask(j))
    img, mask = files.image(1), files.mask(1)  # 50 x 61
    j = tiles.ids.index("i1@16,16")  # inside the image: its neighbours' pixels
    assert torch.equal(around.image(j), img[:, 12:36, 12:36])
    assert torch.equal(around.mask(j), mask[12:36, 12:36])
    j = tiles.ids.index("i1@0,0")  # above and left of the image: mirrored, unlabelled
    assert torch.equal(around.image(j)[:, :4, 4:], img[:, 1:5, :20].flip(-2))
    assert (around.mask(j)[:4] == 255).all() and (around.mask(j)[:, :4] == 255).all()
    assert torch.equal(around.mask(j)[4:, 4:], mask[:20, :20])
    # only the window is gathered: along an axis of 5 pixels with a margin of 2, the
    # windows from the top and past the end, mirrored (images) or unlabelled (masks)
    from paser.data.tiles import _window_index

    assert _window_index(5, 2, 0, 6, True).tolist() == [2, 1, 0, 1, 2, 3]
    assert _window_index(5, 2, 4, 6, True).tolist() == [2, 3, 4, 3, 2, 1]
    assert _window_index(5, 2, 0, 6, False).tolist() == [-1, -1, 0, 1, 2, 3]
    assert _window_index(5, 2, 4, 6, False).tolist() == [2, 3, 4, -1, -1, -1]
    j = tiles.ids.index("i1@48,48")  # the last tile: past the image's bottom and right
    assert torch.equal(around.image(j)[:, :6, :6], img[:, 44:50, 44:50])
    assert torch.equal(around.image(j)[:, 6:8, :6], img[:, 47:49, 44:50].flip(-2))
    assert (around.mask(j)[6:] == 255).all() and torch.equal(around.mask(j)[:6, :6],
                                                              mask[44:50, 44:50])


def test_a_crop_at_offset_margin_is_the_tile_and_each_image_moves_by_its_own_offset():
    from paser.train.pretrain import crop

    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    y = torch.arange(2 * 8 * 8).reshape(2, 8, 8)
    xs, ys = crop(x, y, 2, torch.tensor([[2, 2], [0, 4]]))
    assert xs.shape == (2, 3, 4, 4) and ys.shape == (2, 4, 4)
    assert torch.equal(xs[0], x[0, :, 2:6, 2:6]) and torch.equal(ys[0], y[0, 2:6, 2:6])
    assert torch.equal(xs[1], x[1, :, 0:4, 4:8]) and torch.equal(ys[1], y[1, 0:4, 4:8])


def test_stage1_crops_tiles_of_folder_data_and_only_where_it_augments(tmp_path):
    from paser.data.stages import crop_margin

    root = mixed_folder(tmp_path / "d")
    base = ["data.dataset=folder", f"data.root={root}", "models.num_classes=2", "grid=[2, 2]",
            "stage1.class_weights=null", "data.tile=[16, 16]"]
    data = load_stage_data(load_config(preset="battery-quick", overrides=base))
    assert data.margin == 4  # half a patch of 8 x 8
    assert data.pre_around.images.shape == (len(data.pre), 1, 24, 24)
    assert data.pre_around.ids == data.pre.ids
    assert torch.equal(data.pre_around.images[:, :, 4:20, 4:20], data.pre.images)
    streamed = load_stage_data(load_config(preset="battery-quick",
                                           overrides=[*base, "data.stream=always"]))
    assert streamed.pre_around.streamed
    assert torch.equal(streamed.pre_around.images[:], data.pre_around.images)
    for extra, margin in ((["stage1.crop_margin=0"], 0), (["stage1.augment=off"], 0),
                          (["stage1.crop_margin=6"], 6)):
        cfg = load_config(preset="battery-quick", overrides=[*base, *extra])
        assert crop_margin(cfg, Tiles(FolderDataset(root, "train"), (16, 16))) == margin
    cfg = load_config(preset="battery-quick", overrides=[*base, "stage1.crop_margin=0"])
    assert load_stage_data(cfg).pre_around is None
    demo = load_config(preset="battery-quick")  # whole images, not tiles: no crops
    assert crop_margin(demo, FolderDataset(root, "train")) == 0


@pytest.mark.slow
def test_stage1_on_random_crops_trains_otherwise_and_the_same_again(tmp_path):
    """The pool models learn from crops (their losses move), seeded: a second run from
    scratch gives the same weights; f0 keeps the fixed tiles."""
    from paser.train.pretrain import pretrain

    root = mixed_folder(tmp_path / "d")
    base = ["num_threads=1", "data.dataset=folder", f"data.root={root}",
            "models.num_classes=2", "grid=[2, 2]", "stage1.class_weights=null",
            "stage1.min_epoch_images=null",
            "data.tile=[16, 16]", "stage1.epochs=2", "stage1.batch_size=2",
            "models.f0.epochs=1", "models.pool.0.epochs=null", "models.pool.1.epochs=null",
            "models.pool.0.kwargs={c0: 2, widths: [4, 4]}",
            "models.pool.1.kwargs={c0: 4, widths: [8, 8]}", "stage1.jitter=0"]
    runs = {}
    for name, extra in (("fixed", ["stage1.crop_margin=0"]), ("crops", []), ("again", [])):
        pretrain(load_config(preset="battery-quick", overrides=[*base, *extra]),
                 tmp_path / name, show_progress=False)
        runs[name] = {r: torch.load(tmp_path / name / "checkpoints" / f"{r}.pt")["model"]
                      for r in ("f1", "f2")}
    for role in ("f1", "f2"):
        assert all(torch.equal(v, runs["again"][role][k]) for k, v in runs["crops"][role].items())
        assert not all(torch.equal(v, runs["fixed"][role][k])
                       for k, v in runs["crops"][role].items())


@pytest.mark.slow
def test_the_router_learns_from_random_crops_of_its_tiles_when_asked(tmp_path):
    """stage2.crops: D_rl's and D_ft's windows are loaded with half a patch around them,
    the router's outcomes add one part per crop after the tiles themselves, each a crop of
    the window at its own seeded offsets (the same on every call), labels moved with it."""
    from paser.models import PooledPolicy, create_model
    from paser.outcomes import PatchOutcomes
    from paser.patches import PatchGrid
    from paser.routing import Router
    from paser.train.policy import random_crops, training_outcomes
    from paser.train.pretrain import crop

    root = mixed_folder(tmp_path / "d")
    base = ["data.dataset=folder", f"data.root={root}", "models.num_classes=2", "grid=[2, 2]",
            "stage1.class_weights=null", "data.tile=[16, 16]", "models.in_channels=1"]
    plain = load_stage_data(load_config(preset="battery-quick", overrides=base))
    assert plain.rl_around is None and plain.router_margin == 0  # off by default
    cfg = load_config(preset="battery-quick", overrides=[*base, "stage2.crops=2"])
    data = load_stage_data(cfg)
    assert data.router_margin == 4  # half a patch of 8 x 8
    for split, around in ((data.rl, data.rl_around), (data.ft, data.ft_around)):
        assert around.ids == split.ids
        assert torch.equal(around.images[:, :, 4:20, 4:20], split.images)
    first = random_crops(data.rl_around, 4, cfg.seed, 0, 0)
    again = random_crops(data.rl_around, 4, cfg.seed, 0, 0)
    other = random_crops(data.rl_around, 4, cfg.seed, 0, 1)
    assert torch.equal(first.images, again.images) and torch.equal(first.masks, again.masks)
    assert not torch.equal(first.images, other.images)
    assert first.images.shape == data.rl.images.shape
    offsets = torch.randint(9, (len(data.rl), 2),
                            generator=torch.Generator().manual_seed(cfg.seed * 1_000_003))
    xs, ys = crop(data.rl_around.images, data.rl_around.masks, 4, offsets)
    assert torch.equal(first.images, xs) and torch.equal(first.masks, ys)

    torch.manual_seed(0)
    router = Router(create_model("unet_tiny", 1, 2), PooledPolicy((2, 2), 3, 2), [
        create_model("unet_tiny", 1, 2), create_model("unet_tiny", 1, 2)], PatchGrid(2, 2), 1,
        mc_dropout="none").eval()
    out = training_outcomes(cfg, router, data, torch.device("cpu"), mc_seed=0)
    n_rl, n_ft = len(data.rl), len(data.ft)
    assert out.inter.shape[0] == 3 * (n_rl + n_ft)  # each split: its tiles, then 2 crops
    tiles = PatchOutcomes.build(router, data.rl, 2, 16, torch.device("cpu"), mc_seed=0)
    crops = PatchOutcomes.build(router, first, 2, 16, torch.device("cpu"), mc_seed=0)
    assert torch.equal(out.inter[:n_rl], tiles.inter)
    assert torch.equal(out.inter[n_rl:2 * n_rl], crops.inter)
    # built again on these outcomes (only f0 runs), the pool's part is taken as it is
    again = training_outcomes(cfg, router, data, torch.device("cpu"), mc_seed=0, pool_from=out)
    assert torch.equal(again.inter, out.inter)


def test_tiles_and_patches_of_rectangles_go_where_rows_and_columns_say(tmp_path):
    from paser.patches import PatchGrid
    from paser.routing import RoutingOutput

    cfg = load_config(preset="battery-quick", overrides=["data.tile=[128, 128]",
                                                         "models.num_classes=3"])
    m = model(cfg, tmp_path / "run")
    # an image of two tiles side by side is cut, not routed whole
    assert m.segment(torch.rand(1, 1, 128, 256)).actions.shape == (1, 8)
    # a 1 x 2 grid: patches of 128 rows and 64 columns, none of a 200 x 200 image taken for
    # padding (its last tiles reach x = 256, their patches start at 128 and 192 < 200)
    wide = model(cfg.model_copy(update={"grid": [1, 2]}), tmp_path / "wide")
    assert wide.grid_for(256, 256).patch_size(256, 256) == (128, 64)
    out = wide.segment(torch.rand(1, 1, 200, 200), bias=torch.tensor([0.0, 1e3]))
    assert out.actions.shape == (1, 8) and (out.actions == 1).all()
    # the progress of tiles done, and GFLOP summed over each image's own tiles
    def route(t, inside):  # label 0 everywhere; a tile's GFLOP: its mean intensity
        n = len(t)
        return RoutingOutput(torch.zeros(n, 32, 32, dtype=torch.long), None,
                             torch.zeros(n, 1, dtype=torch.long), t.mean((1, 2, 3)).double(),
                             None, None, None)

    calls = []
    route_tiled(route, torch.rand(1, 1, 50, 70), (32, 32), PatchGrid(1, 1), batch=4,
                probs=False, on_batch=lambda done, total: calls.append((done, total)))
    assert calls == [(4, 6), (6, 6)]  # 50 x 70 in tiles of 32 x 32: 2 x 3, in batches of 4
    x = torch.stack([torch.ones(1, 64, 96), torch.zeros(1, 64, 96)])  # 2 x 3 tiles each
    both = route_tiled(route, x, (32, 32), PatchGrid(1, 1), probs=False)
    assert both.gflops.tolist() == [6.0, 0.0]


def test_a_split_of_tiles_evaluates_as_the_same_tiles_held_in_memory(tmp_path):
    """`paser evaluate` on a run with data.tile hands PaSeR.evaluate the split's Tiles (a
    folder of mixed sizes): it was refused as neither Tensors nor a Dataset."""
    from paser.data import Tensors

    root = mixed_folder(tmp_path / "d")
    cfg = load_config(preset="battery-quick", overrides=["data.tile=[16, 16]",
                                                         "models.num_classes=3"])
    m = model(cfg, tmp_path / "run")
    tiles = Tiles(FolderDataset(root, "test"), (16, 16))
    held = Tensors(torch.stack([tiles.image(j) for j in range(len(tiles))]),
                   torch.stack([tiles.mask(j) for j in range(len(tiles))]), tiles.ids)
    got, want = m.evaluate(tiles, batch_size=8), m.evaluate(held, batch_size=8)
    assert got["images"] == want["images"] == 38
    assert got["miou"] == pytest.approx(want["miou"], abs=1e-12)
    assert got["gflops"] == pytest.approx(want["gflops"], rel=1e-12)
    assert got["fractions"] == pytest.approx(want["fractions"], abs=1e-12)


@pytest.mark.slow
def test_paser_run_gives_the_calibrated_gflop_per_tile_where_it_cuts_tiles(tmp_path,
                                                                           monkeypatch):
    """paser run's [calibrate] line said '0.052 GFLOP per image' on a folder of 400 x 400 to
    500 x 601 slices cut into 64 x 64 tiles: a tile's GFLOP, a 70th of a slice's. It says
    per tile, of which size, as paser calibrate does; whole images stay per image."""
    from paser.api import PaSeR
    from paser.run import calibrate_run

    root = mixed_folder(tmp_path / "d")
    (root / "classes.yaml").write_text(yaml.safe_dump({"classes": {0: "a", 200: "b", 100: "c"}}))
    lines = []
    for tile, said in (("[16, 16]", r"GFLOP per tile of 16 x 16, [\d.]+ GFLOP per megapixel"),
                       ("null", r"GFLOP per image, [\d.]+ GFLOP per megapixel")):
        cfg = load_config(preset="battery-quick", overrides=[
            "data.dataset=folder", f"data.root={root}", "grid=[2, 2]", "models.num_classes=3",
            f"data.tile={tile}", "stage1.class_weights=null"])
        if tile == "null":  # one size: the validation images cropped to 32 x 32
            for p in (root / "validation").glob("*/*.png"):
                Image.fromarray(np.asarray(Image.open(p))[:32, :32]).save(p)
        monkeypatch.setattr(PaSeR, "load", lambda *a, cfg=cfg, **k: model(cfg, tmp_path / "r"))
        calibrate_run(cfg, tmp_path / "r", echo=lines.append)
        assert re.search(r"validation mIoU [\d.]+ at [\d.]+ " + said, lines[-1]), lines[-1]


def test_paser_calibrate_gives_a_budget_per_tile_where_it_cuts_tiles(tmp_path, capsys):
    """On a run that cuts its images into 16 x 16 tiles, paser calibrate's target read 'a
    budget of 1,000 GFLOP per image' and its note '(1000 GFLOP per 16 x 16 validation
    image) ... --budget-gflops is per validation image', and a budget below the fixed cost
    'every 16 x 16 image pays': each is a tile's figure, and says so now, as its 'GFLOP per
    tile' line does; whole images stay per image."""
    from paser.cli.deploy import _above_dearest

    root = mixed_folder(tmp_path / "d")
    (root / "classes.yaml").write_text(yaml.safe_dump({"classes": {0: "a", 200: "b", 100: "c"}}))
    for tile, per in (("[16, 16]", "tile"), ("null", "image")):
        cfg = load_config(preset="battery-quick", overrides=[
            "data.dataset=folder", f"data.root={root}", "grid=[2, 2]", "models.num_classes=3",
            f"data.tile={tile}", "stage1.class_weights=null", "data.workers=0"])
        if tile == "null":  # one size: the validation images cropped to 16 x 16
            for p in (root / "validation").glob("*/*.png"):
                Image.fromarray(np.asarray(Image.open(p))[:16, :16]).save(p)
        paser = model(cfg, tmp_path / "r")
        cal = paser.calibrate(budget_gflops=1e3, save=False)
        said = "tile of 16 x 16" if per == "tile" else "image"
        assert cal.target_text().startswith(f"a budget of 1,000 GFLOP per {said};")
        _above_dearest(cal)
        note = capsys.readouterr().out
        assert f"(1000 GFLOP per 16 x 16 validation {per})" in note
        assert f"--budget-gflops is per validation {per};" in note
        with pytest.raises(ConfigError, match=rf"\(2\.56e-10 GFLOP per validation {per}\) is "
                           rf"below the [\d.]+ GFLOP every 16 x 16 {per} pays"):
            paser.calibrate(budget_gflops_per_mp=1e-6, save=False)
        assert cal.tiles == (per == "tile") and (cal.height, cal.width) == (16, 16)
