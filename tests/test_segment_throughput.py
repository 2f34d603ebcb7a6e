"""`paser segment` on folders as users run it: reader and writer processes give the same
files as one process, and `--model fK` runs one model alone on every image."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from paser.cli import app
from paser.errors import ConfigError
from paser.segment import find_images, read_input, segment_files


def images(folder, n=5):
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(folder / f"{i}.png")
    (folder / "bad.png").write_bytes(b"not a png")
    return find_images([folder])


@pytest.mark.slow  # reader and writer processes
def test_worker_processes_write_what_one_process_writes(mnist_run, tmp_path):
    from paser import PaSeR

    model = PaSeR.load(mnist_run)
    files = images(tmp_path / "in")
    seen = []
    one = segment_files(model, files, tmp_path / "one")
    many = segment_files(model, files, tmp_path / "many", on_done=seen.append, workers=2)
    assert [r.ok for r in many] == [r.ok for r in one] == [True] * 5 + [False]
    assert [r.stem for r in seen] == [f.stem for f in files]  # reported in order, each once
    assert "bad.png: cannot read the image" in many[-1].error
    for f in files[:-1]:
        for kind in ("labels", "overlay", "routing"):
            a = np.asarray(Image.open(tmp_path / "one" / f"{f.stem}_{kind}.png"))
            b = np.asarray(Image.open(tmp_path / "many" / f"{f.stem}_{kind}.png"))
            assert np.array_equal(a, b), (f, kind)
        ja, jb = (json.loads((tmp_path / d / f"{f.stem}.json").read_text())
                  for d in ("one", "many"))
        assert {**ja, "ms": 0, "claim": ""} == {**jb, "ms": 0, "claim": ""}  # two folders


def test_one_model_alone_is_that_model_on_every_patch(mnist_run, tmp_path):
    from paser import PaSeR

    model = PaSeR.load(mnist_run)
    router = model.router
    x = torch.from_numpy(read_input(images(tmp_path / "in", 1)[0], 1)[0])[None]
    costs = router.costs(*x.shape[-2:])
    for k in range(1, router.num_models):
        out = model.segment(x, only=k)
        want = router.alone(k, x).mask
        logits = torch.cat([router.pool_logits(k, p) for p in
                            router.grid.context(router.grid.pad(x)).split(1)])
        stitched = router.grid.crop(router.grid.merge(logits), *x.shape[-2:]).argmax(1)
        assert torch.equal(out.mask, want) and torch.equal(out.mask, stitched)
        assert (out.actions == k).all() and out.mc is None
        assert float(out.gflops[0]) == pytest.approx(costs.patch[k] * router.grid.num_patches)
    f0 = model.segment(x, only=0)
    assert torch.equal(f0.mask, router.grid.crop(router.observe(router.grid.pad(x), 0).pred,
                                                 *x.shape[-2:]))
    assert float(f0.gflops[0]) == pytest.approx(costs.f0_mc)
    [res] = segment_files(model, [tmp_path / "in" / "0.png"], tmp_path / "out", only=1)
    record = json.loads((tmp_path / "out" / "0.json").read_text())
    assert res.ok and record["only"].startswith("f1") and record["patches_per_model"][1] == \
        router.grid.num_patches


def test_an_unknown_model_is_a_clear_error(mnist_run, tmp_path):
    images(tmp_path / "in", 1)
    r = CliRunner().invoke(app, ["segment", str(tmp_path / "in"), "--run-dir", str(mnist_run),
                                 "--out", str(tmp_path / "o"), "--model", "f9"])
    assert isinstance(r.exception, ConfigError)
    assert str(r.exception) == "--model f9: this run has f0, f1, f2"


def test_a_loaded_run_has_f0_channels_last_and_its_pool_in_the_default_layout(mnist_run):
    """f0 runs on whole images, faster channels-last on CPU; the pool on patches, where it
    was slower (runtime.place, checkpoints.build_router)."""
    from paser import PaSeR

    router = PaSeR.load(mnist_run).router
    def convs(m):
        return [p for p in m.parameters() if p.dim() == 4 and p.shape[-1] > 1]
    assert convs(router.f0) and all(
        p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
        for p in convs(router.f0))
    assert all(p.is_contiguous() for m in router.pool for p in convs(m))
